//! From sticky to stateless, end to end on loopback: three demo app servers behind switchyard, a
//! few users with cookie jars, and a table per step of what happened to their sessions.
//!
//! ```text
//! cargo run --example walkthrough                      # steps 1-3 and 5; step 4 needs Redis
//! cargo run --example walkthrough -- --sessions redis  # all five, Redis on 127.0.0.1:6379
//! cargo run --example walkthrough -- --sessions redis://127.0.0.1:6380
//! ```
//!
//! 1. memory sessions behind `round_robin`: counters reset (the broken case);
//! 2. the same behind `cookie`: counters climb;
//! 3. one instance removed from `proxy.toml` (hot reload, drain): its users lose their sessions;
//! 4. Redis sessions behind `round_robin`: counters climb, and removing an instance loses nothing;
//! 5. a WebSocket pinned by `cookie` through a drain: told to go away (1001) at the deadline, it
//!    reconnects to another instance.
//!
//! With `--sessions redis` and no Redis answering on the port, it starts Debian's `redis-server`
//! there (without persistence) and stops it at the end, Ctrl-C included.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use clap::Parser;
use support::redis_server::{self, RedisServer};
use support::story::{self, Step, Traffic};

/// Command line of the walkthrough.
#[derive(Debug, Parser)]
#[command(about = "From sticky to stateless: switchyard, three app servers and their sessions")]
struct Args {
    /// `memory` (step 4 is skipped), `redis` (redis://127.0.0.1:6379) or a redis:// URL.
    #[arg(long, value_name = "SESSIONS", default_value = "memory")]
    sessions: String,
    /// Users, each with its own cookie jar.
    #[arg(long, default_value_t = Traffic::default().users)]
    users: usize,
    /// Page views per user in each step.
    #[arg(long, default_value_t = Traffic::default().requests)]
    requests: usize,
}

