//! `cargo xtask fuzz --seconds N`: runs each cargo-fuzz target in `fuzz/` for N seconds.
//!
//! Installs what is missing (a nightly toolchain, cargo-fuzz) and says so. New inputs the
//! fuzzer finds go to `target/fuzz-corpus/<target>`; the checked-in seeds in
//! `fuzz/corpus/<target>` are only read. A crash stops the run with the crashing input's path:
//! copy it into `fuzz/corpus/<target>/` once fixed, so `cargo test` replays it for good.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::procs::{self, capture, run_streaming};
use crate::ui;

/// The fuzz targets, in the order they run.
pub const TARGETS: [&str; 6] =
    ["request_body", "sse_usage", "config_annotation", "pods_file", "engine_metrics", "pd_bodies"];

/// Longest the sanitizer build of the targets may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// Installing cargo-fuzz from crates.io.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Options of `cargo xtask fuzz`.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// Targets to run (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// What one target's run reported.
struct RunStats {
    executions: u64,
    new_units: u64,
}

/// Ensures the tools, builds the targets once, then runs each one.
pub fn run(args: &FuzzArgs) -> Result<()> {
    ensure_tools()?;
    let fuzz_dir = procs::workspace_root().join("fuzz");
    let step = ui::step("fuzz: build the targets (nightly, AddressSanitizer)");
    run_streaming(&mut fuzz_command(&fuzz_dir, &["build", "-O"]), BUILD_TIMEOUT)?;
    step.done();

    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        TARGETS.iter().copied().filter(|t| args.targets.iter().any(|a| a == t)).collect()
    };
    let mut summary = Vec::new();
    for target in targets {
        let step = ui::step(format!("fuzz: {target} for {} s", args.seconds));
        let stats = run_target(&fuzz_dir, target, args.seconds)?;
        ui::info(format!("{} executions, {} new inputs, no crash", stats.executions, stats.new_units));
        step.done();
        summary.push((target, stats));
    }
    println!("==> fuzz summary ({} s per target)", args.seconds);
    for (target, stats) in summary {
        println!("    ok {target:<18} {:>12} executions {:>6} new inputs", stats.executions, stats.new_units);
    }
    Ok(())
}

/// `rustup run nightly cargo fuzz ARGS` in `fuzz/`, without the eBPF build (the targets
/// only need userspace parsers).
fn fuzz_command(fuzz_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("rustup");
    command
        .args(["run", "nightly", "cargo", "fuzz"])
        .args(args)
        .current_dir(fuzz_dir.parent().unwrap_or(fuzz_dir))
        .env("TURNSTILE_SKIP_EBPF", "1");
    command
}

fn run_target(fuzz_dir: &Path, target: &str, seconds: u64) -> Result<RunStats> {
    let scratch: PathBuf = procs::target_dir().join("fuzz-corpus").join(target);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let seeds = fuzz_dir.join("corpus").join(target);
    let max_time = format!("-max_total_time={seconds}");
    let scratch_text = scratch.to_string_lossy().into_owned();
    let seeds_text = seeds.to_string_lossy().into_owned();
    let args = [
        "run",
        "-O",
        target,
        &scratch_text,
        &seeds_text,
        "--",
        &max_time,
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ];
    let mut command = fuzz_command(fuzz_dir, &args);
    // Room for libFuzzer to load the corpus and print its final stats.
    let output = capture(&mut command, Duration::from_secs(seconds + 300))?;
    let text = format!("{}\n{}", output.stdout, output.stderr);
    if !output.status.success() {
        let crasher = text
            .lines()
            .find_map(|line| line.split("Test unit written to ").nth(1))
            .map(|path| path.trim().to_owned())
            .unwrap_or_else(|| "(no test unit reported)".to_owned());
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("fuzz target {target} failed ({}); crashing input: {crasher}\n{}", output.status, tail.join("\n"));
    }
    Ok(RunStats {
        executions: final_stat(&text, "number_of_executed_units"),
        new_units: final_stat(&text, "new_units_added"),
    })
}

/// A `stat::NAME: VALUE` line of libFuzzer's final stats (0 when absent).
fn final_stat(output: &str, name: &str) -> u64 {
    let prefix = format!("stat::{name}:");
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(prefix.as_str()))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// A nightly toolchain and cargo-fuzz, installed when missing.
fn ensure_tools() -> Result<()> {
    let quick = Duration::from_secs(60);
    let nightly = capture(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]), quick)?;
    if nightly.status.success() {
        ui::info(format!("ok       {}", nightly.stdout.trim()));
    } else {
        ui::info("install  nightly toolchain (cargo-fuzz needs it): rustup toolchain install nightly");
        run_streaming(
            Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]),
            INSTALL_TIMEOUT,
        )?;
    }
    let version = capture(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]), quick)?;
    if version.status.success() {
        ui::info(format!("ok       {}", version.stdout.trim()));
        return Ok(());
    }
    ui::info("install  cargo-fuzz is missing: cargo install cargo-fuzz --locked (a few minutes, once)");
    run_streaming(&mut procs::cargo_command(["install", "cargo-fuzz", "--locked"]), INSTALL_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_stats() {
        let output = "Done 1234 runs in 60 second(s)\nstat::number_of_executed_units: 1234\n\
                      stat::average_exec_per_sec:     20\nstat::new_units_added:          17\n";
        assert_eq!(final_stat(output, "number_of_executed_units"), 1234);
        assert_eq!(final_stat(output, "new_units_added"), 17);
        assert_eq!(final_stat(output, "slowest_unit_time_sec"), 0);
    }

    #[test]
    fn every_target_has_a_seed_corpus() {
        for target in TARGETS {
            let seeds = procs::workspace_root().join("fuzz/corpus").join(target);
            let count = std::fs::read_dir(&seeds).map(|d| d.count()).unwrap_or(0);
            assert!(count >= 3, "{}: {count} seeds", seeds.display());
        }
    }
}
