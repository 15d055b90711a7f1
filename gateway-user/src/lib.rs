//! Turnstile: an AIBrix-compatible LLM inference gateway.
//!
//! The proxy (request lifecycle) calls profiles, routing and metrics; routing
//! and profiles read the pod store; discovery feeds the pod store.
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod admin;
pub mod cli;
pub mod discovery;
pub mod errors;
pub mod metrics;
pub mod profiles;
pub mod proxy;
pub mod routing;
