//! Several gateway replicas routing as one: a conversation stays on its pod
//! whichever replica each turn reaches, a replica that starts late knows the
//! conversations already running, Redis trouble fails nothing, and replicas
//! see each other's requests in flight.

use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use turnstile_tests::harness::{Engine, Gateway, PodSpec, Redis, eventually, get, open_stream, post, send};

const MODEL: &str = "fleet-model";

/// Four engines that keep a prefix cache, and their pods.
fn engines() -> (Vec<Engine>, Vec<PodSpec>) {
    let engines: Vec<Engine> =
        (0..4).map(|i| Engine::start(&format!("pod-{i}"), MODEL, &["--prefix-cache-blocks", "1000"])).collect();
    let pods = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    (engines, pods)
}

/// `n` replicas sharing `redis`, routing by prefix-cache.
async fn replicas(n: usize, pods: &[PodSpec], redis: &Redis) -> Vec<Gateway> {
    let url = redis.url();
    let mut gateways = Vec::new();
    for _ in 0..n {
        gateways.push(Gateway::start(pods, &["--redis-url", &url, "--routing-algorithm", "prefix-cache"]).await);
    }
    gateways
}

/// A multi-turn chat: each turn resends the whole history.
struct Conversation {
    messages: Vec<Value>,
    home: Option<String>,
    turns: usize,
    stayed: usize,
}

impl Conversation {
    fn new(id: usize) -> Self {
        let system = format!("You are assistant number {id}. {}", "Answer with care and in full. ".repeat(30));
        Self { messages: vec![json!({"role": "system", "content": system})], home: None, turns: 0, stayed: 0 }
    }

    /// Sends the next turn through `gw`; every request must succeed.
    async fn turn(&mut self, gw: &Gateway) {
        self.messages.push(json!({"role": "user", "content": format!("question {} on this topic", self.turns)}));
        let body = json!({"model": MODEL, "messages": self.messages, "max_tokens": 2}).to_string();
        let reply = send(post(&gw.url("/v1/chat/completions"), &body, &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let pod = reply.header("target-pod").to_owned();
        match &self.home {
            None => self.home = Some(pod),
            Some(home) => self.stayed += usize::from(*home == pod),
        }
        self.turns += 1;
        self.messages.push(json!({"role": "assistant", "content": format!("answer {}", self.turns)}));
    }

    fn follow_ups(&self) -> usize {
        self.turns.saturating_sub(1)
    }
}

/// Plays one round: the next turn of every conversation, the `k`-th through
/// replica `(k + round) % n`, then a pause a person takes to read.
async fn round(conversations: &mut [Conversation], gateways: &[&Gateway], round: usize) {
    for (k, conversation) in conversations.iter_mut().enumerate() {
        conversation.turn(gateways[(k + round) % gateways.len()]).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
}

fn tally(conversations: &[Conversation]) -> (usize, usize) {
    conversations.iter().fold((0, 0), |(s, f), c| (s + c.stayed, f + c.follow_ups()))
}

/// Each turn of a conversation reaches another replica, and still its pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_keep_each_conversation_on_its_pod() {
    let redis = Redis::start();
    let (_engines, pods) = engines();
    let gateways = replicas(4, &pods, &redis).await;
    let gateways: Vec<&Gateway> = gateways.iter().collect();
    // Each replica says so in /readyz, and has heard the other three.
    for gw in &gateways {
        eventually(Duration::from_secs(5), "replicas hear each other", || async {
            let ready: Value =
                serde_json::from_str(&send(get(&gw.admin_url("/readyz"))).await.text()).unwrap_or_default();
            ready["routing_state"]["following_decisions"] == true && ready["routing_state"]["peers"] == 3
        })
        .await;
    }
    let mut conversations: Vec<Conversation> = (0..8).map(Conversation::new).collect();
    for r in 0..5 {
        round(&mut conversations, &gateways, r).await;
    }
    let (stayed, follow_ups) = tally(&conversations);
    // Alone, each replica would put a turn it has not seen on a pod by load:
    // a quarter of them would stay.
    assert_eq!(stayed, follow_ups, "follow-up turns that moved pod: {}", follow_ups - stayed);
}

/// A replica started after the conversations began reads the others'
/// decisions before serving, and sends the next turns where they belong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_routes_known_conversations_to_their_pods() {
    let redis = Redis::start();
    let (_engines, pods) = engines();
    let first = replicas(2, &pods, &redis).await;
    let mut conversations: Vec<Conversation> = (0..6).map(Conversation::new).collect();
    for r in 0..2 {
        round(&mut conversations, &[&first[0], &first[1]], r).await;
    }
    let late = replicas(1, &pods, &redis).await;
    for conversation in &mut conversations {
        conversation.turn(&late[0]).await;
    }
    let (stayed, follow_ups) = tally(&conversations);
    assert_eq!(stayed, follow_ups, "turns the late replica moved: {}", follow_ups - stayed);
}

/// With Redis gone no request fails and conversations already known stay
/// put; once Redis is back, replicas share again within two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_fails_nothing_and_sharing_comes_back() {
    let mut redis = Redis::start();
    let (_engines, pods) = engines();
    let gateways = replicas(4, &pods, &redis).await;
    let gateways: Vec<&Gateway> = gateways.iter().collect();
    let mut known: Vec<Conversation> = (0..4).map(Conversation::new).collect();
    round(&mut known, &gateways, 0).await;

