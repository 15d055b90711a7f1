//! Loading the eBPF object, attaching its programs and pinning its maps.
//!
//! One fallible entry point, [`load`]: it either returns a [`Loaded`] with
//! everything attached, or a [`LoadError`] saying why (with the verifier log
//! when the kernel rejected a program). Dropping [`Loaded`] detaches every
//! program, so a crash leaves nothing attached unless links were pinned on
//! purpose (`--pin-links`). Pinned maps stay for inspection and are replaced
//! at the next start.
//!
//! Where the programs attach, and why:
//! - `cgroup_skb` ingress/egress on the gateway's own cgroup v2 (from
//!   `/proc/self/cgroup`, under the cgroup2 mount, e.g. the hybrid layout's
//!   `/sys/fs/cgroup/unified`): it sees the packets of every socket the gateway
//!   owns and nothing of processes outside its cgroup. When the gateway sits in
//!   the root cgroup (as in many containers' view), that is the root: other
//!   processes' sockets then pass the program too, and cost one socket-storage
//!   lookup that finds no tag. Attached through a BPF link, so other programs
//!   on the same cgroup (another replica's) keep working.
//! - `sk_lookup` on the gateway's network namespace (`/proc/self/ns/net`): it
//!   is the only hook that runs before a listener is chosen, so a drop there
//!   means "connection refused" for the client and no work for the proxy. It
//!   acts only on the proxy port (the `CONFIG` map).
//! - `xdp` (with `--penalty-mode xdp`) on the chosen interfaces, letting the
//!   kernel pick native or generic mode.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SkStorage};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSkb, CgroupSkbAttachType, ProgramError, SkLookup, Xdp, XdpMode};
use aya::{Ebpf, EbpfError, EbpfLoader};
use gateway_common::{
    ClientKey, Config, MAX_MODELS, MODEL_NAME_LEN, ModelName, ModelStats, Penalty, RefuseStats, SockTag, map_names,
    program_names,
};

use super::PenaltyMode;
use super::penalties::KernelPenalties;
use crate::logfmt::chain;

/// The object `build.rs` built (empty when the eBPF toolchain was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

/// How the object was built, from `build.rs`.
pub const BUILD_NOTE: &str = env!("TURNSTILE_EBPF_BUILD");

/// The bpffs magic number (`statfs.f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What to load and where.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Where maps and programs are pinned.
    pub bpffs_dir: PathBuf,
    /// Also pin the program links (they then outlive the process).
    pub pin_links: bool,
    pub penalty_mode: PenaltyMode,
    /// Interfaces for XDP mode; empty: all.
    pub xdp_interfaces: Vec<String>,
}

