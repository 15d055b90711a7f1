//! Everything that is not inference: health, models, metrics, vLLM's sleep mode and LoRA
//! adapter endpoints, and the `/mock/*` control endpoints tests use to steer and inspect
//! the engine.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::MockBody;
use super::faults::FaultsPatch;
use super::inference::{ReadError, read_body};
use super::lora::{LoraAdapters, Refusal};
use super::openai::{json_bytes, models_body};
use super::sleep::SleepLevel;
use super::state::EngineState;

/// Largest `/mock/faults`, `/v1/load_lora_adapter` or `/v1/unload_lora_adapter` body
/// accepted.
const MAX_CONTROL_BODY_BYTES: usize = 64 * 1024;

/// Answers a request to any path other than the inference endpoints.
pub async fn handle(state: &EngineState, request: Request<Incoming>) -> Response<MockBody> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/health") => state.respond(StatusCode::OK, "", MockBody::empty()),
        (&Method::GET, "/v1/models") => {
            state.json(StatusCode::OK, models_body(&state.models, state.max_model_len, &state.lora.loaded()))
        }
        // vLLM's version endpoint (a path operators list as a model's custom path).
        (&Method::GET, "/version") => state.json(StatusCode::OK, json_bytes(&serde_json::json!({"version": "mock"}))),
        (&Method::GET, "/metrics") => {
            state.stats.scraped();
            let lora = state.lora.snapshot();
            let text = state.metrics.render(state.first_model(), state.load.snapshot(), state.sleep.state(), &lora);
            let text = match requested_samples(request.uri().query()) {
                Some(samples) => restrict(&text, &samples),
                None => text,
            };
            state.respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", MockBody::full(text))
        }
        (&Method::GET, "/mock/stats") => {
            let mut stats = state.stats.to_json(&state.name);
            stats["pd"] = state.pd.to_json();
            stats["sleep"] = state.sleep.to_json();
            stats["lora"] = state.lora.to_json();
            state.json(StatusCode::OK, json_bytes(&stats))
        }
        // vLLM's dev-mode sleep endpoints: empty 200 answers, `level` read from the query.
        (&Method::POST, "/sleep") => {
            state.sleep.count_sleep_call();
            let level = query_value(request.uri().query(), "level");
            match SleepLevel::parse(level.as_deref().unwrap_or("1")) {
                Ok(level) => {
                    state.sleep.sleep(level);
                    state.respond(StatusCode::OK, "", MockBody::empty())
                }
                Err(message) => state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, Some("level")),
            }
        }
        (&Method::POST, "/wake_up") => {
            state.sleep.wake_up();
            state.respond(StatusCode::OK, "", MockBody::empty())
        }
        (&Method::GET, "/is_sleeping") => {
            state.json(StatusCode::OK, json_bytes(&serde_json::json!({"is_sleeping": state.sleep.is_sleeping()})))
        }
        // vLLM's runtime LoRA endpoints: a short text answer, or a vLLM error.
        (&Method::POST, "/v1/load_lora_adapter") => change_adapters(state, request, LoraAdapters::load_body).await,
        (&Method::POST, "/v1/unload_lora_adapter") => change_adapters(state, request, LoraAdapters::unload_body).await,
        (&Method::GET, "/mock/faults") => state.json(StatusCode::OK, json_bytes(&state.faults.current())),
        (&Method::POST, "/mock/faults") => update_faults(state, request).await,
        (
            _,
            "/health"
            | "/v1/models"
            | "/version"
            | "/metrics"
            | "/sleep"
            | "/wake_up"
            | "/is_sleeping"
            | "/mock/stats"
            | "/mock/faults"
            | "/v1/load_lora_adapter"
            | "/v1/unload_lora_adapter",
        ) => method_not_allowed(state),
        _ => state.error(StatusCode::NOT_FOUND, "NotFoundError", "Not Found", None),
    }
}

/// The answer to a known path asked with the wrong method.
pub fn method_not_allowed(state: &EngineState) -> Response<MockBody> {
    state.error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "Method Not Allowed", None)
}

async fn update_faults(state: &EngineState, request: Request<Incoming>) -> Response<MockBody> {
    let body = match read_body(request.into_body(), MAX_CONTROL_BODY_BYTES).await {
        Ok(body) => body,
        Err(ReadError::TooLarge | ReadError::Broken) => {
            return state.error(StatusCode::BAD_REQUEST, "BadRequestError", "unreadable body", None);
        }
    };
    let patch = match serde_json::from_slice::<FaultsPatch>(&body) {
        Ok(patch) => patch,
        Err(err) => return state.error(StatusCode::BAD_REQUEST, "BadRequestError", &err.to_string(), None),
    };
    match state.faults.apply(patch) {
        Ok(faults) => state.json(StatusCode::OK, json_bytes(&faults)),
        Err(message) => state.error(StatusCode::BAD_REQUEST, "BadRequestError", &message, None),
    }
}

/// Loads or unloads a LoRA adapter as the request's JSON body asks (`change`).
async fn change_adapters(
    state: &EngineState,
    request: Request<Incoming>,
    change: fn(&LoraAdapters, &[u8]) -> Result<String, Refusal>,
) -> Response<MockBody> {
    let body = match read_body(request.into_body(), MAX_CONTROL_BODY_BYTES).await {
        Ok(body) => body,
        Err(ReadError::TooLarge | ReadError::Broken) => {
            return state.error(StatusCode::BAD_REQUEST, "BadRequestError", "unreadable body", None);
        }
    };
    match change(&state.lora, &body) {
        Ok(text) => state.respond(StatusCode::OK, "text/plain; charset=utf-8", MockBody::full(text)),
        Err(Refusal { status, kind, message }) => state.error(status, kind, &message, None),
    }
}

