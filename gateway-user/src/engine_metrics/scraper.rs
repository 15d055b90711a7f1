//! The scrape loop: one task plans every pod's scrapes within the budget
//! (see [`super::schedule`]) and runs each as a short task of its own.
//!
//! A pod whose `/metrics` hangs only delays its own readings (up to the
//! timeout) and never the others'; scrapes in flight are bounded over all
//! pods; connections are kept alive between scrapes. With [`Sharing`],
//! replicas claim each scrape first and take each other's readings.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::names::{self, EngineNames};
use super::parse::{self, Scraped};
use super::schedule::{Cadence, Planner, PodTurn};
use super::sharing::{Claim, Remote, Sharing};
use super::window::History;
use super::{EngineMetrics, PodSlot, ScrapeConfig};
use crate::discovery::{OthersHeard, PodLoad, PodStore};
use crate::metrics::Metrics;

/// Largest `/metrics` body read; a vLLM engine prints a few tens of KiB.
const MAX_BODY_BYTES: usize = 4 << 20;
/// A pod that keeps failing is logged again at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

pub(super) type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Starts the scraper; it runs until `shutdown`. With `sharing`, replicas
/// share one scrape per pod per period.
pub fn spawn(
    pods: Arc<PodStore>,
    store: Arc<EngineMetrics>,
    metrics: Arc<Metrics>,
    settings: ScrapeConfig,
    sharing: Option<(Sharing, mpsc::Receiver<Remote>)>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(supervise(pods, store, metrics, settings, sharing, shutdown))
}

/// What a pod is scraped at; a change starts it afresh (new window).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    model: String,
    engine: String,
}

/// The URLs of one pod's `/metrics`: the filtered page, and the whole one
/// for an engine that refuses the filter.
#[derive(Debug)]
struct Urls {
    filtered: Uri,
    whole: Uri,
}

impl Urls {
    fn new(addr: SocketAddr, names: &EngineNames) -> Result<Self, http::uri::InvalidUri> {
        Ok(Self {
            filtered: format!("http://{addr}/metrics?{}", names.sample_query()).parse()?,
            whole: format!("http://{addr}/metrics").parse()?,
        })
    }
}

/// Everything the loop keeps of one pod.
struct PodState {
    target: Target,
    addr_text: String,
    names: &'static EngineNames,
    urls: Arc<Urls>,
    slot: Arc<PodSlot>,
    load: Arc<PodLoad>,
    history: History,
    /// The engine refused the filter: ask for the whole page.
    whole_page: bool,
    last_started: Option<Instant>,
    in_progress: bool,
    /// Planned (and paid for) but waiting for a free slot.
    queued: bool,
    /// When this replica started following the pod.
    followed_since: Instant,
    /// When a failure was last logged; `None` while it scrapes fine.
    last_logged: Option<Instant>,
}

/// What one scrape task brings back.
struct Done {
    key: String,
    addr: SocketAddr,
    /// `None` when another replica scraped the pod within its period.
    scrape: Option<Scrape>,
}

/// A scrape made here.
struct Scrape {
    at: Instant,
    /// This replica's requests in flight to the pod when the scrape started.
    base: usize,
    /// The other replicas' then, as they said.
    others: OthersHeard,
    result: Result<Scraped, ScrapeError>,
    /// It fell back to the whole page.
    whole_page: bool,
}

/// What every scrape task shares.
struct Shared {
    client: HttpClient,
    timeout: Duration,
    /// The tick, which a claim tolerates being late by.
    interval: Duration,
    sharing: Option<Sharing>,
}

