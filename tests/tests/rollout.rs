//! A rolling update under load, the way `maxUnavailable: 0` / `maxSurge: 1`
//! replaces a model's pods: for each old pod, a new pod appears not Ready
//! (the model is loading), turns Ready, then the old pod stops being Ready
//! (Kubernetes: it is deleted gracefully, so it turns terminating first), its
//! in-flight requests finish, and it goes away. Clients keep sending
//! streaming and non-streaming requests throughout, and not one may fail.
//!
//! Run once with the pods file and once with Kubernetes discovery (the fake
//! API server), since the two sources deliver the same changes differently.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use turnstile_tests::fake_apiserver::FakeApiServer;
use turnstile_tests::harness::{
    Discovery, Engine, Gateway, PodSpec, chat_body, eventually, get_json, next_data, open_stream, post, scratch_dir,
    try_send,
};

const MODEL: &str = "llama";
/// Replicas of the model, old and new.
const REPLICAS: usize = 2;
/// Client tasks sending requests back to back.
const CLIENTS: usize = 4;
/// Most requests one client sends, whatever happens.
const MAX_REQUESTS_PER_CLIENT: usize = 2_000;
/// Longest the whole rollout may take.
const ROLLOUT_BOUND: Duration = Duration::from_secs(25);
/// Bound for one pod change to reach routing (file polled every 50 ms).
const PROPAGATION: Duration = Duration::from_secs(3);
/// How long a new pod stays not Ready ("loading the model") while traffic runs.
const LOADING: Duration = Duration::from_millis(300);
/// A request takes about 10 ms to its first token and 8 tokens 10 ms apart,
/// so every pod always has requests in flight when it is taken out.
const ENGINE_ARGS: &[&str] = &["--ttft-ms", "10", "--itl-ms", "10", "--tokens", "8"];

/// Where the gateway learns about pods, driven like a Deployment controller would.
enum Cluster {
    /// The pods file: the whole list is rewritten on each change.
    File(Vec<PodSpec>),
    Kubernetes(FakeApiServer),
}

impl Cluster {
    fn add_not_ready(&mut self, gw: &Gateway, pod: PodSpec) {
        let pod = pod.ready(false);
        match self {
            Self::File(pods) => {
                pods.push(pod);
                gw.write_pods(pods);
            }
            Self::Kubernetes(api) => api.add_pod(&pod),
        }
    }

    fn set_ready(&mut self, gw: &Gateway, name: &str, ready: bool) {
        match self {
            Self::File(pods) => {
                let pod = pods.iter_mut().find(|p| p.name == name).expect("pod in file");
                pod.ready = ready;
                gw.write_pods(pods);
            }
            Self::Kubernetes(api) => api.set_ready(name, ready),
        }
    }

    /// Takes an old pod out of service. Kubernetes: a graceful delete sets
    /// `deletionTimestamp` while the pod is still Ready, and readiness fails
    /// once its containers stop; either alone must stop new requests.
    fn retire(&mut self, gw: &Gateway, name: &str) {
        match self {
            Self::File(_) => self.set_ready(gw, name, false),
            Self::Kubernetes(api) => api.mark_terminating(name),
        }
    }

    fn after_retire(&mut self, gw: &Gateway, name: &str) {
        if let Self::Kubernetes(_) = self {
            self.set_ready(gw, name, false);
        }
    }

    fn delete(&mut self, gw: &Gateway, name: &str) {
        match self {
            Self::File(pods) => {
                pods.retain(|p| p.name != name);
                gw.write_pods(pods);
            }
            Self::Kubernetes(api) => api.delete_pod(name),
        }
    }
}

/// What the clients saw.
#[derive(Default)]
struct Outcomes {
    ok: usize,
    streams_ok: usize,
    failures: Vec<String>,
    by_pod: BTreeMap<String, usize>,
}

