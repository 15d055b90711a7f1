//! An in-process fake Kubernetes API server for discovery tests.
//!
//! It speaks the real list and watch protocol for Pods over plain HTTP/1.1:
//! `GET /api/v1/pods` and `GET /api/v1/namespaces/<ns>/pods` answer a
//! `PodList` with `metadata.resourceVersion`; with `watch=true` they answer a
//! chunked stream of newline-delimited `{"type":..,"object":..}` events from
//! the given `resourceVersion`, with bookmarks when `allowWatchBookmarks` is
//! set, ending after `timeoutSeconds`. A resourceVersion older than the
//! retained history gets `410 Gone` as an `ERROR` event, as from a real API
//! server, which makes clients list again.
//!
//! The test drives it through [`FakeApiServer`]: add, modify and delete pods,
//! drop or reset open watches, expire resource versions, send bookmarks and
//! fail requests. Every change gets the next resourceVersion.
//!
//! AIBrix's `ModelAdapter` resources are served the same way, under
//! `/apis/model.aibrix.ai/v1alpha1/modeladapters` and
//! `/apis/model.aibrix.ai/v1alpha1/namespaces/<ns>/modeladapters`, with one
//! resourceVersion sequence and one history for both kinds, as etcd has; the
//! test adds, changes and deletes them, or has them answered `404` as a
//! cluster without AIBrix's CRD does. Dropping, resetting and expiring
//! watches, bookmarks and unavailability apply to the watches of both kinds;
//! the request counters count the pods' only, unless named after adapters.
//!
//! Simplifications: two resources (Pods, ModelAdapters), no pagination
//! (`limit` is ignored, lists are always complete), and an object that stops
//! matching a watch's label selector is not turned into a `DELETED` event for it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::harness::PodSpec;

/// Namespace of pods named without one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// API group and version of AIBrix's `ModelAdapter` resources.
const MODEL_ADAPTER_API_VERSION: &str = "model.aibrix.ai/v1alpha1";

/// The kinds of object the server holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pod,
    ModelAdapter,
}

impl Kind {
    /// `(apiVersion, kind)` of one object.
    fn type_meta(self) -> (&'static str, &'static str) {
        match self {
            Self::Pod => ("v1", "Pod"),
            Self::ModelAdapter => (MODEL_ADAPTER_API_VERSION, "ModelAdapter"),
        }
    }

    /// The `kind` of a list.
    fn list_kind(self) -> &'static str {
        match self {
            Self::Pod => "PodList",
            Self::ModelAdapter => "ModelAdapterList",
        }
    }
}

/// A fake API server on 127.0.0.1, stopped when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    state: Mutex<State>,
    /// Changes and commands for open watches. Sent while `state` is locked,
    /// so a new watch sees every change exactly once: from the history or
    /// from here.
    notices: broadcast::Sender<Notice>,
    open_watches: AtomicUsize,
    open_adapter_watches: AtomicUsize,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion handed out.
    resource_version: u64,
    /// Current pods by `namespace/name`.
    pods: BTreeMap<String, Value>,
    /// Current ModelAdapters by `namespace/name`.
    adapters: BTreeMap<String, Value>,
    /// Answer ModelAdapter requests with 404, as without the CRD.
    adapters_unserved: bool,
    /// ModelAdapter requests of any kind, 404s included.
    adapter_requests: usize,
    /// Every change, oldest first.
    history: Vec<Arc<Change>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_valid: u64,
    /// Answer every request with 500 (not retried by clients, unlike 503).
    unavailable: bool,
    lists: usize,
    watches: usize,
    next_uid: u64,
}

/// One change to one object.
#[derive(Debug)]
struct Change {
    resource_version: u64,
    /// Of the object.
    object_kind: Kind,
    /// Of the event: `ADDED`, `MODIFIED` or `DELETED`.
    kind: &'static str,
    namespace: String,
    object: Value,
}

#[derive(Clone, Debug)]
enum Notice {
    Change(Arc<Change>),
    Bookmark(u64),
    /// End open watches cleanly (the last chunk is sent).
    Close,
    /// Cut open watches mid-stream (no last chunk).
    Reset,
    /// Answer open watches with 410 Gone and end them.
    Gone,
}

