//! Types shared by Turnstile's eBPF programs (`gateway-ebpf`) and the
//! userspace loader (`gateway-user::kernel`).
//!
//! Every map value is `#[repr(C)]` with named fields: the maps are BTF maps,
//! so `bpftool map dump pinned /sys/fs/bpf/turnstile/<MAP>` prints these
//! field names. Map and program names are at most 15 characters (the kernel's
//! object name limit; longer names are silently truncated).
#![cfg_attr(not(test), no_std)]

/// Names of the maps, as pinned under the bpffs directory.
pub mod map_names {
    /// `SK_STORAGE`: [`super::SockTag`] set by userspace on the proxy's sockets.
    pub const SOCK_TAGS: &str = "SOCK_TAGS";
    /// `SK_STORAGE`: [`super::ConnState`], kernel-owned per-socket state.
    pub const CONN_STATE: &str = "CONN_STATE";
    /// `PERCPU_ARRAY`: [`super::ModelStats`] indexed by model id.
    pub const MODEL_STATS: &str = "MODEL_STATS";
    /// `ARRAY`: [`super::ModelName`] indexed by model id (written by userspace).
    pub const MODEL_NAMES: &str = "MODEL_NAMES";
    /// `LRU_HASH`: [`super::ClientKey`] → [`super::Penalty`].
    pub const PENALTIES: &str = "PENALTIES";
    /// `PERCPU_ARRAY`: one [`super::RefuseStats`].
    pub const REFUSED: &str = "REFUSED";
    /// `ARRAY`: one [`super::Config`].
    pub const CONFIG: &str = "CONFIG";

    /// Every map, in the order `turnstile inspect` prints them.
    pub const ALL: [&str; 7] = [CONFIG, MODEL_NAMES, MODEL_STATS, PENALTIES, REFUSED, SOCK_TAGS, CONN_STATE];
}

/// Names of the programs (function names in the object).
pub mod program_names {
    /// `cgroup_skb/ingress`: per-model accounting of received packets.
    pub const SKB_INGRESS: &str = "tn_skb_in";
    /// `cgroup_skb/egress`: per-model accounting of sent packets.
    pub const SKB_EGRESS: &str = "tn_skb_out";
    /// `sk_lookup`: refuses new connections from penalised clients.
    pub const SK_LOOKUP: &str = "tn_lookup";
    /// `xdp`: drops SYNs from penalised clients (flood mode).
    pub const XDP: &str = "tn_xdp";
}

/// Model ids index [`ModelStats`] and [`ModelName`]; id 0 means "not known
/// yet" (traffic is held as pending on the socket until a model is tagged).
pub const MAX_MODELS: u32 = 1024;

/// Most penalised clients the kernel map holds (LRU beyond that).
pub const MAX_PENALTIES: u32 = 65536;

/// Longest model name stored in [`ModelName`] (longer names are cut).
pub const MODEL_NAME_LEN: usize = 64;

/// Which side of the proxy a socket is on.
pub const SIDE_CLIENT: u32 = 0;
/// An upstream (engine pod) connection.
pub const SIDE_UPSTREAM: u32 = 1;

/// A client connection is sending a request (a new connection, or data after
/// an answer): what it sends is held until the gateway starts answering, by
/// which time the request's model is tagged on the socket.
pub const PHASE_REQUEST: u32 = 0;
/// The gateway has started answering: the request held is charged to the
/// model tagged, and so is everything until the client sends data again.
pub const PHASE_ANSWER: u32 = 1;

/// The tag userspace puts on a socket: which model its traffic belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTag {
    /// Model id (1..[`MAX_MODELS`]); 0 while the first request is being read.
    pub model: u32,
    /// [`SIDE_CLIENT`] or [`SIDE_UPSTREAM`].
    pub side: u32,
}

/// Kernel-owned state of a tagged socket: traffic held until its model is
/// known, the model its connection was last counted for, and, on client
/// connections, where the request/answer cycle stands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// The model this connection was counted under in `*_connections`.
    pub counted_model: u32,
    /// Client connections: [`PHASE_REQUEST`] or [`PHASE_ANSWER`].
    pub phase: u32,
    pub pending_in_packets: u64,
    pub pending_in_bytes: u64,
    pub pending_out_packets: u64,
    pub pending_out_bytes: u64,
}

