//! Discovery from AIBrix's standalone endpoints file (`--endpoints-config`
//! in AIBrix, `--discovery endpoints:FILE` here), so a setup without
//! Kubernetes moves over unchanged:
//!
//! ```yaml
//! models:
//!   - name: "Qwen/Qwen2.5-1.5B-Instruct"
//!     engine: vllm                 # optional
//!     workers: ["vllm-0:8000", "10.0.0.7:8000"]   # or `endpoints`
//!   - name: "Qwen/Qwen2.5-72B"
//!     rolesets:                    # prefill/decode; or the shorthand
//!       - name: group-a            # prefill_workers / decode_workers
//!         prefill: ["prefill-0:8000"]          # (one roleset, `default`)
//!         decode: ["decode-0:8000"]
//! ```
//!
//! Each address is `host:port` (a bare host means port 8000). Host names
//! are resolved when the file is read and again every
//! [`RESOLVE_EVERY`]; a host that stops resolving keeps its last good
//! address, and one that never resolved is listed but not ready. Pods are named as AIBrix names them (`<model>-<host>-<index>` in
//! namespace `standalone`) and carry AIBrix's labels, so profiles, PD
//! rolesets and every strategy work as with Kubernetes. The file is
//! re-read when it changes, like a pods file.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::pod::{DEFAULT_PORT, ENGINE_LABEL, MODEL_NAME_LABEL, PORT_LABEL, PodInfo, ROLE_LABEL, ROLESET_LABEL, Role};
use super::store::PodStore;

/// How often host names are resolved again when the file has not changed.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(10);
/// The namespace AIBrix gives standalone endpoints.
const NAMESPACE: &str = "standalone";
/// The roleset of the `prefill_workers` / `decode_workers` shorthand.
const DEFAULT_ROLESET: &str = "default";

/// Why an endpoints file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointsFileError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("not an endpoints file: {0}")]
    Parse(String),
    #[error("model {model:?}: {reason}")]
    Model { model: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsDoc {
    models: Vec<ModelDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelDoc {
    name: String,
    #[serde(default)]
    engine: Option<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    workers: Vec<String>,
    #[serde(default)]
    rolesets: Vec<RolesetDoc>,
    #[serde(default)]
    prefill_workers: Vec<String>,
    #[serde(default)]
    decode_workers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolesetDoc {
    name: String,
    #[serde(default)]
    prefill: Vec<String>,
    #[serde(default)]
    decode: Vec<String>,
}

/// One address of the file, before resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub model: String,
    pub engine: Option<String>,
    /// `(roleset, role)` for PD workers.
    pub role: Option<(String, Role)>,
    pub host: String,
    pub port: u16,
    /// Its place in the file, counted over all models (AIBrix's pod names).
    pub index: usize,
}

/// Reads the text of an endpoints file, with AIBrix's rules: `endpoints`
/// and `workers` are one list under two names (not both), and a model is
/// either plain workers or rolesets (`rolesets`, or the shorthand), never
/// both.
pub fn parse(text: &str) -> Result<Vec<Endpoint>, EndpointsFileError> {
    let doc: EndpointsDoc = serde_norway::from_str(text).map_err(|e| EndpointsFileError::Parse(e.to_string()))?;
    let mut endpoints = Vec::new();
    for model in doc.models {
        let fail = |reason: &str| EndpointsFileError::Model { model: model.name.clone(), reason: reason.to_owned() };
        if model.name.trim().is_empty() {
            return Err(fail("a model needs a name"));
        }
        if !model.endpoints.is_empty() && !model.workers.is_empty() {
            return Err(fail("endpoints and workers are the same list; use one of them"));
        }
        let shorthand = !model.prefill_workers.is_empty() || !model.decode_workers.is_empty();
        if !model.rolesets.is_empty() && shorthand {
            return Err(fail("rolesets and prefill_workers/decode_workers cannot be combined"));
        }
        let plain = if model.endpoints.is_empty() { &model.workers } else { &model.endpoints };
        let rolesets = if shorthand {
            vec![RolesetDoc {
                name: DEFAULT_ROLESET.into(),
                prefill: model.prefill_workers.clone(),
                decode: model.decode_workers.clone(),
            }]
        } else {
            model.rolesets
        };
        if !plain.is_empty() && !rolesets.is_empty() {
            return Err(fail("plain workers and prefill/decode rolesets cannot be combined"));
        }
        let mut add = |address: &str, role: Option<(String, Role)>| -> Result<(), EndpointsFileError> {
            let (host, port) = split_address(address).ok_or_else(|| fail(&format!("bad address {address:?}")))?;
            let index = endpoints.len();
            endpoints.push(Endpoint {
                model: model.name.clone(),
                engine: model.engine.clone(),
                role,
                host,
                port,
                index,
            });
            Ok(())
        };
        for address in plain {
            add(address, None)?;
        }
        for roleset in &rolesets {
            if roleset.name.trim().is_empty() {
                return Err(fail("a roleset needs a name"));
            }
            for (addresses, role) in [(&roleset.prefill, Role::Prefill), (&roleset.decode, Role::Decode)] {
                for address in addresses {
                    add(address, Some((roleset.name.clone(), role)))?;
                }
            }
        }
    }
    Ok(endpoints)
}

/// `host:port`, `[v6]:port`, or a bare host (port 8000).
fn split_address(address: &str) -> Option<(String, u16)> {
    let address = address.trim();
    if address.is_empty() {
        return None;
    }
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
            (!host.is_empty()).then(|| (host.trim_matches(['[', ']']).to_owned(), port))
        }
        Some(_) => address.parse::<std::net::IpAddr>().ok().map(|ip| (ip.to_string(), DEFAULT_PORT)),
        None => Some((address.to_owned(), DEFAULT_PORT)),
    }
}

