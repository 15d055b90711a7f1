//! Everything the engine's connections share.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use super::body::MockBody;
use super::cli::MockEngineArgs;
use super::faults::{FaultSwitch, Faults};
use super::load::LoadModel;
use super::lora::{AdapterRequest, LoraAdapters};
use super::metrics::EngineMetrics;
use super::openai::{ErrorBody, ResponseIds};
use super::pd::{Handshake, PdState};
use super::prefix::PrefixCache;
use super::sleep::SleepSwitch;
use super::stats::RequestStats;

/// Names the engine on every response, so tests see which pod answered.
const ENGINE_HEADER: HeaderName = HeaderName::from_static("x-mock-engine");

/// The shared state of one engine.
#[derive(Debug)]
pub struct EngineState {
    /// Pod name.
    pub name: String,
    name_header: HeaderValue,
    /// Served model ids; never empty.
    pub models: Vec<String>,
    /// The `max_model_len` `/v1/models` gives base models: the KV cache's size, the longest
    /// sequence it could hold.
    pub max_model_len: u64,
    /// Completion tokens when a request names no cap.
    pub default_completion_tokens: u32,
    /// Where the engine listens, reported to disaggregated prefill callers.
    pub local_addr: SocketAddr,
    /// Faults and latency in force.
    pub faults: FaultSwitch,
    /// Running batch, queue and KV cache.
    pub load: Arc<LoadModel>,
    /// Prometheus counters and histograms.
    pub metrics: Arc<EngineMetrics>,
    /// Inference request counts for `/mock/stats`.
    pub stats: Arc<RequestStats>,
    /// Prompt blocks computed recently.
    pub prefix_cache: PrefixCache,
    /// Time to first token added per other running request.
    pub ttft_per_running: Duration,
    /// Time to first token added per uncached prompt token.
    pub ttft_per_uncached_token: Duration,
    /// Response ids.
    pub ids: ResponseIds,
    /// Prefill/decode role and the transfers seen.
    pub pd: PdState,
    /// What a `--fail-status` answer's body looks like.
    pub fail_body: super::cli::FailBody,
    /// vLLM's sleep mode: asleep or awake, and the sleep calls seen.
    pub sleep: SleepSwitch,
    /// LoRA adapters loaded and their requests.
    pub lora: Arc<LoraAdapters>,
}

/// The model an inference request is served as.
#[derive(Debug)]
pub struct ServedModel {
    /// The model id the answer names: the base model asked for (or the first one), or the
    /// adapter.
    pub name: String,
    /// For an adapter, its request, running until dropped.
    pub adapter: Option<AdapterRequest>,
}

impl EngineState {
    /// The state of an engine configured by `args`, listening on `local_addr` (and, as an
    /// SGLang prefill, serving bootstrap rooms on `bootstrap_addr`).
    pub fn new(
        args: &MockEngineArgs,
        local_addr: SocketAddr,
        bootstrap_addr: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        let name_header = HeaderValue::from_str(&args.name)
            .with_context(|| format!("--name {:?} is not a valid header value", args.name))?;
        let handshake = Handshake::from_args(args.engine_kind, args.kv_connector).map_err(anyhow::Error::msg)?;
        let models = if args.models.is_empty() { vec!["mock-model".to_owned()] } else { args.models.clone() };
        let lora = LoraAdapters::new(args.max_loras, &args.lora_modules).map_err(anyhow::Error::msg)?;
        Ok(Self {
            name: args.name.clone(),
            name_header,
            models,
            max_model_len: args.kv_capacity_tokens,
            default_completion_tokens: args.tokens,
            local_addr,
            faults: FaultSwitch::new(Faults::from_args(args)),
            load: Arc::new(LoadModel::new(args.max_running, args.kv_capacity_tokens)),
            metrics: Arc::new(EngineMetrics::default()),
            stats: Arc::new(RequestStats::default()),
            prefix_cache: PrefixCache::new(args.prefix_cache_blocks, args.prefix_block_tokens),
            ttft_per_running: Duration::from_micros(args.ttft_per_running_us),
            ttft_per_uncached_token: Duration::from_micros(args.ttft_per_uncached_token_us),
            ids: ResponseIds::new(),
            pd: PdState::new(args.role, &args.name, local_addr.port(), &args.prefill_host)
                .with_handshake(handshake)
                .with_bootstrap(
                    bootstrap_addr.map(|addr| addr.port()),
                    Duration::from_millis(args.bootstrap_timeout_ms),
                ),
            fail_body: args.fail_body,
            sleep: SleepSwitch::new(args.sleeping, Duration::from_millis(args.wake_delay_ms)),
            lora: Arc::new(lora),
        })
    }

