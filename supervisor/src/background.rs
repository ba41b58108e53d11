//! `baton mount --background`: run the supervisor detached, and return only once the
//! mount serves.
//!
//! The command re-executes itself without `--background` (a fresh process: no fork after
//! threads), in a new session, with stdin on /dev/null and stdout/stderr appended to
//! `$BATON_HOME/log/<mount name>.log`. The child inherits the write end of a pipe, named
//! by `BATON_READY_FD`, and writes one line to it: `ready` once the mount serves, or
//! `error: <why>` if it could not mount. The parent prints that and exits accordingly.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};

use crate::home::{DirError, Home, mount_name, private_dir};
use crate::spawn::inherit_fd;

/// Names the readiness pipe's write end in a background supervisor.
pub const READY_FD_ENV: &str = "BATON_READY_FD";

/// The background supervisor could not be started or did not get ready.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    #[error("baton mount must run as root")]
    NotRoot,
    #[error("cannot create the log directory")]
    LogDir(#[source] DirError),
    #[error("cannot open the log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the readiness pipe")]
    Pipe(#[source] Errno),
    #[error("cannot find the baton executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("cannot start the background supervisor")]
    Spawn(#[source] std::io::Error),
    #[error("{message} (log: {log})")]
    Failed { message: String, log: PathBuf },
    #[error("the background supervisor exited ({status}) before the mount was ready; see {log}")]
    Died { status: String, log: PathBuf },
}

/// The log file of the background supervisor of `mountpoint`.
pub fn log_path(home: &Home, mountpoint: &Path) -> PathBuf {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    home.log_dir().join(format!("{}.log", mount_name(&mp)))
}

/// Starts `args` (this command line without `--background`) as a background supervisor
/// and waits until it serves or fails. Returns the log file.
pub fn detach(
    home: &Home,
    mountpoint: &Path,
    args: &[OsString],
) -> Result<PathBuf, BackgroundError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BackgroundError::NotRoot);
    }
    private_dir(&home.log_dir(), 0o700).map_err(BackgroundError::LogDir)?;
    let log = log_path(home, mountpoint);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|source| BackgroundError::LogFile {
            path: log.clone(),
            source,
        })?;
    let file2 = file
        .try_clone()
        .map_err(|source| BackgroundError::LogFile {
            path: log.clone(),
            source,
        })?;
    let (read_end, write_end) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(BackgroundError::Pipe)?;
    let exe = std::env::current_exe().map_err(BackgroundError::CurrentExe)?;

    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(file2));
    inherit_fd(&mut cmd, write_end.as_raw_fd());
    let mut child = cmd.spawn().map_err(BackgroundError::Spawn)?;
    drop(write_end);

    let mut answer = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
    let line = answer.lines().next().unwrap_or("").trim();
    if line == "ready" {
        return Ok(log);
    }
    if let Some(message) = line.strip_prefix("error: ") {
        // The child exits right after reporting; reap it so it is not left a zombie.
        let _ = child.wait();
        return Err(BackgroundError::Failed {
            message: message.to_string(),
            log,
        });
    }
    let status = match child.wait() {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown status: {e}"),
    };
    Err(BackgroundError::Died { status, log })
}

/// The readiness pipe of a background supervisor.
#[derive(Debug)]
pub struct Readiness(OwnedFd);

impl Readiness {
    /// Takes the pipe named by [`READY_FD_ENV`], if this process is a background
    /// supervisor, and makes it close-on-exec so that no client inherits it.
    pub fn from_env() -> Option<Readiness> {
        let fd: RawFd = std::env::var(READY_FD_ENV)
            .ok()?
            .parse()
            .ok()
            .filter(|fd| *fd > 2)?;
        // SAFETY: only checks the descriptor number; the borrow ends with this statement.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let st = nix::sys::stat::fstat(borrowed).ok()?;
        let is_fifo = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode)
            & nix::sys::stat::SFlag::S_IFMT
            == nix::sys::stat::SFlag::S_IFIFO;
        if !is_fifo {
            return None;
        }
        // SAFETY: the parent left exactly this descriptor open for us and nothing else in
        // this process refers to it; the variable is removed below so it is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: called at start-up, before any other thread exists.
        unsafe { std::env::remove_var(READY_FD_ENV) };
        let _ = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        Some(Readiness(owned))
    }

    fn say(self, line: &str) {
        let mut f = std::fs::File::from(self.0);
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(error = %e, "cannot report readiness to the parent");
        }
    }

    /// The mount serves.
    pub fn ready(self) {
        self.say("ready\n");
    }

    /// The mount failed: `message` is shown to the user by the parent.
    pub fn failed(self, message: &str) {
        let one_line = message.replace('\n', " ");
        self.say(&format!("error: {one_line}\n"));
    }
}

/// Starts a new session for a background supervisor (no controlling terminal, not in the
/// caller's process group).
pub fn new_session() -> Result<(), Errno> {
    nix::unistd::setsid().map(|_| ())
}