/// Per-model counters (one per CPU; userspace sums them). Bytes are IP
/// packet lengths (payload plus IP and TCP headers); packets count GSO
/// segments, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub client_in_packets: u64,
    pub client_in_bytes: u64,
    pub client_out_packets: u64,
    pub client_out_bytes: u64,
    pub upstream_in_packets: u64,
    pub upstream_in_bytes: u64,
    pub upstream_out_packets: u64,
    pub upstream_out_bytes: u64,
    pub client_connections: u64,
    pub upstream_connections: u64,
}

impl ModelStats {
    /// Adds `other` field by field (summing the per-CPU values).
    pub fn add(&mut self, other: &Self) {
        let Self {
            client_in_packets,
            client_in_bytes,
            client_out_packets,
            client_out_bytes,
            upstream_in_packets,
            upstream_in_bytes,
            upstream_out_packets,
            upstream_out_bytes,
            client_connections,
            upstream_connections,
        } = other;
        self.client_in_packets += client_in_packets;
        self.client_in_bytes += client_in_bytes;
        self.client_out_packets += client_out_packets;
        self.client_out_bytes += client_out_bytes;
        self.upstream_in_packets += upstream_in_packets;
        self.upstream_in_bytes += upstream_in_bytes;
        self.upstream_out_packets += upstream_out_packets;
        self.upstream_out_bytes += upstream_out_bytes;
        self.client_connections += client_connections;
        self.upstream_connections += upstream_connections;
    }
}

/// A model's name, so the pinned maps explain themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelName {
    /// Length of the name in `name`.
    pub len: u32,
    pub _pad: u32,
    /// UTF-8, `len` bytes used.
    pub name: [u8; MODEL_NAME_LEN],
}

impl Default for ModelName {
    fn default() -> Self {
        Self { len: 0, _pad: 0, name: [0; MODEL_NAME_LEN] }
    }
}

/// A client address: IPv6, or IPv4 mapped into IPv6 (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub addr: [u8; 16],
}

impl ClientKey {
    /// The key of an IPv4 address given as its four octets.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self { addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] }
    }
}

/// A penalty: new connections from the client are refused until it expires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Penalty {
    /// Expiry on the kernel's monotonic clock (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
    pub expires_ns: u64,
    /// The same expiry as Unix time in milliseconds, for people and `turnstile inspect`.
    pub until_unix_ms: u64,
}

/// Connections refused in the kernel (one per CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefuseStats {
    /// Refused by the `sk_lookup` program (the client saw connection refused).
    pub sk_lookup: u64,
    /// SYNs dropped by the XDP program.
    pub xdp: u64,
}

/// Settings the programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The proxy listener's TCP port, host byte order; 0 disables fast reject.
    pub proxy_port: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (for every impl below): plain `#[repr(C)]` structs of integers
    // and byte arrays with explicit padding fields, so every bit pattern is a
    // valid value and there are no implicit padding bytes.
    #[allow(unsafe_code)]
    mod impls {
        use super::super::*;
        unsafe impl aya::Pod for SockTag {}
        unsafe impl aya::Pod for ConnState {}
        unsafe impl aya::Pod for ModelStats {}
        unsafe impl aya::Pod for ModelName {}
        unsafe impl aya::Pod for ClientKey {}
        unsafe impl aya::Pod for Penalty {}
        unsafe impl aya::Pod for RefuseStats {}
        unsafe impl aya::Pod for Config {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<SockTag>(), 8);
        assert_eq!(size_of::<ConnState>(), 40);
        assert_eq!(size_of::<ModelStats>(), 80);
        assert_eq!(size_of::<ModelName>(), 8 + MODEL_NAME_LEN);
        assert_eq!(size_of::<ClientKey>(), 16);
        assert_eq!(size_of::<Penalty>(), 16);
        assert_eq!(size_of::<RefuseStats>(), 16);
        assert_eq!(size_of::<Config>(), 8);
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name}");
        }
        for name in
            [program_names::SKB_INGRESS, program_names::SKB_EGRESS, program_names::SK_LOOKUP, program_names::XDP]
        {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn v4_keys_are_mapped_addresses() {
        assert_eq!(ClientKey::v4([127, 0, 0, 2]).addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2]);
    }

    #[test]
    fn stats_add_field_by_field() {
        let mut total = ModelStats::default();
        let one = ModelStats { client_in_bytes: 10, upstream_connections: 1, ..ModelStats::default() };
        total.add(&one);
        total.add(&one);
        assert_eq!(total.client_in_bytes, 20);
        assert_eq!(total.upstream_connections, 2);
    }
}