impl FakeApiServer {
    /// Starts the server on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake API server");
        let addr = listener.local_addr().expect("fake API server address");
        let (notices, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { oldest_valid: 1, ..State::default() }),
            notices,
            open_watches: AtomicUsize::new(0),
            open_adapter_watches: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Self { addr, shared, accept }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        std::fs::write(&path, kubeconfig_yaml(&self.url())).expect("write kubeconfig");
        path
    }

    /// Adds `pod` in the default namespace (`ADDED`).
    pub fn add_pod(&self, pod: &PodSpec) {
        self.add_pod_in(DEFAULT_NAMESPACE, pod);
    }

    /// Adds `pod` in `namespace` (`ADDED`).
    pub fn add_pod_in(&self, namespace: &str, pod: &PodSpec) {
        let mut state = self.shared.lock();
        let key = format!("{namespace}/{}", pod.name);
        assert!(!state.pods.contains_key(&key), "pod {key} exists already");
        state.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012}", state.next_uid);
        let object = pod_json(namespace, pod, &uid);
        self.shared.commit(&mut state, Kind::Pod, "ADDED", key, object);
    }

    /// Replaces a pod's labels, annotations and readiness with `pod`'s (`MODIFIED`).
    pub fn update_pod(&self, pod: &PodSpec) {
        self.modify(&pod.name, |object| {
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or(DEFAULT_NAMESPACE).to_owned();
            let uid = object["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
            *object = pod_json(&namespace, pod, &uid);
        });
    }

    /// Flips the pod's `Ready` condition (`MODIFIED`). `name` is `name` in
    /// the default namespace or `namespace/name`.
    pub fn set_ready(&self, name: &str, ready: bool) {
        self.modify(name, |object| {
            object["status"]["conditions"] = json!([{"type": "Ready", "status": if ready { "True" } else { "False" }}]);
        });
    }

    /// Sets `metadata.deletionTimestamp`, as a graceful delete does first
    /// (`MODIFIED`); the pod stays Ready, as it would until its containers stop.
    pub fn mark_terminating(&self, name: &str) {
        self.modify(name, |object| {
            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            object["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        });
    }

    /// Deletes the pod (`DELETED`).
    pub fn delete_pod(&self, name: &str) {
        let key = pod_key(name);
        let mut state = self.shared.lock();
        let object = state.pods.get(&key).cloned().unwrap_or_else(|| panic!("no pod {key}"));
        self.shared.commit(&mut state, Kind::Pod, "DELETED", key, object);
    }

    /// Adds the ModelAdapter `namespace/name` (`ADDED`): a LoRA adapter of
    /// `base_model` (`spec.baseModel`, left out when `None`) loaded on the pods
    /// `instances` of `namespace` (`status.instances`).
    pub fn add_model_adapter(&self, namespace: &str, name: &str, base_model: Option<&str>, instances: &[&str]) {
        let mut state = self.shared.lock();
        let key = format!("{namespace}/{name}");
        assert!(!state.adapters.contains_key(&key), "ModelAdapter {key} exists already");
        state.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012}", state.next_uid);
        let object = model_adapter_json(namespace, name, base_model, instances, &uid);
        self.shared.commit(&mut state, Kind::ModelAdapter, "ADDED", key, object);
    }

    /// Replaces the ModelAdapter's `status.instances` (`MODIFIED`), as AIBrix's
    /// controller does when it loads or unloads the adapter on pods.
    pub fn set_adapter_instances(&self, namespace: &str, name: &str, instances: &[&str]) {
        let key = format!("{namespace}/{name}");
        let mut state = self.shared.lock();
        let mut object = state.adapters.get(&key).cloned().unwrap_or_else(|| panic!("no ModelAdapter {key}"));
        object["status"] = adapter_status(instances);
        self.shared.commit(&mut state, Kind::ModelAdapter, "MODIFIED", key, object);
    }

    /// Deletes the ModelAdapter (`DELETED`).
    pub fn delete_model_adapter(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        let mut state = self.shared.lock();
        let object = state.adapters.get(&key).cloned().unwrap_or_else(|| panic!("no ModelAdapter {key}"));
        self.shared.commit(&mut state, Kind::ModelAdapter, "DELETED", key, object);
    }

    /// With `false`, ModelAdapter lists and watches are answered `404 page
    /// not found`, as by an API server without AIBrix's CRD (served by
    /// default). Watches already open stay open.
    pub fn serve_model_adapters(&self, serve: bool) {
        self.shared.lock().adapters_unserved = !serve;
    }

    /// ModelAdapter requests answered so far, lists and watches, 404s included.
    pub fn model_adapter_requests(&self) -> usize {
        self.shared.lock().adapter_requests
    }

    /// ModelAdapter watches streaming right now.
    pub fn open_model_adapter_watches(&self) -> usize {
        self.shared.open_adapter_watches.load(Ordering::Acquire)
    }

    /// Ends every open watch cleanly, as an API server or load balancer
    /// closing an idle connection does. Clients resume from their last
    /// resourceVersion.
    pub fn drop_watches(&self) {
        let _state = self.shared.lock();
        let _ = self.shared.notices.send(Notice::Close);
    }

    /// Cuts every open watch mid-stream, as a broken connection does.
    pub fn reset_watches(&self) {
        let _state = self.shared.lock();
        let _ = self.shared.notices.send(Notice::Reset);
    }

    /// Forgets the history: open watches get `410 Gone` and end, and any
    /// watch from a resourceVersion handed out so far gets `410 Gone`,
    /// forcing clients to list again.
    pub fn expire_resource_versions(&self) {
        let mut state = self.shared.lock();
        state.oldest_valid = state.resource_version + 1;
        state.history.clear();
        let _ = self.shared.notices.send(Notice::Gone);
    }

    /// Sends a `BOOKMARK` event with the current resourceVersion to open
    /// watches that asked for bookmarks.
    pub fn send_bookmark(&self) {
        let state = self.shared.lock();
        let _ = self.shared.notices.send(Notice::Bookmark(state.resource_version));
    }

    /// While set, every request is answered `500 Internal Server Error`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.lock().unavailable = unavailable;
    }

    /// Pod LIST requests answered so far.
    pub fn list_requests(&self) -> usize {
        self.shared.lock().lists
    }

    /// Pod WATCH requests answered so far.
    pub fn watch_requests(&self) -> usize {
        self.shared.lock().watches
    }

    /// Pod watches streaming right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Acquire)
    }

    fn modify(&self, name: &str, change: impl FnOnce(&mut Value)) {
        let key = pod_key(name);
        let mut state = self.shared.lock();
        let mut object = state.pods.get(&key).cloned().unwrap_or_else(|| panic!("no pod {key}"));
        change(&mut object);
        self.shared.commit(&mut state, Kind::Pod, "MODIFIED", key, object);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        let _ = self.shared.notices.send(Notice::Close);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a change under the next resourceVersion and tells open watches.
    fn commit(&self, state: &mut State, object_kind: Kind, kind: &'static str, key: String, mut object: Value) {
        state.resource_version += 1;
        let resource_version = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or(DEFAULT_NAMESPACE).to_owned();
        let objects = state.objects_mut(object_kind);
        if kind == "DELETED" {
            objects.remove(&key);
        } else {
            objects.insert(key, object.clone());
        }
        let change = Arc::new(Change { resource_version, object_kind, kind, namespace, object });
        state.history.push(Arc::clone(&change));
        let _ = self.notices.send(Notice::Change(change));
    }
}

impl State {
    fn objects(&self, kind: Kind) -> &BTreeMap<String, Value> {
        match kind {
            Kind::Pod => &self.pods,
            Kind::ModelAdapter => &self.adapters,
        }
    }

    fn objects_mut(&mut self, kind: Kind) -> &mut BTreeMap<String, Value> {
        match kind {
            Kind::Pod => &mut self.pods,
            Kind::ModelAdapter => &mut self.adapters,
        }
    }
}

fn pod_key(name: &str) -> String {
    if name.contains('/') { name.to_owned() } else { format!("{DEFAULT_NAMESPACE}/{name}") }
}

/// A pod as the API server returns it, serving on 127.0.0.1:`pod.port`.
fn pod_json(namespace: &str, pod: &PodSpec, uid: &str) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("model.aibrix.ai/name".into(), json!(pod.model));
    labels.insert("model.aibrix.ai/port".into(), json!(pod.port.to_string()));
    for (key, value) in &pod.labels {
        labels.insert(key.clone(), json!(value));
    }
    let mut metadata = json!({
        "name": pod.name,
        "namespace": namespace,
        "uid": uid,
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": labels,
    });
    if let Some(config) = &pod.config {
        metadata["annotations"] = json!({"model.aibrix.ai/config": config});
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai:latest"}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [{"type": "Ready", "status": if pod.ready { "True" } else { "False" }}],
        },
    })
}

