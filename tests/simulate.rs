//! `switchyard simulate`: the binary on temporary configs, its `--json` figures against the
//! quality targets of the strategies, its plot, and its errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// A config with one pool `app` of `backends` (`(address, weight)`), `extra` inside the pool
/// table, and `tail` after it.
fn config(
    dir: &Path,
    strategy: &str,
    backends: &[(&str, u32)],
    extra: &str,
    tail: &str,
) -> PathBuf {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    let text = format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "{strategy}"
backends = [{}]
{extra}
{tail}
"#,
        list.join(", ")
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `n` backends of weight 1: 10.1.0.1:80, 10.1.0.2:80, ...
fn equal(n: usize) -> Vec<(String, u32)> {
    (1..=n).map(|i| (format!("10.1.0.{i}:80"), 1)).collect()
}

fn refs(backends: &[(String, u32)]) -> Vec<(&str, u32)> {
    backends.iter().map(|(a, w)| (a.as_str(), *w)).collect()
}

fn simulate(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("simulate")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("switchyard runs")
}

/// The `--json` report of a run that must succeed.
fn run_json(config: &Path, args: &[&str]) -> Value {
    let output = simulate(config, &[args, &["--json"]].concat());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("--json prints JSON")
}

/// The only run of a one-strategy report.
fn only_run(report: &Value) -> &Value {
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{report}");
    &runs[0]
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// The failure of a run that must fail: exit code and stderr.
fn failure(config: &Path, args: &[&str]) -> (i32, String) {
    let output = simulate(config, args);
    assert!(!output.status.success(), "succeeded: {args:?}");
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn the_same_seed_gives_the_same_figures_and_another_seed_others() {
    let dir = tempfile::tempdir().unwrap();
    let backends = equal(4);
    let path = config(
        dir.path(),
        "cookie",
        &refs(&backends),
        "",
        "[pools.app.cookie]\nsecret = \"simulate-test-secret-0123456789\"\nfallback = \"least_connections\"\n",
    );
    let args = [
        "--clients",
        "500",
        "--requests",
        "20000",
        "--event",
        "remove:10.1.0.2:80@20s",
        "--event",
        "add:10.1.0.9:80@30",
    ];
    // Wall-clock speed is the one thing that may differ.
    let figures = |seed: &str| {
        let mut report = run_json(&path, &[&args[..], &["--seed", seed]].concat());
        for run in report["runs"].as_array_mut().unwrap() {
            let run = run.as_object_mut().unwrap();
            run.remove("decisions_per_second");
            run.remove("median_decision_ns");
        }
        report
    };
    let first = figures("7");
    assert_eq!(
        first["runs"].as_array().unwrap().len(),
        4,
        "all four strategies by default"
    );
    assert_eq!(first, figures("7"));
    assert_ne!(first["runs"], figures("8")["runs"], "the seed is not used");
}

#[test]
fn round_robin_shares_are_exactly_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        "round_robin",
        &[("10.1.0.1:80", 2), ("10.1.0.2:80", 1), ("10.1.0.3:80", 1)],
        "",
        "",
    );
    let report = run_json(
        &path,
        &[
            "--strategy",
            "pool",
            "--clients",
            "400",
            "--requests",
            "4000",
        ],
    );
    let run = only_run(&report);
    assert_eq!(run["strategy"], "round_robin");
    let requests: Vec<u64> = run["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| u(&b["requests"]))
        .collect();
    assert_eq!(requests, [2000, 1000, 1000]);
    assert_eq!(f(&run["imbalance"]["requests"]), 1.0);
}

#[test]
fn ip_hash_spreads_one_hundred_thousand_clients_within_five_percent() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "ip_hash", &refs(&equal(10)), "", "");
    let report = run_json(
        &path,
        &[
            "--strategy",
            "ip_hash",
            "--uniform",
            "--clients",
            "100000",
            "--requests",
            "100000",
        ],
    );
    let run = only_run(&report);
    assert_eq!(u(&run["decisions"]), 100_000);
    let imbalance = f(&run["imbalance"]["requests"]);
    assert!(imbalance <= 1.05, "max/mean {imbalance}");
}

