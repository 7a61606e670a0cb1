//! Forwarding headers and the request target: what a client claims about itself cannot move it
//! between `ip_hash` backends unless its peer is a trusted proxy, `X-Forwarded-For` is appended
//! to (never replaced, never believed from an untrusted peer), the other `X-Forwarded-*` are
//! switchyard's own, and `Host` and the request target are handled as RFC 9112 §3.2 says.

mod support;

use std::collections::BTreeSet;

use bytes::Bytes;
use support::*;

/// Headers a client could use to claim another address.
fn spoofs(i: u8) -> Vec<(&'static str, String)> {
    vec![
        ("x-forwarded-for", format!("198.51.100.{i}")),
        ("x-forwarded-for", format!("198.51.100.{i}, 10.0.0.{i}")),
        ("forwarded", format!("for=198.51.100.{i};proto=https")),
        ("x-real-ip", format!("198.51.100.{i}")),
        ("true-client-ip", format!("198.51.100.{i}")),
    ]
}

#[tokio::test]
async fn an_untrusted_peer_cannot_choose_its_ip_hash_backend() {
    let apps = apps(4).await;
    // A cookie pool placing new clients by ip_hash hashes the client IP too.
    let ip_hash = one_pool("ip_hash", &weight_one(&apps), "");
    let cookie = one_pool("cookie", &weight_one(&apps), "")
        .replace("name = \"sy\"", "name = \"sy\"\nfallback = \"ip_hash\"");
    for text in [ip_hash, cookie] {
        let (_server, proxy) = proxy(&text).await;
        let home = get(proxy, "/", &[]).await.backend();
        let client = client();
        for i in 0..20 {
            for (name, value) in spoofs(i) {
                let reply = send(&client, proxy, "GET", "/", &[(name, &value)], Bytes::new()).await;
                assert_eq!(reply.status, 200);
                assert_eq!(reply.backend(), home, "{name}: {value} moved the client");
            }
        }
    }
}

