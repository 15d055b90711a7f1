//! LoRA adapters as the engines themselves list them: each ready pod's
//! `/v1/models` is read when the pod turns ready and every
//! `--adapter-refresh-interval-ms` after, and its entries whose `parent` is
//! a base model (the pod's, or one the same answer lists) become adapter
//! bindings of the pod store ([`AdapterSource::Engines`]). Reads are bounded
//! in number at once, in time and in size, like the metrics scrape. A pod
//! that fails to answer, or turns not ready, keeps what it last listed (its
//! adapters then answer 503 for want of ready pods, not 400 for want of a
//! model) until it answers again or leaves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::scraper::{HttpClient, fetch};
use crate::discovery::{AdapterBinding, AdapterSource, PodInfo, PodStore};

/// Settings of the reads (`turnstile serve` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterReadConfig {
    /// How often each ready pod's `/v1/models` is read again; zero: never.
    pub interval: Duration,
    /// Time one read may take.
    pub timeout: Duration,
    /// Most reads in flight at once, over all pods.
    pub concurrency: usize,
}

impl Default for AdapterReadConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), timeout: Duration::from_secs(2), concurrency: 8 }
    }
}

/// Most adapters taken from one pod's answer.
const MAX_ADAPTERS_PER_POD: usize = 1024;
/// Longest adapter name taken; longer ones are left out.
const MAX_ADAPTER_NAME_BYTES: usize = 256;
/// How often the loop looks for pods that turned ready.
const TICK: Duration = Duration::from_millis(250);

/// Starts reading adapters until `shutdown`; nothing when the interval is zero.
pub fn spawn(
    pods: Arc<PodStore>,
    config: AdapterReadConfig,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.interval.is_zero() {
        return None;
    }
    Some(tokio::spawn(run(pods, config, shutdown)))
}

/// What one pod is read at; a change reads it afresh.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    model: String,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct PodState {
    target: Target,
    read_at: Option<Instant>,
    in_progress: bool,
    /// Only ready pods are read.
    ready: bool,
    /// What the pod last listed.
    adapters: Vec<String>,
    /// Its refusal of `/v1/models` has been logged.
    refusal_logged: bool,
}

async fn run(pods: Arc<PodStore>, config: AdapterReadConfig, shutdown: CancellationToken) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.timeout));
    // No connection is kept between reads: one read a pod every few seconds
    // is not worth an idle connection to every pod of the fleet.
    let client: HttpClient =
        Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).pool_max_idle_per_host(0).build(connector);
    let client = Arc::new(client);
    let mut states: HashMap<String, PodState> = HashMap::new();
    let mut tasks: JoinSet<(Target, Read)> = JoinSet::new();
    // Which pod each read in flight is for.
    let mut reading: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seen: Option<Arc<crate::discovery::Snapshot>> = None;
    // The bindings changed since they were last handed to the store.
    let mut changed = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(joined) = tasks.join_next_with_id() => {
                let (id, result) = match joined {
                    Ok((id, result)) => (id, Some(result)),
                    Err(err) => (err.id(), None),
                };
                let Some(key) = reading.remove(&id) else { continue };
                let Some(state) = states.get_mut(&key) else { continue };
                state.in_progress = false;
                let Some((_, read)) = result.filter(|(target, _)| *target == state.target) else { continue };
                state.read_at = Some(Instant::now());
                match read {
                    Read::Listed(adapters) if adapters != state.adapters => {
                        state.adapters = adapters;
                        changed = true;
                    }
                    // An engine started with --api-key: said once a pod.
                    Read::Refused(status) if !state.refusal_logged => {
                        state.refusal_logged = true;
                        tracing::warn!(pod = %state.target.name, status = %status,
                            "the engine refuses /v1/models; its LoRA adapters are known only from ModelAdapter resources");
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let snapshot = pods.snapshot();
                if !seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &snapshot)) {
                    changed |= follow(&mut states, &snapshot);
                    seen = Some(snapshot);
                }
                let now = Instant::now();
                // Never read first, then the longest unread: with more pods than
                // reads fit in an interval, every pod still takes its turn.
                let mut due: Vec<(Option<Instant>, &String)> = states
                    .iter()
                    .filter(|(_, state)| state.ready && !state.in_progress)
                    .filter(|(_, state)| state.read_at.is_none_or(|at| now.duration_since(at) >= config.interval))
                    .map(|(key, state)| (state.read_at, key))
                    .collect();
                due.sort_unstable();
                let free = config.concurrency.max(1).saturating_sub(tasks.len());
                let due: Vec<String> = due.into_iter().take(free).map(|(_, key)| key.clone()).collect();
                for key in due {
                    let Some(state) = states.get_mut(&key) else { continue };
                    {
                        state.in_progress = true;
                        let (target, client) = (state.target.clone(), Arc::clone(&client));
                        let timeout = config.timeout;
                        let task = tasks.spawn(async move {
                            let listed = read(&client, &target, timeout).await;
                            (target, listed)
                        });
                        reading.insert(task.id(), key);
                    }
                }
            }
        }
        if changed && seen.is_some() {
            pods.set_adapters(AdapterSource::Engines, bindings(&states));
            changed = false;
        }
    }
    tasks.abort_all();
}