#[test]
fn removing_one_of_ten_moves_about_a_tenth_of_ip_hash_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "ip_hash", &refs(&equal(10)), "", "");
    let report = run_json(
        &path,
        &[
            "--strategy",
            "ip_hash",
            "--uniform",
            "--clients",
            "20000",
            "--requests",
            "200000",
            "--event",
            "remove:10.1.0.4:80@30s",
        ],
    );
    let event = &only_run(&report)["events"][0];
    assert_eq!(event["event"], "remove 10.1.0.4:80");
    assert!(u(&event["clients"]) > 1_000, "{event}");
    let moved = f(&event["moved_share"]);
    assert!((0.08..=0.12).contains(&moved), "moved {moved}: {event}");
    assert!((f(&event["ideal_share"]) - 0.1).abs() < 1e-9, "{event}");
    // Every client of the removed backend had to move.
    assert_eq!(event["broken"], event["on_leaving"], "{event}");
}

#[test]
fn cookie_clients_move_only_when_their_backend_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let cookie = "[pools.app.cookie]\nsecret = \"simulate-test-secret-0123456789\"\n";
    let args = [
        "--strategy",
        "cookie",
        "--uniform",
        "--clients",
        "4000",
        "--requests",
        "40000",
        "--event",
        "add:10.1.0.5:80@20s",
        "--event",
        "remove:10.1.0.2:80@40s",
    ];
    // drain_sticky = "move": a removal re-places the backend's clients at once.
    let path = config(
        dir.path(),
        "cookie",
        &refs(&equal(4)),
        "drain_sticky = \"move\"",
        cookie,
    );
    let report = run_json(&path, &args);
    let run = only_run(&report);
    let (added, removed) = (&run["events"][0], &run["events"][1]);
    assert!(u(&added["clients"]) > 100, "{added}");
    assert_eq!(
        u(&added["moved"]),
        0,
        "an addition moved cookie clients: {added}"
    );
    assert!(u(&removed["moved"]) > 0, "{removed}");
    assert_eq!(removed["moved"], removed["on_leaving"], "{removed}");
    assert_eq!(removed["moved"], removed["broken"], "{removed}");
    assert_eq!(u(&removed["on_purpose"]), 0, "{removed}");
    // New clients are placed evenly (round robin by default).
    let sessions = f(&run["imbalance"]["sessions"]);
    assert!(sessions <= 1.05, "sessions max/mean {sessions}");

    // drain_sticky = "keep" (the default): they stay while the removed backend drains. The drain
    // ends once nothing is in flight there, so the last few, between requests then, move.
    let path = config(
        dir.path(),
        "cookie",
        &refs(&equal(4)),
        "drain_timeout = \"1h\"",
        cookie,
    );
    let report = run_json(&path, &args);
    let removed = &only_run(&report)["events"][1];
    assert!(
        u(&removed["moved"]) * 2 < u(&removed["on_leaving"]),
        "most sticky sessions on a draining backend should end there: {removed}"
    );
    assert_eq!(removed["moved"], removed["broken"], "{removed}");
    assert_eq!(u(&removed["on_purpose"]), 0, "{removed}");
}

#[test]
fn least_connections_keeps_in_flight_within_ten_percent() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "least_connections", &refs(&equal(3)), "", "");
    for shape in [&["--uniform"][..], &[]] {
        let report = run_json(
            &path,
            &[
                &[
                    "--strategy",
                    "pool",
                    "--clients",
                    "2000",
                    "--requests",
                    "40000",
                ],
                shape,
            ]
            .concat(),
        );
        let run = only_run(&report);
        let imbalance = f(&run["imbalance"]["in_flight"]);
        assert!(
            imbalance <= 1.1,
            "{shape:?}: in-flight max/mean {imbalance}"
        );
    }
}

