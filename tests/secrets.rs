//! The cookie secret and the admin token never appear in logs (even at `RUST_LOG=debug`),
//! `/status`, `/metrics`, reload answers or config errors; `secret = "generate"` says what it
//! costs, and keeps its key across reloads that still ask for it.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;

/// Recognisable in any output; long enough to be valid.
const COOKIE_SECRET: &str = "cookie-secret-SENTINEL-4f1a";
const ADMIN_TOKEN: &str = "admin-token-SENTINEL-9c2e";
const SENTINEL: &str = "SENTINEL";

fn config_text(apps: &[std::net::SocketAddr], secret: &str, extra: &str) -> String {
    let backends: Vec<String> = apps
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "cookie"
backends = [{}]
{extra}

[pools.app.cookie]
name = "sy"
secret = {secret}
"#,
        backends.join(", ")
    )
}

/// An admin request with the token.
async fn admin(addr: std::net::SocketAddr, method: &str, path: &str) -> Reply {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    send(
        &client(),
        addr,
        method,
        path,
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await
}

#[tokio::test]
async fn secrets_never_appear_in_logs_status_metrics_or_errors() {
    let apps = apps(2).await;
    let addrs: Vec<_> = apps.iter().map(|a| a.addr()).collect();
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("\"{COOKIE_SECRET}\"");
    let path = write_config(dir.path(), "proxy.toml", &config_text(&addrs, &secret, ""));
    let process = ProxyProcess::start_logging(&path, "debug");
    let (proxy, admin_addr) = (process.addr, process.admin_addr());

    // Requests: a new client, a returning one, a forged cookie.
    let first = get(proxy, "/", &[]).await;
    assert_eq!(first.status, 200);
    let cookie = format!("sy={}", first.cookie("sy").expect("a cookie"));
    assert_eq!(get(proxy, "/", &[("cookie", &cookie)]).await.status, 200);
    assert_eq!(
        get(proxy, "/", &[("cookie", "sy=forged")]).await.status,
        200
    );
    let mut answers = Vec::new();
    // A refused request carrying the token: logged at debug level, without its headers.
    let refused =
        format!("GET / HTTP/1.1\r\nhost : a\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n");
    answers.push(raw_exchange(proxy, refused.as_bytes()).await);
    // The admin API: status, metrics, a reload by POST and one by SIGHUP.
    for (method, path) in [("GET", "/status"), ("GET", "/metrics")] {
        let reply = admin(admin_addr, method, path).await;
        assert_eq!(reply.status, 200, "{path}");
        answers.push(reply.body);
    }
    write_config(
        dir.path(),
        "proxy.toml",
        &config_text(&addrs, &secret, "retries = 2"),
    );
    let reloaded = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    answers.push(reloaded.body);
    process.signal("HUP");
    wait_until("SIGHUP handled", || {
        process.log().contains("SIGHUP: reloading")
    })
    .await;
    // A reload that fails next to the secrets: its errors name keys, never values.
    let broken = config_text(&addrs, &secret, "drain_timeout = \"soon\"")
        .replace(ADMIN_TOKEN, "short-SENTINEL");
    write_config(dir.path(), "proxy.toml", &broken);
    let refused = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.body.contains("admin.token"), "{}", refused.body);
    answers.push(refused.body);
    let check = run_check(&path);
    assert!(!check.status.success());
    answers.push(String::from_utf8_lossy(&check.stdout).into_owned());
    answers.push(String::from_utf8_lossy(&check.stderr).into_owned());
    // Unauthorised admin requests and their answers.
    let denied = get(
        admin_addr,
        "/status",
        &[("authorization", "Bearer SENTINEL-guess")],
    )
    .await;
    assert_eq!(denied.status, 401);
    answers.push(denied.body);

    wait_until("both reloads logged", || {
        process.log().matches("config reload").count() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = process.log();
    assert!(log.contains("DEBUG"), "the log is at debug level:\n{log}");
    // Neither secret, nor the rejected token, nor a guessed one, anywhere.
    for (i, text) in answers.iter().chain(std::iter::once(&log)).enumerate() {
        assert!(
            !text.contains(SENTINEL),
            "output {i} holds a secret:\n{text}"
        );
    }
}

/// `check` refuses a cookie pool without a secret, saying how to ask for a generated one.
#[test]
fn a_cookie_pool_without_a_secret_is_an_error_that_mentions_generate() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        config_text(&["127.0.0.1:9".parse().unwrap()], "\"x\"", "").replace("secret = \"x\"\n", "");
    let path = write_config(dir.path(), "proxy.toml", &text);
    let output = run_check(&path);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pools.app.cookie.secret: a secret is required")
            && stderr.contains("secret = \"generate\""),
        "{stderr}"
    );
}

fn warnings(log: &str) -> usize {
    log.matches("cookie secret generated at random").count()
}

#[tokio::test]
async fn a_generated_secret_warns_and_survives_reloads_that_keep_asking_for_it() {
    let apps = apps(2).await;
    let addrs: Vec<_> = apps.iter().map(|a| a.addr()).collect();
    let dir = tempfile::tempdir().unwrap();
    let generate = config_text(&addrs, "\"generate\"", "");
    let path = write_config(dir.path(), "proxy.toml", &generate);
    let process = ProxyProcess::start(&path);
    let (proxy, admin_addr) = (process.addr, process.admin_addr());
    assert_eq!(warnings(&process.log()), 1, "{}", process.log());
    assert!(process.log().contains("will not survive a restart"));
    let first = get(proxy, "/", &[]).await;
    let cookie = format!("sy={}", first.cookie("sy").expect("a cookie"));

    // A reload that still says "generate" keeps the key: the cookie still pins, unchanged.
    write_config(
        dir.path(),
        "proxy.toml",
        &config_text(&addrs, "\"generate\"", "retries = 0"),
    );
    let reloaded = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    for _ in 0..5 {
        let again = get(proxy, "/", &[("cookie", &cookie)]).await;
        assert_eq!(again.backend(), first.backend());
        assert!(again.cookie("sy").is_none(), "the cookie was replaced");
    }
    assert_eq!(warnings(&process.log()), 1);

    // A literal secret replaces it (the cookie is re-issued); going back draws a new key, and
    // says so again.
    write_config(
        dir.path(),
        "proxy.toml",
        &config_text(&addrs, &format!("\"{COOKIE_SECRET}\""), ""),
    );
    assert_eq!(admin(admin_addr, "POST", "/reload").await.status, 200);
    assert!(get(proxy, "/", &[("cookie", &cookie)])
        .await
        .cookie("sy")
        .is_some());
    write_config(dir.path(), "proxy.toml", &generate);
    assert_eq!(admin(admin_addr, "POST", "/reload").await.status, 200);
    wait_until("warned again", || warnings(&process.log()) == 2).await;
    assert!(get(proxy, "/", &[("cookie", &cookie)])
        .await
        .cookie("sy")
        .is_some());
}
