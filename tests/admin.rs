//! The admin listener's access control and status page: with `[admin] token`, every endpoint
//! answers 401 (with `WWW-Authenticate: Bearer`) unless the request carries the token as a Bearer
//! token; the status page's HTML is served to anyone and holds no data; and the config rejects a
//! token that is short, given twice, or missing from the environment, naming the key.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use support::*;
use switchyard::config::Config;
use switchyard::server::Server;

const TOKEN: &str = "admin-token-0123456789abcdef";

/// Pool `app` of `addrs` with an admin listener, protected by `admin_extra` (e.g. `token = …`).
fn admin_config(addrs: &[(SocketAddr, u32)], admin_extra: &str) -> String {
    one_pool(
        "round_robin",
        addrs,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n{admin_extra}\n"),
    )
}

/// A proxy started from a file in `dir`, so that `POST /reload` has a file to read.
async fn start(dir: &Path, text: &str) -> (Arc<Server>, SocketAddr, PathBuf) {
    let path = write_config(dir, "proxy.toml", text);
    let server = Server::start(Config::load(&path).unwrap()).await.unwrap();
    let admin = server.admin_addr().expect("admin listener configured");
    (server, admin, path)
}

/// Sends `method path` to the admin listener with an optional `Authorization` value.
async fn admin(addr: SocketAddr, method: &str, path: &str, authorization: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = authorization
        .map(|value| ("authorization", value))
        .into_iter()
        .collect();
    send(&client(), addr, method, path, &headers, Bytes::new()).await
}

