//! WebSockets through the proxy: over TLS (wss) with `cookie` affinity pinning the socket and the
//! drain of its backend closing it, `ip_hash` placing sockets like requests,
//! `timeouts.upgraded_idle`, and an upgrade to an https backend that would rather speak HTTP/2.
//! (tests/drain.rs covers the drain deadline's close frame in detail.)

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::Value;
use support::tls::*;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Opens a WebSocket to `/ws` over `stream`, sending `cookie` if any; returns it and the
/// handshake's `Set-Cookie` values.
async fn open<S>(stream: S, url: &str, cookie: Option<&str>) -> (WebSocketStream<S>, Vec<String>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = url.into_client_request().unwrap();
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert("cookie", cookie.parse().unwrap());
    }
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let cookies = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    (ws, cookies)
}

/// The next text message, within 5 seconds.
async fn next_text<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> String {
    let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message within 5s")
        .expect("socket open")
        .expect("a message");
    match message {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Sends `text` and expects it back.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    assert_eq!(next_text(ws).await, text);
}

/// Waits for the close frame the proxy sends, and returns its code.
async fn close_code<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> CloseCode {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("closed within 5s")
            .expect("a close frame before the end")
            .expect("a message");
        match message {
            Message::Close(Some(frame)) => return frame.code,
            Message::Close(None) => panic!("a close frame without a code"),
            _ => continue,
        }
    }
}

