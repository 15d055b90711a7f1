//! `cargo xtask bench tracing`: what OpenTelemetry tracing costs the gateway per request.
//!
//! Two instant mock engines (as in `core`) and an OTLP/HTTP sink inside this process: a small
//! HTTP server on 127.0.0.1 that answers every POST with 200 and an empty protobuf body (an
//! empty `ExportTraceServiceRequest` answer is zero bytes) and only counts the export requests
//! and the bytes it received, so the collector's own work stays out of the gateway's numbers.
//! Then, one after another with the same load: straight to the engines, the gateway with
//! tracing off, and the gateway exporting to the sink at sampling ratios 1.0 and 0.01. Every
//! gateway is a fresh process, so no row inherits another's queue or connections.
//!
//! Tracing is set through the environment (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `TURNSTILE_TRACE_SAMPLING_RATIO`), which works whatever the flags are spelled; the
//! exporter's other settings (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`) stay at
//! the gateway's defaults unless given with `--gateway-env`, which applies to every gateway row.
//!
//! Bounded: four rows of warm-up plus measured period, every request has a timeout, traffic
//! stays on 127.0.0.1.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    BenchArgs, MODEL, Pinning, TOKENS, bench_dir, block_on_until_stopped, cpu_over, describe_load, format_ms,
    per_request_us, pin_for_run, publish_report, ratio, revision, start_instant_engines, start_release_gateway,
    summarize,
};
use crate::client::Client;
use crate::loadgen::{self, LoadReport, LoadSpec, Schedule};
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, Profile, Stack};
use crate::stop;
use crate::ui;

/// Sampling ratios measured with tracing on, as passed to the gateway: everything, and the
/// share a busy production gateway would keep.
const RATIOS: [&str; 2] = ["1.0", "0.01"];
/// Who is pinned where, for the log and the report.
const PINNED: &str = "gateway";
const OTHERS: &str = "engines, load generator and OTLP sink";
/// Reading the gateway's /metrics and stopping it.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs the tracing suite.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.connections == 0 || args.seconds == 0 {
        bail!("--connections and --seconds must be at least 1");
    }
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench tracing")?;
    let pinning = pin_for_run(PINNED, OTHERS)?;
    block_on_until_stopped(tracing_async(args, &binaries, pinning))
}

/// What a row sends its load to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// The engines themselves (client-side round robin): the floor.
    Direct,
    /// A fresh gateway without an OTLP endpoint.
    TracingOff,
    /// A fresh gateway exporting to the sink, sampling this ratio of traces.
    TracingOn(&'static str),
}

impl Target {
    fn label(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::TracingOff => "gateway, tracing off".into(),
            Self::TracingOn(ratio) => format!("gateway, tracing ratio {ratio}"),
        }
    }

    /// A file-name-safe name, for the gateway's log.
    fn slug(self) -> String {
        match self {
            Self::Direct => "direct".into(),
            Self::TracingOff => "off".into(),
            Self::TracingOn(ratio) => format!("ratio-{}", ratio.replace('.', "_")),
        }
    }
}

/// One measured run.
struct Row {
    target: Target,
    report: LoadReport,
    /// Gateway CPU per successful request, microseconds (gateway rows only).
    gateway_cpu_us: Option<f64>,
    /// The gateway's span counters at the end of the run; `None` without a gateway or when its
    /// /metrics has no tracing series.
    spans: Option<SpanCounts>,
    /// What the sink received from this row's gateway, shutdown flush included (gateway rows).
    sink: Option<SinkCounts>,
}

