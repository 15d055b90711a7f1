//! `turnstile plan` against mock engines of known capacity.
//!
//! A mock engine runs at most `--max-running` requests at once and queues
//! the rest (FIFO); each request takes `ttft + (tokens - 1) × itl`. So its
//! capacity is exactly `max_running / latency` requests per second: below
//! it latency stays flat, above it the queue grows and so does latency,
//! while completions stay at the capacity. The planner must find that knee
//! within 20% and size the deployment from it.

use std::time::Duration;

use turnstile_tests::harness::{Engine, Gateway, PodSpec, turnstile_bin};

const MODEL: &str = "plan-model";

/// Runs `turnstile plan` against `gw` and returns its `--json` summary.
async fn plan(gw: &Gateway, args: &[&str]) -> serde_json::Value {
    let svg = gw.log_file.with_file_name("plan.svg");
    let run = tokio::process::Command::new(turnstile_bin())
        .arg("plan")
        .args(["--gateway", &gw.url(""), "--admin", &gw.admin_url(""), "--model", MODEL, "--json"])
        .arg("--svg")
        .arg(&svg)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(90), run).await.expect("plan ends in time").expect("plan runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "plan failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    println!("{stdout}");
    let svg_text = std::fs::read_to_string(svg.with_file_name(svg_name(args))).expect("an SVG plot");
    assert!(svg_text.starts_with("<svg") && svg_text.contains("<polyline"), "a plotted curve");
    let json = stdout.lines().last().expect("a JSON summary line");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

fn svg_name(args: &[&str]) -> &'static str {
    if args.contains(&"--pd") { "plan-prefill.svg" } else { "plan.svg" }
}

fn assert_within(measured: f64, known: f64, what: &str) {
    let error = (measured - known).abs() / known;
    assert!(
        error <= 0.2,
        "{what}: measured {measured:.1} qps per replica, known capacity {known:.1} ({:.0}% off)",
        error * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_the_knee_of_two_replicas_and_sizes_the_deployment() {
    // 4 running at once, 50 ms + 5 × 10 ms = 100 ms each: 40 qps per replica.
    let engine_args = ["--max-running", "4", "--ttft-ms", "50", "--itl-ms", "10"];
    let engines: Vec<Engine> = (0..2).map(|i| Engine::start(&format!("plan-{i}"), MODEL, &engine_args)).collect();
    let pods: Vec<PodSpec> = engines.iter().map(|e| PodSpec::for_engine(e, MODEL)).collect();
    let gw = Gateway::start(&pods, &["--routing-algorithm", "least-request"]).await;

    // Target 36 qps at 0.65 × 40 = 26 per replica: 2 replicas, and still 2
    // anywhere within ±20% of the known capacity.
    let summary = plan(
        &gw,
        &[
            "--target-qps",
            "36",
            "--output-tokens",
            "6",
            "--input-tokens",
            "16",
            "--start-qps",
            "20",
            "--stage-seconds",
            "1.5",
            "--refine-stages",
            "3",
            "--max-seconds",
            "40",
        ],
    )
    .await;
    let pool = &summary["pools"][0];
    assert_eq!(pool["replicas_under_test"], 2, "Ready pods counted on the admin API: {summary}");
    assert_eq!(pool["knee_found"], true, "{summary}");
    assert_within(pool["peak_qps_per_replica"].as_f64().expect("a number"), 40.0, "replica capacity");
    assert_eq!(pool["replicas"], 2, "ceil(36 / (0.65 × ~40)): {summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_sizes_prefill_and_decode_pools_separately() {
    // Engines that check the vLLM handover (`--role`). Prefill pod: 2 at once,
    // 4 ms + 1.5 ms per prompt token: a 64-token prompt takes 100 ms, 20 qps.
    // Decode pod: 4 at once, 5 × 20 ms for six tokens: 40 qps.
    let prefill = Engine::start(
        "rs-0-prefill",
        MODEL,
        &["--role", "prefill", "--max-running", "2", "--ttft-ms", "4", "--ttft-per-uncached-token-us", "1500"],
    );
    let decode = Engine::start(
        "rs-0-decode",
        MODEL,
        &["--role", "decode", "--max-running", "4", "--ttft-ms", "0", "--itl-ms", "20"],
    );
    let role = |engine: &Engine, role: &str| {
        PodSpec::for_engine(engine, MODEL).label("role-name", role).label("roleset-name", "rs-0")
    };
    let gw = Gateway::start(&[role(&prefill, "prefill"), role(&decode, "decode")], &[]).await;

    // Target 18 qps: prefill 18 / (0.65 × 20) → 2 pods, decode 18 / (0.65 × 40) → 1.
    let summary = plan(
        &gw,
        &[
            "--pd",
            "--target-qps",
            "18",
            "--output-tokens",
            "6",
            "--input-tokens",
            "64",
            "--start-qps",
            "8",
            "--stage-seconds",
            "1.5",
            "--refine-stages",
            "2",
            "--max-seconds",
            "50",
        ],
    )
    .await;
    let pools = summary["pools"].as_array().expect("pools");
    let find = |name: &str| pools.iter().find(|p| p["pool"] == name).unwrap_or_else(|| panic!("{name}: {summary}"));
    let (prefill_plan, decode_plan) = (find("prefill"), find("decode"));
    assert_eq!(
        (prefill_plan["replicas_under_test"].as_u64(), decode_plan["replicas_under_test"].as_u64()),
        (Some(1), Some(1))
    );
    assert_within(prefill_plan["peak_qps_per_replica"].as_f64().expect("a number"), 20.0, "prefill capacity");
    assert_within(decode_plan["peak_qps_per_replica"].as_f64().expect("a number"), 40.0, "decode capacity");
    assert_eq!((prefill_plan["replicas"].as_u64(), decode_plan["replicas"].as_u64()), (Some(2), Some(1)), "{summary}");
    // Both engines accepted every request as the handover they check.
    for engine in [&prefill, &decode] {
        let pd = &engine.stats().await["pd"];
        assert_eq!(pd["rejected"], 0, "{} refused: {}", engine.name, pd["last_rejection"]);
    }
}