/// The pod AIBrix makes of an endpoint, at `resolved` (not ready when the
/// host did not resolve).
pub fn to_pod(endpoint: &Endpoint, resolved: Option<SocketAddr>) -> PodInfo {
    let name = format!("{}-{}-{}", sanitize(&endpoint.model), endpoint.host.replace('.', "-"), endpoint.index);
    let mut labels = BTreeMap::from([
        (MODEL_NAME_LABEL.to_owned(), endpoint.model.clone()),
        (PORT_LABEL.to_owned(), endpoint.port.to_string()),
    ]);
    if let Some(engine) = &endpoint.engine {
        labels.insert(ENGINE_LABEL.to_owned(), engine.clone());
    }
    let (roleset, role) = match &endpoint.role {
        Some((roleset, role)) => {
            labels.insert(ROLESET_LABEL.to_owned(), roleset.clone());
            labels.insert(ROLE_LABEL.to_owned(), if *role == Role::Prefill { "prefill" } else { "decode" }.to_owned());
            (Some(roleset.clone()), *role)
        }
        None => (None, Role::Combined),
    };
    PodInfo {
        key: format!("{NAMESPACE}/{name}"),
        name,
        namespace: NAMESPACE.to_owned(),
        model: endpoint.model.clone(),
        addr: resolved,
        addr_text: resolved.map(|a| a.to_string()).unwrap_or_default(),
        metric_port: endpoint.port,
        engine: endpoint.engine.clone().unwrap_or_else(|| "vllm".to_owned()),
        roleset,
        role,
        labels,
        config_annotation: None,
        pd: Default::default(),
        custom_paths: Vec::new(),
        data_parallel: 1,
        ready: resolved.is_some(),
        load: Arc::default(),
        series: Default::default(),
    }
}

/// AIBrix's pod-name form of a model name: lower case, `/` and `_` as `-`,
/// at most 50 characters.
fn sanitize(model: &str) -> String {
    let name = model.to_lowercase().replace(['/', '_'], "-");
    let name = name.trim_matches('-');
    let cut: String = name.chars().take(50).collect();
    cut.trim_end_matches('-').to_owned()
}

/// What the last resolutions found: each `host:port`'s last good address,
/// and the hosts failing now (warned about once, until they resolve again).
#[derive(Debug, Default)]
pub struct Resolutions {
    last_good: BTreeMap<(String, u16), SocketAddr>,
    failing: std::collections::BTreeSet<(String, u16)>,
}

