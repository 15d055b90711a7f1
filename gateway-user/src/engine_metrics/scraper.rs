//! The scrape loop: one task per ready pod, started and stopped as the pod
//! store changes.
//!
//! Each pod has its own ticker, so a pod whose `/metrics` hangs only delays
//! its own readings (up to the timeout) and never the others'. A semaphore
//! bounds the scrapes in flight over all pods; connections are kept alive
//! between scrapes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::names::{self, EngineNames};
use super::parse;
use super::window::History;
use super::{EngineMetrics, PodSlot, ScrapeConfig};
use crate::discovery::PodStore;
use crate::metrics::Metrics;

/// Largest `/metrics` body read; a vLLM engine prints a few tens of KiB.
const MAX_BODY_BYTES: usize = 4 << 20;
/// A pod that keeps failing is logged again at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Starts the scraper; it runs until `shutdown`.
pub fn spawn(
    pods: Arc<PodStore>,
    store: Arc<EngineMetrics>,
    metrics: Arc<Metrics>,
    settings: ScrapeConfig,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(supervise(pods, store, metrics, settings, shutdown))
}

/// What one pod task scrapes; a change restarts the task with a fresh window.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    model: String,
    engine: String,
}

struct Running {
    target: Target,
    stop: CancellationToken,
}

struct Shared {
    client: HttpClient,
    limit: Semaphore,
    settings: ScrapeConfig,
    metrics: Arc<Metrics>,
}

async fn supervise(
    pods: Arc<PodStore>,
    store: Arc<EngineMetrics>,
    metrics: Arc<Metrics>,
    settings: ScrapeConfig,
    shutdown: CancellationToken,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(settings.timeout));
    let client =
        Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).pool_max_idle_per_host(1).build(connector);
    let shared = Arc::new(Shared { client, limit: Semaphore::new(settings.concurrency), settings, metrics });
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut seen = None;
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let snapshot = pods.snapshot();
        if seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &snapshot)) {
            continue;
        }
        let mut wanted: HashMap<&str, Target> = HashMap::new();
        for model in snapshot.models.values() {
            for pod in &model.ready {
                let Some(addr) = pod.addr else { continue };
                let target = Target {
                    addr: SocketAddr::new(addr.ip(), pod.metric_port),
                    model: pod.model.clone(),
                    engine: pod.engine.clone(),
                };
                wanted.insert(pod.key.as_str(), target);
            }
        }
        running.retain(|key, task| {
            let keep = wanted.get(key.as_str()) == Some(&task.target);
            if !keep {
                task.stop.cancel();
            }
            keep
        });
        store.retain(|key| running.contains_key(key) || wanted.contains_key(key));
        for (key, target) in wanted {
            if running.contains_key(key) {
                continue;
            }
            let slot = store.slot(key, &target.model);
            let stop = shutdown.child_token();
            tokio::spawn(scrape_pod(key.to_owned(), target.clone(), slot, Arc::clone(&shared), stop.clone()));
            running.insert(key.to_owned(), Running { target, stop });
        }
        seen = Some(snapshot);
    }
    for task in running.values() {
        task.stop.cancel();
    }
}

/// Scrapes one pod until stopped.
async fn scrape_pod(key: String, target: Target, slot: Arc<PodSlot>, shared: Arc<Shared>, stop: CancellationToken) {
    let names: &EngineNames = names::for_engine(&target.engine);
    let urls = format!("http://{}/metrics?{}", target.addr, names.sample_query())
        .parse::<Uri>()
        .and_then(|filtered| Ok((filtered, format!("http://{}/metrics", target.addr).parse::<Uri>()?)));
    let (filtered, whole) = match urls {
        Ok(urls) => urls,
        Err(err) => {
            tracing::warn!(pod = %key, error = %err, "cannot build the metrics URL; not scraping this pod");
            return;
        }
    };
    // The filtered page until the engine refuses the query; then the whole one.
    let mut uri = &filtered;
    let mut history = History::new(shared.settings.window);
    let mut tick = tokio::time::interval(shared.settings.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_logged: Option<Instant> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = shared.limit.acquire() => permit,
        };
        let mut result = tokio::select! {
            () = stop.cancelled() => return,
            result = fetch(&shared.client, uri, shared.settings.timeout) => result,
        };
        if result.as_ref().is_err_and(|err| err.kind == "status") && std::ptr::eq(uri, &filtered) {
            let whole_page = tokio::select! {
                () = stop.cancelled() => return,
                result = fetch(&shared.client, &whole, shared.settings.timeout) => result,
            };
            if whole_page.is_ok() {
                tracing::info!(pod = %key, "engine refuses the metrics filter; scraping its whole page");
                uri = &whole;
            }
            result = whole_page;
        }
        drop(permit);
        let scraped = result.and_then(|text| {
            parse::parse(&text, names).map_err(|e| ScrapeError { kind: "parse", detail: e.to_string() })
        });
        match scraped {
            Ok(scraped) => {
                slot.publish(history.push(Instant::now(), scraped));
                if last_logged.take().is_some() {
                    tracing::info!(pod = %key, "engine metrics scrape recovered");
                }
            }
            Err(err) => {
                shared.metrics.routing.scrape_error(&target.model, err.kind);
                if last_logged.is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL) {
                    tracing::warn!(pod = %key, url = %whole, kind = err.kind, error = %err.detail,
                        "engine metrics scrape failed");
                    last_logged = Some(Instant::now());
                }
            }
        }
    }
}

