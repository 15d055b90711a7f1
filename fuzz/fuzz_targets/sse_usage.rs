//! The usage tap (proxy/usage.rs) on SSE and JSON answers, framed two ways.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_user::fuzzing::sse_usage(data));
