//! The request body probe (proxy/request.rs): model, stream flag, token budget, prompt text.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_user::fuzzing::request_body(data));