/// Follows the store's base-model pods: ready ones never read, or ready
/// again, are read at once; ones that left or changed address are dropped.
/// True when a pod with adapters left.
fn follow(states: &mut HashMap<String, PodState>, snapshot: &crate::discovery::Snapshot) -> bool {
    let mut known: HashMap<&str, (&PodInfo, SocketAddr)> = HashMap::new();
    for model in snapshot.base_models() {
        for pod in &model.pods {
            if let Some(addr) = pod.addr {
                known.insert(pod.key.as_str(), (pod, addr));
            }
        }
    }
    let mut dropped = false;
    states.retain(|key, state| {
        let keep = known
            .get(key.as_str())
            .is_some_and(|(pod, addr)| state.target.addr == *addr && state.target.model == pod.model);
        dropped |= !keep && !state.adapters.is_empty();
        keep
    });
    for (key, (pod, addr)) in known {
        let state = states.entry(key.to_owned()).or_insert_with(|| PodState {
            target: Target { addr, model: pod.model.clone(), namespace: pod.namespace.clone(), name: pod.name.clone() },
            read_at: None,
            in_progress: false,
            ready: pod.ready,
            adapters: Vec::new(),
            refusal_logged: false,
        });
        if pod.ready && !state.ready {
            // Back from not ready (an engine restarted?): what it serves now.
            state.read_at = None;
        }
        state.ready = pod.ready;
    }
    dropped
}

