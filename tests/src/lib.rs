//! Test harness for Turnstile: test-only binaries and the helpers integration tests share.

pub mod fake_apiserver;
pub mod harness;
pub mod load;
pub mod mock_engine;
pub mod netns;
pub mod otlp;
pub mod pd;
