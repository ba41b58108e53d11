//! Injecting one fault into a live mount, the way an operator or an accident would, and
//! waiting until the mount serves again: SIGKILL of the serving client (the pid that
//! `baton status --json` reports), or a `baton upgrade`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::baton_cli::{self, EXIT_ROLLED_BACK, Status, Upgrade};

/// The mount faults are injected into.
#[derive(Clone, Debug)]
pub struct Target {
    /// The `baton` executable.
    pub baton: PathBuf,
    /// `BATON_HOME` of the mount.
    pub home: PathBuf,
    pub mountpoint: PathBuf,
}

impl Target {
    pub fn status(&self) -> anyhow::Result<Status> {
        baton_cli::status_with(&self.baton, &self.home, &self.mountpoint)
    }
}

/// What kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of the serving client.
    Kill,
    /// `baton upgrade`.
    Upgrade,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Upgrade => "upgrade",
        }
    }
}

/// Which client served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientId {
    pub generation: u64,
    pub pid: u64,
    pub version: String,
}

impl From<&Status> for ClientId {
    fn from(s: &Status) -> ClientId {
        ClientId {
            generation: s.generation,
            pid: s.client_pid,
            version: s.client_version.clone(),
        }
    }
}

/// One injected fault and what followed. Times are milliseconds on the observer's clock
/// (the workload's, or the probe's).
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// When it was injected (the signal sent, or `baton upgrade` started).
    pub at_ms: f64,
    /// Kill: when `baton status` first named a new client. Upgrade: when `baton upgrade`
    /// returned.
    pub recovered_ms: Option<f64>,
    /// When the application (or the probe) had completed operations again after the
    /// fault: the end of the window the pause is measured over.
    pub window_end_ms: f64,
    pub before: Option<ClientId>,
    pub after: Option<ClientId>,
    /// Client restarts the supervisor counted during this fault.
    pub restarts: u64,
    /// `restarted`, `upgraded`, `rolled-back`, or what went wrong.
    pub outcome: String,
    /// Whether the fault ended the way it should: a new client serves, the mount is
    /// there, the application makes progress.
    pub ok: bool,
    /// `baton upgrade`'s rollback reason or error output, a kill's failure.
    pub detail: Option<String>,
    /// The pause the supervisor measured, if it reported one for this fault.
    pub supervisor_pause_ms: Option<f64>,
    /// The longest application operation overlapping `[at_ms, window_end_ms]`; `None`
    /// when none reached the recording threshold (then the pause is below it).
    pub pause_ms: Option<f64>,
    pub pause_op: Option<&'static str>,
}

/// How a fault waits for the mount to serve again.
#[derive(Clone, Copy, Debug)]
pub struct Recovery {
    /// How long a new client may take to appear after a kill.
    pub timeout: Duration,
    /// Operations the application must complete after the fault.
    pub progress_ops: u64,
    /// How long they may take.
    pub progress_timeout: Duration,
}

/// The observer's clock and progress, as the injectors see it.
pub trait Observer {
    fn now_ms(&self) -> f64;
    /// Waits until `n` more operations completed, at most `timeout`; whether they did.
    fn wait_ops(&self, n: u64, timeout: Duration) -> bool;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn blank(kind: FaultKind, at_ms: f64, before: Option<ClientId>) -> Fault {
    Fault {
        kind,
        at_ms,
        recovered_ms: None,
        window_end_ms: at_ms,
        before,
        after: None,
        restarts: 0,
        outcome: String::new(),
        ok: false,
        detail: None,
        supervisor_pause_ms: None,
        pause_ms: None,
        pause_op: None,
    }
}

/// A pidfd: signals reach exactly the process whose pid `baton status` gave, even if that
/// pid were reused meanwhile, and its exit can be waited for without being its parent.
#[derive(Debug)]
struct PidFd(OwnedFd);

impl PidFd {
    fn open(pid: u64) -> std::io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        // The descriptor is always close-on-exec (pidfd_open(2)).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor pidfd_open just returned; nothing else owns it.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn kill(&self) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal reads only its arguments; a null siginfo means "as
        // kill(2) would send it".
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the process has exited (its pidfd becomes readable), at most `timeout`.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
    }
}

/// Whether `pid` may be killed as the mount's client: not this process, not the
/// supervisor, not init.
fn killable(s: &Status) -> Result<(), String> {
    let pid = s.client_pid;
    if pid <= 1 {
        return Err(format!("baton status gives no client pid ({pid})"));
    }
    if pid == u64::from(std::process::id()) || pid == s.supervisor_pid() {
        return Err(format!(
            "baton status names pid {pid} as the client, which is this process or the supervisor"
        ));
    }
    Ok(())
}

