//! Command-line flags of the `mock-engine` binary.

use std::net::SocketAddr;

use clap::Parser;

/// Longest accepted time to first token or inter-token delay. The cap keeps every
/// `Instant + delay × tokens` sum far from overflow.
pub const MAX_DELAY_MS: u64 = 3_600_000;

/// Most completion tokens one request may ask for.
pub const MAX_COMPLETION_TOKENS: u32 = 4096;

/// A fake vLLM server: OpenAI-compatible endpoints, vLLM's `/metrics`, a simple load model
/// (bounded running batch, FIFO queue, KV cache fill) and switchable faults.
/// See [`MockEngineArgs::fail_body`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FailBody {
    #[default]
    Openai,
    Flat,
    Text,
    Html,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "mock-engine", version)]
pub struct MockEngineArgs {
    /// Address to listen on. Port 0 picks a free port; the bound address is printed on
    /// stdout as `mock-engine listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Pod name, sent back on every response as `x-mock-engine: NAME`.
    #[arg(long, default_value = "mock")]
    pub name: String,

    /// A served model id (repeatable). The first one labels `/metrics`.
    #[arg(long = "model", default_value = "mock-model")]
    pub models: Vec<String>,

    /// Time to first token, counted from when the request starts running.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS))]
    pub ttft_ms: u64,

    /// Delay between two tokens of one request.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS))]
    pub itl_ms: u64,

    /// Time to first token added per other request already running when a request starts:
    /// a busier batch prefills more slowly.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS * 1000))]
    pub ttft_per_running_us: u64,

    /// Time to first token added per prompt token not found in the prefix cache.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS * 1000))]
    pub ttft_per_uncached_token_us: u64,

    /// Prefix cache size in blocks of `--prefix-block-tokens` tokens; 0 turns it off (every
    /// prompt token counts as uncached).
    #[arg(long, default_value_t = 0)]
    pub prefix_cache_blocks: u64,

    /// Tokens (words) per prefix cache block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_block_tokens: u32,

    /// Completion tokens when the request names no `max_tokens` / `max_completion_tokens`.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_COMPLETION_TOKENS)))]
    pub tokens: u32,

    /// Requests running at once; the rest wait in FIFO order.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running: u32,

    /// KV cache size in tokens; usage is the running requests' prompt and generated tokens
    /// over this.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_capacity_tokens: u64,

    /// Tokio worker threads; 1 runs a single-threaded runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// Answer every inference request with this status (200-599) and an error body.
    #[arg(long, value_parser = clap::value_parser!(u16).range(200..=599))]
    pub fail_status: Option<u16>,

    /// The error body `--fail-status` answers with: today's vLLM (`openai`, nested), older
    /// vLLM's flat `{"object":"error",...}` (`flat`), plain text, or an HTML page.
    #[arg(long, value_enum, default_value_t = FailBody::Openai)]
    pub fail_body: FailBody,

    /// Streaming: reset the connection after N SSE events. Non-streaming: reset it after
    /// reading the request, before any response byte.
    #[arg(long)]
    pub reset_after_chunks: Option<u32>,

    /// Read inference requests and never answer them.
    #[arg(long)]
    pub hang: bool,

    /// Prefill/decode disaggregation role: `prefill` serves only prefill requests and says
    /// where it left the KV blocks; `decode` serves only requests carrying those
    /// `kv_transfer_params`. Without it the engine serves whole requests.
    #[arg(long, value_enum)]
    pub role: Option<super::pd::PdRole>,

    /// The IP of the prefill pods, which the gateway must name in the handover: vLLM's
    /// `kv_transfer_params.remote_host` (decode role) and SGLang's `bootstrap_host` (both roles).
    #[arg(long, default_value = "127.0.0.1")]
    pub prefill_host: String,

    /// Which engine's prefill/decode handshake `--role` plays: vLLM's `kv_transfer_params`
    /// family (see `--kv-connector`), SGLang's bootstrap rooms, or TensorRT-LLM's
    /// `disaggregated_params`.
    #[arg(long, value_enum, default_value_t = super::pd::EngineKind::Vllm)]
    pub engine_kind: super::pd::EngineKind,

    /// vLLM only: the KV connector, which decides what the gateway hands from prefill to
    /// decode: `shfs` the prefill's `kv_transfer_params`, `nixl` the prefill's whole answer as
    /// `disagg_prefill_resp`, `mooncake` nothing (the client's body).
    #[arg(long, value_enum, default_value_t = super::pd::KvConnector::Shfs)]
    pub kv_connector: super::pd::KvConnector,

    /// SGLang prefill role: the port of the bootstrap server decodes poll for their rooms,
    /// on the `--listen` IP. 0 picks a free port; the bound address is printed on stdout as
    /// `mock-engine bootstrap listening on ADDR`, after the main listening line. Ignored
    /// by other engines and roles.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_port: u16,

