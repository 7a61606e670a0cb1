//! What the proxy does to a request and its response on the way through: header rules, streaming,
//! connection reuse, HTTP/2 from clients, malformed requests.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use support::*;

#[tokio::test]
async fn hop_by_hop_request_headers_do_not_reach_the_backend() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let headers_seen = |addr| async move {
        let mut conn = h1_connection::<Empty<Bytes>>(addr).await;
        let request = Request::get("/headers")
            .header("host", "hop.test")
            .header("connection", "x-custom, keep-alive")
            .header("x-custom", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("proxy-connection", "keep-alive")
            .header("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA==")
            .header("x-end-to-end", "kept")
            .body(Empty::new())
            .unwrap();
        let response = conn.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };
    let hop_by_hop = [
        "connection:",
        "x-custom:",
        "keep-alive:",
        "te:",
        "proxy-connection:",
        "proxy-authorization:",
    ];
    // Control: sent straight to the app, every one of them arrives.
    let direct = headers_seen(apps[0].addr()).await;
    for header in hop_by_hop {
        assert!(direct.lines().any(|l| l.starts_with(header)), "{direct}");
    }

    let seen = headers_seen(proxy).await;
    for gone in hop_by_hop {
        assert!(
            !seen.lines().any(|l| l.starts_with(gone)),
            "{gone} reached the backend:\n{seen}"
        );
    }
    assert!(seen.lines().any(|l| l == "x-end-to-end: kept"), "{seen}");
    assert!(seen.lines().any(|l| l == "host: hop.test"), "{seen}");
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let (backend, _task) = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-resp\r\nx-resp: secret\r\n\
          keep-alive: timeout=5\r\nx-visible: yes\r\n\r\nok",
    )
    .await;
    // Control: the backend does send them.
    let direct = get(backend, "/", &[]).await;
    assert_eq!(direct.headers["x-resp"], "secret");
    assert!(direct.headers.contains_key("keep-alive"));

    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], "")).await;
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "ok");
    assert_eq!(reply.headers["x-visible"], "yes");
    for gone in ["x-resp", "keep-alive", "connection"] {
        assert!(!reply.headers.contains_key(gone), "{gone}: {reply:?}");
    }
}

#[tokio::test]
async fn backend_closing_its_connection_does_not_close_the_clients() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let mut conn = h1_connection::<Empty<Bytes>>(proxy).await;
    for _ in 0..3 {
        let request = Request::get("/close")
            .header("host", "close.test")
            .body(Empty::new())
            .unwrap();
        let response = conn.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key("connection"));
        response.into_body().collect().await.unwrap();
        conn.ready().await.expect("client connection still open");
    }
    assert_eq!(apps[0].connections(), 3);
}

