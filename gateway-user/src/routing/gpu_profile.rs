//! GPU profiles: what a deployment of a model sustains, as AIBrix's GPU
//! optimizer measures it and writes it to Redis under
//! `aibrix:profile_<model>_<deployment>`. The `slo*` strategies read them.
//!
//! The value is JSON (AIBrix's `ModelGPUProfile`):
//!
//! ```json
//! {"gpu": "llama-a100", "cost": 1.0, "created": 1730000000.0,
//!  "indexes": [[4, 8, 16], [128, 512]],       // output tokens, prompt tokens
//!  "tputs":   [[3.0, 2.0], [2.0, 1.5], ...],  // max requests/s per (output, prompt) cell
//!  "e2e":     [[0.5, 0.8], ...],               // mean end-to-end seconds per cell
//!  "ttft":    [[...]], "tpot": [[...]],
//!  "slos": {"percentile": 99, "e2e": 1.0, "ttft": 0, "tpat": 0, "tpot": 0}}
//! ```
//!
//! A request's cell (its *signature*) is found on a log2 scale: each feature
//! goes to the index whose log2 is nearest (half way between two goes up),
//! clamped to the ends.
//!
//! Profiles are read in the background every [`REFRESH_EVERY`] (never on
//! the request path), as AIBrix's cache does: `SCAN aibrix:profile_*`, then
//! each value. A profile older (`created`) than the one held does not
//! replace it. Unlike AIBrix, a key gone from Redis is forgotten at the next
//! complete scan (AIBrix keeps it until restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Prefix of every profile key.
pub const KEY_PREFIX: &str = "aibrix:profile_";
/// How often profiles are read again (AIBrix: 10 s).
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Longest one refresh may take before it is abandoned (and logged).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// Profile keys read at most per refresh; more are ignored (and logged).
const MAX_PROFILES: usize = 4096;
/// Largest profile value accepted.
const MAX_PROFILE_BYTES: usize = 1 << 20;
/// A failing refresh is logged at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The SLO a profile was made for; the first one set (> 0) of `tpot`,
/// `ttft`, `tpat`, `e2e` is what a request is ranked by.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Slos {
    pub e2e: f64,
    pub ttft: f64,
    pub tpat: f64,
    pub tpot: f64,
}

/// One deployment's profile for one model.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct GpuProfile {
    /// The deployment it was measured on.
    #[serde(rename = "gpu")]
    pub deployment: String,
    /// When it was made (Unix seconds).
    pub created: f64,
    /// Feature values of each table axis ([output tokens], [prompt tokens]),
    /// held as their log2.
    indexes: Vec<Vec<f64>>,
    tputs: Option<Vec<Vec<f64>>>,
    e2e: Option<Vec<Vec<f64>>>,
    ttft: Option<Vec<Vec<f64>>>,
    pub slos: Slos,
}

/// Why a profile cannot answer for a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("profile has no throughput data")]
    NoThroughput,
    #[error("profile has no E2E latency data")]
    NoE2e,
    #[error("profile has no TTFT data")]
    NoTtft,
    #[error("no SLO available")]
    NoSlo,
    #[error("profile index size mismatch")]
    Indexes,
    #[error("signature out of bound")]
    OutOfBound,
}

impl GpuProfile {
    /// Parses a profile value; the index values are kept as their log2.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut profile: Self = serde_json::from_slice(bytes)?;
        for axis in &mut profile.indexes {
            for value in axis.iter_mut() {
                *value = value.log2();
            }
        }
        Ok(profile)
    }

    /// The table cell of a request with these features (output tokens,
    /// prompt tokens).
    pub fn signature(&self, features: [f64; 2]) -> Result<[usize; 2], ProfileError> {
        let mut cell = [0; 2];
        for (i, feature) in features.into_iter().enumerate() {
            let axis = self.indexes.get(i).filter(|a| !a.is_empty()).ok_or(ProfileError::Indexes)?;
            let value = feature.max(0.0).log2();
            let last = axis.len() - 1;
            cell[i] = if axis.len() == 1 || value < axis[0] {
                0
            } else if value > axis[last] {
                last
            } else {
                // The first index at or past the value, then the nearer of it
                // and the one before (half way goes up).
                let upper = axis.partition_point(|&x| x < value).min(last);
                if upper == 0 || axis[upper] == value {
                    upper
                } else {
                    let lower = upper - 1;
                    if value < axis[lower] + (axis[upper] - axis[lower]) * 0.5 { lower } else { upper }
                }
            };
        }
        Ok(cell)
    }

    fn cell(table: &Option<Vec<Vec<f64>>>, missing: ProfileError, [i, j]: [usize; 2]) -> Result<f64, ProfileError> {
        let table = table.as_ref().ok_or(missing)?;
        table.get(i).and_then(|row| row.get(j)).copied().ok_or(ProfileError::OutOfBound)
    }

    /// Requests per second the deployment sustains for this cell.
    pub fn throughput(&self, cell: [usize; 2]) -> Result<f64, ProfileError> {
        Self::cell(&self.tputs, ProfileError::NoThroughput, cell)
    }

    /// Mean end-to-end seconds for this cell.
    pub fn e2e_seconds(&self, cell: [usize; 2]) -> Result<f64, ProfileError> {
        Self::cell(&self.e2e, ProfileError::NoE2e, cell)
    }

    /// Mean seconds to the first token for this cell.
    pub fn ttft_seconds(&self, cell: [usize; 2]) -> Result<f64, ProfileError> {
        Self::cell(&self.ttft, ProfileError::NoTtft, cell)
    }
}

/// The profiles held, by Redis key.
#[derive(Debug, Default)]
pub struct Profiles {
    by_key: RwLock<HashMap<String, Arc<GpuProfile>>>,
}

