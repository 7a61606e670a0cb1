//! TLS termination and HTTP/2: certificates chosen by SNI, ALPN, TLS versions, certificates swapped
//! by a reload, the https redirect, https backends (SNI, verification, HTTP/2 multiplexing, health
//! checks), and the HTTP/2 limits that protect the server. Certificates come from a CA generated
//! in each test (rcgen); the clients trust only that CA.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use rustls::ProtocolVersion;
use support::tls::*;
use support::*;
use switchyard::config::Config;
use switchyard::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `[[listeners]]` entries (TOML, with their header) then pool `app`, round robin over `backends`.
fn proxy_toml(listeners: &str, backends: &[SocketAddr], pool_extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "{listeners}\n[[routes]]\npool = \"app\"\n\n[pools.app]\nstrategy = \"round_robin\"\n\
         backends = [{}]\n{pool_extra}\n",
        list.join(", ")
    )
}

/// A TLS listener on an ephemeral port serving `issued` to everyone.
fn tls_listener(issued: &Issued) -> String {
    format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        issued.cert.display(),
        issued.key.display()
    )
}

/// Writes `text` as `dir/proxy.toml` and starts the proxy from that file (so it can reload it).
async fn start(dir: &Path, text: &str) -> Arc<Server> {
    let path = write_proxy_toml(dir, text);
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    Server::start(config).await.expect("proxy starts")
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_alpn_prefers_h2() {
    let pki = Pki::new();
    // The first certificate is the default; it also names what the default case connects to.
    let a = pki.issue("a", &["a.example", "unknown.example", "127.0.0.1"]);
    let b = pki.issue("b", &["b.example"]);
    let wild = pki.issue("wild", &["*.wild.example", "a.b.wild.example"]);
    let apps = apps(1).await;
    let listeners = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\ncertificates = [\n\
         {{ cert = \"{}\", key = \"{}\", server_names = [\"a.example\"] }},\n\
         {{ cert = \"{}\", key = \"{}\", server_names = [\"B.Example\"] }},\n\
         {{ cert = \"{}\", key = \"{}\", server_names = [\"*.wild.example\"] }},\n]\n",
        a.cert.display(),
        a.key.display(),
        b.cert.display(),
        b.key.display(),
        wild.cert.display(),
        wild.key.display(),
    );
    let server = start(
        pki.dir.path(),
        &proxy_toml(&listeners, &[apps[0].addr()], ""),
    )
    .await;
    let addr = server.listen_addrs()[0];

    for (sni, expected, name) in [
        ("a.example", &a, "a"),
        ("b.example", &b, "b (names match case-insensitively)"),
        ("x.wild.example", &wild, "wild"),
        // One label only: deeper names fall back to the default.
        ("a.b.wild.example", &a, "the default"),
        ("unknown.example", &a, "the default"),
        // An IP address sends no SNI at all.
        ("127.0.0.1", &a, "the default"),
    ] {
        let result = connect(addr, sni, pki.default_client()).await;
        match (sni, result) {
            // The default certificate does not name it, so a verifying client refuses it: the
            // proof that the wildcard did not match.
            ("a.b.wild.example", Err(error)) => {
                assert!(error.to_string().contains("certificate"), "{error}");
            }
            ("a.b.wild.example", Ok(stream)) => {
                let wild = peer_leaf(&stream) == wild.der;
                panic!("{sni}: expected a name mismatch; served the wildcard one: {wild}")
            }
            (_, result) => {
                let stream = result.unwrap_or_else(|e| panic!("{sni}: {e}"));
                assert!(
                    peer_leaf(&stream) == expected.der,
                    "{sni}: not {name}'s certificate"
                );
                assert_eq!(alpn(&stream).as_deref(), Some("h2"), "{sni}");
            }
        }
    }

    // A client that offers only HTTP/1.1 gets it, and one offering nothing is served HTTP/1.1.
    for offered in [&[b"http/1.1" as &[u8]][..], &[]] {
        let stream = connect(
            addr,
            "b.example",
            pki.client(offered, rustls::DEFAULT_VERSIONS),
        )
        .await
        .unwrap();
        let expected = offered.first().map(|_| "http/1.1".to_owned());
        assert_eq!(alpn(&stream), expected);
        let mut client = Client::over(stream).await;
        let (response, body) = client.get("b.example", "/").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), Version::HTTP_11);
        assert!(body.starts_with("app1 "), "{body}");
    }
}

/// A ClientHello that offers TLS 1.1 at most (no `supported_versions` extension), as an old
/// client sends it.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version: TLS 1.1
    hello.extend([7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend([0x00, 0x04, 0xc0, 0x14, 0x00, 0x2f]); // ECDHE-RSA-AES256-SHA, AES128-SHA
    hello.extend([0x01, 0x00]); // null compression
                                // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256), so that the version is
                                // what the server refuses (without it rustls refuses earlier, with handshake_failure).
    hello.extend([
        0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04,
    ]);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend((hello.len() as u16).to_be_bytes());
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_12_and_13_are_served_and_older_versions_are_refused() {
    let pki = Pki::new();
    let cert = pki.issue("site", &["site.example"]);
    let apps = apps(1).await;
    let server = start(
        pki.dir.path(),
        &proxy_toml(&tls_listener(&cert), &[apps[0].addr()], ""),
    )
    .await;
    let addr = server.listen_addrs()[0];

    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let stream = connect(addr, "site.example", pki.client(&[b"h2"], &[version]))
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
        let mut client = Client::over(stream).await;
        let (response, _) = client.get("site.example", "/").await;
        assert_eq!(response.status(), 200, "{expected:?}");
    }
    assert_eq!(apps[0].requests(), 2);

    // TLS 1.1: a protocol_version alert (70), and no handshake.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&tls11_client_hello()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    assert!(answer.len() >= 7, "{answer:?}");
    assert_eq!(answer[0], 0x15, "an alert record: {answer:?}");
    assert_eq!(answer[6], 70, "protocol_version: {answer:?}");
}

#[tokio::test]
async fn http2_over_tls_and_h2c_reach_the_backend_with_the_right_forwarded_proto() {
    let pki = Pki::new();
    let cert = pki.issue("site", &["site.example"]);
    let (backend, seen) = recording_backend("127.0.0.1:0".parse().unwrap(), None).await;
    let listeners = format!(
        "{}[[listeners]]\nlisten = \"127.0.0.1:0\"\n",
        tls_listener(&cert)
    );
    let server = start(pki.dir.path(), &proxy_toml(&listeners, &[backend], "")).await;
    let (tls_addr, plain_addr) = (server.listen_addrs()[0], server.listen_addrs()[1]);

    // HTTP/2 over TLS: several requests at once on one connection.
    let stream = connect(tls_addr, "site.example", pki.default_client())
        .await
        .unwrap();
    let Client::Http2(h2) = Client::over(stream).await else {
        panic!("ALPN chose HTTP/1.1");
    };
    let requests = (0..5).map(|i| {
        let mut h2 = h2.clone();
        async move {
            let request = Request::get(format!("https://site.example/tls/{i}?q=1"))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            let response = h2.send_request(request).await.unwrap();
            assert_eq!(response.version(), Version::HTTP_2);
            response.status()
        }
    });
    for status in futures_util::future::join_all(requests).await {
        assert_eq!(status, StatusCode::OK);
    }
    // HTTP/1.1 over TLS.
    let stream = connect(
        tls_addr,
        "site.example",
        pki.client(&[b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    let (response, body) = Client::over(stream)
        .await
        .get("site.example", "/tls-h1")
        .await;
    assert_eq!((response.status(), body.as_str()), (StatusCode::OK, "seen"));
    // h2c: HTTP/2 with prior knowledge on the plain listener.
    let stream = tokio::net::TcpStream::connect(plain_addr).await.unwrap();
    let (mut h2c, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = Request::get("http://plain.example/h2c")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = h2c.send_request(request).await.unwrap();
    assert_eq!(
        (response.version(), response.status()),
        (Version::HTTP_2, StatusCode::OK)
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 7, "{seen:#?}");
    for request in &seen {
        // The backend is plain HTTP/1.1; the proxy speaks that to it whatever the client spoke.
        assert_eq!(request.version, Version::HTTP_11, "{request:?}");
        let path = request.uri.path();
        let (proto, host) = if path == "/h2c" {
            ("http", "plain.example")
        } else {
            ("https", "site.example")
        };
        assert_eq!(request.headers["x-forwarded-proto"], proto, "{request:?}");
        assert_eq!(request.headers["host"], host, "{request:?}");
    }
    let mut paths: Vec<String> = seen.iter().map(|s| s.uri.to_string()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/h2c",
            "/tls-h1",
            "/tls/0?q=1",
            "/tls/1?q=1",
            "/tls/2?q=1",
            "/tls/3?q=1",
            "/tls/4?q=1"
        ]
    );
}

#[tokio::test]
async fn certificates_swapped_on_disk_are_served_to_new_connections_after_a_reload() {
    let pki = Pki::new();
    let first = pki.issue("site", &["site.example"]);
    let apps = apps(1).await;
    let text = proxy_toml(&tls_listener(&first), &[apps[0].addr()], "");
    let server = start(pki.dir.path(), &text).await;
    let addr = server.listen_addrs()[0];

    let old_stream = connect(addr, "site.example", pki.default_client())
        .await
        .unwrap();
    assert!(peer_leaf(&old_stream) == first.der);
    let mut old = Client::over(old_stream).await;
    assert_eq!(old.get("site.example", "/").await.0.status(), 200);

    // Rotated in place: same paths, new files; the config text does not change.
    let second = pki.issue("site", &["site.example"]);
    assert!(second.der != first.der);
    let report = server.reload_from_file().await.expect("reload succeeds");
    // Reported by configured address.
    let configured: SocketAddr = "127.0.0.1:0".parse().unwrap();
    assert_eq!(report.listeners_changed, [configured], "{report}");
    assert_eq!(
        server.listen_addrs(),
        [addr],
        "the listener was not re-bound"
    );

    let new_stream = connect(addr, "site.example", pki.default_client())
        .await
        .unwrap();
    assert!(
        peer_leaf(&new_stream) == second.der,
        "a new connection gets the new certificate"
    );
    // The connection opened before the reload keeps working.
    assert_eq!(old.get("site.example", "/").await.0.status(), 200);

    // A certificate that cannot be read is a reload error, and the last good one keeps serving.
    std::fs::write(&second.cert, "not a certificate").unwrap();
    let error = server
        .reload_from_file()
        .await
        .expect_err("a bad certificate is refused");
    let message = error.to_string();
    assert!(
        message.contains("listeners[0].tls.cert: no certificate found in"),
        "{message}"
    );
    let stream = connect(addr, "site.example", pki.default_client())
        .await
        .unwrap();
    assert!(peer_leaf(&stream) == second.der);
    let (response, _) = Client::over(stream).await.get("site.example", "/").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn plain_listener_with_redirect_https_answers_308_to_the_tls_listener() {
    let pki = Pki::new();
    let cert = pki.issue("site", &["shop.example"]);
    let apps = apps(1).await;
    let listeners = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\n{}",
        tls_listener(&cert)
    );
    let server = start(
        pki.dir.path(),
        &proxy_toml(&listeners, &[apps[0].addr()], ""),
    )
    .await;
    let (plain, tls) = (server.listen_addrs()[0], server.listen_addrs()[1]);

    let reply = get(plain, "/cart?item=7", &[("host", "shop.example:8080")]).await;
    assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        reply.headers["location"],
        format!("https://shop.example:{}/cart?item=7", tls.port()).as_str()
    );
    let post = send(
        &client(),
        plain,
        "POST",
        "/pay",
        &[("host", "shop.example")],
        Bytes::from_static(b"x"),
    )
    .await;
    assert_eq!(post.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        apps[0].requests(),
        0,
        "nothing is proxied from the redirecting listener"
    );

    // The TLS listener proxies as usual.
    let stream = connect(tls, "shop.example", pki.default_client())
        .await
        .unwrap();
    let (response, _) = Client::over(stream)
        .await
        .get("shop.example", "/cart?item=7")
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(apps[0].requests(), 1);
}

/// An https backend on `localhost` with a certificate from the test CA, offering `alpn`.
async fn https_backend(pki: &Pki, alpn: &[&[u8]]) -> (u16, Arc<std::sync::Mutex<Vec<Seen>>>) {
    let cert = pki.issue("backend", &["localhost"]);
    let bind = SocketAddr::new(localhost().await, 0);
    let (addr, seen) = recording_backend(bind, Some(pki.server(&cert, alpn))).await;
    (addr.port(), seen)
}

/// Pool `app` with one `https://localhost:PORT` backend, verified against `ca`, plus `extra`.
fn https_pool(port: u16, ca: Option<&Path>, extra: &str) -> String {
    let ca = ca.map_or(String::new(), |ca| format!("ca = \"{}\"\n", ca.display()));
    format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\npool = \"app\"\n\n[pools.app]\n\
         strategy = \"round_robin\"\nbackends = [{{ address = \"https://localhost:{port}\" }}]\n\
         {ca}{extra}\n"
    )
}

#[tokio::test]
async fn https_backend_gets_sni_and_one_multiplexed_http2_connection() {
    let pki = Pki::new();
    let (port, seen) = https_backend(&pki, &[b"h2", b"http/1.1"]).await;
    let server = start(pki.dir.path(), &https_pool(port, Some(&pki.ca_file()), "")).await;
    let proxy = server.listen_addrs()[0];

    let first = get(proxy, "/one?x=1", &[("host", "shop.example")]).await;
    assert_eq!(
        (first.status, first.body.as_str()),
        (StatusCode::OK, "seen")
    );
    let replies = futures_util::future::join_all((0..20).map(|i| async move {
        get(proxy, &format!("/many/{i}"), &[("host", "shop.example")]).await
    }))
    .await;
    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "{replies:?}"
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 21);
    for request in &seen {
        assert_eq!(request.version, Version::HTTP_2, "{request:?}");
        assert_eq!(
            request.sni.as_deref(),
            Some("localhost"),
            "SNI is the backend's host"
        );
        // The client's host travels as the :authority.
        assert_eq!(
            request.uri.authority().map(|a| a.as_str()),
            Some("shop.example")
        );
        assert_eq!(request.uri.scheme_str(), Some("https"));
        assert_eq!(request.headers["x-forwarded-proto"], "http");
        assert_eq!(
            request.connection, 0,
            "every request shares the first connection"
        );
    }
    assert_eq!(seen[0].uri.path_and_query().unwrap().as_str(), "/one?x=1");
}

/// A reload that changes a backend's TLS settings (here what its `ca` file holds) closes the
/// connections made under the old ones, and the next request opens one under the new; a reload
/// that changes nothing keeps them.
#[tokio::test]
async fn a_reload_that_changes_a_backends_tls_settings_reconnects() {
    let pki = Pki::new();
    let (port, seen) = https_backend(&pki, &[b"http/1.1"]).await;
    let ca = pki.dir.path().join("backend-ca.pem");
    std::fs::copy(pki.ca_file(), &ca).unwrap();
    let server = start(pki.dir.path(), &https_pool(port, Some(&ca), "")).await;
    let proxy = server.listen_addrs()[0];
    let client = client();
    let connection_of_next = || async {
        let reply = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
        assert_eq!(reply.status, StatusCode::OK);
        seen.lock().unwrap().last().unwrap().connection
    };
    assert_eq!(connection_of_next().await, 0);
    assert_eq!(connection_of_next().await, 0, "kept alive");

    // The same CA and one more: the file's fingerprint, so the settings, change.
    let mut pem = std::fs::read(pki.ca_file()).unwrap();
    pem.extend(std::fs::read(Pki::new().ca_file()).unwrap());
    std::fs::write(&ca, pem).unwrap();
    server.reload_from_file().await.expect("reload succeeds");
    assert_eq!(
        connection_of_next().await,
        1,
        "a new connection after the change"
    );
    assert_eq!(
        connection_of_next().await,
        1,
        "kept alive under the new settings"
    );

    server.reload_from_file().await.expect("reload succeeds");
    assert_eq!(
        connection_of_next().await,
        1,
        "an unchanged reload keeps it"
    );
}

#[tokio::test]
async fn https_backend_speaking_http11_keeps_its_connections_alive() {
    let pki = Pki::new();
    let (port, seen) = https_backend(&pki, &[b"http/1.1"]).await;
    let server = start(pki.dir.path(), &https_pool(port, Some(&pki.ca_file()), "")).await;
    let proxy = server.listen_addrs()[0];
    let client = client();
    for _ in 0..5 {
        let reply = send(
            &client,
            proxy,
            "GET",
            "/h1",
            &[("host", "shop.example")],
            Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    for request in &seen {
        assert_eq!(request.version, Version::HTTP_11);
        assert_eq!(request.sni.as_deref(), Some("localhost"));
        assert_eq!(request.headers["host"], "shop.example");
        assert_eq!(request.connection, 0, "the connection is pooled and reused");
    }
}

/// A TLS connection to an HTTP/1.1 backend parks like a plain one, with its TLS session: the
/// request after the park goes over the same connection, with no new handshake.
#[tokio::test]
async fn a_parked_https_connection_carries_the_next_request() {
    let pki = Pki::new();
    let (port, seen) = https_backend(&pki, &[b"http/1.1"]).await;
    let server = start(pki.dir.path(), &https_pool(port, Some(&pki.ca_file()), "")).await;
    let proxy = server.listen_addrs()[0];
    let backend = SocketAddr::new(localhost().await, port);
    let state = server.shared().registry.get(backend).unwrap();
    let host = [("host", "shop.example")];
    assert_eq!(get(proxy, "/first", &host).await.status, StatusCode::OK);
    wait_until("the idle connection is parked", || {
        state.pool.idle_connections() == (0, 1)
    })
    .await;
    assert_eq!(get(proxy, "/second", &host).await.status, StatusCode::OK);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].connection, 0,
        "the parked TLS connection carried it"
    );
    assert_eq!(seen[1].version, Version::HTTP_11);
}

#[tokio::test]
async fn https_backend_that_cannot_be_verified_gets_no_request() {
    let pki = Pki::new();
    let (port, seen) = https_backend(&pki, &[b"h2", b"http/1.1"]).await;
    // No `ca`: Mozilla's roots, which do not know the test CA.
    let server = start(pki.dir.path(), &https_pool(port, None, "retries = 0")).await;
    let reply = get(server.listen_addrs()[0], "/", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    // A CA that did not issue it.
    let other = Pki::new();
    let server = start(
        other.dir.path(),
        &https_pool(port, Some(&other.ca_file()), "retries = 0"),
    )
    .await;
    let reply = get(server.listen_addrs()[0], "/", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn health_checks_reach_https_backends_over_tls() {
    let pki = Pki::new();
    let (port, seen) = https_backend(&pki, &[b"h2", b"http/1.1"]).await;
    let health = "[pools.app.health]\npath = \"/healthz\"\ninterval = \"50ms\"\n";
    let _server = start(
        pki.dir.path(),
        &https_pool(port, Some(&pki.ca_file()), health),
    )
    .await;
    wait_until("a health check reached the backend", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|s| s.uri.path() == "/healthz")
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let check = seen.iter().find(|s| s.uri.path() == "/healthz").unwrap();
    assert_eq!(check.headers["user-agent"], "switchyard-health-check");
    assert_eq!(check.sni.as_deref(), Some("localhost"));
    assert_eq!(check.version, Version::HTTP_11);
    assert_eq!(check.headers["host"], format!("localhost:{port}").as_str());
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 limits, with a raw h2 client (cleartext, prior knowledge)
// ---------------------------------------------------------------------------------------------

/// A raw HTTP/2 client connection to `addr`.
async fn h2_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(stream).await.unwrap();
    (client, tokio::spawn(connection))
}

fn h2_get(path: &str, header: Option<(&str, String)>) -> Request<()> {
    let mut request = Request::get(format!("http://limits.example{path}"));
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    request.body(()).unwrap()
}

/// Sends `request` and returns its status.
async fn h2_status(
    client: &mut h2::client::SendRequest<Bytes>,
    request: Request<()>,
) -> Result<StatusCode, h2::Error> {
    let mut ready = client.clone().ready().await?;
    let (response, _) = ready.send_request(request, true)?;
    Ok(response.await?.status())
}

#[tokio::test]
async fn oversized_http2_header_lists_get_431_and_the_connection_stays_usable() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let (mut client, _connection) = h2_client(proxy).await;

    // Under the 64 KiB limit: served.
    let fits = h2_get("/fits", Some(("x-big", "a".repeat(60 * 1024))));
    assert_eq!(h2_status(&mut client, fits).await.unwrap(), StatusCode::OK);
    // Over it: 431, and the backend never sees it.
    let over = h2_get("/over", Some(("x-big", "a".repeat(70 * 1024))));
    assert_eq!(
        h2_status(&mut client, over).await.unwrap(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(apps[0].requests(), 1);
    // The same connection goes on.
    let next = h2_get("/next", None);
    assert_eq!(h2_status(&mut client, next).await.unwrap(), StatusCode::OK);
    assert_eq!(apps[0].requests(), 2);
}

/// Raw HTTP/2 frames, for what a well-behaved client library will not send.
mod raw {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    /// GOAWAY's error code for "the peer is behaving abusively".
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    /// The connection preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[]));
        bytes
    }

    /// `GET http://raw.example/` in HPACK: :method GET, :scheme http, :path /, :authority.
    pub fn request_block() -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x84, 0x41, 11];
        block.extend(b"raw.example");
        block
    }

    /// Writes `bytes` (ignoring a server that closes first) and reads frames until a GOAWAY;
    /// returns its error code, or None if the connection ended without one.
    pub async fn goaway_after(stream: TcpStream, bytes: Vec<u8>) -> Option<u32> {
        let (mut rx, mut tx) = stream.into_split();
        tokio::spawn(async move {
            for chunk in bytes.chunks(16 * 1024) {
                if tx.write_all(chunk).await.is_err() {
                    return;
                }
            }
            // Keep the write side open so the server's answer is not cut short.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let read = async {
            let mut head = [0u8; 9];
            loop {
                rx.read_exact(&mut head).await.ok()?;
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                rx.read_exact(&mut payload).await.ok()?;
                if head[3] == 0x7 {
                    return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the server answers within 10s")
    }
}

#[tokio::test]
async fn a_flood_of_small_continuation_frames_gets_goaway_and_others_are_served() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    // The request's header block, then a 1000-byte literal header, cut into 10-byte pieces: one
    // HEADERS frame and a hundred CONTINUATION frames, a few KiB in all (far below the header
    // list limit: it is the count of frames that is refused).
    let mut block = raw::request_block();
    block.extend([0x00, 3, b'x', b'-', b'a', 0x7f, 0xe9, 0x06]); // literal, value length 1000
    block.extend([b'a'; 1000]);
    let mut pieces = block.chunks(10);
    let mut bytes = raw::preface();
    bytes.extend(raw::frame(
        raw::HEADERS,
        raw::END_STREAM,
        1,
        pieces.next().unwrap(),
    ));
    let continuations: Vec<&[u8]> = pieces.collect();
    assert!(continuations.len() > 100);
    for (i, piece) in continuations.iter().enumerate() {
        let last = i + 1 == continuations.len();
        let flags = if last { raw::END_HEADERS } else { 0 };
        bytes.extend(raw::frame(raw::CONTINUATION, flags, 1, piece));
    }
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    assert_eq!(
        raw::goaway_after(stream, bytes).await,
        Some(raw::ENHANCE_YOUR_CALM)
    );
    assert_eq!(apps[0].requests(), 0);

    // The same request in one frame is served, and other connections are unaffected.
    let (mut other, _connection) = h2_client(proxy).await;
    let big = h2_get("/", Some(("x-a", "a".repeat(1000))));
    assert_eq!(h2_status(&mut other, big).await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn a_burst_of_reset_streams_gets_goaway_and_the_server_serves_on() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    // Rapid reset: open a stream and cancel it at once, a thousand times, in one burst.
    let mut bytes = raw::preface();
    for i in 0..1000u32 {
        let id = 2 * i + 1;
        bytes.extend(raw::frame(
            raw::HEADERS,
            raw::END_STREAM | raw::END_HEADERS,
            id,
            &raw::request_block(),
        ));
        bytes.extend(raw::frame(raw::RST_STREAM, 0, id, &0x8u32.to_be_bytes()));
        // CANCEL
    }
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    assert_eq!(
        raw::goaway_after(stream, bytes).await,
        Some(raw::ENHANCE_YOUR_CALM)
    );
    // A stream hyper accepted before its reset arrived may reach the backend; the burst does not.
    assert!(apps[0].requests() < 100, "{} requests", apps[0].requests());
    // Others are served.
    let (mut other, _connection) = h2_client(proxy).await;
    assert_eq!(
        h2_status(&mut other, h2_get("/", None)).await.unwrap(),
        StatusCode::OK
    );
}

/// A proxy with a TLS listener in front of one app server, and a client connected to it over TLS
/// (the PKI and the app server are returned to keep them alive).
async fn tls_proxy_and_client() -> (
    Pki,
    Vec<switchyard::demo::AppServer>,
    Arc<Server>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let pki = Pki::new();
    let issued = pki.issue("a", &["127.0.0.1"]);
    let apps = apps(1).await;
    let server = start(
        pki.dir.path(),
        &proxy_toml(&tls_listener(&issued), &[apps[0].addr()], ""),
    )
    .await;
    let addr = server.listen_addrs()[0];
    let stream = connect(addr, "127.0.0.1", pki.default_client())
        .await
        .unwrap();
    (pki, apps, server, stream)
}

/// A TLS connection the proxy closes after a `Connection: close` response ends with TLS's
/// close_notify, so the client can tell the end of the response from a cut connection.
#[tokio::test]
async fn a_tls_connection_closed_after_its_response_ends_with_close_notify() {
    let (_pki, _apps, _server, mut stream) = tls_proxy_and_client().await;
    stream
        .write_all(b"GET /status/200 HTTP/1.1\r\nhost: close.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    // Without close_notify, rustls reports the end of the stream as an error.
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("closed after the response")
        .expect("ended by close_notify");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

/// A TLS keep-alive connection idle between requests (it has let go of its HTTP/1 state, see
/// "Proxying" in the README) is ended with close_notify when the server stops, as one still in
/// hyper's hands would be.
#[tokio::test]
async fn an_idle_tls_connection_ended_by_a_stop_gets_close_notify() {
    let (_pki, _apps, server, mut stream) = tls_proxy_and_client().await;
    stream
        .write_all(b"GET /status/204 HTTP/1.1\r\nhost: idle.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 204"));
    // Well past the 10 ms after which an idle connection lets go of its HTTP/1 state.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = server.metrics().downstream_idle(server.listen_addrs()[0]);
    assert_eq!(idle.get(), 1, "the connection parked");
    let stopping = {
        let server = Arc::clone(&server);
        tokio::spawn(async move { server.shutdown(Duration::from_secs(5)).await })
    };
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed by the stop")
        .expect("ended by close_notify");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(stopping.await.unwrap(), "the stop waited for nothing");
}