/// `GET /status` on the admin listener: the backend `address` of pool `app`.
async fn backend_status(admin: SocketAddr, address: SocketAddr) -> Value {
    let reply = get(admin, "/status", &[]).await;
    let status: Value = serde_json::from_str(&reply.body).unwrap();
    status["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn wss_with_cookie_affinity_is_pinned_and_closed_at_the_end_of_its_backends_drain() {
    let pki = Pki::new();
    let cert = pki.issue("site", &["chat.example"]);
    let apps = apps(2).await;
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"
tls = {{ cert = "{cert}", key = "{key}" }}

[[routes]]
pool = "app"

[pools.app]
strategy = "cookie"
backends = {backends}
drain_timeout = "1s"

[pools.app.cookie]
name = "sy"
secret = "{SECRET}"
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
        backends = backends(&weight_one(&apps)),
    );
    let server = switchyard::server::Server::start(config(&text))
        .await
        .unwrap();
    let (proxy, admin) = (server.listen_addrs()[0], server.admin_addr().unwrap());
    let url = "wss://chat.example/ws";

    // The first socket has no cookie: it is placed, and pinned by the cookie it gets.
    let tls = connect(
        proxy,
        "chat.example",
        pki.client(&[b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    let (mut first, cookies) = open(tls, url, None).await;
    let pinned = next_text(&mut first).await;
    let cookie = cookies
        .iter()
        .find_map(|c| c.strip_prefix("sy="))
        .and_then(|c| c.split(';').next())
        .map(|value| format!("sy={value}"))
        .expect("the handshake sets the affinity cookie");
    echo(&mut first, "hello").await;

    // Every socket with that cookie reaches the same backend.
    let mut sockets = vec![first];
    for i in 0..4 {
        let tls = connect(
            proxy,
            "chat.example",
            pki.client(&[b"http/1.1"], rustls::DEFAULT_VERSIONS),
        )
        .await
        .unwrap();
        let (mut ws, _) = open(tls, url, Some(&cookie)).await;
        assert_eq!(next_text(&mut ws).await, pinned, "socket {i} moved");
        echo(&mut ws, &format!("message {i}")).await;
        sockets.push(ws);
    }
    let x = apps.iter().position(|a| a.name() == pinned).unwrap();
    let y = 1 - x;
    assert_eq!(apps[x].websockets(), 5);
    assert_eq!(apps[y].websockets(), 0);
    // Counted against the backend, for least_connections, max_connections and draining.
    let status = backend_status(admin, apps[x].addr()).await;
    assert_eq!(status["upgraded"], 5, "{status}");

    // Drained at runtime: the sockets stay up until the drain timeout, then get 1001.
    let drain = format!("/pools/app/backends/{}/drain", apps[x].addr());
    let reply = send(&client(), admin, "POST", &drain, &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    let drained_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo(&mut sockets[0], "still here while draining").await;
    for ws in &mut sockets {
        assert_eq!(close_code(ws).await, CloseCode::Away);
    }
    assert!(
        drained_at.elapsed() >= Duration::from_millis(950),
        "cut before the deadline"
    );
    wait_until("the sockets are no longer counted", || {
        server
            .shared()
            .registry
            .get(apps[x].addr())
            .is_some_and(|s| s.upgraded() == 0)
    })
    .await;

    // Reconnecting with the same cookie: re-placed on the other backend, with a new cookie.
    let tls = connect(
        proxy,
        "chat.example",
        pki.client(&[b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    let (mut again, cookies) = open(tls, url, Some(&cookie)).await;
    assert_eq!(next_text(&mut again).await, apps[y].name());
    assert!(cookies.iter().any(|c| c.starts_with("sy=")), "{cookies:?}");
}

#[tokio::test]
async fn websocket_with_ip_hash_lands_where_the_clients_requests_go() {
    let apps = apps(3).await;
    let (_server, proxy) = proxy(&one_pool("ip_hash", &weight_one(&apps), "")).await;
    let home = get(proxy, "/", &[]).await.backend();
    for _ in 0..3 {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (mut ws, _) = open(stream, "ws://hash.example/ws", None).await;
        assert_eq!(next_text(&mut ws).await, home);
    }
}

#[tokio::test]
async fn idle_websocket_is_closed_after_upgraded_idle_but_a_busy_one_is_not() {
    let apps = apps(1).await;
    let tail = "[timeouts]\nupgraded_idle = \"400ms\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, _) = open(stream, "ws://idle.example/ws", None).await;
    assert_eq!(next_text(&mut ws).await, "app1");

    // Busy for 1.2s, a message every 150ms: three idle periods, never closed.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        echo(&mut ws, &format!("tick {i}")).await;
    }
    // Quiet: closed with 1001 within 400–500ms (plus scheduling).
    let quiet = tokio::time::Instant::now();
    assert_eq!(close_code(&mut ws).await, CloseCode::Away);
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(390) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let state = server.shared().registry.get(apps[0].addr()).unwrap();
    wait_until("the socket is no longer counted", || state.upgraded() == 0).await;
    assert_eq!(state.upgraded_cut(), 0, "an idle close is not a drain cut");
}

/// A WebSocket echo server over TLS that offers `h2` and `http/1.1`, and records the ALPN
/// protocol and SNI each connection chose.
async fn wss_backend(pki: &Pki) -> (u16, Arc<Mutex<Vec<(Option<String>, Option<String>)>>>) {
    let cert = pki.issue("backend", &["localhost"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server(&cert, &[b"h2", b"http/1.1"]));
    let listener = TcpListener::bind(SocketAddr::new(localhost().await, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let connection = stream.get_ref().1;
                let alpn = connection
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let sni = connection.server_name().map(str::to_owned);
                record.lock().unwrap().push((alpn, sni));
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn websocket_to_an_https_backend_goes_over_http11_even_when_it_offers_h2() {
    let pki = Pki::new();
    let (port, seen) = wss_backend(&pki).await;
    let text = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\npool = \"app\"\n\n[pools.app]\n\
         strategy = \"round_robin\"\nbackends = [{{ address = \"https://localhost:{port}\" }}]\n\
         ca = \"{}\"\n",
        pki.ca_file().display()
    );
    let (_server, proxy) = proxy(&text).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, _) = open(stream, "ws://tunnel.example/ws", None).await;
    echo(&mut ws, "through TLS").await;
    echo(&mut ws, "and again").await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [(Some("http/1.1".to_owned()), Some("localhost".to_owned()))],
        "one connection, HTTP/1.1 by ALPN, SNI localhost"
    );
}

/// A raw backend that answers one upgrade request with `101` and then hands the connection to
/// `after`.
async fn upgrading_backend<F, Fut>(after: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = backend.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: raw\r\n\r\n",
            )
            .await
            .unwrap();
        after(stream).await;
    });
    addr
}

/// A client connection to `proxy` that has sent an upgrade request.
async fn upgrading_client(proxy: SocketAddr) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(
            b"GET /raw HTTP/1.1\r\nhost: raw.test\r\nconnection: upgrade\r\nupgrade: raw\r\n\r\n",
        )
        .await
        .unwrap();
    client
}

/// Everything the client reads until the proxy ends the stream (within 5 s), as text.
async fn read_to_end_text(client: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut received))
        .await
        .expect("the stream ends")
        .unwrap();
    String::from_utf8_lossy(&received).into_owned()
}

/// A client that ends its side of an upgraded connection half-closes it: the backend sees the end
/// of the stream and can still answer, and the client reads that answer, then the end.
#[tokio::test]
async fn an_upgraded_connection_passes_a_client_half_close_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend_addr = upgrading_backend(|mut stream| async move {
        let mut sent = Vec::new();
        stream.read_to_end(&mut sent).await.unwrap();
        let answer = [b"got: ".as_slice(), &sent].concat();
        stream.write_all(&answer).await.unwrap();
    })
    .await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend_addr, 1)], "")).await;

    let mut client = upgrading_client(proxy).await;
    client.write_all(b"hello").await.unwrap();
    client.shutdown().await.unwrap();
    let text = read_to_end_text(&mut client).await;
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\ngot: hello"), "{text}");
}

