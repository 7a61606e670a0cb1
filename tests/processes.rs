//! The `switchyard` binary as a process: signals and exit codes.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;

#[tokio::test]
async fn sigterm_lets_the_in_flight_request_finish_and_exits_0() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "proxy.toml",
        &one_pool("round_robin", &weight_one(&apps), ""),
    );
    let mut process = ProxyProcess::start(&path);
    let addr = process.addr;
    let request = tokio::spawn(async move {
        send(&client(), addr, "GET", "/sleep/1000", &[], Bytes::new()).await
    });
    wait_until("the request reaches the backend", || {
        apps[0].in_flight() == 1
    })
    .await;

    process.signal("TERM");
    let reply = request.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "app1 visits=1\n");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running after SIGTERM:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", process.log());
    assert!(process.log().contains("shutting down"));
}

/// SIGINT too stops the proxy, and `timeouts.shutdown` bounds the wait for a request that would take
/// longer: the process exits 0 soon after the limit instead of waiting 10s for the backend.
#[tokio::test]
async fn sigint_with_a_long_request_exits_after_the_shutdown_limit() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let tail = "[timeouts]\nshutdown = \"500ms\"\n";
    let path = write_config(
        dir.path(),
        "proxy.toml",
        &one_pool("round_robin", &weight_one(&apps), tail),
    );
    let mut process = ProxyProcess::start(&path);
    let addr = process.addr;
    let _request = tokio::spawn(async move {
        let client = client();
        let request = http::Request::get(format!("http://{addr}/sleep/10000"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        // The connection is cut at the shutdown limit; the outcome is not what is tested here.
        let _ = client.request(request).await;
    });
    wait_until("the request reaches the backend", || {
        apps[0].in_flight() == 1
    })
    .await;
    let signalled = std::time::Instant::now();
    process.signal("INT");
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "still running 5s after SIGINT with shutdown = 500ms:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        signalled.elapsed() >= Duration::from_millis(400),
        "did not wait for the request"
    );
    assert_eq!(status.code(), Some(0), "{}", process.log());
    assert!(
        process.log().contains("shutdown timeout reached"),
        "{}",
        process.log()
    );
}

/// `log_format = "json"`: one JSON object per access-log line, with the fields operators query.
#[tokio::test]
async fn json_access_log_has_one_object_per_request() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "log_format = \"json\"\n{}",
        one_pool("round_robin", &weight_one(&apps), "")
    );
    let path = write_config(dir.path(), "proxy.toml", &text);
    let process = ProxyProcess::start(&path);
    let reply = get(process.addr, "/", &[]).await;
    assert_eq!(reply.status, 200);
    let mut line = None;
    for _ in 0..100 {
        line = process
            .log()
            .lines()
            .find(|l| l.contains("switchyard::access"))
            .map(str::to_owned);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = line.expect("an access-log line");
    let entry: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/");
    assert_eq!(entry["pool"], "app");
    assert_eq!(entry["backend"], apps[0].addr().to_string());
    assert_eq!(entry["bytes"], reply.body.len());
    assert!(entry["timestamp"].is_string() && entry["client"].is_string());
    assert!(entry["duration_ms"].as_f64().is_some_and(|d| d > 0.0));
}

/// `[runtime] workers = 1` runs everything on one thread: requests, a reload by SIGHUP, health checks
/// and a graceful stop all still work.
#[tokio::test]
async fn one_worker_serves_reloads_checks_and_stops() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let checks = "[pools.app.health]\npath = \"/status/200\"\ninterval = \"50ms\"\n";
    let config = |n: usize| {
        one_pool("round_robin", &weight_one(&apps[..n]), checks)
            .replace("[[listeners]]", "[runtime]\nworkers = 1\n\n[[listeners]]")
    };
    let path = write_config(dir.path(), "proxy.toml", &config(1));
    let mut process = ProxyProcess::start(&path);
    assert_eq!(get(process.addr, "/", &[]).await.backend(), "app1");

    write_config(dir.path(), "proxy.toml", &config(2));
    process.signal("HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen: Vec<String> =
            futures_util::future::join_all((0..4).map(|_| get(process.addr, "/", &[])))
                .await
                .iter()
                .map(|r| r.backend())
                .collect();
        if seen.iter().any(|b| b == "app2") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "app2 never served:\n{}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The file watcher may have reloaded first; the signal must have been handled all the same.
    wait_until("SIGHUP handled", || {
        process.log().contains("SIGHUP: reloading")
    })
    .await;
    // The health checker runs on the same thread as everything else: with no traffic, app2 still
    // gets its checks every 50ms.
    let before = apps[1].requests();
    wait_until("checks reaching app2", || apps[1].requests() >= before + 3).await;

    process.signal("TERM");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", process.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", process.log());
}