async fn supervise(
    pods: Arc<PodStore>,
    store: Arc<EngineMetrics>,
    metrics: Arc<Metrics>,
    settings: ScrapeConfig,
    sharing: Option<(Sharing, mpsc::Receiver<Remote>)>,
    shutdown: CancellationToken,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(settings.timeout));
    let client =
        Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).pool_max_idle_per_host(1).build(connector);
    let (sharing, mut remote) = match sharing {
        Some((sharing, remote)) => (Some(sharing), Some(remote)),
        None => (None, None),
    };
    let shared = Arc::new(Shared { client, timeout: settings.timeout, interval: settings.interval, sharing });
    let mut states: HashMap<String, PodState> = HashMap::new();
    let mut seen = None;
    let mut planner = Planner::new(settings.interval, f64::from(settings.max_scrapes_per_second), Instant::now());
    let mut tasks: JoinSet<Done> = JoinSet::new();
    // Scrapes planned within the budget, started as slots free up.
    let mut queue: VecDeque<(String, Duration)> = VecDeque::new();
    // Which pod each running scrape task is for.
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut announced: Option<Cadence> = None;
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(joined) = tasks.join_next_with_id() => {
                match joined {
                    Ok((id, done)) => {
                        running.remove(&id);
                        finish(&mut states, done, &metrics, engine_reading_valid(settings.interval));
                    }
                    // A scrape task that panicked: its pod is free to be scraped again.
                    Err(err) => {
                        if let Some(state) = running.remove(&err.id()).and_then(|key| states.get_mut(&key)) {
                            state.in_progress = false;
                        }
                    }
                }
                start_queued(&mut states, &mut queue, &mut tasks, &mut running, &shared, settings.concurrency);
                continue;
            }
            Some(reading) = recv(&mut remote) => {
                take_remote(&mut states, &reading, engine_reading_valid(settings.interval));
                continue;
            }
            _ = tick.tick() => {}
        }
        let snapshot = pods.snapshot();
        if !seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &snapshot)) {
            follow(&mut states, &snapshot, &store, settings.window);
            seen = Some(snapshot);
        }
        let now = Instant::now();
        // One pass over the pods (no lookup by key each tick: at 1,000 pods
        // those hashes were a fifth of an idle gateway's CPU).
        let (keys, turns): (Vec<&String>, Vec<PodTurn>) = states
            .iter()
            .map(|(key, state)| {
                let turn = PodTurn {
                    busy: state.load.in_flight() > 0,
                    last_started: state.last_started,
                    in_progress: state.in_progress || state.queued,
                };
                (key, turn)
            })
            .unzip();
        let cadence = planner.cadence(&turns);
        store.set_stale_after(cadence.stale_after(settings.stale_after));
        if announced.is_none_or(|before| before.idle != cadence.idle) {
            if cadence.idle > settings.interval {
                tracing::info!(
                    pods = turns.len(),
                    period_ms = cadence.idle.as_millis() as u64,
                    budget = settings.max_scrapes_per_second,
                    "engine metrics: the scrape budget stretches each idle pod's period"
                );
            }
            announced = Some(cadence);
        }
        let due: Vec<String> = planner.due(now, &turns).into_iter().map(|i| keys[i].clone()).collect();
        for key in due {
            let Some(state) = states.get_mut(&key) else { continue };
            state.queued = true;
            let period = if state.load.in_flight() > 0 { cadence.busy } else { cadence.idle };
            queue.push_back((key, period));
        }
        start_queued(&mut states, &mut queue, &mut tasks, &mut running, &shared, settings.concurrency);
    }
    tasks.abort_all();
}

/// Starts queued scrapes while fewer than `concurrency` run.
fn start_queued(
    states: &mut HashMap<String, PodState>,
    queue: &mut VecDeque<(String, Duration)>,
    tasks: &mut JoinSet<Done>,
    running: &mut HashMap<tokio::task::Id, String>,
    shared: &Arc<Shared>,
    concurrency: usize,
) {
    while tasks.len() < concurrency {
        let Some((key, period)) = queue.pop_front() else { return };
        // A pod that left (or changed) while queued is not scraped.
        let Some(state) = states.get_mut(&key).filter(|s| s.queued) else { continue };
        state.queued = false;
        state.last_started = Some(Instant::now());
        state.in_progress = true;
        let job = Job {
            addr: state.target.addr,
            addr_text: state.addr_text.clone(),
            names: state.names,
            urls: Arc::clone(&state.urls),
            whole_page: state.whole_page,
            load: Arc::clone(&state.load),
            period,
            // A replica that just started (or just found the pod) waits two
            // periods for the others' readings before it scrapes on its own:
            // a rolling restart of the DaemonSet must not scrape every pod again.
            overdue: state.history.newest().unwrap_or(state.followed_since).elapsed() > period.saturating_mul(2),
        };
        let id = tasks.spawn(scrape(key.clone(), job, Arc::clone(shared))).id();
        running.insert(id, key);
    }
}

