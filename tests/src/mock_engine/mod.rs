//! A mock vLLM engine for Turnstile's integration tests, demo and benchmarks.
//!
//! It speaks the OpenAI endpoints a vLLM pod serves (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, `/v1/responses`, `/v1/messages`, `/v1/rerank`,
//! `/v1/classify`, `/v1/score`, `/v1/images/generations`, `/v1/video/generations`, the
//! audio uploads (`upload`), `/v1/models`, `/health`) and
//! exports vLLM's `/metrics` series from a small load model: a running batch of bounded
//! size, a FIFO queue before it, a KV cache filled by running requests, a prefix cache, and
//! token timing where the time to first token can grow with the batch and with the prompt
//! tokens the prefix cache did not hold. Faults (error status, connection reset, hang) and timing can be switched at run
//! time through `POST /mock/faults`; `GET /mock/stats` reports the traffic received. vLLM's
//! sleep mode (`POST /sleep`, `POST /wake_up`, `GET /is_sleeping`, `--sleeping`) puts the
//! engine to sleep: inference answers 503 until it has woken. LoRA adapters (`--lora-modules`,
//! `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`) are listed by `/v1/models`
//! and served as models of their own.
//!
//! Layout, in request order: `server` accepts connections (`connection` can end them with a
//! reset); `inference` takes an inference request through `faults`, `request` parsing and a
//! `generation` on the `load` model, answering with `openai` bodies (streamed by `body`);
//! `control` serves health, models, `metrics`, `stats`, the `sleep` endpoints and the `lora`
//! adapter endpoints. `state` is what they share. With `--role prefill|decode` the engine plays one half of a
//! disaggregated request and `pd` checks the handover a PD gateway must perform for the
//! engine of `--engine-kind` (vLLM's `kv_transfer_params` and its other KV connectors,
//! SGLang's bootstrap rooms, TensorRT-LLM's `disaggregated_params`).

mod body;
mod cli;
mod connection;
mod control;
mod faults;
mod generation;
mod inference;
mod load;
mod lora;
mod metrics;
mod openai;
mod pd;
mod prefix;
mod request;
mod server;
mod sleep;
mod state;
mod stats;
mod upload;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use cli::MockEngineArgs;
pub use faults::{Faults, FaultsPatch};
pub use generation::TokenTiming;
pub use load::{LoadModel, LoadSnapshot, RunningSlot};
pub use lora::{LoraModule, LoraSnapshot};
pub use metrics::EngineMetrics;
pub use pd::{EngineKind, KvConnector, PdRole};
pub use prefix::PrefixCache;
pub use request::{Endpoint, InferenceRequest, InputCount, WordCount};

use state::EngineState;

/// A bound, not yet serving engine.
#[derive(Debug)]
pub struct MockEngine {
    listener: TcpListener,
    /// An SGLang prefill's bootstrap server, and where it listens.
    bootstrap: Option<(TcpListener, SocketAddr)>,
    state: Arc<EngineState>,
}

impl MockEngine {
    /// Binds `args.listen` (and, for an SGLang prefill, the bootstrap port on the same IP)
    /// and builds the engine's state.
    pub async fn bind(args: &MockEngineArgs) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let local_addr = listener.local_addr().context("reading the bound address")?;
        let bootstrap = if args.role == Some(PdRole::Prefill) && args.engine_kind == EngineKind::Sglang {
            let addr = SocketAddr::new(args.listen.ip(), args.bootstrap_port);
            let listener = TcpListener::bind(addr).await.with_context(|| format!("binding bootstrap port {addr}"))?;
            let bound = listener.local_addr().context("reading the bound bootstrap address")?;
            Some((listener, bound))
        } else {
            None
        };
        let state = Arc::new(EngineState::new(args, local_addr, bootstrap.as_ref().map(|(_, addr)| *addr))?);
        Ok(Self { listener, bootstrap, state })
    }

    /// The address actually bound (the real port when `--listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.state.local_addr
    }

    /// Where an SGLang prefill's bootstrap server listens.
    pub fn bootstrap_addr(&self) -> Option<SocketAddr> {
        self.bootstrap.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until the process ends.
    pub async fn serve(self) {
        if let Some((listener, _)) = self.bootstrap {
            tokio::spawn(pd::serve_bootstrap(listener, self.state.pd.rooms()));
        }
        server::serve(self.listener, self.state).await;
    }
}

/// The `mock-engine` binary: builds the runtime, binds, announces the address on stdout
/// and serves forever.
pub fn run(args: &MockEngineArgs) -> anyhow::Result<()> {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads as usize).enable_all().build()
    }
    .context("building the tokio runtime")?;
    runtime.block_on(async {
        let engine = MockEngine::bind(args).await?;
        // Harnesses that pass port 0 read the port from this line, and the bootstrap port
        // from the next. One write: a harness that reads only the first line and closes the
        // pipe must not make the second fail.
        let mut banner = format!("mock-engine listening on {}\n", engine.local_addr());
        if let Some(addr) = engine.bootstrap_addr() {
            banner.push_str(&format!("mock-engine bootstrap listening on {addr}\n"));
        }
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(banner.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        engine.serve().await;
        Ok(())
    })
}
