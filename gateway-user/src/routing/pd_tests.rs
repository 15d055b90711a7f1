use super::*;
use crate::discovery::pod::KV_CONNECTOR_LABEL;
use crate::profiles::{ModelConfig, PodPdProfiles};
use crate::routing::test_support::*;

/// Pod `p<i>` (key `default/p<i>`, so [`view`] readings reach it) of
/// `roleset` in `role`, with `in_flight` requests.
fn pd_pod(i: u16, roleset: &str, role: Role, in_flight: usize) -> (Arc<PodInfo>, Vec<crate::discovery::InFlightGuard>) {
    let (base, guards) = pod(i, in_flight);
    let mut info = (*base).clone();
    let role_name = match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Combined => "worker",
    };
    info.name = format!("{roleset}-{role_name}-{i}");
    info.roleset = Some(roleset.to_owned());
    info.labels.insert(ROLESET_LABEL.to_owned(), roleset.to_owned());
    info.labels.insert(ROLE_LABEL.to_owned(), role_name.to_owned());
    info.role = role;
    (Arc::new(info), guards)
}

fn p(i: u16, roleset: &str, role: Role) -> Arc<PodInfo> {
    pd_pod(i, roleset, role, 0).0
}

/// `pod` with its own `model.aibrix.ai/config` (as the annotation's JSON).
fn with_config(pod: Arc<PodInfo>, config: &str) -> Arc<PodInfo> {
    let mut info = Arc::unwrap_or_clone(pod);
    let config = ModelConfig::parse(config).expect("config");
    info.pd.profiles = Some(Arc::new(PodPdProfiles::of(&config)));
    Arc::new(info)
}

/// A config whose default profile takes prompts of `min..=max` tokens.
fn bucket(min: i64, max: i64) -> String {
    format!(
        r#"{{"profiles":{{"default":{{"routingStrategy":"pd","routingConfig":{{"promptLenBucketMinLength":{min},"promptLenBucketMaxLength":{max}}}}}}}}}"#
    )
}

const COMBINED: &str = r#"{"profiles":{"default":{"routingConfig":{"combined":true}}}}"#;

fn with(pod: Arc<PodInfo>, change: impl FnOnce(&mut PodInfo)) -> Arc<PodInfo> {
    let mut info = Arc::unwrap_or_clone(pod);
    change(&mut info);
    Arc::new(info)
}

fn router_with(pd: PdSettings) -> PdRouter {
    let config = RoutingConfig { prefix_cache_block_size: 4, pd, ..RoutingConfig::default() };
    PdRouter::new(&config, Arc::new(PrefixHasher::new(&config)))
}

fn router() -> PdRouter {
    router_with(PdSettings::default())
}

fn bucketing() -> PdRouter {
    router_with(PdSettings { prompt_length_bucketing: true, ..PdSettings::default() })
}

fn pair(route: Result<PdRoute, PdRefusal>) -> PdPlan {
    match route {
        Ok(PdRoute::Pair(plan)) => plan,
        other => panic!("expected a pair, got {other:?}"),
    }
}

fn answering(route: Result<PdRoute, PdRefusal>) -> String {
    match route {
        Ok(PdRoute::Pair(plan)) => format!("{}+{}", plan.prefill.name, plan.decode.name),
        Ok(PdRoute::Combined(pod)) => pod.name.clone(),
        Err(refusal) => format!("refused: {refusal}"),
    }
}

#[test]
fn only_complete_rolesets_of_pods_with_a_roleset_label_are_eligible() {
    let r = router();
    let model = model();
    let request = RouteRequest::new(&model, b"hello there");
    let not_ready = |pod: Arc<PodInfo>| with(pod, |p| p.ready = false);
    // No roleset label: in no roleset, as in AIBrix.
    let orphan = with(p(4, "x", Role::Prefill), |p| p.roleset = None);
    let pods = vec![
        // rs-new is idle but its decode pod is still starting.
        p(0, "rs-new", Role::Prefill),
        not_ready(p(1, "rs-new", Role::Decode)),
        pd_pod(2, "rs-old", Role::Prefill, 3).0,
        pd_pod(3, "rs-old", Role::Decode, 3).0,
        orphan,
    ];
    for _ in 0..20 {
        let plan = pair(r.plan(&request, &pods));
        assert_eq!((plan.roleset.as_str(), plan.prefill.name.as_str()), ("rs-old", "rs-old-prefill-2"));
        assert_eq!(plan.decode.name, "rs-old-decode-3");
    }
    let half = vec![p(0, "a", Role::Prefill), p(1, "b", Role::Decode), pod(2, 0).0];
    assert_eq!(
        r.plan(&request, &half).err().map(|e| e.to_string()).as_deref(),
        Some("no roleset has a ready prefill and a ready decode pod (ready prefill pods: 1, ready decode pods: 1)")
    );
}

