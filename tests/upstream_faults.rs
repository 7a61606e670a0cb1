//! Broken backends: one that refuses connections, accepts and never answers, answers with a
//! malformed status line, sends a body shorter than its Content-Length, or closes mid-response.
//! The client gets `502`/`504`, or a truncated response on a closed connection (never one that
//! looks complete); the backend is counted as failing (passive health); and the proxy keeps
//! serving.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use switchyard::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted backend does once it has read a request head.
#[derive(Debug, Clone, Copy)]
enum Then {
    /// Writes this and closes the connection.
    Close(&'static [u8]),
    /// Writes this and keeps the connection open, sending nothing more.
    Hold(&'static [u8]),
}

/// A backend that answers the first request head on each connection as `then` says.
async fn scripted_backend(then: Then) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                match then {
                    Then::Close(bytes) => {
                        let _ = s.write_all(bytes).await;
                    }
                    Then::Hold(bytes) => {
                        let _ = s.write_all(bytes).await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            });
        }
    });
    addr
}

/// The proxy with the faulty backend alone in pool `faulty` (route `/fault`, no retries, no
/// ejection, so every failure shows in the count) and a healthy app in pool `good` (route `/`).
async fn proxy_with(faulty: SocketAddr, good: SocketAddr) -> (Arc<Server>, SocketAddr) {
    proxy(&format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
path_prefix = "/fault"
pool = "faulty"

[[routes]]
pool = "good"

[pools.faulty]
strategy = "round_robin"
backends = [{{ address = "{faulty}" }}]
retries = 0

[pools.faulty.passive]
consecutive_failures = 1000

[pools.good]
strategy = "round_robin"
backends = [{{ address = "{good}" }}]

[timeouts]
response_header = "300ms"
idle = "300ms"
"#
    ))
    .await
}

/// The faulty backend's consecutive passive failures.
fn failures(server: &Server, backend: SocketAddr) -> u32 {
    server
        .shared()
        .registry
        .get(backend)
        .unwrap()
        .health
        .consecutive_failures()
}

/// Sends `GET /fault` twice, each time expecting `status` with `body`, and the backend counted
/// as failing each time; then checks that the good pool is still served.
async fn assert_fails_with(fault: Then, status: u16, body: &str) {
    let apps = apps(1).await;
    let backend = scripted_backend(fault).await;
    let (server, proxy) = proxy_with(backend, apps[0].addr()).await;
    for attempt in 1..=2 {
        let reply = get(proxy, "/fault", &[]).await;
        assert_eq!(reply.status, status, "{fault:?}");
        assert_eq!(reply.body, body, "{fault:?}");
        assert_eq!(failures(&server, backend), attempt, "{fault:?}");
    }
    assert_proxy_serves(proxy, &apps[0]).await;
}

async fn assert_proxy_serves(proxy: SocketAddr, app: &switchyard::demo::AppServer) {
    let before = app.requests();
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.backend(), "app1");
    assert_eq!(app.requests(), before + 1);
}

#[tokio::test]
async fn a_backend_that_refuses_connections_is_502_and_failing() {
    let apps = apps(1).await;
    let dead = dead_addr().await;
    let (server, proxy) = proxy_with(dead, apps[0].addr()).await;
    for attempt in 1..=2 {
        let reply = get(proxy, "/fault", &[]).await;
        assert_eq!(reply.status, 502);
        assert_eq!(reply.body, "backend unreachable\n");
        assert_eq!(failures(&server, dead), attempt);
    }
    assert_proxy_serves(proxy, &apps[0]).await;
}

#[tokio::test]
async fn a_backend_that_never_answers_is_504_and_failing() {
    let apps = apps(1).await;
    let (hole, _task) = black_hole().await;
    let (server, proxy) = proxy_with(hole, apps[0].addr()).await;
    for attempt in 1..=2 {
        let started = std::time::Instant::now();
        let reply = get(proxy, "/fault", &[]).await;
        assert_eq!(reply.status, 504);
        assert_eq!(reply.body, "backend timed out\n");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(failures(&server, hole), attempt);
    }
    assert_proxy_serves(proxy, &apps[0]).await;
}