/// A ModelAdapter as the API server returns it once AIBrix's controller has
/// loaded it on `instances`.
fn model_adapter_json(namespace: &str, name: &str, base_model: Option<&str>, instances: &[&str], uid: &str) -> Value {
    let mut spec = json!({"artifactURL": format!("huggingface://fake/{name}")});
    if let Some(base) = base_model {
        spec["baseModel"] = json!(base);
        spec["podSelector"] = json!({"matchLabels": {"model.aibrix.ai/name": base}});
    }
    json!({
        "apiVersion": MODEL_ADAPTER_API_VERSION,
        "kind": "ModelAdapter",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
        "status": adapter_status(instances),
    })
}

fn adapter_status(instances: &[&str]) -> Value {
    json!({"phase": if instances.is_empty() { "Pending" } else { "Running" }, "instances": instances})
}

/// A kubeconfig for a plain-HTTP server and no credentials.
pub fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: {DEFAULT_NAMESPACE}
current-context: fake
users:
- name: fake
  user: {{}}
"
    )
}

type ResponseBody = BoxBody<Bytes, io::Error>;

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Which objects a request asks about.
struct Query {
    kind: Kind,
    namespace: Option<String>,
    selector: Vec<Requirement>,
    watch: bool,
    resource_version: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
}

fn handle(shared: &Arc<Shared>, request: &Request<Incoming>) -> Response<ResponseBody> {
    if request.method() != Method::GET {
        return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "only GET is served");
    }
    let Some((kind, namespace)) = route(request.uri().path().trim_end_matches('/')) else {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    };
    if kind == Kind::ModelAdapter {
        let mut state = shared.lock();
        state.adapter_requests += 1;
        if state.adapters_unserved {
            // What an API server answers for a group it does not serve: plain text.
            return plain_text(StatusCode::NOT_FOUND, "404 page not found\n");
        }
    }
    let query = match parse_query(kind, namespace, request.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    if shared.lock().unavailable {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "fake API server set unavailable");
    }
    if query.watch { watch(shared, query) } else { list(shared, &query) }
}

