//! Network namespaces for the kernel-assist tests (see [`testkit::netns`]).
//!
//! A test enters its namespace on the test thread; use a current-thread runtime
//! (`#[tokio::test]`), so every socket of the test is opened on that thread.

use std::process::Command;

pub use testkit::netns::{Entered, NetNs};

/// Why kernel tests cannot run here, if they cannot: not root, no `ip`, or a
/// kernel older than the programs need (sk_lookup: 5.9; BPF links on cgroups,
/// socket storage and BTF are older).
pub fn kernel_tests_unsupported() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root: kernel tests load eBPF programs and create network namespaces".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` command (iproute2) is not installed".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release.trim().split(['.', '-']).map(|part| part.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if (major, minor) < (5, 10) {
        return Some(format!("kernel {} is older than 5.10 (sk_lookup and BPF links)", release.trim()));
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    None
}
