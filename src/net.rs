//! Network facts shared by the checks of URLs and addresses.

use std::net::IpAddr;

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
}
