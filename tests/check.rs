//! `switchyard check`: exit 0 for a valid config, exit 1 with `FILE:LINE:COL: KEY: MESSAGE` for each
//! problem.

mod support;

use std::path::Path;

use support::*;

const VALID: &str = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[[routes]]
pool = "app"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#;

/// Runs `check` on `text` and returns its stderr, asserting exit code 1.
fn rejected(text: &str) -> (String, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "bad.toml", text);
    let output = run_check(&path);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(output.stdout.is_empty());
    (stderr, path)
}

/// `line:column` (1-based) of the first occurrence of `needle` in `text`.
fn position(text: &str, needle: &str) -> String {
    let offset = text.find(needle).unwrap();
    let line = text[..offset].matches('\n').count() + 1;
    let column = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{line}:{column}")
}

#[test]
fn accepts_the_repository_proxy_toml() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let output = run_check(&path);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8(output.stdout)
        .unwrap()
        .ends_with(": ok\n"));
}

#[test]
fn accepts_a_minimal_config() {
    let dir = tempfile::tempdir().unwrap();
    let output = run_check(&write_config(dir.path(), "ok.toml", VALID));
    assert_eq!(output.status.code(), Some(0));
}

#[test]
fn accepts_a_discovered_pool_without_contacting_its_source() {
    // A resolver on a port where nothing answers: `check` validates, it does not resolve.
    let text = VALID.replace(
        r#"backends = [{ address = "127.0.0.1:9001" }]"#,
        "[pools.app.discovery]\ndns = \"app.internal:8080\"\nresolver = \"127.0.0.1:9\"",
    );
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let output = run_check(&write_config(dir.path(), "ok.toml", &text));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn rejects_an_unknown_key() {
    let text = VALID.replace("strategy =", "backend_timeout = \"1s\"\nstrategy =");
    let (stderr, _) = rejected(&text);
    assert!(stderr.contains("pools.app.backend_timeout"), "{stderr}");
    assert!(stderr.contains("unknown key `backend_timeout`"), "{stderr}");
}

#[test]
fn rejects_a_pool_without_backends() {
    let text = VALID.replace(r#"[{ address = "127.0.0.1:9001" }]"#, "[]");
    let (stderr, _) = rejected(&text);
    assert!(
        stderr.contains("pools.app.backends: a pool needs at least one backend, or a [pools.app.discovery] table"),
        "{stderr}"
    );
}

#[test]
fn rejects_a_route_to_an_unknown_pool() {
    let text = VALID.replace("pool = \"app\"", "pool = \"nope\"");
    let (stderr, _) = rejected(&text);
    assert!(stderr.contains("routes[0].pool"), "{stderr}");
    assert!(stderr.contains("`nope`"), "{stderr}");
}

#[test]
fn rejects_a_duplicate_listener_address() {
    let text = format!("{VALID}\n[[listeners]]\nlisten = \"127.0.0.1:8080\"\n");
    let (stderr, _) = rejected(&text);
    assert!(stderr.contains("listeners[1].listen"), "{stderr}");
    assert!(
        stderr.contains("already used by listeners[0].listen"),
        "{stderr}"
    );
}

#[test]
fn rejects_weight_zero_with_its_place_in_the_file() {
    let text = VALID.replace(
        r#"[{ address = "127.0.0.1:9001" }]"#,
        r#"[{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 0 }]"#,
    );
    let (stderr, path) = rejected(&text);
    let expected = format!(
        "{}:{}: pools.app.backends[1].weight: weight must be at least 1",
        path.display(),
        position(&text, "0 }]")
    );
    assert_eq!(stderr.trim_end(), expected);
}

#[test]
fn rejects_an_unparsable_address() {
    let text = VALID.replace("127.0.0.1:9001", "localhost:9001");
    let (stderr, _) = rejected(&text);
    assert!(stderr.contains("pools.app.backends[0].address"), "{stderr}");
    assert!(
        stderr.contains("`localhost:9001` is not an IP:port address"),
        "{stderr}"
    );
}

#[test]
fn rejects_an_unparsable_duration() {
    let text = format!("{VALID}\n[timeouts]\nconnect = \"soon\"\n");
    let (stderr, _) = rejected(&text);
    assert!(stderr.contains("timeouts.connect"), "{stderr}");
    assert!(stderr.contains("`soon` is not a duration"), "{stderr}");
}

#[test]
fn reports_every_error_at_once() {
    let text = format!("{VALID}\n[timeouts]\nidle = \"later\"\n")
        .replace("pool = \"app\"", "pool = \"nope\"")
        .replace("127.0.0.1:9001", "nowhere");
    let (stderr, _) = rejected(&text);
    for key in [
        "routes[0].pool",
        "pools.app.backends[0].address",
        "timeouts.idle",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
}

#[test]
fn refuses_a_certificate_it_cannot_read_naming_file_line_and_key() {
    let text = VALID.replace(
        "listen = \"127.0.0.1:8080\"\n",
        "listen = \"127.0.0.1:8443\"\ntls = { cert = \"missing.crt\", key = \"missing.key\" }\n",
    );
    let (stderr, path) = rejected(&text);
    let expected = format!(
        "{}:{}: listeners[0].tls.cert: cannot read {}: ",
        path.display(),
        position(&text, "\"missing.crt\""),
        path.with_file_name("missing.crt").display()
    );
    assert!(
        stderr.starts_with(&expected),
        "{stderr}\nexpected: {expected}"
    );
}