/// Why kernel assist could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this binary carries no eBPF object ({0})")]
    NotBuilt(&'static str),
    #[error("bpffs directory {dir}: {reason}")]
    Bpffs { dir: PathBuf, reason: String },
    #[error("loading the eBPF object (maps): {0}")]
    Object(#[source] EbpfError),
    #[error("program {name}: {reason}")]
    Program {
        name: &'static str,
        reason: String,
        /// The kernel verifier's log when it rejected the program.
        verifier_log: Option<String>,
    },
    #[error("attaching {what}: {reason}")]
    Attach { what: String, reason: String },
    #[error("map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

impl LoadError {
    /// The verifier log, when the kernel rejected a program.
    pub fn verifier_log(&self) -> Option<&str> {
        match self {
            Self::Program { verifier_log, .. } => verifier_log.as_deref(),
            _ => None,
        }
    }

    fn program(name: &'static str, source: &ProgramError) -> Self {
        match source {
            ProgramError::LoadError { io_error, verifier_log } => Self::Program {
                name,
                reason: format!("the kernel refused to load it ({io_error}); the verifier log tells why"),
                verifier_log: Some(verifier_log.to_string()),
            },
            other => Self::Program { name, reason: chain(other), verifier_log: None },
        }
    }
}

/// A socket fd for aya's socket-storage calls.
struct SockFd(RawFd);

impl AsRawFd for SockFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The loaded, attached programs and their maps.
pub struct Loaded {
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Ebpf,
    sock_tags: Mutex<SkStorage<MapData, SockTag>>,
    penalties: Mutex<BpfHashMap<MapData, ClientKey, Penalty>>,
    model_names: Mutex<Array<MapData, ModelName>>,
    config: Mutex<Array<MapData, Config>>,
    model_stats: PerCpuArray<MapData, ModelStats>,
    refused: PerCpuArray<MapData, RefuseStats>,
    /// Pinned links (`--pin-links`); they keep the programs attached after exit.
    _pinned_links: Vec<PinnedLink>,
    pin_dir: PathBuf,
    pin_links: bool,
    /// Where the programs are attached, for logs and `/readyz`.
    pub attached: String,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("pin_dir", &self.pin_dir).field("attached", &self.attached).finish()
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // Program pins would keep the (detached) programs loaded; links, and
        // so the programs, stay only when pinned on purpose.
        if !self.pin_links {
            for (name, _) in self.ebpf.programs() {
                let _ = std::fs::remove_file(self.pin_dir.join(name));
            }
        }
    }
}

/// Loads the programs, attaches them, pins the maps.
pub fn load(config: &LoadConfig) -> Result<Loaded, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NotBuilt(BUILD_NOTE));
    }
    let pin_dir = prepare_bpffs(&config.bpffs_dir)?;
    clear_pins(&pin_dir);
    let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(LoadError::Object)?;

    let mut links: Vec<(String, FdLink)> = Vec::new();
    let (cgroup_path, cgroup) = own_cgroup()?;
    for (name, attach_type) in [
        (program_names::SKB_INGRESS, CgroupSkbAttachType::Ingress),
        (program_names::SKB_EGRESS, CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
        program.load().map_err(|e| LoadError::program(name, &e))?;
        // On kernels with BPF links (5.7+; sk_lookup needs 5.9 anyway) aya
        // attaches through a link, which always coexists with other programs
        // on the cgroup and rejects explicit attach flags: hence `Single`.
        let link = program.attach(&cgroup, attach_type, CgroupAttachMode::Single).map_err(|e| LoadError::Attach {
            what: format!("{name} to cgroup {}", cgroup_path.display()),
            reason: chain(&e),
        })?;
        if config.pin_links {
            let link = program.take_link(link).map_err(|e| LoadError::program(name, &e))?;
            let fd = FdLink::try_from(link)
                .map_err(|e| LoadError::Attach { what: format!("pinning {name}"), reason: chain(&e) })?;
            links.push((name.to_owned(), fd));
        }
    }
    let mut attached = format!("cgroup_skb on {}", cgroup_path.display());

    match config.penalty_mode {
        PenaltyMode::SkLookup => {
            let netns = File::open("/proc/self/ns/net").map_err(|e| LoadError::Attach {
                what: "sk_lookup".into(),
                reason: format!("opening /proc/self/ns/net: {e}"),
            })?;
            let name = program_names::SK_LOOKUP;
            let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
            program.load().map_err(|e| LoadError::program(name, &e))?;
            let link = program.attach(&netns).map_err(|e| LoadError::Attach {
                what: format!("{name} to the network namespace"),
                reason: chain(&e),
            })?;
            if config.pin_links {
                let link = program.take_link(link).map_err(|e| LoadError::program(name, &e))?;
                links.push((name.to_owned(), FdLink::from(link)));
            }
            attached.push_str(", sk_lookup on the network namespace");
        }
        PenaltyMode::Xdp => {
            let interfaces =
                if config.xdp_interfaces.is_empty() { all_interfaces() } else { config.xdp_interfaces.clone() };
            if interfaces.is_empty() {
                return Err(LoadError::Attach { what: "xdp".into(), reason: "no network interfaces found".into() });
            }
            let name = program_names::XDP;
            let program: &mut Xdp = program_mut(&mut ebpf, name)?;
            program.load().map_err(|e| LoadError::program(name, &e))?;
            for interface in &interfaces {
                let link = program
                    .attach(interface, XdpMode::Default)
                    .map_err(|e| LoadError::Attach { what: format!("{name} to {interface}"), reason: chain(&e) })?;
                if config.pin_links {
                    let link = program.take_link(link).map_err(|e| LoadError::program(name, &e))?;
                    let fd = FdLink::try_from(link)
                        .map_err(|e| LoadError::Attach { what: format!("pinning {name}"), reason: chain(&e) })?;
                    links.push((format!("{name}_{interface}"), fd));
                }
            }
            attached.push_str(&format!(", xdp on {}", interfaces.join(",")));
        }
    }

    for (name, map) in ebpf.maps() {
        map.pin(pin_dir.join(name))
            .map_err(|e| LoadError::Attach { what: format!("pinning map {name}"), reason: chain(&e) })?;
    }
    for (name, program) in ebpf.programs_mut() {
        // Programs not used in this mode were never loaded and cannot be pinned.
        if program.fd().is_ok() {
            program
                .pin(pin_dir.join(name))
                .map_err(|e| LoadError::Attach { what: format!("pinning program {name}"), reason: chain(&e) })?;
        }
    }
    let mut pinned_links = Vec::new();
    for (name, link) in links {
        let pinned = link
            .pin(pin_dir.join(format!("link_{name}")))
            .map_err(|e| LoadError::Attach { what: format!("pinning link {name}"), reason: chain(&e) })?;
        pinned_links.push(pinned);
    }

    let sock_tags = take_map(&mut ebpf, map_names::SOCK_TAGS)?;
    let penalties = take_map(&mut ebpf, map_names::PENALTIES)?;
    let model_names = take_map(&mut ebpf, map_names::MODEL_NAMES)?;
    let config_map = take_map(&mut ebpf, map_names::CONFIG)?;
    let model_stats = take_map(&mut ebpf, map_names::MODEL_STATS)?;
    let refused = take_map(&mut ebpf, map_names::REFUSED)?;
    Ok(Loaded {
        ebpf,
        sock_tags: Mutex::new(sock_tags),
        penalties: Mutex::new(penalties),
        model_names: Mutex::new(model_names),
        config: Mutex::new(config_map),
        model_stats,
        refused,
        _pinned_links: pinned_links,
        pin_dir,
        pin_links: config.pin_links,
        attached,
    })
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(LoadError::Map { name, reason: "program not in the object".into() })?;
    program.try_into().map_err(|e| LoadError::program(name, &e))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Map { name, reason: "not in the object".into() })?;
    T::try_from(map).map_err(|e| LoadError::Map { name, reason: chain(&e) })
}