async fn tracing_async(args: &BenchArgs, binaries: &Binaries, pinning: Pinning) -> Result<()> {
    let out_dir = bench_dir()?;
    let client = Client::new();

    let step = ui::step("bench tracing: start 2 mock engines and the OTLP sink");
    let pods_file = out_dir.join("tracing-pods.yaml");
    let mut stack = start_instant_engines(binaries, &out_dir, &pods_file, pinning).await?;
    let sink = Sink::start().await?;
    ui::info(format!("OTLP sink on http://{}", sink.addr));
    for (key, value) in &args.gateway_env {
        ui::info(format!("gateway environment: {key}={value}"));
    }
    step.done();

    let bench = Bench { args, binaries, pinning, client, out_dir: &out_dir, pods_file: &pods_file, sink: &sink };
    let mut rows = Vec::new();
    let targets = [Target::Direct, Target::TracingOff].into_iter().chain(RATIOS.map(Target::TracingOn));
    for target in targets {
        stop::check()?;
        let sink_before = sink.counts();
        let row = bench.measure(target, &mut stack).await;
        // Stopped whether the row worked or not, so the next row's gateway starts alone.
        if let Some(gateway) = stack.gateway.take() {
            let outcome = gateway.child.stop(STOP_GRACE).await.context("stopping the gateway")?;
            ui::info(format!("gateway: {outcome}"));
        }
        let mut row = row?;
        if row.target != Target::Direct {
            // Read after the stop: the exporter flushes what it still holds on shutdown.
            row.sink = Some(sink.counts().since(sink_before));
        }
        if let (Target::TracingOn(_), Some(SinkCounts { requests: 0, .. })) = (row.target, row.sink) {
            ui::warn(format!(
                "{}: no export reached the sink; does this gateway read OTEL_EXPORTER_OTLP_ENDPOINT? (log in {})",
                row.target.label(),
                out_dir.display()
            ));
        }
        rows.push(row);
    }
    stack.stop().await?;
    drop(sink);

    publish_report(&out_dir, "tracing.md", &render_markdown(args, pinning, &revision(), &rows))?;
    if rows.iter().any(|row| row.report.completed == 0) {
        bail!("a run completed no request; see the logs in {}", out_dir.display());
    }
    let failed: u64 = rows.iter().map(|row| row.report.errors).sum();
    if failed > 0 {
        ui::warn(format!("{failed} requests failed; see the errors column"));
    }
    Ok(())
}

/// What every row shares.
struct Bench<'a> {
    args: &'a BenchArgs,
    binaries: &'a Binaries,
    pinning: Pinning,
    client: Client,
    out_dir: &'a Path,
    pods_file: &'a Path,
    sink: &'a Sink,
}

impl Bench<'_> {
    /// Runs one row. A gateway row leaves its gateway in `stack.gateway` for the caller to
    /// stop, and `Row::sink` for the caller to fill once it has.
    async fn measure(&self, target: Target, stack: &mut Stack) -> Result<Row> {
        let args = self.args;
        let step = ui::step(format!(
            "bench tracing: {} — {} connections, {} s warm-up + {} s",
            target.label(),
            args.connections,
            args.warmup_seconds,
            args.seconds
        ));
        let (targets, gateway) = match target {
            Target::Direct => (stack.engines.iter().map(|engine| engine.addr).collect(), None),
            Target::TracingOff | Target::TracingOn(_) => {
                let mut env = args.gateway_env.clone();
                if let Target::TracingOn(ratio) = target {
                    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), format!("http://{}", self.sink.addr)));
                    // The sink speaks OTLP/HTTP; the gateway's default is gRPC (as AIBrix's).
                    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/protobuf".into()));
                    env.push(("TURNSTILE_TRACE_SAMPLING_RATIO".into(), ratio.into()));
                }
                let log = self.out_dir.join(format!("tracing-gateway-{}.log", target.slug()));
                let (gateway, rust_log) =
                    start_release_gateway(self.binaries, self.pods_file, log, env, self.pinning, &self.client).await?;
                ui::info(format!("gateway on {} (admin {}), RUST_LOG={rust_log}", gateway.listen, gateway.admin));
                let addrs = (gateway.listen, gateway.admin, gateway.child.pid());
                stack.gateway = Some(gateway);
                stack::wait_models_listed(&self.client, addrs.0, &[MODEL], Duration::from_secs(10)).await?;
                (vec![addrs.0], Some(addrs))
            }
        };
        let spec = LoadSpec {
            targets,
            connections: args.connections,
            model: MODEL.into(),
            stream: false,
            max_tokens: TOKENS,
            headers: Vec::new(),
        };
        let schedule =
            Schedule::starting_now(Duration::from_secs(args.warmup_seconds), Duration::from_secs(args.seconds));
        let sample_pid = gateway.map(|(_, _, pid)| pid);
        let (report, cpu) = tokio::join!(loadgen::run(&spec, schedule), cpu_over(sample_pid, schedule));
        let report = report?;
        let gateway_cpu_us = cpu?.map(|cpu| per_request_us(cpu, &report));
        if let Some(reason) = stack.exited_child() {
            bail!("a child died during the run: {reason}");
        }
        let spans = match gateway {
            Some((_, admin, _)) => {
                let reply = self.client.get(admin, "/metrics", ADMIN_TIMEOUT).await.context("reading /metrics")?;
                parse_span_counts(&reply.text())
            }
            None => None,
        };
        ui::info(summarize(&report));
        if let Some(spans) = spans {
            ui::info(format!(
                "spans exported {}, dropped {} (queue full) and {} (export failed)",
                spans.exported, spans.dropped_queue_full, spans.dropped_export_failed
            ));
        }
        step.done();
        Ok(Row { target, report, gateway_cpu_us, spans, sink: None })
    }
}

