//! The upstream side under stress: stalled bodies, early answers to unfinished uploads, pooled
//! connections the backend closed, clients leaving mid-body, slow uploads, unasked protocol
//! switches, CONNECT, and several port-0 listeners.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that sends headers and 5 of 100 body bytes, then nothing: the client's response is
/// cut (never looks complete) after `timeouts.idle`, and the backend's in-flight count returns to 0.
///
/// The client speaks HTTP/2 and pings every 100ms, so its connection is never idle and the
/// connection-idle close cannot be what ends the body: only the body's own stall timer can.
#[tokio::test]
async fn stalled_response_body_is_cut_after_idle() {
    let (backend, _task) =
        raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello").await;
    let tail = "[timeouts]\nidle = \"300ms\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("http://stall.test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(3), response.into_body().collect())
        .await
        .expect("the stalled body is cut within 3s (10 × idle) while the connection stays busy");
    assert!(body.is_err(), "a truncated body must not look complete");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The pings kept the connection open: the cut was the body's, not the connection's.
    assert!(!h2.is_closed(), "the client connection was closed");
    let state = server.shared().registry.get(backend).unwrap();
    wait_until("in-flight released", || state.in_flight() == 0).await;
}

/// A backend that answers the first request head on each connection with a complete 200 at once,
/// then keeps the connection open and discards whatever else arrives on it; counts connections.
async fn early_answer_backend() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = false;
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) if !answered => {
                            buf.extend_from_slice(&chunk[..n]);
                            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                answered = true;
                                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                                if s.write_all(ok).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (a, connections, task)
}

/// The backend answers before reading the whole request body: that connection must not be reused,
/// or the next request would sit behind the rest of the upload.
#[tokio::test]
async fn connection_with_unfinished_upload_is_not_reused() {
    let (backend, connections, _task) = early_answer_backend().await;
    // Long enough that waiting on the dirty connection (or on an answer it never gets) shows.
    let tail = "[timeouts]\nconnect = \"10s\"\nresponse_header = \"10s\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    // Declares 1 MB, sends 10 bytes, keeps the connection open.
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: up.test\r\ncontent-length: 1000000\r\n\r\n0123456789")
        .await
        .unwrap();
    // The whole early answer, body included, so the proxy is done with that response.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !answer.ends_with(b"\r\n\r\nok") {
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the early answer arrives within 5s");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    // The next request goes on a new connection, at once.
    let reply = tokio::time::timeout(Duration::from_secs(3), get(proxy, "/", &[]))
        .await
        .expect("the next request is not stuck behind the unfinished upload");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "ok");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    drop(client);
}

/// Accepts connections on a loopback port, counting them, and serves each with `serve`.
async fn counting_backend<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (addr, connections)
}

/// Reads from `s` into `buf` until `buf` holds a whole request head, takes the head off `buf`,
/// and returns its first line; None once the client closes.
async fn next_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let line = String::from_utf8_lossy(&head).lines().next()?.to_owned();
            return Some(line);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A backend that answers one request per connection with `200 ok`, keep-alive, then closes the
/// connection `linger` later (as a backend's own idle timeout does); counts connections.
async fn closing_backend(linger: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    counting_backend(move |mut s| async move {
        if next_head(&mut s, &mut Vec::new()).await.is_some() {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            let _ = s.write_all(ok).await;
            tokio::time::sleep(linger).await;
        }
    })
    .await
}

