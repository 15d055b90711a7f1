//! SGLang's handshake: both halves carry `bootstrap_host`, `bootstrap_port` and
//! `bootstrap_room`; the prefill registers the room in its bootstrap server, and the decode
//! waits until the room shows up there for the same prompt.

use serde_json::{Value, json};

use super::super::openai::PrefillAnswer;
use super::{Checked, CompletionCap, PdOutcome, PdRequest, PdRole, PdState, RoomWait, check_prefill_budget};
use super::{prompt_digest, quote};

/// Why a decode needs the bootstrap host and port.
const NO_BOOTSTRAP_SERVER: &str = "SGLang would not know which prefill's bootstrap server to ask for the KV cache";

impl PdState {
    pub(super) fn sglang_prefill(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let body = request.body;
        let host = present(request, "bootstrap_host", "the decode could not find this prefill's bootstrap server")?;
        if host.as_str() != Some(self.prefill_host.as_str()) {
            return Err(format!("bootstrap_host is {}, not the prefill pod's IP {}", quote(host), self.prefill_host));
        }
        let port = present(request, "bootstrap_port", "the decode could not find this prefill's bootstrap server")?;
        if port.as_u64().is_none() || port.as_u64() != self.bootstrap_port.map(u64::from) {
            let own = self.bootstrap_port.map_or_else(|| "(none)".to_owned(), |port| port.to_string());
            return Err(format!("bootstrap_port is {}, not this pod's bootstrap port {own}", quote(port)));
        }
        let room = bootstrap_room(present(request, "bootstrap_room", "the decode would wait for it forever")?)?;
        check_prefill_budget(body, CompletionCap::OneIfPresent)?;
        self.rooms.register(room, prompt_digest(body));
        let record = self.record(PdRole::Prefill, request, json!({"bootstrap_room": room.to_string()}));
        Ok(Checked::Accepted(PdOutcome::Prefilled(PrefillAnswer::default()), record))
    }

    pub(super) fn sglang_decode(&self, request: &PdRequest<'_>) -> Result<Checked, String> {
        let host = present(request, "bootstrap_host", NO_BOOTSTRAP_SERVER)?;
        let port = present(request, "bootstrap_port", NO_BOOTSTRAP_SERVER)?;
        let room = present(request, "bootstrap_room", "SGLang would wait for it forever")?;
        let Some(host) = host.as_str().filter(|host| *host == self.prefill_host) else {
            return Err(format!("bootstrap_host is {}, not the prefill pod's IP {}", quote(host), self.prefill_host));
        };
        let Some(port) = port.as_u64().and_then(|port| u16::try_from(port).ok()).filter(|port| *port > 0) else {
            return Err(format!("bootstrap_port must be a port number, got {}", quote(port)));
        };
        let room = bootstrap_room(room)?;
        let record = self.record(PdRole::Decode, request, json!({"bootstrap_room": room.to_string()}));
        let digest = prompt_digest(request.body);
        Ok(Checked::Pending(RoomWait { host: host.to_owned(), port, room, digest, record }))
    }
}

/// The value of `name`, or why its absence (or null) is wrong.
fn present<'a>(request: &PdRequest<'a>, name: &str, why: &str) -> Result<&'a Value, String> {
    match request.body.get(name) {
        Some(value) if !value.is_null() => Ok(value),
        _ => Err(format!("{name} missing: {why}")),
    }
}