/// Every pod's adapters as bindings, in a stable order.
fn bindings(states: &HashMap<String, PodState>) -> Vec<AdapterBinding> {
    let mut out: Vec<AdapterBinding> = states
        .iter()
        .flat_map(|(key, state)| {
            state.adapters.iter().map(move |adapter| AdapterBinding {
                adapter: adapter.clone(),
                parent: Some(state.target.model.clone()),
                namespace: state.target.namespace.clone(),
                pod: state.target.name.clone(),
                key: Some(key.clone()),
                config_annotation: None,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.adapter, &a.key).cmp(&(&b.adapter, &b.key)));
    out
}

/// What one read of a pod's `/v1/models` gave.
enum Read {
    /// Its adapters.
    Listed(Vec<String>),
    /// 401 or 403, with the status: what it listed before stands.
    Refused(String),
    /// No model list: what it listed before stands.
    Failed,
}

async fn read(client: &HttpClient, target: &Target, timeout: Duration) -> Read {
    let Ok(uri) = format!("http://{}/v1/models", target.addr).parse::<Uri>() else { return Read::Failed };
    match fetch(client, &uri, timeout).await {
        Ok(text) => match adapters_of(&text, &target.model) {
            Some(adapters) => Read::Listed(adapters),
            None => {
                tracing::debug!(pod = %target.name, "engine /v1/models is not a model list; adapters unchanged");
                Read::Failed
            }
        },
        Err(err) if err.detail.starts_with("401") || err.detail.starts_with("403") => Read::Refused(err.detail),
        Err(err) => {
            tracing::debug!(pod = %target.name, error = %err.detail, "cannot read the engine's /v1/models");
            Read::Failed
        }
    }
}

/// The adapters of a `/v1/models` answer: entries with a `parent` that is
/// `model` or a model the answer lists without a parent (the engine's
/// served name for it). `None` when the text is not a model list.
pub fn adapters_of(text: &str, model: &str) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
        #[serde(default)]
        parent: Option<String>,
    }
    let list: List = serde_json::from_str(text).ok()?;
    let bases: std::collections::HashSet<&str> =
        list.data.iter().filter(|e| e.parent.is_none()).map(|e| e.id.as_str()).collect();
    let mut adapters: Vec<String> = list
        .data
        .iter()
        .filter(|entry| {
            entry.parent.as_deref().is_some_and(|parent| parent == model || bases.contains(parent))
                && entry.id != model
                && !entry.id.is_empty()
                && entry.id.len() <= MAX_ADAPTER_NAME_BYTES
        })
        .map(|entry| entry.id.clone())
        .take(MAX_ADAPTERS_PER_POD)
        .collect();
    adapters.sort_unstable();
    adapters.dedup();
    Some(adapters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::store::tests::test_pod;
    use crate::metrics::Metrics;
    use bytes::Bytes;
    use std::sync::Mutex;

    #[test]
    fn adapters_are_entries_whose_parent_is_a_base_model() {
        let text = r#"{"object":"list","data":[
            {"id":"llama","object":"model","parent":null,"root":"/models/llama"},
            {"id":"sql","object":"model","parent":"llama","root":"/adapters/sql"},
            {"id":"chat","object":"model","parent":"meta/llama-8b"},
            {"id":"meta/llama-8b","object":"model"},
            {"id":"stray","object":"model","parent":"other"}]}"#;
        assert_eq!(adapters_of(text, "llama"), Some(vec!["chat".to_owned(), "sql".to_owned()]));
        assert_eq!(adapters_of(r#"{"data":[]}"#, "llama"), Some(Vec::new()));
        assert_eq!(adapters_of("<html>", "llama"), None);
        assert_eq!(adapters_of(r#"{"data":[{"id":"llama","parent":"llama"}]}"#, "llama"), Some(Vec::new()));
        let long = "x".repeat(MAX_ADAPTER_NAME_BYTES + 1);
        let text = serde_json::json!({"data": [{"id": long, "parent": "llama"}, {"id": "ok", "parent": "llama"}]});
        assert_eq!(
            adapters_of(&text.to_string(), "llama"),
            Some(vec!["ok".to_owned()]),
            "an overlong name is left out"
        );
    }

    /// An engine whose `/v1/models` answer the test sets.
    async fn engine(answer: Arc<Mutex<String>>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = Arc::clone(&answer);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        let text = answer.lock().expect("answer").clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                                Bytes::from(text),
                            )))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        addr
    }

    fn listing(adapters: &[&str]) -> String {
        let mut data = vec![serde_json::json!({"id": "llama", "parent": null})];
        data.extend(adapters.iter().map(|a| serde_json::json!({"id": a, "parent": "llama"})));
        serde_json::json!({"data": data}).to_string()
    }

    async fn wait_for(store: &PodStore, what: &str, check: impl Fn(&PodStore) -> bool) {
        for _ in 0..200 {
            if check(store) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn serving(store: &PodStore, adapter: &str) -> Vec<String> {
        store.snapshot().model(adapter).map(|m| m.ready.iter().map(|p| p.name.clone()).collect()).unwrap_or_default()
    }

    #[tokio::test]
    async fn adapters_follow_what_each_ready_engine_lists() {
        let (a, b) = (Arc::new(Mutex::new(listing(&["sql"]))), Arc::new(Mutex::new(listing(&[]))));
        let (addr_a, addr_b) = (engine(Arc::clone(&a)).await, engine(Arc::clone(&b)).await);
        let store = Arc::new(PodStore::new(Arc::new(Metrics::new())));
        store.replace_all(vec![
            test_pod("llama", "a", addr_a.port(), true),
            test_pod("llama", "b", addr_b.port(), true),
        ]);
        let config =
            AdapterReadConfig { interval: Duration::from_millis(100), timeout: Duration::from_secs(1), concurrency: 2 };
        let shutdown = CancellationToken::new();
        spawn(Arc::clone(&store), config, shutdown.clone()).expect("reading");
        wait_for(&store, "sql on a", |s| serving(s, "sql") == ["a"]).await;
        *b.lock().expect("b") = listing(&["sql", "chat"]);
        wait_for(&store, "sql on a and b", |s| serving(s, "sql") == ["a", "b"] && serving(s, "chat") == ["b"]).await;
        // Unloaded on a; b stops answering with a list and keeps what it had.
        *a.lock().expect("a") = listing(&[]);
        *b.lock().expect("b") = "not json".to_owned();
        wait_for(&store, "sql on b only", |s| serving(s, "sql") == ["b"]).await;
        assert_eq!(serving(&store, "chat"), ["b"]);
        // A pod that turns not ready keeps its adapters, which then have no
        // ready pod; one that leaves takes them with it.
        store.replace_all(vec![
            test_pod("llama", "a", addr_a.port(), true),
            test_pod("llama", "b", addr_b.port(), false),
        ]);
        wait_for(&store, "sql without ready pods", |s| {
            s.snapshot().model("sql").is_some_and(|m| m.ready.is_empty() && m.pods.len() == 1)
        })
        .await;
        store.replace_all(vec![test_pod("llama", "a", addr_a.port(), true)]);
        wait_for(&store, "no sql", |s| s.snapshot().model("sql").is_none()).await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn with_more_pods_than_reads_fit_in_an_interval_every_pod_takes_its_turn() {
        let store = Arc::new(PodStore::new(Arc::new(Metrics::new())));
        let mut pods = Vec::new();
        for i in 0..6 {
            let addr = engine(Arc::new(Mutex::new(listing(&[&format!("a{i}")])))).await;
            pods.push(test_pod("llama", &format!("p{i}"), addr.port(), true));
        }
        store.replace_all(pods);
        // One read at a time, every pod due again long before six ticks pass.
        let config =
            AdapterReadConfig { interval: Duration::from_millis(10), timeout: Duration::from_secs(1), concurrency: 1 };
        let shutdown = CancellationToken::new();
        spawn(Arc::clone(&store), config, shutdown.clone()).expect("reading");
        wait_for(&store, "every pod read once", |s| (0..6).all(|i| s.snapshot().model(&format!("a{i}")).is_some()))
            .await;
        shutdown.cancel();
    }
}
