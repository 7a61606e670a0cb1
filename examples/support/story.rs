//! The walkthrough's story, from sticky to stateless, as steps that return what happened:
//! `examples/walkthrough.rs` prints it, `tests/walkthrough.rs` asserts on it.
//!
//! Every step starts three demo app servers and switchyard in front of them from a `proxy.toml` in
//! a temporary directory, all on loopback with ephemeral ports, and removes an instance the way an
//! operator does: by rewriting the file and asking the admin API to reload it.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use switchyard::config::Config;
use switchyard::demo::{AppServer, Sessions, DEMO_SESSION_SECRET};
use switchyard::server::Server;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::redis_sessions::RedisSessions;

/// Whatever went wrong; the walkthrough prints it, a test fails with it.
pub type Error = Box<dyn StdError + Send + Sync>;

/// How long a removed instance gets to finish; short, so that the story takes seconds.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The proxy's affinity cookie.
pub const AFFINITY_COOKIE: &str = "sy";
/// Signs the proxy's affinity cookie; a demo value.
const COOKIE_SECRET: &str = "walkthrough-only-secret-change-me";
/// Sessions the walkthrough leaves in a Redis expire soon after it ends.
const REDIS_EXPIRY: Duration = Duration::from_secs(10 * 60);
/// The close code ("going away") a WebSocket gets at its instance's drain deadline.
pub const GOING_AWAY: u16 = 1001;
/// Bounds every wait, so a broken step fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// How many users and how many page views each; the defaults make tables that fit a screen.
#[derive(Debug, Clone, Copy)]
pub struct Traffic {
    /// Users, each with its own cookie jar.
    pub users: usize,
    /// Page views per user, interleaved between users.
    pub requests: usize,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            users: 4,
            requests: 8,
        }
    }
}

/// What one step did.
#[derive(Debug)]
pub struct Step {
    /// 1 to 5.
    pub number: u8,
    /// One line: sessions, strategy, what changes.
    pub title: String,
    /// What happened to the proxy on the way (reloads, drains), in order.
    pub events: Vec<String>,
    /// One row per user (empty for the WebSocket step).
    pub users: Vec<UserRow>,
    /// The WebSocket step's client.
    pub socket: Option<SocketReport>,
}

impl Step {
    /// Requests (or WebSocket messages) sent in this step.
    pub fn requests(&self) -> usize {
        let socket = self.socket.as_ref().map_or(0, SocketReport::messages);
        self.users.iter().map(|u| u.visits.len()).sum::<usize>() + socket
    }

    /// Sessions lost in this step, all users together.
    pub fn sessions_lost(&self) -> usize {
        self.users.iter().map(UserRow::sessions_lost).sum()
    }
}

/// One user's page views: who served each and the counter it showed.
#[derive(Debug, Clone)]
pub struct UserRow {
    /// `user1`, `user2`, ...
    pub name: String,
    /// The `x-backend` of each response.
    pub served_by: Vec<String>,
    /// The visit counter of each response.
    pub visits: Vec<u64>,
    /// How many requests came before an instance was removed, in a step that removes one.
    pub removal_after: Option<usize>,
}

impl UserRow {
    /// Times the counter did not go up by one: each is a session lost and a new one started.
    pub fn sessions_lost(&self) -> usize {
        self.visits.windows(2).filter(|w| w[1] != w[0] + 1).count()
    }

    /// `climbs 1→8`, `1→4, reset, 1→4`, or `resets on every request`.
    pub fn continuity(&self) -> String {
        let mut runs: Vec<(u64, u64, usize)> = Vec::new();
        for &visits in &self.visits {
            match runs.last_mut() {
                Some((_, last, len)) if visits == *last + 1 => {
                    *last = visits;
                    *len += 1;
                }
                _ => runs.push((visits, visits, 1)),
            }
        }
        match runs.as_slice() {
            [] => "no requests".to_owned(),
            [(first, last, _)] => format!("climbs {first}→{last}"),
            _ if runs.iter().all(|&(_, _, len)| len == 1) => {
                let values: Vec<String> = self.visits.iter().map(u64::to_string).collect();
                format!("resets: {}", values.join(","))
            }
            _ => runs
                .iter()
                .map(|(first, last, _)| format!("{first}→{last}"))
                .collect::<Vec<_>>()
                .join(", reset, "),
        }
    }