/// Clients sending a mix of streaming and non-streaming requests until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Outcomes>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gw: &Gateway) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Outcomes::default()));
        let url = gw.url("/v1/chat/completions");
        let tasks = (0..CLIENTS)
            .map(|client| {
                let (stop, outcomes, url) = (Arc::clone(&stop), Arc::clone(&outcomes), url.clone());
                tokio::spawn(async move {
                    for i in 0..MAX_REQUESTS_PER_CLIENT {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let stream = (client + i) % 2 == 0;
                        let outcome = try_send(post(&url, &chat_body(MODEL, stream), &[])).await;
                        let mut outcomes = outcomes.lock().expect("outcomes");
                        match outcome {
                            Ok(reply) if reply.status == StatusCode::OK => {
                                let text = reply.text();
                                if stream && !text.trim_end().ends_with("data: [DONE]") {
                                    outcomes.failures.push(format!("stream cut short: {text}"));
                                    continue;
                                }
                                outcomes.ok += 1;
                                outcomes.streams_ok += usize::from(stream);
                                *outcomes.by_pod.entry(reply.header("target-pod").to_owned()).or_default() += 1;
                            }
                            Ok(reply) => outcomes.failures.push(format!("{}: {}", reply.status, reply.text())),
                            Err(err) => outcomes.failures.push(format!("transport: {err}")),
                        }
                    }
                })
            })
            .collect();
        Self { stop, outcomes, tasks }
    }

    fn served(&self) -> usize {
        self.outcomes.lock().expect("outcomes").ok
    }

    async fn finish(self) -> Outcomes {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client task");
        }
        Arc::try_unwrap(self.outcomes).ok().expect("clients done").into_inner().expect("outcomes")
    }
}

/// The gateway's view of one pod: (ready, in flight), `None` when it does not list it.
async fn endpoint(gw: &Gateway, name: &str) -> Option<(bool, u64)> {
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    let key = format!("default/{name}");
    let pods = endpoints[MODEL]["pods"].as_array()?.clone();
    let pod = pods.into_iter().find(|p| p["pod"] == key.as_str())?;
    Some((pod["ready"].as_bool()?, pod["in_flight"].as_u64()?))
}

/// Opens a stream of 40 tokens (about 0.4 s) on pod `name`, and reads its first chunk.
async fn open_long_stream(gw: &Gateway, name: &str) -> hyper::body::Incoming {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell a long story"}],
        "stream": true,
        "max_tokens": 40,
    });
    let only_this_pod = format!("pod={name}");
    let request = post(&gw.url("/v1/chat/completions"), &body.to_string(), &[("external-filter", &only_this_pod)]);
    let response = open_stream(request).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["target-pod"], name);
    let mut stream = response.into_body();
    next_data(&mut stream).await.expect("a first chunk").expect("first chunk");
    stream
}

/// Waits until the load has been served `more` further requests.
async fn more_traffic(load: &Load, more: usize) {
    let target = load.served() + more;
    eventually(PROPAGATION, "clients keep being served", || async { load.served() >= target }).await;
}

