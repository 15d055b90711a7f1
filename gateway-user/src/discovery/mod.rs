//! Pod discovery: where the gateway learns which pods serve which model.
//!
//! Sources feed one [`PodStore`]; routing and profiles only read the store.

pub mod adapters;
pub mod endpoints_file;
pub mod kubernetes;
pub mod model_adapters;
pub mod pod;
pub mod pods_file;
pub mod store;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use adapters::{AdapterBinding, AdapterSource};
pub use pod::{InFlightGuard, LoadClock, OthersHeard, PodInfo, PodLoad, Role, load_changed};
pub use store::{ModelPods, PodStore, Snapshot};

/// Where pods come from (`--discovery`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    /// `file:PATH`: a Kubernetes `v1 List` of Pods on disk.
    File(PathBuf),
    /// `kubernetes`: watch Pods through the API server.
    Kubernetes,
    /// `endpoints:PATH`: AIBrix's standalone endpoints file.
    Endpoints(PathBuf),
}

/// Polls the file at `path` every `poll` until `shutdown`, and hands `apply` its text (or why
/// it cannot be read) whenever that changes (`true`), and again every `refresh` when given
/// (`false`: same content). Polling rather than inotify also sees ConfigMap-style symlink
/// swaps and editors that replace the file.
async fn follow_file<F, Fut>(
    path: &Path,
    poll: Duration,
    refresh: Option<Duration>,
    shutdown: &CancellationToken,
    mut apply: F,
) where
    F: FnMut(Result<String, String>, bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut last_seen: Option<Result<String, String>> = None;
    let mut applied_at = Instant::now();
    loop {
        let current = tokio::fs::read_to_string(path).await.map_err(|e| e.to_string());
        let changed = last_seen.as_ref() != Some(&current);
        if changed || refresh.is_some_and(|every| applied_at.elapsed() >= every) {
            apply(current.clone(), changed).await;
            applied_at = Instant::now();
            last_seen = Some(current);
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

impl FromStr for DiscoverySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "kubernetes" {
            return Ok(Self::Kubernetes);
        }
        if let Some(path) = s.strip_prefix("endpoints:").filter(|p| !p.is_empty()) {
            return Ok(Self::Endpoints(PathBuf::from(path)));
        }
        match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            _ => Err(format!("expected file:PATH, endpoints:PATH or kubernetes, got {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_discovery_flag() {
        assert_eq!("kubernetes".parse(), Ok(DiscoverySource::Kubernetes));
        assert_eq!("file:/etc/pods.yaml".parse(), Ok(DiscoverySource::File("/etc/pods.yaml".into())));
        assert!("file:".parse::<DiscoverySource>().is_err());
        assert_eq!("endpoints:/etc/e.yaml".parse(), Ok(DiscoverySource::Endpoints("/etc/e.yaml".into())));
        assert!("endpoints:".parse::<DiscoverySource>().is_err());
        assert!("consul".parse::<DiscoverySource>().is_err());
    }
}
