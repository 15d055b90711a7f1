//! Network namespaces for the kernel-assist tests.
//!
//! [`NetNs::create`] makes a namespace with `ip netns add` and brings its
//! loopback up; [`NetNs::enter`] moves the calling thread into it. Everything
//! that thread then does happens inside: the sockets it opens, and the
//! processes it spawns (engines, gateways, redis-server), which inherit the
//! namespace of the thread that forks them. Use a current-thread runtime
//! (`#[tokio::test]`), so every socket of the test is opened on that thread.
//! Dropping the guard moves the thread back; dropping the namespace deletes
//! it. The mount namespace is left alone, so bpffs pins are visible from the
//! host (`bpftool`, `turnstile inspect`).

use std::fs::File;
use std::os::fd::AsFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

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

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// `ip netns add` a fresh namespace and bring its loopback up.
    pub fn create(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("ts-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `cidr` (e.g. `127.0.0.2/8`) to the namespace's loopback, so a
    /// client can bind to a second source address.
    pub fn add_loopback_address(&self, cidr: &str) {
        self.exec(&["ip", "addr", "add", cidr, "dev", "lo"]);
    }

    /// Runs a command inside the namespace (`ip netns exec`), asserting success.
    pub fn exec(&self, command: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        ip(&args);
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Entered {
        let original = File::open("/proc/thread-self/ns/net").expect("open this thread's network namespace");
        let target = File::open(format!("/var/run/netns/{}", self.name)).expect("open the test namespace");
        move_into_link_name_space(target.as_fd(), Some(LinkNameSpaceType::Network)).expect("setns into the namespace");
        Entered { original }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The calling thread is inside a [`NetNs`] until this drops.
#[derive(Debug)]
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = move_into_link_name_space(self.original.as_fd(), Some(LinkNameSpaceType::Network));
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
