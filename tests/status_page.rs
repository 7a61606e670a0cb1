//! The status page in a real browser: Debian's headless Chromium loads `http://<admin>/` (with the
//! admin token in the URL fragment, as the README says to), runs the page's script against
//! `/status`, and dumps the DOM it built. Run with `cargo test --features it-chromium --test
//! status_page`; needs `/usr/bin/chromium` (`apt-get install -y chromium`), and fails without it.
#![cfg(feature = "it-chromium")]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "status-page-token-0123456789";
/// A browser that has not dumped its DOM by then is stuck, not slow.
const BROWSER_LIMIT: Duration = Duration::from_secs(90);

/// Loads `url` in a fresh headless Chromium and returns the DOM after ~3.5 s of virtual time
/// (three or four polls of `/status`).
fn dump_dom(url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium`"
    );
    // A fresh profile per run: no cache, no session storage, no state from another test.
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=3500", "--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{CHROMIUM} does not start: {e}"));
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > BROWSER_LIMIT {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "chromium did not finish within {BROWSER_LIMIT:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && dom.contains("</html>"),
        "chromium failed ({}); stderr:\n{}\nstdout:\n{dom}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    dom
}

/// [`dump_dom`] from a blocking thread, so the proxy keeps serving the browser meanwhile.
async fn dump(url: &str) -> String {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || dump_dom(&url))
        .await
        .unwrap()
}

/// The text (tags stripped) of the element with class `class` in `backend`'s row of `dom`.
fn cell(dom: &str, backend: SocketAddr, class: &str) -> String {
    let address = format!("<td class=\"address\">{backend}</td>");
    let row = &dom[dom
        .find(&address)
        .unwrap_or_else(|| panic!("no row for {backend} in:\n{dom}"))..];
    let row = &row[..row.find("</tr>").unwrap()];
    let open = format!("class=\"{class}\">");
    let start = row
        .find(&open)
        .unwrap_or_else(|| panic!("no {class} cell for {backend} in:\n{row}"))
        + open.len();
    let inner = &row[start..start + row[start..].find("</td>").unwrap()];
    let mut text = String::new();
    let mut in_tag = false;
    for c in inner.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_shows_every_backend_and_its_traffic() {
    let apps = apps(3).await;
    let addrs: Vec<(SocketAddr, u32)> = vec![
        (apps[0].addr(), 2),
        (apps[1].addr(), 1),
        (apps[2].addr(), 1),
    ];
    let (server, proxy) = proxy(&one_pool(
        "least_connections",
        &addrs,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    ))
    .await;
    let admin = server.admin_addr().unwrap();
    let url = format!("http://{admin}/#token={TOKEN}");

    let idle = dump(&url).await;
    assert!(
        idle.contains("<span class=\"strategy\">least_connections</span>"),
        "{idle}"
    );
    assert!(idle.contains("<span class=\"name\">app</span>"), "{idle}");
    for (backend, weight) in &addrs {
        assert_eq!(cell(&idle, *backend, "state"), "active");
        assert_eq!(cell(&idle, *backend, "num weight"), weight.to_string());
        assert_eq!(cell(&idle, *backend, "num requests"), "0");
    }
    // The token from the fragment was accepted; the page did not ask for one.
    assert!(!idle.contains("class=\"bad\""), "{idle}");

    // Without the token the page shows no data, says why, and offers a field for it.
    let refused = dump(&format!("http://{admin}/#token=not-the-token-0123456789")).await;
    assert!(
        refused.contains("<form id=\"auth\" class=\"shown\">"),
        "{refused}"
    );
    assert!(refused.contains("the admin token was refused"), "{refused}");
    assert!(!refused.contains(&addrs[0].0.to_string()), "{refused}");
    let without = dump(&format!("http://{admin}/")).await;
    assert!(
        without.contains("this proxy needs an admin token"),
        "{without}"
    );

    // Traffic for at most 20 s (or 20,000 requests), stopped as soon as the second dump is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = tokio::spawn({
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        async move {
            let client = client();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline {
                    break;
                }
                let reply = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    wait_until("traffic flows", || sent.load(Ordering::Relaxed) >= 20).await;
    let sent_before_dump = sent.load(Ordering::Relaxed);
    let busy = dump(&url).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();

    let mut total = 0u64;
    for (backend, _) in &addrs {
        let requests: u64 = cell(&busy, *backend, "num requests").parse().unwrap();
        total += requests;
        // A number, not "–": the page had two polls to measure between. Under the browser's
        // virtual time little real time passes between polls, so its value may well be 0.0.
        let rate = cell(&busy, *backend, "num rate");
        let rate: f64 = rate
            .parse()
            .unwrap_or_else(|_| panic!("{backend}: requests/s `{rate}` after several polls"));
        assert!(rate >= 0.0, "{backend}: {rate}");
        let share = cell(&busy, *backend, "pct");
        assert!(share == "–" || share.ends_with('%'), "{backend}: {share}");
    }
    assert!(
        total >= sent_before_dump,
        "the page shows {total} requests; {sent_before_dump} had been answered before it loaded"
    );

    // A backend draining with a request in flight shows its state and the drain time left.
    let slow = tokio::spawn(async move {
        send(&client(), proxy, "GET", "/sleep/60000", &[], Bytes::new()).await;
    });
    let bearer = format!("Bearer {TOKEN}");
    let headers = [("authorization", bearer.as_str())];
    let deadline = Instant::now() + Duration::from_secs(5);
    let busy_backend = loop {
        let status = get(admin, "/status", &headers).await;
        let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
        let found = status["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["in_flight"] == 1)
            .map(|b| {
                b["address"]
                    .as_str()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap()
            });
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the slow request never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let drain = format!("/pools/app/backends/{busy_backend}/drain");
    let reply = send(&client(), admin, "POST", &drain, &headers, Bytes::new()).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let draining = dump(&url).await;
    slow.abort();
    assert!(
        draining.contains(&format!(
            "<tr class=\"draining\"><td class=\"address\">{busy_backend}</td>"
        )),
        "{draining}"
    );
    assert_eq!(cell(&draining, busy_backend, "state"), "draining");
    assert_eq!(cell(&draining, busy_backend, "num in-flight"), "1");
    let left = cell(&draining, busy_backend, "num drain-left");
    let seconds: u64 = left
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("drain time left `{left}`"));
    assert!((1..=30).contains(&seconds), "drain time left `{left}`");
    for (backend, _) in addrs.iter().filter(|(a, _)| *a != busy_backend) {
        assert_eq!(cell(&draining, *backend, "state"), "active");
        assert_eq!(cell(&draining, *backend, "num drain-left"), "");
    }
}
