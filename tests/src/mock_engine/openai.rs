//! Response bodies in the shapes vLLM's OpenAI server sends.
//!
//! Token text is written straight into the output buffer (`collect_str`), so neither a
//! completion nor a stream chunk builds intermediate strings.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Serialize, Serializer};

use super::lora::LoadedAdapter;
use super::request::Endpoint;

/// The last event of every stream.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// Hands out response ids unique within this process and unlikely to repeat across engines.
#[derive(Debug)]
pub struct ResponseIds {
    salt: u32,
    next: AtomicU64,
}

impl ResponseIds {
    /// A generator with a random salt.
    pub fn new() -> Self {
        Self { salt: rand::random(), next: AtomicU64::new(0) }
    }

    fn next(&self, prefix: &'static str) -> ResponseId {
        ResponseId { prefix, salt: self.salt, seq: self.next.fetch_add(1, Ordering::Relaxed) }
    }
}

impl Default for ResponseIds {
    fn default() -> Self {
        Self::new()
    }
}

/// An id such as `chatcmpl-1a2b3c4d0000000000000007`.
#[derive(Debug, Clone, Copy)]
struct ResponseId {
    prefix: &'static str,
    salt: u32,
    seq: u64,
}

impl fmt::Display for ResponseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:08x}{:016x}", self.prefix, self.salt, self.seq)
    }
}

impl Serialize for ResponseId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Tokens `first..first + count` as text: `tok3 tok4 tok5`, with a leading space unless the
/// run starts at token 0, so that concatenated stream deltas equal the whole completion.
#[derive(Debug, Clone, Copy)]
struct TokenText {
    first: u32,
    count: u32,
}

impl fmt::Display for TokenText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for index in self.first..self.first.saturating_add(self.count) {
            if index > 0 {
                f.write_str(" ")?;
            }
            write!(f, "tok{index}")?;
        }
        Ok(())
    }
}

impl Serialize for TokenText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Token counts of a finished request, in the Chat/Completions shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Generated tokens.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

impl Usage {
    /// Usage of `prompt_tokens` in and `completion_tokens` out.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Where a prefill left its KV blocks, returned so the gateway can pass it to the decode.
#[derive(Debug, Clone, Serialize)]
pub struct KvTransferOut {
    do_remote_prefill: bool,
    do_remote_decode: bool,
    remote_block_ids: Vec<u64>,
    remote_engine_id: String,
    remote_host: String,
    remote_port: u16,
    /// Names this transfer; a decode engine checks it was made for its prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_request_id: Option<String>,
}

impl KvTransferOut {
    /// The parameters of a prefill done by engine `name` at `addr`.
    pub fn new(name: &str, addr: SocketAddr) -> Self {
        Self {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_block_ids: vec![0],
            remote_engine_id: name.to_owned(),
            remote_host: addr.ip().to_string(),
            remote_port: addr.port(),
            remote_request_id: None,
        }
    }

    /// The parameters of prefill `transfer_id` by engine `name`, which knows itself as
    /// `host:port` and keeps the prompt in `block_ids`.
    pub fn transfer(name: &str, host: &str, port: u16, block_ids: Vec<u64>, transfer_id: String) -> Self {
        Self {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_block_ids: block_ids,
            remote_engine_id: name.to_owned(),
            remote_host: host.to_owned(),
            remote_port: port,
            remote_request_id: Some(transfer_id),
        }
    }
}

/// What a prefill engine adds to its one-token answer, as its engine's handshake asks.
/// Empty for a handshake that hands nothing back (vLLM with Mooncake, SGLang).
#[derive(Debug, Default)]
pub struct PrefillAnswer {
    /// vLLM's `kv_transfer_params`: where the KV blocks are.
    pub kv_transfer: Option<KvTransferOut>,
    /// The answer's `id` instead of a generated one (vLLM with NIXL names the transfer in
    /// it, and the gateway hands the whole answer to the decode).
    pub id: Option<String>,
    /// TensorRT-LLM: the prompt's token ids, at the top level.
    pub prompt_token_ids: Option<Vec<u64>>,
    /// TensorRT-LLM: `choices[0].disaggregated_params`, which the decode needs.
    pub disaggregated_params: Option<serde_json::Value>,
}

impl PrefillAnswer {
    /// An answer carrying vLLM's `kv_transfer_params`.
    pub fn kv(kv_transfer: KvTransferOut) -> Self {
        Self { kv_transfer: Some(kv_transfer), ..Self::default() }
    }
}

/// A completion's `id`: generated, or named by a prefill handshake.
#[derive(Clone, Copy)]
enum BodyId<'a> {
    Generated(ResponseId),
    Named(&'a str),
}

impl Serialize for BodyId<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            BodyId::Generated(id) => id.serialize(serializer),
            BodyId::Named(id) => serializer.serialize_str(id),
        }
    }
}