#[test]
fn a_roleset_mixing_engines_is_skipped_and_named_when_it_was_the_only_one() {
    let r = router();
    let model = model();
    let request = RouteRequest::new(&model, b"x");
    let sglang = |pod: Arc<PodInfo>| with(pod, |p| p.engine = "sglang".into());
    let mixed = vec![p(0, "mixed", Role::Prefill), sglang(p(1, "mixed", Role::Decode))];
    let refusal = r.plan(&request, &mixed).expect_err("only a mixed roleset");
    assert_eq!(
        refusal.to_string(),
        "inconsistent LLM engines detected: pod mixed-prefill-0 has vllm, pod mixed-decode-1 has sglang"
    );
    let mut pods = mixed;
    pods.extend([sglang(p(2, "sg", Role::Prefill)), sglang(p(3, "sg", Role::Decode))]);
    for _ in 0..10 {
        let plan = pair(r.plan(&request, &pods));
        assert_eq!(plan.roleset, "sg");
        assert_eq!(plan.handshake, Handshake::Sglang { bootstrap_port: 0 });
    }
}

#[test]
fn the_handshake_follows_the_engine_and_the_prefill_pods_connector() {
    let model = model();
    let request = RouteRequest::new(&model, b"x");
    let plan_with = |r: &PdRouter, engine: &str, connector: Option<&str>| {
        let prefill = with(p(0, "rs", Role::Prefill), |pod| {
            pod.engine = engine.into();
            pod.pd.kv_connector = connector.map(str::to_owned);
            pod.pd.bootstrap_port = 8998;
        });
        let decode = with(p(1, "rs", Role::Decode), |pod| pod.engine = engine.into());
        pair(r.plan(&request, &[prefill, decode])).handshake
    };
    let r = router();
    assert_eq!(plan_with(&r, "vllm", None), Handshake::Vllm(KvConnector::Shfs));
    assert_eq!(plan_with(&r, "vllm", Some("NIXL")), Handshake::Vllm(KvConnector::Nixl));
    assert_eq!(plan_with(&r, "vllm", Some("mooncake")), Handshake::Vllm(KvConnector::Mooncake));
    assert_eq!(plan_with(&r, "vllm", Some("rdma")), Handshake::Vllm(KvConnector::Shfs), "unknown: the default");
    let nixl = router_with(PdSettings { kv_connector: KvConnector::Nixl, ..PdSettings::default() });
    assert_eq!(plan_with(&nixl, "vllm", None), Handshake::Vllm(KvConnector::Nixl));
    assert_eq!(plan_with(&r, "sglang", None), Handshake::Sglang { bootstrap_port: 8998 });
    assert_eq!(plan_with(&r, "trtllm", None), Handshake::TrtLlm);
    assert_eq!(plan_with(&r, "xllm", None), Handshake::Plain);
    let _ = KV_CONNECTOR_LABEL;
}

/// Rolesets `short` (0..=100 tokens) and `long` (101..=8192), and a combined pod.
fn bucketed_fleet(with_combined: bool) -> Vec<Arc<PodInfo>> {
    let mut pods = vec![
        with_config(p(0, "short", Role::Prefill), &bucket(0, 100)),
        with_config(p(1, "short", Role::Decode), &bucket(0, 100)),
        with_config(p(2, "long", Role::Prefill), &bucket(101, 8192)),
        with_config(p(3, "long", Role::Decode), &bucket(101, 8192)),
    ];
    if with_combined {
        pods.push(with_config(p(4, "whole", Role::Combined), COMBINED));
    }
    pods
}