/// A bootstrap room: a non-negative integer that fits i64 (SGLang's and AIBrix's type),
/// never a float.
fn bootstrap_room(value: &Value) -> Result<u64, String> {
    value
        .as_i64()
        .and_then(|room| u64::try_from(room).ok())
        .ok_or_else(|| format!("bootstrap_room must be a non-negative integer that fits i64, got {}", quote(value)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;
    use tokio::net::TcpListener;

    use super::super::super::request::Endpoint;
    use super::super::test_support::*;
    use super::super::{Handshake, serve_bootstrap};
    use super::*;

    const ROOM: u64 = 9_007_199_254_740_993; // 2^53 + 1: a float would round it.

    fn engine(role: PdRole, bootstrap_port: u16, timeout_ms: u64) -> PdState {
        PdState::new(Some(role), "p0", 7000, "127.0.0.1")
            .with_handshake(Handshake::Sglang)
            .with_bootstrap((role == PdRole::Prefill).then_some(bootstrap_port), Duration::from_millis(timeout_ms))
    }

    /// The client's body with the bootstrap fields a gateway adds to both halves.
    fn decode_body(port: u16) -> Value {
        changed(&client_chat(), &json!({"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": ROOM}))
    }

    #[test]
    fn prefill_checks_the_bootstrap_fields_and_registers_the_room() {
        let prefill = engine(PdRole::Prefill, 8998, 0);
        let body = prefill_of(&decode_body(8998), true);
        assert!(matches!(check(&prefill, &body), Ok(PdOutcome::Prefilled(_))));
        assert!(prefill.rooms().get(ROOM).is_some(), "registered");
        let stats = prefill.to_json();
        assert_eq!(stats["transfers"][0]["bootstrap_room"], ROOM.to_string());
        assert_eq!(stats["transfers"][0]["engine"], "sglang");
        assert_eq!(stats["transfers"][0]["connector"], Value::Null);
        assert_rejected(
            &prefill,
            Endpoint::ChatCompletions,
            &body,
            "prefill pod: ",
            &[
                (json!({"bootstrap_host": null}), "bootstrap_host missing"),
                (
                    json!({"bootstrap_host": "10.0.0.9"}),
                    "bootstrap_host is \"10.0.0.9\", not the prefill pod's IP 127.0.0.1",
                ),
                (json!({"bootstrap_port": null}), "bootstrap_port missing"),
                (json!({"bootstrap_port": 8999}), "bootstrap_port is 8999, not this pod's bootstrap port 8998"),
                (json!({"bootstrap_port": "8998"}), "not this pod's bootstrap port"),
                (json!({"bootstrap_room": null}), "bootstrap_room missing"),
                (json!({"bootstrap_room": -1}), "bootstrap_room must be a non-negative integer that fits i64, got -1"),
                (json!({"bootstrap_room": 1.5}), "bootstrap_room must be a non-negative integer"),
                (json!({"bootstrap_room": u64::MAX}), "fits i64"),
                (json!({"stream": true}), "stream must be false"),
                (json!({"max_completion_tokens": 4}), "max_completion_tokens must be 1"),
            ],
        );
        assert_eq!(prefill.to_json()["rejected"], 11);
        assert_eq!(prefill.rooms().len(), 1, "rejected prefills register nothing");
    }

    #[test]
    fn decode_checks_the_bootstrap_fields() {
        let decode = engine(PdRole::Decode, 0, 10);
        let body = decode_body(8998);
        let Ok(PdOutcome::AwaitRoom(wait)) = check(&decode, &body) else { panic!("a valid decode waits") };
        assert_eq!((wait.host.as_str(), wait.port, wait.room), ("127.0.0.1", 8998, ROOM));
        assert_eq!(wait.record["stream"], true);
        assert_eq!(decode.to_json()["accepted"], 0, "not until the room shows up");
        assert_rejected(
            &decode,
            Endpoint::ChatCompletions,
            &body,
            "decode pod: ",
            &[
                (json!({"bootstrap_room": null}), "bootstrap_room missing: SGLang would wait for it forever"),
                (json!({"bootstrap_host": null}), "bootstrap_host missing"),
                (json!({"bootstrap_port": null}), "bootstrap_port missing"),
                (json!({"bootstrap_host": "localhost"}), "bootstrap_host is \"localhost\", not the prefill pod's IP"),
                (json!({"bootstrap_port": 70000}), "bootstrap_port must be a port number, got 70000"),
                (json!({"bootstrap_room": "5"}), "bootstrap_room must be a non-negative integer"),
            ],
        );
        assert_eq!(decode.to_json()["rejected"], 6);
    }

    #[tokio::test]
    async fn decode_waits_for_its_room_on_the_prefills_bootstrap_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let prefill = engine(PdRole::Prefill, port, 0);
        let server = tokio::spawn(serve_bootstrap(listener, prefill.rooms()));
        let decode = engine(PdRole::Decode, 0, 2000);

        // The decode comes first; the prefill registers the room while it polls.
        let Ok(PdOutcome::AwaitRoom(wait)) = check(&decode, &decode_body(port)) else { panic!("waits") };
        let prefill_body = prefill_of(&decode_body(port), true);
        let (waited, prefilled) = tokio::join!(decode.await_room(wait), async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            check(&prefill, &prefill_body)
        });
        assert!(matches!(prefilled, Ok(PdOutcome::Prefilled(_))));
        assert_eq!(waited, Ok(()));
        let stats = decode.to_json();
        assert_eq!((stats["accepted"].as_u64(), stats["rejected"].as_u64()), (Some(1), Some(0)));
        assert_eq!(stats["transfers"][0]["bootstrap_room"], ROOM.to_string());

        // A room prefilled for another prompt is refused at once.
        let mut other = decode_body(port);
        other["messages"] = json!([{"role": "user", "content": "something else"}]);
        let Ok(PdOutcome::AwaitRoom(wait)) = check(&decode, &other) else { panic!("waits") };
        let (status, message) = decode.await_room(wait).await.expect_err("another prompt");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(message, format!("decode pod: bootstrap room {ROOM} was prefilled for another prompt"));
        server.abort();
    }

    #[tokio::test]
    async fn decode_gives_up_on_a_room_never_prefilled() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let prefill = engine(PdRole::Prefill, port, 0);
        let server = tokio::spawn(serve_bootstrap(listener, prefill.rooms()));
        let decode = engine(PdRole::Decode, 0, 60);
        let Ok(PdOutcome::AwaitRoom(wait)) = check(&decode, &decode_body(port)) else { panic!("waits") };
        let started = std::time::Instant::now();
        let (status, message) = decode.await_room(wait).await.expect_err("never prefilled");
        assert!(started.elapsed() >= Duration::from_millis(60) && started.elapsed() < Duration::from_secs(1));
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(message, format!("decode pod: bootstrap room {ROOM} was never prefilled within 60 ms"));
        let stats = decode.to_json();
        assert_eq!((stats["accepted"].as_u64(), stats["rejected"].as_u64()), (Some(0), Some(1)));
        assert_eq!(stats["last_rejection"], message);
        server.abort();

        // Nobody listening at all: the same answer.
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        drop(closed);
        let Ok(PdOutcome::AwaitRoom(wait)) = check(&decode, &decode_body(closed_port)) else { panic!("waits") };
        let (status, _) = decode.await_room(wait).await.expect_err("no bootstrap server");
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    }
}
