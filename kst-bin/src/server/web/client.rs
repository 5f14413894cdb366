//! Who the client is: the TCP peer, or the address a trusted proxy names; counted per IPv4
//! address or IPv6 /64, and shown in logs only as a keyed hash.

use sha2::Digest as _;
use std::net::{IpAddr, Ipv6Addr};

use axum::http::HeaderMap;

use super::config::{ProxyHeader, TrustedProxies};

/// The client's address as rate limits count it: an IPv4 address, or an IPv6 /64 network
/// written `2001:db8:1:2::/64` (one host usually holds a whole /64).
pub fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", Ipv6Addr::from(net))
        }
    }
}

/// The network of the client at `ip` whose clients share a larger part of the web queues
/// (`batcher::NETWORK_SHARE`): an IPv6 /48 written `2001:db8:1::/48` (one site, whose
/// holder has 65,536 /64s, each a client of its own); `None` for IPv4 (each address a
/// client, none grouped).
pub fn client_network(ip: IpAddr) -> Option<String> {
    match ip.to_canonical() {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !((1u128 << 80) - 1);
            Some(format!("{}/48", Ipv6Addr::from(net)))
        }
    }
}

/// The client of a request as [`client_key`] names it (or [`UNKNOWN_CLIENT`]), put in the
/// request's extensions by the web limits' guard (`handlers::guard`) for the handlers that
/// share something out per client (the key directory's expensive turns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey(pub std::sync::Arc<str>);

/// The client key of a request whose forwarding chain could not be read: every such client
/// shares this one budget (no digit or colon, so no address key equals it).
pub const UNKNOWN_CLIENT: &str = "unknown";

/// The client's IP: the TCP peer, unless the peer is a trusted proxy; then the rightmost
/// address in the configured forwarding header (and only that one) that is not itself a
/// trusted proxy. A missing header leaves the peer as the client (a proxy that forwards
/// nothing is its own client); `None` when the walk reaches a hop that cannot be read (not
/// ASCII, obfuscated, garbage): the client is unknown, and the other header, which the client
/// may have written, is never consulted.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, proxies: &TrustedProxies) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    if !proxies.contains(peer) {
        return Some(peer);
    }
    let chain = match proxies.header() {
        ProxyHeader::Forwarded => forwarded_chain(headers),
        ProxyHeader::XForwardedFor => x_forwarded_for_chain(headers),
    };
    // Walk from the nearest hop back; the first hop that is not a trusted proxy is the client.
    let mut client = peer;
    for ip in chain.into_iter().rev() {
        // An obfuscated or unreadable hop: trust stops here, the client is unknown.
        client = ip?.to_canonical();
        if !proxies.contains(client) {
            return Some(client);
        }
    }
    Some(client)
}

/// Most hops read from a forwarding header (a longer list is cut from the left, the part the
/// client itself could have written).
const MAX_HOPS: usize = 32;

/// The `for=` values of every `Forwarded` header, in order; `None` per hop that is not an IP
/// or cannot be read (bytes that are not visible ASCII). Hops are split on the raw bytes, so
/// that such bytes spoil only their own hop: a proxy that appends the client's hop to the
/// client's own line (nginx `"$http_forwarded, for=$remote_addr"`) names the client however
/// that line began (red team round 9: one byte the client wrote made the whole line
/// unreadable, and the client chose to be counted as `unknown`).
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    for value in headers.get_all("forwarded") {
        for element in value.as_bytes().split(|b| *b == b',') {
            // The first `for=` pair; an unreadable pair before it spoils the element.
            let mut ip = None;
            for pair in element.split(|b| *b == b';') {
                let Some(text) = visible_ascii(pair) else {
                    break;
                };
                if let Some((k, v)) = text.trim().split_once('=')
                    && k.trim().eq_ignore_ascii_case("for")
                {
                    ip = parse_node(v.trim());
                    break;
                }
            }
            out.push(ip);
        }
    }
    tail(out)
}

