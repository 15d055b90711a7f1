//! Pod discovery: where the gateway learns which pods serve which model.
//!
//! Sources feed one [`PodStore`]; routing and profiles only read the store.

pub mod endpoints_file;
pub mod kubernetes;
pub mod pod;
pub mod pods_file;
pub mod store;

use std::path::PathBuf;
use std::str::FromStr;

pub use pod::{InFlightGuard, PodInfo, PodLoad, Role, load_changed};
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
