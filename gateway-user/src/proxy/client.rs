//! Who sent a request: the connection's peer, or, when the peer is a trusted
//! proxy (`--trusted-proxy-cidrs`), the client it forwards for, read from
//! `X-Forwarded-For` or `Forwarded`: the rightmost hop that is not itself a
//! trusted proxy. Hops further left were written by the client and prove
//! nothing, so they are never used.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::FORWARDED;

use crate::kernel::penalties::{Cidr, ClientAddr, in_any, normalize};

/// Most forwarded hops looked at, from the right: what a chain of proxies
/// really adds is a handful, and the walk must stay cheap on a hostile header.
const MAX_HOPS: usize = 16;

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The networks whose forwarding headers are believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    networks: Vec<Cidr>,
}

impl TrustedProxies {
    pub fn new(networks: Vec<Cidr>) -> Self {
        Self { networks }
    }

    /// The client of a request that came from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        if self.networks.is_empty() || !in_any(&self.networks, peer) {
            return ClientAddr::direct(peer);
        }
        let hops = if headers.contains_key(X_FORWARDED_FOR) {
            rightmost_hops(headers, X_FORWARDED_FOR, xff_hop)
        } else {
            rightmost_hops(headers, FORWARDED.as_str(), forwarded_hop)
        };
        // Right to left: every trusted hop passes the request on; the first
        // other one is the client. An unreadable hop ends the walk: the
        // client is then the last proxy that vouched for the chain.
        let mut client = normalize(peer);
        for hop in hops {
            match hop {
                Some(ip) if in_any(&self.networks, ip) => client = normalize(ip),
                Some(ip) => {
                    client = normalize(ip);
                    break;
                }
                None => break,
            }
        }
        ClientAddr { ip: client, behind_proxy: true }
    }
}

/// The hops of every `name` header, rightmost first, at most [`MAX_HOPS`];
/// `None` for a hop that is not an address.
fn rightmost_hops(headers: &HeaderMap, name: &str, parse: fn(&str) -> Option<IpAddr>) -> Vec<Option<IpAddr>> {
    let values: Vec<&[u8]> = headers.get_all(name).iter().map(http::HeaderValue::as_bytes).collect();
    values
        .iter()
        .rev()
        .flat_map(|value| value.rsplit(|b| *b == b','))
        .map(|hop| std::str::from_utf8(hop).ok().and_then(|hop| parse(hop.trim())))
        .take(MAX_HOPS)
        .collect()
}

/// One `X-Forwarded-For` entry: an address, with a port or in brackets at times.
fn xff_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
        .or_else(|| hop.strip_prefix('[').and_then(|h| h.strip_suffix(']')).and_then(|h| h.parse().ok()))
}

/// One `Forwarded` element (RFC 7239): its `for=` parameter.
fn forwarded_hop(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then(|| xff_hop(value.trim().trim_matches('"')))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()])
    }

    fn client_of(peer: &str, headers: &[(&str, &str)]) -> ClientAddr {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        trusted().client(peer.parse().unwrap(), &map)
    }

    fn behind(ip: &str) -> ClientAddr {
        ClientAddr { ip: ip.parse().unwrap(), behind_proxy: true }
    }

    #[rstest]
    #[case::one_hop(&[("x-forwarded-for", "203.0.113.9")], "203.0.113.9")]
    #[case::spoofed_left_hops_ignored(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9")], "203.0.113.9")]
    #[case::trusted_hops_skipped(&[("x-forwarded-for", "203.0.113.9, 10.1.1.1, 10.2.2.2")], "203.0.113.9")]
    #[case::across_header_lines(&[("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "203.0.113.9, 10.1.1.1")], "203.0.113.9")]
    #[case::with_port(&[("x-forwarded-for", "203.0.113.9:5555")], "203.0.113.9")]
    #[case::ipv6_in_brackets(&[("x-forwarded-for", "[2001:db8::7]")], "2001:db8::7")]
    #[case::forwarded(&[("forwarded", "for=1.2.3.4, for=\"[2001:db8::7]:4711\";proto=https")], "2001:db8::7")]
    #[case::forwarded_case_and_params(&[("forwarded", "proto=http;For=203.0.113.9;by=10.0.0.2")], "203.0.113.9")]
    #[case::garbage_stops_at_the_last_proxy(&[("x-forwarded-for", "<script>, 10.1.1.1")], "10.1.1.1")]
    #[case::no_header_is_the_proxy_itself(&[], "10.0.0.2")]
    #[case::all_trusted_is_the_leftmost(&[("x-forwarded-for", "10.3.3.3, 10.1.1.1")], "10.3.3.3")]
    #[case::mapped_ipv4(&[("x-forwarded-for", "::ffff:203.0.113.9")], "203.0.113.9")]
    fn behind_a_trusted_proxy(#[case] headers: &[(&str, &str)], #[case] client: &str) {
        assert_eq!(client_of("10.0.0.2", headers), behind(client));
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let client = client_of("198.51.100.7", &[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(client, ClientAddr::direct("198.51.100.7".parse().unwrap()));
        let nobody_trusted = TrustedProxies::default().client("10.0.0.2".parse().unwrap(), &HeaderMap::new());
        assert!(!nobody_trusted.behind_proxy);
    }

    #[test]
    fn a_long_chain_is_read_only_so_far() {
        let chain = std::iter::repeat_n("10.9.9.9", 1000).collect::<Vec<_>>().join(",");
        let client = client_of("10.0.0.2", &[("x-forwarded-for", &format!("203.0.113.9,{chain}"))]);
        assert_eq!(client, behind("10.9.9.9"), "past MAX_HOPS trusted hops the walk stops");
    }
}
