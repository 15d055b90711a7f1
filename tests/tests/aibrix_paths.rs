//! Issue 17, item 1: every inference path AIBrix routes and vLLM serves,
//! against the real binary and mock engines: the JSON paths by the `model` in
//! their body, the audio uploads by their `model` form field (streamed to the
//! pod, checked there byte for byte, in bounded gateway memory), and the
//! paths a model lists in `model.aibrix.ai/model-router-custom-paths`.

use std::time::Duration;

use http::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turnstile_tests::harness::{Engine, Gateway, PodSpec, get, post, rss_kib, send};

const MODEL: &str = "whisper-ish";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_path_is_routed_by_the_model_in_its_body() {
    let (a, b) = (Engine::start("a", MODEL, &[]), Engine::start("b", MODEL, &[]));
    let pods = [PodSpec::for_engine(&a, MODEL), PodSpec::for_engine(&b, MODEL)];
    let gw = Gateway::start(&pods, &["--routing-algorithm", "least-request"]).await;
    let cases = [
        (
            "/v1/messages",
            serde_json::json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
            "content",
        ),
        ("/v1/rerank", serde_json::json!({"model": MODEL, "query": "q", "documents": ["a", "b", "c"]}), "results"),
        ("/v1/classify", serde_json::json!({"model": MODEL, "input": ["good", "bad"]}), "data"),
        ("/v1/score", serde_json::json!({"model": MODEL, "text_1": "a", "text_2": ["b", "c"]}), "data"),
        ("/v1/images/generations", serde_json::json!({"model": MODEL, "prompt": "a cat"}), "data"),
        ("/v1/video/generations", serde_json::json!({"model": MODEL, "prompt": "a cat"}), "data"),
    ];
    for (path, body, field) in &cases {
        let reply = send(post(&gw.url(path), &body.to_string(), &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert!(["a", "b"].contains(&reply.header("target-pod")), "{path} names its pod");
        assert!(!reply.json()[field].is_null(), "{path}: the engine's answer arrives: {}", reply.text());
    }
    let rerank = send(post(&gw.url("/v1/rerank"), &cases[1].1.to_string(), &[])).await;
    assert_eq!(rerank.json()["results"].as_array().map(Vec::len), Some(3), "{}", rerank.text());
    let served = a.requests_total().await + b.requests_total().await;
    assert_eq!(served, cases.len() as u64 + 1);

    // AIBrix's checks for the new paths, before any engine is asked.
    let refused = [
        ("/v1/rerank", serde_json::json!({"model": MODEL, "query": "q", "documents": []}), "documents"),
        ("/v1/classify", serde_json::json!({"model": MODEL, "input": ""}), "input"),
        ("/v1/messages", serde_json::json!({"model": MODEL, "messages": []}), "messages"),
    ];
    for (path, body, param) in refused {
        let reply = send(post(&gw.url(path), &body.to_string(), &[])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(reply.json()["error"]["param"], param, "{path}: {}", reply.text());
        assert_eq!(reply.header("x-error-request-body-processing"), "true");
    }
    assert_eq!(a.requests_total().await + b.requests_total().await, served);
}

/// A multipart form: `fields`, then a file part of `file_bytes` bytes.
struct Form {
    boundary: &'static str,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Form {
    fn new(fields: &[(&str, &str)]) -> Self {
        let boundary = "----turnstile-test-7MA4YWxkTrZu0gW";
        let mut head = Vec::new();
        for (name, value) in fields {
            head.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                    .as_bytes(),
            );
        }
        head.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"speech.wav\"\r\n\
                 Content-Type: audio/wav\r\n\r\n"
            )
            .as_bytes(),
        );
        Self { boundary, head, tail: format!("\r\n--{boundary}--\r\n").into_bytes() }
    }
}

/// Chunk `index` of a file: bytes that differ from chunk to chunk and never
/// repeat the boundary.
fn file_chunk(index: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31).wrapping_add(index.wrapping_mul(7)) % 251) as u8).collect()
}

/// What a raw HTTP/1.1 exchange returned.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

/// Posts an upload of `chunks` file chunks of `chunk_len` bytes to `path`
/// over a raw connection (the file is made as it is sent, never held), with
/// `Expect: 100-continue` as curl sends it, and returns the answer and the
/// file's SHA-256.
async fn upload(gw: &Gateway, path: &str, form: &Form, chunks: usize, chunk_len: usize) -> (Raw, String) {
    let length = form.head.len() + chunks * chunk_len + form.tail.len();
    let mut stream = TcpStream::connect(gw.proxy).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: multipart/form-data; boundary={}\r\n\
         Content-Length: {length}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        form.boundary
    );
    let mut hasher = Sha256::new();
    let send = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&form.head).await?;
        for index in 0..chunks {
            let chunk = file_chunk(index, chunk_len);
            hasher.update(&chunk);
            stream.write_all(&chunk).await?;
        }
        stream.write_all(&form.tail).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(120), send).await.expect("in time").expect("exchange");
    let text = String::from_utf8_lossy(&answer).into_owned();
    // As curl does for large uploads, the request asked to continue: the
    // interim answer comes first.
    let text = text.strip_prefix("HTTP/1.1 100 Continue\r\n\r\n").unwrap_or(&text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (Raw { status, head: head.to_ascii_lowercase(), body: body.to_owned() }, format!("{:x}", hasher.finalize()))
}