/// The decoded `key=value` pairs of a query, in order.
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (percent_decoded(key), percent_decoded(value)))
}

/// The value of `key` in a query; the last one when repeated, as Starlette reads it.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query_pairs(query).filter(|(name, _)| name == key).map(|(_, value)| value).last()
}

/// The sample names a `/metrics` query asks for (`name[]=…`, as
/// prometheus_client reads it); `None` when it names none.
fn requested_samples(query: Option<&str>) -> Option<std::collections::HashSet<String>> {
    let samples: std::collections::HashSet<String> =
        query_pairs(query).filter(|(key, _)| key == "name[]").map(|(_, value)| value).collect();
    (!samples.is_empty()).then_some(samples)
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The page as prometheus_client renders it for a `name[]` query: only the
/// named samples, with the HELP and TYPE lines of their families.
fn restrict(text: &str, samples: &std::collections::HashSet<String>) -> String {
    let sample_name = |line: &str| line.split(['{', ' ']).next().unwrap_or("").to_owned();
    let kept_families: std::collections::HashSet<String> = text
        .lines()
        .filter(|line| !line.starts_with('#') && samples.contains(&sample_name(line)))
        .map(|line| family_of(&sample_name(line)).to_owned())
        .collect();
    let mut out = String::new();
    for line in text.lines() {
        let keep = match line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            Some(rest) => kept_families.contains(rest.split(' ').next().unwrap_or("")),
            None => !line.starts_with('#') && samples.contains(&sample_name(line)),
        };
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The family a sample belongs to (a histogram's `_bucket`, `_sum` and
/// `_count`, a counter's `_total`).
fn family_of(sample: &str) -> &str {
    ["_bucket", "_sum", "_count", "_total", "_created"]
        .iter()
        .find_map(|suffix| sample.strip_suffix(suffix))
        .unwrap_or(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_query_keeps_only_the_named_samples_and_their_families_headers() {
        let page = "# HELP a:x_seconds h\n# TYPE a:x_seconds histogram\na:x_seconds_bucket{le=\"1\"} 1\na:x_seconds_sum 2\na:x_seconds_count 1\n# TYPE a:y gauge\na:y 3\n";
        let asked =
            requested_samples(Some("name%5B%5D=a%3Ax_seconds_sum&name[]=a:x_seconds_count&other=1")).expect("names");
        assert_eq!(
            restrict(page, &asked),
            "# HELP a:x_seconds h\n# TYPE a:x_seconds histogram\na:x_seconds_sum 2\na:x_seconds_count 1\n"
        );
        assert_eq!(requested_samples(Some("x=1")), None);
        assert_eq!(requested_samples(None), None);
    }

    #[test]
    fn a_name_query_keeps_the_sleep_state_gauge() {
        use super::super::load::LoadSnapshot;
        use super::super::lora::LoraSnapshot;
        use super::super::metrics::EngineMetrics;
        use super::super::sleep::SleepState;

        let load = LoadSnapshot { running: 0, waiting: 0, kv_usage: 0.0 };
        let page = EngineMetrics::default().render("m", load, SleepState::DiscardAll, &LoraSnapshot::idle());
        let asked = requested_samples(Some("name[]=vllm%3Aengine_sleep_state")).expect("names");
        let kept = restrict(&page, &asked);
        let lines: Vec<&str> = kept.lines().collect();
        assert_eq!(lines.len(), 5, "{kept}");
        assert!(lines[0].starts_with("# HELP vllm:engine_sleep_state "), "{kept}");
        assert_eq!(lines[1], "# TYPE vllm:engine_sleep_state gauge");
        assert_eq!(lines[4], r#"vllm:engine_sleep_state{engine="0",model_name="m",sleep_state="discard_all"} 1.0"#);
    }

    #[test]
    fn a_name_query_keeps_the_lora_requests_gauge() {
        use super::super::load::LoadSnapshot;
        use super::super::lora::LoraSnapshot;
        use super::super::metrics::EngineMetrics;
        use super::super::sleep::SleepState;

        let load = LoadSnapshot { running: 1, waiting: 0, kv_usage: 0.5 };
        let lora = LoraSnapshot { max_loras: 2, running: vec!["sql".to_owned()], at: 1.5 };
        let page = EngineMetrics::default().render("m", load, SleepState::Awake, &lora);
        let asked = requested_samples(Some("name[]=vllm%3Alora_requests_info")).expect("names");
        assert_eq!(
            restrict(&page, &asked),
            "# HELP vllm:lora_requests_info Running stats on lora requests.\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"sql\",waiting_lora_adapters=\"\"} 1.5\n"
        );
    }

    #[test]
    fn query_values_are_decoded_and_the_last_one_wins() {
        assert_eq!(query_value(Some("level=1&mode=wait&level=%32"), "level").as_deref(), Some("2"));
        assert_eq!(query_value(Some("levels=1"), "level"), None);
        assert_eq!(query_value(None, "level"), None);
    }
}