/// The state `/status` reports for `backend` of pool `app`, asked with the right token.
async fn backend_state(addr: SocketAddr, backend: SocketAddr) -> String {
    let bearer = format!("Bearer {TOKEN}");
    let reply = admin(addr, "GET", "/status", Some(&bearer)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let status: Value = serde_json::from_str(&reply.body).unwrap();
    status["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == backend.to_string())
        .map(|b| b["state"].as_str().unwrap().to_owned())
        .expect("backend listed")
}

#[tokio::test]
async fn every_endpoint_needs_the_token() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr, _) = start(
        dir.path(),
        &admin_config(&weight_one(&apps), &format!("token = \"{TOKEN}\"")),
    )
    .await;
    let backend = apps[0].addr();
    let drain = format!("/pools/app/backends/{backend}/drain?wait=5s");
    let undrain = format!("/pools/app/backends/{backend}/undrain");
    let endpoints = [
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("POST", "/reload"),
        ("POST", drain.as_str()),
        ("POST", undrain.as_str()),
        // Neither an unknown path nor a wrong method tells a stranger anything.
        ("GET", "/no-such-endpoint"),
        ("GET", "/reload"),
    ];
    // Same length as the token and only the last byte differs: the closest wrong guess.
    let mut wrong = TOKEN.to_owned();
    wrong.pop();
    wrong.push('!');
    let refused = [
        None,
        Some(format!("Bearer {wrong}")),
        Some(format!("Bearer {TOKEN}x")),
        Some("Bearer ".to_owned()),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_owned()),
    ];
    for (method, path) in endpoints {
        for authorization in &refused {
            let reply = admin(addr, method, path, authorization.as_deref()).await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {authorization:?}: {}",
                reply.body
            );
            let challenge = reply.headers.get("www-authenticate").unwrap();
            assert!(
                challenge.to_str().unwrap().starts_with("Bearer"),
                "{challenge:?}"
            );
            assert!(!reply.body.contains(&backend.to_string()), "{}", reply.body);
        }
    }
    // The refused drains changed nothing.
    assert_eq!(backend_state(addr, backend).await, "active");

    let bearer = format!("Bearer {TOKEN}");
    for (method, path) in &endpoints[..5] {
        let reply = admin(addr, method, path, Some(&bearer)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {path}: {}",
            reply.body
        );
    }
    // The drain and undrain above did happen, in that order.
    assert_eq!(backend_state(addr, backend).await, "active");
    let reply = admin(addr, "POST", &drain, Some(&bearer)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(backend_state(addr, backend).await, "drained");

    // The scheme is case-insensitive (RFC 9110); the token is not.
    let lower = format!("bearer {TOKEN}");
    let reply = admin(addr, "GET", "/status", Some(&lower)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let upper = format!("Bearer {}", TOKEN.to_uppercase());
    let reply = admin(addr, "GET", "/status", Some(&upper)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn status_page_is_served_without_the_token_and_holds_no_data() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr, _) = start(
        dir.path(),
        &admin_config(&weight_one(&apps), &format!("token = \"{TOKEN}\"")),
    )
    .await;
    let reply = admin(addr, "GET", "/", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/html; charset=utf-8");
    let csp = reply.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(reply.body.contains("fetch(\"/status\""), "polls /status");
    assert!(
        reply.body.contains("token="),
        "reads the token from the fragment"
    );
    assert!(!reply.body.contains(&apps[0].addr().to_string()));
    assert!(!reply.body.contains(TOKEN));
    // No external assets: nothing is loaded from another origin.
    for external in ["src=", "href=", "@import", "url("] {
        assert!(!reply.body.contains(external), "page contains {external}");
    }
    // Only GET; the page is not a way around the token for anything else.
    let reply = admin(addr, "POST", "/", None).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn without_a_token_the_admin_api_is_open() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr, _) = start(dir.path(), &admin_config(&weight_one(&apps), "")).await;
    for path in ["/", "/status", "/metrics"] {
        let reply = admin(addr, "GET", path, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    // A stray Authorization header is not a reason to refuse.
    let reply = admin(addr, "GET", "/status", Some("Bearer whatever")).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn a_reload_changes_the_token_for_the_next_request() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let addrs = weight_one(&apps);
    let (_server, addr, path) = start(
        dir.path(),
        &admin_config(&addrs, &format!("token = \"{TOKEN}\"")),
    )
    .await;
    let new_token = "rotated-token-fedcba9876543210";
    std::fs::write(
        &path,
        admin_config(&addrs, &format!("token = \"{new_token}\"")),
    )
    .unwrap();
    let old = format!("Bearer {TOKEN}");
    let new = format!("Bearer {new_token}");
    let reply = admin(addr, "POST", "/reload", Some(&old)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let reply = admin(addr, "GET", "/status", Some(&old)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = admin(addr, "GET", "/status", Some(&new)).await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// The errors `text` is rejected with.
fn rejected(text: &str) -> Vec<(String, String)> {
    Config::from_str(text, Path::new("proxy.toml"))
        .expect_err("the config should be rejected")
        .0
        .into_iter()
        .map(|e| (e.key, e.message))
        .collect()
}

#[tokio::test]
async fn config_rejects_bad_tokens_naming_the_key() {
    let addrs = [("127.0.0.1:9001".parse().unwrap(), 1)];
    let errors = rejected(&admin_config(&addrs, "token = \"too-short\""));
    assert_eq!(
        errors,
        [(
            "admin.token".to_owned(),
            "token is 9 bytes; it must be at least 16".to_owned()
        )]
    );

    let errors = rejected(&admin_config(
        &addrs,
        &format!("token = \"{TOKEN}\"\ntoken_env = \"SWITCHYARD_ADMIN_TOKEN\""),
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "admin.token_env");
    assert!(errors[0].1.contains("both set"), "{errors:?}");

    // A name no environment sets: the test never mutates the process environment.
    let unset = "SWITCHYARD_TEST_NEVER_SET_ADMIN_TOKEN";
    let errors = rejected(&admin_config(&addrs, &format!("token_env = \"{unset}\"")));
    assert_eq!(
        errors,
        [(
            "admin.token_env".to_owned(),
            format!("environment variable `{unset}` is unset or empty")
        )]
    );
}

#[test]
fn token_env_is_read_by_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = [("127.0.0.1:9001".parse().unwrap(), 1)];
    let path = write_config(
        dir.path(),
        "proxy.toml",
        &admin_config(&addrs, "token_env = \"SWITCHYARD_ADMIN_TOKEN\""),
    );
    let check = |value: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .args(["check", "--config"])
            .arg(&path)
            .env("NO_COLOR", "1")
            .env_remove("SWITCHYARD_ADMIN_TOKEN");
        if let Some(value) = value {
            command.env("SWITCHYARD_ADMIN_TOKEN", value);
        }
        let output = command.output().expect("switchyard binary runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, output) = check(Some(TOKEN));
    assert_eq!(code, Some(0), "{output}");
    for value in [None, Some(""), Some("short")] {
        let (code, output) = check(value);
        assert_eq!(code, Some(1), "{value:?}: {output}");
        assert!(
            output.contains(": admin.token_env: "),
            "{value:?}: {output}"
        );
        assert!(
            !output.contains("short"),
            "a token is never echoed: {output}"
        );
    }
}
