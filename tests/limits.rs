//! `[limits]` and `timeouts.client_header`: what one client may send, how many may connect, and
//! how long a head may take. Each case asserts the exact status, that the connection closed, and
//! what the backend saw.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request head of exactly `len` bytes: a request line of `line` bytes, `Host`, and an `x-pad`
/// header filling the rest.
fn head_of(line: usize, len: usize) -> String {
    let request_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(line - 16));
    assert_eq!(request_line.len(), line);
    let fixed = request_line.len() + "host: a\r\nx-pad: \r\n\r\n".len();
    format!(
        "{request_line}host: a\r\nx-pad: {}\r\n\r\n",
        "p".repeat(len - fixed)
    )
}

#[tokio::test]
async fn max_header_bytes_tells_a_long_request_line_414_from_large_headers_431() {
    let backend = wire_backend().await;
    let tail = "[limits]\nmax_header_bytes = 2048\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    // Exactly at the limit: served.
    let (answer, _) = raw_exchange_closed(proxy, head_of(100, 2048).as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(backend.heads().len(), 1);
    // One byte over, in the headers: 431.
    let (answer, closed) = raw_exchange_closed(proxy, head_of(100, 2049).as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(
        answer.ends_with("request header fields too large\n"),
        "{answer}"
    );
    assert!(closed);
    // A request line longer than the limit by itself: 414, read no further than the limit.
    let long_line = format!("GET /{} HTTP/1.1\r\nhost: a\r\n\r\n", "a".repeat(4096));
    let (answer, closed) = raw_exchange_closed(proxy, long_line.as_bytes()).await;
    assert_eq!(status_of(&answer), 414, "{answer}");
    assert!(answer.ends_with("request line too long\n"), "{answer}");
    assert!(closed);
    // ...also when it never ends: the answer does not wait for the rest.
    let mut endless = TcpStream::connect(proxy).await.unwrap();
    endless
        .write_all(format!("GET /{}", "a".repeat(3000)).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), endless.read_to_end(&mut answer))
        .await
        .expect("answered and closed without the rest of the line")
        .unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 414);
    // A request line within the limit whose headers make the head too large: 431.
    let (answer, _) = raw_exchange_closed(proxy, head_of(1500, 2100).as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(
        backend.heads().len(),
        1,
        "only the first request got through"
    );
}

#[tokio::test]
async fn max_header_bytes_bounds_http2_header_lists_too() {
    let backend = wire_backend().await;
    let tail = "[limits]\nmax_header_bytes = 4096\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    let mut h2 = h2c(proxy).await;
    let request = |pad: usize| {
        Request::get("http://a/")
            .header("x-pad", "p".repeat(pad))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let response = h2.send_request(request(3000)).await.unwrap();
    assert_eq!(response.status(), 200);
    let response = h2.send_request(request(5000)).await.unwrap();
    assert_eq!(response.status(), 431);
    // The HTTP/2 layer refused one stream, not the connection.
    let response = h2.send_request(request(10)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.heads().len(), 2);
}

/// An HTTP/2 prior-knowledge (h2c) connection to `addr`.
async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    h2
}

#[tokio::test]
async fn max_headers_counts_every_field_line_host_included() {
    let backend = wire_backend().await;
    let tail = "[limits]\nmax_headers = 10\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    let with_fields = |n: usize| {
        let extra: String = (1..n).map(|i| format!("x-{i}: 1\r\n")).collect();
        format!("GET / HTTP/1.1\r\nhost: a\r\n{extra}\r\n")
    };
    let (answer, _) = raw_exchange_closed(proxy, with_fields(10).as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let (answer, closed) = raw_exchange_closed(proxy, with_fields(11).as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert!(closed);
    assert_eq!(backend.heads().len(), 1);
    // HTTP/2 requests are held to the same count.
    let mut h2 = h2c(proxy).await;
    let mut request = Request::get("http://a/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    for i in 0..11 {
        let name = http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap();
        request.headers_mut().insert(name, "1".parse().unwrap());
    }
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(backend.heads().len(), 1);
}

#[tokio::test]
async fn the_default_limits_are_64_kib_and_100_fields() {
    let backend = wire_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let (answer, _) = raw_exchange_closed(proxy, head_of(100, 64 * 1024).as_bytes()).await;
    assert_eq!(status_of(&answer), 200);
    let (answer, _) = raw_exchange_closed(proxy, head_of(100, 64 * 1024 + 1).as_bytes()).await;
    assert_eq!(status_of(&answer), 431);
    let fields: String = (1..101).map(|i| format!("x-{i}: 1\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nhost: a\r\n{fields}\r\n");
    let (answer, _) = raw_exchange_closed(proxy, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 431, "101 fields");
    assert_eq!(backend.heads().len(), 1);
}

#[tokio::test]
async fn max_body_bytes_refuses_a_declared_length_before_any_backend_is_contacted() {
    let backend = wire_backend().await;
    let tail = "[limits]\nmax_body_bytes = 1000\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    // The head alone: the answer comes without the body being sent.
    let head = "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1001\r\n\r\n";
    let (answer, closed) = raw_exchange_closed(proxy, head.as_bytes()).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(answer.ends_with("request body too large\n"), "{answer}");
    assert!(closed);
    assert!(backend.heads().is_empty());
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // Exactly the limit passes, whole.
    let body = "b".repeat(1000);
    let request = format!("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n{body}");
    let (answer, _) = raw_exchange_closed(proxy, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(backend.requests()[0].body.len(), 1000);
}

#[tokio::test]
async fn max_body_bytes_cuts_a_chunked_body_that_grows_past_it() {
    let backend = wire_backend().await;
    let tail = "[limits]\nmax_body_bytes = 1000\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    let chunk = format!("1f4\r\n{}\r\n", "c".repeat(500));
    // 1,500 bytes in three chunks: the third goes past the limit.
    let request = format!(
        "POST /big HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n"
    );
    let (answer, closed) = raw_exchange_closed(proxy, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert!(closed);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        backend.requests().is_empty(),
        "no whole request reached the backend"
    );
    let cut = backend
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    // Two chunks (1,000 bytes) are within the limit and go through whole.
    let request = format!(
        "POST /fits HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let (answer, _) = raw_exchange_closed(proxy, request.as_bytes()).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].request_line(), "POST /fits HTTP/1.1");
    assert_eq!(seen[0].body.len(), 1000);
    // The backend connection that carried the cut body was not reused.
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        cut + 1
    );
    // An HTTP/2 body of unknown length is cut the same way.
    let mut h2 = h2c(proxy).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = Request::post("http://a/h2")
        .body(ChannelBody(rx).map_err(|never| match never {}).boxed())
        .unwrap();
    for _ in 0..3 {
        tx.send(Bytes::from(vec![b'h'; 500])).await.unwrap();
    }
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 413);
    drop(tx);
    // A sized HTTP/2 body over the limit is refused by its content-length.
    let sized = Request::post("http://a/h2")
        .body(Full::new(Bytes::from(vec![b's'; 1001])).boxed())
        .unwrap();
    let response = h2.send_request(sized).await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(backend.requests().len(), 1);
}

#[tokio::test]
async fn max_connections_closes_one_more_at_once_and_serves_the_others() {
    let apps = apps(1).await;
    let tail = "[limits]\nmax_connections = 2\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let mut first = h1_connection::<Empty<Bytes>>(proxy).await;
    let mut second = h1_connection::<Empty<Bytes>>(proxy).await;
    let get = |path: &str| {
        Request::get(path)
            .header("host", "a")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    assert_eq!(first.send_request(get("/1")).await.unwrap().status(), 200);
    assert_eq!(second.send_request(get("/2")).await.unwrap().status(), 200);
    // The third is accepted and closed before it can send anything.
    let mut third = TcpStream::connect(proxy).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let metrics = server.metrics().render();
    let refused = format!("switchyard_downstream_refused_total{{listener=\"{proxy}\"}} 1");
    assert!(metrics.contains(&refused), "{metrics}");
    // The two open ones are still served.
    assert_eq!(first.send_request(get("/3")).await.unwrap().status(), 200);
    assert_eq!(second.send_request(get("/4")).await.unwrap().status(), 200);
    assert_eq!(apps[0].requests(), 4);
    // Once one closes, a new client gets its place.
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        let (answer, _) = raw_exchange_closed(
            proxy,
            b"GET /5 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        )
        .await;
        if status_of(&answer) == 200 {
            again = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "a connection was accepted after one closed"
    );
}

/// Slowloris: a client trickling its head byte by byte is cut off `client_header` after it
/// connected, while other clients are served promptly all along; the trickled request never
/// reaches the backend. A client that sends nothing at all is cut the same way, and so is a
/// trickled second request on a keep-alive connection.
#[tokio::test]
async fn trickled_and_missing_heads_are_cut_while_others_are_served() {
    let backend = wire_backend().await;
    let tail = "[timeouts]\nclient_header = \"500ms\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    let started = Instant::now();
    let trickle = async {
        let mut slow = TcpStream::connect(proxy).await.unwrap();
        for byte in b"GET /slow HTTP/1.1\r\nhost: a\r\nx-a: 1\r\nx-b: 2\r\nx-c: 3\r\n\r\n" {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
        (started.elapsed(), rest)
    };
    let silent = async {
        let mut silent = TcpStream::connect(proxy).await.unwrap();
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the silent connection was not closed");
        started.elapsed()
    };
    let others = async {
        let mut slowest = Duration::ZERO;
        for i in 0..10 {
            let asked = Instant::now();
            let reply = get(proxy, &format!("/fast/{i}"), &[]).await;
            assert_eq!(reply.status, 200);
            slowest = slowest.max(asked.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slowest
    };
    let ((trickled_for, answer), silent_for, slowest) = tokio::join!(trickle, silent, others);
    assert!(answer.is_empty(), "cut without an answer: {answer:?}");
    assert!(
        trickled_for >= Duration::from_millis(450) && trickled_for < Duration::from_secs(2),
        "{trickled_for:?}"
    );
    assert!(
        silent_for >= Duration::from_millis(450) && silent_for < Duration::from_secs(2),
        "{silent_for:?}"
    );
    // Well under the trickling clients' 450 ms: nothing waited for them.
    assert!(slowest < Duration::from_millis(400), "{slowest:?}");
    let heads = backend.heads();
    assert_eq!(heads.len(), 10, "{heads:?}");
    assert!(
        heads.iter().all(|h| h.starts_with("GET /fast/")),
        "{heads:?}"
    );

    // On a keep-alive connection, the next head gets `client_header` too.
    let mut kept = TcpStream::connect(proxy).await.unwrap();
    kept.write_all(b"GET /first HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
    let second = Instant::now();
    kept.write_all(b"GET /second HTTP/1.1\r\nho").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), kept.read_to_end(&mut rest))
        .await
        .expect("the unfinished second head is cut")
        .unwrap();
    assert!(second.elapsed() < Duration::from_secs(2));
    assert!(backend.heads().iter().all(|h| !h.contains("/second")));
}

/// On a keep-alive connection that parked while idle (see `framing`), `client_header` still
/// counts from when the connection started waiting for the next head: a silent client is cut
/// `client_header` after its last answer, and so is one that starts a head late and never
/// finishes it, not `client_header` after it started.
#[tokio::test]
async fn client_header_counts_from_the_last_answer_on_a_parked_connection() {
    let backend = wire_backend().await;
    let tail = "[timeouts]\nclient_header = \"1s\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], tail)).await;
    let answered = |mut conn: TcpStream| async move {
        conn.write_all(b"GET /first HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), 200);
        (conn, Instant::now())
    };
    let cut_after = |mut conn: TcpStream, since: Instant| async move {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
            .await
            .expect("cut")
            .unwrap();
        assert!(rest.is_empty(), "cut without an answer: {rest:?}");
        since.elapsed()
    };
    let silent = async {
        let (conn, since) = answered(TcpStream::connect(proxy).await.unwrap()).await;
        cut_after(conn, since).await
    };
    let late = async {
        let (mut conn, since) = answered(TcpStream::connect(proxy).await.unwrap()).await;
        // Long parked by now, as is the silent one.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let idle = server.metrics().downstream_idle(proxy).get();
        assert_eq!(idle, 2, "both connections parked");
        conn.write_all(b"GET /second HTTP/1.1\r\nho").await.unwrap();
        cut_after(conn, since).await
    };
    let (silent_for, late_for) = tokio::join!(silent, late);
    for cut in [silent_for, late_for] {
        assert!(
            cut >= Duration::from_millis(950) && cut < Duration::from_millis(1450),
            "cut {cut:?} after the last answer, not about 1s"
        );
    }
    assert!(backend.heads().iter().all(|h| !h.contains("/second")));
}

/// HTTP/2 concurrent streams are bounded: the server announces 256, and a client that opens more
/// at once has the extra stream refused (RST_STREAM REFUSED_STREAM) while the first 256 are
/// served and other clients too.
#[tokio::test]
async fn http2_concurrent_streams_are_bounded_at_256() {
    const SETTINGS: u8 = 0x4;
    const RST_STREAM: u8 = 0x3;
    const HEADERS: u8 = 0x1;
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const REFUSED_STREAM: u32 = 0x7;
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    };
    let apps = apps(1).await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), "")).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut rx, mut tx) = stream.into_split();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tx.write_all(&hello).await.unwrap();
    // Reads one frame: (type, flags, stream, payload).
    async fn next_frame(rx: &mut tokio::net::tcp::OwnedReadHalf) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        rx.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        rx.read_exact(&mut payload).await.unwrap();
        (head[3], head[4], stream, payload)
    }
    // The server's SETTINGS announce the bound.
    let settings = loop {
        let (kind, flags, _, payload) = next_frame(&mut rx).await;
        if kind == SETTINGS && flags & 0x1 == 0 {
            break payload;
        }
    };
    let announced = settings.chunks(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes(entry[2..6].try_into().unwrap()))
    });
    assert_eq!(announced, Some(256));
    // Acknowledged, the bound applies: 257 requests at once, each held a second by the app.
    tx.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
    let mut block = vec![0x82, 0x86, 0x04, 11];
    block.extend(b"/sleep/1000");
    block.extend([0x01, 1, b'a']);
    let mut burst = Vec::new();
    for i in 0..257u32 {
        burst.extend(frame(HEADERS, END_STREAM_AND_HEADERS, 2 * i + 1, &block));
    }
    tx.write_all(&burst).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (kind, _, stream, payload) = next_frame(&mut rx).await;
            if kind == RST_STREAM {
                break (stream, u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
        }
    })
    .await
    .expect("a stream is refused");
    assert_eq!(refused, (2 * 256 + 1, REFUSED_STREAM));
    // Meanwhile another client is served at once.
    let asked = Instant::now();
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    assert!(asked.elapsed() < Duration::from_secs(2));
    wait_until("the 256 held streams reached the app", || {
        apps[0].requests() >= 257
    })
    .await;
    drop(tx);
}