#[tokio::test]
async fn forwarding_headers_are_set_and_host_passes_through() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let reply = get(
        proxy,
        "/headers",
        &[
            ("host", "shop.example:8443"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = apps[0].last_request_headers();
    assert_eq!(seen["host"], "shop.example:8443");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example:8443");

    // Without an incoming one, the client's address starts the list.
    get(proxy, "/headers", &[]).await;
    assert_eq!(
        apps[0].last_request_headers()["x-forwarded-for"],
        "127.0.0.1"
    );
}

#[tokio::test]
async fn chunked_request_body_streams_through_echo() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 64; // 4 MiB
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    // A period that does not divide the chunk size, so a lost, repeated or reordered chunk shows.
    let data: Vec<u8> = (0..CHUNK * CHUNKS).map(|i| (i % 251) as u8).collect();
    let data = Bytes::from(data);

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let mut conn = h1_connection::<ChannelBody>(proxy).await;
    let request = Request::post("/echo")
        .header("host", "echo.test")
        .body(ChannelBody(rx))
        .unwrap();
    let response = tokio::spawn(async move { conn.send_request(request).await });
    tx.send(data.slice(..CHUNK)).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("headers arrive after the first chunk")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    // Lockstep: the next chunk is sent only once everything sent so far has come back, so a proxy
    // that buffered the request (or the response) would stall here.
    let mut received = Vec::with_capacity(data.len());
    for sent in 1..=CHUNKS {
        while received.len() < sent * CHUNK {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("echo of chunk {sent} stalled"))
                .expect("body continues")
                .unwrap();
            if let Ok(bytes) = frame.into_data() {
                received.extend_from_slice(&bytes);
            }
        }
        if sent < CHUNKS {
            tx.send(data.slice(sent * CHUNK..(sent + 1) * CHUNK))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("body ends after the request body ends")
        .unwrap()
        .to_bytes();
    received.extend_from_slice(&rest);
    assert!(received == data, "echoed body differs");
    let seen = apps[0].last_request_headers();
    assert_eq!(seen["transfer-encoding"], "chunked");
    assert!(!seen.contains_key("content-length"));
}

#[tokio::test]
async fn keep_alive_reuses_upstream_connections() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let mut conn = h1_connection::<Empty<Bytes>>(proxy).await;
    for i in 0..50 {
        let request = Request::get("/")
            .header("host", "reuse.test")
            .body(Empty::new())
            .unwrap();
        let response = conn.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(apps[0].requests(), 50);
    assert!(
        apps[0].connections() <= 3,
        "{} upstream connections for 50 requests",
        apps[0].connections()
    );
}

/// An upstream connection idle in the pool for `timeouts.idle` is not used again: the next request
/// opens a new one. Within that time, requests share one.
#[tokio::test]
async fn an_upstream_connection_idle_for_timeouts_idle_is_not_reused() {
    let apps = apps(1).await;
    let text = one_pool(
        "round_robin",
        &weight_one(&apps),
        "[timeouts]\nidle = \"400ms\"\n",
    );
    let (_server, proxy) = proxy(&text).await;
    for _ in 0..3 {
        assert_eq!(get(proxy, "/", &[]).await.status, 200);
    }
    assert_eq!(
        apps[0].connections(),
        1,
        "three requests in a row share one"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    assert_eq!(
        apps[0].connections(),
        2,
        "the pooled connection outlived timeouts.idle and was not reused"
    );
    assert_eq!(apps[0].requests(), 4);
}

#[tokio::test]
async fn http2_prior_knowledge_reaches_the_backend() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = Request::get("http://h2.example/headers")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = h2.send_request(request).await.unwrap();
        assert_eq!(response.version(), Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-backend"], "app1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let seen = String::from_utf8(body.to_vec()).unwrap();
        assert!(seen.lines().any(|l| l == "host: h2.example"), "{seen}");
        assert!(
            seen.lines().any(|l| l == "x-forwarded-host: h2.example"),
            "{seen}"
        );
    }
    assert_eq!(apps[0].requests(), 3);
}

#[tokio::test]
async fn http11_request_without_host_is_400() {
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let response = raw_exchange(proxy, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    assert_eq!(apps[0].requests(), 0);

    // HTTP/1.0 has no Host requirement.
    let response = raw_exchange(proxy, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        response.starts_with("HTTP/1.0 200 ") || response.starts_with("HTTP/1.1 200 "),
        "{response}"
    );
    assert_eq!(apps[0].requests(), 1);
}

/// `timeouts.idle` closes client connections that moved nothing, HTTP/1 and HTTP/2 alike, but never
/// one whose request is waiting on a slow backend.
#[tokio::test]
async fn idle_client_connections_are_closed_but_waiting_ones_are_not() {
    let apps = apps(1).await;
    let tail = "[timeouts]\nidle = \"300ms\"\nclient_header = \"10s\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;

    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = h1_connection::<Empty<Bytes>>(proxy).await;
    let request = Request::get("/")
        .header("host", "idle.test")
        .body(Empty::new())
        .unwrap();
    assert_eq!(h1.send_request(request).await.unwrap().status(), 200);
    // HTTP/2 prior knowledge: one request, then silence.
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = Request::get("http://idle.test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(request).await.unwrap().status(), 200);
    assert!(!h1.is_closed() && !h2.is_closed());
    let opened = std::time::Instant::now();
    wait_until("idle connections closed (idle = 300ms)", || {
        h1.is_closed() && h2.is_closed()
    })
    .await;
    assert!(
        opened.elapsed() >= Duration::from_millis(250),
        "closed before idle passed"
    );

    // A request waiting 1s on its backend outlives three idle periods on a silent connection.
    let mut h1 = h1_connection::<Empty<Bytes>>(proxy).await;
    let request = Request::get("/sleep/1000")
        .header("host", "idle.test")
        .body(Empty::new())
        .unwrap();
    let response = h1
        .send_request(request)
        .await
        .expect("not cut while waiting");
    assert_eq!(response.status(), 200);
}

/// A client that stops reading a long response moves no byte and waits on no backend, so it is
/// idle; it cannot finish a graceful close (its response never ends), so after `timeouts.idle`
/// more it is dropped rather than held open for as long as the client stays silent.
#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_dropped_after_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LENGTH: u64 = 1 << 30;
    // Answers every request with a 1 GiB body, written as fast as the proxy takes it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {LENGTH}\r\n\r\n");
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b'x'; 64 * 1024];
                let mut sent = 0;
                while sent < LENGTH {
                    if s.write_all(&block).await.is_err() {
                        return;
                    }
                    sent += block.len() as u64;
                }
            });
        }
    });
    let tail = "[timeouts]\nidle = \"300ms\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let mut client = tokio::net::TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: slow-reader.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let n = client.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        &buf[..n.min(64)]
    );
    // The client stops reading: the socket buffers fill, the proxy's writes block, nothing moves.
    // Idle after 300–375ms, closed gracefully (which cannot finish), dropped 300ms later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = n as u64;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(k) => received += k as u64,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stalled client's connection was not dropped"
    );
    assert!(
        received < LENGTH,
        "the whole body arrived ({received} bytes): the connection was never dropped"
    );
}

