//! Project automation for Turnstile, run as `cargo xtask <command>`.
//!
//! This file only parses the command line and dispatches; each subcommand is one module.

mod bench;
mod ci;
mod client;
mod demo;
mod fuzz;
mod image;
mod loadgen;
mod manifests;
mod procs;
mod setup;
mod soak;
mod stack;
mod stop;
mod ui;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// Turnstile's developer commands.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the project needs (nightly rust-src, bpf-linker, redis-server, bpftool, kubectl,
    /// kubernetes-validate, buildah, skopeo, podman, runc).
    Setup,
    /// Run the gateway in front of three mock engines and show it answering real requests.
    Demo(demo::DemoArgs),
    /// Everything CI checks: setup, fmt, clippy, build, manifests, test, image.
    Ci,
    /// Render every kustomization under deploy/ and validate it against the Kubernetes schemas.
    Manifests,
    /// Measure the gateway against direct-to-engine traffic; results in target/bench/.
    Bench(bench::BenchArgs),
    /// Run each cargo-fuzz target in fuzz/ for --seconds (installs cargo-fuzz when missing).
    Fuzz(fuzz::FuzzArgs),
    /// Soak the gateway for --minutes under mixed load and pod churn; fails on RSS or fd growth.
    Soak(soak::SoakArgs),
    /// Build the container image without a Docker daemon (buildah): into the local containers
    /// store and target/image/; --run also runs it against mock engines.
    Image(image::ImageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    if let Err(err) = stop::install() {
        eprintln!("xtask: error: {err:#}");
        return ExitCode::FAILURE;
    }
    let result = match &cli.command {
        Command::Setup => setup::run(setup::Strictness::Strict),
        Command::Demo(args) => demo::run(args),
        Command::Ci => ci::run(),
        Command::Manifests => manifests::run(),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Image(args) => image::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The cause chain, without a backtrace even when RUST_BACKTRACE is set: these are
            // operator-facing messages, not bugs.
            eprintln!("xtask: error after {}: {err}", ui::human(started.elapsed()));
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
