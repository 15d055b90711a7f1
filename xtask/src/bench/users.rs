//! `cargo xtask bench users`: what per-user RPM counting costs as distinct users pile up
//! (issue 22, item 5).
//!
//! One mock engine and the gateway with `--default-user-rpm 1000000`, counting in process (no
//! Redis), so every request's `user` is checked and counted and none is ever refused. Three
//! measured periods: one user on every request (a single counter), then a new user on every
//! request once 100k and once 1M distinct users have been sent. Between them, fills send new
//! users as fast as the gateway answers, each bounded by a deadline; a fill that misses its
//! target says how far it got. The gateway keeps user counters for the current and the
//! previous minute, so what it holds is what was sent in the last one to two minutes.
//!
//! Bounded: about 2.5 minutes at most after the build, every request has a timeout, traffic
//! stays on 127.0.0.1.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;

use super::{
    MODEL, Pinning, bench_dir, block_on_until_stopped, format_ms, instant_engine, per_request_us, pin_for_run,
    publish_report, revision, start_release_gateway, summarize, write_engine_pods,
};
use crate::client::Client;
use crate::loadgen::{self, ConnectionTally, LoadReport, Schedule};
use crate::procs;
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, Profile, Stack};
use crate::ui;

/// High enough that no user is ever refused: the bench measures counting, not refusing.
const USER_RPM: &str = "1000000";
/// Tokens per answer: few, so the time goes to the gateway's request path.
const TOKENS: u32 = 4;
const WARMUP: Duration = Duration::from_secs(1);
/// Each measured period.
const MEASURED: Duration = Duration::from_secs(5);
/// Distinct users sent before each measured period of new users, with the fill's deadline.
const FILLS: [(u64, Duration); 2] = [(100_000, Duration::from_secs(30)), (1_000_000, Duration::from_secs(90))];

/// Runs the users suite with `connections` keep-alive connections.
pub fn run(connections: usize) -> Result<()> {
    if connections == 0 {
        bail!("--connections must be at least 1");
    }
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench users")?;
    let pinning = pin_for_run("gateway", "engine and load generator")?;
    block_on_until_stopped(users_async(&binaries, pinning, connections))
}

/// Who the requests come from.
#[derive(Clone)]
enum Users {
    /// The same user on every request.
    One,
    /// A new user on every request, numbered by a counter shared by all periods.
    New(Arc<AtomicU64>),
}

impl Users {
    fn sent(&self) -> u64 {
        match self {
            Self::One => 1,
            Self::New(next) => next.load(Ordering::Relaxed),
        }
    }
}

/// One period of load: connections send until the schedule's end, or until `stop_at`
/// distinct users have been sent; requests completing after its start are measured.
#[derive(Clone)]
struct Period {
    users: Users,
    schedule: Schedule,
    stop_at: u64,
}

/// One row of the report.
struct Row {
    period: String,
    users_before: u64,
    users_after: u64,
    report: LoadReport,
    gateway_cpu_us: f64,
    gateway_rss_mib: Option<f64>,
}

