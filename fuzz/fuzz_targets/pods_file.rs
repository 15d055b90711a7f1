//! The pods file parser (discovery/pods_file.rs) and the pod store it feeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_user::fuzzing::pods_file(data));
