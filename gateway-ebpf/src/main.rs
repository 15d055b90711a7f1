//! Turnstile's kernel programs, compiled for `bpfel-unknown-none` by
//! `gateway-user`'s build script and embedded into the `turnstile` binary.
//! On the host target this crate builds to an empty binary so that
//! workspace-wide `cargo clippy` and `cargo test` keep working.
//!
//! Two jobs (contract section 9):
//! - [`accounting`]: per-model packets and bytes, in and out, and connections,
//!   for the proxy's client and upstream sockets (`cgroup_skb` + socket storage);
//! - [`fast_reject`]: new connections from penalised clients are refused before
//!   the proxy ever sees them (`sk_lookup`), or their SYNs dropped (`xdp`).
//!
//! Nothing here logs: a log record per packet would flood the log ring buffer
//! and cost more than the work itself.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod accounting;
#[cfg(target_arch = "bpf")]
mod fast_reject;
#[cfg(target_arch = "bpf")]
mod maps;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that
    // could get here, and nothing in these programs can panic.
    loop {}
}

/// The programs use no GPL-only helper, so the project's own license applies.
#[cfg(target_arch = "bpf")]
#[allow(unsafe_code)]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
