//! The `model.aibrix.ai/config` annotation (profiles.rs) and profile resolution.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_user::fuzzing::config_annotation(data));