/// A failed scrape: `kind` is a bounded metric label.
#[derive(Debug)]
struct ScrapeError {
    kind: &'static str,
    detail: String,
}

async fn fetch(client: &HttpClient, uri: &Uri, timeout: Duration) -> Result<String, ScrapeError> {
    let work = async {
        let response = client.get(uri.clone()).await.map_err(|err| ScrapeError {
            kind: if err.is_connect() { "connect" } else { "http" },
            detail: err.to_string(),
        })?;
        if !response.status().is_success() {
            return Err(ScrapeError { kind: "status", detail: response.status().to_string() });
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|err| ScrapeError { kind: "body", detail: err.to_string() })?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|err| ScrapeError { kind: "body", detail: err.to_string() })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(ScrapeError { kind: "timeout", detail: format!("no answer within {timeout:?}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{PodInfo, Role};
    use crate::engine_metrics::Reading;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A `/metrics` server whose running count is whatever the test sets.
    async fn metrics_server(running: Arc<AtomicU64>) -> SocketAddr {
        metrics_server_with(running, false, Arc::default()).await
    }

    /// A `/metrics` server that records each query it gets, and answers 400
    /// to a query when `refuses_queries`.
    async fn metrics_server_with(
        running: Arc<AtomicU64>,
        refuses_queries: bool,
        queries: Arc<std::sync::Mutex<Vec<String>>>,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let running = Arc::clone(&running);
                let queries = Arc::clone(&queries);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let query = req.uri().query().unwrap_or("").to_owned();
                        queries.lock().expect("queries").push(query.clone());
                        let text = format!(
                            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"m\"}} {}\n",
                            running.load(Ordering::Relaxed)
                        );
                        let mut response = hyper::Response::new(http_body_util::Full::new(Bytes::from(text)));
                        if refuses_queries && !query.is_empty() {
                            *response.status_mut() = http::StatusCode::BAD_REQUEST;
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        addr
    }

    fn pod(name: &str, addr: SocketAddr) -> PodInfo {
        PodInfo {
            key: format!("default/{name}"),
            name: name.to_owned(),
            namespace: "default".into(),
            model: "m".into(),
            addr: Some(addr),
            addr_text: addr.to_string(),
            metric_port: addr.port(),
            engine: "vllm".into(),
            roleset: None,
            role: Role::Combined,
            labels: BTreeMap::new(),
            config_annotation: None,
            ready: true,
            load: Arc::default(),
        }
    }

    async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn running_of(store: &EngineMetrics, key: &str) -> Option<f64> {
        match store.view().reading(key) {
            Reading::Fresh(m) => m.running,
            _ => None,
        }
    }

    #[tokio::test]
    async fn asks_for_the_samples_it_reads_and_takes_the_whole_page_from_an_engine_that_refuses() {
        let running = Arc::new(AtomicU64::new(4));
        let (filtering, refusing) = (Arc::default(), Arc::default());
        let honours = metrics_server_with(Arc::clone(&running), false, Arc::clone(&filtering)).await;
        let refuses = metrics_server_with(Arc::clone(&running), true, Arc::clone(&refusing)).await;
        let metrics = Arc::new(Metrics::new());
        let pods = Arc::new(PodStore::new(Arc::clone(&metrics)));
        pods.replace_all(vec![pod("honours", honours), pod("refuses", refuses)]);
        let store = Arc::new(EngineMetrics::new(Duration::from_secs(2)));
        let settings = ScrapeConfig { interval: Duration::from_millis(10), ..ScrapeConfig::default() };
        let shutdown = CancellationToken::new();
        spawn(Arc::clone(&pods), Arc::clone(&store), metrics, settings, shutdown.clone());
        wait_for("both pods read", || {
            running_of(&store, "default/honours") == Some(4.0) && running_of(&store, "default/refuses") == Some(4.0)
        })
        .await;
        wait_for("a few scrapes of the refusing pod", || refusing.lock().expect("queries").len() >= 4).await;
        shutdown.cancel();
        let asked = filtering.lock().expect("queries").clone();
        assert!(asked.iter().all(|q| q == &names::for_engine("vllm").sample_query()), "{asked:?}");
        let refused = refusing.lock().expect("queries").clone();
        assert!(!refused[0].is_empty(), "the filter is tried first");
        assert!(refused[1..].iter().all(String::is_empty), "then the whole page, without asking again: {refused:?}");
    }

    #[tokio::test]
    async fn scrapes_ready_pods_follows_changes_and_drops_pods_that_left() {
        let running = Arc::new(AtomicU64::new(3));
        let addr = metrics_server(Arc::clone(&running)).await;
        // A port nothing listens on: its scrapes fail and are counted.
        let dead: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let metrics = Arc::new(Metrics::new());
        let pods = Arc::new(PodStore::new(Arc::clone(&metrics)));
        pods.replace_all(vec![pod("a", addr), pod("dead", dead)]);
        let store = Arc::new(EngineMetrics::new(Duration::from_secs(2)));
        let settings = ScrapeConfig {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(500),
            concurrency: 2,
            window: Duration::from_secs(5),
            ..ScrapeConfig::default()
        };
        let shutdown = CancellationToken::new();
        let task = spawn(Arc::clone(&pods), Arc::clone(&store), Arc::clone(&metrics), settings, shutdown.clone());

        wait_for("first scrape", || running_of(&store, "default/a") == Some(3.0)).await;
        running.store(7, Ordering::Relaxed);
        wait_for("next scrape", || running_of(&store, "default/a") == Some(7.0)).await;
        assert!(matches!(store.view().reading("default/dead"), Reading::Missing));
        wait_for("scrape error counted", || {
            metrics.render().contains("aibrix_gateway_engine_metrics_scrape_errors_total{model=\"m\",kind=\"connect\"}")
        })
        .await;

        // The pod turns not-ready: it is no longer scraped and its state goes.
        let mut gone = pod("a", addr);
        gone.ready = false;
        pods.replace_all(vec![gone]);
        wait_for("state dropped", || matches!(store.view().reading("default/a"), Reading::Missing)).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("no panic");
    }

    #[tokio::test]
    async fn a_hanging_pod_times_out_without_holding_up_the_others() {
        let running = Arc::new(AtomicU64::new(1));
        let good = metrics_server(Arc::clone(&running)).await;
        // Accepts connections and never answers.
        let hang_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hang = hang_listener.local_addr().expect("addr");
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = hang_listener.accept().await {
                held.push(stream);
            }
        });
        let metrics = Arc::new(Metrics::new());
        let pods = Arc::new(PodStore::new(Arc::clone(&metrics)));
        pods.replace_all(vec![pod("good", good), pod("hang", hang)]);
        let store = Arc::new(EngineMetrics::new(Duration::from_secs(2)));
        let settings = ScrapeConfig {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(200),
            concurrency: 4,
            window: Duration::from_secs(5),
            ..ScrapeConfig::default()
        };
        let shutdown = CancellationToken::new();
        let task = spawn(Arc::clone(&pods), Arc::clone(&store), Arc::clone(&metrics), settings, shutdown.clone());
        wait_for("good pod scraped", || running_of(&store, "default/good") == Some(1.0)).await;
        running.store(2, Ordering::Relaxed);
        let started = Instant::now();
        wait_for("good pod keeps being scraped", || running_of(&store, "default/good") == Some(2.0)).await;
        assert!(started.elapsed() < Duration::from_millis(150), "held up by the hanging pod");
        wait_for("timeout counted", || metrics.render().contains("kind=\"timeout\"")).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("no panic");
    }
}
