//! The engine /metrics parser (engine_metrics/parse.rs), as vLLM and as SGLang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_user::fuzzing::engine_metrics_page(data));