async fn rolling_update(mut cluster: Cluster, gw: &Gateway, mut old: Vec<Engine>) {
    let started = Instant::now();
    let load = Load::start(gw);
    more_traffic(&load, 20).await;
    let mut new = Vec::new();
    for replica in 0..REPLICAS {
        // Surge: the new pod is there, but not Ready while its model loads.
        let engine = Engine::start(&format!("new-{replica}"), MODEL, ENGINE_ARGS);
        cluster.add_not_ready(gw, pod_for(&engine));
        eventually(PROPAGATION, "the new pod is listed, not ready", || async {
            endpoint(gw, &engine.name).await.is_some_and(|(ready, _)| !ready)
        })
        .await;
        tokio::time::sleep(LOADING).await;
        assert_eq!(engine.requests_total().await, 0, "{} got requests before it was Ready", engine.name);

        // Ready: it takes traffic, and only then does an old pod go.
        cluster.set_ready(gw, &engine.name, true);
        eventually(PROPAGATION, "the new pod takes traffic", || async { engine.requests_total().await > 0 }).await;

        // A long stream runs on the old pod while it leaves rotation.
        let retiring = old.remove(0);
        let mut long_stream = open_long_stream(gw, &retiring.name).await;
        cluster.retire(gw, &retiring.name);
        eventually(PROPAGATION, "the old pod is out of rotation", || async {
            endpoint(gw, &retiring.name).await.is_some_and(|(ready, in_flight)| !ready && in_flight >= 1)
        })
        .await;
        cluster.after_retire(gw, &retiring.name);
        // Its in-flight requests finish while new ones go elsewhere.
        let mut text = String::new();
        while let Some(chunk) = next_data(&mut long_stream).await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("the in-flight stream is not cut")));
        }
        assert!(text.trim_end().ends_with("data: [DONE]"), "the in-flight stream completed: {text}");
        eventually(PROPAGATION, "the old pod's in-flight requests finish", || async {
            endpoint(gw, &retiring.name).await.is_some_and(|(_, in_flight)| in_flight == 0)
        })
        .await;
        // Everything routed to it before it left has arrived and ended by now.
        let seen_at_retirement = retiring.requests_total().await;
        more_traffic(&load, 10).await;
        assert_eq!(
            retiring.requests_total().await,
            seen_at_retirement,
            "{} got new requests after it left rotation",
            retiring.name
        );
        cluster.delete(gw, &retiring.name);
        eventually(PROPAGATION, "the old pod is gone", || async { endpoint(gw, &retiring.name).await.is_none() }).await;
        drop(retiring);
        new.push(engine);
        assert!(started.elapsed() < ROLLOUT_BOUND, "rollout too slow: {:?}", started.elapsed());
    }
    more_traffic(&load, 20).await;
    let outcomes = load.finish().await;

    assert!(outcomes.failures.is_empty(), "{} failed requests during the rollout: {:#?}", outcomes.failures.len(), {
        let mut shown = outcomes.failures.clone();
        shown.truncate(5);
        shown
    });
    // more_traffic() above alone makes it 60.
    assert!(outcomes.ok >= 60 && outcomes.streams_ok >= 20, "too little load: {} ok", outcomes.ok);
    for engine in &new {
        assert!(outcomes.by_pod.get(&engine.name).is_some_and(|n| *n > 0), "{} never served: {:?}", engine.name, {
            &outcomes.by_pod
        });
    }
    let endpoints = get_json(&gw.admin_url("/debug/endpoints")).await;
    let mut listed: Vec<String> = endpoints[MODEL]["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["pod"].as_str().map(str::to_owned))
        .collect();
    listed.sort();
    assert_eq!(listed, ["default/new-0", "default/new-1"]);
    eprintln!(
        "rollout: {} requests ({} streams) served, 0 failed, in {:?}; by pod {:?}",
        outcomes.ok,
        outcomes.streams_ok,
        started.elapsed(),
        outcomes.by_pod
    );
}

/// A pod for `engine`, labelled `pod=NAME` so that a request can be sent to it alone.
fn pod_for(engine: &Engine) -> PodSpec {
    PodSpec::for_engine(engine, MODEL).label("pod", &engine.name)
}

fn old_engines() -> Vec<Engine> {
    (0..REPLICAS).map(|i| Engine::start(&format!("old-{i}"), MODEL, ENGINE_ARGS)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_file_rollout_one_pod_at_a_time_fails_no_request() {
    let old = old_engines();
    let pods: Vec<PodSpec> = old.iter().map(pod_for).collect();
    let gw = Gateway::start(&pods, &[]).await;
    rolling_update(Cluster::File(pods), &gw, old).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_rollout_one_pod_at_a_time_fails_no_request() {
    let old = old_engines();
    let api = FakeApiServer::start().await;
    for engine in &old {
        api.add_pod(&pod_for(engine));
    }
    let kubeconfig = api.write_kubeconfig(&scratch_dir("kube"));
    let gw = Gateway::spawn_with_discovery(Discovery::Kubernetes { kubeconfig: &kubeconfig }, &[], &[]);
    gw.wait_ready().await;
    rolling_update(Cluster::Kubernetes(api), &gw, old).await;
}