    /// SGLang decode role: how long a decode waits for its bootstrap room to be prefilled
    /// before answering 504.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=MAX_DELAY_MS))]
    pub bootstrap_timeout_ms: u64,

    /// Start asleep, as after vLLM's `POST /sleep?level=1`: inference answers 503 until a
    /// `POST /wake_up`.
    #[arg(long)]
    pub sleeping: bool,

    /// How long a `POST /wake_up` takes: the engine stays asleep until this has passed.
    /// 0 wakes it at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS))]
    pub wake_delay_ms: u64,

    /// LoRA adapters loaded at start, as `NAME` or `NAME=PATH` (repeatable or
    /// comma-separated; the path defaults to `/adapters/NAME` and is never read). Requests
    /// naming one are served like the base model; more can be loaded at run time with
    /// `POST /v1/load_lora_adapter`.
    #[arg(long, value_delimiter = ',', value_parser = super::lora::LoraModule::parse)]
    pub lora_modules: Vec<super::lora::LoraModule>,

    /// vLLM's `max_loras` (adapters in one batch), reported as the `max_lora` label of
    /// `vllm:lora_requests_info` and in `/mock/stats`; not enforced.
    #[arg(long, default_value_t = 4)]
    pub max_loras: u32,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        MockEngineArgs::command().debug_assert();
    }

    #[test]
    fn defaults_and_repeated_models() {
        let args = MockEngineArgs::parse_from(["mock-engine"]);
        assert_eq!(args.models, ["mock-model"]);
        assert_eq!(args.tokens, 16);
        assert_eq!(args.max_running, 256);
        assert_eq!(args.listen.port(), 0);
        assert_eq!((args.ttft_per_running_us, args.ttft_per_uncached_token_us, args.prefix_cache_blocks), (0, 0, 0));
        assert_eq!((args.sleeping, args.wake_delay_ms), (false, 200));

        let args = MockEngineArgs::parse_from(["mock-engine", "--model", "a", "--model", "b"]);
        assert_eq!(args.models, ["a", "b"]);
        let args = MockEngineArgs::parse_from(["mock-engine", "--sleeping", "--wake-delay-ms", "0"]);
        assert_eq!((args.sleeping, args.wake_delay_ms), (true, 0));
    }

    #[test]
    fn lora_flags() {
        use super::super::lora::LoraModule;
        let args = MockEngineArgs::parse_from(["mock-engine"]);
        assert!(args.lora_modules.is_empty());
        assert_eq!(args.max_loras, 4);

        let args = MockEngineArgs::parse_from([
            "mock-engine",
            "--lora-modules",
            "sql=/models/sql,chat",
            "--lora-modules",
            "tone=/a=b",
            "--max-loras",
            "0",
        ]);
        let modules: Vec<(&str, &str)> =
            args.lora_modules.iter().map(|module| (module.name.as_str(), module.path.as_str())).collect();
        assert_eq!(modules, [("sql", "/models/sql"), ("chat", "/adapters/chat"), ("tone", "/a=b")]);
        assert_eq!(args.max_loras, 0);
        assert_eq!(LoraModule::parse("chat").map(|module| module.path), Ok("/adapters/chat".to_owned()));
    }

    #[test]
    fn pd_handshake_flags() {
        use super::super::pd::{EngineKind, KvConnector};
        let args = MockEngineArgs::parse_from(["mock-engine"]);
        assert_eq!((args.engine_kind, args.kv_connector), (EngineKind::Vllm, KvConnector::Shfs));
        assert_eq!((args.bootstrap_port, args.bootstrap_timeout_ms), (0, 3000));
        let args = MockEngineArgs::parse_from([
            "mock-engine",
            "--engine-kind",
            "trtllm",
            "--kv-connector",
            "mooncake",
            "--bootstrap-port",
            "8998",
        ]);
        assert_eq!(
            (args.engine_kind, args.kv_connector, args.bootstrap_port),
            (EngineKind::Trtllm, KvConnector::Mooncake, 8998)
        );
        let args = MockEngineArgs::parse_from(["mock-engine", "--engine-kind", "sglang", "--kv-connector", "nixl"]);
        assert_eq!((args.engine_kind, args.kv_connector), (EngineKind::Sglang, KvConnector::Nixl));
    }

    #[test]
    fn rejects_out_of_range_values() {
        for bad in [
            ["--max-running", "0"],
            ["--tokens", "5000"],
            ["--fail-status", "99"],
            ["--itl-ms", "99999999"],
            ["--engine-kind", "tgi"],
            ["--bootstrap-timeout-ms", "0"],
            ["--wake-delay-ms", "99999999"],
            ["--lora-modules", "=/path"],
            ["--lora-modules", "sql="],
            ["--max-loras", "-1"],
        ] {
            let argv = std::iter::once("mock-engine").chain(bad);
            assert!(MockEngineArgs::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