/// The gateway's tracing counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SpanCounts {
    exported: u64,
    dropped_queue_full: u64,
    dropped_export_failed: u64,
}

const EXPORTED: &str = "turnstile_trace_spans_exported_total";
const DROPPED: &str = "turnstile_trace_spans_dropped_total";

/// The span counters in a Prometheus text page. A labelled counter often has no series until
/// its first increment, so a missing one reads 0 once any tracing series is there; a page with
/// none at all is a gateway without these metrics (`None`), not one that exported nothing.
fn parse_span_counts(page: &str) -> Option<SpanCounts> {
    let mut counts = SpanCounts::default();
    let mut seen = false;
    for (name, labels, value) in page.lines().filter_map(sample) {
        // Counters are whole numbers, printed as floats by some encoders.
        let value = value.max(0.0).round() as u64;
        if name == EXPORTED {
            counts.exported += value;
        } else if name == DROPPED {
            if labels.contains(r#"reason="queue_full""#) {
                counts.dropped_queue_full += value;
            } else if labels.contains(r#"reason="export_failed""#) {
                counts.dropped_export_failed += value;
            }
        } else {
            continue;
        }
        seen = true;
    }
    seen.then_some(counts)
}

/// One sample line of a Prometheus text page as (name, labels, value); `None` for comments,
/// blank lines and anything unreadable. A timestamp after the value is ignored.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, rest) = line.split_at(line.find(['{', ' ', '\t'])?);
    let (labels, rest) = match rest.strip_prefix('{') {
        // Label values may hold spaces but not an unescaped `}` after the last label.
        Some(inside) => inside.rsplit_once('}')?,
        None => ("", rest),
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// What the sink had received at some point, or between two points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SinkCounts {
    /// Export requests (POSTs) answered.
    requests: u64,
    /// Request body bytes, as sent (compressed, if the exporter compresses).
    bytes: u64,
}

impl SinkCounts {
    /// What was received after `earlier`.
    fn since(self, earlier: Self) -> Self {
        Self {
            requests: self.requests.saturating_sub(earlier.requests),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

#[derive(Default)]
struct SinkTally {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// An OTLP/HTTP collector that keeps nothing: every POST gets 200 with an empty protobuf body
/// at once, so the exporter never retries or backs off and what is measured is the gateway's
/// side of exporting. Runs on the caller's runtime (the load generator's CPU, not the
/// gateway's); stops when dropped.
struct Sink {
    addr: SocketAddr,
    tally: Arc<SinkTally>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the OTLP sink")?;
        let addr = listener.local_addr()?;
        let tally = Arc::new(SinkTally::default());
        let task = tokio::spawn(accept_exports(listener, Arc::clone(&tally)));
        Ok(Self { addr, tally, task })
    }

    fn counts(&self) -> SinkCounts {
        SinkCounts {
            requests: self.tally.requests.load(Ordering::Relaxed),
            bytes: self.tally.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection too.
        self.task.abort();
    }
}

async fn accept_exports(listener: tokio::net::TcpListener, tally: Arc<SinkTally>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or the like: back off rather than spin on the shared CPU.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Finished connections are reaped here so the set does not grow over the run.
        while connections.try_join_next().is_some() {}
        let tally = Arc::clone(&tally);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| answer_export(request, Arc::clone(&tally)));
            // HTTP/1.1 or h2c, whichever the exporter's client speaks.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer_export(request: Request<Incoming>, tally: Arc<SinkTally>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(response);
    }
    // Counted frame by frame, never held: at ratio 1.0 the exports add up to a lot.
    let mut body = request.into_body();
    let mut bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
        }
    }
    tally.requests.fetch_add(1, Ordering::Relaxed);
    tally.bytes.fetch_add(bytes, Ordering::Relaxed);
    let mut response = Response::new(Full::new(Bytes::new()));
    response.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-protobuf"));
    Ok(response)
}