const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let redis_url = match args.sessions.as_str() {
        "memory" => None,
        "redis" => Some(DEFAULT_REDIS.to_owned()),
        url if url.starts_with("redis://") => Some(url.to_owned()),
        other => {
            eprintln!("--sessions {other:?}: expected memory, redis or a redis:// URL");
            return ExitCode::FAILURE;
        }
    };
    // Held until the end: dropping it stops the redis-server this process started.
    let started = match &redis_url {
        Some(url) => match ensure_redis(url) {
            Ok(started) => started,
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };

    let traffic = Traffic {
        users: args.users.max(1),
        requests: args.requests.max(2),
    };
    let outcome = tokio::select! {
        outcome = run(traffic, redis_url.as_deref()) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    if let Some(server) = started {
        println!(
            "stopping the redis-server it started (pid {})",
            server.pid()
        );
        server.stop();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("walkthrough failed: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(traffic: Traffic, redis_url: Option<&str>) -> Result<(), story::Error> {
    println!(
        "From sticky to stateless: app1..app3 behind switchyard on loopback, {} users × {} page \
         views per step\n",
        traffic.users, traffic.requests
    );
    let mut steps = vec![
        show(story::step1(traffic).await?),
        show(story::step2(traffic).await?),
        show(story::step3(traffic).await?),
    ];
    match redis_url {
        Some(url) => steps.push(show(story::step4(traffic, url).await?)),
        None => println!(
            "Step 4 · Redis sessions behind round_robin: skipped; run with --sessions redis\n"
        ),
    }
    steps.push(show(story::step5().await?));

    println!("Summary");
    let line = |step: &str, requests: &str, counters: &str, lost: &str| {
        println!("  {step:<52} {requests:>8}  {counters:<26} {lost:>13}");
    };
    line("step", "requests", "counters", "sessions lost");
    for step in &steps {
        line(
            &format!("{}. {}", step.number, step.title),
            &step.requests().to_string(),
            &summary_of(step),
            &step.sessions_lost().to_string(),
        );
    }
    Ok(())
}

/// Prints a step's events and tables, and what it shows.
fn show(step: Step) -> Step {
    println!("Step {} · {}", step.number, step.title);
    for event in &step.events {
        println!("  · {event}");
    }
    if let Some(socket) = &step.socket {
        row(
            "socket",
            "served by",
            "messages",
            "what happened",
            "sockets cut",
        );
        let code = socket
            .close_code
            .map_or("closed without a code".to_owned(), |code| code.to_string());
        row(
            "ws",
            &format!("{} → {}", socket.pinned_to, socket.ended_on()),
            &socket.messages().to_string(),
            &format!(
                "{code} at {:.1}s, reconnected",
                socket.closed_after.as_secs_f64()
            ),
            &usize::from(socket.close_code.is_some()).to_string(),
        );
        println!(
            "  ({} echoes before the reload, {} while draining, {} after reconnecting{})",
            socket.echoed_before,
            socket.echoed_while_draining,
            socket.echoed_after,
            if socket.new_affinity_cookie {
                ", with a new affinity cookie"
            } else {
                ""
            }
        );
    }
    row(
        "user",
        "served by",
        "requests",
        "counter continuity",
        "sessions lost",
    );
    for user in &step.users {
        row(
            &user.name,
            &user.served(),
            &user.visits.len().to_string(),
            &user.continuity(),
            &user.sessions_lost().to_string(),
        );
    }
    println!("  → {}\n", lesson(step.number));
    step
}

fn row(who: &str, served: &str, count: &str, what: &str, lost: &str) {
    println!("  {who:<6} {served:<22} {count:>8}  {what:<30} {lost:>13}");
}

/// The step's counters in a few words.
fn summary_of(step: &Step) -> String {
    if let Some(socket) = &step.socket {
        let code = socket
            .close_code
            .map_or("no close code".to_owned(), |code| code.to_string());
        return format!("socket: {code}, reconnected");
    }
    let lost = step.sessions_lost();
    let views: usize = step.users.iter().map(|u| u.visits.len()).sum();
    if lost == 0 {
        "climb".to_owned()
    } else if lost + step.users.len() == views {
        "reset on every request".to_owned()
    } else {
        let hit = step.users.iter().filter(|u| u.sessions_lost() > 0).count();
        format!("{hit} of {} users reset", step.users.len())
    }
}

fn lesson(step: u8) -> &'static str {
    match step {
        1 => "each instance knows only the sessions it started; every hop starts a new one",
        2 => "pinned to one instance, each user finds its session in that instance's memory",
        3 => "the removed instance's users land on instances that never saw their sessions",
        4 => {
            "every instance reads one Redis: any instance serves any user, a removal loses nothing"
        }
        _ => {
            "a socket lives on one instance: it runs until the drain deadline, then 1001 sends it \
             elsewhere (and memory sessions stay behind)"
        }
    }
}

/// Makes sure a Redis answers at `url`: one already running is used as it is; on a loopback port
/// with none, Debian's `redis-server` is started (and returned, to be stopped at the end).
fn ensure_redis(url: &str) -> Result<Option<RedisServer>, story::Error> {
    let client = redis::Client::open(url)?;
    let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr().clone() else {
        return Err(format!("{url}: only redis:// over TCP is supported here").into());
    };
    let ip: Option<IpAddr> = match host.as_str() {
        "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        host => host.trim_matches(['[', ']']).parse().ok(),
    };
    if let Some(ip) = ip {
        if redis_server::answers_ping(SocketAddr::new(ip, port)) {
            println!("Using the Redis already running at {url}\n");
            return Ok(None);
        }
    }
    if ip != Some(IpAddr::V4(Ipv4Addr::LOCALHOST)) {
        return Err(
            format!("no Redis answers at {url}, and only one on 127.0.0.1 can be started").into(),
        );
    }
    match RedisServer::start(port) {
        Ok(server) => {
            println!(
                "Started redis-server (pid {}) on 127.0.0.1:{port}, without persistence; it is \
                 stopped at the end\n",
                server.pid()
            );
            Ok(Some(server))
        }
        Err(err @ redis_server::StartError::Missing(_)) => Err(format!(
            "--sessions redis needs a Redis: none answers at {url}, and {err}.\nOr run the \
             walkthrough without --sessions (step 4 is skipped)."
        )
        .into()),
        Err(err) => Err(err.into()),
    }
}
