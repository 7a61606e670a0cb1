//! The walkthrough's steps (`examples/walkthrough.rs`), asserted: memory sessions reset behind
//! round robin and climb behind cookie, a removed instance's users lose their sessions, Redis
//! sessions survive round robin and a removal, and a pinned WebSocket is told to go away at the
//! drain deadline and reconnects elsewhere.
//!
//! The Redis tests need `--features it-redis` and Debian's `redis-server`; each starts its own on a
//! free loopback port and kills it when done. Without the binary they fail, they never skip.

#[path = "../examples/support/mod.rs"]
mod examples_support;

use std::path::Path;

use examples_support::redis_server::{RedisServer, StartError};
use examples_support::story::{self, Traffic, UserRow, DRAIN_TIMEOUT, GOING_AWAY};

const TRAFFIC: Traffic = Traffic {
    users: 4,
    requests: 6,
};

/// Instances in the order they first served `row` (each once).
fn instances(served_by: &[String]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for backend in served_by {
        if !seen.contains(&backend.as_str()) {
            seen.push(backend);
        }
    }
    seen
}

#[tokio::test]
async fn step1_memory_sessions_behind_round_robin_reset_on_every_request() {
    let step = story::step1(TRAFFIC).await.unwrap();
    assert_eq!(step.users.len(), TRAFFIC.users);
    for user in &step.users {
        assert_eq!(user.visits, vec![1; TRAFFIC.requests], "{user:?}");
        assert_eq!(user.sessions_lost(), TRAFFIC.requests - 1, "{user:?}");
        assert!(instances(&user.served_by).len() >= 2, "{user:?}");
    }
    assert_eq!(step.sessions_lost(), TRAFFIC.users * (TRAFFIC.requests - 1));
}

#[tokio::test]
async fn step2_memory_sessions_behind_cookie_climb() {
    let step = story::step2(TRAFFIC).await.unwrap();
    let climbing: Vec<u64> = (1..=TRAFFIC.requests as u64).collect();
    for user in &step.users {
        assert_eq!(user.visits, climbing, "{user:?}");
        assert_eq!(instances(&user.served_by).len(), 1, "{user:?}");
        assert_eq!(user.continuity(), format!("climbs 1→{}", TRAFFIC.requests));
    }
    // Placement spreads users, so the climb is stickiness, not a one-instance pool.
    let mut placed: Vec<&str> = step.users.iter().map(|u| u.served_by[0].as_str()).collect();
    placed.sort_unstable();
    placed.dedup();
    assert!(placed.len() >= 2, "{:?}", step.users);
    assert_eq!(step.sessions_lost(), 0);
}

#[tokio::test]
async fn step3_removing_an_instance_loses_its_users_sessions_only() {
    let step = story::step3(TRAFFIC).await.unwrap();
    let half = TRAFFIC.requests / 2;
    let removed = step.users[0].served_by[0].clone();
    assert!(
        step.title.contains(&format!("{removed} removed")),
        "{step:?}"
    );
    let (moved, stayed): (Vec<&UserRow>, Vec<&UserRow>) =
        step.users.iter().partition(|u| u.served_by[0] == removed);
    assert!(!stayed.is_empty(), "{step:?}");

    let first: Vec<u64> = (1..=half as u64).collect();
    let second: Vec<u64> = (1..=(TRAFFIC.requests - half) as u64).collect();
    for user in &moved {
        assert!(
            user.served_by[..half].iter().all(|b| *b == removed),
            "{user:?}"
        );
        let after = &user.served_by[half..];
        assert!(
            after.iter().all(|b| *b == after[0] && *b != removed),
            "{user:?}"
        );
        assert_eq!(
            user.visits,
            [first.clone(), second.clone()].concat(),
            "{user:?}"
        );
        assert_eq!(user.sessions_lost(), 1, "{user:?}");
    }
    let climbing: Vec<u64> = (1..=TRAFFIC.requests as u64).collect();
    for user in &stayed {
        assert_eq!(instances(&user.served_by).len(), 1, "{user:?}");
        assert_eq!(user.visits, climbing, "{user:?}");
    }
    assert_eq!(step.sessions_lost(), moved.len());
    assert!(
        step.events.iter().any(|e| e.contains("released")),
        "{:?}",
        step.events
    );
}