async fn recv(remote: &mut Option<mpsc::Receiver<Remote>>) -> Option<Remote> {
    match remote {
        Some(remote) => remote.recv().await,
        None => std::future::pending().await,
    }
}

/// Brings the pod states in line with the ready pods of `snapshot`.
fn follow(
    states: &mut HashMap<String, PodState>,
    snapshot: &crate::discovery::Snapshot,
    store: &EngineMetrics,
    window: Duration,
) {
    let mut wanted: HashMap<&str, (Target, &crate::discovery::PodInfo)> = HashMap::new();
    for model in snapshot.base_models() {
        for pod in &model.ready {
            let Some(addr) = pod.addr else { continue };
            let target = Target {
                addr: SocketAddr::new(addr.ip(), pod.metric_port),
                model: pod.model.clone(),
                engine: pod.engine.clone(),
            };
            wanted.insert(pod.key.as_str(), (target, pod));
        }
    }
    states.retain(|key, state| wanted.get(key.as_str()).is_some_and(|(target, _)| *target == state.target));
    store.retain(|key| states.contains_key(key) || wanted.contains_key(key));
    for (key, (target, pod)) in wanted {
        if let Some(state) = states.get_mut(key) {
            if !Arc::ptr_eq(&state.load, &pod.load) {
                // The pod came back as a new one: its metrics move with it.
                state.slot = store.slot(key, &target.model, &pod.load);
                state.load = Arc::clone(&pod.load);
            }
            continue;
        }
        let names = names::for_engine(&target.engine);
        let urls = match Urls::new(target.addr, names) {
            Ok(urls) => Arc::new(urls),
            Err(err) => {
                tracing::warn!(pod = %key, error = %err, "cannot build the metrics URL; not scraping this pod");
                continue;
            }
        };
        let slot = store.slot(key, &target.model, &pod.load);
        states.insert(
            key.to_owned(),
            PodState {
                addr_text: target.addr.to_string(),
                target,
                names,
                urls,
                slot,
                load: Arc::clone(&pod.load),
                history: History::new(window),
                whole_page: false,
                last_started: None,
                in_progress: false,
                queued: false,
                followed_since: Instant::now(),
                last_logged: None,
            },
        );
    }
}

/// Takes a finished scrape into its pod's window (unless the pod changed meanwhile).
fn finish(states: &mut HashMap<String, PodState>, done: Done, metrics: &Metrics, valid_for: Duration) {
    let Some(state) = states.get_mut(&done.key).filter(|s| s.target.addr == done.addr) else { return };
    state.in_progress = false;
    let Some(Scrape { at, base, others, result, whole_page }) = done.scrape else { return };
    if whole_page && !state.whole_page {
        tracing::info!(pod = %done.key, "engine refuses the metrics filter; scraping its whole page");
        state.whole_page = true;
    }
    match result {
        Ok(scraped) => {
            if state.history.is_newer(at) {
                note_engine_queue(&state.load, &scraped, base, others, valid_for);
                state.slot.publish(state.history.push(at, scraped));
            }
            if state.last_logged.take().is_some() {
                tracing::info!(pod = %done.key, "engine metrics scrape recovered");
            }
        }
        Err(err) => {
            metrics.routing.scrape_error(&state.target.model, err.kind);
            if state.last_logged.is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL) {
                tracing::warn!(pod = %done.key, url = %state.urls.whole, kind = err.kind, error = %err.detail,
                    "engine metrics scrape failed");
                state.last_logged = Some(Instant::now());
            }
        }
    }
}