/// A request counts against its backend until its response body has ended, not when headers arrive
/// (least_connections and drains depend on it).
#[tokio::test]
async fn in_flight_lasts_until_the_response_body_ends() {
    let apps = apps(1).await;
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut conn = h1_connection::<ChannelBody>(proxy).await;
    let request = Request::post("/echo")
        .header("host", "flight.test")
        .body(ChannelBody(rx))
        .unwrap();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    let state = server.shared().registry.get(apps[0].addr()).unwrap();
    assert_eq!(
        state.in_flight(),
        1,
        "headers arrived but the body is still streaming"
    );
    drop(tx);
    while body.frame().await.is_some() {}
    wait_until("in-flight released at the end of the body", || {
        state.in_flight() == 0
    })
    .await;
}

/// `timeouts.client_header` cuts a client that trickles its headers, while other clients are served.
#[tokio::test]
async fn trickled_headers_are_cut_after_client_header() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let apps = apps(1).await;
    let tail = "[timeouts]\nclient_header = \"300ms\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let mut slow = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let started = std::time::Instant::now();
    let trickle = async {
        for byte in b"GET / HTTP/1.1\r\nhost: slow.test\r\nx-a: ".iter() {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (_, reply) = tokio::join!(trickle, get(proxy, "/", &[]));
    assert_eq!(reply.status, 200, "other clients are served meanwhile");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the trickling connection was not closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        apps[0].requests(),
        1,
        "the trickled request never reached the backend"
    );
}

/// Until its first head is whole a connection is not yet HTTP/1 or HTTP/2: a client that closes
/// halfway through gets no answer, and one that has sent nothing does not hold up a graceful stop.
#[tokio::test]
async fn connections_without_a_whole_first_head_get_nothing_and_do_not_hold_up_a_stop() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let apps = apps(1).await;
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;

    let mut partial = tokio::net::TcpStream::connect(proxy).await.unwrap();
    partial
        .write_all(b"GET / HTTP/1.1\r\nhost: a")
        .await
        .unwrap();
    partial.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), partial.read_to_end(&mut answer))
        .await
        .expect("closed after the client's end")
        .unwrap();
    assert!(
        answer.is_empty(),
        "answered {:?}",
        String::from_utf8_lossy(&answer)
    );

    // `client_header` is 10 s by default: a stop must not wait for it.
    let silent = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut one_request = h1_connection::<Empty<Bytes>>(proxy).await;
    let request = Request::get("/")
        .header("host", "stop.test")
        .body(Empty::new())
        .unwrap();
    assert_eq!(
        one_request.send_request(request).await.unwrap().status(),
        200
    );
    let stopping = std::time::Instant::now();
    assert!(
        server.shutdown(Duration::from_secs(5)).await,
        "every connection finished"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "took {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        apps[0].requests(),
        1,
        "the partial head never reached the backend"
    );
    drop(silent);
}