    /// The instances that served the user, and after `→` the ones after the removal when they
    /// differ: `app2`, `app1/app2/app3`, `app1 → app3`.
    pub fn served(&self) -> String {
        let split = self
            .removal_after
            .unwrap_or(self.served_by.len())
            .min(self.served_by.len());
        let (before, after) = self.served_by.split_at(split);
        let (before, after) = (distinct(before), distinct(after));
        if after.is_empty() || after == before {
            before
        } else if before.is_empty() {
            after
        } else {
            format!("{before} → {after}")
        }
    }
}

/// `app1/app3` for app3, app1, app3.
fn distinct(served_by: &[String]) -> String {
    let mut names: Vec<&str> = served_by.iter().map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    names.join("/")
}

/// The WebSocket client of step 5.
#[derive(Debug, Clone)]
pub struct SocketReport {
    /// The instance that served the page (from `x-backend`), which pinned the client.
    pub page_served_by: String,
    /// The instance that greeted the socket.
    pub pinned_to: String,
    /// Messages echoed before the instance was removed.
    pub echoed_before: usize,
    /// Messages echoed while it was draining.
    pub echoed_while_draining: usize,
    /// The close code the proxy sent at the drain deadline.
    pub close_code: Option<u16>,
    /// From the reload to the close frame.
    pub closed_after: Duration,
    /// The instance that greeted each reconnection, the last one the one that stayed.
    pub reconnected_to: Vec<String>,
    /// Whether the reconnection's `101` carried a new affinity cookie.
    pub new_affinity_cookie: bool,
    /// Messages echoed after reconnecting.
    pub echoed_after: usize,
}

impl SocketReport {
    /// Messages the client sent in all.
    pub fn messages(&self) -> usize {
        self.echoed_before + self.echoed_while_draining + self.echoed_after
    }

    /// The instance the client ended on.
    pub fn ended_on(&self) -> &str {
        self.reconnected_to.last().map_or("", String::as_str)
    }
}

/// Step 1: sessions in each app's memory, behind `round_robin`. The broken case.
pub async fn step1(traffic: Traffic) -> Result<Step, Error> {
    let stage = Stage::start(memory_apps().await?, "round_robin").await?;
    let mut users = users(traffic.users);
    browse(&stage, &mut users, traffic.requests).await?;
    stage.shutdown().await;
    Ok(Step {
        number: 1,
        title: "memory sessions behind round_robin".to_owned(),
        events: Vec::new(),
        users: rows(users, None),
        socket: None,
    })
}

/// Step 2: the same apps behind `cookie`: each user is pinned to one instance.
pub async fn step2(traffic: Traffic) -> Result<Step, Error> {
    let stage = Stage::start(memory_apps().await?, "cookie").await?;
    let mut users = users(traffic.users);
    browse(&stage, &mut users, traffic.requests).await?;
    stage.shutdown().await;
    Ok(Step {
        number: 2,
        title: "memory sessions behind cookie".to_owned(),
        events: Vec::new(),
        users: rows(users, None),
        socket: None,
    })
}

/// Step 3: behind `cookie`, the instance user1 is pinned to is removed from `proxy.toml` halfway.
pub async fn step3(traffic: Traffic) -> Result<Step, Error> {
    let mut stage = Stage::start(memory_apps().await?, "cookie").await?;
    let mut users = users(traffic.users);
    let half = traffic.requests / 2;
    browse(&stage, &mut users, half).await?;
    let removed = stage.index_of(&users[0].served_by[0])?;
    let events = stage.remove_and_wait(removed).await?;
    browse(&stage, &mut users, traffic.requests - half).await?;
    stage.shutdown().await;
    Ok(Step {
        number: 3,
        title: format!("memory sessions behind cookie, app{} removed", removed + 1),
        events,
        users: rows(users, Some(half)),
        socket: None,
    })
}

/// Step 4: sessions in Redis at `redis_url`, behind `round_robin`; app2 is removed halfway.
pub async fn step4(traffic: Traffic, redis_url: &str) -> Result<Step, Error> {
    let mut apps = Vec::new();
    for i in 1..=3 {
        // One connection per instance, as separate processes would have.
        let store = RedisSessions::connect(redis_url, REDIS_EXPIRY).await?;
        let sessions = Sessions::new(Arc::new(store), DEMO_SESSION_SECRET.as_bytes());
        apps.push(AppServer::start_with(any_port(), &format!("app{i}"), sessions).await?);
    }
    let mut stage = Stage::start(apps, "round_robin").await?;
    let mut users = users(traffic.users);
    let half = traffic.requests / 2;
    browse(&stage, &mut users, half).await?;
    let events = stage.remove_and_wait(1).await?;
    browse(&stage, &mut users, traffic.requests - half).await?;
    stage.shutdown().await;
    Ok(Step {
        number: 4,
        title: "Redis sessions behind round_robin, app2 removed".to_owned(),
        events,
        users: rows(users, Some(half)),
        socket: None,
    })
}

