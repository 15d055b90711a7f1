//! A `pd` pair's bodies (proxy/pd/engine.rs): the client's body and the prefill's answer,
//! rewritten for each engine's handover.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_user::fuzzing::pd_bodies(data));