/// A keep-alive connection idle between requests lets go of its HTTP/1 buffers ("parks"), is
/// counted in `switchyard_downstream_idle_connections` while it waits, and serves whatever comes
/// next on the same socket: a request, a request with a body, two pipelined requests (after a
/// stray empty line). The gauge drops when the client closes.
#[tokio::test]
async fn idle_keep_alive_connections_park_and_serve_what_comes_next() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let apps = apps(1).await;
    let tail = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let admin = server.admin_addr().unwrap();
    let series = format!("switchyard_downstream_idle_connections{{listener=\"{proxy}\"}}");
    let idle_becomes = |want: f64| {
        let series = series.clone();
        async move {
            for _ in 0..200 {
                if metric(admin, &series).await == Some(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{series} did not become {want}");
        }
    };

    let mut h1 = h1_connection::<http_body_util::Full<Bytes>>(proxy).await;
    let get_root = || {
        Request::get("/")
            .header("host", "park.test")
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(h1.send_request(get_root()).await.unwrap().status(), 200);
    idle_becomes(1.0).await;
    // Served after the park, and parked again after it.
    assert_eq!(h1.send_request(get_root()).await.unwrap().status(), 200);
    idle_becomes(1.0).await;
    let post = Request::post("/echo")
        .header("host", "park.test")
        .body(http_body_util::Full::new(Bytes::from_static(
            b"after a park",
        )))
        .unwrap();
    let response = h1.send_request(post).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"after a park");
    idle_becomes(1.0).await;
    assert!(!h1.is_closed(), "the connection was kept");
    drop(h1);
    idle_becomes(0.0).await;

    // Two pipelined requests reaching a parked connection in one segment are both answered.
    let mut raw = tokio::net::TcpStream::connect(proxy).await.unwrap();
    raw.write_all(b"GET /status/204 HTTP/1.1\r\nhost: park.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = raw.read(&mut first).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&first[..n])), 204);
    // A stray empty line after a request (which hyper skips) does not keep it from parking.
    raw.write_all(b"\r\n").await.unwrap();
    idle_becomes(1.0).await;
    raw.write_all(
        b"GET /status/201 HTTP/1.1\r\nhost: park.test\r\n\r\n\
          GET /status/202 HTTP/1.1\r\nhost: park.test\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
        .await
        .expect("both answered, then closed")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    let statuses: Vec<&str> = rest
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &rest[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["201", "202"], "{rest}");
    idle_becomes(0.0).await;
}

/// A request asking to upgrade that is answered without switching leaves the connection an
/// ordinary keep-alive one: idle well past the moment other connections let go of their HTTP/1
/// state, it still serves its next request. (hyper keeps a refused upgrade pending until its
/// connection ends, so such a connection keeps its state rather than lose the socket.)
#[tokio::test]
async fn a_connection_whose_upgrade_was_refused_serves_on_after_a_pause() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    conn.write_all(
        b"GET /status/204 HTTP/1.1\r\nhost: up.test\r\n\
          connection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut first = [0u8; 1024];
    let n = conn.read(&mut first).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&first[..n])), 204);
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(b"GET /status/202 HTTP/1.1\r\nhost: up.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("answered, then closed")
        .unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&rest)), 202, "{rest:?}");
}

/// Sends `GET {path}` on a raw keep-alive connection and returns the status of its answer (a
/// `/status/...` path: no body to read).
async fn raw_status(conn: &mut tokio::net::TcpStream, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: dormant.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&chunk[..n]);
    }
    status_of(&String::from_utf8_lossy(&answer))
}

