//! Header rules applied in both directions: hop-by-hop headers are the proxy's own business and
//! never cross it; the forwarding headers tell the backend who the client is.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;
use ipnet::IpNet;

/// Headers that never cross the proxy in either direction, `Upgrade` and the headers `Connection`
/// names aside: the hop-by-hop ones (RFC 9110 §7.6.1) and `Proxy-Authenticate`.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    // A backend's challenge for proxy credentials is addressed to the next client on the response
    // chain (RFC 9110 §11.7.1), which is this proxy; passed on, it would have clients send
    // credentials to a proxy that asks for none.
    header::PROXY_AUTHENTICATE,
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The comma-separated tokens of every `Connection` header, trimmed; values that are not visible
/// ASCII are skipped.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: `Connection`, every header it names, and the fixed list. With
/// `upgrading`, `Upgrade` and `Connection: upgrade` are kept so the handshake reaches the other side.
/// A `Content-Length` beside a `Transfer-Encoding` goes too: the encoding framed the body (RFC 9112
/// §6.3), which goes on re-framed, and the length would have the next hop wait for bytes that
/// never come.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Most messages carry none of these: one pass over the names (cheap comparisons) spares the
    // removals, each of which hashes its name.
    let present = headers
        .keys()
        .any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if !present {
        if upgrading {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    // Headers named by Connection are hop-by-hop too. Only the names present are removed: each
    // removal hashes its name, and a plain `Connection: close` or `keep-alive` (every HTTP/1.0
    // client, every request of a new-connection-per-request client) would otherwise pay for eight
    // (about 1,500 instructions, callgrind). Names are compared as text (names in the map are
    // lowercase): parsing each token into a name would allocate for every one that is not a
    // standard header, `close` included.
    let mut close_named = false;
    let fixed = connection_tokens(headers).all(|token| {
        close_named |= token.eq_ignore_ascii_case("close");
        names_nothing_more(token)
    });
    if fixed {
        remove_fixed(headers, upgrading, close_named);
    } else {
        remove_named(headers, upgrading);
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The hop-by-hop fields of the fixed list, `Upgrade` (unless `upgrading`) and, with
/// `close_named`, a field named `close`, each found by a pass over the names and removed (at most
/// nine passes); allocates nothing, for the usual case.
fn remove_fixed(headers: &mut HeaderMap, upgrading: bool, close_named: bool) {
    // `Connection: close` names a field `close` too, should a client send one.
    let named = |name: &str| close_named && name == "close";
    let mut framed_by_encoding = false;
    while let Some(name) = headers
        .keys()
        .find(|&name| is_doomed(name, upgrading, named))
        .cloned()
    {
        framed_by_encoding |= name == header::TRANSFER_ENCODING;
        headers.remove(name);
    }
    if framed_by_encoding {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// Like [`remove_fixed`], and the fields Connection names besides: each name is checked against
/// the tokens once.
fn remove_named(headers: &mut HeaderMap, upgrading: bool) {
    let tokens: Vec<&str> = connection_tokens(headers).collect();
    let named = |name: &str| tokens.iter().any(|t| t.eq_ignore_ascii_case(name));
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|&name| is_doomed(name, upgrading, named))
        .cloned()
        .collect();
    if doomed.contains(&header::TRANSFER_ENCODING) {
        doomed.push(header::CONTENT_LENGTH);
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// Whether field `name` is hop-by-hop: `Upgrade` unless `upgrading`, the fixed list, or a field
/// Connection names (as `named` says), never `Host`.
fn is_doomed(name: &HeaderName, upgrading: bool, named: impl Fn(&str) -> bool) -> bool {
    if name == header::UPGRADE {
        return !upgrading;
    }
    // `Connection: host` must not take away the Host the request was routed by (the backend
    // would see another vhost, or none).
    name != header::HOST && (HOP_BY_HOP.contains(name) || named(name.as_str()))
}

/// Whether a Connection token names no field beyond the fixed list and `Upgrade`: `close`,
/// `keep-alive` and `upgrade`, which are nearly all clients ever send.
fn names_nothing_more(token: &str) -> bool {
    ["close", "keep-alive", "upgrade"]
        .iter()
        .any(|known| token.eq_ignore_ascii_case(known))
}

/// Removes `Proxy-Authorization` from a request: the client's credentials are for this proxy
/// (RFC 9110 §11.7.2), which checks none, and must not reach a backend. Requests only; a response
/// has no such header to carry.
pub fn strip_proxy_credentials(headers: &mut HeaderMap) {
    headers.remove(header::PROXY_AUTHORIZATION);
}

/// Whether a request asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Appends `client` to `X-Forwarded-For` (joining repeated headers into one), and sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    // `client` is the peer's IP, formatted once per connection; appending to what came before is
    // byte concatenation, with no formatting per request. An empty header adds no entry (it would
    // be an empty hop in the list).
    let mut earlier = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|v| !v.is_empty())
        .peekable();
    if earlier.peek().is_none() {
        headers.insert(X_FORWARDED_FOR, client.clone());
    } else {
        let mut xff = Vec::with_capacity(64);
        for v in earlier {
            xff.extend_from_slice(v);
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(client.as_bytes());
        if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
}

/// The peer's IP as an `X-Forwarded-For` entry, formatted once per connection.
pub fn peer_ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .expect("an IP address is a valid header value");
    };
    // IPv4 by hand: `Display` goes through `core::fmt` and a `String`, which cost about 1,500
    // instructions per connection (callgrind), a few percent of a one-request connection.
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header value")
}

/// The client's IP for hashing: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself trusted.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Walk from the right (the hop nearest to us) while the hops are trusted.
    let entries: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.iter().rev() {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else {
            // An unparsable hop ends what we can believe.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, and any request with more than one `Host`
/// line or a `Host` that is not `host[:port]`, is refused (`400`). An absolute-form target does
/// not excuse a missing `Host`; it does take precedence over one (see [`request_host`]).
pub fn check_host(version: Version, headers: &HeaderMap) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err("more than one Host header"),
        (None, _) if version == Version::HTTP_11 => Err("missing Host header"),
        (Some(host), _) if !is_host(host.as_bytes()) => Err("invalid Host header"),
        _ => Ok(()),
    }
}

/// A target's authority (absolute form, or HTTP/2's `:authority`) is held to what a `Host` may
/// be: it becomes the backend's `Host`, so `user@host` (RFC 9110 §4.2.4 deprecates userinfo;
/// RFC 9113 §8.3.1 forbids it) or a port that is not digits would reach the backend as a `Host`
/// this proxy itself refuses.
pub fn check_authority(uri: &http::Uri) -> Result<(), &'static str> {
    match uri.authority() {
        Some(authority) if !is_host(authority.as_str().as_bytes()) => Err("invalid authority"),
        _ => Ok(()),
    }
}

/// `uri-host [ ":" port ]`, or empty (RFC 9112 §3.2 lets a target without authority send that).
///
/// A scan of the bytes (RFC 3986 §3.2.2–3): every HTTP/1.1 request's `Host` is checked, and
/// parsing it as an `http::uri::Authority` cost about 900 instructions a request (callgrind).
fn is_host(value: &[u8]) -> bool {
    let port = match value.first() {
        None => return true,
        // IP-literal: an address in brackets (see `is_ip_literal`).
        Some(b'[') => {
            let Some(close) = value.iter().position(|&b| b == b']') else {
                return false;
            };
            if !is_ip_literal(&value[1..close]) {
                return false;
            }
            match &value[close + 1..] {
                [] => return true,
                [b':', port @ ..] => port,
                _ => return false,
            }
        }
        // reg-name or IPv4address: unreserved and sub-delims only (no `@`, no `/`; no `%`
        // either, which `http`'s parser refuses too), possibly empty (`:80`), as RFC 3986 allows.
        Some(_) => {
            let (host, port) = match value.iter().rposition(|&b| b == b':') {
                Some(colon) => (&value[..colon], &value[colon + 1..]),
                None => (value, &[][..]),
            };
            if !host.iter().all(|&b| is_reg_name_byte(b)) {
                return false;
            }
            port
        }
    };
    port.iter().all(u8::is_ascii_digit)
}

/// What brackets may hold (RFC 3986 §3.2.2, RFC 6874): an IPv6 address, with a zone after `%25`,
/// or an IPvFuture (`v` HEXDIG... `.` then unreserved, sub-delims or `:`).
fn is_ip_literal(inside: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = inside {
        let Some(dot) = rest.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (version, tail) = (&rest[..dot], &rest[dot + 1..]);
        return !version.is_empty()
            && version.iter().all(u8::is_ascii_hexdigit)
            && !tail.is_empty()
            && tail.iter().all(|&b| b == b':' || is_reg_name_byte(b));
    }
    let (address, zone) = match inside.windows(3).position(|w| w == b"%25") {
        Some(at) => (&inside[..at], Some(&inside[at + 3..])),
        None => (inside, None),
    };
    let zone_ok = zone.is_none_or(|z| !z.is_empty() && z.iter().all(|&b| is_reg_name_byte(b)));
    zone_ok
        && std::str::from_utf8(address)
            .ok()
            .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
            .is_some()
}

/// unreserved / sub-delims (RFC 3986 §2).
fn is_reg_name_byte(b: u8) -> bool {
    REG_NAME[usize::from(b)]
}

/// [`is_reg_name_byte`] by byte: a lookup, since every request's `Host` goes through it.
const REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// The host a request is addressed to, without a port: the URI's authority (HTTP/2, absolute form)
/// or the `Host` header.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.authority() {
        Some(a) => a.host(),
        None => headers.get(header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ip_values_read_as_display_writes_them() {
        for octet in 0..=255u8 {
            for ip in [
                std::net::Ipv4Addr::new(octet, 0, 9, 255),
                std::net::Ipv4Addr::new(10, octet, 100, 99),
                std::net::Ipv4Addr::new(octet, octet, octet, octet),
            ] {
                let ip = IpAddr::V4(ip);
                assert_eq!(peer_ip_value(ip).to_str().unwrap(), ip.to_string());
            }
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(peer_ip_value(v6).to_str().unwrap(), "2001:db8::1");
    }

    #[test]
    fn strips_connection_named_and_fixed_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
    }

    #[test]
    fn a_length_goes_with_the_encoding_beside_it_and_stays_alone() {
        let mut both = HeaderMap::new();
        both.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        both.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut both, false);
        assert!(both.is_empty(), "{both:?}");

        let mut alone = HeaderMap::new();
        alone.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        alone.insert(header::CONNECTION, HeaderValue::from_static("close"));
        strip_hop_by_hop(&mut alone, false);
        let names: Vec<_> = alone.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-length"]);
    }

    #[test]
    fn proxy_authenticate_is_stripped_and_credentials_only_on_request() {
        let mut response = HeaderMap::new();
        response.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"backend\""),
        );
        response.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
        strip_hop_by_hop(&mut response, false);
        let names: Vec<_> = response.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["www-authenticate"]);

        let mut request = HeaderMap::new();
        request.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpzZWNyZXQ="),
        );
        request.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut request, false);
        strip_proxy_credentials(&mut request);
        let names: Vec<_> = request.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["authorization"]);
    }

    #[test]
    fn connection_tokens_are_read_across_headers_and_commas() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive,, x-a"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static(" Upgrade "));
        let tokens: Vec<_> = connection_tokens(&h).collect();
        assert_eq!(tokens, vec!["keep-alive", "x-a", "Upgrade"]);
        assert!(!wants_upgrade(&h), "no Upgrade header");
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
    }

    #[test]
    fn keeps_upgrade_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn connection_names_are_matched_in_any_case_across_repeated_headers() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-Secret"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Other"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("2"));
        h.insert("x-keep", HeaderValue::from_static("3"));
        let mut upgrading = h.clone();
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
        strip_hop_by_hop(&mut upgrading, true);
        let mut names: Vec<_> = upgrading.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "upgrade", "x-keep"]);
        assert_eq!(upgrading[header::CONNECTION], "upgrade");
    }

    #[test]
    fn connection_cannot_name_host_away() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::HOST], "a.example");
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        set_forwarded(
            &mut h,
            &peer_ip_value("127.0.0.1".parse().unwrap()),
            "http",
            Some(&HeaderValue::from_static("a.example:8080")),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "a.example:8080");
    }

    #[test]
    fn client_ip_trusts_only_trusted_peers() {
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 9.9.9.9, 10.0.0.2"),
        );
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // Untrusted peer: XFF ignored.
        assert_eq!(
            client_ip("8.8.8.8".parse().unwrap(), &h, &trusted),
            "8.8.8.8".parse::<IpAddr>().unwrap()
        );
        // Trusted peer: right-most untrusted entry, not the spoofable left-most.
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), &h, &trusted),
            "9.9.9.9".parse::<IpAddr>().unwrap()
        );
        // No trusted list: peer.
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), &h, &[]),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn host_must_be_one_valid_authority() {
        let with = |hosts: &[&'static str]| {
            let mut h = HeaderMap::new();
            for host in hosts {
                h.append(header::HOST, HeaderValue::from_static(host));
            }
            h
        };
        let v11 = Version::HTTP_11;
        assert_eq!(check_host(v11, &with(&["a.example:8080"])), Ok(()));
        assert_eq!(check_host(v11, &with(&["[::1]:80"])), Ok(()));
        assert_eq!(check_host(v11, &with(&[""])), Ok(()));
        assert_eq!(check_host(v11, &with(&[])), Err("missing Host header"));
        assert_eq!(check_host(Version::HTTP_10, &with(&[])), Ok(()));
        assert_eq!(check_host(Version::HTTP_2, &with(&[])), Ok(()));
        let two = with(&["a.example", "b.example"]);
        assert_eq!(check_host(v11, &two), Err("more than one Host header"));
        assert_eq!(
            check_host(Version::HTTP_10, &two),
            Err("more than one Host header")
        );
        for bad in ["a b", "a.example/x", "user@a.example", "a.example:port"] {
            assert_eq!(
                check_host(v11, &with(&[bad])),
                Err("invalid Host header"),
                "{bad}"
            );
        }
    }

    /// The check before the byte scan: what `http` parses as an authority, without userinfo,
    /// with a port of digits only.
    fn is_host_as_authority(value: &[u8]) -> bool {
        if value.is_empty() {
            return true;
        }
        if value.contains(&b'@') || http::uri::Authority::try_from(value).is_err() {
            return false;
        }
        match value.iter().rposition(|&b| b == b':') {
            Some(colon) if !value[colon..].contains(&b']') => {
                value[colon + 1..].iter().all(u8::is_ascii_digit)
            }
            _ => true,
        }
    }

    #[test]
    fn the_host_scan_agrees_with_the_authority_parser() {
        let cases = [
            "a.example",
            "a.example:8080",
            "a.example:",
            "A-b_c~d.e",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:80",
            "[::1]:",
            "[fe80::1%25eth0]",
            "[v1.fe]",
            "xn--bcher-kva.example",
            "a%20b",
            "a!$&'()*+,;=b",
            "",
            ":80",
            "[]",
            "[::1",
            "::1]",
            "[::1]x",
            "[::1]:8a",
            "a b",
            "a\tb",
            "a/b",
            "a?b",
            "a#b",
            "a@b",
            "@a",
            "a:b:80",
            "a:80:",
            "a.example:port",
            "a\"b",
            "a<b",
            "a>b",
            "a\\b",
            "a^b",
            "a`b",
            "a{b",
            "a|b",
            "a}b",
            "a[b]",
            "a]",
            "[a]b",
            "é.example",
            "[a.example]",
            "[a.example]:80",
            "[1:2:3:4:5:6:7:8:9:0]",
            "[::1%25]",
            "[v.x]",
            "[v1.]",
        ];
        // Brackets hold an address and nothing else: the parser lets these through.
        let stricter = [
            "[]",
            "[::1]x",
            "a[b]",
            "[a]b",
            "[a.example]",
            "[a.example]:80",
            "[::1%25]",
            "[v.x]",
            "[v1.]",
        ];
        for case in cases {
            let (scan, parser) = (
                is_host(case.as_bytes()),
                is_host_as_authority(case.as_bytes()),
            );
            if stricter.contains(&case) {
                assert!(!scan && parser, "{case:?}");
            } else {
                assert_eq!(scan, parser, "{case:?}");
            }
        }
    }

    #[test]
    fn a_field_named_by_connection_close_goes_with_it() {
        for (connection, kept) in [
            ("close", false),
            ("keep-alive", true),
            ("Close, x-a", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(connection));
            h.insert("close", HeaderValue::from_static("secret"));
            h.insert("x-a", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.contains_key("close"), kept, "{connection}");
            assert!(!h.contains_key(header::CONNECTION));
        }
    }

    #[test]
    fn an_authority_must_be_what_a_host_may_be() {
        let check = |target: &str| check_authority(&target.parse().unwrap());
        assert_eq!(check("/x"), Ok(()));
        assert_eq!(check("http://a.example:8080/x"), Ok(()));
        assert_eq!(check("http://[::1]:80/"), Ok(()));
        for bad in ["http://evil@a.example/", "http://a.example:abc/"] {
            assert_eq!(check(bad), Err("invalid authority"), "{bad}");
        }
    }

    #[test]
    fn host_without_port() {
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("API.example.com:8080"),
        );
        let uri: http::Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&uri, &h), Some("API.example.com"));
        h.insert(header::HOST, HeaderValue::from_static("[::1]:80"));
        assert_eq!(request_host(&uri, &h), Some("::1"));
        let abs: http::Uri = "http://b.example:9/x".parse().unwrap();
        assert_eq!(request_host(&abs, &h), Some("b.example"));
    }

    mod properties {
        //! `X-Forwarded-For` as a client may write it: any text, any number of headers.
        use proptest::prelude::*;

        use super::*;

        /// An entry: an address, an address with spaces or a port, or garbage.
        fn entry() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
                any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
                any::<std::net::Ipv4Addr>().prop_map(|ip| format!("  {ip}\t")),
                any::<std::net::SocketAddr>().prop_map(|a| a.to_string()),
                "[ -~]{0,20}",
            ]
        }

        /// One header value: entries joined by commas.
        fn value() -> impl Strategy<Value = String> {
            prop::collection::vec(entry(), 0..6).prop_map(|entries| entries.join(","))
        }

        fn headers(values: &[String]) -> HeaderMap {
            let mut h = HeaderMap::new();
            for v in values {
                if let Ok(v) = HeaderValue::from_str(v) {
                    h.append(X_FORWARDED_FOR, v);
                }
            }
            h
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// The byte scan of `Host` agrees with `http`'s authority parser, but for brackets
            /// around something that is not an address, which only the scan refuses.
            #[test]
            fn the_host_scan_agrees_with_the_parser_on_any_text(
                host in "[a-zA-Z0-9.:%@/?#\\[\\] !$&'()*+,;=_~-]{0,12}",
            ) {
                let (scan, parser) = (is_host(host.as_bytes()), is_host_as_authority(host.as_bytes()));
                if host.contains('[') || host.contains(']') {
                    prop_assert!(!scan || parser, "{:?}", host);
                } else {
                    prop_assert_eq!(scan, parser, "{:?}", host);
                }
            }

            /// From an untrusted peer the header is never believed, whatever it says.
            #[test]
            fn an_untrusted_peer_is_its_own_client(
                values in prop::collection::vec(value(), 0..4),
                peer in any::<std::net::IpAddr>(),
            ) {
                let h = headers(&values);
                prop_assert_eq!(client_ip(peer, &h, &[]), peer);
                let elsewhere: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
                prop_assume!(!elsewhere[0].contains(&peer));
                prop_assert_eq!(client_ip(peer, &h, &elsewhere), peer);
            }

            /// From a trusted peer the client is the peer or an address the header holds: the
            /// right-most entry that is not trusted, or the peer when the right-most one is
            /// unreadable.
            #[test]
            fn a_trusted_peer_forwards_an_address_from_the_header(
                values in prop::collection::vec(value(), 0..4),
                last in any::<std::net::Ipv4Addr>(),
            ) {
                let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
                let peer: IpAddr = "10.0.0.1".parse().unwrap();
                let h = headers(&values);
                let client = client_ip(peer, &h, &trusted);
                let entries: Vec<String> = h
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(|e| e.trim().to_owned())
                    .collect();
                prop_assert!(client == peer || entries.contains(&client.to_string()));
                // Whatever the client wrote to the left, its last hop decides.
                let mut with_last = values.clone();
                with_last.push(last.to_string());
                let expected = if trusted[0].contains(&IpAddr::V4(last)) {
                    None
                } else {
                    Some(IpAddr::V4(last))
                };
                let client = client_ip(peer, &headers(&with_last), &trusted);
                if let Some(expected) = expected {
                    prop_assert_eq!(client, expected);
                }
            }

            /// Appending keeps what was there, in order (empty headers aside), and adds the
            /// peer last.
            #[test]
            fn forwarding_appends_the_peer(
                values in prop::collection::vec(value(), 0..4),
                peer in any::<std::net::IpAddr>(),
            ) {
                let mut h = headers(&values);
                let before: Vec<String> = h
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(|v| v.trim().to_owned()))
                    .filter(|v| !v.is_empty())
                    .collect();
                set_forwarded(&mut h, &peer_ip_value(peer), "http", None);
                let after: Vec<&HeaderValue> = h.get_all(&X_FORWARDED_FOR).iter().collect();
                prop_assert_eq!(after.len(), 1);
                let mut expected = before.join(", ");
                if !expected.is_empty() {
                    expected.push_str(", ");
                }
                expected.push_str(&peer.to_string());
                prop_assert_eq!(after[0].to_str().unwrap(), expected);
            }
        }
    }
}