/// What every body of one generation request shares: id, creation time, model, shape.
#[derive(Debug)]
pub struct Completion {
    endpoint: Endpoint,
    id: ResponseId,
    created: u64,
    model: String,
    completion_tokens: u32,
}

impl Completion {
    /// A new completion for `endpoint`, answering as `model`.
    pub fn new(ids: &ResponseIds, endpoint: Endpoint, model: String, completion_tokens: u32) -> Self {
        let prefix = match endpoint {
            Endpoint::ChatCompletions => "chatcmpl",
            Endpoint::Completions => "cmpl",
            Endpoint::Embeddings => "embd",
            Endpoint::Responses => "resp",
            Endpoint::Messages => "msg",
            Endpoint::Rerank => "rerank",
            Endpoint::Classify => "classify",
            Endpoint::Score => "score",
            Endpoint::ImagesGenerations => "img",
            Endpoint::VideoGenerations => "video",
            Endpoint::AudioTranscriptions | Endpoint::AudioTranslations => "trsc",
        };
        Self { endpoint, id: ids.next(prefix), created: unix_seconds(), model, completion_tokens }
    }

    /// The non-streaming answer with all tokens, and what a prefill adds to it.
    pub fn full_body(&self, usage: Usage, prefill: Option<&PrefillAnswer>) -> Bytes {
        let text = TokenText { first: 0, count: self.completion_tokens };
        let choice = Choice {
            disaggregated_params: prefill.and_then(|p| p.disaggregated_params.as_ref()),
            ..Choice::ending(Some("length"))
        };
        let (object, choice) = match self.endpoint {
            Endpoint::ChatCompletions => (
                "chat.completion",
                Choice { message: Some(Message { role: Some("assistant"), content: text }), ..choice },
            ),
            _ => ("text_completion", Choice { text: Some(text), ..choice }),
        };
        let id = prefill.and_then(|p| p.id.as_deref()).map_or(BodyId::Generated(self.id), BodyId::Named);
        json_bytes(&CompletionBody {
            id,
            object,
            created: self.created,
            model: &self.model,
            choices: &[choice],
            usage: Some(usage),
            kv_transfer_params: prefill.and_then(|p| p.kv_transfer.as_ref()),
            prompt_token_ids: prefill.and_then(|p| p.prompt_token_ids.as_deref()),
        })
    }

    /// The SSE event carrying token `index`.
    pub fn token_event(&self, index: u32) -> Bytes {
        let text = TokenText { first: index, count: 1 };
        let last = index.saturating_add(1) >= self.completion_tokens;
        let choice = Choice::ending(last.then_some("length"));
        let (object, choice) = match self.endpoint {
            Endpoint::ChatCompletions => (
                "chat.completion.chunk",
                Choice { delta: Some(Message { role: (index == 0).then_some("assistant"), content: text }), ..choice },
            ),
            _ => ("text_completion", Choice { text: Some(text), ..choice }),
        };
        sse_event(&CompletionBody {
            id: BodyId::Generated(self.id),
            object,
            created: self.created,
            model: &self.model,
            choices: &[choice],
            usage: None,
            kv_transfer_params: None,
            prompt_token_ids: None,
        })
    }

    /// The SSE event with token usage that ends a stream when `include_usage` is set.
    pub fn usage_event(&self, usage: Usage) -> Bytes {
        let object = match self.endpoint {
            Endpoint::ChatCompletions => "chat.completion.chunk",
            _ => "text_completion",
        };
        sse_event(&CompletionBody {
            id: BodyId::Generated(self.id),
            object,
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(usage),
            kv_transfer_params: None,
            prompt_token_ids: None,
        })
    }

