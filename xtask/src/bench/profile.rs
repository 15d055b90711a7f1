//! `cargo xtask bench core --perf`: where the gateway's CPU goes. Each gateway row's measured
//! period is recorded with `perf record` (DWARF call stacks, 499 Hz), folded and drawn as a flame
//! graph with inferno, and its samples are split by part of the gateway, so the report can say
//! how many of the microseconds per request each part takes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use inferno::collapse::Collapse as _;

use crate::loadgen::Schedule;

/// The parts samples are split into. A sample goes to the part of the innermost frame of its
/// stack that names one (within a frame, the first part listed), so a part's share includes what
/// it calls that no other part claims: its allocations, its syscalls, hyper's shared h1 code.
/// Samples no frame claims go to the runtime's column when it is on their stack (on loopback mostly
/// the kernel's TCP work and hyper's shared connection code, which the unwound stacks do not tie
/// to the client or the engine side), else `other`.
const PARTS: &[(&str, &[&str])] = &[
    ("access log line", &["access_log::AccessRecord::write", "gateway_user::logfmt"]),
    ("trace export", &["gateway_user::traces", "opentelemetry"]),
    ("request metrics", &["prometheus_client", "gateway_user::metrics"]),
    ("engine scrapes", &["gateway_user::engine_metrics"]),
    ("request body read and parse", &["proxy::request", "proxy::offload", "serde_json", "read_body"]),
    ("routing", &["gateway_user::routing"]),
    ("limits", &["gateway_user::limits"]),
    ("response body layers", &["gateway_user::proxy::body"]),
    (
        "engine connection (hyper client)",
        &["hyper_util::client", "hyper::client", "proxy::upstream", "proxy::engine_conn", "h1::role::Client"],
    ),
    (
        "client connection (hyper server)",
        &["hyper::server", "hyper_util::server", "proxy::listener", "h1::role::Server"],
    ),
    ("other request path", &["gateway_user::proxy"]),
];

/// The last two columns: samples on the runtime's own frames, and the rest.
const RUNTIME: &str = "runtime, socket I/O not tied to a side";
const OTHER: &str = "other";

/// One part's share of the samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub part: &'static str,
    pub fraction: f64,
}

/// Records `pid` with perf into `data` over the measured period of `schedule`.
pub async fn record(pid: u32, schedule: Schedule, data: &Path) -> Result<()> {
    tokio::time::sleep_until(schedule.measure_start.into()).await;
    let seconds = schedule.measure_end.saturating_duration_since(schedule.measure_start).max(Duration::from_secs(1));
    let status = tokio::process::Command::new("perf")
        .args(["record", "-q", "-F", "499", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
        .arg(data)
        .args(["--", "sleep", &format!("{:.1}", seconds.as_secs_f64())])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .context("running perf record (is perf installed?)")?;
    if !status.success() {
        bail!("perf record exited with {status}");
    }
    Ok(())
}

/// Folds the stacks recorded in `data`, draws them at `svg` under `title`, and splits them by part.
pub fn render(data: &Path, svg: &Path, title: &str) -> Result<Vec<Share>> {
    let script = std::process::Command::new("perf")
        .args(["script", "--no-inline", "-i"])
        .arg(data)
        .output()
        .context("running perf script")?;
    if !script.status.success() {
        bail!("perf script failed: {}", String::from_utf8_lossy(&script.stderr));
    }
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::from(inferno::collapse::perf::Options::default())
        .collapse(&script.stdout[..], &mut folded)
        .context("folding perf's stacks")?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    let file = std::fs::File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
    inferno::flamegraph::from_reader(&mut options, &folded[..], std::io::BufWriter::new(file))
        .context("drawing the flame graph")?;
    Ok(shares(&String::from_utf8_lossy(&folded)))
}

/// Each part's share of the samples in `folded` (`frame;frame;... count` lines, outermost frame
/// first), in [`PARTS`] order, then the runtime and `other`.
pub fn shares(folded: &str) -> Vec<Share> {
    let mut counts = vec![0u64; PARTS.len() + 2];
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else { continue };
        let Ok(count) = count.parse::<u64>() else { continue };
        let part = stack
            .rsplit(';')
            .find_map(|frame| PARTS.iter().position(|(_, patterns)| patterns.iter().any(|p| frame.contains(p))))
            .unwrap_or(if stack.contains("tokio::runtime") { PARTS.len() } else { PARTS.len() + 1 });
        counts[part] += count;
    }
    let total = counts.iter().sum::<u64>().max(1) as f64;
    let names = PARTS.iter().map(|(name, _)| *name).chain([RUNTIME, OTHER]);
    names.zip(counts).map(|(part, count)| Share { part, fraction: count as f64 / total }).collect()
}

/// A markdown table of `shares` with the microseconds per request each part takes of `cpu_us`.
pub fn table(shares: &[Share], cpu_us: f64) -> String {
    let mut out = String::from("| part | share of samples | µs/request |\n|---|---:|---:|\n");
    for share in shares.iter().filter(|s| s.fraction > 0.0) {
        let line = format!("| {} | {:.1} % | {:.1} |\n", share.part, share.fraction * 100.0, share.fraction * cpu_us);
        out.push_str(&line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_go_to_the_part_of_their_innermost_named_frame() {
        let server =
            "turnstile;tokio::runtime::park;hyper::server::conn::http1::Connection::poll;hyper::proto::h1::dispatch";
        let folded = format!(
            "\
{server};gateway_user::proxy::Proxy::handle;gateway_user::proxy::access_log::AccessRecord::write;write 30
{server};hyper::proto::h1::io::poll_read;read 40
{server};gateway_user::proxy::Proxy::serve;gateway_user::routing::least_request::pick;malloc 10
{server};gateway_user::proxy::Proxy::serve;memcpy 5
turnstile;tokio::runtime::park;epoll_wait 5
libc;unknown 10
"
        );
        let shares = shares(&folded);
        let of = |part: &str| shares.iter().find(|s| s.part == part).map_or(0.0, |s| s.fraction);
        assert!((of("access log line") - 0.3).abs() < 1e-9, "the access log, not the hyper frames around it");
        assert!((of("client connection (hyper server)") - 0.4).abs() < 1e-9, "hyper's own reading");
        assert!((of("routing") - 0.1).abs() < 1e-9, "with the allocation it made");
        assert!((of("other request path") - 0.05).abs() < 1e-9);
        assert!((of(RUNTIME) - 0.05).abs() < 1e-9);
        assert!((of("other") - 0.1).abs() < 1e-9);
        assert!(table(&shares, 50.0).contains("| access log line | 30.0 % | 15.0 |"));
    }
}
