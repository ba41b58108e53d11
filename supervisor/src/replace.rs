//! `baton upgrade MOUNTPOINT --supervisor PATH`, on the running supervisor's side: start
//! the new supervisor binary with the control socket and a readiness pipe, and wait until
//! it supervises the mount.
//!
//! ```text
//! old supervisor                    client (serving)               new supervisor
//!   PATH --version (it must run)
//!   Detach ------------------------> listens on the adopt socket, serves on
//!   spawn PATH <same arguments>, BATON_CONTROL_FD, BATON_READY_FD --------------->
//!                                    <---------- Adopt (crate::adopt) ----------
//!                                    ----------- Adopted + fds ---------------->
//!                                    (the old channel is shut down)
//!   <------------------------------------------------------------- "ready"
//!   answer SupervisorUpgraded, exit leaving the client, the socket file and the mount
//! ```
//!
//! Failure (the binary does not run, reports an error, exits or times out): the new
//! supervisor is killed if it still runs, and the old one adopts its client back through
//! the same adopt socket (one mechanism), then serves on; `baton upgrade` exits non-zero.

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::background::READY_FD_ENV;
use crate::control::CONTROL_FD_ENV;
use crate::spawn::inherit_fd;

/// The new supervisor could not take over.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("supervisor binary {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot run {binary} --version")]
    Probe {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version failed ({status}): it is not a working baton binary")]
    ProbeFailed { binary: PathBuf, status: String },
    #[error("cannot create the readiness pipe")]
    Pipe(#[source] Errno),
    #[error("cannot start the new supervisor {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the new supervisor failed: {0}")]
    Failed(String),
    #[error("the new supervisor exited ({0}) before it supervised the mount")]
    Died(String),
    #[error("the new supervisor did not take over within {0:?}")]
    Timeout(Duration),
}

/// `binary --version`, first line (e.g. `baton 0.1.0`).
pub fn probe_version(binary: &Path) -> Result<String, ReplaceError> {
    if !binary.exists() {
        return Err(ReplaceError::Missing(binary.to_path_buf()));
    }
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| ReplaceError::Probe {
            binary: binary.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(ReplaceError::ProbeFailed {
            binary: binary.to_path_buf(),
            status: out.status.to_string(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Starts `binary` with this process's arguments, the control socket `control` and a
/// readiness pipe, and waits up to `timeout` for it to report that it supervises the
/// mount. Returns its pid. On failure it is killed and reaped.
pub fn start_successor(
    binary: &Path,
    control: BorrowedFd<'_>,
    timeout: Duration,
) -> Result<u32, ReplaceError> {
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(ReplaceError::Pipe)?;
    let mut cmd = Command::new(binary);
    cmd.args(std::env::args_os().skip(1))
        .env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .env(CONTROL_FD_ENV, control.as_raw_fd().to_string())
        .stdin(Stdio::null());
    inherit_fd(&mut cmd, write_end.as_raw_fd());
    inherit_fd(&mut cmd, control.as_raw_fd());
    let mut child = cmd.spawn().map_err(|source| ReplaceError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    drop(write_end);
    tracing::info!(pid = child.id(), binary = %binary.display(), "new supervisor started");
    match wait_ready(&mut child, read_end, timeout) {
        Ok(()) => Ok(child.id()),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn wait_ready(child: &mut Child, pipe: OwnedFd, timeout: Duration) -> Result<(), ReplaceError> {
    let deadline = Instant::now() + timeout;
    let mut answer = Vec::new();
    let mut file = std::fs::File::from(pipe);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReplaceError::Timeout(timeout));
        }
        let readable = {
            use std::os::fd::AsFd;
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(n) => n > 0,
                Err(Errno::EINTR) => false,
                Err(_) => return Err(ReplaceError::Timeout(timeout)),
            }
        };
        if !readable {
            continue;
        }
        let mut buf = [0u8; 512];
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            answer.extend_from_slice(&buf[..n]);
            if !answer.contains(&b'\n') {
                continue;
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let line = text.lines().next().unwrap_or("").trim();
        if line == "ready" {
            return Ok(());
        }
        if let Some(message) = line.strip_prefix("error: ") {
            return Err(ReplaceError::Failed(message.to_string()));
        }
        // End of file without an answer: the new supervisor exited.
        let status = match child.wait() {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown status: {e}"),
        };
        return Err(ReplaceError::Died(status));
    }
}