#[tokio::test]
async fn malformed_status_lines_and_heads_are_502_and_failing() {
    let malformed: [&'static [u8]; 4] = [
        b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\nok",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\nok",
    ];
    for response in malformed {
        // Held open: only the bytes can be what makes the answer unusable.
        assert_fails_with(Then::Hold(response), 502, "backend error\n").await;
    }
    // A backend that closes in the middle of its status line or its headers (held open, that
    // would be a backend that never answers: 504, above).
    assert_fails_with(Then::Close(b"HTTP/1.1 20"), 502, "backend error\n").await;
    let partial = Then::Close(b"HTTP/1.1 200 OK\r\ncontent-le");
    assert_fails_with(partial, 502, "backend error\n").await;
}

/// Reads a raw exchange's answer and splits it into head and body.
fn split(answer: &str) -> (&str, &str) {
    answer.split_once("\r\n\r\n").unwrap_or((answer, ""))
}

/// A body shorter than its Content-Length, whether the backend then closes or stalls: the client
/// gets the status and what arrived, then a closed connection short of the length it was
/// promised, and the backend counts as failing.
#[tokio::test]
async fn a_short_body_is_cut_never_completed_and_counts_as_a_failure() {
    let faults = [
        Then::Close(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello"),
        Then::Hold(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello"),
    ];
    for fault in faults {
        let apps = apps(1).await;
        let backend = scripted_backend(fault).await;
        let (server, proxy) = proxy_with(backend, apps[0].addr()).await;
        for attempt in 1..=2 {
            let answer = raw_exchange(proxy, b"GET /fault HTTP/1.1\r\nhost: a\r\n\r\n").await;
            let (head, body) = split(&answer);
            assert!(head.starts_with("HTTP/1.1 200 OK"), "{fault:?}: {answer}");
            assert!(head.contains("content-length: 100"), "{fault:?}: {answer}");
            assert_eq!(body, "hello", "{fault:?}: closed after the bytes that came");
            wait_until("the short body counted", || {
                failures(&server, backend) == attempt
            })
            .await;
        }
        assert_proxy_serves(proxy, &apps[0]).await;
    }
}

/// A backend that closes in the middle of a chunked body: the client's chunked response never
/// gets its last chunk, the connection closes, and the backend counts as failing.
#[tokio::test]
async fn a_backend_closing_mid_body_leaves_the_response_unterminated() {
    let apps = apps(1).await;
    let fault =
        Then::Close(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nab");
    let backend = scripted_backend(fault).await;
    let (server, proxy) = proxy_with(backend, apps[0].addr()).await;
    let answer = raw_exchange(proxy, b"GET /fault HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let (head, body) = split(&answer);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(head.contains("transfer-encoding: chunked"), "{answer}");
    assert!(body.starts_with("5\r\nhello\r\n"), "{answer:?}");
    assert!(
        !body.ends_with("0\r\n\r\n"),
        "the last chunk must not be sent: {body:?}"
    );
    wait_until("the broken body counted", || {
        failures(&server, backend) == 1
    })
    .await;
    // Through a client library the body is an error, not a shorter success.
    let mut client = h1_connection::<http_body_util::Empty<bytes::Bytes>>(proxy).await;
    let request = http::Request::get("/fault")
        .header("host", "a")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = http_body_util::BodyExt::collect(response.into_body()).await;
    assert!(
        collected.is_err(),
        "a truncated body must not look complete"
    );
    wait_until("counted again", || failures(&server, backend) == 2).await;
    assert_proxy_serves(proxy, &apps[0]).await;
}

/// A client that goes away while the response body streams says nothing about the backend.
#[tokio::test]
async fn a_client_leaving_mid_body_does_not_count_against_the_backend() {
    let apps = apps(1).await;
    let fault = Then::Hold(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello");
    let backend = scripted_backend(fault).await;
    let (server, proxy) = proxy_with(backend, apps[0].addr()).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET /fault HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.ends_with(b"hello") {
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        answer.extend_from_slice(&chunk[..n]);
    }
    drop(client);
    let state = server.shared().registry.get(backend).unwrap();
    wait_until("the request ended", || state.in_flight() == 0).await;
    // Well past the 300ms stall limit: the body was dropped, not cut.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(failures(&server, backend), 0);
    assert_proxy_serves(proxy, &apps[0]).await;
}