/// Step 5: a page and its WebSocket pinned by `cookie`; the instance is removed, the socket stays
/// until the drain deadline, is told to go away (1001) and reconnects to another instance, where
/// the user's next page view finds no session (memory sessions).
pub async fn step5() -> Result<Step, Error> {
    let mut stage = Stage::start(memory_apps().await?, "cookie").await?;
    let mut user = User::new("user1");
    user.visit(&stage).await?;
    let page_served_by = user.served_by[0].clone();

    let (mut socket, pinned_to) = stage.open_socket(&mut user).await?;
    let mut echoed_before = 0;
    for i in 0..3 {
        echo(&mut socket, &format!("before {i}")).await?;
        echoed_before += 1;
    }

    let removed = stage.index_of(&pinned_to)?;
    let reloaded = Instant::now();
    let mut events = vec![stage.remove(removed).await?];
    // The socket keeps working while its instance drains, until the deadline.
    let mut echoed_while_draining = 0;
    let close_code = loop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        match echo(&mut socket, &format!("draining {echoed_while_draining}")).await {
            Ok(()) => echoed_while_draining += 1,
            Err(Interrupted::Closed(code)) => break code,
            Err(Interrupted::Failed(err)) => return Err(err),
        }
        if reloaded.elapsed() > DRAIN_TIMEOUT + PATIENCE {
            return Err("the socket was never closed".into());
        }
    };
    let closed_after = reloaded.elapsed();
    events.push(format!(
        "socket closed {:.2}s after the reload, code {}",
        closed_after.as_secs_f64(),
        close_code.map_or("none".to_owned(), |c| c.to_string())
    ));

    // Reconnect at once, as a client told "going away" should, with the cookies it has.
    let before = user.jar.get(AFFINITY_COOKIE).cloned();
    let mut reconnected_to = Vec::new();
    let mut socket = loop {
        let (socket, greeted_by) = stage.open_socket(&mut user).await?;
        reconnected_to.push(greeted_by.clone());
        if greeted_by != pinned_to {
            break socket;
        }
        if reconnected_to.len() >= 20 {
            return Err(format!("still reconnected to {pinned_to} after 20 tries").into());
        }
        // Sticky clients of a draining instance still reach it until its drain has ended.
        drop(socket);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let new_affinity_cookie = user.jar.get(AFFINITY_COOKIE) != before.as_ref();
    events.push(match reconnected_to.len() {
        1 => format!("reconnected at once, to {}", reconnected_to[0]),
        n => format!(
            "reconnected in {n} tries: {} (its drain was not over yet), then {}",
            reconnected_to[..n - 1].join(", "),
            reconnected_to[n - 1]
        ),
    });
    let mut echoed_after = 0;
    for i in 0..3 {
        echo(&mut socket, &format!("after {i}")).await?;
        echoed_after += 1;
    }
    let _ = socket.close(None).await;
    user.visit(&stage).await?;
    stage.wait_released(removed).await?;
    events.push(format!("app{} released", removed + 1));
    stage.shutdown().await;

    Ok(Step {
        number: 5,
        title: format!("a WebSocket pinned by cookie, app{} removed", removed + 1),
        events,
        users: rows(vec![user], Some(1)),
        socket: Some(SocketReport {
            page_served_by,
            pinned_to,
            echoed_before,
            echoed_while_draining,
            close_code,
            closed_after,
            reconnected_to,
            new_affinity_cookie,
            echoed_after,
        }),
    })
}