#[tokio::test]
async fn step5_pinned_websocket_gets_1001_at_the_drain_deadline_and_reconnects_elsewhere() {
    let step = story::step5().await.unwrap();
    let socket = step.socket.as_ref().expect("a socket report");
    assert_eq!(socket.page_served_by, socket.pinned_to, "{socket:?}");
    assert_eq!(socket.close_code, Some(GOING_AWAY), "{socket:?}");
    // Not before the deadline: the drain lets a socket live until then.
    assert!(socket.closed_after >= DRAIN_TIMEOUT, "{socket:?}");
    assert!(
        socket.closed_after < DRAIN_TIMEOUT * 4,
        "closed long after the deadline: {socket:?}"
    );
    assert!(socket.echoed_while_draining >= 2, "{socket:?}");
    assert_ne!(socket.ended_on(), socket.pinned_to, "{socket:?}");
    assert!(socket.new_affinity_cookie, "{socket:?}");
    assert_eq!(socket.echoed_after, 3, "{socket:?}");

    // The page's memory session stayed on the removed instance.
    let user = &step.users[0];
    assert_eq!(
        user.served_by,
        [socket.pinned_to.as_str(), socket.ended_on()],
        "{user:?}"
    );
    assert_eq!(user.visits, [1, 1], "{user:?}");
    assert_eq!(step.sessions_lost(), 1);
}

#[test]
fn continuity_and_sessions_lost_read_the_counter() {
    let row = |visits: &[u64]| UserRow {
        name: "user1".to_owned(),
        served_by: vec!["app1".to_owned(); visits.len()],
        visits: visits.to_vec(),
        removal_after: None,
    };
    assert_eq!(row(&[1, 2, 3]).continuity(), "climbs 1→3");
    assert_eq!(row(&[1, 2, 3]).sessions_lost(), 0);
    assert_eq!(row(&[1, 1, 1]).continuity(), "resets: 1,1,1");
    assert_eq!(row(&[1, 1, 1]).sessions_lost(), 2);
    assert_eq!(row(&[1, 2, 1, 2, 3]).continuity(), "1→2, reset, 1→3");
    assert_eq!(row(&[1, 2, 1, 2, 3]).sessions_lost(), 1);

    let mut moved = row(&[1, 2, 1, 2]);
    moved.served_by = ["app1", "app1", "app3", "app3"].map(String::from).to_vec();
    moved.removal_after = Some(2);
    assert_eq!(moved.served(), "app1 → app3");
    let mut stayed = moved.clone();
    stayed.served_by = vec!["app2".to_owned(); 4];
    assert_eq!(stayed.served(), "app2");
    let mut rotating = moved;
    rotating.served_by = ["app2", "app1", "app3", "app1"].map(String::from).to_vec();
    assert_eq!(rotating.served(), "app1/app2 → app1/app3");
}