/// Kills the serving client with SIGKILL and waits until a new client serves and the
/// application made progress again.
pub fn kill(target: &Target, obs: &dyn Observer, rec: Recovery) -> Fault {
    let before = match target.status() {
        Ok(s) => s,
        Err(e) => {
            let mut f = blank(FaultKind::Kill, obs.now_ms(), None);
            f.outcome = "no status".into();
            f.detail = Some(format!("{e:#}"));
            return f;
        }
    };
    let mut f = blank(FaultKind::Kill, obs.now_ms(), Some((&before).into()));
    if let Err(e) = killable(&before) {
        f.outcome = "not killed".into();
        f.detail = Some(e);
        return f;
    }
    let pidfd = match PidFd::open(before.client_pid) {
        Ok(p) => p,
        Err(e) => {
            f.outcome = "not killed".into();
            f.detail = Some(format!("pidfd_open({}): {e}", before.client_pid));
            return f;
        }
    };
    let t0 = Instant::now();
    f.at_ms = obs.now_ms();
    if let Err(e) = pidfd.kill() {
        f.outcome = "not killed".into();
        f.detail = Some(format!("SIGKILL to {}: {e}", before.client_pid));
        return f;
    }
    if !pidfd.wait_exit(Duration::from_secs(10)) {
        f.outcome = "did not die".into();
        f.detail = Some(format!(
            "pid {} still runs 10 s after SIGKILL",
            before.client_pid
        ));
        f.window_end_ms = obs.now_ms();
        return f;
    }
    // A new client: another pid in `baton status`.
    let deadline = t0 + rec.timeout;
    let mut last_err = None;
    let mut last_seen = None;
    let after = loop {
        match target.status() {
            // A new pid alone may be a restart attempt still preparing: wait until the
            // supervisor says it serves.
            Ok(s) if s.client_pid != before.client_pid && s.client_pid > 1 && s.serving() => {
                break Some(s);
            }
            Ok(s) => last_seen = Some(s),
            Err(e) => last_err = Some(format!("{e:#}")),
        }
        // No point waiting for a client of a mount that is gone.
        if Instant::now() > deadline || !is_mounted(&target.mountpoint) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let Some(after) = after else {
        f.outcome = "not restarted".into();
        let gone = !is_mounted(&target.mountpoint);
        f.detail = Some(match last_err {
            Some(e) if gone => {
                format!("the mount went away after the kill; last status error: {e}")
            }
            Some(e) => format!(
                "no new client within {:?} of the kill; last status error: {e}",
                rec.timeout
            ),
            None => format!(
                "no client serves {:?} after the kill; last status: {}",
                rec.timeout,
                last_seen.map_or_else(|| "none".into(), |s| s.json.to_string())
            ),
        });
        f.window_end_ms = obs.now_ms();
        return f;
    };
    f.recovered_ms = Some(ms(t0.elapsed()));
    f.restarts = after.restarts.saturating_sub(before.restarts);
    f.after = Some((&after).into());
    let progressed = obs.wait_ops(rec.progress_ops, rec.progress_timeout);
    f.window_end_ms = obs.now_ms();
    // The supervisor's measure of this recovery (crash to the first request served),
    // known once a request was served.
    let latest = target.status().ok();
    let latest = latest.as_ref().unwrap_or(&after);
    if latest.last_crash_pause_us.is_some() && latest.restarts > before.restarts {
        f.supervisor_pause_ms = latest.last_crash_pause_us.map(|us| us as f64 / 1e3);
    }
    if progressed {
        f.outcome = "restarted".into();
        f.ok = true;
    } else {
        f.outcome = "no progress".into();
        f.detail = Some(format!(
            "a new client (pid {}) is named, but the application did not complete {} operations within {:?}",
            after.client_pid, rec.progress_ops, rec.progress_timeout
        ));
    }
    f
}

/// Runs `baton upgrade` and waits until the application made progress again.
pub fn upgrade(target: &Target, opts: &Upgrade, obs: &dyn Observer, rec: Recovery) -> Fault {
    let before = target.status().ok();
    let mut f = blank(
        FaultKind::Upgrade,
        obs.now_ms(),
        before.as_ref().map(Into::into),
    );
    let out = baton_cli::upgrade_with(&target.baton, &target.home, &target.mountpoint, opts);
    let end = obs.now_ms();
    f.recovered_ms = Some(end - f.at_ms);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            f.outcome = "not run".into();
            f.detail = Some(format!("{e:#}"));
            f.window_end_ms = end;
            return f;
        }
    };
    f.supervisor_pause_ms = out.pause().map(ms);
    let after = target.status().ok();
    if let (Some(b), Some(a)) = (&before, &after) {
        f.restarts = a.restarts.saturating_sub(b.restarts);
    }
    f.after = after.as_ref().map(Into::into);
    let progressed = obs.wait_ops(rec.progress_ops, rec.progress_timeout);
    f.window_end_ms = obs.now_ms();
    if out.success {
        f.outcome = "upgraded".into();
        f.ok = progressed;
    } else if out.code == Some(EXIT_ROLLED_BACK) {
        f.outcome = "rolled-back".into();
        f.detail = Some(out.reason().map_or_else(|| out.output(), String::from));
    } else {
        f.outcome = "failed".into();
        f.detail = Some(format!("exit {:?}: {}", out.code, out.output().trim()));
    }
    if !progressed {
        let d = format!(
            "the application did not complete {} operations within {:?} after the upgrade",
            rec.progress_ops, rec.progress_timeout
        );
        f.detail = Some(match f.detail.take() {
            Some(x) => format!("{x}; {d}"),
            None => d,
        });
        f.ok = false;
    }
    f
}

/// Whether `path` is still a mountpoint.
pub fn is_mounted(path: &Path) -> bool {
    testkit::mount::is_mountpoint(path)
}
