//! Fast reject of penalised clients, without waking the proxy.
//!
//! - `sk_lookup` (default): runs when a SYN looks for a listening socket in the
//!   gateway's network namespace. A drop verdict for a penalised source makes
//!   the kernel answer with a reset, so the client's `connect` fails at once
//!   with "connection refused" and the proxy's accept queue never sees it.
//! - `xdp` (flood mode): drops the SYN before the stack allocates anything.
//!   The client then waits for its own connect timeout, which is unkind to an
//!   ordinary client but cheapest against a flood.
//!
//! Both act only on TCP to the proxy port in `CONFIG`.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{sk_lookup, xdp};
use aya_ebpf::programs::{SkLookupContext, XdpContext};
use gateway_common::ClientKey;

use crate::maps::{count_refused, penalised, proxy_port};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `sk_lookup` verdicts.
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn tn_lookup(ctx: SkLookupContext) -> u32 {
    if refuse_lookup(&ctx) {
        count_refused(false);
        SK_DROP
    } else {
        SK_PASS
    }
}

#[inline(always)]
#[allow(unsafe_code)]
fn refuse_lookup(ctx: &SkLookupContext) -> bool {
    let lookup = ctx.lookup;
    // All context fields are read up front, in straight-line volatile loads:
    // the verifier only accepts context loads at a constant offset from the
    // unmodified context pointer, and the compiler must not derive a pointer
    // into it to share between branches.
    // SAFETY: plain context field reads, which the verifier rewrites.
    let (family, protocol, local_port, remote_ip4, words) = unsafe {
        use core::ptr::{addr_of, read_volatile};
        (
            read_volatile(addr_of!((*lookup).family)),
            read_volatile(addr_of!((*lookup).protocol)),
            read_volatile(addr_of!((*lookup).local_port)),
            read_volatile(addr_of!((*lookup).remote_ip4)),
            [
                read_volatile(addr_of!((*lookup).remote_ip6[0])),
                read_volatile(addr_of!((*lookup).remote_ip6[1])),
                read_volatile(addr_of!((*lookup).remote_ip6[2])),
                read_volatile(addr_of!((*lookup).remote_ip6[3])),
            ],
        )
    };
    if protocol != IPPROTO_TCP {
        return false;
    }
    match proxy_port() {
        Some(port) if port == local_port => {}
        _ => return false,
    }
    let key = if family == AF_INET {
        // The address is in network order, so its in-memory bytes are the
        // address octets.
        ClientKey::v4(remote_ip4.to_ne_bytes())
    } else if family == AF_INET6 {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let [a, b, c, d] = words[i].to_ne_bytes();
            addr[i * 4] = a;
            addr[i * 4 + 1] = b;
            addr[i * 4 + 2] = c;
            addr[i * 4 + 3] = d;
            i += 1;
        }
        ClientKey { addr }
    } else {
        return false;
    };
    penalised(&key)
}

#[xdp]
pub fn tn_xdp(ctx: XdpContext) -> u32 {
    if drop_syn(&ctx).unwrap_or(false) {
        count_refused(true);
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// A pointer to `len` bytes at `offset` into the packet, if they are all in it.
#[inline(always)]
fn bytes_at(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const u8)
}

#[inline(always)]
#[allow(unsafe_code)]
fn byte(ptr: *const u8, index: usize) -> u8 {
    // SAFETY: callers pass pointers from `bytes_at` with `index` < its length.
    unsafe { *ptr.add(index) }
}

/// Whether the packet is a connection-opening SYN to the proxy port from a
/// penalised source. `None` when the packet is too short to tell.
#[inline(always)]
fn drop_syn(ctx: &XdpContext) -> Option<bool> {
    let Some(port) = proxy_port() else {
        return Some(false);
    };
    let eth = bytes_at(ctx, 0, ETH_HLEN)?;
    let ether_type = u16::from_be_bytes([byte(eth, 12), byte(eth, 13)]);
    let (key, tcp_offset) = if ether_type == ETH_P_IP {
        let ip = bytes_at(ctx, ETH_HLEN, 20)?;
        if u32::from(byte(ip, 9)) != IPPROTO_TCP {
            return Some(false);
        }
        let header_len = usize::from(byte(ip, 0) & 0x0f) * 4;
        // A later fragment carries no TCP header: nothing to read a SYN from.
        let fragment_offset = u16::from_be_bytes([byte(ip, 6), byte(ip, 7)]) & 0x1fff;
        if header_len < 20 || fragment_offset != 0 {
            return Some(false);
        }
        let key = ClientKey::v4([byte(ip, 12), byte(ip, 13), byte(ip, 14), byte(ip, 15)]);
        (key, ETH_HLEN + header_len)
    } else if ether_type == ETH_P_IPV6 {
        let ip = bytes_at(ctx, ETH_HLEN, 40)?;
        // Extension headers are not walked: a SYN carrying them passes.
        if u32::from(byte(ip, 6)) != IPPROTO_TCP {
            return Some(false);
        }
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            addr[i] = byte(ip, 8 + i);
            i += 1;
        }
        (ClientKey { addr }, ETH_HLEN + 40)
    } else {
        return Some(false);
    };
    let tcp = bytes_at(ctx, tcp_offset, 14)?;
    let dest_port = u32::from(u16::from_be_bytes([byte(tcp, 2), byte(tcp, 3)]));
    let flags = byte(tcp, 13);
    if dest_port != port || flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
        return Some(false);
    }
    Some(penalised(&key))
}
