//! The demo app to put behind switchyard, with its sessions in its own memory (stateful, the
//! default) or in Redis (stateless: any instance serves any session).
//!
//! ```text
//! cargo run --example app_server -- --listen 127.0.0.1:9001 --name app1
//! cargo run --example app_server -- --listen 127.0.0.1:9001 --name app1 --sessions redis://127.0.0.1:6379
//! ```
//!
//! Endpoints (any method; every response has `x-backend: {name}`):
//! - `/`, or any other path: `{name} visits={n}`, where `n` counts visits of the session in the
//!   signed `app_session` cookie. With memory sessions the count lives in this process only:
//!   behind round robin it resets as requests hop between instances, behind cookie affinity it
//!   climbs. With Redis sessions it climbs behind any strategy, as long as every instance has the
//!   same Redis and `--session-secret`.
//! - `/ws`: a WebSocket that greets with `{name}` and echoes messages.
//! - `/sleep/{ms}`: waits, then answers like `/`.
//! - `/headers`: the request headers as received (see what the proxy added).
//! - `/echo`: streams the request body back.
//! - `/status/{code}`: answers with that status.
//! - `/close`: answers with `Connection: close` and closes the connection.
//!
//! Logs go to stderr; `RUST_LOG=debug` logs every request.

mod support;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use support::redis_sessions::{RedisSessions, DEFAULT_EXPIRY};
use switchyard::demo::{MemorySessions, SessionStore, Sessions, DEMO_SESSION_SECRET};
use tracing_subscriber::EnvFilter;

/// Command line of the demo app server.
#[derive(Debug, Parser)]
#[command(about = "Demo app server to put behind switchyard")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:9001.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Name sent in `x-backend` and in response bodies.
    #[arg(long, value_name = "NAME", default_value = "app")]
    name: String,
    /// Where visit counters live: `memory` (this process) or a Redis URL such as
    /// redis://127.0.0.1:6379.
    #[arg(
        long,
        value_name = "memory|redis://HOST:PORT",
        default_value = "memory"
    )]
    sessions: String,
    /// Signs session ids; instances that share sessions must share it. The default is a demo value.
    #[arg(long, value_name = "SECRET", default_value = DEMO_SESSION_SECRET)]
    session_secret: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("app_server: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.session_secret.is_empty() {
        return Err("--session-secret must not be empty".into());
    }
    let store: Arc<dyn SessionStore> = match args.sessions.as_str() {
        "memory" => Arc::new(MemorySessions::new()),
        url if url.starts_with("redis://") => {
            let store = RedisSessions::connect(url, DEFAULT_EXPIRY)
                .await
                .map_err(|err| format!("--sessions {url}: {err}"))?;
            Arc::new(store)
        }
        other => {
            return Err(format!("--sessions {other:?}: expected memory or a redis:// URL").into())
        }
    };
    let sessions = Sessions::new(store, args.session_secret.as_bytes());
    switchyard::demo::run_forever(args.listen, &args.name, sessions).await?;
    Ok(())
}
