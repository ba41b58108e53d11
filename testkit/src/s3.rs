//! A throwaway S3-compatible server for one test run: `moto_server` (Python, from
//! `pip install 'moto[server]'`) on a free loopback port, keeping objects in memory,
//! killed and reaped on drop.
//!
//! It never touches a server it did not start, and never talks to real AWS: the URLs it
//! hands out always carry its own loopback endpoint and its dummy credentials.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a started server has to answer HTTP.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts with a new port when the chosen one was taken meanwhile.
const START_ATTEMPTS: u32 = 3;

/// A running `moto_server`. Dropping it stops the server.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    // Holds the server's log for the lifetime of the server.
    dir: tempfile::TempDir,
}

/// `$MOTO_SERVER`, or `moto_server` from `PATH` (pyenv shims included).
fn find_moto_server() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain([home.join(".pyenv/shims"), home.join(".local/bin")])
        .chain(["/usr/local/bin", "/usr/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join("moto_server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "moto_server not found in PATH (install it with `pip install 'moto[server]'`, or set MOTO_SERVER)"
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("moto.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Sends one bodyless HTTP/1.1 request and returns the status code.
fn http(port: u16, method: &str, path: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // The status line is all that is needed; read until it is complete.
    while !head.contains(&b'\n') {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad HTTP response {:?}", line.lines().next().unwrap_or("")))
}

impl S3Server {
    /// The access key id the server accepts (moto accepts any).
    pub const ACCESS_KEY_ID: &'static str = "testing";
    /// The secret access key the server accepts.
    pub const SECRET_ACCESS_KEY: &'static str = "testing";
    pub const REGION: &'static str = "us-east-1";
    /// The bucket [`S3Server::start`] creates.
    pub const BUCKET: &'static str = "baton";

    /// Starts a server, waits until it answers HTTP, and creates [`S3Server::BUCKET`].
    pub fn start() -> anyhow::Result<S3Server> {
        let bin = find_moto_server()?;
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&bin) {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("moto_server did not start")))
    }

    fn start_once(bin: &Path) -> anyhow::Result<S3Server> {
        let dir = tempfile::Builder::new().prefix("baton-moto-").tempdir()?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("moto.log"))?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = S3Server { child, port, dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "moto_server exited with {status} before it was ready:\n{}",
                    log_tail(server.dir.path())
                );
            }
            if http(port, "GET", "/").is_ok_and(|c| c == 200) {
                server.create_bucket(Self::BUCKET)?;
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "moto_server did not answer within {READY_TIMEOUT:?}:\n{}",
                    log_tail(server.dir.path())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto does not check signatures, so a plain PUT does).
    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let code = http(self.port, "PUT", &format!("/{bucket}"))?;
        if code != 200 {
            bail!("creating bucket {bucket}: HTTP {code}");
        }
        Ok(())
    }

    /// A storage URL for `bucket` with this server's endpoint, region and credentials,
    /// as `DataStore::open` takes it. The bucket must exist ([`S3Server::create_bucket`]).
    pub fn url(&self, bucket: &str) -> String {
        format!(
            "s3://{bucket}?endpoint={}&region={}&access_key_id={}&secret_access_key={}",
            self.endpoint(),
            Self::REGION,
            Self::ACCESS_KEY_ID,
            Self::SECRET_ACCESS_KEY
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