/// The addresses of every `X-Forwarded-For` header, in order; `None` per hop that cannot be
/// read. Split on the raw bytes, as [`forwarded_chain`] (nginx
/// `$proxy_add_x_forwarded_for` appends the client's address to the line the client sent).
fn x_forwarded_for_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        out.extend(
            value
                .as_bytes()
                .split(|b| *b == b',')
                .map(|hop| visible_ascii(hop).and_then(|s| parse_node(s.trim()))),
        );
    }
    tail(out)
}

/// `bytes` as text when they are visible ASCII, blanks and tabs (what a header value's
/// `to_str` accepts).
fn visible_ascii(bytes: &[u8]) -> Option<&str> {
    bytes
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        .then(|| std::str::from_utf8(bytes).ok())
        .flatten()
}

fn tail(mut v: Vec<Option<IpAddr>>) -> Vec<Option<IpAddr>> {
    if v.len() > MAX_HOPS {
        v.drain(..v.len() - MAX_HOPS);
    }
    v
}

/// An RFC 7239 node (`192.0.2.1`, `"[2001:db8::1]:4711"`, `192.0.2.1:80`) or a bare address.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim_matches('"');
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// A keyed hash of a client key for logs: the same client gives the same 12 hex digits within
/// one process run, and the address cannot be recovered by hashing the IPv4 space (the key is
/// random per process and never leaves it).
#[derive(Clone)]
pub struct LogPseudonym {
    key: [u8; 32],
}

impl LogPseudonym {
    /// A pseudonymizer with a fresh random key.
    pub fn random() -> Self {
        LogPseudonym {
            key: rand::random(),
        }
    }

    /// The pseudonym of `client`.
    pub fn of(&self, client: &str) -> String {
        let mut data = Vec::with_capacity(32 + client.len());
        data.extend_from_slice(&self.key);
        data.extend_from_slice(client.as_bytes());
        let digest = sha2::Sha256::digest(&data);
        hex::encode(&digest[..6])
    }
}