/// Three app servers, app1..app3, each with its sessions in its own memory.
pub async fn memory_apps() -> Result<Vec<AppServer>, Error> {
    let mut apps = Vec::new();
    for i in 1..=3 {
        apps.push(AppServer::start(any_port(), &format!("app{i}")).await?);
    }
    Ok(apps)
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn users(n: usize) -> Vec<User> {
    (1..=n).map(|i| User::new(&format!("user{i}"))).collect()
}

fn rows(users: Vec<User>, removal_after: Option<usize>) -> Vec<UserRow> {
    users
        .into_iter()
        .map(|u| UserRow {
            name: u.name,
            served_by: u.served_by,
            visits: u.visits,
            removal_after,
        })
        .collect()
}

/// `requests` page views per user, interleaved as concurrent users' would be.
async fn browse(stage: &Stage, users: &mut [User], requests: usize) -> Result<(), Error> {
    for _ in 0..requests {
        for user in users.iter_mut() {
            user.visit(stage).await?;
        }
    }
    Ok(())
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A browser: a cookie jar, and what it saw.
#[derive(Debug)]
struct User {
    name: String,
    jar: BTreeMap<String, String>,
    served_by: Vec<String>,
    visits: Vec<u64>,
}

impl User {
    fn new(name: &str) -> User {
        User {
            name: name.to_owned(),
            jar: BTreeMap::new(),
            served_by: Vec::new(),
            visits: Vec::new(),
        }
    }

    fn cookie_header(&self) -> Option<HeaderValue> {
        if self.jar.is_empty() {
            return None;
        }
        let pairs: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        HeaderValue::from_str(&pairs.join("; ")).ok()
    }

    fn keep_cookies(&mut self, headers: &HeaderMap) {
        for value in headers.get_all(SET_COOKIE) {
            let Some(pair) = value.to_str().ok().and_then(|v| v.split(';').next()) else {
                continue;
            };
            if let Some((name, value)) = pair.split_once('=') {
                self.jar
                    .insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }

    /// One page view of `/`: `{app} visits={n}`.
    async fn visit(&mut self, stage: &Stage) -> Result<(), Error> {
        let mut request = Request::get(format!("http://{}/", stage.proxy)).body(Empty::new())?;
        if let Some(cookies) = self.cookie_header() {
            request.headers_mut().insert(COOKIE, cookies);
        }
        let response = tokio::time::timeout(PATIENCE, stage.client.request(request)).await??;
        self.keep_cookies(response.headers());
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body);
        if status != StatusCode::OK {
            return Err(format!("{}: {status}: {body}", self.name).into());
        }
        let (backend, visits) = body
            .trim()
            .split_once(" visits=")
            .ok_or_else(|| format!("unexpected answer {body:?}"))?;
        self.served_by.push(backend.to_owned());
        self.visits.push(visits.parse()?);
        Ok(())
    }
}

/// Why a WebSocket exchange did not complete.
#[derive(Debug)]
enum Interrupted {
    /// The proxy closed it, with this close code (or none).
    Closed(Option<u16>),
    Failed(Error),
}

impl From<Interrupted> for Error {
    fn from(interrupted: Interrupted) -> Error {
        match interrupted {
            Interrupted::Closed(code) => format!("socket closed (code {code:?})").into(),
            Interrupted::Failed(err) => err,
        }
    }
}

type Socket = WebSocketStream<TcpStream>;

/// Sends `text` and waits for its echo.
async fn echo(socket: &mut Socket, text: &str) -> Result<(), Interrupted> {
    // A close frame already on its way is read below; a send may still fail first.
    let sent = socket.send(Message::text(text)).await;
    loop {
        let next = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .map_err(|_| Interrupted::Failed("no echo within 10s".into()))?;
        match next {
            Some(Ok(Message::Text(echoed))) if echoed.as_str() == text => return Ok(()),
            Some(Ok(Message::Close(frame))) => {
                return Err(Interrupted::Closed(frame.map(|f| u16::from(f.code))))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => {
                return Err(Interrupted::Failed(format!("unexpected {other:?}").into()))
            }
            Some(Err(err)) => return Err(Interrupted::Failed(err.into())),
            None => return Err(Interrupted::Closed(None)),
        }
        if let Err(err) = &sent {
            return Err(Interrupted::Failed(format!("send failed: {err}").into()));
        }
    }
}

/// The apps, switchyard in front of them, and the file it was configured from.
struct Stage {
    apps: Vec<AppServer>,
    listed: Vec<bool>,
    strategy: &'static str,
    server: Arc<Server>,
    proxy: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    client: HttpClient,
    // Holds the config file; removed with the stage.
    _dir: tempfile::TempDir,
}

impl Stage {
    async fn start(apps: Vec<AppServer>, strategy: &'static str) -> Result<Stage, Error> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("proxy.toml");
        let listed = vec![true; apps.len()];
        std::fs::write(&config, config_text(strategy, &apps, &listed))?;
        let server = Server::start(Config::load(&config)?).await?;
        let proxy = server.listen_addrs()[0];
        let admin = server.admin_addr().ok_or("no admin listener")?;
        Ok(Stage {
            apps,
            listed,
            strategy,
            server,
            proxy,
            admin,
            config,
            client: Client::builder(TokioExecutor::new()).build_http(),
            _dir: dir,
        })
    }

    fn index_of(&self, name: &str) -> Result<usize, Error> {
        self.apps
            .iter()
            .position(|a| a.name() == name)
            .ok_or_else(|| format!("no app named {name}").into())
    }

    /// Takes app `index` out of `proxy.toml` and reloads through the admin API, as an operator
    /// would; returns what the reload reported.
    async fn remove(&mut self, index: usize) -> Result<String, Error> {
        self.listed[index] = false;
        std::fs::write(
            &self.config,
            config_text(self.strategy, &self.apps, &self.listed),
        )?;
        let (status, body) = self.admin(Method::POST, "/reload").await?;
        if status != StatusCode::OK {
            return Err(format!("reload answered {status}: {body}").into());
        }
        let report: serde_json::Value = serde_json::from_str(&body)?;
        Ok(format!(
            "app{} removed from proxy.toml; POST /reload: {}",
            index + 1,
            report["summary"].as_str().unwrap_or(&body)
        ))
    }

    /// [`Stage::remove`], then waits until the instance has drained and been released.
    async fn remove_and_wait(&mut self, index: usize) -> Result<Vec<String>, Error> {
        let reloaded = Instant::now();
        let reload = self.remove(index).await?;
        self.wait_released(index).await?;
        Ok(vec![
            reload,
            format!(
                "app{} drained and released after {} ms",
                index + 1,
                reloaded.elapsed().as_millis()
            ),
        ])
    }

    /// Waits until `/status` no longer lists app `index`.
    async fn wait_released(&self, index: usize) -> Result<(), Error> {
        let address = self.apps[index].addr().to_string();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, body) = self.admin(Method::GET, "/status").await?;
            let status: serde_json::Value = serde_json::from_str(&body)?;
            let listed = status["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|pool| pool["backends"].as_array().into_iter().flatten())
                .any(|backend| backend["address"] == address.as_str());
            if !listed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("app{} still listed: {body}", index + 1).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn admin(&self, method: Method, path: &str) -> Result<(StatusCode, String), Error> {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin))
            .body(Empty::new())?;
        let response = tokio::time::timeout(PATIENCE, self.client.request(request)).await??;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Opens `/ws` through the proxy with `user`'s cookies, keeping any it is given; returns the
    /// socket and the instance that greeted it.
    async fn open_socket(&self, user: &mut User) -> Result<(Socket, String), Error> {
        let mut request = format!("ws://{}/ws", self.proxy).into_client_request()?;
        if let Some(cookies) = user.cookie_header() {
            request.headers_mut().insert(COOKIE, cookies);
        }
        let stream = TcpStream::connect(self.proxy).await?;
        let (mut socket, response) =
            tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(request, stream))
                .await??;
        user.keep_cookies(response.headers());
        let greeting = tokio::time::timeout(PATIENCE, socket.next()).await?;
        match greeting {
            Some(Ok(Message::Text(name))) => Ok((socket, name.as_str().to_owned())),
            Some(Ok(Message::Close(frame))) => {
                Err(format!("closed before the greeting: {:?}", frame.map(|f| f.code)).into())
            }
            other => Err(format!("expected a greeting, got {other:?}").into()),
        }
    }

    async fn shutdown(self) {
        self.server.shutdown(Duration::from_secs(1)).await;
        for app in self.apps {
            app.shutdown().await;
        }
    }
}

/// `proxy.toml` for pool `app` with the listed apps; the cookie table stays whatever the strategy,
/// so that switching strategies is a one-word edit.
fn config_text(strategy: &str, apps: &[AppServer], listed: &[bool]) -> String {
    let backends: Vec<String> = apps
        .iter()
        .zip(listed)
        .filter(|(_, listed)| **listed)
        .map(|(app, _)| format!("{{ address = \"{}\" }}", app.addr()))
        .collect();
    format!(
        r#"# Written by the walkthrough.
[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "{strategy}"
backends = [{backends}]
drain_timeout = "{drain}ms"

[pools.app.cookie]
name = "{AFFINITY_COOKIE}"
secret = "{COOKIE_SECRET}"
"#,
        backends = backends.join(", "),
        drain = DRAIN_TIMEOUT.as_millis(),
    )
}
