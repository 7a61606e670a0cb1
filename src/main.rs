//! The `switchyard` binary: run the proxy in the foreground, check a config, or simulate a pool.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use switchyard::config::{Config, LogFormat};
use switchyard::reload::ReloadReport;
use switchyard::server::Server;

mod allocator;

/// mimalloc rather than glibc's malloc: hyper allocates its two 8 KiB buffers for every connection
/// (and again when an idle keep-alive connection gets its next request), larger than glibc's
/// per-thread cache takes, and tokio's tasks are 128-byte aligned; see `BENCHMARKS.md` (session 5).
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

/// HTTP load balancer and reverse proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit: 0 when valid, 1 with every error otherwise.
    Check {
        /// Also print what reloading from CURRENT to --config would change.
        #[arg(long, value_name = "CURRENT")]
        diff: Option<PathBuf>,
    },
    /// Drive the real strategies of one pool with a synthetic workload on a virtual clock and
    /// print, per strategy, how evenly load spreads, what pool changes do to clients, and how fast
    /// a decision is.
    Simulate(SimulateCli),
}

#[derive(Debug, clap::Args)]
struct SimulateCli {
    /// The pool to simulate (default: the first pool by name).
    #[arg(long, value_name = "NAME")]
    pool: Option<String>,
    /// A strategy to run: round_robin, least_connections, ip_hash, cookie, or `pool` for the
    /// pool's own. Repeatable; default: all four.
    #[arg(long = "strategy", value_name = "NAME")]
    strategies: Vec<switchyard::simulate::StrategyPick>,
    /// Clients, each with its own IP and one session.
    #[arg(long, default_value_t = 10_000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    clients: u32,
    /// Requests in total, shared between the clients (at least one each).
    #[arg(long, default_value_t = 300_000, value_name = "M")]
    requests: u64,
    /// Virtual length of the run: clients arrive in its first three quarters.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Seed of every random draw: the same seed gives the same figures.
    #[arg(long, default_value_t = 1, value_name = "S")]
    seed: u64,
    /// A pool change: remove:IP:PORT@T, add:IP:PORT@T or drain:IP:PORT@T, T in seconds or like
    /// 30s. Repeatable.
    #[arg(long = "event", value_name = "KIND:IP:PORT@T")]
    events: Vec<switchyard::simulate::PoolEvent>,
    /// Equal sessions, evenly spaced, fixed service time, instead of heavy-tailed sessions.
    #[arg(long)]
    uniform: bool,
    /// Print the figures as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write a plot of per-backend load over time, one panel per strategy.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { ref diff }) => check(&cli, diff.as_deref()),
        Some(Command::Simulate(ref args)) => simulate(&cli, args),
        None => run(&cli),
    }
}

fn check(cli: &Cli, current: Option<&std::path::Path>) -> ExitCode {
    let new = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: ok", cli.config.display());
    if let Some(current) = current {
        let old = match Config::load(current) {
            Ok(config) => config,
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::FAILURE;
            }
        };
        // As a reload would: a generated cookie key stays, so it is no change.
        let mut new = new;
        new.keep_generated_secrets(&old);
        let report = ReloadReport::between(&old, &new);
        println!("changes: {report}");
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialise")
        );
    }
    ExitCode::SUCCESS
}

fn simulate(cli: &Cli, args: &SimulateCli) -> ExitCode {
    use switchyard::simulate::{self, Shape, SimulateArgs};
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let request = SimulateArgs {
        pool: args.pool.clone(),
        strategies: args.strategies.clone(),
        clients: args.clients,
        requests: args.requests,
        duration: args.duration,
        seed: args.seed,
        events: args.events.clone(),
        shape: if args.uniform {
            Shape::Uniform
        } else {
            Shape::HeavyTailed
        },
    };
    let report = match simulate::run(&config, &request) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("{}: {}", cli.config.display(), error_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialise")
        );
    } else {
        print!("{report}");
    }
    if let Some(path) = &args.svg {
        if let Err(error) = simulate::plot::write(&report, path) {
            eprintln!("{}", error_chain(&error));
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line += &format!(": {cause}");
        source = cause.source();
    }
    line
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as text or one JSON object per line.
/// The format is read once at start: a reload cannot swap the subscriber.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in files or log collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(cli: &Cli) -> ExitCode {
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.log_format);
    let workers = config.runtime.worker_threads();
    // One worker: a current-thread runtime, with no work stealing or cross-thread wake-ups to pay
    // for (nginx's single worker process); more: that many threads sharing the work.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder.on_thread_park(allocator::worker_idle);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown_limit = config.timeouts.shutdown;
        let server = match Server::start(config).await {
            Ok(server) => server,
            Err(error) => {
                eprintln!("{}: {error}", cli.config.display());
                return ExitCode::FAILURE;
            }
        };
        if let Err(error) = server.watch_config_file() {
            tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP or POST /reload");
        }
        if let Err(error) = serve_until_stopped(&server).await {
            eprintln!("cannot listen for signals: {error}");
            return ExitCode::FAILURE;
        }
        tracing::info!("shutting down");
        server.shutdown(shutdown_limit).await;
        ExitCode::SUCCESS
    })
}

/// Reloads on SIGHUP; returns on SIGINT or SIGTERM.
async fn serve_until_stopped(server: &Arc<Server>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading");
                // Errors are logged and counted by the reload itself; the old config keeps serving.
                let _ = server.reload_from_file().await;
            }
        }
    }
}
