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
