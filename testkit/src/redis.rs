//! A throwaway `redis-server` for one test run: started on a free loopback port with no
//! persistence in a temporary directory, killed and reaped on drop.
//!
//! It never touches a Redis server it did not start, and never writes outside its
//! temporary directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a started server has to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a new port when the chosen one was taken meanwhile.
const START_ATTEMPTS: u32 = 3;

/// A running `redis-server`. Dropping it stops the server.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    // Kept so that the directory lives as long as the server.
    dir: tempfile::TempDir,
}

/// `$REDIS_SERVER`, or `redis-server` from `PATH` or the usual system directories.
fn find_redis_server() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join("redis-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "redis-server not found in PATH (install it with `apt-get install redis-server`, or set REDIS_SERVER)"
    )
}

/// A loopback port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> anyhow::Result<RedisServer> {
        let bin = find_redis_server()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&bin) {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn start_once(bin: &Path) -> anyhow::Result<RedisServer> {
        let dir = tempfile::Builder::new().prefix("baton-redis-").tempdir()?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // From here on, Drop stops the child whatever happens.
        let mut server = RedisServer { child, port, dir };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = ::redis::Client::open(self.url(0))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "redis-server on port {} exited with {status}:\n{}",
                    self.port,
                    log_tail(self.dir.path())
                );
            }
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut c| ::redis::cmd("PING").query::<String>(&mut c));
            match pong {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "redis-server on port {} did not answer PING within {READY_TIMEOUT:?}: {e}",
                        self.port
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `redis://` URL for database `db` (0..15 with the default configuration).
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL: nothing is persisted, so there is nothing to shut down cleanly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
