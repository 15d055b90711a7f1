//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the test
//! that replays their seed corpora (`gateway-user/tests/fuzz_corpus.rs`).
//!
//! Each takes arbitrary bytes, runs one parser the way the gateway runs it on
//! untrusted input, and asserts what must hold for every input. Not part of
//! the gateway's API.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use crate::discovery::{PodStore, pods_file};
use crate::engine_metrics;
use crate::metrics::Metrics;
use crate::profiles::{self, ModelConfig, RequestFeatures};
use crate::proxy::pd::body::TopLevel;
use crate::proxy::pd::engine;
use crate::proxy::request::{self, Endpoint};
use crate::proxy::usage::{self, UsageTap};
use crate::routing::pd::{Handshake, KvConnector};
use crate::routing::{Router, RoutingConfig};

/// Every endpoint with a JSON body.
const ENDPOINTS: [Endpoint; 10] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Messages,
    Endpoint::Rerank,
    Endpoint::Classify,
    Endpoint::Score,
    Endpoint::ImagesGenerations,
    Endpoint::VideoGenerations,
];

/// Longest prompt the request-body target tokenizes (keeps executions fast).
const MAX_TOKENIZED_BYTES: usize = 4096;

/// The request body probe: the first byte picks the endpoint, the rest is
/// the body a client sent.
pub fn request_body(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let endpoint = ENDPOINTS[usize::from(selector) % ENDPOINTS.len()];
    if let Ok(parsed) = request::ParsedRequest::parse(endpoint, Bytes::copy_from_slice(body)) {
        assert!(!parsed.model.trim().is_empty(), "a blank model was accepted");
        let prompt = parsed.prompt();
        if prompt.len() <= MAX_TOKENIZED_BYTES {
            assert!(crate::tokens::count_tokens(prompt) >= 0);
        }
    }
}

/// The usage tap on a response body: the first byte picks the content type
/// and the frame size. The same body must report the same usage whether it
/// arrives in one frame or in many.
pub fn sse_usage(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let content_type = match selector % 3 {
        0 => "text/event-stream; charset=utf-8",
        1 => "application/json",
        _ => "text/plain",
    };
    let piece = usize::from(selector / 3).max(1);
    let whole = tap(content_type, body, body.len().max(1));
    let framed = tap(content_type, body, piece);
    assert_eq!(whole, framed, "usage depends on frame boundaries (frames of {piece} bytes)");
    let _ = usage::parse_usage_json(body);
}

fn tap(content_type: &str, body: &[u8], piece: usize) -> Option<usage::Usage> {
    let mut tap = UsageTap::for_content_type(Some(content_type));
    for frame in body.chunks(piece) {
        tap.observe(&Bytes::copy_from_slice(frame));
    }
    tap.finish()
}

/// The `model.aibrix.ai/config` annotation, then profile choice and the
/// strategy precedence on what it parsed to.
pub fn config_annotation(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = ModelConfig::parse(text) else { return };
    assert!(!config.profiles.is_empty(), "a config without profiles was accepted");
    let len = i64::try_from(text.len()).unwrap_or(i64::MAX);
    let features = RequestFeatures { prompt_tokens: Some(len), max_tokens: Some(len % 5000) };
    let first = config.profiles.keys().next().map(String::as_str);
    for header in [None, Some("auto"), Some("default"), first] {
        let resolved = profiles::resolve_profile(Some(&config), header, || features);
        let _ = resolved.profile.and_then(profiles::Profile::rps_cap);
        let strategy = profiles::resolve_strategy(Some(&config), resolved.profile, None, "least-request");
        assert!(!strategy.trim().is_empty(), "a blank strategy was chosen");
        // A strategy name from an annotation is looked up like any other.
        let _ = router().strategy(strategy);
    }
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| Router::new(&RoutingConfig::default(), &Metrics::new().routing))
}

