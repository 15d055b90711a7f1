//! What the mock reads from an OpenAI-style request body.
//!
//! Prompt sizes are counted while deserializing, without building a JSON tree or copying
//! the prompt: benchmarks send long prompts at high rates.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::cli::MAX_COMPLETION_TOKENS;

/// An inference endpoint the engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/messages` (Anthropic-style).
    Messages,
    /// `POST /v1/rerank`.
    Rerank,
    /// `POST /v1/classify`.
    Classify,
    /// `POST /v1/score`.
    Score,
    /// `POST /v1/images/generations`.
    ImagesGenerations,
    /// `POST /v1/video/generations`.
    VideoGenerations,
    /// `POST /v1/audio/transcriptions` (multipart upload).
    AudioTranscriptions,
    /// `POST /v1/audio/translations` (multipart upload).
    AudioTranslations,
}

impl Endpoint {
    /// Every endpoint, in the order [`Endpoint::index`] numbers them.
    pub const ALL: [Endpoint; 12] = [
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
        Endpoint::AudioTranscriptions,
        Endpoint::AudioTranslations,
    ];

    /// The endpoint served at `path`, if any.
    pub fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|endpoint| endpoint.path() == path)
    }

    /// The URL path of this endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Rerank => "/v1/rerank",
            Endpoint::Classify => "/v1/classify",
            Endpoint::Score => "/v1/score",
            Endpoint::ImagesGenerations => "/v1/images/generations",
            Endpoint::VideoGenerations => "/v1/video/generations",
            Endpoint::AudioTranscriptions => "/v1/audio/transcriptions",
            Endpoint::AudioTranslations => "/v1/audio/translations",
        }
    }

    /// Position in [`Endpoint::ALL`], for per-endpoint counters.
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|endpoint| *endpoint == self).unwrap_or(0)
    }

    /// An upload (`multipart/form-data`), not a JSON body.
    pub fn is_upload(self) -> bool {
        matches!(self, Endpoint::AudioTranscriptions | Endpoint::AudioTranslations)
    }
}

/// The fields of an inference request the mock acts on; all others are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct InferenceRequest {
    /// Requested model id; vLLM serves its first model when absent.
    pub model: Option<String>,
    /// Chat messages (`/v1/chat/completions`).
    pub messages: Option<WordCount>,
    /// Prompt (`/v1/completions`): a string, strings, or token ids.
    pub prompt: Option<WordCount>,
    /// Input (`/v1/embeddings`, `/v1/responses`).
    pub input: Option<InputCount>,
    /// System instructions (`/v1/responses`).
    pub instructions: Option<WordCount>,
    /// Query (`/v1/rerank`).
    pub query: Option<WordCount>,
    /// Documents (`/v1/rerank`).
    pub documents: Option<InputCount>,
    /// Whether to answer with server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Completion length cap (legacy name).
    pub max_tokens: Option<u64>,
    /// Completion length cap (current chat name; wins over `max_tokens`).
    pub max_completion_tokens: Option<u64>,
    /// Completion length cap of `/v1/responses`.
    pub max_output_tokens: Option<u64>,
    /// Prefill/decode disaggregation parameters (vLLM's NIXL connector).
    pub kv_transfer_params: Option<KvTransferParams>,
}

/// `stream_options` of a streaming request.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    /// Send a last chunk with token usage before `[DONE]`.
    pub include_usage: Option<bool>,
}

/// `kv_transfer_params` as the gateway's prefill request sends them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KvTransferParams {
    /// This is a prefill: the decode runs elsewhere, so return where the KV blocks are.
    pub do_remote_decode: Option<bool>,
}

impl InferenceRequest {
    /// Prompt tokens: whitespace-separated words (or token ids) over every prompt field,
    /// at least 1.
    pub fn prompt_tokens(&self) -> u64 {
        let words = [self.messages, self.prompt, self.instructions, self.query]
            .into_iter()
            .flatten()
            .map(|count| count.0)
            .chain(self.input.map(|input| input.words))
            .chain(self.documents.map(|documents| documents.words))
            .sum::<u64>();
        words.max(1)
    }

    /// Completion tokens to generate: the request's cap within 1..=4096, else `default`.
    pub fn completion_tokens(&self, default: u32) -> u32 {
        self.max_completion_tokens.or(self.max_tokens).or(self.max_output_tokens).map_or(default, |cap| {
            u32::try_from(cap.clamp(1, u64::from(MAX_COMPLETION_TOKENS))).unwrap_or(MAX_COMPLETION_TOKENS)
        })
    }