/// Takes another replica's reading of a pod this replica also scrapes.
fn take_remote(states: &mut HashMap<String, PodState>, reading: &Remote, valid_for: Duration) {
    let Some(state) = states.get_mut(&reading.pod).filter(|s| s.addr_text == reading.addr) else { return };
    let at = Instant::now();
    if state.history.is_newer(at) {
        let (base, others) = (state.load.in_flight(), state.load.others_heard());
        note_engine_queue(&state.load, &reading.scraped, base, others, valid_for);
        state.slot.publish(state.history.push(at, reading.scraped));
        // Scraped for us: not due again here until a period after it.
        state.last_started = Some(state.last_started.map_or(at, |started| started.max(at)));
    }
}

/// How long routing believes an engine's count of its requests: a few
/// refresh intervals, as a pod in use is scraped every interval (an idle
/// one's reading lapses sooner than its next scrape on a large fleet, and
/// its own count, none, stands).
fn engine_reading_valid(interval: Duration) -> Duration {
    interval.saturating_mul(4)
}

/// Most requests believed running or waiting on one engine.
const MAX_ENGINE_QUEUE: f64 = 1e6;

/// Tells routing the engine's own count of running and waiting requests,
/// which every replica reads alike (see [`PodLoad::routing_load`]); `base`
/// is this replica's in flight and `others` the other replicas' as they
/// said when the reading was taken.
fn note_engine_queue(load: &PodLoad, scraped: &Scraped, base: usize, others: OthersHeard, valid_for: Duration) {
    if let Some(running) = scraped.running.filter(|r| r.is_finite() && *r >= 0.0) {
        let waiting = scraped.waiting.filter(|w| w.is_finite() && *w >= 0.0).unwrap_or(0.0);
        let queue = (running + waiting).min(MAX_ENGINE_QUEUE) as usize;
        load.engine_reading_at(queue, base, others, valid_for);
    }
}

/// One scrape's instructions.
struct Job {
    addr: SocketAddr,
    addr_text: String,
    names: &'static EngineNames,
    urls: Arc<Urls>,
    whole_page: bool,
    /// The pod's load, told the engine's count of its requests.
    load: Arc<PodLoad>,
    /// How often this replica wants the pod: what a claim asks for.
    period: Duration,
    /// No reading of the pod (ours or shared) for two periods, or since
    /// this replica started following it two periods ago.
    overdue: bool,
}

/// Scrapes one pod once (after claiming it, when sharing).
async fn scrape(key: String, job: Job, shared: Arc<Shared>) -> Done {
    let done = |scrape| Done { key: key.clone(), addr: job.addr, scrape };
    let claim = match &shared.sharing {
        Some(sharing) => sharing.claim(&key, &job.addr_text, job.period, shared.interval).await,
        None => None,
    };
    // Another replica holds the pod; unless its readings stopped coming (it
    // cannot reach the pod, or our subscription went quiet), leave it to them.
    if claim == Some(Claim::Theirs) && !job.overdue {
        return done(None);
    }
    let mut whole_page = job.whole_page;
    let base = job.load.in_flight();
    let others = job.load.others_heard();
    let uri = if whole_page { &job.urls.whole } else { &job.urls.filtered };
    let mut result = fetch(&shared.client, uri, shared.timeout).await;
    if !whole_page && result.as_ref().is_err_and(|err| err.kind == "status") {
        let whole = fetch(&shared.client, &job.urls.whole, shared.timeout).await;
        whole_page = whole.is_ok();
        result = whole;
    }
    let at = Instant::now();
    let result = result.and_then(|text| {
        parse::parse(&text, job.names).map_err(|e| ScrapeError { kind: "parse", detail: e.to_string() })
    });
    if let (Some(sharing), Some(Claim::Mine)) = (&shared.sharing, claim) {
        match &result {
            Ok(scraped) => sharing.publish(&key, &job.addr_text, *scraped).await,
            Err(_) => sharing.release(&key, &job.addr_text).await,
        }
    }
    done(Some(Scrape { at, base, others, result, whole_page }))
}

/// A failed scrape: `kind` is a bounded metric label.
#[derive(Debug)]
pub(super) struct ScrapeError {
    kind: &'static str,
    pub(super) detail: String,
}