#[test]
fn balance_factor_keeps_every_placement_under_one_and_a_quarter_times_the_average() {
    let dir = tempfile::tempdir().unwrap();
    let plain = config(dir.path(), "ip_hash", &refs(&equal(10)), "", "");
    // Heavy-tailed sessions: a few busy clients pile onto their hashed backends.
    let args = [
        "--strategy",
        "ip_hash",
        "--clients",
        "2000",
        "--requests",
        "100000",
    ];
    let skewed = f(&only_run(&run_json(&plain, &args))["imbalance"]["in_flight"]);
    assert!(
        skewed > 1.25,
        "the workload needs a skew to bound: {skewed}"
    );

    let bounded = config(
        dir.path(),
        "ip_hash",
        &refs(&equal(10)),
        "balance_factor = 1.25",
        "",
    );
    let report = run_json(&bounded, &args);
    let run = only_run(&report);
    assert_eq!(f(&run["balance_factor"]), 1.25);
    assert_eq!(u(&run["over_bound"]), 0, "a placement went over the bound");
    let imbalance = f(&run["imbalance"]["in_flight"]);
    assert!(imbalance <= 1.25, "in-flight max/mean {imbalance}");
}

#[test]
fn svg_has_one_panel_per_strategy_and_is_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "round_robin", &refs(&equal(3)), "", "");
    let svg = dir.path().join("plot.svg");
    let output = simulate(
        &path,
        &[
            "--clients",
            "200",
            "--requests",
            "4000",
            "--event",
            "remove:10.1.0.3:80@30s",
            "--svg",
            svg.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert_balanced(&text);
    let captions: Vec<&str> = text
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>').map(|(_, rest)| rest.trim_start()))
        .collect();
    for strategy in ["round_robin", "least_connections", "ip_hash", "cookie"] {
        let panels = captions.iter().filter(|c| c.starts_with(strategy)).count();
        assert_eq!(panels, 1, "{strategy}: {panels} panel captions");
    }
    // One legend entry per backend per panel, and the event marked on each.
    assert_eq!(text.matches("10.1.0.2:80 (weight 1)").count(), 4);
    assert_eq!(text.matches("remove 10.1.0.3:80").count(), 4);
}

/// Every element opened is closed, in order.
fn assert_balanced(svg: &str) {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("an unterminated tag") + start;
        let tag = &rest[start + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name.trim()), "mismatched </{name}>");
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            open.push(tag.split_whitespace().next().unwrap());
        }
        rest = &rest[end + 1..];
    }
    assert!(open.is_empty(), "unclosed: {open:?}");
}

#[test]
fn bad_arguments_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "round_robin", &refs(&equal(3)), "", "");

    let (code, stderr) = failure(&path, &["--event", "remove:10.1.0.1@5s"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`10.1.0.1` is not an IP:port address"),
        "{stderr}"
    );
    let (code, stderr) = failure(&path, &["--event", "unplug:10.1.0.1:80@5s"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unknown event `unplug`"), "{stderr}");
    let (code, stderr) = failure(&path, &["--event", "remove:10.1.0.1:80@later"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`later` is not a time"), "{stderr}");

    let (code, stderr) = failure(&path, &["--pool", "nope"]);
    assert_eq!(code, 1);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("no pool named `nope` in the config (pools: app)"),
        "{stderr}"
    );
    let (code, stderr) = failure(&path, &["--event", "remove:10.9.9.9:80@5s"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("10.9.9.9:80 is not in pool `app`"),
        "{stderr}"
    );
    let (code, stderr) = failure(&path, &["--event", "add:10.1.0.1:80@5s"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("10.1.0.1:80 is already in pool `app`"),
        "{stderr}"
    );
    let (code, stderr) = failure(&path, &["--event", "drain:10.1.0.1:80@90s"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("after the end of the run"), "{stderr}");
    let (code, stderr) = failure(&path, &["--clients", "10", "--requests", "5"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("must be at least --clients"), "{stderr}");
}