    /// The model that labels `/metrics` and answers requests that name none.
    pub fn first_model(&self) -> &str {
        self.models.first().map_or("mock-model", String::as_str)
    }

    /// The model a request naming `requested` is served as: a base model, the first one when
    /// it names none, or a loaded LoRA adapter (whose request then counts as running until
    /// the [`ServedModel`] is dropped). `Err` holds any other name, which
    /// [`EngineState::model_not_found`] answers.
    pub fn serve_model(&self, requested: Option<String>) -> Result<ServedModel, String> {
        let Some(name) = requested else {
            return Ok(ServedModel { name: self.first_model().to_owned(), adapter: None });
        };
        if self.models.contains(&name) {
            return Ok(ServedModel { name, adapter: None });
        }
        match self.lora.start_request(&name) {
            Some(adapter) => Ok(ServedModel { name, adapter: Some(adapter) }),
            None => Err(name),
        }
    }

    /// vLLM's 404 for a request naming a model it does not serve.
    pub fn model_not_found(&self, model: &str) -> Response<MockBody> {
        let message = format!("The model `{model}` does not exist.");
        self.error(StatusCode::NOT_FOUND, "NotFoundError", &message, Some("model"))
    }

    /// A response with the engine's header.
    pub fn respond(&self, status: StatusCode, content_type: &'static str, body: MockBody) -> Response<MockBody> {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        if !content_type.is_empty() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        headers.insert(ENGINE_HEADER, self.name_header.clone());
        response
    }

    /// A JSON response.
    pub fn json(&self, status: StatusCode, body: bytes::Bytes) -> Response<MockBody> {
        self.respond(status, "application/json", MockBody::full(body))
    }

    /// The answer of an engine failing on purpose (`--fail-status`), in the `--fail-body` form.
    pub fn failure(&self, status: StatusCode) -> Response<MockBody> {
        use super::cli::FailBody;
        let message = "mock failure";
        match self.fail_body {
            FailBody::Openai => self.error(status, "InternalServerError", message, None),
            FailBody::Flat => self.json(
                status,
                bytes::Bytes::from(
                    serde_json::json!({"object": "error", "message": message, "type": "InternalServerError",
                        "param": null, "code": status.as_u16()})
                    .to_string(),
                ),
            ),
            FailBody::Text => {
                self.respond(status, "text/plain", MockBody::full(bytes::Bytes::from_static(b"mock failure\n")))
            }
            FailBody::Html => self.respond(
                status,
                "text/html",
                MockBody::full(bytes::Bytes::from_static(b"<html><body><h1>mock failure</h1></body></html>")),
            ),
        }
    }

    /// The answer to an inference request while the engine sleeps (counted), or `None`
    /// when it is awake: 503 `ServiceUnavailableError`, "model is sleeping". See
    /// [`super::sleep`] for how this differs from vLLM.
    pub fn refusal_while_asleep(&self) -> Option<Response<MockBody>> {
        self.sleep
            .refuse()
            .then(|| self.error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError", "model is sleeping", None))
    }

    /// A vLLM-style error response; `kind` is vLLM's exception name.
    pub fn error(&self, status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response<MockBody> {
        self.json(status, ErrorBody::new(status.as_u16(), kind, message, param).to_bytes())
    }
}