/// Resolves every endpoint (blocking: run off the runtime's workers) and
/// makes the pods. A host that stops resolving keeps its last good address
/// (a DNS hiccup is not an outage); one that never resolved is listed, not
/// ready. Each host's failure is warned about when it starts, and its
/// recovery logged. Of a host's addresses an IPv4 one is preferred: vLLM
/// listens on `0.0.0.0` by default, and `localhost` may list `::1` first.
pub fn resolve(endpoints: &[Endpoint], seen: &mut Resolutions) -> Vec<PodInfo> {
    let mut used = std::collections::BTreeSet::new();
    let pods = endpoints
        .iter()
        .map(|endpoint| {
            let host = (endpoint.host.clone(), endpoint.port);
            used.insert(host.clone());
            let resolved = match (endpoint.host.as_str(), endpoint.port).to_socket_addrs() {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied()
                }
                Err(err) => {
                    if seen.failing.insert(host.clone()) {
                        let kept = seen.last_good.get(&host).map(ToString::to_string);
                        tracing::warn!(model = %endpoint.model, host = %endpoint.host, error = %err,
                            kept_address = kept.as_deref().unwrap_or("none: not ready"),
                            "endpoint host does not resolve");
                    }
                    None
                }
            };
            let addr = match resolved {
                Some(addr) => {
                    if seen.failing.remove(&host) {
                        tracing::info!(host = %endpoint.host, address = %addr, "endpoint host resolves again");
                    }
                    seen.last_good.insert(host, addr);
                    Some(addr)
                }
                None => seen.last_good.get(&host).copied(),
            };
            to_pod(endpoint, addr)
        })
        .collect();
    // Hosts no longer in the file are forgotten.
    seen.last_good.retain(|host, _| used.contains(host));
    seen.failing.retain(|host| used.contains(host));
    pods
}

/// Reads, resolves and loads the file once into the store.
pub async fn load_once(path: &Path, store: &PodStore) -> Result<usize, EndpointsFileError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| EndpointsFileError::Read { path: path.to_owned(), source })?;
    let endpoints = parse(&text)?;
    let pods =
        tokio::task::spawn_blocking(move || resolve(&endpoints, &mut Resolutions::default())).await.unwrap_or_default();
    let count = pods.len();
    store.replace_all(pods);
    Ok(count)
}