/// Waits until `server` holds `want` dormant connections.
async fn dormant_becomes(server: &switchyard::server::Server, want: usize) {
    wait_until(&format!("{want} dormant connections"), || {
        server.dormant_connections() == want
    })
    .await;
}

/// Parked plain-TCP keep-alive connections wait without a task of their own once parked for
/// 100 ms: fifty of them add none to the runtime. Each serves its next request on the same socket when it comes, and goes
/// dormant again; a client closing a dormant connection ends it, and it leaves the idle gauge.
#[tokio::test]
async fn parked_connections_wait_without_a_task_and_wake_for_their_next_request() {
    const N: usize = 50;
    let apps = apps(1).await;
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let idle = server.metrics().downstream_idle(proxy);
    let runtime = tokio::runtime::Handle::current().metrics();

    // One at a time, so that the backend sees one pooled connection (and runs one task for it).
    let mut conns = Vec::with_capacity(N);
    let mut first = tokio::net::TcpStream::connect(proxy).await.unwrap();
    assert_eq!(raw_status(&mut first, "/status/204").await, 204);
    conns.push(first);
    let answered = std::time::Instant::now();
    dormant_becomes(&server, 1).await;
    // Parked after 10 ms, dormant only after another 100 ms: a short pause keeps the task.
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(100),
        "dormant {after:?} after the answer"
    );
    assert_eq!(idle.get(), 1, "a dormant connection is a parked one");
    let tasks_with_one = runtime.num_alive_tasks();
    for _ in 1..N {
        let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
        assert_eq!(raw_status(&mut conn, "/status/204").await, 204);
        conns.push(conn);
    }
    dormant_becomes(&server, N).await;
    assert_eq!(idle.get(), N as i64, "dormant connections are parked ones");
    let tasks = runtime.num_alive_tasks();
    assert!(
        tasks < tasks_with_one + 5,
        "{tasks} tasks with {N} dormant connections, {tasks_with_one} with one"
    );

    // Woken by their next requests, all at once.
    let answers = futures_util::future::join_all(
        conns
            .iter_mut()
            .map(|conn| async move { raw_status(conn, "/status/202").await }),
    )
    .await;
    assert!(answers.iter().all(|&status| status == 202), "{answers:?}");
    dormant_becomes(&server, N).await;

    // Clients that close: their connections end.
    conns.truncate(N / 2);
    dormant_becomes(&server, N / 2).await;
    wait_until("the idle gauge counts the rest", || {
        idle.get() == (N / 2) as i64
    })
    .await;
    for conn in &mut conns {
        assert_eq!(raw_status(conn, "/status/204").await, 204);
    }
}

/// A dormant connection is closed as its task would have closed it: `timeouts.idle` after its
/// last answer when that comes before `client_header`, and at once when the server stops.
#[tokio::test]
async fn dormant_connections_close_after_idle_and_when_the_server_stops() {
    use tokio::io::AsyncReadExt;

    let apps = apps(1).await;
    let tail = "[timeouts]\nidle = \"400ms\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let closed_by_proxy = |mut conn: tokio::net::TcpStream| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut rest))
            .await
            .expect("closed by the proxy")
            .unwrap();
        assert!(rest.is_empty(), "closed without a word: {rest:?}");
    };

    let mut idle = tokio::net::TcpStream::connect(proxy).await.unwrap();
    assert_eq!(raw_status(&mut idle, "/status/204").await, 204);
    let answered = std::time::Instant::now();
    dormant_becomes(&server, 1).await;
    closed_by_proxy(idle).await;
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(380) && after < Duration::from_millis(1200),
        "closed {after:?} after its last answer, not about 400ms"
    );
    dormant_becomes(&server, 0).await;

    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
        assert_eq!(raw_status(&mut conn, "/status/204").await, 204);
        conns.push(conn);
    }
    dormant_becomes(&server, 2).await;
    let stopping = std::time::Instant::now();
    assert!(
        server.shutdown(Duration::from_secs(5)).await,
        "stopped in time"
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
    for conn in conns {
        closed_by_proxy(conn).await;
    }
    assert_eq!(server.dormant_connections(), 0);
}