/// The kind and namespace (`None`: all) a path lists.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    const ADAPTERS: &str = "/apis/model.aibrix.ai/v1alpha1";
    let (kind, rest) = if let Some(rest) = path.strip_prefix("/api/v1") {
        (Kind::Pod, rest.strip_suffix("/pods")?)
    } else {
        (Kind::ModelAdapter, path.strip_prefix(ADAPTERS)?.strip_suffix("/modeladapters")?)
    };
    if rest.is_empty() {
        return Some((kind, None));
    }
    match rest.strip_prefix("/namespaces/") {
        Some(ns) if !ns.is_empty() && !ns.contains('/') => Some((kind, Some(ns.to_owned()))),
        _ => None,
    }
}

fn parse_query(kind: Kind, namespace: Option<String>, raw: &str) -> Result<Query, String> {
    let mut query = Query {
        kind,
        namespace,
        selector: Vec::new(),
        watch: false,
        resource_version: None,
        bookmarks: false,
        timeout: Duration::from_secs(1800),
    };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "labelSelector" => query.selector = parse_selector(&value)?,
            "watch" => query.watch = value == "true" || value == "1",
            "resourceVersion" if !value.is_empty() => {
                query.resource_version = Some(value.parse().map_err(|_| format!("bad resourceVersion {value:?}"))?);
            }
            "allowWatchBookmarks" => query.bookmarks = value == "true",
            "timeoutSeconds" => {
                query.timeout =
                    Duration::from_secs(value.parse().map_err(|_| format!("bad timeoutSeconds {value:?}"))?);
            }
            _ => {}
        }
    }
    Ok(query)
}