/// A pods file, loaded into a pod store as discovery does.
pub fn pods_file(data: &[u8]) {
    static STORE: OnceLock<PodStore> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(pods) = pods_file::parse_pods(text) else { return };
    for pod in &pods {
        assert!(!pod.model.trim().is_empty(), "a pod without a model was kept");
        assert_eq!(pod.key, format!("{}/{}", pod.namespace, pod.name));
        assert!(!pod.ready || pod.addr.is_some(), "a ready pod without an address");
        if let Some(config) = &pod.config_annotation {
            config_annotation(config.as_bytes());
        }
    }
    STORE.get_or_init(|| PodStore::new(Arc::new(Metrics::new()))).replace_all(pods);
}

/// An engine `/metrics` page, read with each engine's names as the scraper
/// reads it. What parses holds finite values only, and reads the same with
/// `\r\n` line endings.
pub fn engine_metrics_page(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for engine in ["vllm", "sglang"] {
        let names = engine_metrics::for_engine(engine);
        let Ok(scraped) = engine_metrics::parse(text, names) else { continue };
        let engine_metrics::Scraped {
            running,
            waiting,
            kv_cache_usage,
            gpu_cache_usage,
            time_to_first_token,
            time_per_output_token,
            e2e_latency,
            queue_time,
            prefill_time,
            prompt_tokens,
            generation_tokens,
            prefix_cache_queries,
            prefix_cache_hits,
            awake,
            lora,
        } = scraped;
        let histograms = [time_to_first_token, time_per_output_token, e2e_latency, queue_time, prefill_time];
        let values = [running, waiting, kv_cache_usage, gpu_cache_usage, prompt_tokens, generation_tokens]
            .into_iter()
            .chain([prefix_cache_queries, prefix_cache_hits, awake, lora.map(|l| l.reported)])
            .chain(histograms.iter().flat_map(|h| [h.map(|h| h.sum), h.map(|h| h.count)]));
        for value in values.flatten() {
            assert!(value.is_finite(), "{engine}: a non-finite value was read: {scraped:?}");
        }
        if !text.contains('\r') {
            let crlf = text.replace('\n', "\r\n");
            assert_eq!(engine_metrics::parse(&crlf, names), Ok(scraped), "{engine}: CRLF endings read differently");
        }
    }
}

/// A `pd` pair's bodies: the first byte picks the engine and the endpoint;
/// the rest is a client's body, then (after the first NUL) the prefill
/// pod's answer, both untrusted. Whatever the gateway writes from them is a
/// JSON object, and a prefill always asks for one token without streaming.
pub fn pd_bodies(data: &[u8]) {
    const HANDSHAKES: [Handshake; 6] = [
        Handshake::Vllm(KvConnector::Shfs),
        Handshake::Vllm(KvConnector::Nixl),
        Handshake::Vllm(KvConnector::Mooncake),
        Handshake::Sglang { bootstrap_port: 8998 },
        Handshake::TrtLlm,
        Handshake::Plain,
    ];
    let Some((&selector, rest)) = data.split_first() else { return };
    let handshake = HANDSHAKES[usize::from(selector) % HANDSHAKES.len()];
    let endpoint = if selector & 0x80 == 0 { Endpoint::ChatCompletions } else { Endpoint::Completions };
    let (client, answer) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(top) = TopLevel::parse(client) else { return };
    let client = Bytes::copy_from_slice(client);
    let object = |bytes: &[u8]| {
        let parsed = serde_json::from_slice::<serde_json::Value>(bytes);
        assert!(matches!(parsed, Ok(serde_json::Value::Object(_))), "{handshake:?}: not a JSON object: {parsed:?}");
        match parsed {
            Ok(serde_json::Value::Object(object)) => object,
            _ => serde_json::Map::new(),
        }
    };
    let Ok(bodies) = engine::bodies(handshake, &top, &client, "10.0.0.1", 7) else { return };
    let prefill = object(&bodies.prefill);
    assert_eq!(prefill.get("max_tokens"), Some(&serde_json::Value::from(1)), "{handshake:?}");
    assert_eq!(prefill.get("stream"), Some(&serde_json::Value::Bool(false)), "{handshake:?}");
    if let Some(decode) = &bodies.decode {
        object(decode);
    }
    if let Ok(decode) = engine::decode_body(handshake, endpoint, &top, &client, answer, "10.0.0.1") {
        object(&decode);
    }
}