    /// The `/v1/responses` answer.
    pub fn response_body(&self, usage: Usage) -> Bytes {
        json_bytes(&ResponseBody {
            id: self.id,
            object: "response",
            created_at: self.created,
            status: "completed",
            model: &self.model,
            output: [OutputMessage {
                kind: "message",
                id: ResponseId { prefix: "msg", ..self.id },
                status: "completed",
                role: "assistant",
                content: [OutputText {
                    kind: "output_text",
                    text: TokenText { first: 0, count: self.completion_tokens },
                    annotations: [],
                }],
            }],
            usage: ResponseUsage {
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                total_tokens: usage.total_tokens,
            },
        })
    }

    /// The answer of the pooling, generation and Anthropic-style endpoints,
    /// in vLLM's shape for each (`items`: documents, inputs or pairs).
    pub fn other_body(&self, usage: Usage, items: u64) -> Bytes {
        let text = TokenText { first: 0, count: self.completion_tokens }.to_string();
        let (id, model, created) = (self.id.to_string(), self.model.as_str(), self.created);
        let pooled = serde_json::json!({"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens});
        let indexes = 0..items.max(1);
        let body = match self.endpoint {
            Endpoint::Messages => serde_json::json!({
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens},
            }),
            Endpoint::Rerank => serde_json::json!({
                "id": id, "model": model, "usage": {"total_tokens": usage.prompt_tokens},
                "results": indexes.map(|i| serde_json::json!({"index": i, "relevance_score": 1.0 / (i + 1) as f64})).collect::<Vec<_>>(),
            }),
            Endpoint::Classify => serde_json::json!({
                "id": id, "object": "list", "created": created, "model": model, "usage": pooled,
                "data": indexes.map(|i| serde_json::json!({"index": i, "label": "positive", "probs": [0.1, 0.9], "num_classes": 2})).collect::<Vec<_>>(),
            }),
            Endpoint::Score => serde_json::json!({
                "id": id, "object": "list", "created": created, "model": model, "usage": pooled,
                "data": indexes.map(|i| serde_json::json!({"index": i, "object": "score", "score": 0.5})).collect::<Vec<_>>(),
            }),
            _ => serde_json::json!({"created": created, "data": [{"b64_json": "AAAA", "revised_prompt": text}]}),
        };
        json_bytes(&body)
    }

    /// The `/v1/embeddings` answer: `items` deterministic 8-dimensional vectors.
    pub fn embeddings_body(&self, items: u64, prompt_tokens: u64) -> Bytes {
        json_bytes(&EmbeddingsBody {
            id: self.id,
            object: "list",
            created: self.created,
            model: &self.model,
            data: Embeddings(items),
            usage: EmbeddingUsage { prompt_tokens, total_tokens: prompt_tokens },
        })
    }
}

#[derive(Serialize)]
struct CompletionBody<'a> {
    id: BodyId<'a>,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_transfer_params: Option<&'a KvTransferOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<&'a [u64]>,
}

impl Choice<'_> {
    /// The first choice, with no content yet, ending for `finish_reason`.
    fn ending(finish_reason: Option<&'static str>) -> Self {
        Self {
            index: 0,
            message: None,
            delta: None,
            text: None,
            logprobs: None,
            finish_reason,
            disaggregated_params: None,
        }
    }
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<TokenText>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disaggregated_params: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
struct Message {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: TokenText,
}

#[derive(Serialize)]
struct ResponseBody<'a> {
    id: ResponseId,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    model: &'a str,
    output: [OutputMessage; 1],
    usage: ResponseUsage,
}

#[derive(Serialize)]
struct OutputMessage {
    #[serde(rename = "type")]
    kind: &'static str,
    id: ResponseId,
    status: &'static str,
    role: &'static str,
    content: [OutputText; 1],
}

#[derive(Serialize)]
struct OutputText {
    #[serde(rename = "type")]
    kind: &'static str,
    text: TokenText,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct ResponseUsage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct EmbeddingsBody<'a> {
    id: ResponseId,
    object: &'static str,
    created: u64,
    model: &'a str,
    data: Embeddings,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

/// `count` embedding objects, generated while serializing.
struct Embeddings(u64);

impl Serialize for Embeddings {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Embedding {
            object: &'static str,
            index: u64,
            embedding: [f32; 8],
        }
        serializer.collect_seq((0..self.0).map(|index| {
            let mut embedding = [0.0_f32; 8];
            for (dimension, value) in (0_u64..).zip(embedding.iter_mut()) {
                // Deterministic and distinct per input; the values mean nothing.
                *value = ((index + dimension) % 8) as f32 / 8.0;
            }
            Embedding { object: "embedding", index, embedding }
        }))
    }
}

