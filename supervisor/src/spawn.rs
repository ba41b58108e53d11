//! Starting a filesystem client (`baton-fs`) and keeping hold of it.
//!
//! The client inherits exactly one descriptor besides stdio: its end of a
//! `SOCK_SEQPACKET` socketpair, named by `BATON_HANDOVER_FD`. Everything else this process
//! has open is close-on-exec. The client runs in its own process group, so that a Ctrl-C
//! on the supervisor's terminal reaches the supervisor only; the supervisor then stops
//! the client in order.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use handover_proto::message::CHANNEL_FD_ENV;
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

/// The client binary's name, looked up next to the supervisor's own executable.
pub const CLIENT_BINARY: &str = "baton-fs";

/// The client could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot find the client binary next to {0} (use --client PATH)")]
    NoDefaultClient(PathBuf, #[source] std::io::Error),
    #[error("client binary {0} does not exist")]
    ClientMissing(PathBuf),
    #[error("cannot create the handover socketpair")]
    Socketpair(#[source] Errno),
    #[error("cannot start {binary}")]
    Exec {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the client process (pidfd_open)")]
    Pidfd(#[source] std::io::Error),
}

/// `baton-fs` next to the running executable.
pub fn default_client() -> Result<PathBuf, SpawnError> {
    let exe = std::env::current_exe()
        .map_err(|e| SpawnError::NoDefaultClient(PathBuf::from("the baton executable"), e))?;
    Ok(exe.with_file_name(CLIENT_BINARY))
}

/// Makes `fd` survive exec in the child only: the parent's copy stays close-on-exec, so
/// concurrent spawns elsewhere in this process never leak it.
pub fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl(2),
    // which is async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running client and the supervisor's end of its handover socket. Dropping it kills
/// and reaps the client unless it was already reaped or [`ClientProcess::release`]d.
///
/// The client is either this process's child, or a client this supervisor adopted
/// (`crate::adopt`: its supervisor died or was replaced): a non-child cannot be waited
/// for, so its exit is seen on the pidfd only and its exit status is unknown.
#[derive(Debug)]
pub struct ClientProcess {
    child: Proc,
    channel: OwnedFd,
    /// Readable once the process has exited (pidfd_open(2)): exits are events of the
    /// supervisor's poll loop, distinct from the channel closing.
    pidfd: OwnedFd,
    exited: Option<ExitStatus>,
    /// A non-child seen exiting (its status is unknown).
    gone: bool,
    /// Left running on purpose (the supervisor is replaced): not killed on drop.
    released: bool,
}

#[derive(Debug)]
enum Proc {
    Child(Child),
    Adopted(u32),
}

const UNKNOWN_STATUS: &str = "not a child of this supervisor";

/// Whether `pidfd` is readable (the process exited), waiting up to `timeout`.
fn pidfd_exited(pidfd: &OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let t = nix::poll::PollTimeout::try_from(timeout).unwrap_or(nix::poll::PollTimeout::MAX);
    matches!(nix::poll::poll(&mut fds, t), Ok(n) if n > 0)
}

/// `pidfd_open(pid, 0)`: a close-on-exec descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this new descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl ClientProcess {
    /// Starts `binary` with `args`.
    pub fn spawn(binary: &Path, args: &[String]) -> Result<ClientProcess, SpawnError> {
        if !binary.exists() {
            return Err(SpawnError::ClientMissing(binary.to_path_buf()));
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(SpawnError::Socketpair)?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env(CHANNEL_FD_ENV, theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .process_group(0);
        inherit_fd(&mut cmd, theirs.as_raw_fd());
        let child = cmd.spawn().map_err(|source| SpawnError::Exec {
            binary: binary.to_path_buf(),
            source,
        })?;
        drop(theirs);
        let mut child = child;
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SpawnError::Pidfd(e));
            }
        };
        tracing::info!(pid = child.id(), binary = %binary.display(), "client started");
        Ok(ClientProcess {
            child: Proc::Child(child),
            channel: ours,
            pidfd,
            exited: None,
            gone: false,
            released: false,
        })
    }

    /// A client this process did not start: `pid`, watched through `pidfd`, talked to on
    /// `channel`.
    pub fn adopted(pid: u32, channel: OwnedFd, pidfd: OwnedFd) -> ClientProcess {
        ClientProcess {
            child: Proc::Adopted(pid),
            channel,
            pidfd,
            exited: None,
            gone: false,
            released: false,
        }
    }

    /// Whether this client was adopted (not started by this process).
    pub fn is_adopted(&self) -> bool {
        matches!(self.child, Proc::Adopted(_))
    }

    /// Replaces the handover channel (this supervisor adopted its own client back).
    pub fn replace_channel(&mut self, channel: OwnedFd) {
        self.channel = channel;
    }

    /// Leaves the client running when this is dropped (another supervisor adopts it).
    pub fn release(mut self) {
        self.released = true;
    }

    fn signal_kill(&mut self) -> std::io::Result<()> {
        match &mut self.child {
            Proc::Child(c) => c.kill(),
            Proc::Adopted(_) => {
                // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number and
                // a null siginfo; no memory of ours is written.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        self.pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            }
        }
    }

    /// Readable once the process has exited.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Sends SIGKILL (without waiting: the exit is seen on [`ClientProcess::pidfd`]).
    pub fn kill(&mut self) {
        if self.exited.is_none() && !self.gone {
            if let Err(e) = self.signal_kill() {
                tracing::warn!(pid = self.pid(), error = %e, "cannot kill the client");
            }
        }
    }

    /// The exit status if the process has exited (reaping it), `None` if it runs.
    pub fn try_reap(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if let Some(s) = self.exited {
            return Ok(Some(s));
        }
        let child = match &mut self.child {
            Proc::Child(c) => c,
            Proc::Adopted(_) => {
                if self.gone || pidfd_exited(&self.pidfd, Duration::ZERO) {
                    self.gone = true;
                    return Err(std::io::Error::other(UNKNOWN_STATUS));
                }
                return Ok(None);
            }
        };
        let s = child.try_wait()?;
        self.exited = s;
        Ok(s)
    }

    pub fn pid(&self) -> u32 {
        match &self.child {
            Proc::Child(c) => c.id(),
            Proc::Adopted(pid) => *pid,
        }
    }

    pub fn channel(&self) -> &OwnedFd {
        &self.channel
    }

    /// Waits up to `timeout` for the client to exit; kills it after that. Returns its exit
    /// status.
    pub fn reap(&mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        if self.is_adopted() {
            if !self.gone && !pidfd_exited(&self.pidfd, timeout) {
                tracing::warn!(pid = self.pid(), "client did not exit in time; killing it");
                let _ = self.signal_kill();
                pidfd_exited(&self.pidfd, Duration::from_secs(5));
            }
            self.gone = true;
            return Err(std::io::Error::other(UNKNOWN_STATUS));
        }
        let Proc::Child(child) = &mut self.child else {
            return Err(std::io::Error::other(UNKNOWN_STATUS));
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait()? {
                self.exited = Some(s);
                return Ok(s);
            }
            if Instant::now() >= deadline {
                tracing::warn!(pid = child.id(), "client did not exit in time; killing it");
                let _ = child.kill();
                let s = child.wait()?;
                self.exited = Some(s);
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if self.released || self.exited.is_some() || self.gone {
            return;
        }
        match &mut self.child {
            Proc::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Proc::Adopted(_) => {
                let _ = self.signal_kill();
            }
        }
    }
}
