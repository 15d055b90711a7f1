//! Faults and latency that tests switch at run time through `POST /mock/faults`.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::cli::{MAX_DELAY_MS, MockEngineArgs};

/// How the engine treats the next inference requests. Latency lives here too: a slow engine
/// is a fault as far as the gateway is concerned, and tests flip both the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Faults {
    /// Answer every inference request with this status and an error body.
    pub fail_status: Option<u16>,
    /// Streaming: reset the connection after this many SSE events. Non-streaming: reset it
    /// before any response byte.
    pub reset_after_chunks: Option<u32>,
    /// Read the request, never answer.
    pub hang: bool,
    /// Time to first token in milliseconds, counted from when the request starts running.
    pub ttft_ms: u64,
    /// Delay between two tokens in milliseconds.
    pub itl_ms: u64,
}

impl Faults {
    /// The faults the command line starts with.
    pub fn from_args(args: &MockEngineArgs) -> Self {
        Self {
            fail_status: args.fail_status,
            reset_after_chunks: args.reset_after_chunks,
            hang: args.hang,
            ttft_ms: args.ttft_ms,
            itl_ms: args.itl_ms,
        }
    }

    /// Time to first token.
    pub fn ttft(&self) -> Duration {
        Duration::from_millis(self.ttft_ms)
    }

    /// Delay between two tokens.
    pub fn itl(&self) -> Duration {
        Duration::from_millis(self.itl_ms)
    }

    /// These faults with `patch` applied, or why the patch is refused.
    pub fn patched(self, patch: FaultsPatch) -> Result<Self, String> {
        let FaultsPatch { fail_status, reset_after_chunks, hang, ttft_ms, itl_ms } = patch;
        let next = Self {
            fail_status: fail_status.unwrap_or(self.fail_status),
            reset_after_chunks: reset_after_chunks.unwrap_or(self.reset_after_chunks),
            hang: hang.unwrap_or(self.hang),
            ttft_ms: ttft_ms.unwrap_or(self.ttft_ms),
            itl_ms: itl_ms.unwrap_or(self.itl_ms),
        };
        if let Some(status) = next.fail_status
            && !(200..=599).contains(&status)
        {
            return Err(format!("fail_status must be within 200..=599, got {status}"));
        }
        if next.ttft_ms > MAX_DELAY_MS || next.itl_ms > MAX_DELAY_MS {
            return Err(format!("ttft_ms and itl_ms must be at most {MAX_DELAY_MS}"));
        }
        Ok(next)
    }
}

/// The body of `POST /mock/faults`: a field that is absent keeps its value, `null` clears
/// an optional fault.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    /// New [`Faults::fail_status`]; `Some(None)` clears it.
    #[serde(default, deserialize_with = "present")]
    pub fail_status: Option<Option<u16>>,
    /// New [`Faults::reset_after_chunks`]; `Some(None)` clears it.
    #[serde(default, deserialize_with = "present")]
    pub reset_after_chunks: Option<Option<u32>>,
    /// New [`Faults::hang`].
    pub hang: Option<bool>,
    /// New [`Faults::ttft_ms`].
    pub ttft_ms: Option<u64>,
    /// New [`Faults::itl_ms`].
    pub itl_ms: Option<u64>,
}

/// Tells a present `null` (clear) apart from an absent field (keep), which plain
/// `Option<Option<T>>` cannot.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The current [`Faults`], shared by all connections.
#[derive(Debug)]
pub struct FaultSwitch(Mutex<Faults>);

impl FaultSwitch {
    /// A switch starting at `faults`.
    pub fn new(faults: Faults) -> Self {
        Self(Mutex::new(faults))
    }

    /// The faults in force now; each request reads them once, on arrival.
    pub fn current(&self) -> Faults {
        // `Faults` is plain data, so a panic elsewhere cannot leave it half-written.
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `patch` and returns the faults now in force.
    pub fn apply(&self, patch: FaultsPatch) -> Result<Faults, String> {
        let mut faults = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *faults = faults.patched(patch)?;
        Ok(*faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Faults {
        Faults { fail_status: Some(503), reset_after_chunks: None, hang: false, ttft_ms: 5, itl_ms: 1 }
    }

    fn patch(json: &str) -> FaultsPatch {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn absent_fields_keep_null_clears() {
        let keep = base().patched(patch(r#"{"itl_ms": 7}"#)).unwrap();
        assert_eq!(keep.fail_status, Some(503));
        assert_eq!(keep.itl_ms, 7);

        let cleared = base().patched(patch(r#"{"fail_status": null, "reset_after_chunks": 2, "hang": true}"#)).unwrap();
        assert_eq!(cleared.fail_status, None);
        assert_eq!(cleared.reset_after_chunks, Some(2));
        assert!(cleared.hang);
        assert_eq!(cleared.ttft_ms, 5);
    }

    #[test]
    fn refuses_bad_values_and_unknown_fields() {
        assert!(base().patched(patch(r#"{"fail_status": 42}"#)).is_err());
        assert!(base().patched(patch(r#"{"ttft_ms": 99999999}"#)).is_err());
        assert!(serde_json::from_str::<FaultsPatch>(r#"{"fail_statu": 500}"#).is_err());
    }
}