    redis.kill();
    // Every turn succeeds (asserted in `turn`), and conversations every
    // replica had heard of before keep their pods.
    for r in 1..4 {
        round(&mut known, &gateways, r).await;
    }
    let (stayed, follow_ups) = tally(&known);
    assert_eq!(stayed, follow_ups, "known conversations moved while Redis was down");
    let mut during: Vec<Conversation> = (10..14).map(Conversation::new).collect();
    for r in 0..3 {
        round(&mut during, &gateways, r).await;
    }

    redis.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut after: Vec<Conversation> = (20..28).map(Conversation::new).collect();
    for r in 0..4 {
        round(&mut after, &gateways, r).await;
    }
    let (stayed, follow_ups) = tally(&after);
    assert_eq!(stayed, follow_ups, "conversations begun after Redis came back moved: {}", follow_ups - stayed);
    for gw in &gateways {
        let log = std::fs::read_to_string(&gw.log_file).unwrap_or_default();
        assert!(log.contains("Redis unavailable for sharing routing state"), "the outage was not logged");
    }
}

/// Streams one replica holds open on a pod count for the other replicas'
/// least-request, through Redis or, without it, through the engine's own
/// count of running requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_route_around_each_others_requests_in_flight() {
    let redis = Redis::start();
    let url = redis.url();
    for shared in [true, false] {
        let engines: Vec<Engine> = ["a", "b"].iter().map(|n| Engine::start(n, MODEL, &["--itl-ms", "100"])).collect();
        let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
        let args: Vec<&str> = if shared { vec!["--redis-url", &url] } else { vec![] };
        let a = Gateway::start(&pods, &args).await;
        let b = Gateway::start(&pods, &args).await;
        // Pin three long streams to one pod through replica `a`.
        let quick =
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
        let first =
            send(post(&a.url("/v1/chat/completions"), &quick, &[("routing-strategy", "session-affinity")])).await;
        let session = first.header("x-session-id").to_owned();
        let busy = first.header("target-pod").to_owned();
        let (busy_engine, free) = if busy == "a" { (&engines[0], "b") } else { (&engines[1], "a") };
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "tell a long story"}],
            "max_tokens": 40, "stream": true})
        .to_string();
        let pin = [("routing-strategy", "session-affinity"), ("x-session-id", session.as_str())];
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(open_stream(post(&a.url("/v1/chat/completions"), &body, &pin)).await);
        }
        eventually(Duration::from_secs(5), "streams running on the busy pod", || async {
            busy_engine.stats().await["in_flight"].as_u64() == Some(3)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Replica `b` has nothing in flight itself: alone it would split evenly.
        for _ in 0..8 {
            let reply =
                send(post(&b.url("/v1/chat/completions"), &quick, &[("routing-strategy", "least-request")])).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.header("target-pod"), free, "shared through Redis: {shared}");
        }
        drop(held);
    }
}

/// The engine's count of running requests, read while another replica held
/// streams on a pod, does not keep the pod looking busy once that replica
/// says they ended: least-request uses it again at once, not only after
/// the next scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_read_busy_is_used_again_once_the_other_replica_says_its_requests_ended() {
    let redis = Redis::start();
    let url = redis.url();
    let engines: Vec<Engine> = ["a", "b"].iter().map(|n| Engine::start(n, MODEL, &["--itl-ms", "100"])).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    // Scraped every 1.5 s, a reading believed for 6 s.
    let args = ["--redis-url", url.as_str(), "--pod-metric-refresh-interval-ms", "1500"];
    let a = Gateway::start(&pods, &args).await;
    let b = Gateway::start(&pods, &args).await;
    let quick = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    let first = send(post(&a.url("/v1/chat/completions"), &quick, &[("routing-strategy", "session-affinity")])).await;
    let session = first.header("x-session-id").to_owned();
    let busy = first.header("target-pod").to_owned();
    let busy_engine = if busy == "a" { &engines[0] } else { &engines[1] };
    let story = json!({"model": MODEL, "messages": [{"role": "user", "content": "tell a long story"}],
        "max_tokens": 60, "stream": true})
    .to_string();
    let pin = [("routing-strategy", "session-affinity"), ("x-session-id", session.as_str())];
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_stream(post(&a.url("/v1/chat/completions"), &story, &pin)).await);
    }
    eventually(Duration::from_secs(5), "streams running on the busy pod", || async {
        busy_engine.stats().await["in_flight"].as_u64() == Some(3)
    })
    .await;
    // A scrape after that reads the three.
    let scrapes = busy_engine.stats().await["metrics_scrapes"].as_u64().unwrap_or(0);
    eventually(Duration::from_secs(5), "a scrape while the streams run", || async {
        busy_engine.stats().await["metrics_scrapes"].as_u64().unwrap_or(0) > scrapes
    })
    .await;
    // The reading reaches both replicas (one scrapes, the other hears it through Redis).
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The streams end well before the next scrape.
    drop(held);
    eventually(Duration::from_secs(5), "the busy pod's streams gone", || async {
        busy_engine.stats().await["in_flight"].as_u64() == Some(0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Replica `b` now splits its own streams evenly over the two idle pods.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "another story"}],
        "max_tokens": 60, "stream": true})
    .to_string();
    let mut on_busy = 0;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let stream =
            open_stream(post(&b.url("/v1/chat/completions"), &body, &[("routing-strategy", "least-request")])).await;
        assert_eq!(stream.status(), StatusCode::OK);
        on_busy += usize::from(stream.headers().get("target-pod").is_some_and(|pod| pod == busy.as_str()));
        streams.push(stream);
    }
    assert_eq!(on_busy, 2, "of 4 streams on two idle pods, the one read busy took {on_busy}");
}
