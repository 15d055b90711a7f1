//! Network namespaces, for runs that need a loopback of their own (kernel assist attaches to
//! the namespace alone) or a second source address on it.
//!
//! [`NetNs::create`] makes a namespace with `ip netns add` and brings its loopback up;
//! [`NetNs::enter`] moves the calling thread into it. Everything that thread then does
//! happens inside: the sockets it opens, the threads it starts and the processes it spawns
//! (engines, gateways, redis-server), which inherit the namespace of the thread that forks
//! them. Dropping the guard moves the thread back; dropping the namespace deletes it. The
//! mount namespace is left alone, so bpffs pins stay visible from the host. Needs root.

use std::fs::File;
use std::io;
use std::os::fd::AsFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// `ip netns add` a fresh namespace named after `tag` and this process, and bring its
    /// loopback up.
    pub fn create(tag: &str) -> io::Result<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("ts-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` lists it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds `cidr` (e.g. `127.0.0.2/8`) to the namespace's loopback, so a client can bind to
    /// a second source address.
    pub fn add_loopback_address(&self, cidr: &str) -> io::Result<()> {
        self.exec(&["ip", "addr", "add", cidr, "dev", "lo"])
    }

    /// Runs a command inside the namespace (`ip netns exec`); fails unless it succeeds.
    fn exec(&self, command: &[&str]) -> io::Result<()> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        ip(&args)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> io::Result<Entered> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(format!("/var/run/netns/{}", self.name))?;
        move_into_link_name_space(target.as_fd(), Some(LinkNameSpaceType::Network))?;
        Ok(Entered { original })
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

/// Runs `ip ARGS`; its stderr becomes the error when it fails.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
}