/// The report: one row per run, CPU per request against tracing off, spans and exports.
fn render_markdown(args: &BenchArgs, pinning: Pinning, revision: &str, rows: &[Row]) -> String {
    let mut out = format!("# Turnstile tracing benchmark ({revision})\n\n");
    let _ = write!(
        out,
        "{}, non-streaming; 2 mock engines (ttft 0, itl 0, {TOKENS} tokens); each gateway a fresh \
         process with least-request, tracing set by OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/HTTP protobuf \
         to a sink that answers 200 at once) and TURNSTILE_TRACE_SAMPLING_RATIO; {}; {} CPUs.",
        describe_load(args),
        pinning.describe(PINNED, OTHERS),
        pinning.cpus,
    );
    if !args.gateway_env.is_empty() {
        let env: Vec<String> = args.gateway_env.iter().map(|(key, value)| format!("`{key}={value}`")).collect();
        let _ = write!(out, " Gateway environment: {}.", env.join(", "));
    }
    out.push_str(
        "\n\n| target | req/s | p50 ms | p99 ms | errors | gateway CPU µs/request | CPU/request vs off \
         | spans exported | spans dropped (queue full / export failed) | exports received | KiB received |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let off_cpu = rows.iter().find(|row| row.target == Target::TracingOff).and_then(|row| row.gateway_cpu_us);
    let dash = || "–".to_owned();
    for Row { target, report, gateway_cpu_us, spans, sink } in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            target.label(),
            report.requests_per_second(),
            format_ms(report.percentile_ms(50.0)),
            format_ms(report.percentile_ms(99.0)),
            report.errors,
            gateway_cpu_us.map_or_else(dash, |us| format!("{us:.1}")),
            if gateway_cpu_us.is_some() { ratio(*gateway_cpu_us, off_cpu) } else { dash() },
            spans.map_or_else(dash, |spans| spans.exported.to_string()),
            spans.map_or_else(dash, |spans| format!("{} / {}", spans.dropped_queue_full, spans.dropped_export_failed)),
            sink.map_or_else(dash, |sink| sink.requests.to_string()),
            sink.map_or_else(dash, |sink| format!("{:.1}", sink.bytes as f64 / 1024.0)),
        );
    }
    out.push_str(
        "\nSpans and drops are the gateway's own counters, read just before it stopped; exports and \
         bytes are what the sink received from that gateway, its shutdown flush included.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Suite, fleet, peers};

    fn report(completed: u64, latencies_us: Vec<u32>) -> LoadReport {
        LoadReport { completed, errors: 0, first_error: None, latencies_us, measured: Duration::from_secs(10) }
    }

    fn args(gateway_env: Vec<(String, String)>) -> BenchArgs {
        BenchArgs {
            gateway_env,
            perf: false,
            suite: Suite::Tracing,
            connections: 32,
            seconds: 10,
            warmup_seconds: 2,
            peers: peers::PeerArgs::default(),
            fleet: fleet::FleetArgs::default(),
        }
    }

    #[test]
    fn markdown_has_rows_and_ratios() {
        let spans = SpanCounts { exported: 450_000, dropped_queue_full: 12, dropped_export_failed: 0 };
        let rows = vec![
            Row {
                target: Target::Direct,
                report: report(100_000, vec![1000, 1000, 2000]),
                gateway_cpu_us: None,
                spans: None,
                sink: None,
            },
            Row {
                target: Target::TracingOff,
                report: report(50_000, vec![2000, 2000, 4000]),
                gateway_cpu_us: Some(40.0),
                spans: None,
                sink: Some(SinkCounts::default()),
            },
            Row {
                target: Target::TracingOn("1.0"),
                report: report(40_000, vec![2000, 3000, 5000]),
                gateway_cpu_us: Some(60.0),
                spans: Some(spans),
                sink: Some(SinkCounts { requests: 900, bytes: 10_240 }),
            },
        ];
        let pinning = Pinning { gateway: Some(0), others: Some(1), cpus: 2 };
        let env = vec![("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "1000".to_owned())];
        let markdown = render_markdown(&args(env), pinning, "abc1234", &rows);
        assert!(markdown.starts_with("# Turnstile tracing benchmark (abc1234)"), "{markdown}");
        assert!(markdown.contains("| direct | 10000 | 1.00 | 2.00 | 0 | – | – | – | – | – | – |"), "{markdown}");
        assert!(
            markdown.contains("| gateway, tracing off | 5000 | 2.00 | 4.00 | 0 | 40.0 | 1.00 | – | – | 0 | 0.0 |"),
            "{markdown}"
        );
        assert!(
            markdown.contains(
                "| gateway, tracing ratio 1.0 | 4000 | 3.00 | 5.00 | 0 | 60.0 | 1.50 | 450000 | 12 / 0 | 900 | 10.0 |"
            ),
            "{markdown}"
        );
        assert!(markdown.contains("gateway pinned to CPU 0, engines, load generator and OTLP sink to CPU 1"));
        assert!(markdown.contains("; 2 CPUs."), "{markdown}");
        assert!(markdown.contains("Gateway environment: `OTEL_BSP_SCHEDULE_DELAY=1000`."), "{markdown}");
    }

    #[test]
    fn span_counters_are_read_from_the_metrics_page() {
        let page = "# HELP turnstile_trace_spans_exported_total Spans exported.\n\
                    # TYPE turnstile_trace_spans_exported_total counter\n\
                    turnstile_trace_spans_exported_total 1234\n\
                    turnstile_trace_spans_dropped_total{reason=\"queue_full\"} 5e1\n\
                    turnstile_trace_spans_dropped_total{reason=\"export_failed\"} 2 1700000000000\n\
                    turnstile_trace_spans_exported_totals 99\n\
                    turnstile_requests_total{route=\"a b}\"} 7\n";
        assert_eq!(
            parse_span_counts(page),
            Some(SpanCounts { exported: 1234, dropped_queue_full: 50, dropped_export_failed: 2 })
        );
        // No drop yet: the labelled series are absent, not the metrics.
        assert_eq!(
            parse_span_counts("turnstile_trace_spans_exported_total 7\n"),
            Some(SpanCounts { exported: 7, ..SpanCounts::default() })
        );
        assert_eq!(parse_span_counts("turnstile_requests_total 7\n"), None);
    }

    #[tokio::test]
    async fn the_sink_answers_posts_and_counts_them() {
        let sink = Sink::start().await.unwrap();
        let client = Client::new();
        let body = serde_json::json!({"spans": [1, 2, 3]});
        let timeout = Duration::from_secs(5);
        for _ in 0..2 {
            let reply = client.post_json(sink.addr, "/v1/traces", &[], &body, timeout).await.unwrap();
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.header("content-type"), "application/x-protobuf");
            assert!(reply.body.is_empty());
        }
        let reply = client.get(sink.addr, "/v1/traces", timeout).await.unwrap();
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
        let counts = sink.counts();
        assert_eq!(counts, SinkCounts { requests: 2, bytes: 2 * body.to_string().len() as u64 });
        assert_eq!(counts.since(SinkCounts { requests: 1, bytes: 1 }).requests, 1);
    }
}