/// The keep-alive race: a pooled connection the backend closed while it sat idle is found closed
/// when it is checked out, and the request goes on a new connection instead of failing (no
/// retries are configured, so a failed attempt would show as a 502).
#[tokio::test]
async fn a_pooled_connection_the_backend_closed_while_idle_is_skipped() {
    let (backend, connections) = closing_backend(Duration::from_millis(50)).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    for round in 1..=3 {
        let reply = get(proxy, "/", &[]).await;
        assert_eq!(reply.status, 200, "round {round}");
        assert_eq!(reply.body, "ok");
        assert_eq!(connections.load(Ordering::SeqCst), round);
        // Well past the backend's close, so the pooled connection is dead when reused.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client that goes away mid-body takes the backend connection with it: it is closed (the
/// backend reads its end), not returned to the pool with the rest of the body still coming.
#[tokio::test]
async fn a_client_leaving_mid_body_closes_the_backend_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&closed);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                if !matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello";
                if s.write_all(head).await.is_err() {
                    return;
                }
                // Nothing more is sent; the proxy's side ending is what this waits for.
                while matches!(s.read(&mut chunk).await, Ok(n) if n > 0) {}
                seen.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: up.test\r\n\r\n")
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
    wait_until("the backend connection closed", || {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

/// Where the chunked body at the start of `body` ends (after `0\r\n\r\n`), if it has arrived whole.
fn chunked_end(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line = body[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&body[at..at + line]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        at += line + 2;
        if size == 0 {
            // No trailers: the empty line ends the body.
            return (body.len() >= at + 2).then_some(at + 2);
        }
        at += size + 2;
        if body.len() < at {
            return None;
        }
    }
}

/// A backend that reads each chunked request body to its end before answering `200 ok`, so the
/// proxy waits for the response headers for as long as the upload lasts.
async fn whole_body_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let Some(body) = chunked_end(&buf[head + 4..]) else {
                        continue;
                    };
                    buf.drain(..head + 4 + body);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (a, task)
}

/// `response_header` runs from the request body's last progress: a steady upload slower than it
/// succeeds, even though the backend answers only once it has read the whole body.
#[tokio::test]
async fn slow_steady_upload_is_not_a_timeout() {
    let (backend, _task) = whole_body_backend().await;
    let tail = "[timeouts]\nresponse_header = \"500ms\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut conn = h1_connection::<ChannelBody>(proxy).await;
    let request = Request::post("/upload")
        .header("host", "up.test")
        .body(ChannelBody(rx))
        .unwrap();
    // 6 chunks 250ms apart: 1.5s in all, three times `response_header`.
    let sender = tokio::spawn(async move {
        for i in 0..6 {
            if tx.send(Bytes::from(format!("part{i};"))).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), conn.send_request(request))
        .await
        .expect("answered within 10s")
        .unwrap();
    assert_eq!(response.status(), 200);
    // Answered after the whole upload, so long past `response_header` from the start.
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    sender.await.unwrap();
}

/// A stalled upload is still bounded: no progress for `response_header` gives 504, well before
/// the backend (which answers after 3s) would.
#[tokio::test]
async fn stalled_upload_times_out() {
    let apps = apps(1).await;
    let tail = "[timeouts]\nresponse_header = \"300ms\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut conn = h1_connection::<ChannelBody>(proxy).await;
    let request = Request::post("/sleep/3000")
        .header("host", "up.test")
        .body(ChannelBody(rx))
        .unwrap();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), conn.send_request(request))
        .await
        .expect("answered within 5s")
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    drop(tx);
}

#[tokio::test]
async fn unasked_switching_protocols_is_502() {
    let (backend, _task) = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 502);
}

#[tokio::test]
async fn connect_is_refused_with_400() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let answer = raw_exchange(
        proxy,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(apps[0].requests(), 0);
}

#[tokio::test]
async fn several_port_zero_listeners_are_distinct() {
    let apps = apps(1).await;
    let text = one_pool("round_robin", &weight_one(&apps), "")
        + "\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n";
    let (server, _) = proxy(&text).await;
    let addrs = server.listen_addrs();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0], addrs[1]);
    for addr in addrs {
        assert_eq!(get(addr, "/", &[]).await.status, 200);
    }
}

