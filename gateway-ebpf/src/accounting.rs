//! Per-model accounting: `cgroup_skb` ingress and egress programs that read
//! the socket's model tag from socket-local storage.
//!
//! Why this hook: the proxy knows a connection's model only after it has read
//! the request, and it knows the socket (its fd), not a packet 4-tuple that
//! tc/XDP could match. Socket storage set from userspace by fd is exact,
//! needs no 4-tuple map kept in sync with connection churn, and is freed by
//! the kernel with the socket. `cgroup_skb` sees every packet of the
//! gateway's sockets after GRO and before GSO, with `skb->sk` set, and
//! untagged sockets (anyone else's in the cgroup) cost one pointer check.
//!
//! Request by request on keep-alive client connections: the proxy learns a
//! request's model only after reading it, so the socket's tag cannot move to
//! the next model before that request's bytes arrive. The programs therefore
//! follow the HTTP/1.1 request/answer cycle themselves ([`ConnState::phase`]):
//! data from the client after an answer starts a request, and what the client
//! sends is held on the socket until the gateway sends data back (it answers
//! only once it has read the request and tagged its model); the client's
//! first packet after that charges what was held to the model tagged. No tag
//! change, and so no system call, is needed per request: the proxy tags a
//! socket only when the model changes. A client connection that is not yet
//! tagged (before `accept`) is recognised by the proxy port. Upstream
//! connections carry one model each (the proxy keeps a pool per pod and
//! model) and are tagged when opened. Handshake packets are not counted (the
//! socket does not exist yet); the client's last ACKs and FIN after the final
//! answer are left uncharged.

use aya_ebpf::bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock};
use aya_ebpf::helpers::generated::{bpf_sk_fullsock, bpf_sk_storage_get};
use aya_ebpf::macros::cgroup_skb;
use aya_ebpf::programs::SkBuffContext;
use gateway_common::{
    ConnState, MAX_MODELS, ModelStats, PHASE_ANSWER, PHASE_REQUEST, SIDE_CLIENT, SIDE_UPSTREAM, SockTag,
};

use crate::maps::{CONN_STATE, MODEL_STATS, SOCK_TAGS, map_ptr, proxy_port};

const IPPROTO_TCP: u32 = 6;
/// `bpf_sock.state` of a listening socket.
const BPF_TCP_LISTEN: u32 = 10;

/// Verdict of a `cgroup_skb` program: let the packet through.
const ALLOW: i32 = 1;

/// Received packets (client requests, engine answers).
#[cgroup_skb(ingress)]
pub fn tn_skb_in(ctx: SkBuffContext) -> i32 {
    account(&ctx, true);
    ALLOW
}

/// Sent packets (answers to clients, requests to engines).
#[cgroup_skb(egress)]
pub fn tn_skb_out(ctx: SkBuffContext) -> i32 {
    account(&ctx, false);
    ALLOW
}