async fn users_async(binaries: &Binaries, pinning: Pinning, connections: usize) -> Result<()> {
    let out_dir = bench_dir()?;
    let client = Client::new();

    let step = ui::step("bench users: start a mock engine and the gateway (release)");
    let mut stack = Stack { engines: Vec::new(), gateway: None };
    let spec = instant_engine("engine-0".into(), TOKENS, pinning);
    stack.engines.push(stack::start_engine(&binaries.engine, &spec, &out_dir, pinning.others).await?);
    let pods_file = out_dir.join("users-pods.yaml");
    write_engine_pods(&stack.engines, &pods_file)?;
    // The flag's environment form: the stack starts the gateway with fixed flags.
    let env = vec![("TURNSTILE_DEFAULT_USER_RPM".into(), USER_RPM.into())];
    let (gateway, _) =
        start_release_gateway(binaries, &pods_file, out_dir.join("users-gateway.log"), env, pinning, &client).await?;
    let target = gateway.listen;
    let gateway_pid = gateway.child.pid();
    stack.gateway = Some(gateway);
    stack::wait_models_listed(&client, target, &[MODEL], Duration::from_secs(10)).await?;
    step.done();

    let started = Instant::now();
    let mut bench = Bench { stack, target, connections, gateway_pid };
    let now = Instant::now();
    let warmup = Period {
        users: Users::One,
        schedule: Schedule { measure_start: now + WARMUP, measure_end: now + WARMUP },
        stop_at: u64::MAX,
    };
    drive(target, connections, warmup).await?;
    let mut rows = vec![bench.measure("one user, repeated", &Users::One, None).await?];
    let new_users = Users::New(Arc::new(AtomicU64::new(0)));
    for (goal, deadline) in FILLS {
        let fill = format!("fill: a new user per request, up to {} users", count(goal));
        rows.push(bench.measure(&fill, &new_users, Some((goal, deadline))).await?);
        let reached = new_users.sent();
        if reached < goal {
            ui::warn(format!("the fill stopped at its {} deadline with {} users", ui::human(deadline), count(reached)));
        }
        let period = format!("a new user per request, after {} users", count(reached));
        rows.push(bench.measure(&period, &new_users, None).await?);
    }
    let Bench { stack, .. } = bench;
    stack.stop().await?;

    let markdown = render_markdown(connections, pinning, &revision(), &rows, started.elapsed());
    publish_report(&out_dir, "users.md", &markdown)?;
    if rows.iter().any(|row| row.report.completed == 0) {
        bail!("a period completed no request; see the logs in {}", out_dir.display());
    }
    Ok(())
}

/// The running stack and how to load it.
struct Bench {
    stack: Stack,
    target: SocketAddr,
    connections: usize,
    gateway_pid: u32,
}

impl Bench {
    /// Runs one period and measures it: for `MEASURED`, or, as a fill, until `goal` distinct
    /// users have been sent or the deadline passes.
    async fn measure(&mut self, label: &str, users: &Users, fill: Option<(u64, Duration)>) -> Result<Row> {
        let step = ui::step(format!("bench users: {label}"));
        let users_before = users.sent();
        let now = Instant::now();
        let (end, stop_at) = match fill {
            Some((goal, deadline)) => (now + deadline, goal),
            None => (now + MEASURED, u64::MAX),
        };
        let period =
            Period { users: users.clone(), schedule: Schedule { measure_start: now, measure_end: end }, stop_at };
        let cpu_before = procs::process_cpu_time(self.gateway_pid)?;
        let report = drive(self.target, self.connections, period).await?;
        let cpu = procs::process_cpu_time(self.gateway_pid)?.saturating_sub(cpu_before);
        if let Some(reason) = self.stack.exited_child() {
            bail!("a child died during the run: {reason}");
        }
        let row = Row {
            period: label.to_owned(),
            users_before,
            users_after: users.sent(),
            gateway_cpu_us: per_request_us(cpu, &report),
            gateway_rss_mib: rss_mib(self.gateway_pid),
            report,
        };
        ui::info(format!("{}, {} → {} users", summarize(&row.report), count(row.users_before), count(row.users_after)));
        step.done();
        Ok(row)
    }
}

/// Sends the period's load over `connections` keep-alive connections.
async fn drive(target: SocketAddr, connections: usize, period: Period) -> Result<LoadReport> {
    let body = Bytes::from(
        serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count me in."}],
            "max_tokens": TOKENS,
        })
        .to_string(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(drive_connection(target, body.clone(), period.clone()));
    }
    let mut report = loadgen::gather(tasks, &period.schedule).await?;
    // A fill ends when its users are sent, usually well before its deadline.
    report.measured =
        Instant::now().min(period.schedule.measure_end).saturating_duration_since(period.schedule.measure_start);
    Ok(report)
}