#[tokio::test]
async fn a_trusted_proxy_is_believed_through_x_forwarded_for_only() {
    let apps = apps(4).await;
    let text = pool_with(
        "ip_hash",
        &weight_one(&apps),
        r#"trusted_proxies = ["127.0.0.1"]"#,
        &format!("\"{SECRET}\""),
        "",
    );
    let (_server, proxy) = proxy(&text).await;
    let home = get(proxy, "/", &[]).await.backend();
    let mut placed = BTreeSet::new();
    for i in 0..20 {
        let xff = format!("203.0.113.{i}");
        placed.insert(
            get(proxy, "/", &[("x-forwarded-for", &xff)])
                .await
                .backend(),
        );
        // Forwarded and the other headers are not read, even from a trusted peer.
        for (name, value) in spoofs(i)
            .into_iter()
            .filter(|(n, _)| *n != "x-forwarded-for")
        {
            assert_eq!(
                get(proxy, "/", &[(name, &value)]).await.backend(),
                home,
                "{name}"
            );
        }
    }
    assert!(placed.len() > 1, "20 forwarded IPs all on {placed:?}");
    // A client behind the trusted proxy cannot pick its hop either: the right-most untrusted
    // entry counts, not the left-most it wrote itself.
    let a = get(proxy, "/", &[("x-forwarded-for", "1.1.1.1, 203.0.113.7")]).await;
    let b = get(proxy, "/", &[("x-forwarded-for", "2.2.2.2, 203.0.113.7")]).await;
    let direct = get(proxy, "/", &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(a.backend(), direct.backend());
    assert_eq!(b.backend(), direct.backend());
}

#[tokio::test]
async fn forwarding_headers_are_appended_or_replaced_never_passed_on_as_claimed() {
    let backend = wire_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let request = "GET /x HTTP/1.1\r\nhost: shop.example:8080\r\n\
        x-forwarded-for: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7\r\n\
        x-forwarded-proto: https\r\nx-forwarded-host: evil.example\r\n\r\n";
    let (answer, _) = raw_exchange_closed(proxy, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let seen = &backend.requests()[0];
    assert_eq!(
        seen.header("x-forwarded-for"),
        ["6.6.6.6, 7.7.7.7, 127.0.0.1"]
    );
    assert_eq!(seen.header("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.header("x-forwarded-host"), ["shop.example:8080"]);
    assert_eq!(seen.header("host"), ["shop.example:8080"]);
}

/// A route matched by Host and a catch-all one, with a backend each to tell them apart.
async fn routed() -> (
    Vec<WireBackend>,
    std::net::SocketAddr,
    std::sync::Arc<switchyard::server::Server>,
) {
    let backends = vec![wire_backend().await, wire_backend().await];
    let text = format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
host = "only.example"
pool = "only"

[[routes]]
pool = "rest"

[pools.only]
strategy = "round_robin"
backends = [{{ address = "{}" }}]

[pools.rest]
strategy = "round_robin"
backends = [{{ address = "{}" }}]
"#,
        backends[0].addr, backends[1].addr
    );
    let (server, proxy) = proxy(&text).await;
    (backends, proxy, server)
}

#[tokio::test]
async fn host_with_a_port_and_absolute_form_targets_route_as_rfc_9112_says() {
    let (backends, proxy, _server) = routed().await;
    // A port in Host does not change the route, and reaches the backend as sent.
    let (answer, _) =
        raw_exchange_closed(proxy, b"GET /a HTTP/1.1\r\nhost: ONLY.example:8080\r\n\r\n").await;
    assert_eq!(status_of(&answer), 200);
    let seen = backends[0].requests();
    assert_eq!(seen[0].request_line(), "GET /a HTTP/1.1");
    assert_eq!(seen[0].header("host"), ["ONLY.example:8080"]);
    // An absolute-form target wins over Host (§3.2.2): routed by its authority, sent on in
    // origin form with Host replaced.
    let request = b"GET http://only.example:9/b?q=1 HTTP/1.1\r\nhost: elsewhere.example\r\n\r\n";
    let (answer, _) = raw_exchange_closed(proxy, request).await;
    assert_eq!(status_of(&answer), 200);
    let seen = backends[0].requests();
    assert_eq!(seen[1].request_line(), "GET /b?q=1 HTTP/1.1");
    assert_eq!(seen[1].header("host"), ["only.example:9"]);
    assert!(backends[1].requests().is_empty());
    // HTTP/1.0 may leave Host out; it goes to the route without a host.
    let (answer, _) = raw_exchange_closed(proxy, b"GET /c HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(backends[1].requests()[0].request_line(), "GET /c HTTP/1.1");
}

#[tokio::test]
async fn a_missing_repeated_or_invalid_host_is_400_and_closes() {
    let (backends, proxy, _server) = routed().await;
    let cases: [(&str, &[u8]); 8] = [
        ("missing", b"GET / HTTP/1.1\r\n\r\n"),
        (
            "missing, absolute form",
            b"GET http://only.example/ HTTP/1.1\r\n\r\n",
        ),
        (
            "two Host lines",
            b"GET / HTTP/1.1\r\nhost: only.example\r\nhost: other.example\r\n\r\n",
        ),
        (
            "two Host lines in HTTP/1.0",
            b"GET / HTTP/1.0\r\nhost: only.example\r\nhost: other.example\r\n\r\n",
        ),
        (
            "a path in Host",
            b"GET / HTTP/1.1\r\nhost: only.example/x\r\n\r\n",
        ),
        (
            "userinfo in Host",
            b"GET / HTTP/1.1\r\nhost: me@only.example\r\n\r\n",
        ),
        // The target's authority would become the backend's Host: it is held to the same rules.
        (
            "userinfo in an absolute-form target",
            b"GET http://evil@only.example/ HTTP/1.1\r\nhost: only.example\r\n\r\n",
        ),
        (
            "a port that is not digits in an absolute-form target",
            b"GET http://only.example:abc/ HTTP/1.1\r\nhost: only.example\r\n\r\n",
        ),
    ];
    for (name, request) in cases {
        let (answer, closed) = raw_exchange_closed(proxy, request).await;
        assert_eq!(status_of(&answer), 400, "{name}: {answer}");
        assert!(answer.ends_with("bad request\n"), "{name}: {answer}");
        assert!(closed, "{name}");
    }
    assert!(backends.iter().all(|b| b.heads().is_empty()));
}