/// A backend that answers an upgrade, sends, and closes, while the client never sends a byte: the
/// client gets the answer, the bytes, and the end of the stream.
#[tokio::test]
async fn an_upgraded_connection_the_backend_closes_first_ends_for_a_silent_client() {
    use tokio::io::AsyncWriteExt;
    let backend_addr = upgrading_backend(|mut stream| async move {
        stream.write_all(b"bye").await.unwrap();
    })
    .await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend_addr, 1)], "")).await;

    let mut client = upgrading_client(proxy).await;
    let text = read_to_end_text(&mut client).await;
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\nbye"), "{text}");
}

/// An open WebSocket is an open client connection: it counts against its listener's
/// `max_connections` and in `switchyard_downstream_connections` until it closes, though the HTTP
/// connection it came from has ended.
#[tokio::test]
async fn websockets_count_against_max_connections_until_they_close() {
    let apps = apps(1).await;
    let tail = "[limits]\nmax_connections = 2\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let gauge = format!("switchyard_downstream_connections{{listener=\"{proxy}\"}} ");
    let open_now = || {
        let metrics = server.metrics().render();
        let line = metrics.lines().find(|l| l.starts_with(&gauge)).unwrap();
        line[gauge.len()..].trim().parse::<u64>().unwrap()
    };
    let mut sockets = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (mut ws, _) = open(stream, "ws://count.example/ws", None).await;
        assert_eq!(next_text(&mut ws).await, "app1");
        sockets.push(ws);
    }
    assert_eq!(open_now(), 2, "two WebSockets, two open connections");
    // A third client is turned away while both are open.
    let mut third = TcpStream::connect(proxy).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    echo(&mut sockets[0], "still here").await;

    // Once one closes, its place is free again.
    let mut closing = sockets.pop().unwrap();
    closing.close(None).await.unwrap();
    while closing.next().await.is_some() {}
    wait_until("the closed WebSocket is no longer counted", || {
        open_now() == 1
    })
    .await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, _) = open(stream, "ws://count.example/ws", None).await;
    assert_eq!(next_text(&mut ws).await, "app1");
}

/// A shutdown closes open WebSockets with 1001 ("going away", so clients reconnect elsewhere at
/// once) and waits for them to end, as it waits for requests in flight; then none is counted.
#[tokio::test]
async fn shutdown_closes_websockets_with_going_away_and_waits_for_them() {
    let apps = apps(1).await;
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut ws, _) = open(stream, "ws://stop.example/ws", None).await;
    assert_eq!(next_text(&mut ws).await, "app1");
    let state = server.shared().registry.get(apps[0].addr()).unwrap();
    assert_eq!(state.upgraded(), 1);

    let stopping = {
        let server = Arc::clone(&server);
        tokio::spawn(async move { server.shutdown(Duration::from_secs(10)).await })
    };
    assert_eq!(close_code(&mut ws).await, CloseCode::Away);
    let finished = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the shutdown ends once the WebSocket has")
        .unwrap();
    assert!(finished, "every connection ended within the limit");
    assert_eq!(state.upgraded(), 0);
    assert_eq!(state.upgraded_cut(), 0, "a shutdown is not a drain cut");
    assert!(server.shared().tunnels.is_empty());
}