/// The Redis key of `model`'s profile on `deployment`.
pub fn key(model: &str, deployment: &str) -> String {
    format!("{KEY_PREFIX}{model}_{deployment}")
}

impl Profiles {
    /// `model`'s profile on `deployment`, if one was read.
    pub fn get(&self, model: &str, deployment: &str) -> Option<Arc<GpuProfile>> {
        let by_key = self.by_key.read().unwrap_or_else(PoisonError::into_inner);
        if by_key.is_empty() {
            return None;
        }
        by_key.get(&key(model, deployment)).cloned()
    }

    /// Takes the profiles of a complete read: a profile older than the one
    /// held for its key keeps the one held; keys not read are dropped.
    pub fn replace(&self, read: HashMap<String, GpuProfile>) {
        let mut by_key = self.by_key.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = HashMap::with_capacity(read.len());
        for (key, profile) in read {
            let kept = by_key.remove(&key).filter(|held| held.created > profile.created);
            next.insert(key, kept.unwrap_or_else(|| Arc::new(profile)));
        }
        *by_key = next;
    }

    /// Sets one profile (tests).
    #[cfg(test)]
    pub fn insert(&self, model: &str, deployment: &str, json: &str) {
        let profile = GpuProfile::parse(json.as_bytes()).expect("valid profile");
        self.by_key.write().unwrap_or_else(PoisonError::into_inner).insert(key(model, deployment), Arc::new(profile));
    }
}

/// Reads the profiles from the Redis at `url` now and every [`REFRESH_EVERY`].
pub fn spawn_refresh(url: &str, profiles: Arc<Profiles>, shutdown: CancellationToken) -> Result<(), String> {
    let client = crate::redis_link::open(url)?;
    tokio::spawn(async move {
        let last_log = Mutex::new(None::<Instant>);
        let mut ticker = tokio::time::interval(REFRESH_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let failure = match tokio::time::timeout(REFRESH_TIMEOUT, read_all(&client)).await {
                Ok(Ok(read)) => {
                    profiles.replace(read);
                    continue;
                }
                Ok(Err(err)) => err,
                Err(_) => format!("no answer within {} s", REFRESH_TIMEOUT.as_secs()),
            };
            let mut last = last_log.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
                *last = Some(Instant::now());
                tracing::warn!(error = %failure, "cannot read GPU profiles from Redis; slo strategies keep the profiles last read");
            }
        }
    });
    Ok(())
}

/// Every profile in Redis (at most [`MAX_PROFILES`]); values that do not
/// parse are skipped and logged.
async fn read_all(client: &redis::Client) -> Result<HashMap<String, GpuProfile>, String> {
    let mut connection = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let pattern = format!("{KEY_PREFIX}*");
    let (keys, more) =
        crate::redis_link::scan_keys(&mut connection, &pattern, 100, MAX_PROFILES).await.map_err(|e| e.to_string())?;
    if more {
        tracing::warn!(limit = MAX_PROFILES, "more GPU profiles in Redis than are read; the rest are ignored");
    }
    let mut read = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(100) {
        let values: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(chunk).query_async(&mut connection).await.map_err(|e| e.to_string())?;
        for (key, value) in chunk.iter().zip(values) {
            let Some(value) = value.filter(|v| v.len() <= MAX_PROFILE_BYTES) else { continue };
            match GpuProfile::parse(&value) {
                Ok(profile) => {
                    read.insert(key.clone(), profile);
                }
                Err(err) => tracing::warn!(key = %key, error = %err, "GPU profile is not valid JSON; skipped"),
            }
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: &str = r#"{"gpu":"d1","created":2,"indexes":[[4,8,16],[128,512]],
        "tputs":[[3,2],[2,1.5],[1,0]],"e2e":[[0.5,0.8],[1,1.2],[2,3]],"slos":{"e2e":1.5}}"#;

    #[test]
    fn a_profile_parses_and_finds_the_nearest_cell_on_a_log_scale() {
        let profile = GpuProfile::parse(PROFILE.as_bytes()).expect("parses");
        assert_eq!(profile.deployment, "d1");
        assert_eq!(profile.slos.e2e, 1.5);
        assert_eq!(profile.signature([1.0, 10.0]), Ok([0, 0]), "below the first index");
        assert_eq!(profile.signature([100.0, 9000.0]), Ok([2, 1]), "past the last index");
        assert_eq!(profile.signature([8.0, 128.0]), Ok([1, 0]), "exactly on an index");
        // log2(5) = 2.32 is nearer 2 (4) than 3 (8); log2(6) = 2.58 is past half way.
        assert_eq!(profile.signature([5.0, 200.0]), Ok([0, 0]));
        assert_eq!(profile.signature([6.0, 300.0]), Ok([1, 1]));
        assert_eq!(profile.throughput([1, 1]), Ok(1.5));
        assert_eq!(profile.e2e_seconds([2, 1]), Ok(3.0));
        assert_eq!(profile.ttft_seconds([0, 0]), Err(ProfileError::NoTtft));
    }

    #[test]
    fn an_older_profile_does_not_replace_a_newer_and_vanished_keys_go() {
        let profiles = Profiles::default();
        profiles.insert("m", "d1", PROFILE);
        profiles.insert("m", "d2", PROFILE);
        let older = GpuProfile::parse(br#"{"gpu":"old","created":1}"#).expect("parses");
        profiles.replace(HashMap::from([(key("m", "d1"), older)]));
        assert_eq!(profiles.get("m", "d1").map(|p| p.deployment.clone()).as_deref(), Some("d1"));
        assert!(profiles.get("m", "d2").is_none());
    }
}