/// vLLM's error body: `{"error":{"message","type","param","code"}}`.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

impl<'a> ErrorBody<'a> {
    /// An error of `kind` (vLLM's exception name, e.g. `BadRequestError`) with `status`.
    pub fn new(status: u16, kind: &'a str, message: &'a str, param: Option<&'a str>) -> Self {
        Self { error: ErrorDetail { message, kind, param, code: status } }
    }

    /// The JSON bytes.
    pub fn to_bytes(&self) -> Bytes {
        json_bytes(self)
    }
}

/// `GET /v1/models`, as vLLM lists its models: the base `models` (`max_model_len` long,
/// `root` their name, no `parent`), then the loaded LoRA `adapters` (`root` their path,
/// `parent` the first base model, no `max_model_len`). Base models keep `created` 0;
/// adapters give their load time.
pub fn models_body(models: &[String], max_model_len: u64, adapters: &[LoadedAdapter]) -> Bytes {
    #[derive(Serialize)]
    struct Model<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'static str,
        root: &'a str,
        parent: Option<&'a str>,
        max_model_len: Option<u64>,
        permission: [Permission; 1],
    }
    /// vLLM's `ModelPermission` with its defaults.
    #[derive(Serialize)]
    struct Permission {
        /// vLLM draws a random one per listing; here it is the card's position.
        id: String,
        object: &'static str,
        created: u64,
        allow_create_engine: bool,
        allow_sampling: bool,
        allow_logprobs: bool,
        allow_search_indices: bool,
        allow_view: bool,
        allow_fine_tuning: bool,
        organization: &'static str,
        group: Option<&'static str>,
        is_blocking: bool,
    }
    #[derive(Serialize)]
    struct ModelList<'a> {
        object: &'static str,
        data: Vec<Model<'a>>,
    }
    let permission = |index: usize, created: u64| Permission {
        id: format!("modelperm-{index:032x}"),
        object: "model_permission",
        created,
        allow_create_engine: false,
        allow_sampling: true,
        allow_logprobs: true,
        allow_search_indices: false,
        allow_view: true,
        allow_fine_tuning: false,
        organization: "*",
        group: None,
        is_blocking: false,
    };
    let parent = models.first().map(String::as_str);
    let base = models.iter().map(|id| (id.as_str(), 0, id.as_str(), None, Some(max_model_len)));
    let adapters =
        adapters.iter().map(|adapter| (adapter.name.as_str(), adapter.created, adapter.path.as_str(), parent, None));
    let data = base
        .chain(adapters)
        .enumerate()
        .map(|(index, (id, created, root, parent, max_model_len))| Model {
            id,
            object: "model",
            created,
            owned_by: "vllm",
            root,
            parent,
            max_model_len,
            permission: [permission(index, created)],
        })
        .collect();
    json_bytes(&ModelList { object: "list", data })
}

/// `value` as JSON bytes.
pub fn json_bytes<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    // The bodies here are plain structs, strings and numbers, which always serialize.
    let _ = serde_json::to_writer(&mut out, value);
    Bytes::from(out)
}