fn list(shared: &Shared, query: &Query) -> Response<ResponseBody> {
    let mut state = shared.lock();
    if query.kind == Kind::Pod {
        state.lists += 1;
    }
    let items: Vec<Value> = state.objects(query.kind).values().filter(|pod| query.matches(pod)).cloned().collect();
    let body = json!({
        "kind": query.kind.list_kind(),
        "apiVersion": query.kind.type_meta().0,
        "metadata": {"resourceVersion": state.resource_version.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

fn watch(shared: &Arc<Shared>, query: Query) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(256);
    let mut state = shared.lock();
    if query.kind == Kind::Pod {
        state.watches += 1;
    }
    let since = query.resource_version.unwrap_or(0);
    // Like a real server: no resourceVersion (or "0") starts with the current
    // pods as ADDED events; an expired one gets 410 Gone.
    let mut replay: Vec<Bytes> = Vec::new();
    if since == 0 {
        for pod in state.objects(query.kind).values().filter(|pod| query.matches(pod)) {
            replay.push(event_line("ADDED", pod));
        }
    } else if since < state.oldest_valid {
        let line = gone_line(since, state.resource_version);
        drop(state);
        let _ = tx.try_send(Ok(line));
        return stream_response(rx);
    } else {
        for change in state.history.iter().filter(|c| c.resource_version > since) {
            if query.matches_change(change) {
                replay.push(event_line(change.kind, &change.object));
            }
        }
    }
    let notices = shared.notices.subscribe();
    let last_seen = state.resource_version.max(since);
    drop(state);
    let guard = OpenWatch::new(Arc::clone(shared), query.kind);
    tokio::spawn(stream_watch(query, replay, notices, last_seen, tx, guard));
    stream_response(rx)
}

/// Counts a watch as open until dropped.
struct OpenWatch(Arc<Shared>, Kind);

impl OpenWatch {
    fn new(shared: Arc<Shared>, kind: Kind) -> Self {
        shared.open_count(kind).fetch_add(1, Ordering::AcqRel);
        Self(shared, kind)
    }
}

impl Shared {
    fn open_count(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Pod => &self.open_watches,
            Kind::ModelAdapter => &self.open_adapter_watches,
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_count(self.1).fetch_sub(1, Ordering::AcqRel);
    }
}

async fn stream_watch(
    query: Query,
    replay: Vec<Bytes>,
    mut notices: broadcast::Receiver<Notice>,
    mut last_seen: u64,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    _open: OpenWatch,
) {
    for line in replay {
        if tx.send(Ok(line)).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(query.timeout);
    tokio::pin!(deadline);
    loop {
        let notice = tokio::select! {
            () = &mut deadline => return,
            () = tx.closed() => return,
            notice = notices.recv() => notice,
        };
        let line = match notice {
            Ok(Notice::Change(change)) => {
                if change.resource_version <= last_seen {
                    continue;
                }
                last_seen = change.resource_version;
                if !query.matches_change(&change) {
                    continue;
                }
                event_line(change.kind, &change.object)
            }
            Ok(Notice::Bookmark(resource_version)) => {
                if !query.bookmarks {
                    continue;
                }
                let (api_version, kind) = query.kind.type_meta();
                let object = json!({"kind": kind, "apiVersion": api_version,
                                    "metadata": {"resourceVersion": resource_version.to_string()}});
                event_line("BOOKMARK", &object)
            }
            Ok(Notice::Close) | Err(broadcast::error::RecvError::Closed) => return,
            Ok(Notice::Reset) => {
                let _ = tx.send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "watch reset by test"))).await;
                return;
            }
            Ok(Notice::Gone) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let _ = tx.send(Ok(gone_line(last_seen, last_seen))).await;
                return;
            }
        };
        if tx.send(Ok(line)).await.is_err() {
            return;
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("serialise event");
    line.push(b'\n');
    Bytes::from(line)
}

fn gone_line(requested: u64, current: u64) -> Bytes {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": "Expired", "code": 410,
        "message": format!("too old resource version: {requested} ({current})"),
    });
    event_line("ERROR", &status)
}

