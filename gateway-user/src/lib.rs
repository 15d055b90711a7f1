//! Turnstile: an AIBrix-compatible LLM inference gateway.
//!
//! The proxy (request lifecycle) calls profiles, limits, routing, kernel and metrics;
//! routing reads the pod store; discovery feeds the pod store; the kernel side
//! (eBPF counters and fast reject) is called and never calls back; traces
//! (OpenTelemetry spans and their export) is called by the proxy; only `cli`
//! knows clap and every module. `tests/module_edges.rs` holds the whole table.
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod admin;
pub mod cli;
pub mod discovery;
pub mod engine_metrics;
pub mod engine_report;
pub mod errors;
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub mod limits;
pub mod logfmt;
pub mod metrics;
pub mod plan;
pub mod profiles;
pub mod proxy;
pub mod redis_link;
pub mod routing;
pub mod tokens;
pub mod traces;