/// `value` as one server-sent event: `data: {json}\n\n`.
fn sse_event<T: Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn completion(endpoint: Endpoint, tokens: u32) -> Completion {
        Completion::new(&ResponseIds::new(), endpoint, "m\"x".to_owned(), tokens)
    }

    fn parse_event(event: &[u8]) -> Value {
        let text = std::str::from_utf8(event).unwrap();
        let json = text.strip_prefix("data: ").unwrap().strip_suffix("\n\n").unwrap();
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn chat_completion_shape() {
        let body: Value =
            serde_json::from_slice(&completion(Endpoint::ChatCompletions, 3).full_body(Usage::new(4, 3), None))
                .unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "m\"x");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["choices"][0]["message"], json!({"role":"assistant","content":"tok0 tok1 tok2"}));
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"], json!({"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}));
        assert!(body.get("kv_transfer_params").is_none());
    }

    #[test]
    fn a_prefill_answer_adds_its_handshake_fields() {
        let prefill = PrefillAnswer {
            id: Some("chatcmpl-p0-0-00000000000000ff".to_owned()),
            prompt_token_ids: Some(vec![7, 8]),
            disaggregated_params: Some(json!({"request_type": "context_only"})),
            ..PrefillAnswer::default()
        };
        let body: Value = serde_json::from_slice(
            &completion(Endpoint::ChatCompletions, 1).full_body(Usage::new(2, 1), Some(&prefill)),
        )
        .unwrap();
        assert_eq!(body["id"], "chatcmpl-p0-0-00000000000000ff");
        assert_eq!(body["prompt_token_ids"], json!([7, 8]));
        assert_eq!(body["choices"][0]["disaggregated_params"], json!({"request_type": "context_only"}));
        assert_eq!(body["choices"][0]["message"]["content"], "tok0");
        assert!(body.get("kv_transfer_params").is_none());

        let plain: Value =
            serde_json::from_slice(&completion(Endpoint::Completions, 1).full_body(Usage::new(2, 1), None)).unwrap();
        assert!(plain.get("prompt_token_ids").is_none() && plain["choices"][0].get("disaggregated_params").is_none());
    }

    #[test]
    fn stream_deltas_concatenate_to_the_completion() {
        let completion = completion(Endpoint::ChatCompletions, 3);
        let events: Vec<Value> = (0..3).map(|i| parse_event(&completion.token_event(i))).collect();
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(events[1]["choices"][0]["delta"].get("role").is_none());
        assert_eq!(events[1]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(events[2]["choices"][0]["finish_reason"], "length");
        let text: String =
            events.iter().map(|event| event["choices"][0]["delta"]["content"].as_str().unwrap()).collect();
        assert_eq!(text, "tok0 tok1 tok2");

        let usage = parse_event(&completion.usage_event(Usage::new(1, 3)));
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 4);
    }

    #[test]
    fn text_completion_shapes() {
        let completion = completion(Endpoint::Completions, 2);
        let body: Value = serde_json::from_slice(&completion.full_body(Usage::new(1, 2), None)).unwrap();
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], "tok0 tok1");
        let event = parse_event(&completion.token_event(1));
        assert_eq!(event["choices"][0]["text"], " tok1");
    }

    #[test]
    fn responses_and_embeddings_shapes() {
        let body: Value =
            serde_json::from_slice(&completion(Endpoint::Responses, 2).response_body(Usage::new(3, 2))).unwrap();
        assert_eq!(body["object"], "response");
        assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(body["output"][0]["content"][0]["text"], "tok0 tok1");
        assert_eq!(body["usage"], json!({"input_tokens":3,"output_tokens":2,"total_tokens":5}));

        let body: Value = serde_json::from_slice(&completion(Endpoint::Embeddings, 0).embeddings_body(2, 5)).unwrap();
        assert_eq!(body["object"], "list");
        assert_eq!(body["data"][1]["index"], 1);
        assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 8);
        assert_eq!(body["usage"], json!({"prompt_tokens":5,"total_tokens":5}));
    }

    #[test]
    fn models_list_base_models_then_adapters_with_their_parent() {
        let adapter = LoadedAdapter { name: "sql".to_owned(), path: "/adapters/sql".to_owned(), created: 7 };
        let body: Value =
            serde_json::from_slice(&models_body(&["a".to_owned(), "b".to_owned()], 4096, &[adapter])).unwrap();
        assert_eq!(body["object"], "list");
        let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a", "b", "sql"]);
        assert_eq!(
            body["data"][1],
            json!({"id": "b", "object": "model", "created": 0, "owned_by": "vllm", "root": "b", "parent": null,
                "max_model_len": 4096, "permission": [{"id": "modelperm-00000000000000000000000000000001",
                "object": "model_permission", "created": 0, "allow_create_engine": false, "allow_sampling": true,
                "allow_logprobs": true, "allow_search_indices": false, "allow_view": true,
                "allow_fine_tuning": false, "organization": "*", "group": null, "is_blocking": false}]})
        );
        let sql = &body["data"][2];
        assert_eq!(
            (&sql["root"], &sql["parent"], &sql["max_model_len"], &sql["created"]),
            (&json!("/adapters/sql"), &json!("a"), &Value::Null, &json!(7))
        );
        assert_eq!(sql["permission"][0]["created"], 7);
    }

    #[test]
    fn error_body_shape() {
        let body: Value = serde_json::from_slice(
            &ErrorBody::new(404, "NotFoundError", "The model `x` does not exist.", Some("model")).to_bytes(),
        )
        .unwrap();
        assert_eq!(
            body,
            json!({"error":{"message":"The model `x` does not exist.","type":"NotFoundError","param":"model","code":404}})
        );
    }
}