    /// Whether the answer is a stream of server-sent events.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether a stream ends with a usage chunk.
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|options| options.include_usage).unwrap_or(false)
    }

    /// Whether this is the prefill half of a disaggregated request.
    pub fn is_remote_decode_prefill(&self) -> bool {
        self.kv_transfer_params.as_ref().and_then(|params| params.do_remote_decode).unwrap_or(false)
    }

    /// Embeddings to return: one per input item, at least 1.
    pub fn embedding_count(&self) -> u64 {
        self.input.map_or(1, |input| input.items.max(1))
    }

    /// Items a pooling request scores: documents (rerank) or inputs (classify).
    pub fn pooled_items(&self) -> u64 {
        self.documents.or(self.input).map_or(1, |items| items.items.max(1))
    }
}

/// Whitespace-separated words in a prompt-like value: a string, a token id (one token), or
/// arrays and objects of those. In objects only `content` and `text` count, which covers
/// chat messages, content parts and Responses input items.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WordCount(pub u64);

impl<'de> Deserialize<'de> for WordCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WordCountVisitor)
    }
}

struct WordCountVisitor;

impl<'de> Visitor<'de> for WordCountVisitor {
    type Value = WordCount;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a prompt: text, token ids, messages or content parts")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<WordCount, E> {
        Ok(WordCount(text.split_whitespace().count() as u64))
    }

    fn visit_u64<E: de::Error>(self, _token_id: u64) -> Result<WordCount, E> {
        Ok(WordCount(1))
    }

    fn visit_i64<E: de::Error>(self, _token_id: i64) -> Result<WordCount, E> {
        Ok(WordCount(1))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<WordCount, E> {
        Ok(WordCount(0))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<WordCount, E> {
        Ok(WordCount(0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<WordCount, E> {
        Ok(WordCount(0))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WordCount, A::Error> {
        let mut words = 0;
        while let Some(WordCount(element)) = seq.next_element()? {
            words += element;
        }
        Ok(WordCount(words))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WordCount, A::Error> {
        let mut words = 0;
        while let Some(key) = map.next_key::<PromptKey>()? {
            match key {
                PromptKey::Text => words += map.next_value::<WordCount>()?.0,
                PromptKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(WordCount(words))
    }
}

/// An object key, sorted into prompt text or anything else without allocating.
enum PromptKey {
    Text,
    Other,
}

impl<'de> Deserialize<'de> for PromptKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = PromptKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<PromptKey, E> {
                Ok(match key {
                    "content" | "text" => PromptKey::Text,
                    _ => PromptKey::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// The `input` of embeddings and Responses requests: how many separate inputs it holds and
/// how many words in all. A flat array of token ids is one input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InputCount {
    /// Separate inputs (one embedding each).
    pub items: u64,
    /// Words or token ids over all inputs.
    pub words: u64,
}

impl<'de> Deserialize<'de> for InputCount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(InputCountVisitor)
    }
}

struct InputCountVisitor;

impl InputCountVisitor {
    fn single(words: WordCount) -> InputCount {
        InputCount { items: 1, words: words.0 }
    }
}

impl<'de> Visitor<'de> for InputCountVisitor {
    type Value = InputCount;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an input: text, token ids, or an array of inputs")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<InputCount, E> {
        WordCountVisitor.visit_str(text).map(Self::single)
    }

    fn visit_u64<E: de::Error>(self, token_id: u64) -> Result<InputCount, E> {
        WordCountVisitor.visit_u64(token_id).map(Self::single)
    }

    fn visit_i64<E: de::Error>(self, token_id: i64) -> Result<InputCount, E> {
        WordCountVisitor.visit_i64(token_id).map(Self::single)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<InputCount, A::Error> {
        WordCountVisitor.visit_map(map).map(Self::single)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputCount, A::Error> {
        let mut count = InputCount::default();
        let mut token_ids = 0;
        while let Some(item) = seq.next_element::<InputItem>()? {
            match item {
                InputItem::TokenId => token_ids += 1,
                InputItem::Input(WordCount(words)) => {
                    count.items += 1;
                    count.words += words;
                }
            }
        }
        if token_ids > 0 {
            count.items = count.items.max(1);
            count.words += token_ids;
        }
        Ok(count)
    }
}

/// One element of an `input` array.
enum InputItem {
    /// A bare token id: part of a single tokenized input.
    TokenId,
    /// A separate input.
    Input(WordCount),
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = InputItem;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                WordCountVisitor.expecting(f)
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<InputItem, E> {
                Ok(InputItem::TokenId)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<InputItem, E> {
                Ok(InputItem::TokenId)
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<InputItem, E> {
                WordCountVisitor.visit_f64(value).map(InputItem::Input)
            }

            fn visit_bool<E: de::Error>(self, value: bool) -> Result<InputItem, E> {
                WordCountVisitor.visit_bool(value).map(InputItem::Input)
            }

            fn visit_unit<E: de::Error>(self) -> Result<InputItem, E> {
                WordCountVisitor.visit_unit().map(InputItem::Input)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<InputItem, E> {
                WordCountVisitor.visit_str(text).map(InputItem::Input)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<InputItem, A::Error> {
                WordCountVisitor.visit_seq(seq).map(InputItem::Input)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<InputItem, A::Error> {
                WordCountVisitor.visit_map(map).map(InputItem::Input)
            }
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> InferenceRequest {
        serde_json::from_str(json).unwrap_or_else(|err| panic!("{json}: {err}"))
    }

    #[test]
    fn prompt_tokens_by_rule() {
        let cases = [
            ("chat string content", r#"{"messages":[{"role":"user","content":"a b  c"}]}"#, 3),
            (
                "chat over all messages",
                r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi there you"}]}"#,
                5,
            ),
            (
                "chat content parts count text only",
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"one two"},{"type":"image_url","image_url":{"url":"x y z"}}]}]}"#,
                2,
            ),
            ("chat null content", r#"{"messages":[{"role":"assistant","content":null}]}"#, 1),
            ("escaped whitespace", r#"{"prompt":"a\nb\tc\u0020d"}"#, 4),
            ("completion string", r#"{"prompt":"the quick brown fox"}"#, 4),
            ("completion strings", r#"{"prompt":["a b","c"]}"#, 3),
            ("completion token ids", r#"{"prompt":[1,2,3,4,5]}"#, 5),
            ("empty prompt is one token", r#"{"prompt":""}"#, 1),
            ("no prompt is one token", r#"{}"#, 1),
            ("responses input and instructions", r#"{"input":"a b","instructions":"c d e"}"#, 5),
            (
                "responses message items",
                r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"x y"}]}]}"#,
                2,
            ),
        ];
        for (name, json, expected) in cases {
            assert_eq!(parse(json).prompt_tokens(), expected, "{name}");
        }
    }

    #[test]
    fn embedding_inputs() {
        let cases = [
            ("string", r#"{"input":"a b c"}"#, 1, 3),
            ("strings", r#"{"input":["a b","c","d e f"]}"#, 3, 6),
            ("token ids are one input", r#"{"input":[5,6,7]}"#, 1, 3),
            ("token id lists", r#"{"input":[[5,6],[7]]}"#, 2, 3),
            ("missing", r#"{}"#, 1, 1),
        ];
        for (name, json, items, tokens) in cases {
            let request = parse(json);
            assert_eq!(request.embedding_count(), items, "{name}");
            assert_eq!(request.prompt_tokens(), tokens, "{name}");
        }
    }

    #[test]
    fn completion_tokens_by_rule() {
        let cases = [
            ("default", r#"{}"#, 16),
            ("max_tokens", r#"{"max_tokens":5}"#, 5),
            ("max_completion_tokens wins", r#"{"max_tokens":5,"max_completion_tokens":7}"#, 7),
            ("responses cap", r#"{"max_output_tokens":9}"#, 9),
            ("null is absent", r#"{"max_tokens":null}"#, 16),
            ("capped", r#"{"max_tokens":1000000}"#, 4096),
            ("zero becomes one", r#"{"max_tokens":0}"#, 1),
        ];
        for (name, json, expected) in cases {
            assert_eq!(parse(json).completion_tokens(16), expected, "{name}");
        }
    }

    #[test]
    fn stream_flags() {
        let request = parse(r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(request.is_stream() && request.include_usage());
        let request = parse(r#"{"stream":null,"stream_options":null}"#);
        assert!(!request.is_stream() && !request.include_usage());
    }

    #[test]
    fn rejects_malformed_bodies() {
        for json in ["", "{", r#"{"max_tokens":-1}"#, r#"{"stream":"yes"}"#] {
            assert!(serde_json::from_str::<InferenceRequest>(json).is_err(), "{json}");
        }
    }

    #[test]
    fn endpoints_round_trip() {
        for (index, endpoint) in Endpoint::ALL.into_iter().enumerate() {
            assert_eq!(Endpoint::from_path(endpoint.path()), Some(endpoint));
            assert_eq!(endpoint.index(), index);
        }
        assert_eq!(Endpoint::from_path("/v1/chat"), None);
    }
}