/// An upstream connection that hyper's client drove (a request with a body) and that stays idle
/// for a second is parked (hyper's connection over it ends, and with it its buffers), and the
/// next such request starts a new one over the same socket: the backend sees one connection
/// carry both requests. (A bodiless GET's connection, driven without hyper, parks at once: see
/// `bodiless_requests_keep_one_backend_connection_through_every_framing`.)
#[tokio::test]
async fn an_idle_upstream_connection_is_parked_and_its_socket_reused() {
    let (backend, seen) =
        support::tls::recording_backend("127.0.0.1:0".parse().unwrap(), None).await;
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let state = server.shared().registry.get(backend).unwrap();
    let client = client();
    let post = |path: &'static str| send(&client, proxy, "POST", path, &[], Bytes::from("body"));
    assert_eq!(post("/one").await.status, 200);
    wait_until("the connection is back in the pool, ready", || {
        state.pool.idle_connections() == (1, 0)
    })
    .await;
    wait_until("the idle connection is parked", || {
        state.pool.idle_connections() == (0, 1)
    })
    .await;
    assert_eq!(post("/two").await.status, 200);
    wait_until("the connection is back, ready again", || {
        state.pool.idle_connections() == (1, 0)
    })
    .await;
    assert_eq!(get(proxy, "/three", &[]).await.status, 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[1].connection, 0,
        "the parked socket carried the second request"
    );
    assert_eq!(seen[2].connection, 0, "and a GET after it");
}

/// A parked connection the backend closes is closed too, by the next sweep, not kept half-closed
/// until it expires; the next request goes over a new connection (with `retries = 0`, so no retry
/// could hide a request lost on the closed one).
#[tokio::test]
async fn a_parked_connection_the_backend_closes_is_closed_too() {
    // Answers each request on a connection until told to close them all.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let close = Arc::new(tokio::sync::Notify::new());
    let (counted, closing) = (Arc::clone(&accepted), Arc::clone(&close));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let closing = Arc::clone(&closing);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = tokio::select! {
                        read = s.read(&mut chunk) => match read {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        },
                        _ = closing.notified() => return,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let text = pool_with(
        "round_robin",
        &[(backend, 1)],
        "retries = 0",
        &format!("[\"{SECRET}\"]"),
        "",
    );
    let (server, proxy) = proxy(&text).await;
    let state = server.shared().registry.get(backend).unwrap();
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    wait_until("the idle connection is parked", || {
        state.pool.idle_connections() == (0, 1)
    })
    .await;
    close.notify_waiters();
    wait_until("the closed parked connection is dropped", || {
        state.pool.idle_connections() == (0, 0)
    })
    .await;
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a new connection was made"
    );
}

/// An idle upstream connection is closed once it has been idle for `timeouts.idle`, parked or
/// not, without waiting for another request to notice: the backend sees the close.
#[tokio::test]
async fn an_idle_upstream_connection_is_closed_after_idle_without_traffic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the request");
            buf.extend_from_slice(&chunk[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let answered = Instant::now();
        // Whatever comes next, the end of the stream is what the test waits for.
        while !matches!(s.read(&mut chunk).await, Ok(0) | Err(_)) {}
        let _ = closed_tx.send(answered.elapsed());
    });
    let tail = "[timeouts]\nidle = \"2s\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let state = server.shared().registry.get(backend).unwrap();
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    wait_until("the idle connection is parked", || {
        state.pool.idle_connections() == (0, 1)
    })
    .await;
    let after = tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .expect("the idle connection was not closed within 5s")
        .unwrap();
    assert!(
        after >= Duration::from_millis(1900),
        "closed after {after:?}, before idle (2s)"
    );
    assert_eq!(state.pool.idle_connections(), (0, 0));
}

