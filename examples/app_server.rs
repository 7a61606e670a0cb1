//! A stateful demo app to put behind switchyard.
//!
//! ```text
//! cargo run --example app_server -- --listen 127.0.0.1:9001 --name app1
//! ```
//!
//! Endpoints (any method; every response has `x-backend: {name}`):
//! - `/`, or any other path: `{name} visits={n}`, where `n` counts visits of the `app_session` cookie
//!   in this process only. Behind round robin it resets as requests hop between instances; behind
//!   cookie affinity it climbs.
//! - `/sleep/{ms}`: waits, then answers like `/`.
//! - `/headers`: the request headers as received (see what the proxy added).
//! - `/echo`: streams the request body back.
//! - `/status/{code}`: answers with that status.
//! - `/close`: answers with `Connection: close` and closes the connection.
//!
//! Logs go to stderr; `RUST_LOG=debug` logs every request.

use std::net::SocketAddr;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Command line of the demo app server.
#[derive(Debug, Parser)]
#[command(about = "Stateful demo app server to put behind switchyard")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:9001.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Name sent in `x-backend` and in response bodies.
    #[arg(long, value_name = "NAME", default_value = "app")]
    name: String,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    switchyard::demo::run_forever(args.listen, &args.name).await
}
