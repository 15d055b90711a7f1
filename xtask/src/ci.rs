//! `cargo xtask ci`: what CI runs (`.ci/run`), and what a developer runs before pushing.
//!
//! Strict setup, then the steps of [`steps`] in order, each timed, stopping at the first
//! failure. Output streams through untouched so cargo test's summary lines reach the runner.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::procs::{self, run_streaming};
use crate::setup::{self, Strictness};
use crate::ui;

/// Longest any one step may take; CI's own limit for the whole run is 90 minutes.
const STEP_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// One CI step: a named command, built when the step starts.
struct Step {
    name: &'static str,
    command: fn() -> Command,
}

/// The CI steps, in order; a step is any command, cargo or not (`manifests` renders deploy/ and
/// validates it against the Kubernetes schemas). Kernel tests run inside `cargo test
/// --workspace`: they load the real programs in their own network namespaces and need root,
/// which CI has.
fn steps() -> Vec<Step> {
    vec![
        Step { name: "format", command: || procs::cargo_command(["fmt", "--all", "--", "--check"]) },
        Step {
            name: "clippy",
            command: || procs::cargo_command(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
        },
        Step { name: "build", command: || procs::cargo_command(["build", "--workspace", "--bins"]) },
        Step { name: "manifests", command: || xtask_command(&["manifests"]) },
        Step { name: "test", command: || procs::cargo_command(["test", "--workspace"]) },
        // The release build, the image from it, and that image run in front of mock engines.
        Step { name: "image", command: || xtask_command(&["image", "--run"]) },
    ]
}

/// One of xtask's own subcommands, as a step of its own. Through `cargo run`, not
/// `current_exe()`: the build step relinks xtask (workspace feature unification), which
/// leaves this process's executable deleted.
fn xtask_command(args: &[&str]) -> Command {
    let mut command = procs::cargo_command(["run", "--quiet", "--package", "xtask", "--"]);
    command.args(args);
    command
}

/// Runs setup and every step; the first failure ends the run with an error.
pub fn run() -> Result<()> {
    let mut durations: Vec<(String, Duration, bool)> = Vec::new();
    let setup_started = Instant::now();
    let setup_result = setup::run(Strictness::Strict);
    durations.push(("setup".into(), setup_started.elapsed(), setup_result.is_ok()));
    let result = setup_result.and_then(|()| {
        for Step { name, command } in steps() {
            let mut command = command();
            let step = ui::step(format!("ci: {name}: {}", procs::display_command(&command)));
            let outcome = run_streaming(&mut command, STEP_TIMEOUT).with_context(|| format!("ci step `{name}` failed"));
            durations.push((name.into(), step.elapsed(), outcome.is_ok()));
            outcome?;
            step.done();
        }
        Ok(())
    });
    print_summary(&durations, result.is_ok());
    result
}

fn print_summary(durations: &[(String, Duration, bool)], passed: bool) {
    println!("==> ci summary");
    for (name, duration, ok) in durations {
        let verdict = if *ok { "ok    " } else { "FAILED" };
        println!("    {verdict} {name:<10} {:>12}", ui::human(*duration));
    }
    let total: Duration = durations.iter().map(|(_, duration, _)| *duration).sum();
    let verdict = if passed { "passed" } else { "FAILED" };
    println!("    ci {verdict} in {}", ui::human(total));
}