#[test]
fn buckets_take_exactly_their_prompt_lengths_and_the_rest_goes_to_a_combined_pod() {
    let r = bucketing();
    let model = model();
    let route = |tokens: i64, pods: &[Arc<PodInfo>]| {
        answering(r.plan(&RouteRequest::new(&model, b"x").with_prompt_tokens(Some(tokens)), pods))
    };
    let pods = bucketed_fleet(true);
    for (tokens, expected) in [
        (0, "short-prefill-0+short-decode-1"),
        (100, "short-prefill-0+short-decode-1"),
        (101, "long-prefill-2+long-decode-3"),
        (8192, "long-prefill-2+long-decode-3"),
        (8193, "whole-worker-4"),
    ] {
        assert_eq!(route(tokens, &pods), expected, "{tokens} tokens");
    }
    let without_combined = bucketed_fleet(false);
    assert_eq!(
        route(8193, &without_combined),
        "refused: no prompt-length bucket matches prompt length 8193 and no combined pods available"
    );
    // Bucketing off: every roleset takes every length.
    let plain = router();
    let request = RouteRequest::new(&model, b"x").with_prompt_tokens(Some(9000));
    assert!(matches!(plain.plan(&request, &without_combined), Ok(PdRoute::Pair(_))));
}

#[test]
fn a_bucket_whose_decode_pods_are_down_falls_back_to_the_combined_pod() {
    let r = bucketing();
    let model = model();
    let request = RouteRequest::new(&model, b"x").with_prompt_tokens(Some(50));
    let mut pods = bucketed_fleet(true);
    pods[1] = with(Arc::clone(&pods[1]), |p| p.ready = false);
    for _ in 0..10 {
        assert_eq!(answering(r.plan(&request, &pods)), "whole-worker-4");
    }
    // Not the other bucket's roleset: it is sized for other prompts.
    pods.pop();
    assert_eq!(
        answering(r.plan(&request, &pods)),
        "refused: no prompt-length bucket matches prompt length 50 and no combined pods available"
    );
}

#[test]
fn a_pod_is_bucketed_by_its_own_profile_for_the_requests_profile() {
    let r = bucketing();
    let model = model();
    let profiles = r#"{"defaultProfile":"small","profiles":{
        "small":{"routingConfig":{"promptLenBucketMaxLength":10}},
        "big":{"routingConfig":{"promptLenBucketMinLength":11}},
        "never":{"routingConfig":{"promptLenBucketMinLength":5,"promptLenBucketMaxLength":4}}}}"#;
    let pods = vec![with_config(p(0, "rs", Role::Prefill), profiles), with_config(p(1, "rs", Role::Decode), profiles)];
    let routes = |profile: &str, tokens: i64| {
        let request = RouteRequest::new(&model, b"x").with_prompt_tokens(Some(tokens)).with_profile(profile, None);
        r.plan(&request, &pods).is_ok()
    };
    assert!(routes("small", 10) && !routes("small", 11));
    assert!(routes("big", 11) && !routes("big", 10));
    assert!(routes("no-such-profile", 3) && !routes("no-such-profile", 30), "the pod's default profile");
    assert!(!routes("never", 4) && !routes("never", 5), "a minimum above the maximum takes nothing");
    // A pod without a config takes any length.
    let bare = vec![p(0, "rs", Role::Prefill), p(1, "rs", Role::Decode)];
    let request = RouteRequest::new(&model, b"x").with_prompt_tokens(Some(1_000_000));
    assert!(r.plan(&request, &bare).is_ok());
}

#[test]
fn an_idle_combined_pod_takes_requests_while_the_bucket_is_backed_up() {
    let r = bucketing();
    let model = model();
    let pods = bucketed_fleet(true);
    let reading = |waiting: f64| Some(fresh(|m| (m.waiting, m.requests_finished_per_second) = (Some(waiting), Some(10.0))));
    // The short bucket's decode pod would take 5 s to drain; the combined pod is idle.
    let metrics = view(vec![reading(0.0), reading(50.0), reading(0.0), reading(0.0), reading(0.0)]);
    let request = RouteRequest::new(&model, b"x").with_prompt_tokens(Some(20)).with_metrics(metrics);
    assert_eq!(answering(r.plan(&request, &pods)), "whole-worker-4");
    let calm = view(vec![reading(0.0), reading(5.0), reading(0.0), reading(0.0), reading(0.0)]);
    let request = RouteRequest::new(&model, b"x").with_prompt_tokens(Some(20)).with_metrics(calm);
    assert_eq!(answering(r.plan(&request, &pods)), "short-prefill-0+short-decode-1");
}