impl Query {
    fn matches(&self, pod: &Value) -> bool {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or(DEFAULT_NAMESPACE);
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.selector.iter().all(|req| req.matches(&pod["metadata"]["labels"]))
    }

    fn matches_change(&self, change: &Change) -> bool {
        self.kind == change.object_kind
            && self.namespace.as_deref().is_none_or(|ns| ns == change.namespace)
            && self.matches(&change.object)
    }
}

/// One term of a label selector.
#[derive(Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Requirement {
    fn matches(&self, labels: &Value) -> bool {
        let get = |key: &str| labels.get(key).and_then(Value::as_str);
        match self {
            Self::Exists(key) => get(key).is_some(),
            Self::NotExists(key) => get(key).is_none(),
            Self::Equals(key, value) => get(key) == Some(value.as_str()),
            Self::NotEquals(key, value) => get(key) != Some(value.as_str()),
        }
    }
}

/// Parses the equality-based selector forms: `k`, `!k`, `k=v`, `k==v`, `k!=v`.
fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut requirements = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some((key, value)) = term.split_once("!=") {
            Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some(key) = term.strip_prefix('!') {
            Requirement::NotExists(key.trim().to_owned())
        } else if term.contains(' ') || term.contains('(') {
            return Err(format!("unsupported label selector term {term:?}"));
        } else {
            Requirement::Exists(term.to_owned())
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body fed from a channel, one frame per message.
struct ChannelBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|item| item.map(|chunk| chunk.map(Frame::data)))
    }
}

fn stream_response(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Response<ResponseBody> {
    let mut response = Response::new(BoxBody::new(ChannelBody(rx)));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn json_response(code: StatusCode, body: &Value) -> Response<ResponseBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("serialise body"));
    let mut response = Response::new(Full::new(bytes).map_err(|never: Infallible| match never {}).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn plain_text(code: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes())).map_err(|never: Infallible| match never {}).boxed(),
    );
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A `Status` error body, as the API server sends with error codes.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<ResponseBody> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code.as_u16()});
    json_response(code, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_forms() {
        assert_eq!(
            parse_selector("model.aibrix.ai/name"),
            Ok(vec![Requirement::Exists("model.aibrix.ai/name".into())])
        );
        assert_eq!(
            parse_selector("a=1,b!=2,!c,d==4"),
            Ok(vec![
                Requirement::Equals("a".into(), "1".into()),
                Requirement::NotEquals("b".into(), "2".into()),
                Requirement::NotExists("c".into()),
                Requirement::Equals("d".into(), "4".into()),
            ])
        );
        assert!(parse_selector("env in (a,b)").is_err());
        let labels = json!({"model.aibrix.ai/name": "m"});
        assert!(Requirement::Exists("model.aibrix.ai/name".into()).matches(&labels));
        assert!(!Requirement::Exists("app".into()).matches(&labels));
    }

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/pods"), Some((Kind::Pod, None)));
        assert_eq!(route("/api/v1/namespaces/ns/pods"), Some((Kind::Pod, Some("ns".into()))));
        assert_eq!(route("/apis/model.aibrix.ai/v1alpha1/modeladapters"), Some((Kind::ModelAdapter, None)));
        assert_eq!(
            route("/apis/model.aibrix.ai/v1alpha1/namespaces/ns/modeladapters"),
            Some((Kind::ModelAdapter, Some("ns".into())))
        );
        for unknown in [
            "/api/v1/namespaces//pods",
            "/api/v1/namespaces/a/b/pods",
            "/api/v1/services",
            "/api/v1pods",
            "/apis/model.aibrix.ai/v1alpha1/namespaces/ns/pods",
            "/apis/model.aibrix.ai/v1beta1/modeladapters",
            "/api/v1/modeladapters",
        ] {
            assert_eq!(route(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("model.aibrix.ai%2Fname"), "model.aibrix.ai/name");
        assert_eq!(percent_decode("a+b%3D1"), "a b=1");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