/// A keep-alive backend that answers each request by its path, with response framings the demo
/// app never uses, over as many requests per connection as the proxy sends; counts connections.
async fn framing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    counting_backend(|mut s| async move {
        let mut buf = Vec::new();
        while let Some(line) = next_head(&mut s, &mut buf).await {
            let parts: Vec<&[u8]> = match line.as_str() {
                "GET /length HTTP/1.1" | "POST /length HTTP/1.1" => {
                    vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
                }
                "HEAD /length HTTP/1.1" => {
                    vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]
                }
                "GET /chunked HTTP/1.1" => vec![
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n",
                    b"6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
                ],
                "GET /early-hints HTTP/1.1" => vec![
                    b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                ],
                "GET /in-pieces HTTP/1.1" => vec![
                    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab",
                    b"cdefghij",
                ],
                "GET /no-content HTTP/1.1" => vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
                "GET /then-close HTTP/1.1" => {
                    vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye"]
                }
                "GET /until-close HTTP/1.1" => {
                    vec![b"HTTP/1.1 200 OK\r\n\r\nall of it"]
                }
                "GET /?x=1 HTTP/1.1" => {
                    vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslash"]
                }
                "GET /both HTTP/1.1" | "POST /both HTTP/1.1" => vec![
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                ],
                "GET /too-long HTTP/1.1" => {
                    vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"]
                }
                _ => vec![b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"],
            };
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if s.write_all(part).await.is_err() {
                    return;
                }
            }
            // Only a body delimited by the close ends the connection here: after the answers
            // that forbid reuse (`Connection: close`, bytes past the body, both framings) it
            // stays open, so that only the proxy's own refusal keeps it out of the pool.
            if line.contains("until-close") {
                return;
            }
        }
    })
    .await
}

/// Bodiless GETs and HEADs to a plain HTTP/1.1 backend are exchanged without hyper's client
/// (`backend::h1`): every framing RFC 9112 allows reaches the client intact (a body with its
/// head or in pieces, chunked with extensions and trailers, informational answers skipped, no
/// body for HEAD and 204), and all of them share one connection; a `Connection: close` answer, a
/// body delimited by the close, or bytes past the body end it, and the next request opens another.
#[tokio::test]
async fn bodiless_requests_keep_one_backend_connection_through_every_framing() {
    let (backend, connections) = framing_backend().await;
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let state = server.shared().registry.get(backend).unwrap();
    let client = client();
    let cases = [
        ("GET", "/length", 200, "hello"),
        ("HEAD", "/length", 200, ""),
        ("GET", "/chunked", 200, "hello world"),
        ("GET", "/early-hints", 200, "ok"),
        ("GET", "/in-pieces", 200, "abcdefghij"),
        ("GET", "/no-content", 204, ""),
        ("GET", "/length", 200, "hello"),
    ];
    for (method, path, status, body) in cases {
        let reply = send(&client, proxy, method, path, &[], Bytes::new()).await;
        assert_eq!(reply.status, status, "{method} {path}");
        assert_eq!(reply.body, body, "{method} {path}");
        if method == "HEAD" {
            assert_eq!(reply.headers["content-length"], "5");
        }
        wait_until("the connection is back in the pool", || {
            state.pool.idle_connections() == (0, 1)
        })
        .await;
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one connection for all"
    );

    // The absolute form without a path reaches the backend as `/?x=1` (as hyper writes it).
    let answer = raw_exchange(
        proxy,
        b"GET http://a?x=1 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("slash"),
        "{answer}"
    );

    let mut expected = 1;
    for (path, body) in [
        ("/then-close", "bye"),
        ("/until-close", "all of it"),
        ("/too-long", "ok"),
        ("/both", "hello"),
    ] {
        let reply = get(proxy, path, &[]).await;
        assert_eq!(
            (reply.status.as_u16(), reply.body.as_str()),
            (200, body),
            "{path}"
        );
        if path == "/both" {
            // The Content-Length beside a Transfer-Encoding is not passed on (RFC 9112 §6.3).
            assert!(!reply.headers.contains_key("content-length"), "{path}");
        }
        assert_eq!(
            state.pool.idle_connections(),
            (0, 0),
            "{path} is not reused"
        );
        assert_eq!(get(proxy, "/length", &[]).await.body, "hello");
        expected += 1;
        assert_eq!(connections.load(Ordering::SeqCst), expected, "{path}");
    }
}