#[allow(clippy::unnecessary_cast)] // `f_type`'s integer type differs between architectures
fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes `dir` a directory on a bpffs: used as is when it is one, created
/// when its parent is one; otherwise, as root, a bpffs is mounted on it (or on
/// its parent when it cannot be created there, e.g. `/sys/fs/bpf` unmounted
/// inside sysfs).
pub fn prepare_bpffs(dir: &Path) -> Result<PathBuf, LoadError> {
    let fail = |reason: String| LoadError::Bpffs { dir: dir.to_owned(), reason };
    if is_bpffs(dir) {
        return Ok(dir.to_owned());
    }
    // Two gateways starting at once on a host without a bpffs would each
    // mount one on the parent, and the second mount hides what the first
    // pinned beneath it: check and mount under a host-wide lock.
    let _lock = mount_lock().map_err(|e| fail(format!("taking the bpffs mount lock: {e}")))?;
    if is_bpffs(dir) {
        return Ok(dir.to_owned());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating it: {e}")))?;
        return Ok(dir.to_owned());
    }
    if !rustix::process::geteuid().is_root() {
        return Err(fail("not on a bpffs, and mounting one needs root".into()));
    }
    let mount = |target: &Path| {
        rustix::mount::mount("bpf", target, "bpf", rustix::mount::MountFlags::empty(), None::<&std::ffi::CStr>)
            .map_err(|e| fail(format!("mounting a bpffs on {}: {e}", target.display())))
    };
    if std::fs::create_dir_all(dir).is_ok() {
        mount(dir)?;
    } else {
        mount(parent)?;
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating it: {e}")))?;
    }
    tracing::info!(dir = %dir.display(), "mounted a bpffs for kernel assist");
    Ok(dir.to_owned())
}

/// An exclusive `flock` on a host-wide file, held until dropped.
fn mount_lock() -> io::Result<File> {
    let path = ["/run/lock", "/run", "/tmp"]
        .iter()
        .map(Path::new)
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("/tmp"))
        .join("turnstile-bpffs.lock");
    let file = File::options().create(true).truncate(false).write(true).open(path)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(file)
}