/// One connection's loop: (re)connect, send with the next user, read the whole answer, record.
async fn drive_connection(target: SocketAddr, body: Bytes, period: Period) -> ConnectionTally {
    let mut tally = ConnectionTally::default();
    let host = target.to_string();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while Instant::now() < period.schedule.measure_end {
        let user = match &period.users {
            Users::One => "bench-user".to_owned(),
            Users::New(next) => {
                let number = next.fetch_add(1, Ordering::Relaxed);
                if number >= period.stop_at {
                    // Not sent: the count stays the number of users really sent.
                    next.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                format!("bench-user-{number}")
            }
        };
        let mut conn = match sender.take() {
            Some(conn) if !conn.is_closed() => conn,
            _ => match loadgen::connect(target).await {
                Ok(conn) => conn,
                Err(err) => {
                    tally.error(&period.schedule, format!("connect {target}: {err:#}"));
                    // A dead gateway must not spin the CPU the engine and the others share.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let outcome = loadgen::send_chat(&mut conn, &host, body.clone(), &[("user", &user)]).await;
        if tally.record(&period.schedule, target, outcome, started) {
            sender = Some(conn);
        }
    }
    tally
}

/// Resident memory of `pid`, MiB; `None` when `/proc` cannot tell.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss_kib(&status).map(|kib| kib as f64 / 1024.0)
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A user count the way a person reads it: `950`, `100k`, `1.00M`.
fn count(users: u64) -> String {
    match users {
        0..1000 => users.to_string(),
        1000..1_000_000 => format!("{}k", users / 1000),
        _ => format!("{:.2}M", users as f64 / 1e6),
    }
}

fn render_markdown(connections: usize, pinning: Pinning, revision: &str, rows: &[Row], elapsed: Duration) -> String {
    let mut out = format!("# Turnstile per-user counters benchmark ({revision})\n\n");
    let _ = writeln!(
        out,
        "POST /v1/chat/completions with a `user` header, {connections} keep-alive HTTP/1.1 \
         connections, gateway with `--default-user-rpm {USER_RPM}` and in-process counters, 1 mock \
         engine (ttft 0, itl 0, {TOKENS} tokens); {}; {} CPUs; {} in all. Measured periods last {} s; \
         fills stop at their user count or deadline. Users are counted in minute windows and the \
         gateway keeps the current and the previous minute, so it holds the users of the last one \
         to two minutes.\n",
        pinning.describe("gateway", "engine and load generator"),
        pinning.cpus,
        ui::human(elapsed),
        MEASURED.as_secs(),
    );
    out.push_str(
        "| period | users sent (start → end) | req/s | p50 ms | p99 ms | errors | gateway CPU µs/request | gateway RSS MiB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for Row { period, users_before, users_after, report, gateway_cpu_us, gateway_rss_mib } in rows {
        let _ = writeln!(
            out,
            "| {period} | {} → {} | {:.0} | {} | {} | {} | {gateway_cpu_us:.1} | {} |",
            count(*users_before),
            count(*users_after),
            report.requests_per_second(),
            format_ms(report.percentile_ms(50.0)),
            format_ms(report.percentile_ms(99.0)),
            report.errors,
            gateway_rss_mib.map_or_else(|| "-".into(), |mib| format!("{mib:.1}")),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_like_the_table() {
        assert_eq!(count(1), "1");
        assert_eq!(count(100_000), "100k");
        assert_eq!(count(1_000_000), "1.00M");
        assert_eq!(count(1_234_567), "1.23M");
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        assert_eq!(parse_vm_rss_kib("Name:\tx\nVmHWM:\t  4096 kB\nVmRSS:\t   2048 kB\n"), Some(2048));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn markdown_has_one_row_per_period() {
        let report = LoadReport {
            completed: 50_000,
            errors: 0,
            first_error: None,
            latencies_us: vec![1000, 2000, 4000],
            measured: Duration::from_secs(5),
        };
        let rows = vec![Row {
            period: "a new user per request, after 100k users".into(),
            users_before: 100_000,
            users_after: 150_000,
            report,
            gateway_cpu_us: 21.5,
            gateway_rss_mib: Some(20.0),
        }];
        let pinning = Pinning { gateway: Some(0), others: Some(1), cpus: 2 };
        let markdown = render_markdown(32, pinning, "abc1234", &rows, Duration::from_secs(90));
        assert!(markdown.starts_with("# Turnstile per-user counters benchmark (abc1234)"), "{markdown}");
        assert!(
            markdown.contains(
                "| a new user per request, after 100k users | 100k → 150k | 10000 | 2.00 | 4.00 | 0 | 21.5 | 20.0 |"
            ),
            "{markdown}"
        );
        assert!(markdown.contains("--default-user-rpm 1000000"), "{markdown}");
    }
}