/// A response framed both ways reaches the client by its chunked body, without the stale
/// Content-Length, on hyper's path (a POST) as on switchyard's own (a GET): RFC 9112 §6.3 has an
/// intermediary drop the length, and a client given both could wait for bytes that never come.
/// Each method gets a proxy of its own: a GET finding a connection hyper drives would take it.
#[tokio::test]
async fn a_content_length_beside_transfer_encoding_is_dropped_on_every_path() {
    for method in ["GET", "POST"] {
        let (backend, _) = framing_backend().await;
        let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            send(&client(), proxy, method, "/both", &[], Bytes::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("{method}: no whole answer within 5s"));
        assert_eq!(
            (reply.status.as_u16(), reply.body.as_str()),
            (200, "hello"),
            "{method}"
        );
        assert!(
            !reply.headers.contains_key("content-length"),
            "{method}: {:?}",
            reply.headers
        );
    }
}

/// A request routed under TLS settings the backend no longer has (a reload changed them between
/// its routing and its send) uses its connection once: pooled, it would carry later requests over
/// settings the config no longer names. `use_tls` is what a reload's snapshot build calls before
/// the snapshot is published; the one published here still says plain TCP, as the old one would.
#[tokio::test]
async fn connections_made_under_tls_settings_the_backend_no_longer_has_are_not_pooled() {
    let (backend, connections) = framing_backend().await;
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let state = server.shared().registry.get(backend).unwrap();
    let client = client();
    let pooled = || state.pool.idle_connections();
    assert_eq!(get(proxy, "/length", &[]).await.body, "hello");
    wait_until("the connection is parked", || pooled() == (0, 1)).await;

    state.pool.use_tls(42);
    assert_eq!(
        pooled(),
        (0, 0),
        "the idle connection is closed at the change"
    );
    for (i, method) in ["GET", "POST", "GET"].into_iter().enumerate() {
        let reply = send(&client, proxy, method, "/length", &[], Bytes::new()).await;
        assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "hello"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pooled(), (0, 0), "{method} left its connection in the pool");
        assert_eq!(
            connections.load(Ordering::SeqCst),
            i + 2,
            "{method}: a new connection"
        );
    }

    // Settings that agree again: connections are pooled and reused.
    state.pool.use_tls(0);
    for _ in 0..2 {
        assert_eq!(get(proxy, "/length", &[]).await.body, "hello");
        wait_until("the connection is parked", || pooled() == (0, 1)).await;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 5);
}