/// Removes what a previous run pinned here (maps, programs, links), so a
/// crashed predecessor's state does not leak into this run.
fn clear_pins(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let ours = |name: &str| {
        map_names::ALL.contains(&name)
            || [program_names::SKB_INGRESS, program_names::SKB_EGRESS, program_names::SK_LOOKUP, program_names::XDP]
                .contains(&name)
            || name.starts_with("link_")
    };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(ours) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The gateway's own cgroup v2 directory, opened.
fn own_cgroup() -> Result<(PathBuf, File), LoadError> {
    let fail = |reason: String| LoadError::Attach { what: "cgroup_skb".into(), reason };
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| fail(format!("/proc/self/cgroup: {e}")))?;
    let relative = cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| fail("no cgroup v2 entry in /proc/self/cgroup".into()))?;
    let relative = relative.trim().trim_start_matches('/');
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| fail(format!("/proc/self/mountinfo: {e}")))?;
    let Some(root) = cgroup2_mount(&mountinfo) else {
        return open_through_private_mount(relative);
    };
    let path = root.join(relative);
    let file = File::open(&path).map_err(|e| fail(format!("opening {}: {e}", path.display())))?;
    Ok((path, file))
}

/// No cgroup2 mount is visible (e.g. under `ip netns exec`, which mounts a
/// fresh /sys): as root, mount the hierarchy briefly, open our cgroup, and
/// detach the mount again. The open directory is all the attachment needs.
fn open_through_private_mount(relative: &str) -> Result<(PathBuf, File), LoadError> {
    use rustix::mount::{MountFlags, UnmountFlags, mount, unmount};
    let fail = |reason: String| LoadError::Attach { what: "cgroup_skb".into(), reason };
    if !rustix::process::geteuid().is_root() {
        return Err(fail("no cgroup2 filesystem is mounted".into()));
    }
    let dir = std::env::temp_dir().join(format!("turnstile-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    let opened = mount("cgroup2", &dir, "cgroup2", MountFlags::empty(), None::<&std::ffi::CStr>)
        .map_err(|e| fail(format!("no cgroup2 filesystem is mounted, and mounting one failed: {e}")))
        .and_then(|()| {
            let path = dir.join(relative);
            let file = File::open(&path).map_err(|e| fail(format!("opening {}: {e}", path.display())));
            let _ = unmount(&dir, UnmountFlags::DETACH);
            file
        });
    let _ = std::fs::remove_dir(&dir);
    Ok((PathBuf::from(format!("cgroup2:/{relative}")), opened?))
}

/// The mount point of the cgroup2 filesystem in a mountinfo listing.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

fn all_interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The kernel key of a client address.
pub fn client_key(ip: IpAddr) -> ClientKey {
    match ip {
        IpAddr::V4(v4) => ClientKey::v4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ClientKey::v4(v4.octets()),
            None => ClientKey { addr: v6.octets() },
        },
    }
}

/// The client address of a kernel key.
pub fn key_addr(key: &ClientKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(key.addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (now.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(now.tv_nsec as u64)
}

impl Loaded {
    /// Sets the port the reject programs guard (0: none).
    pub fn set_proxy_port(&self, port: u16) -> io::Result<()> {
        let mut config = self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        config.set(0, Config { proxy_port: u32::from(port), _pad: 0 }, 0).map_err(io::Error::other)
    }

    /// Writes `tag` into the socket's storage.
    pub fn tag_socket(&self, fd: RawFd, tag: SockTag) -> io::Result<()> {
        let mut tags = self.sock_tags.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tags.insert(&SockFd(fd), tag, 0).map_err(io::Error::other)
    }

    /// Records a model's name for `bpftool` and `turnstile inspect`.
    pub fn name_model(&self, id: u32, name: &str) -> io::Result<()> {
        let mut value = ModelName::default();
        let bytes = name.as_bytes();
        let len = bytes.len().min(MODEL_NAME_LEN);
        value.name[..len].copy_from_slice(&bytes[..len]);
        value.len = len as u32;
        let mut names = self.model_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        names.set(id, value, 0).map_err(io::Error::other)
    }

    /// One model's counters, summed over CPUs.
    pub fn model_stats(&self, id: u32) -> ModelStats {
        let mut total = ModelStats::default();
        if id < MAX_MODELS
            && let Ok(values) = self.model_stats.get(&id, 0)
        {
            for value in values.iter() {
                total.add(value);
            }
        }
        total
    }

    /// Connections refused in the kernel, summed over CPUs.
    pub fn refused(&self) -> RefuseStats {
        let mut total = RefuseStats::default();
        if let Ok(values) = self.refused.get(&0, 0) {
            for value in values.iter() {
                total.sk_lookup += value.sk_lookup;
                total.xdp += value.xdp;
            }
        }
        total
    }
}

impl KernelPenalties for Loaded {
    fn insert(&self, ip: IpAddr, remaining: Duration, until_unix_ms: u64) {
        let expires_ns = monotonic_ns().saturating_add(u64::try_from(remaining.as_nanos()).unwrap_or(u64::MAX));
        let mut map = self.penalties.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = map.insert(client_key(ip), Penalty { expires_ns, until_unix_ms }, 0) {
            tracing::warn!(client = %ip, error = %err, "penalty not written to the kernel map");
        }
    }

    fn remove(&self, ip: IpAddr) {
        let mut map = self.penalties.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = map.remove(&client_key(ip));
    }
}

impl super::counters::CounterSource for Loaded {
    fn model_stats(&self, model: u32) -> ModelStats {
        Loaded::model_stats(self, model)
    }

    fn refused_in_kernel(&self) -> RefuseStats {
        self.refused()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_layout() {
        let mountinfo = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount("32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), None);
    }

    #[test]
    fn client_keys_round_trip() {
        for ip in ["127.0.0.2", "::1", "2001:db8::7", "::ffff:10.1.2.3"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = key_addr(&client_key(ip));
            assert_eq!(back, super::super::penalties::normalize(ip));
        }
        assert_eq!(client_key("10.1.2.3".parse().unwrap()), ClientKey::v4([10, 1, 2, 3]));
    }

    /// An Ethernet frame from `source`: an IPv4 (with `ip_options` bytes of
    /// options) or IPv6 header, then a TCP header with `flags` to `port`.
    struct Frame {
        source: IpAddr,
        port: u16,
        flags: u8,
        ip_options: usize,
        fragment_offset: u16,
        next_header: u8,
        truncate_to: Option<usize>,
    }

    impl Frame {
        fn syn(source: &str, port: u16) -> Self {
            let source: IpAddr = source.parse().unwrap();
            Self { source, port, flags: 0x02, ip_options: 0, fragment_offset: 0, next_header: 6, truncate_to: None }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut frame = vec![0u8; 12];
            let tcp = {
                let mut tcp = vec![0u8; 20];
                tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
                tcp[2..4].copy_from_slice(&self.port.to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = self.flags;
                tcp
            };
            match self.source {
                IpAddr::V4(v4) => {
                    frame.extend_from_slice(&0x0800u16.to_be_bytes());
                    let header_len = 20 + self.ip_options;
                    let mut ip = vec![0u8; header_len];
                    ip[0] = 0x40 | (header_len / 4) as u8;
                    ip[2..4].copy_from_slice(&((header_len + tcp.len()) as u16).to_be_bytes());
                    ip[6..8].copy_from_slice(&self.fragment_offset.to_be_bytes());
                    ip[8] = 64;
                    ip[9] = self.next_header;
                    ip[12..16].copy_from_slice(&v4.octets());
                    ip[16..20].copy_from_slice(&[127, 0, 0, 1]);
                    frame.extend_from_slice(&ip);
                }
                IpAddr::V6(v6) => {
                    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                    let mut ip = vec![0u8; 40];
                    ip[0] = 0x60;
                    ip[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
                    ip[6] = self.next_header;
                    ip[7] = 64;
                    ip[8..24].copy_from_slice(&v6.octets());
                    ip[39] = 1;
                    frame.extend_from_slice(&ip);
                }
            }
            frame.extend_from_slice(&tcp);
            frame.truncate(self.truncate_to.unwrap_or(frame.len()));
            frame
        }
    }

    const PORT: u16 = 8888;

    /// The object with program `name` loaded (through the verifier), the
    /// proxy port set to [`PORT`] and 10.0.0.7 and 2001:db8::7 penalised.
    fn loaded_for_test_run<P>(name: &'static str) -> Ebpf
    where
        for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
        P: LoadableProgram,
    {
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("object loads");
        program_mut::<P>(&mut ebpf, name).expect("program in the object").load_program();
        let mut config: Array<MapData, Config> = take_map(&mut ebpf, map_names::CONFIG).expect("config map");
        config.set(0, Config { proxy_port: u32::from(PORT), _pad: 0 }, 0).expect("port set");
        let mut penalties: BpfHashMap<MapData, ClientKey, Penalty> =
            take_map(&mut ebpf, map_names::PENALTIES).expect("penalties map");
        for ip in ["10.0.0.7", "2001:db8::7"] {
            let penalty = Penalty { expires_ns: u64::MAX, until_unix_ms: 0 };
            penalties.insert(client_key(ip.parse().unwrap()), penalty, 0).expect("penalty set");
        }
        ebpf
    }

    /// `load()` of the program types tested here (each type has its own).
    trait LoadableProgram {
        fn load_program(&mut self);
    }

    impl LoadableProgram for Xdp {
        fn load_program(&mut self) {
            self.load().expect("verifier accepts the XDP program");
        }
    }

    impl LoadableProgram for SkLookup {
        fn load_program(&mut self) {
            self.load().expect("verifier accepts the sk_lookup program");
        }
    }

    /// The XDP program's verdicts on synthetic frames, run by the kernel
    /// (`BPF_PROG_TEST_RUN`) against a penalty map holding 10.0.0.7 and
    /// 2001:db8::7. Needs root; skipped, saying so, without it.
    #[test]
    fn xdp_drops_exactly_the_syns_of_penalised_clients() {
        use aya::programs::{TestRun, TestRunOptions};
        if !rustix::process::geteuid().is_root() || OBJECT.is_empty() {
            eprintln!("SKIPPED xdp_drops_exactly_the_syns_of_penalised_clients: needs root and the eBPF object");
            return;
        }
        let ebpf = loaded_for_test_run::<Xdp>(program_names::XDP);
        let program: &Xdp = ebpf.program(program_names::XDP).expect("program").try_into().expect("xdp");
        let verdict = |frame: Frame| {
            let data = frame.bytes();
            let run = program.test_run(TestRunOptions { data_in: Some(&data), ..TestRunOptions::default() });
            match run.expect("test run").return_value {
                1 => "drop",
                2 => "pass",
                other => panic!("verdict {other}"),
            }
        };
        let cases = [
            ("IPv4 SYN from a penalised client", Frame::syn("10.0.0.7", PORT), "drop"),
            ("IPv4 SYN with IP options", Frame { ip_options: 8, ..Frame::syn("10.0.0.7", PORT) }, "drop"),
            ("IPv6 SYN from a penalised client", Frame::syn("2001:db8::7", PORT), "drop"),
            ("another client", Frame::syn("10.0.0.8", PORT), "pass"),
            ("another IPv6 client", Frame::syn("2001:db8::8", PORT), "pass"),
            ("another port", Frame::syn("10.0.0.7", PORT + 1), "pass"),
            ("SYN-ACK", Frame { flags: 0x12, ..Frame::syn("10.0.0.7", PORT) }, "pass"),
            ("data, no SYN", Frame { flags: 0x18, ..Frame::syn("10.0.0.7", PORT) }, "pass"),
            ("a later IPv4 fragment", Frame { fragment_offset: 185, ..Frame::syn("10.0.0.7", PORT) }, "pass"),
            ("first fragment, more to come", Frame { fragment_offset: 0x2000, ..Frame::syn("10.0.0.7", PORT) }, "drop"),
            ("UDP", Frame { next_header: 17, ..Frame::syn("10.0.0.7", PORT) }, "pass"),
            ("IPv6 extension header first", Frame { next_header: 0, ..Frame::syn("2001:db8::7", PORT) }, "pass"),
            (
                "cut inside the TCP header",
                Frame { truncate_to: Some(14 + 20 + 10), ..Frame::syn("10.0.0.7", PORT) },
                "pass",
            ),
            (
                "cut inside the IPv6 header",
                Frame { truncate_to: Some(14 + 30), ..Frame::syn("2001:db8::7", PORT) },
                "pass",
            ),
        ];
        let wrong: Vec<String> = cases
            .into_iter()
            .filter_map(|(name, frame, expected)| {
                let got = verdict(frame);
                (got != expected).then(|| format!("{name}: {got}, expected {expected}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// `struct bpf_sk_lookup` as `BPF_PROG_TEST_RUN` takes it (uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct SkLookupCtx {
        cookie: u64,
        family: u32,
        protocol: u32,
        remote_ip4: u32,
        remote_ip6: [u32; 4],
        remote_port: u16,
        _pad: u16,
        local_ip4: u32,
        local_ip6: [u32; 4],
        local_port: u32,
        ingress_ifindex: u32,
    }

    /// The `test` member of `union bpf_attr` for `BPF_PROG_TEST_RUN`.
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }

    const BPF_PROG_TEST_RUN: libc::c_long = 10;

    /// Runs `program` once on `ctx`; its verdict.
    fn run_sk_lookup(program: &SkLookup, ctx: &SkLookupCtx) -> std::io::Result<u32> {
        use std::os::fd::AsFd as _;
        let fd = program.fd().map_err(io::Error::other)?.as_fd().as_raw_fd();
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(fd).map_err(io::Error::other)?,
            ctx_in: std::ptr::from_ref(ctx) as u64,
            ctx_size_in: size_of::<SkLookupCtx>() as u32,
            repeat: 1,
            ..TestRunAttr::default()
        };
        #[allow(unsafe_code)]
        // SAFETY: bpf(2) with a `test` attribute of the documented layout; the
        // kernel reads `ctx` (alive for the call) and writes `retval` and
        // `duration` into `attr`, both owned here.
        let result = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, std::ptr::from_mut(&mut attr), size_of::<TestRunAttr>())
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(attr.retval)
    }

    /// The `sk_lookup` program's verdicts, run by the kernel on synthetic
    /// lookups against a penalty map holding 10.0.0.7 and 2001:db8::7.
    #[test]
    fn sk_lookup_refuses_exactly_the_penalised_clients_of_the_proxy_port() {
        if !rustix::process::geteuid().is_root() || OBJECT.is_empty() {
            eprintln!("SKIPPED sk_lookup_refuses_exactly_the_penalised_clients_of_the_proxy_port: needs root");
            return;
        }
        let ebpf = loaded_for_test_run::<SkLookup>(program_names::SK_LOOKUP);
        let program: &SkLookup =
            ebpf.program(program_names::SK_LOOKUP).expect("program").try_into().expect("sk_lookup");
        let lookup = |remote: &str, protocol: u32, port: u16| {
            let mut ctx = SkLookupCtx {
                protocol,
                local_port: u32::from(port),
                remote_port: 40000u16.to_be(),
                ..SkLookupCtx::default()
            };
            match remote.parse::<IpAddr>().unwrap() {
                IpAddr::V4(v4) => {
                    ctx.family = libc::AF_INET as u32;
                    ctx.remote_ip4 = u32::from_ne_bytes(v4.octets());
                    ctx.local_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
                }
                IpAddr::V6(v6) => {
                    ctx.family = libc::AF_INET6 as u32;
                    for (word, chunk) in ctx.remote_ip6.iter_mut().zip(v6.octets().chunks(4)) {
                        *word = u32::from_ne_bytes(chunk.try_into().unwrap());
                    }
                    ctx.local_ip6[3] = u32::from_ne_bytes([0, 0, 0, 1]);
                }
            }
            match run_sk_lookup(program, &ctx).expect("test run") {
                0 => "drop",
                1 => "pass",
                other => panic!("verdict {other}"),
            }
        };
        const TCP: u32 = 6;
        let cases = [
            ("IPv4 client under a penalty", lookup("10.0.0.7", TCP, PORT), "drop"),
            ("IPv6 client under a penalty", lookup("2001:db8::7", TCP, PORT), "drop"),
            ("another IPv4 client", lookup("10.0.0.8", TCP, PORT), "pass"),
            ("another IPv6 client", lookup("2001:db8::8", TCP, PORT), "pass"),
            ("another port", lookup("10.0.0.7", TCP, PORT + 1), "pass"),
            ("UDP to the proxy port", lookup("10.0.0.7", 17, PORT), "pass"),
        ];
        let wrong: Vec<String> = cases
            .into_iter()
            .filter(|(_, got, expected)| got != expected)
            .map(|(name, got, expected)| format!("{name}: {got}, expected {expected}"))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