/// A backend that answers every request with `len` bytes, written in pieces `pause` apart: at
/// once (a client's reading paces it), or slowly (the backend's own pace).
async fn sized_backend(len: usize, pieces: usize, pause: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let piece = vec![b'x'; len / pieces];
                for _ in 0..pieces {
                    tokio::time::sleep(pause).await;
                    if s.write_all(&piece).await.is_err() {
                        return;
                    }
                }
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

/// Keeps an HTTP/2 connection busy with a PING every 200 ms until it ends or `limit` passes;
/// whether it ended.
async fn ping_until_closed(ping: &mut h2::PingPong, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        let pong = tokio::time::timeout(Duration::from_secs(1), ping.ping(h2::Ping::opaque()));
        if !matches!(pong.await, Ok(Ok(_))) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// An HTTP/2 client that stops reading one response (never opens that stream's window again)
/// while it keeps its connection busy with PINGs loses the connection `timeouts.idle` later, as
/// nginx's `send_timeout` would have it: otherwise it would hold the backend's request (its
/// `max_connections` slot, its drain) for as long as it liked. A response paced by a slow
/// backend is not the client's doing and is left alone.
#[tokio::test]
async fn an_http2_client_that_stops_reading_a_response_loses_its_connection() {
    let stuck = sized_backend(4 << 20, 1, Duration::ZERO).await;
    let slow = sized_backend(3_000, 10, Duration::from_millis(300)).await;
    let config = format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
path_prefix = "/slow"
pool = "slow"

[[routes]]
pool = "stuck"

[pools.stuck]
strategy = "round_robin"
backends = [{{ address = "{stuck}" }}]

[pools.slow]
strategy = "round_robin"
backends = [{{ address = "{slow}" }}]

[timeouts]
idle = "1s"
"#
    );
    let (server, proxy) = proxy(&config).await;
    let in_flight = |backend| server.shared().registry.get(backend).unwrap().in_flight();

    // The backend takes 3 s to send its body, 300 ms at a time: the response completes.
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (client, mut connection) = h2::client::handshake(stream).await.unwrap();
    let mut ping = connection.ping_pong().unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = Request::get("http://limits.example/slow").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut read = 0;
    while let Some(data) = body.data().await {
        let data = data.expect("the slow body arrives whole");
        read += data.len();
        let _ = body.flow_control().release_capacity(data.len());
    }
    assert_eq!(read, 3_000);

    // On the same connection, a response the client stops reading after its first window.
    let request = Request::get("http://limits.example/big").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    let mut read = 0;
    while let Ok(Some(Ok(data))) =
        tokio::time::timeout(Duration::from_millis(300), body.data()).await
    {
        read += data.len();
    }
    assert!(read > 0 && read < 4 << 20, "{read}");
    assert_eq!(in_flight(stuck), 1);
    let started = Instant::now();
    assert!(
        ping_until_closed(&mut ping, Duration::from_secs(6)).await,
        "the connection was still open after 6 s"
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    wait_until("the stuck request is let go", || in_flight(stuck) == 0).await;
    let _ = connection.await;
}

/// An HTTP/2 client that reads a long response steadily, opening its window as it goes, keeps its
/// connection past `timeouts.idle`, though its stream often waits on it for a moment.
#[tokio::test]
async fn a_steady_http2_reader_keeps_its_connection() {
    let backend = sized_backend(64 << 20, 1, Duration::ZERO).await;
    let tail = "[timeouts]\nidle = \"1s\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (client, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = Request::get("http://limits.example/big").body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let mut body = response.await.unwrap().into_body();
    // About 1 MB/s for 3 s, three times `idle`.
    let started = Instant::now();
    let mut read = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let data = tokio::time::timeout(Duration::from_secs(2), body.data())
            .await
            .expect("data keeps coming")
            .expect("the stream is open")
            .unwrap_or_else(|e| panic!("after {:?}, {read} bytes: {e}", started.elapsed()));
        read += data.len();
        let _ = body.flow_control().release_capacity(data.len());
        tokio::time::sleep(Duration::from_millis(data.len() as u64 / 1_000)).await;
    }
    assert!(read > 1 << 20, "{read}");
}
