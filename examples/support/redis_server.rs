//! A `redis-server` (Debian's package) started on a loopback port without persistence, and killed
//! by its PID when dropped: the walkthrough starts one when none is running, each Redis test its own.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to tell someone who has no `redis-server`.
pub const INSTALL_HINT: &str =
    "install Debian's package with `sudo apt-get install redis-server` (it puts redis-server in /usr/bin)";

/// How long a starting server gets to answer PING.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// Why a `redis-server` could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No `redis-server` on `PATH` (or at the path given).
    #[error("redis-server not found ({0}); {INSTALL_HINT}")]
    Missing(String),
    /// The process could not be spawned, or no free port could be found.
    #[error("could not start redis-server")]
    Io(#[source] io::Error),
    /// It exited, or did not answer PING in time.
    #[error("redis-server on 127.0.0.1:{port} {what}; its log:\n{log}")]
    NotReady {
        /// The port it was asked to listen on.
        port: u16,
        /// What went wrong.
        what: String,
        /// Its log file, for the reason (e.g. the port was taken).
        log: String,
    },
}

/// A running `redis-server` this process started.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    // Holds the log; removed with the server.
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts the `redis-server` found on `PATH` on 127.0.0.1:`port`.
    pub fn start(port: u16) -> Result<RedisServer, StartError> {
        let binary = find_on_path("redis-server")
            .ok_or_else(|| StartError::Missing("not on PATH".to_owned()))?;
        Self::start_binary(&binary, port)
    }

    /// Starts the `redis-server` on `PATH` on a free loopback port (for tests).
    pub fn start_on_free_port() -> Result<RedisServer, StartError> {
        // Bound then released: the port is free unless something takes it in between, and then
        // the server's log says so.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(StartError::Io)?
            .port();
        Self::start(port)
    }

    /// Starts `binary` on 127.0.0.1:`port`, with no RDB or AOF files, and waits until it answers
    /// PING.
    pub fn start_binary(binary: &Path, port: u16) -> Result<RedisServer, StartError> {
        if !binary.is_file() {
            return Err(StartError::Missing(binary.display().to_string()));
        }
        let dir = tempfile::tempdir().map_err(StartError::Io)?;
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(StartError::Io)?;
        // Owned by the guard at once, so every early return below kills it.
        let mut server = RedisServer { child, port, dir };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(server.not_ready(format!("exited ({status})")));
            }
            if answers_ping(server.addr()) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(server.not_ready(format!(
                    "did not answer PING within {}s",
                    READY_WITHIN.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn not_ready(&self, what: String) -> StartError {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        StartError::NotReady {
            port: self.port,
            what,
            log,
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address, on loopback.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its URL for the `redis` crate.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr())
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it and waits for it to exit (what dropping it does).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        // SIGKILL is safe: it was started with nothing to save.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis at `addr` answers `PING` within a second.
pub fn answers_ping(addr: SocketAddr) -> bool {
    let ping = || -> io::Result<bool> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    ping().unwrap_or(false)
}

/// The first `name` in a directory of `PATH`, then in /usr/bin (where Debian installs it, in case
/// `PATH` is minimal).
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