/// The JSON of a chunked or plain HTTP/1.1 body (one JSON object in it).
fn json_in(body: &str) -> serde_json::Value {
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |i| i + 1);
    serde_json::from_str(body.get(start..end).unwrap_or("")).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audio_upload_is_routed_by_its_model_field_and_arrives_byte_for_byte() {
    let engine = Engine::start("a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &["--max-body-bytes", "65536"]).await;

    // A 3 MB file through a gateway that holds at most 64 KiB of a body.
    let form = Form::new(&[("model", MODEL), ("language", "en")]);
    let (reply, sha) = upload(&gw, "/v1/audio/transcriptions", &form, 48, 65536).await;
    assert_eq!(reply.status, 200, "{}{}", reply.head, reply.body);
    assert!(reply.head.contains("target-pod: a"), "{}", reply.head);
    let answer = json_in(&reply.body);
    let received = &answer["mock_upload"];
    assert_eq!(received["file_sha256"], sha.as_str(), "{answer}");
    assert_eq!(received["file_bytes"], 48 * 65536);
    assert_eq!(received["fields"]["language"], "en");

    // Streamed: the engine's server-sent events, to the end.
    let form = Form::new(&[("model", MODEL), ("stream", "true")]);
    let (reply, sha) = upload(&gw, "/v1/audio/translations", &form, 4, 1000).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.head.contains("content-type: text/event-stream"), "{}", reply.head);
    assert!(reply.body.contains(&sha) && reply.body.contains("data: [DONE]"), "{}", reply.body);

    // AIBrix's answers to uploads it cannot route.
    let json = send(post(&gw.url("/v1/audio/transcriptions"), &format!(r#"{{"model":"{MODEL}"}}"#), &[])).await;
    assert_eq!(json.status, StatusCode::BAD_REQUEST);
    assert_eq!(json.json()["error"]["message"], "audio requests must use multipart/form-data content-type");
    let (no_model, _) = upload(&gw, "/v1/audio/transcriptions", &Form::new(&[("language", "en")]), 1, 100).await;
    assert_eq!(no_model.status, 400);
    assert!(no_model.head.contains("x-error-multipart-parsing: true"), "{}", no_model.head);
    assert_eq!(json_in(&no_model.body)["error"]["message"], "'model' is a required property");
    let (unknown, _) = upload(&gw, "/v1/audio/transcriptions", &Form::new(&[("model", "nope")]), 1, 100).await;
    assert_eq!((unknown.status, json_in(&unknown.body)["error"]["code"].as_str()), (400, Some("model_not_found")));
    assert_eq!(engine.requests_total().await, 2, "only the routable uploads reached the engine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_upload_streams_through_in_bounded_gateway_memory() {
    let engine = Engine::start("a", MODEL, &[]);
    let gw = Gateway::start(&[PodSpec::for_engine(&engine, MODEL)], &[]).await;
    let form = Form::new(&[("model", MODEL)]);
    // Warm up whatever the first upload initialises, then take the baseline.
    let (warm, _) = upload(&gw, "/v1/audio/transcriptions", &form, 16, 65536).await;
    assert_eq!(warm.status, 200, "{}", warm.body);
    let pid = gw.proc.pid();
    let baseline = rss_kib(pid);

    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = std::sync::Arc::clone(&sampling);
        tokio::spawn(async move {
            let mut peak = 0;
            // Bounded: at most 120 s of samples.
            for _ in 0..12_000 {
                if !sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                peak = peak.max(rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    let (reply, sha) = upload(&gw, "/v1/audio/transcriptions", &form, 1600, 65536).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.expect("sampler");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let received = &json_in(&reply.body)["mock_upload"];
    assert_eq!((received["file_bytes"].as_u64(), received["file_sha256"].as_str()), (Some(1600 * 65536), Some(&*sha)));
    let growth_kib = peak.saturating_sub(baseline);
    assert!(growth_kib < 20 * 1024, "RSS grew {growth_kib} KiB (from {baseline} KiB) for a 100 MiB upload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_serves_the_custom_paths_its_pods_list() {
    let (a, b) = (Engine::start("a", MODEL, &[]), Engine::start("b", "other", &[]));
    let pods = [
        PodSpec::for_engine(&a, MODEL).annotation("model.aibrix.ai/model-router-custom-paths", "/version, /tokenize"),
        PodSpec::for_engine(&b, "other"),
    ];
    let gw = Gateway::start(&pods, &[]).await;
    let version = |model: &str| {
        let mut request = get(&gw.url("/version"));
        request.headers_mut().insert("model", model.parse().expect("header"));
        request
    };
    // Any method; the model from the `model` header, as AIBrix's model router matches it.
    let reply = send(version(MODEL)).await;
    assert_eq!((reply.status, reply.header("target-pod")), (StatusCode::OK, "a"), "{}", reply.text());
    assert_eq!(reply.json()["version"], "mock");
    // Not a path of the other model, and never one without a listing.
    let other = send(version("other")).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{}", other.text());
    let unlisted = send(get(&gw.url("/versions"))).await;
    assert_eq!(unlisted.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.header("x-mock-engine"), "a", "engine a answered");
}
