//! Loopback ports for listeners a test or a benchmark starts a moment later.

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest port handed out: clear of the well-known and most registered service ports.
const LOWEST_PORT: usize = 10_000;

/// A free loopback port for a listener started later.
///
/// Ports come from below the kernel's ephemeral range: a port released by `bind(:0)` sits in
/// that range and any outgoing connection (a gateway's upstream pool, a client) may take it
/// before the child binds it, which made gateway starts fail now and then with EADDRINUSE.
/// Each process walks its own stride of the range, and a port is handed out only after a
/// bind on it succeeded.
pub fn free_port() -> io::Result<u16> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (low, high) = (LOWEST_PORT, ephemeral_low().clamp(12_000, 32_768));
    let span = high - low;
    let base = (std::process::id() as usize).wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (base + NEXT.fetch_add(1, Ordering::Relaxed) * 13) % span;
        let Ok(port) = u16::try_from(low + offset) else { continue };
        if port_is_free(port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(io::ErrorKind::AddrInUse, "no free loopback port below the ephemeral range"))
}

/// Whether nothing listens on `127.0.0.1:port` (checked by binding it for a moment).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The first port of the kernel's ephemeral range (32768 when unknown).
fn ephemeral_low() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next().and_then(|port| port.parse().ok()))
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_bindable_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a free port")).collect();
        let ephemeral = ephemeral_low();
        for &port in &ports {
            assert!(usize::from(port) >= LOWEST_PORT && usize::from(port) < ephemeral.max(12_000), "{port}");
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice: {ports:?}");
        let held = TcpListener::bind(("127.0.0.1", ports[0])).expect("the chosen port binds");
        assert!(!port_is_free(ports[0]), "a bound port is not free");
        drop(held);
    }
}
