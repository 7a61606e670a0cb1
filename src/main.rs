//! The `switchyard` binary: run the proxy in the foreground, or check a config.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};
use switchyard::config::{Config, LogFormat};
use switchyard::reload::ReloadReport;
use switchyard::server::Server;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { ref diff }) => check(&cli, diff.as_deref()),
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
        let report = ReloadReport::between(&old, &new);
        println!("changes: {report}");
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialise")
        );
    }
    ExitCode::SUCCESS
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