#[test]
fn a_prefill_spread_past_the_limit_sends_the_request_to_the_idlest_prefill_pod_and_its_roleset() {
    let r = router();
    let model = model();
    let request = RouteRequest::new(&model, b"x");
    let (busy, _g) = pd_pod(0, "a", Role::Prefill, 17);
    let pods = vec![busy, p(1, "a", Role::Decode), p(2, "b", Role::Prefill), pd_pod(3, "b", Role::Decode, 4).0];
    for _ in 0..10 {
        assert_eq!(pair(r.plan(&request, &pods)).roleset, "b");
    }
}

#[test]
fn decode_imbalance_goes_to_the_idlest_slowest_or_fastest_draining_pod() {
    let r = router();
    let model = model();
    let pods = vec![p(0, "a", Role::Prefill), p(1, "a", Role::Decode), p(2, "b", Role::Prefill), p(3, "b", Role::Decode)];
    let decode_pick = |metrics: Vec<Option<PodMetrics>>| {
        let request = RouteRequest::new(&model, b"x").with_metrics(view(metrics));
        pair(r.plan(&request, &pods)).decode.name.clone()
    };
    // (a) Requests: the engine counts 20 on b's decode pod and none on a's.
    let _busy: Vec<_> = (0..20).map(|_| pods[3].load.start()).collect();
    let ready = || Some(fresh(|_| {}));
    assert_eq!(decode_pick(vec![None, ready(), None, ready()]), "a-decode-1");
    drop(_busy);
    // (b) Throughput: 3000 tokens/s apart, the slower pod takes it.
    let thr = |t: f64| Some(fresh(|m| m.generation_tokens_per_second = Some(t)));
    assert_eq!(decode_pick(vec![None, thr(3500.0), None, thr(100.0)]), "b-decode-3");
    // (c) Time to drain: same requests, one drains four times faster.
    let _running: Vec<_> = [1, 3].iter().flat_map(|&i| (0..4).map(move |_| i)).map(|i| pods[i].load.start()).collect();
    let drain = |rate: f64| Some(fresh(|m| m.requests_finished_per_second = Some(rate)));
    assert_eq!(decode_pick(vec![None, drain(1.0), None, drain(4.0)]), "b-decode-3");
}

#[test]
fn decode_policies_score_as_aibrix_does() {
    let model = model();
    // One roleset, two decode pods: A runs 2 with its KV cache 95% full, B runs 3 with 10%.
    let pods = vec![p(0, "rs", Role::Prefill), p(1, "rs", Role::Decode), p(2, "rs", Role::Decode)];
    let _a: Vec<_> = (0..2).map(|_| pods[1].load.start()).collect();
    let _b: Vec<_> = (0..3).map(|_| pods[2].load.start()).collect();
    let kv = |usage: f64| Some(fresh(|m| m.kv_cache_usage = Some(usage)));
    let metrics = || view(vec![None, kv(0.95), kv(0.10)]);
    let pick = |r: &PdRouter, profile: Option<&crate::profiles::Profile>| {
        let request = RouteRequest::new(&model, b"x").with_metrics(metrics()).with_profile("default", profile);
        r.plan(&request, &pods).map(|route| answering(Ok(route)))
    };
    let r = router();
    assert_eq!(pick(&r, None).as_deref(), Ok("rs-prefill-0+rs-decode-2"), "load_balancing weighs free KV cache");
    let least = router_with(PdSettings { decode_score_policy: DecodePolicy::LeastRequest, ..PdSettings::default() });
    assert_eq!(pick(&least, None).as_deref(), Ok("rs-prefill-0+rs-decode-1"));
    // A profile's decodeScorePolicy overrides the flag; an unknown one refuses.
    let config =
        ModelConfig::parse(r#"{"profiles":{"default":{"routingConfig":{"decodeScorePolicy":"least_request"}},
            "typo":{"routingConfig":{"decodeScorePolicy":"fastest"}}}}"#)
            .expect("config");
    assert_eq!(pick(&r, config.profiles.get("default")).as_deref(), Ok("rs-prefill-0+rs-decode-1"));
    let refusal = pick(&r, config.profiles.get("typo")).expect_err("unknown policy");
    assert!(refusal.to_string().starts_with("unknown decodeScorePolicy \"fastest\""), "{refusal}");
}

