//! The maps, all BTF-defined so that `bpftool map dump` prints field names.
//! Userspace pins them under the bpffs directory (aya-ebpf's BTF maps carry no
//! pinning attribute); each static's name is the map's kernel name (≤ 15 chars,
//! see `gateway_common::map_names`).

use aya_ebpf::btf_maps::{Array, LruHashMap, PerCpuArray, SkStorage};
use aya_ebpf::macros::btf_map;
use gateway_common::{
    ClientKey, Config, ConnState, MAX_MODELS, MAX_PENALTIES, ModelName, ModelStats, Penalty, RefuseStats, SockTag,
};

/// Set by userspace on each client and upstream socket of the proxy (keyed by
/// the socket's fd from userspace); freed by the kernel with the socket.
#[btf_map]
pub static SOCK_TAGS: SkStorage<SockTag> = SkStorage::new();

/// Kernel-owned state of tagged sockets, created on their first packet.
#[btf_map]
pub static CONN_STATE: SkStorage<ConnState> = SkStorage::new();

/// Per-model counters, one slot per CPU, indexed by model id.
#[btf_map]
pub static MODEL_STATS: PerCpuArray<ModelStats, { MAX_MODELS as usize }> = PerCpuArray::new();

/// Model id → name, written by userspace for `bpftool` and `turnstile inspect`.
#[btf_map]
pub static MODEL_NAMES: Array<ModelName, { MAX_MODELS as usize }> = Array::new();

/// Penalised clients. LRU, so a flood of penalties evicts the oldest instead
/// of failing inserts.
#[btf_map]
pub static PENALTIES: LruHashMap<ClientKey, Penalty, { MAX_PENALTIES as usize }> = LruHashMap::new();

/// Connections refused in the kernel, per CPU.
#[btf_map]
pub static REFUSED: PerCpuArray<RefuseStats, 1> = PerCpuArray::new();

/// The proxy port the reject programs guard.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// The pointer helpers take for a map: the address of its definition, which
/// the loader relocates to the map's fd.
#[inline(always)]
pub fn map_ptr<T>(map: &T) -> *mut core::ffi::c_void {
    core::ptr::from_ref(map).cast_mut().cast()
}

/// The port fast reject guards, if configured.
#[inline(always)]
pub fn proxy_port() -> Option<u32> {
    let port = CONFIG.get(0)?.proxy_port;
    (port != 0).then_some(port)
}

/// Whether `key` has a penalty that has not expired yet.
#[inline(always)]
pub fn penalised(key: &ClientKey) -> bool {
    #[allow(unsafe_code)]
    // SAFETY: the value is copied out at once; an LRU eviction racing with the
    // read can only make the copy stale, never invalid memory.
    let expires_ns = match unsafe { PENALTIES.get(key) } {
        Some(penalty) => penalty.expires_ns,
        None => return false,
    };
    #[allow(unsafe_code)]
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    now < expires_ns
}

/// Counts a refused connection on this CPU.
#[inline(always)]
pub fn count_refused(xdp: bool) {
    if let Some(stats) = REFUSED.get_ptr_mut(0) {
        #[allow(unsafe_code)]
        // SAFETY: a per-CPU slot of this map, valid for the program's run.
        unsafe {
            if xdp {
                (*stats).xdp += 1;
            } else {
                (*stats).sk_lookup += 1;
            }
        }
    }
}