pub(super) async fn fetch(client: &HttpClient, uri: &Uri, timeout: Duration) -> Result<String, ScrapeError> {
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
            pd: Default::default(),
            custom_paths: Vec::new(),
            data_parallel: 1,
            ready: true,
            load: Arc::default(),
            series: Default::default(),
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
        spawn(Arc::clone(&pods), Arc::clone(&store), metrics, settings, None, shutdown.clone());
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
    async fn a_fleet_past_the_budget_is_scraped_within_it_busy_pods_first() {
        let running = Arc::new(AtomicU64::new(1));
        let mut servers = Vec::new();
        let mut fleet = Vec::new();
        for i in 0..40 {
            let hits: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
            let addr = metrics_server_with(Arc::clone(&running), false, Arc::clone(&hits)).await;
            fleet.push(pod(&format!("p{i}"), addr));
            servers.push(hits);
        }
        let metrics = Arc::new(Metrics::new());
        let pods = Arc::new(PodStore::new(Arc::clone(&metrics)));
        pods.replace_all(fleet);
        // One request in flight to p0 for the whole test.
        let busy = pods.snapshot().models["m"].ready.iter().find(|p| p.name == "p0").expect("p0").load.start();
        let store = Arc::new(EngineMetrics::new(Duration::from_millis(100)));
        // 40 pods every 10 ms would be 4,000 scrapes a second; the budget is 200.
        let settings = ScrapeConfig {
            interval: Duration::from_millis(10),
            max_scrapes_per_second: 200,
            ..ScrapeConfig::default()
        };
        let shutdown = CancellationToken::new();
        let task = spawn(Arc::clone(&pods), Arc::clone(&store), Arc::clone(&metrics), settings, None, shutdown.clone());
        let count = |servers: &[Arc<std::sync::Mutex<Vec<String>>>]| -> Vec<usize> {
            servers.iter().map(|hits| hits.lock().expect("hits").len()).collect()
        };
        wait_for("every pod scraped", || count(&servers).iter().all(|&n| n > 0)).await;
        let before = count(&servers);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = count(&servers);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("no panic");
        drop(busy);
        let delta: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let total: usize = delta.iter().sum();
        assert!((120..=230).contains(&total), "about 200 scrapes in a second, not 4,000: {total} {delta:?}");
        // The busy pod every tick (up to 100 a second, half the budget at most);
        // the 39 others share the rest, a few each.
        assert!(delta[0] >= 40, "the pod with a request in flight is refreshed first: {delta:?}");
        assert!(delta[1..].iter().all(|&n| (1..=8).contains(&n)), "idle pods evenly: {delta:?}");
        // Idle pods are refreshed every ~0.4 s: staleness is judged against that, not 100 ms.
        assert!(store.stale_after() >= Duration::from_millis(1200), "{:?}", store.stale_after());
    }

    #[tokio::test]
    async fn the_whole_budget_is_used_when_few_scrapes_may_run_at_once() {
        let running = Arc::new(AtomicU64::new(1));
        let hits: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let addr = metrics_server_with(Arc::clone(&running), false, Arc::clone(&hits)).await;
        let metrics = Arc::new(Metrics::new());
        let pods = Arc::new(PodStore::new(Arc::clone(&metrics)));
        pods.replace_all((0..40).map(|i| pod(&format!("p{i}"), addr)).collect());
        let store = Arc::new(EngineMetrics::new(Duration::from_secs(2)));
        // Ten scrapes due per 50 ms tick, two at a time: the rest start as
        // slots free up, not at the next tick.
        let settings = ScrapeConfig {
            interval: Duration::from_millis(50),
            max_scrapes_per_second: 200,
            concurrency: 2,
            ..ScrapeConfig::default()
        };
        let shutdown = CancellationToken::new();
        let task = spawn(Arc::clone(&pods), Arc::clone(&store), Arc::clone(&metrics), settings, None, shutdown.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = hits.lock().expect("hits").len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let total = hits.lock().expect("hits").len() - before;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("no panic");
        assert!((150..=230).contains(&total), "about 200 scrapes in a second: {total}");
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
        let task = spawn(Arc::clone(&pods), Arc::clone(&store), Arc::clone(&metrics), settings, None, shutdown.clone());

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
        let task = spawn(Arc::clone(&pods), Arc::clone(&store), Arc::clone(&metrics), settings, None, shutdown.clone());
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