#[test]
fn conductor_decode_prefers_the_pod_with_the_shorter_time_between_tokens() {
    let r = router_with(PdSettings { decode_score_policy: DecodePolicy::Conductor, ..PdSettings::default() });
    let model = model();
    let pods = vec![p(0, "rs", Role::Prefill), p(1, "rs", Role::Decode), p(2, "rs", Role::Decode)];
    let thr = |t: f64| Some(fresh(|m| m.generation_tokens_per_second = Some(t)));
    let request = RouteRequest::new(&model, b"x").with_metrics(view(vec![None, thr(10.0), thr(100.0)]));
    assert_eq!(pair(r.plan(&request, &pods)).decode.name, "rs-decode-2");
}

#[test]
fn a_decode_pod_without_a_reading_competes_as_a_warm_idle_pod() {
    let r = router();
    let model = model();
    let pods = vec![p(0, "a", Role::Prefill), p(1, "a", Role::Decode), p(2, "b", Role::Prefill), p(3, "b", Role::Decode)];
    // a's decode pod was just scraped and is fully used; b's has no reading yet.
    let full = Some(fresh(|m| m.kv_cache_usage = Some(1.0)));
    let _running: Vec<_> = (0..3).map(|_| pods[1].load.start()).collect();
    let request = RouteRequest::new(&model, b"x").with_metrics(view(vec![None, full, None, None]));
    assert_eq!(pair(r.plan(&request, &pods)).roleset, "b");
}

#[test]
fn equal_rolesets_share_the_load() {
    let r = router();
    let model = model();
    let request = RouteRequest::new(&model, b"x");
    let pods = vec![p(0, "rs-a", Role::Prefill), p(1, "rs-a", Role::Decode), p(2, "rs-b", Role::Prefill), p(3, "rs-b", Role::Decode)];
    let seen = spread(2, 200, || usize::from(pair(r.plan(&request, &pods)).roleset == "rs-b"));
    assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
}

#[test]
fn a_prompt_returns_to_the_prefill_pod_holding_its_prefix() {
    let r = router();
    let model = model();
    let pods = vec![p(0, "rs", Role::Prefill), p(1, "rs", Role::Prefill), p(2, "rs", Role::Decode)];
    let system = "You are a helpful assistant. Answer briefly. ";
    let first = pair(r.plan(&RouteRequest::new(&model, format!("{system}question one").as_bytes()), &pods));
    for turn in 0..5 {
        let prompt = format!("{system}question one and follow-up {turn}");
        let plan = pair(r.plan(&RouteRequest::new(&model, prompt.as_bytes()), &pods));
        assert_eq!(plan.prefill.key, first.prefill.key, "turn {turn}");
    }
    // least_request ignores the prefix: the idle pod wins.
    let least = router_with(PdSettings { prefill_score_policy: PrefillPolicy::LeastRequest, ..PdSettings::default() });
    let holder = pods.iter().position(|p| p.key == first.prefill.key).unwrap_or(0);
    let _busy = pods[holder].load.start();
    let prompt = format!("{system}question one, once more");
    let plan = pair(least.plan(&RouteRequest::new(&model, prompt.as_bytes()), &pods));
    assert_ne!(plan.prefill.key, first.prefill.key);
}

#[test]
fn pd_is_a_strategy_of_its_own_and_not_mixable() {
    let r = router();
    assert_eq!(r.name(), "pd");
    assert!(!r.mixable());
    let model = model();
    let request = RouteRequest::new(&model, b"x");
    let pods = vec![p(0, "rs", Role::Prefill), p(1, "rs", Role::Decode)];
    assert_eq!(r.pick(&request, &pods), Ok(1), "the decode pod answers");
}