#[inline(always)]
#[allow(unsafe_code)]
fn account(ctx: &SkBuffContext, inbound: bool) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the context the kernel passed; these are plain context
    // field reads the verifier rewrites.
    let (sk, len, gso_segs) = unsafe { ((*skb).__bindgen_anon_2.sk, (*skb).len, (*skb).gso_segs) };
    if sk.is_null() {
        return;
    }
    // SAFETY: helper call on the context's socket pointer (checked non-null).
    let sk: *mut bpf_sock = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return;
    }
    // SAFETY: lookup without create; null when userspace never tagged this socket.
    let tag = unsafe { bpf_sk_storage_get(map_ptr(&SOCK_TAGS), sk.cast(), core::ptr::null_mut(), 0) }.cast::<SockTag>();
    let SockTag { model, side } = if tag.is_null() {
        // Not tagged (yet): a client's request can arrive before the proxy
        // has accepted the connection. Connections to the proxy port are
        // counted as pending from their first packet; anything else is not ours.
        if !accepted_on_proxy_port(sk) {
            return;
        }
        SockTag { model: 0, side: SIDE_CLIENT }
    } else {
        // SAFETY: non-null storage of this socket; copied at once.
        unsafe { *tag }
    };
    // SAFETY: get-or-create the kernel-owned state of one of our sockets.
    let state = unsafe {
        bpf_sk_storage_get(
            map_ptr(&CONN_STATE),
            sk.cast(),
            core::ptr::null_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<ConnState>();
    if state.is_null() {
        return;
    }
    let packets = if gso_segs == 0 { 1 } else { u64::from(gso_segs) };
    let bytes = u64::from(len);
    // SAFETY: `state` is this socket's storage, valid during the program. Each
    // direction only touches its own pending fields, so ingress (softirq) and
    // egress (process context) on different CPUs do not race on them. Both
    // write `phase`, but not at once: a client sends its next request only
    // after the answer has reached it.
    let state = unsafe { &mut *state };
    let upstream = side == SIDE_UPSTREAM;
    if !upstream {
        let carries_data = tcp_payload(ctx, len) > 0;
        if inbound {
            if state.phase == PHASE_ANSWER {
                // The answer has started, so the held request's model is tagged.
                if !carries_data {
                    charge_in(state, model, upstream, packets, bytes);
                    return;
                }
                charge_in(state, model, upstream, 0, 0);
                state.phase = PHASE_REQUEST;
            }
            state.pending_in_packets += packets;
            state.pending_in_bytes += bytes;
            return;
        }
        if carries_data {
            state.phase = PHASE_ANSWER;
        }
    }
    if inbound {
        charge_in(state, model, upstream, packets, bytes);
    } else {
        charge_out(state, model, upstream, packets, bytes);
    }
}

/// Charges an inbound packet, and what is held inbound, to `model` (or holds
/// it while no model is tagged); counts the connection for a new model.
#[inline(always)]
fn charge_in(state: &mut ConnState, model: u32, upstream: bool, packets: u64, bytes: u64) {
    let (p, b) = (packets + state.pending_in_packets, bytes + state.pending_in_bytes);
    if p == 0 {
        return;
    }
    let Some(stats) = model_stats(model) else {
        state.pending_in_packets = p;
        state.pending_in_bytes = b;
        return;
    };
    state.pending_in_packets = 0;
    state.pending_in_bytes = 0;
    // Connections are counted on the ingress path only (every connection
    // receives at least its ACKs and FIN), so one writer owns the field.
    let new_connection = state.counted_model != model;
    state.counted_model = model;
    add_in(stats, upstream, p, b, new_connection);
}

/// Charges an outbound packet, and what is held outbound, to `model` (or
/// holds it while no model is tagged).
#[inline(always)]
fn charge_out(state: &mut ConnState, model: u32, upstream: bool, packets: u64, bytes: u64) {
    let (p, b) = (packets + state.pending_out_packets, bytes + state.pending_out_bytes);
    let Some(stats) = model_stats(model) else {
        state.pending_out_packets = p;
        state.pending_out_bytes = b;
        return;
    };
    state.pending_out_packets = 0;
    state.pending_out_bytes = 0;
    add_out(stats, upstream, p, b);
}

/// This CPU's counters of `model`; `None` for 0 ("not known yet") and ids out of range.
#[inline(always)]
fn model_stats(model: u32) -> Option<&'static mut ModelStats> {
    if model == 0 || model >= MAX_MODELS {
        return None;
    }
    let stats = MODEL_STATS.get_ptr_mut(model)?;
    #[allow(unsafe_code)]
    // SAFETY: this CPU's slot of the per-CPU array, valid while the program
    // runs, and only this program run touches it on this CPU.
    Some(unsafe { &mut *stats })
}

/// Bytes of TCP payload in a packet of IP length `len`; 0 when the headers
/// cannot be read or it is not TCP right after an IPv4 or IPv6 header.
#[inline(always)]
fn tcp_payload(ctx: &SkBuffContext, len: u32) -> u32 {
    // cgroup_skb programs see the packet from its IP header on.
    let Ok(first) = ctx.load::<u8>(0) else { return 0 };
    let ip_header = match first >> 4 {
        4 => u32::from(first & 0x0f) * 4,
        6 => match ctx.load::<u8>(6) {
            Ok(next) if u32::from(next) == IPPROTO_TCP => 40,
            _ => return 0,
        },
        _ => return 0,
    };
    // The TCP data offset: the high nibble of byte 12, in 32-bit words.
    let Ok(offset) = ctx.load::<u8>(ip_header as usize + 12) else { return 0 };
    len.saturating_sub(ip_header + u32::from(offset >> 4) * 4)
}

/// A connection the proxy listener accepted (or is about to): TCP, local
/// port = the proxy port, and not the listening socket itself.
#[inline(always)]
#[allow(unsafe_code)]
fn accepted_on_proxy_port(sk: *mut bpf_sock) -> bool {
    let Some(port) = proxy_port() else {
        return false;
    };
    // SAFETY: field reads of a full socket the verifier checked.
    let (protocol, src_port, state) = unsafe { ((*sk).protocol, (*sk).src_port, (*sk).state) };
    protocol == IPPROTO_TCP && src_port == port && state != BPF_TCP_LISTEN
}

#[inline(always)]
fn add_in(stats: &mut ModelStats, upstream: bool, packets: u64, bytes: u64, new_connection: bool) {
    if upstream {
        stats.upstream_in_packets += packets;
        stats.upstream_in_bytes += bytes;
        if new_connection {
            stats.upstream_connections += 1;
        }
    } else {
        stats.client_in_packets += packets;
        stats.client_in_bytes += bytes;
        if new_connection {
            stats.client_connections += 1;
        }
    }
}

#[inline(always)]
fn add_out(stats: &mut ModelStats, upstream: bool, packets: u64, bytes: u64) {
    if upstream {
        stats.upstream_out_packets += packets;
        stats.upstream_out_bytes += bytes;
    } else {
        stats.client_out_packets += packets;
        stats.client_out_bytes += bytes;
    }
}
