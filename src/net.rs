//! Network facts shared by the checks of URLs and addresses.

use std::net::{IpAddr, Ipv6Addr};

/// Whether `host` (a URL's host as `Url::host_str` gives it) is this machine: the name
/// `localhost`, or a loopback IP address (127.0.0.0/8, ::1). Decided by parsing the
/// address, never by its text: `127.attacker.example` and `127.0.0.1.nip.io` are names
/// that resolve wherever their owner likes.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The budget a source address counts against (connections per source, the source-address
/// rate limit): the IPv4 address (an IPv4-mapped IPv6
/// address is its IPv4 address), or the /64 an IPv6 address belongs to.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The address a request comes from: the peer, or, when the peer is a trusted proxy,
/// the nearest address in `X-Forwarded-For` (read from the right) that is not itself a
/// trusted proxy. Addresses a client wrote further left are not believed: only what
/// trusted proxies appended counts. An unparsable entry ends the walk at the last
/// trusted hop.
pub fn client_address(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(list) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in list.rsplit(',') {
        let hop = hop.trim();
        let Ok(ip) = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// The client address of a request, set by the transport that accepted it (after
/// [`client_address`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

tokio::task_local! {
    static SOURCE: IpAddr;
}

/// Runs `f` with `ip` as the address of the request it serves: the transports wrap each
/// request in this, so what the broker decides (rate limits for callers it could not
/// identify) can be charged to the source without passing it through every call.
pub async fn with_source<F: std::future::Future>(ip: IpAddr, f: F) -> F::Output {
    SOURCE.scope(ip, f).await
}

/// The source address of the request being served, when a transport set one.
pub fn current_source() -> Option<IpAddr> {
    SOURCE.try_with(|ip| *ip).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let proxy = ip("10.1.2.3");
        // Not from a trusted proxy: the header is the client's own word, ignored.
        assert_eq!(
            client_address(ip("192.0.2.9"), Some("198.51.100.1"), &trusted),
            ip("192.0.2.9")
        );
        // From the proxy: the nearest untrusted hop, read from the right.
        assert_eq!(
            client_address(proxy, Some("203.0.113.7, 198.51.100.1, 10.9.9.9"), &trusted),
            ip("198.51.100.1"),
            "a client cannot choose its address by writing one further left"
        );
        assert_eq!(client_address(proxy, None, &trusted), proxy);
        assert_eq!(client_address(proxy, Some("garbage"), &trusted), proxy);
        assert_eq!(
            client_address(proxy, Some("[2001:db8::1]:4711"), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(client_address(proxy, Some("198.51.100.1"), &[]), proxy);
    }

    #[test]
    fn loopback_is_parsed_not_matched_as_text() {
        for h in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.3.2.1",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "127.attacker.example",
            "127.0.0.1.nip.io",
            "localhost.example",
            "10.0.0.1",
            "[::2]",
            "0.0.0.0",
            "",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let k = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }
}
