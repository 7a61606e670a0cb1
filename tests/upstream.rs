//! The upstream side under stress: stalled bodies, early answers to unfinished uploads, slow
//! uploads, unasked protocol switches, CONNECT, and several port-0 listeners.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use support::*;
use tokio::io::AsyncWriteExt;

/// A backend that sends headers and 5 of 100 body bytes, then nothing: the client's response is
/// cut (never looks complete) after `timeouts.idle`, and the backend's in-flight count returns to 0.
#[tokio::test]
async fn stalled_response_body_is_cut_after_idle() {
    let (backend, _task) =
        raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello").await;
    let tail = "[timeouts]\nidle = \"300ms\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &[(backend, 1)], tail)).await;
    let mut conn = h1_connection::<Empty<Bytes>>(proxy).await;
    let request = Request::get("/")
        .header("host", "stall.test")
        .body(Empty::new())
        .unwrap();
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("the stalled body ends within 5s");
    assert!(body.is_err(), "a truncated body must not look complete");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let state = server.shared().registry.get(backend).unwrap();
    wait_until("in-flight released", || state.in_flight() == 0).await;
}

/// The backend answers before reading the whole request body: that connection must not be reused,
/// or the next request would sit behind the rest of the upload.
#[tokio::test]
async fn connection_with_unfinished_upload_is_not_reused() {
    let apps = apps(1).await;
    let tail = "[timeouts]\nresponse_header = \"2s\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    // Declares 1 MB, sends 10 bytes, keeps the connection open.
    let mut client = tokio::net::TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"POST /status/200 HTTP/1.1\r\nhost: up.test\r\ncontent-length: 1000000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut answered = vec![0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut client, &mut answered),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(String::from_utf8_lossy(&answered[..n]).starts_with("HTTP/1.1 200"));
    // The next request must not be stuck behind that upload.
    for _ in 0..3 {
        let reply = tokio::time::timeout(Duration::from_secs(5), get(proxy, "/", &[]))
            .await
            .expect("not stuck");
        assert_eq!(reply.status, 200);
    }
    drop(client);
}

/// `response_header` runs from the request body's last progress: a steady upload slower than it
/// succeeds.
#[tokio::test]
async fn slow_steady_upload_is_not_a_timeout() {
    let apps = apps(1).await;
    let tail = "[timeouts]\nresponse_header = \"500ms\"\n";
    let (_server, proxy) = proxy(&one_pool("round_robin", &weight_one(&apps), tail)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut conn = h1_connection::<ChannelBody>(proxy).await;
    let request = Request::post("/echo")
        .header("host", "up.test")
        .body(ChannelBody(rx))
        .unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..6 {
            tx.send(Bytes::from(format!("part{i};"))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let response = conn.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"part0;part1;part2;part3;part4;part5;");
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