#[test]
fn a_missing_redis_server_is_an_error_that_says_how_to_install_it() {
    let err = RedisServer::start_binary(Path::new("/nonexistent/redis-server"), 6379).unwrap_err();
    assert!(matches!(err, StartError::Missing(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("apt-get install redis-server"),
        "{message}"
    );
}

/// Needs Debian's `redis-server`: `cargo test --features it-redis --test walkthrough`.
#[cfg(feature = "it-redis")]
mod redis {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::header::{COOKIE, SET_COOKIE};
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use switchyard::demo::{AppServer, SessionSigner, Sessions, DEMO_SESSION_SECRET};

    use super::examples_support::redis_server::{answers_ping, RedisServer};
    use super::examples_support::redis_sessions::{RedisSessions, DEFAULT_EXPIRY};
    use super::*;

    /// A `redis-server` of this test's own; a missing binary fails the test with how to install it.
    fn redis() -> RedisServer {
        RedisServer::start_on_free_port().unwrap_or_else(|err| panic!("{err}"))
    }

    async fn redis_app(name: &str, url: &str, secret: &[u8]) -> AppServer {
        let store = RedisSessions::connect(url, DEFAULT_EXPIRY)
            .await
            .expect("connects to the test's Redis");
        let sessions = Sessions::new(Arc::new(store), secret);
        AppServer::start_with("127.0.0.1:0".parse().unwrap(), name, sessions)
            .await
            .unwrap()
    }

    /// GET / with `cookie`; the status, the body and the `app_session` pair it set, if any.
    async fn visit(app: SocketAddr, cookie: &str) -> (StatusCode, String, Option<String>) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let mut request = Request::get(format!("http://{app}/"));
        if !cookie.is_empty() {
            request = request.header(COOKIE, cookie);
        }
        let response = client
            .request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let set = response
            .headers()
            .get(SET_COOKIE)
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap(), set)
    }

    #[tokio::test]
    async fn step4_redis_sessions_climb_behind_round_robin_and_survive_a_removal() {
        let redis = redis();
        let step = story::step4(TRAFFIC, &redis.url()).await.unwrap();
        let half = TRAFFIC.requests / 2;
        let climbing: Vec<u64> = (1..=TRAFFIC.requests as u64).collect();
        for user in &step.users {
            assert_eq!(user.visits, climbing, "{user:?}");
            // Round robin really moved them between instances.
            assert!(instances(&user.served_by).len() >= 2, "{user:?}");
            assert!(
                user.served_by[half..].iter().all(|b| b != "app2"),
                "served by the removed instance: {user:?}"
            );
        }
        assert!(
            step.users
                .iter()
                .any(|u| u.served_by[..half].iter().any(|b| b == "app2")),
            "app2 served no one before its removal: {:?}",
            step.users
        );
        assert_eq!(step.sessions_lost(), 0);
    }

    #[tokio::test]
    async fn any_instance_continues_a_session_another_started_and_forgeries_start_over() {
        let redis = redis();
        let one = redis_app("one", &redis.url(), DEMO_SESSION_SECRET.as_bytes()).await;
        let two = redis_app("two", &redis.url(), DEMO_SESSION_SECRET.as_bytes()).await;

        let (status, body, set) = visit(one.addr(), "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "one visits=1\n"));
        let cookie = set.expect("a new session sets its cookie");
        let (_, body, set) = visit(two.addr(), &cookie).await;
        assert_eq!(body, "two visits=2\n");
        assert_eq!(set, None);
        let (_, body, _) = visit(one.addr(), &cookie).await;
        assert_eq!(body, "one visits=3\n");

        // The id is in Redis, but without the shared secret's signature it is no session.
        let (id, _) = cookie["app_session=".len()..].split_once('.').unwrap();
        let unsigned = format!("app_session={id}");
        let foreign = format!(
            "app_session={}",
            SessionSigner::new(b"not the shared secret").sign(id)
        );
        for forged in [unsigned, foreign] {
            let (_, body, set) = visit(two.addr(), &forged).await;
            assert_eq!(body, "two visits=1\n", "{forged}");
            assert!(set.is_some(), "{forged}");
        }
        let (_, body, _) = visit(two.addr(), &cookie).await;
        assert_eq!(body, "two visits=4\n");

        // An instance with another secret does not accept the others' sessions.
        let other = redis_app("other", &redis.url(), b"another secret").await;
        let (_, body, _) = visit(other.addr(), &cookie).await;
        assert_eq!(body, "other visits=1\n");
    }

    #[tokio::test]
    async fn without_redis_the_app_answers_503_and_recovers_when_redis_is_back() {
        let redis = redis();
        let port = redis.port();
        let app = redis_app("app1", &redis.url(), DEMO_SESSION_SECRET.as_bytes()).await;
        let (_, body, set) = visit(app.addr(), "").await;
        assert_eq!(body, "app1 visits=1\n");
        let cookie = set.unwrap();

        redis.stop();
        let (status, body, set) = visit(app.addr(), &cookie).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body, "app1: session store unavailable\n");
        assert_eq!(set, None);

        // A new Redis has none of the old sessions: the client starts over, it is not miscounted.
        let _redis = RedisServer::start(port).unwrap_or_else(|err| panic!("{err}"));
        let deadline = Instant::now() + Duration::from_secs(15);
        let (body, set) = loop {
            let (status, body, set) = visit(app.addr(), &cookie).await;
            if status == StatusCode::OK {
                break (body, set);
            }
            assert!(Instant::now() < deadline, "still {status}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(body, "app1 visits=1\n");
        assert!(set.is_some_and(|new| new != cookie));
    }

    #[tokio::test]
    async fn a_started_redis_server_is_stopped_by_its_guard() {
        let redis = redis();
        let addr = redis.addr();
        let pid = redis.pid();
        assert!(answers_ping(addr));
        drop(redis);
        assert!(!answers_ping(addr));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "redis-server {pid} still running"
        );
    }
}
