//! What the client gets when a request cannot be proxied: 404, 502, 503 and 504.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn no_matching_route_is_404() {
    let apps = apps(1).await;
    let text = format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
host = "only.example"
pool = "app"

[pools.app]
strategy = "round_robin"
backends = {}
"#,
        backends(&weight_one(&apps))
    );
    let (_server, proxy) = proxy(&text).await;

    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, "no route\n");
    assert_eq!(apps[0].requests(), 0);

    // The route itself works, with or without a port in Host.
    for host in ["only.example", "ONLY.example:8080"] {
        let reply = get(proxy, "/", &[("host", host)]).await;
        assert_eq!(reply.status, 200, "{host}");
        assert_eq!(reply.backend(), "app1");
    }
}

/// A refused connection is a 502 even when the pool has no other backend to retry on.
#[tokio::test]
async fn single_dead_backend_is_502() {
    let dead = dead_addr().await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(dead, 1)], "")).await;
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.body, "backend unreachable\n");
}

/// With every backend of the pool out of rotation (drained at runtime), the answer is 503 with
/// `Retry-After`, at once.
#[tokio::test]
async fn no_available_backend_is_503_with_retry_after() {
    let apps = apps(1).await;
    let tail = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &[(apps[0].addr(), 1)], tail)).await;
    let admin = server.admin_addr().unwrap();
    let path = format!("/pools/app/backends/{}/drain?wait=5s", apps[0].addr());
    let drained = send(&client(), admin, "POST", &path, &[], bytes::Bytes::new()).await;
    assert_eq!(drained.status, 200, "{}", drained.body);
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.body, "no backend available\n");
    assert_eq!(apps[0].requests(), 0);
}

#[tokio::test]
async fn refused_connections_on_every_attempt_are_502() {
    let (a, b) = (dead_addr().await, dead_addr().await);
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(a, 1), (b, 1)], "")).await;
    for _ in 0..4 {
        let reply = get(proxy, "/", &[]).await;
        assert_eq!(reply.status, 502);
        assert_eq!(reply.body, "backend unreachable\n");
        assert!(!reply.headers.contains_key("retry-after"));
    }
}

#[tokio::test]
async fn a_dead_backend_is_retried_on_a_live_one() {
    let apps = apps(1).await;
    let dead = dead_addr().await;
    for strategy in ["round_robin", "least_connections", "cookie"] {
        let (_server, proxy) =
            proxy(&one_pool(strategy, &[(dead, 1), (apps[0].addr(), 1)], "")).await;
        for i in 0..10 {
            let reply = get(proxy, "/", &[]).await;
            assert_eq!(reply.status, 200, "{strategy} request {i}");
            assert_eq!(reply.backend(), "app1");
        }
    }
    assert_eq!(apps[0].requests(), 30);
}

#[tokio::test]
async fn no_response_headers_in_time_is_504() {
    let (hole, _task) = black_hole().await;
    let text = one_pool(
        "round_robin",
        &[(hole, 1)],
        "[timeouts]\nresponse_header = \"300ms\"\n",
    );
    let (_server, proxy) = proxy(&text).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), get(proxy, "/", &[]))
        .await
        .expect("the timeout answers within seconds, not the client's 30s");
    assert_eq!(reply.status, 504);
    assert_eq!(reply.body, "backend timed out\n");
}