impl std::fmt::Debug for LogPseudonym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogPseudonym(<key>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::web::config::WebConfig;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies(list: &[&str]) -> TrustedProxies {
        proxies_with(list, ProxyHeader::XForwardedFor)
    }

    fn proxies_with(list: &[&str], header: ProxyHeader) -> TrustedProxies {
        WebConfig {
            trusted_proxies: list.iter().map(|s| s.to_string()).collect(),
            trusted_proxy_header: header,
            ..WebConfig::default()
        }
        .validate()
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn ipv6_clients_share_their_48_and_ipv4_clients_nothing() {
        assert_eq!(
            client_network(ip("2001:db8:1:2:3:4:5:6")).as_deref(),
            Some("2001:db8:1::/48")
        );
        assert_eq!(
            client_network(ip("2001:db8:1:ffff::1")),
            client_network(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            client_network(ip("2001:db8:2::1")),
            client_network(ip("2001:db8:1::1"))
        );
        assert_eq!(client_network(ip("::ffff:192.0.2.7")), None);
        assert_eq!(client_network(ip("192.0.2.7")), None);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
        assert_eq!(client_key(ip("2001:db8:1:2:ffff::1")), "2001:db8:1:2::/64");
        assert_ne!(
            client_key(ip("2001:db8:1:3::1")),
            client_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), "192.0.2.7");
        assert_eq!(client_key(ip("192.0.2.7")), "192.0.2.7");
    }

    #[test]
    fn headers_count_only_from_trusted_proxies() {
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        let none = proxies(&[]);
        assert_eq!(
            client_ip(ip("192.0.2.1"), &h, &none),
            Some(ip("192.0.2.1")),
            "untrusted peer"
        );
        let p = proxies(&["127.0.0.1", "10.0.0.0/8"]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), Some(ip("198.51.100.9")));
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), &p),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let p = proxies(&["127.0.0.1", "10.0.0.0/8"]);
        // The client wrote a fake first hop; the proxies appended the real ones.
        let h = headers(&[("x-forwarded-for", "203.0.113.66, 198.51.100.9, 10.1.1.1")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), Some(ip("198.51.100.9")));
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.66"),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &p), Some(ip("198.51.100.9")));
        // All hops trusted: the leftmost is the client.
        let h = headers(&[("x-forwarded-for", "10.2.2.2, 10.1.1.1")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), Some(ip("10.2.2.2")));
    }

    #[test]
    fn only_the_configured_header_is_read_per_rfc_7239() {
        let p = proxies_with(&["127.0.0.1"], ProxyHeader::Forwarded);
        let h = headers(&[
            (
                "forwarded",
                "for=203.0.113.66;proto=https, For=\"[2001:db8::7]:4711\"",
            ),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), Some(ip("2001:db8::7")));
        // The same request behind an X-Forwarded-For proxy: the client's Forwarded is ignored.
        let x = proxies(&["127.0.0.1"]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &x), Some(ip("198.51.100.9")));
        let h = headers(&[("forwarded", "for=192.0.2.60:8080;by=10.0.0.1")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), Some(ip("192.0.2.60")));
        // No fallback: a Forwarded proxy that sent no Forwarded line is its own client.
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &x), Some(ip("127.0.0.1")));
        // An obfuscated hop stops the walk: the client is unknown.
        let h = headers(&[("forwarded", "for=_hidden, for=127.0.0.1")]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), None);
        // Garbage is no client, and the other header is not consulted.
        let h = headers(&[
            ("x-forwarded-for", "not an address"),
            ("forwarded", "for=198.51.100.9"),
        ]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &x), None);
        // A non-ASCII line is one unreadable hop; a readable untrusted hop after it decides.
        let mut h = HeaderMap::new();
        h.append(
            "forwarded",
            HeaderValue::from_bytes(b"for=\"x\xff\"").unwrap(),
        );
        h.append("forwarded", HeaderValue::from_static("for=198.51.100.1"));
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), Some(ip("198.51.100.1")));
        h.append("forwarded", HeaderValue::from_static("for=127.0.0.1"));
        h.append("forwarded", HeaderValue::from_bytes(b"for=\xff").unwrap());
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &p), None);
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_hide_the_address() {
        let a = LogPseudonym::random();
        let b = LogPseudonym::random();
        assert_eq!(a.of("192.0.2.1"), a.of("192.0.2.1"));
        assert_ne!(a.of("192.0.2.1"), a.of("192.0.2.2"));
        assert_ne!(a.of("192.0.2.1"), b.of("192.0.2.1"));
        // Twelve hex digits of a keyed hash: never the address spelled out. (Not "contains no
        // `192`": a random key's pseudonym holds those three digits one run in about 400,
        // which CI met.)
        let p = a.of("192.0.2.1");
        assert!(
            p.len() == 12 && p.bytes().all(|c| c.is_ascii_hexdigit()),
            "{p}"
        );
        assert_eq!(a.of("x").len(), 12);
    }

    /// Red team round 9 (held): odd spellings of a hop a trusted proxy forwards name the
    /// client they spell or no client (the shared `unknown` budget), never another one.
    #[test]
    fn odd_spellings_of_a_hop_name_that_client_or_none() {
        let p = proxies(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        let one = |hop: &str| client_ip(peer, &headers(&[("x-forwarded-for", hop)]), &p);
        // IPv4-mapped IPv6 is the IPv4 address: one budget, however it is written.
        assert_eq!(one("::ffff:198.51.100.9"), Some(ip("198.51.100.9")));
        assert_eq!(
            one("::ffff:198.51.100.9").map(client_key),
            Some("198.51.100.9".to_string())
        );
        assert_eq!(one("[::ffff:c633:6409]:80"), Some(ip("198.51.100.9")));
        // A trusted proxy spelled as mapped IPv6 is still trusted: the walk goes on.
        assert_eq!(
            one("198.51.100.9, ::ffff:10.1.1.1"),
            Some(ip("198.51.100.9"))
        );
        // Brackets, ports, blanks.
        assert_eq!(one("[2001:db8::1]:443"), Some(ip("2001:db8::1")));
        assert_eq!(one("[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(one("  198.51.100.9:8080 "), Some(ip("198.51.100.9")));
        // Forms that are no address: the client is unknown, never an address next to it.
        for hop in [
            "fe80::1%eth0",
            "[fe80::1%25eth0]:80",
            "198.51.100.9:99999",
            "0x7f.1",
            "0177.0.0.1",
            "198.51.100.9.",
            "[198.51.100.9",
            "",
        ] {
            assert_eq!(one(&format!("203.0.113.66, {hop}")), None, "{hop:?}");
        }
        // An IPv6 address with a port and no brackets reads as another address of its /64.
        assert_eq!(
            one("2001:db8::1:443").map(client_key),
            Some("2001:db8::/64".to_string())
        );
        // An IPv6 client is counted per /64 whatever the rest of its address.
        assert_eq!(
            one("2001:db8:1:2:ffff:ffff:ffff:ffff").map(client_key),
            Some("2001:db8:1:2::/64".to_string())
        );
        // An overlong chain written by the client is cut from the left; the proxy's hop,
        // appended last, still names the client.
        let long = format!("{}198.51.100.9", "203.0.113.66, ".repeat(10_000));
        assert_eq!(one(&long), Some(ip("198.51.100.9")));
        // Hops the client wrote as trusted proxies do not hide its own address.
        let forged = format!("{}198.51.100.9, 10.2.2.2", "10.0.0.1, ".repeat(40));
        assert_eq!(one(&forged), Some(ip("198.51.100.9")));
    }

    /// Red team round 9: a proxy that appends the client's hop to the line the client sent
    /// (nginx `$proxy_add_x_forwarded_for`) passes the client's bytes through; one byte that is
    /// not visible ASCII made the whole line unreadable, so the client chose to be counted as
    /// `unknown` (a budget of its own choosing, shared with every client whose chain cannot be
    /// read). Such bytes now spoil only their own hop.
    #[test]
    fn a_clients_bytes_spoil_only_its_own_hop() {
        let line = |name: &'static str, bytes: &[u8]| {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_bytes(bytes).unwrap());
            h
        };
        let peer = ip("127.0.0.1");
        let x = proxies(&["127.0.0.1", "10.0.0.0/8"]);
        for sent in [
            &b"203.0.113.66\xff"[..],
            b"\x80\x81",
            b"a\tb\xfe, 10.0.0.1\xff",
        ] {
            let mut appended = sent.to_vec();
            appended.extend_from_slice(b", 198.51.100.9");
            let h = line("x-forwarded-for", &appended);
            assert_eq!(
                client_ip(peer, &h, &x),
                Some(ip("198.51.100.9")),
                "{:?}",
                String::from_utf8_lossy(&appended)
            );
        }
        // The proxy's own hop unreadable still makes the client unknown.
        let h = line("x-forwarded-for", b"198.51.100.9, 203.0.113.66\xff");
        assert_eq!(client_ip(peer, &h, &x), None);

        let f = proxies_with(&["127.0.0.1"], ProxyHeader::Forwarded);
        let h = line(
            "forwarded",
            b"for=\"203.0.113.66\xff\";proto=https, for=198.51.100.9;proto=https",
        );
        assert_eq!(client_ip(peer, &h, &f), Some(ip("198.51.100.9")));
        // An unreadable pair before the element's `for=` spoils that element only.
        let h = line("forwarded", b"by=\xff;for=198.51.100.9");
        assert_eq!(client_ip(peer, &h, &f), None);
        let h = line("forwarded", b"for=198.51.100.9;by=\xff");
        assert_eq!(client_ip(peer, &h, &f), Some(ip("198.51.100.9")));
    }
}