/// Keeps the store in step with the file (and its host names with DNS)
/// until shutdown. An unreadable or invalid file leaves the last good
/// state in place; the reason is logged once per distinct content.
pub async fn watch(path: PathBuf, store: Arc<PodStore>, poll: Duration, shutdown: CancellationToken) {
    let seen = Arc::new(std::sync::Mutex::new(Resolutions::default()));
    super::follow_file(&path, poll, Some(RESOLVE_EVERY), &shutdown, |current, changed| {
        let parsed = current.map(|text| parse(&text).map_err(|e| e.to_string()));
        let (path, store, seen) = (path.clone(), Arc::clone(&store), Arc::clone(&seen));
        async move {
            match parsed {
                Ok(Ok(endpoints)) => {
                    let resolve = move || {
                        let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        resolve(&endpoints, &mut seen)
                    };
                    let pods = tokio::task::spawn_blocking(resolve).await.unwrap_or_default();
                    let (total, ready) = (pods.len(), pods.iter().filter(|p| p.ready).count());
                    store.replace_all(pods);
                    if changed {
                        tracing::info!(path = %path.display(), endpoints = total, ready, "endpoints file loaded");
                    }
                }
                Ok(Err(err)) if changed => tracing::error!(path = %path.display(), error = %err,
                    "endpoints file is invalid; keeping the last good set"),
                Err(err) if changed => tracing::error!(path = %path.display(), error = %err,
                    "cannot read endpoints file; keeping the last good set"),
                Ok(Err(_)) | Err(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
models:
  - name: "Qwen/Qwen2.5-1.5B-Instruct"
    workers: ["127.0.0.1:8001", "localhost:8002", "127.0.0.3"]
  - name: big
    engine: sglang
    prefill_workers: ["127.0.0.4:9000"]
    decode_workers: ["127.0.0.5:9001"]
  - name: groups
    rolesets:
      - name: group-a
        prefill: ["[::1]:9100"]
        decode: ["127.0.0.6:9101"]
"#;

    #[test]
    fn aibrix_standalone_files_become_pods_as_aibrix_names_them() {
        let endpoints = parse(FILE).expect("valid");
        let pods = resolve(&endpoints, &mut Resolutions::default());
        let names: Vec<&str> = pods.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            names,
            [
                "standalone/qwen-qwen2.5-1.5b-instruct-127-0-0-1-0",
                "standalone/qwen-qwen2.5-1.5b-instruct-localhost-1",
                "standalone/qwen-qwen2.5-1.5b-instruct-127-0-0-3-2",
                "standalone/big-127-0-0-4-3",
                "standalone/big-127-0-0-5-4",
                "standalone/groups-::1-5",
                "standalone/groups-127-0-0-6-6",
            ]
        );
        assert!(pods.iter().all(|p| p.ready), "loopback names resolve");
        assert_eq!(pods[0].addr_text, "127.0.0.1:8001");
        assert_eq!(pods[1].addr.map(|a| a.port()), Some(8002), "a host name is resolved");
        assert_eq!(pods[2].addr_text, "127.0.0.3:8000", "a bare host is port 8000");
        assert_eq!(
            (pods[3].engine.as_str(), pods[3].roleset.as_deref(), pods[3].role),
            ("sglang", Some("default"), Role::Prefill)
        );
        assert_eq!(pods[4].role, Role::Decode);
        assert_eq!(pods[5].roleset.as_deref(), Some("group-a"));
        assert_eq!(pods[5].addr_text, "[::1]:9100");
        assert_eq!(pods[0].labels.get(PORT_LABEL).map(String::as_str), Some("8001"));
    }

    #[test]
    fn aibrix_rules_on_mixed_forms_hold() {
        for bad in [
            "models: [{name: m, endpoints: [a:1], workers: [b:1]}]",
            "models: [{name: m, rolesets: [{name: r, prefill: [a:1]}], prefill_workers: [b:1]}]",
            "models: [{name: m, workers: [a:1], decode_workers: [b:1]}]",
            "models: [{name: m, rolesets: [{name: '', prefill: [a:1]}]}]",
            "models: [{name: m, workers: ['a:http']}]",
            "models: [{name: m, workers: [a:1], replicas: 3}]",
            "not: [a list]",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_that_stops_resolving_keeps_its_last_good_address() {
        let endpoints =
            parse("models: [{name: m, workers: ['localhost:8001', 'no-such-host.invalid:8002']}]").expect("valid");
        let mut seen = Resolutions::default();
        let pods = resolve(&endpoints, &mut seen);
        assert_eq!(pods[0].addr_text, "127.0.0.1:8001", "IPv4 first, as vLLM listens");
        assert!(!pods[1].ready, "never resolved: listed, not ready");
        // The name stops resolving (here: its good address is known, the name is not).
        let good = pods[0].addr.expect("resolved");
        seen.last_good.insert(("no-such-host.invalid".to_owned(), 8002), good);
        let again = resolve(&endpoints, &mut seen);
        assert_eq!((again[1].ready, again[1].addr), (true, Some(good)), "the last good address stays");
        assert!(seen.failing.contains(&("no-such-host.invalid".to_owned(), 8002)));
        // Gone from the file: forgotten.
        resolve(&endpoints[..1], &mut seen);
        assert!(seen.last_good.len() == 1 && seen.failing.is_empty(), "{seen:?}");
    }

    #[test]
    fn an_unresolved_host_is_listed_not_ready() {
        let endpoints = parse("models: [{name: m, workers: ['vllm-0:8000']}]").expect("valid");
        let pod = to_pod(&endpoints[0], None);
        assert_eq!((pod.key.as_str(), pod.ready, pod.addr_text.as_str()), ("standalone/m-vllm-0-0", false, ""));
    }
}
