//! Turnstile's kernel programs. They are compiled for `bpfel-unknown-none`
//! and embedded into the `turnstile` binary once kernel assist lands; on the
//! host target this crate builds to an empty binary so that workspace-wide
//! `cargo clippy` and `cargo test` keep working.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}
