//! `mock-engine`: a fake vLLM server for Turnstile's tests, demo and benchmarks.

use clap::Parser;
use turnstile_tests::mock_engine::{self, MockEngineArgs};

fn main() -> anyhow::Result<()> {
    mock_engine::run(&MockEngineArgs::parse())
}