/// A backend that writes `answer` for every request head it reads, then closes the connection
/// if `close`, else waits for the next head.
async fn answering_backend(answer: &'static [u8], close: bool) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while next_head(&mut s, &mut buf).await.is_some() {
                    if s.write_all(answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// What a client reads of one request's answer: until the proxy closes, or 2 s. The `date`
/// field is left out (it differs by the second).
async fn client_reads(proxy: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&answer)
        .split("\r\n")
        .filter(|line| !line.starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// Unusual answers reach the client alike whether switchyard read them (a bodiless GET to a
/// plain backend, `backend::h1`) or hyper's client did (a POST): the same status line, fields
/// and body, or the same error. Each request goes through a proxy of its own.
#[tokio::test]
async fn the_raw_path_and_hyper_hand_clients_the_same_answers() {
    let cases: [(&str, &[u8], bool); 20] = [
        ("304 with a length", b"HTTP/1.1 304 Not Modified\r\ncontent-length: 100\r\n\r\n", false),
        ("204 with a length", b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n", false),
        ("HTTP/1.0 204 chunked", b"HTTP/1.0 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n", false),
        ("TE beside a bad length", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: abc\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false),
        ("leading zeros", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n00000000000000005\r\nhello\r\n0\r\n\r\n", false),
        ("HTTP/1.0 until close", b"HTTP/1.0 200 OK\r\n\r\nuntil close", true),
        ("short body", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc", true),
        ("bare LF in a chunk size", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", false),
        ("no reason", b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok", false),
        ("a reason of its own", b"HTTP/1.1 200 Fine\r\ncontent-length: 2\r\n\r\nok", false),
        ("100 then 200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        ("gzip without chunked", b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxyz", true),
        ("5, 5", b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello", false),
        ("two lengths that agree", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello", false),
        ("two lengths that differ", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello", false),
        ("+5", b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello", false),
        ("the largest length", b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\nhello", true),
        ("101 unasked", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n", false),
        ("status 600", b"HTTP/1.1 600 Weird\r\ncontent-length: 2\r\n\r\nok", false),
        ("a quoted chunk extension", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=\"b;c\"\r\nhello\r\n0\r\n\r\n", false),
    ];
    let mut differ = Vec::new();
    for (name, answer, close) in cases {
        let mut seen = Vec::new();
        for method in ["GET", "POST"] {
            let backend = answering_backend(answer, close).await;
            let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
            let request = format!("{method} / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
            seen.push(client_reads(proxy, &request).await);
        }
        assert!(!seen[0].is_empty(), "{name}: no answer at all");
        if seen[0] != seen[1] {
            differ.push(format!(
                "{name}:\n  GET  {:?}\n  POST {:?}",
                seen[0], seen[1]
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

/// A backend's own reason phrase reaches the client as it was sent, an empty one included, on
/// hyper's path (a POST) as on switchyard's own (a GET), each through a proxy of its own.
#[tokio::test]
async fn the_backends_reason_phrase_is_passed_on_as_sent() {
    for (answer, line) in [
        (
            &b"HTTP/1.1 203 Fine Thanks\r\ncontent-length: 2\r\n\r\nok"[..],
            "HTTP/1.1 203 Fine Thanks\r\n",
        ),
        (
            b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 \r\n",
        ),
        (
            b"HTTP/1.1 299 \r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 299 \r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\n",
        ),
    ] {
        for method in ["GET", "POST"] {
            let (backend, _task) = raw_backend(answer).await;
            let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
            let request = format!("{method} / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
            let reply = raw_exchange(proxy, request.as_bytes()).await;
            assert!(reply.starts_with(line), "{method}, {line:?}: {reply:?}");
            assert!(
                reply.ends_with("\r\n\r\nok"),
                "{method}, {line:?}: {reply:?}"
            );
        }
    }
}

/// Trailers of a chunked body read without hyper reach an HTTP/2 client, which can carry them.
#[tokio::test]
async fn chunked_trailers_from_a_plain_backend_reach_the_client() {
    let (backend, _) = framing_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::get(format!("http://{proxy}/chunked"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-sum"], "11");
    assert_eq!(collected.to_bytes(), "hello world");
}

/// A backend that answers the first request on each connection (after `delay`, so that requests
/// sent together each open one) and closes the connection, unanswered, on any later one: every
/// reuse of its connections meets the keep-alive race.
async fn one_answer_backend(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    counting_backend(move |mut s| async move {
        let mut buf = Vec::new();
        if next_head(&mut s, &mut buf).await.is_none() {
            return;
        }
        tokio::time::sleep(delay).await;
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if s.write_all(ok).await.is_ok() {
            // The next request is read, and the connection dropped without an answer.
            let _ = next_head(&mut s, &mut buf).await;
        }
    })
    .await
}

/// A pooled connection the backend closes as a GET goes out on it (no answer came) costs the
/// client nothing: the GET goes again, on a new connection, and the backend is not counted as
/// failing. A second such close in one request is the backend's failure: 502, counted, and no
/// third connection tried.
#[tokio::test]
async fn the_keep_alive_race_is_retried_once() {
    let tail = "[pools.app.passive]\nconsecutive_failures = 1000\n";
    let (backend, connections) = one_answer_backend(Duration::ZERO).await;
    let (server, first) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let state = server.shared().registry.get(backend).unwrap();
    assert_eq!(get(first, "/", &[]).await.body, "ok");
    assert_eq!(state.pool.idle_connections(), (0, 1));
    assert_eq!(
        get(first, "/", &[]).await.body,
        "ok",
        "retried on a new connection"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(state.health.consecutive_failures(), 0);

    let (backend, connections) = one_answer_backend(Duration::from_millis(200)).await;
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let state = server.shared().registry.get(backend).unwrap();
    let together = (0..3).map(|_| get(proxy, "/", &[]));
    for reply in futures_util::future::join_all(together).await {
        assert_eq!(reply.body, "ok");
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    assert_eq!(state.pool.idle_connections(), (0, 3));
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 502, "two closes in a row");
    assert_eq!(state.health.consecutive_failures(), 1);
    assert_eq!(state.pool.idle_connections(), (0, 1), "the third is left");
    assert_eq!(connections.load(Ordering::SeqCst), 3, "no new connection");
}

/// How the stress backend frames its answer to request `id` (`id % 7`), from a small length to
/// a body written in pieces, chunked with a trailer, no body, an informational answer first, and
/// two that end the connection.
fn stress_answer(id: u64) -> (Vec<Vec<u8>>, bool) {
    let body = |len| stress_body(id, len);
    let with_length = |extra: &str, body: Vec<u8>| {
        let mut head = format!(
            "HTTP/1.1 200 OK\r\n{extra}content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        head.extend_from_slice(&body);
        head
    };
    match id % 7 {
        0 => (vec![with_length("", body(40))], false),
        1 => {
            let whole = with_length("", body(100_000));
            (whole.chunks(30_000).map(<[u8]>::to_vec).collect(), false)
        }
        2 => {
            let mut parts = vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()];
            for piece in body(3_000).chunks(1_000) {
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(piece);
                chunk.extend_from_slice(b"\r\n");
                parts.push(chunk);
            }
            parts.push(b"0\r\nx-check: 1\r\n\r\n".to_vec());
            (parts, false)
        }
        3 => (vec![b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()], false),
        4 => {
            let hints = b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n".to_vec();
            (vec![hints, with_length("", body(10))], false)
        }
        5 => (vec![with_length("connection: close\r\n", body(500))], true),
        _ => {
            let mut answer = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
            answer.extend_from_slice(&body(2_000));
            (vec![answer], true)
        }
    }
}

/// `len` bytes that name request `id` throughout, so that a body meant for another request, or
/// one shifted by a byte, is told apart.
fn stress_body(id: u64, len: usize) -> Vec<u8> {
    format!("{id:08}.").bytes().cycle().take(len).collect()
}

/// A backend answering `/s/{id}` as `stress_answer(id)` says, reading request bodies by their
/// length; records every id it is asked for.
async fn stress_backend(seen: Arc<std::sync::Mutex<Vec<u64>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                loop {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + length {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + length);
                    let id: u64 = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|path| path.strip_prefix("/s/"))
                        .and_then(|id| id.parse().ok())
                        .expect("a stress request");
                    seen.lock().unwrap().push(id);
                    let (parts, closes) = stress_answer(id);
                    for part in parts {
                        if s.write_all(&part).await.is_err() {
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                    if closes {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One stress request: what the client saw, or None when it gave up on the body on purpose.
async fn stress_request<S, E>(send: S, id: u64) -> Option<(u16, Vec<u8>)>
where
    S: std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, E>>,
    E: std::fmt::Display,
{
    let response = tokio::time::timeout(Duration::from_secs(30), send)
        .await
        .expect("an answer within 30 s")
        .unwrap_or_else(|e| panic!("request {id}: {e}"));
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if id % 11 == 10 {
        // Leaves after the head, or the first piece of the body: the proxy must let go of the
        // backend's answer without handing its rest to anyone else.
        let _ = body.frame().await;
        return None;
    }
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("a body within 30 s")
        .unwrap_or_else(|e| panic!("request {id}: body: {e}"))
        .to_bytes();
    Some((status, body.to_vec()))
}

/// What a client must see for request `id`: the status, and the body `stress_answer` sent.
fn stress_expected(id: u64) -> (u16, Vec<u8>) {
    match id % 7 {
        0 => (200, stress_body(id, 40)),
        1 => (200, stress_body(id, 100_000)),
        2 => (200, stress_body(id, 3_000)),
        3 => (204, Vec::new()),
        4 => (200, stress_body(id, 10)),
        5 => (200, stress_body(id, 500)),
        _ => (200, stress_body(id, 2_000)),
    }
}

/// Mixed traffic at once, to two backends: bodiless GETs (switchyard's own HTTP/1.1 exchange)
/// and POSTs (hyper's), from HTTP/1.1 clients and HTTP/2 streams, against every framing a backend
/// may use (lengths, bodies in pieces, chunked with trailers, 204, 103 first, `Connection:
/// close`, a body delimited by the close), with one client in eleven leaving mid-answer. Every
/// client gets its own request's answer, whole; each request reaches a backend exactly once; and
/// afterwards nothing is left in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_framings_under_concurrency_never_cross_answers() {
    const H1_CLIENTS: u64 = 8;
    const H2_CLIENTS: u64 = 2;
    const REQUESTS: u64 = 120;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backends = [
        stress_backend(Arc::clone(&seen)).await,
        stress_backend(Arc::clone(&seen)).await,
    ];
    let (server, proxy) = proxy(&one_pool(
        "round_robin",
        &[(backends[0], 1), (backends[1], 1)],
        "",
    ))
    .await;
    let request = move |id: u64| {
        // Every framing with both methods: the method turns over every seven ids.
        let (method, body) = if (id / 7).is_multiple_of(2) {
            ("GET", Bytes::new())
        } else {
            ("POST", Bytes::from(vec![b'u'; (id % 5) as usize * 700]))
        };
        Request::builder()
            .method(method)
            .uri(format!("http://{proxy}/s/{id}"))
            .body(http_body_util::Full::new(body))
            .unwrap()
    };

    let mut clients = tokio::task::JoinSet::new();
    for c in 0..H1_CLIENTS {
        clients.spawn(async move {
            let client = client();
            let mut seen = Vec::new();
            for i in 0..REQUESTS {
                let id = c * 1_000 + i;
                seen.push((id, stress_request(client.request(request(id)), id).await));
            }
            seen
        });
    }
    for c in H1_CLIENTS..H1_CLIENTS + H2_CLIENTS {
        clients.spawn(async move {
            let stream = TcpStream::connect(proxy).await.unwrap();
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let streams = (0..REQUESTS).map(|i| {
                let mut sender = sender.clone();
                let id = c * 1_000 + i;
                async move {
                    (
                        id,
                        stress_request(sender.send_request(request(id)), id).await,
                    )
                }
            });
            futures_util::future::join_all(streams).await
        });
    }

    let mut answered = 0;
    let mut wrong = Vec::new();
    while let Some(results) = clients.join_next().await {
        for (id, got) in results.unwrap() {
            let Some(got) = got else { continue };
            answered += 1;
            if got != stress_expected(id) {
                let start = String::from_utf8_lossy(&got.1[..got.1.len().min(40)]).into_owned();
                wrong.push(format!("{id}: {} {} bytes {start:?}", got.0, got.1.len()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "answers that are not the request's own:\n{}",
        wrong.join("\n")
    );
    let total = (H1_CLIENTS + H2_CLIENTS) * REQUESTS;
    assert!(answered > total * 8 / 10, "{answered} of {total} answered");

    let mut ids = seen.lock().unwrap().clone();
    ids.sort_unstable();
    let requests = ids.len();
    ids.dedup();
    assert_eq!(requests, ids.len(), "a request reached a backend twice");
    assert_eq!(ids.len() as u64, total, "every request reached a backend");

    let states: Vec<_> = backends
        .iter()
        .map(|b| server.shared().registry.get(*b).unwrap())
        .collect();
    wait_until("nothing is left in flight", || {
        states.iter().all(|s| s.in_flight() == 0)
    })
    .await;
    let after = send(&client(), proxy, "GET", "/s/7000", &[], Bytes::new()).await;
    assert_eq!(
        (after.status.as_u16(), after.body.into_bytes()),
        stress_expected(7000)
    );
}
