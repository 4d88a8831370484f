//! Which address a request comes from, for per-client limits and the admin
//! view.
//!
//! Behind a reverse proxy every connection comes from the proxy, so the client
//! is named in headers. Headers are whatever the sender wrote, so they count
//! only when the connection itself comes from a trusted proxy, and only the
//! part trusted proxies wrote counts: `X-Forwarded-For` is read from the right
//! (each proxy appends the address it saw), skipping trusted proxies; the first
//! other address is the client. Anything left of it may be a client's
//! invention. Our Nginx overwrites `X-Forwarded-For` and sets `X-Real-IP` to
//! the address it saw, which is used when every forwarded hop is trusted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::http::HeaderMap;

use crate::config::TrustedProxies;

/// The client's address: the TCP peer, or — when `proxies` is given and the
/// peer is one of them — the address the proxies report.
pub fn client_ip(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    proxies: Option<&TrustedProxies>,
) -> IpAddr {
    let peer = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip().to_canonical());
    match proxies {
        Some(proxies) if proxies.contains(peer) => forwarded(headers, proxies).unwrap_or(peer),
        _ => peer,
    }
}

/// The client as trusted proxies report it, if they do.
fn forwarded(headers: &HeaderMap, proxies: &TrustedProxies) -> Option<IpAddr> {
    // Several X-Forwarded-For headers are one list, in order.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match parse(hop) {
            Some(ip) if proxies.contains(ip) => continue,
            Some(ip) => return Some(ip),
            // Unreadable: what lies left of it cannot be trusted either.
            None => break,
        }
    }
    let real_ip = headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse(v.trim()));
    real_ip.or_else(|| hops.last().and_then(|hop| parse(hop)))
}

/// An address as proxies write it: `1.2.3.4`, `2001:db8::1`, or with a port.
fn parse(raw: &str) -> Option<IpAddr> {
    raw.parse::<IpAddr>()
        .or_else(|_| raw.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn from(peer: &str, headers: &[(&'static str, &str)], trust: bool) -> IpAddr {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, value.parse().unwrap());
        }
        let proxies = TrustedProxies::default();
        let peer = SocketAddr::new(ip(peer), 40000);
        client_ip(&map, Some(peer), trust.then_some(&proxies))
    }

    #[test]
    fn headers_count_only_from_trusted_peers() {
        let spoof = [("x-forwarded-for", "1.2.3.4"), ("x-real-ip", "1.2.3.4")];
        assert_eq!(from("203.0.113.9", &spoof, true), ip("203.0.113.9"));
        assert_eq!(from("127.0.0.1", &spoof, false), ip("127.0.0.1"));
        assert_eq!(from("10.0.0.5", &spoof, true), ip("1.2.3.4"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        // A client claimed 1.2.3.4; a proxy appended what it really saw.
        let appended = [("x-forwarded-for", "1.2.3.4, 198.51.100.7, 10.0.0.2")];
        assert_eq!(from("10.0.0.3", &appended, true), ip("198.51.100.7"));
        let split = [
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "198.51.100.7"),
        ];
        assert_eq!(from("10.0.0.3", &split, true), ip("198.51.100.7"));
        let v6 = [("x-forwarded-for", "2001:db8::7, ::1")];
        assert_eq!(from("::1", &v6, true), ip("2001:db8::7"));
    }

    #[test]
    fn garbage_stops_the_walk() {
        let junk = [
            ("x-forwarded-for", "198.51.100.7, nonsense, 10.0.0.2"),
            ("x-real-ip", "10.0.0.2"),
        ];
        assert_eq!(from("10.0.0.3", &junk, true), ip("10.0.0.2"));
    }

    #[test]
    fn all_trusted_hops_fall_back_to_x_real_ip() {
        // Our Nginx overwrites X-Forwarded-For with, and sets X-Real-IP to, the
        // address it saw; a client on the private network is that address.
        let ours = [
            ("x-forwarded-for", "192.168.1.20"),
            ("x-real-ip", "192.168.1.20"),
        ];
        assert_eq!(from("127.0.0.1", &ours, true), ip("192.168.1.20"));
        let real_ip_only = [("x-real-ip", "198.51.100.7")];
        assert_eq!(from("127.0.0.1", &real_ip_only, true), ip("198.51.100.7"));
        assert_eq!(from("127.0.0.1", &[], true), ip("127.0.0.1"));
        let mapped = from(
            "::ffff:127.0.0.1",
            &[("x-real-ip", "[::ffff:1.2.3.4]:80")],
            true,
        );
        assert_eq!(mapped, ip("1.2.3.4"));
    }
}
