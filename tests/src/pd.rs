//! Prefill/decode rolesets of mock engines for the `pd` tests (tests/pd.rs,
//! tests/pd_engines.rs): one prefill and one decode engine playing an engine's
//! role, their pods labelled as AIBrix labels them, and what the mocks saw.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::StatusCode;
use serde_json::Value;

use crate::harness::{Engine, Gateway, PodSpec, free_port, post, send};

/// The model every roleset serves.
pub const MODEL: &str = "llama";
pub const ENGINE_LABEL: &str = "model.aibrix.ai/engine";
pub const CONNECTOR_LABEL: &str = "model.aibrix.ai/kv-connector-type";
pub const BOOTSTRAP_ANNOTATION: &str = "model.aibrix.ai/sglang-bootstrap-port";
pub const CONFIG_ANNOTATION: &str = "model.aibrix.ai/config";

/// The engine a roleset runs, as labelled and as the mocks play it.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Nixl,
    Mooncake,
    Sglang,
    TrtLlm,
}

impl Kind {
    pub fn engine(self) -> &'static str {
        match self {
            Self::Nixl | Self::Mooncake => "vllm",
            Self::Sglang => "sglang",
            Self::TrtLlm => "trtllm",
        }
    }

    pub fn connector(self) -> Option<&'static str> {
        match self {
            Self::Nixl => Some("nixl"),
            Self::Mooncake => Some("mooncake"),
            Self::Sglang | Self::TrtLlm => None,
        }
    }
}

/// One prefill and one decode engine forming a roleset, and how its pods are labelled.
pub struct Roleset {
    pub name: String,
    pub kind: Option<Kind>,
    pub prefill: Engine,
    pub decode: Engine,
    pub bootstrap_port: u16,
    pub config: Option<String>,
}

impl Roleset {
    /// A vLLM roleset with the default connector; `engine_args` go to both mocks.
    pub fn vllm(name: &str, engine_args: &[&str]) -> Self {
        Self::start(name, None, None, engine_args)
    }

    /// A roleset of `kind` (`None`: vLLM's default connector), its pods carrying `config`.
    pub fn start(name: &str, kind: Option<Kind>, config: Option<String>, extra: &[&str]) -> Self {
        let bootstrap_port = free_port();
        let port = bootstrap_port.to_string();
        let mut engine_args: Vec<&str> = Vec::new();
        if let Some(kind) = kind {
            engine_args.extend(["--engine-kind", kind.engine()]);
            if let Some(connector) = kind.connector() {
                engine_args.extend(["--kv-connector", connector]);
            }
        }
        engine_args.extend(extra);
        let mut prefill_args = vec!["--role", "prefill", "--bootstrap-port", &port];
        prefill_args.extend(&engine_args);
        let mut decode_args = vec!["--role", "decode"];
        decode_args.extend(&engine_args);
        Self {
            name: name.to_owned(),
            kind,
            prefill: Engine::start(&format!("{name}-prefill"), MODEL, &prefill_args),
            decode: Engine::start(&format!("{name}-decode"), MODEL, &decode_args),
            bootstrap_port,
            config,
        }
    }

    pub fn pod(&self, engine: &Engine, role: &str, ready: bool) -> PodSpec {
        let mut pod = PodSpec::for_engine(engine, MODEL)
            .label("roleset-name", &self.name)
            .label("role-name", role)
            .annotation(BOOTSTRAP_ANNOTATION, &self.bootstrap_port.to_string())
            .ready(ready);
        if let Some(kind) = self.kind {
            pod = pod.label(ENGINE_LABEL, kind.engine());
            if let Some(connector) = kind.connector() {
                pod = pod.label(CONNECTOR_LABEL, connector);
            }
        }
        if let Some(config) = &self.config {
            pod = pod.annotation(CONFIG_ANNOTATION, config);
        }
        pod
    }

    pub fn pods(&self, prefill_ready: bool, decode_ready: bool) -> Vec<PodSpec> {
        vec![self.pod(&self.prefill, "prefill", prefill_ready), self.pod(&self.decode, "decode", decode_ready)]
    }

    pub async fn pd_stats(engine: &Engine) -> Value {
        engine.stats().await["pd"].clone()
    }

    /// The transfer `engine` accepted for `request_id`.
    pub async fn transfer(engine: &Engine, request_id: &str) -> Value {
        let pd = Self::pd_stats(engine).await;
        pd["transfers"]
            .as_array()
            .and_then(|all| all.iter().find(|t| t["x_request_id"] == request_id).cloned())
            .unwrap_or_else(|| panic!("{} has no transfer for {request_id}: {pd}", engine.name))
    }

    pub async fn assert_no_rejections(&self) {
        for engine in [&self.prefill, &self.decode] {
            let pd = Self::pd_stats(engine).await;
            assert_eq!(pd["rejected"], 0, "{} refused a request: {}", engine.name, pd["last_rejection"]);
        }
    }
}

pub async fn start_gateway(pods: &[PodSpec], extra: &[&str]) -> Gateway {
    let args: Vec<&str> = ["--routing-algorithm", "pd"].iter().chain(extra).copied().collect();
    Gateway::start(pods, &args).await
}

/// Clients sending requests through a rollout; every answer must be a 200
/// (and a stream must end with `[DONE]`).
pub struct RolloutLoad {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl RolloutLoad {
    /// `workers` clients posting to `path` the body `body(worker, n)` gives
    /// (with whether it streams), until [`RolloutLoad::finish`], at most
    /// 2000 requests each.
    pub fn start(
        gw: &Arc<Gateway>,
        path: &'static str,
        workers: usize,
        body: impl Fn(usize, usize) -> (String, bool) + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let body = Arc::new(body);
        let workers = (0..workers)
            .map(|worker| {
                let (gw, stop, body) = (Arc::clone(gw), Arc::clone(&stop), Arc::clone(&body));
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut sent = 0;
                    // Bounded by the stop flag and by count.
                    while !stop.load(Ordering::Relaxed) && sent < 2000 {
                        let (request, stream) = body(worker, sent);
                        let reply = send(post(&gw.url(path), &request, &[])).await;
                        let complete = !stream || reply.text().contains("data: [DONE]");
                        if reply.status != StatusCode::OK || !complete {
                            failures.push(format!("worker {worker}: {}: {}", reply.status, reply.text()));
                        }
                        sent += 1;
                    }
                    (sent, failures)
                })
            })
            .collect();
        Self { stop, workers }
    }

    /// Stops the clients, asserts that no request failed, and says how many were sent.
    pub async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for worker in self.workers {
            let (sent, failures) = worker.await.expect("worker finished");
            assert!(failures.is_empty(), "{} requests failed, first: {}", failures.len(), failures[0]);
            total += sent;
        }
        total
    }
}
