//! Request smuggling: every request whose framing could be read two ways gets `400` and a closed
//! connection, and the backend sees nothing of it — in particular not the request hidden after
//! it. What is forwarded always carries exactly one framing, chosen by switchyard.
//!
//! Each case says who refuses it: hyper's parser (an empty `400`), or switchyard's head check
//! below hyper (`src/server/framing.rs`) and request path (a `400` with `bad request`).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A pipelined request hidden after the ambiguous one: the backend must never see it.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";

/// Who answers a refused request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum By {
    /// hyper's parser: an empty body.
    Hyper,
    /// switchyard: a short plain-text body.
    Switchyard,
}

/// Sends `request` (with [`SMUGGLED`] after it) on a new connection and asserts a `400` from
/// `by`, a closed connection, and that `backend` read no request head at all.
async fn assert_refused(
    proxy: std::net::SocketAddr,
    backend: &WireBackend,
    name: &str,
    request: &str,
    by: By,
) {
    let (answer, closed) =
        raw_exchange_closed(proxy, format!("{request}{SMUGGLED}").as_bytes()).await;
    assert_eq!(status_of(&answer), 400, "{name}: {answer}");
    assert!(closed, "{name}: the connection stayed open");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{name}: {answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let expected = match by {
        By::Hyper => "",
        By::Switchyard => "bad request\n",
    };
    assert_eq!(body, expected, "{name}: answered by {by:?}?");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(backend.heads().is_empty(), "{name}: {:?}", backend.heads());
}

#[tokio::test]
async fn ambiguous_framing_is_400_closed_and_never_reaches_the_backend() {
    let backend = wire_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let post = "POST / HTTP/1.1\r\nhost: a\r\n";
    let cases = [
        // Content-Length and Transfer-Encoding, in both orders (CL.TE and TE.CL).
        (
            "CL then TE",
            format!("{post}content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "TE then CL",
            format!("{post}transfer-encoding: chunked\r\ncontent-length: 30\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        // Content-Length repeated, with different values or the same one, or not a number.
        (
            "two lengths",
            format!("{post}content-length: 5\r\ncontent-length: 6\r\n\r\nhello "),
            By::Switchyard,
        ),
        (
            "the same length twice",
            format!("{post}content-length: 5\r\ncontent-length: 5\r\n\r\nhello"),
            By::Switchyard,
        ),
        (
            "a length list",
            format!("{post}content-length: 5, 5\r\n\r\nhello"),
            By::Switchyard,
        ),
        (
            "a signed length",
            format!("{post}content-length: +5\r\n\r\nhello"),
            By::Switchyard,
        ),
        // Transfer-Encoding obfuscated: case, a tab, a second coding, a second line, a list, an
        // HTTP/1.0 request, a near miss.
        (
            "Chunked",
            format!("{post}transfer-encoding: Chunked\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "CHUNKED",
            format!("{post}transfer-encoding: CHUNKED\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "a tab before chunked",
            format!("{post}transfer-encoding:\tchunked\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "gzip, chunked",
            format!("{post}transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "chunked, chunked",
            format!("{post}transfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "two Transfer-Encoding lines",
            format!(
                "{post}transfer-encoding: identity\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            By::Switchyard,
        ),
        (
            "chunked then identity",
            format!("{post}transfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "xchunked",
            format!("{post}transfer-encoding: xchunked\r\n\r\n0\r\n\r\n"),
            By::Switchyard,
        ),
        (
            "chunked in HTTP/1.0",
            "POST / HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
            By::Switchyard,
        ),
        // Line folding (obs-fold), also to hide a Transfer-Encoding.
        (
            "obs-fold",
            "GET / HTTP/1.1\r\nhost: a\r\nx-a: 1\r\n  folded\r\n\r\n".to_owned(),
            By::Hyper,
        ),
        (
            "Transfer-Encoding folded",
            format!("{post}x-a: 1\r\n transfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
            By::Hyper,
        ),
        // Bare LF line endings, everywhere or on one line; a bare CR.
        (
            "bare LF",
            "GET / HTTP/1.1\nhost: a\n\n".to_owned(),
            By::Switchyard,
        ),
        (
            "one bare LF",
            "GET / HTTP/1.1\r\nhost: a\nx-a: 1\r\n\r\n".to_owned(),
            By::Switchyard,
        ),
        (
            "bare LF ending the head",
            format!("{post}content-length: 0\r\n\n"),
            By::Switchyard,
        ),
        (
            "bare CR",
            "GET / HTTP/1.1\r\nhost: a\rx-a: 1\r\n\r\n".to_owned(),
            By::Switchyard,
        ),
        // A space (or tab) before the colon.
        (
            "space before colon",
            "GET / HTTP/1.1\r\nhost : a\r\n\r\n".to_owned(),
            By::Hyper,
        ),
        (
            "Transfer-Encoding with a space before the colon",
            format!("{post}transfer-encoding : chunked\r\n\r\n0\r\n\r\n"),
            By::Hyper,
        ),
        (
            "tab before colon",
            format!("{post}content-length\t: 0\r\n\r\n"),
            By::Hyper,
        ),
    ];
    for (name, request, by) in &cases {
        assert_refused(proxy, &backend, name, request, *by).await;
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// A chunked body whose framing breaks: the backend may have had the head already (bodies are
/// streamed, not buffered), but never gets a whole request, nor the one hidden after it; the
/// client gets `400` and a closed connection.
#[tokio::test]
async fn invalid_chunk_sizes_are_400_and_the_backend_gets_no_whole_request() {
    let backend = wire_backend().await;
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let post = "POST /up HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n";
    let cases = [
        ("negative", "-1\r\n\r\n"),
        ("hex prefix", "0x5\r\nhello\r\n0\r\n\r\n"),
        ("overflow", "1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("empty size", "\r\nhello\r\n0\r\n\r\n"),
        ("a digit after a space", "5 5\r\nhello\r\n0\r\n\r\n"),
        ("second chunk not hex", "5\r\nhello\r\nzz\r\n0\r\n\r\n"),
        ("data longer than its size", "5\r\nhello!\r\n0\r\n\r\n"),
        ("bare LF after the size", "5\nhello\r\n0\r\n\r\n"),
    ];
    for (i, (name, body)) in cases.iter().enumerate() {
        let (answer, closed) =
            raw_exchange_closed(proxy, format!("{post}{body}{SMUGGLED}").as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{name}: {answer}");
        assert!(answer.ends_with("bad request\n"), "{name}: {answer}");
        assert!(closed, "{name}: the connection stayed open");
        // The head may or may not have left before the body failed (hyper writes it with the
        // first chunk); the hidden request never does.
        tokio::time::sleep(Duration::from_millis(30)).await;
        let heads = backend.heads();
        assert!(heads.len() <= i + 1, "{name}: {heads:?}");
        assert!(
            heads.iter().all(|h| h == "POST /up HTTP/1.1"),
            "{name}: {heads:?}"
        );
        assert!(
            backend.requests().is_empty(),
            "{name}: {:?}",
            backend.requests()
        );
    }
    // The client's broken body says nothing about the backend.
    let state = server.shared().registry.get(backend.addr).unwrap();
    assert_eq!(state.health.consecutive_failures(), 0);
}

/// Reads from `stream` until `n` complete responses (each `content-length: 2`) have arrived.
async fn read_responses(stream: &mut TcpStream, n: usize) -> String {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while String::from_utf8_lossy(&answer)
            .matches("\r\n\r\nok")
            .count()
            < n
        {
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(
                read > 0,
                "closed after {}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&chunk[..read]);
        }
    })
    .await
    .expect("the responses arrive within 5s");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Pipelined requests with a Content-Length body, a chunked body (with an extension and a
/// trailer) and no body, written a few bytes at a time: each reaches the backend whole, with
/// exactly one framing — the client's Content-Length, switchyard's own chunked, or none.
#[tokio::test]
async fn forwarded_requests_carry_exactly_one_framing() {
    let backend = wire_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let pipelined = "POST /length HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
        POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n\
        GET /none HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    for piece in pipelined.as_bytes().chunks(7) {
        stream.write_all(piece).await.unwrap();
        stream.flush().await.unwrap();
    }
    let answer = read_responses(&mut stream, 3).await;
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 3, "{answer}");
    let seen = backend.requests();
    let lines: Vec<&str> = seen.iter().map(|s| s.request_line()).collect();
    assert_eq!(
        lines,
        [
            "POST /length HTTP/1.1",
            "POST /chunked HTTP/1.1",
            "GET /none HTTP/1.1"
        ]
    );
    let by_path = |path: &str| {
        seen.iter()
            .find(|s| s.request_line().contains(path))
            .unwrap_or_else(|| panic!("{path} not seen: {lines:?}"))
            .clone()
    };
    let length = by_path("/length");
    assert_eq!(length.header("content-length"), ["5"]);
    assert!(length.header("transfer-encoding").is_empty());
    assert_eq!(length.body, b"hello");
    let chunked = by_path("/chunked");
    assert_eq!(chunked.header("transfer-encoding"), ["chunked"]);
    assert!(chunked.header("content-length").is_empty());
    assert!(chunked.chunked);
    assert_eq!(chunked.body, b"hello0123456789");
    let none = by_path("/none");
    assert!(none.header("content-length").is_empty());
    assert!(none.header("transfer-encoding").is_empty());
    assert!(none.body.is_empty());
    assert_eq!(seen.len(), 3);
}

/// An HTTP/2 request's body reaches an HTTP/1.1 backend with one framing as well: its
/// content-length when it had one, chunked when it had none.
#[tokio::test]
async fn http2_bodies_are_framed_once_for_the_backend() {
    let backend = wire_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let sized = Request::post("http://a/sized")
        .body(Full::new(Bytes::from_static(b"hello")).boxed())
        .unwrap();
    let response = h2.send_request(sized).await.unwrap();
    assert_eq!(response.status(), 200);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let streamed = Request::post("http://a/streamed")
        .body(ChannelBody(rx).map_err(|never| match never {}).boxed())
        .unwrap();
    tx.send(Bytes::from_static(b"hel")).await.unwrap();
    tx.send(Bytes::from_static(b"lo")).await.unwrap();
    drop(tx);
    let response = h2.send_request(streamed).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = backend.requests();
    let sized = seen
        .iter()
        .find(|s| s.request_line() == "POST /sized HTTP/1.1");
    let sized = sized.expect("the sized request arrived");
    assert_eq!(sized.header("content-length"), ["5"]);
    assert!(sized.header("transfer-encoding").is_empty());
    let streamed = seen
        .iter()
        .find(|s| s.request_line() == "POST /streamed HTTP/1.1");
    let streamed = streamed.expect("the streamed request arrived");
    assert_eq!(streamed.header("transfer-encoding"), ["chunked"]);
    assert!(streamed.header("content-length").is_empty());
    assert_eq!(streamed.body, b"hello");
}

/// A request that asks to switch protocols, answered without a switch, leaves the connection an
/// HTTP/1.1 one whose next heads are checked like any other.
#[tokio::test]
async fn after_a_declined_upgrade_the_next_head_is_still_checked() {
    let backend = wire_backend().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(backend.addr, 1)], "")).await;
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let upgrade = "GET /up HTTP/1.1\r\nhost: a\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n";
    stream.write_all(upgrade.as_bytes()).await.unwrap();
    let answer = read_responses(&mut stream, 1).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let ambiguous = format!(
        "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
    );
    stream.write_all(ambiguous.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("answered and closed")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(status_of(&rest), 400, "{rest}");
    assert!(rest.ends_with("bad request\n"), "{rest}");
    assert_eq!(backend.heads(), ["GET /up HTTP/1.1"]);
}
