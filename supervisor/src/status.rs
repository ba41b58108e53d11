//! `baton status [MOUNTPOINT] [--json]`: ask supervisors how their mounts are.

use std::path::{Path, PathBuf};
use std::time::Duration;

use handover_proto::control::{
    ClientHealth, ControlRequest, ControlResponse, FuseMode, MountStatus,
};

use crate::control::{self, RequestError};
use crate::home::Home;
use crate::mount;
use crate::umount::resolve;

const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A status query failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot query the supervisor of {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: RequestError,
    },
    #[error("the supervisor of {path} answered {answer}")]
    Unexpected { path: PathBuf, answer: String },
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error(
        "no supervisor answers for {0}, but its client serves and waits for one: run `baton mount {0}` with the options the mount was made with to adopt it"
    )]
    Unsupervised(PathBuf),
}

/// A mount's status, its client's health, and how it survives a crash (`None` from a
/// supervisor that predates [`ControlRequest::Describe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub status: MountStatus,
    pub health: ClientHealth,
    pub fuse: Option<FuseMode>,
}

/// The status of the mount at `mountpoint`.
pub fn status(home: &Home, mountpoint: &Path) -> Result<Report, StatusError> {
    let mp = resolve(mountpoint);
    let asked = match control::request(home, &mp, &ControlRequest::Describe, STATUS_TIMEOUT) {
        // A supervisor that cannot decode `Describe` closes the connection: ask Health.
        Err(RequestError::Recv(e)) if e.is_closed() => {
            control::request(home, &mp, &ControlRequest::Health, STATUS_TIMEOUT)
        }
        other => other,
    };
    match asked {
        Ok(ControlResponse::Description(d)) => Ok(Report {
            status: d.status,
            health: d.health,
            fuse: Some(d.fuse),
        }),
        Ok(ControlResponse::Health { status, health }) => Ok(Report {
            status,
            health,
            fuse: None,
        }),
        Ok(other) => Err(StatusError::Unexpected {
            path: mp,
            answer: format!("{other:?}"),
        }),
        // The mount table, not a stat of the mountpoint: with no client serving, a stat
        // would wait.
        Err(RequestError::NoSupervisor(_))
            if handover_proto::rendezvous::adopt_socket_path(home.path(), &mp).exists()
                && crate::mount::mount_at(&mp).is_ok_and(|e| e.is_some()) =>
        {
            Err(StatusError::Unsupervised(mp))
        }
        Err(source) => Err(StatusError::Control { path: mp, source }),
    }
}

/// The status of every Baton mount of this host (those whose supervisor does not answer
/// are reported as errors).
pub fn status_all(home: &Home) -> Result<Vec<Result<Report, StatusError>>, StatusError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(StatusError::Mountinfo)?;
    Ok(mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|e| e.fstype == mount::FSTYPE)
        .map(|e| status(home, &e.mountpoint))
        .collect())
}

/// Microseconds as milliseconds with microsecond precision (`1.234 ms`).
pub fn millis(us: u64) -> String {
    format!("{}.{:03} ms", us / 1000, us % 1000)
}

/// One mount as a JSON object whose keys are the fields of [`MountStatus`] and
/// [`ClientHealth`].
pub fn to_json(r: &Report) -> serde_json::Value {
    let (s, h) = (&r.status, &r.health);
    serde_json::json!({
        "mountpoint": s.mountpoint.display().to_string(),
        "volume": s.volume,
        "meta_url": s.meta_url,
        "supervisor_pid": s.supervisor_pid,
        "generation": s.generation.0,
        "client_pid": s.client_pid,
        "client_version": s.client_version,
        "uptime_ms": s.uptime_ms,
        "fuse_minor": s.fuse_minor,
        "max_write": s.max_write,
        "resend": s.resend,
        "upgrades": s.upgrades,
        "rollbacks": s.rollbacks,
        "restarts": s.restarts,
        "last_pause_us": s.last_pause_us,
        "last_rollback": s.last_rollback,
        "state": h.state,
        "reason": h.reason,
        "restart_attempts": h.restart_attempts,
        "next_attempt_ms": h.next_attempt_ms,
        "last_crash": h.last_crash,
        "last_crash_pause_us": h.last_crash_pause_us,
        "kernel_resend": r.fuse.map(|f| f.kernel_resend),
        "resend_disabled": r.fuse.map(|f| f.resend_disabled),
        "request_log": r.fuse.map(|f| f.request_log),
        "resend_mode": resend_mode(r),
    })
}

/// `resend`, `disabled` or `unavailable` (`None`: the supervisor does not say).
fn resend_mode(r: &Report) -> Option<&'static str> {
    r.fuse.map(|f| {
        if f.resend() {
            "resend"
        } else if f.kernel_resend {
            "disabled"
        } else {
            "unavailable"
        }
    })
}

/// One human-readable block per mount.
pub fn render(r: &Report) -> String {
    let (s, h) = (&r.status, &r.health);
    let state = match &h.reason {
        Some(why) => format!("  state:      {}: {why}\n", h.state),
        None => format!("  state:      {}\n", h.state),
    };
    let crash = h.last_crash.as_ref().map_or_else(String::new, |c| {
        let pause = h
            .last_crash_pause_us
            .map_or_else(String::new, |p| format!(" (recovered in {})", millis(p)));
        format!("  last crash: {c}{pause}\n")
    });
    let up = Duration::from_millis(s.uptime_ms).as_secs();
    let resend = match (r.fuse, s.resend) {
        (Some(f), _) if f.resend() => "resend available".to_string(),
        (Some(f), _) => {
            let why = if f.kernel_resend {
                "resend disabled (--no-resend)"
            } else {
                "resend unavailable"
            };
            let crash = if f.request_log {
                "crashes answer from the request log"
            } else {
                "no request log: a crash leaves what the client had read unanswered"
            };
            format!("{why}: upgrades drain, {crash}")
        }
        (None, true) => "resend available".to_string(),
        (None, false) => "no resend: upgrades drain".to_string(),
    };
    let pause = s
        .last_pause_us
        .map_or_else(String::new, |p| format!(", last pause {}", millis(p)));
    let rollback = s
        .last_rollback
        .as_ref()
        .map_or_else(String::new, |r| format!("  last rollback: {r}\n"));
    format!(
        "{mp}\n{state}  volume:     {vol} ({meta})\n  supervisor: pid {sp}, up {hh}h{m:02}m{sec:02}s\n  client:     generation {g}, pid {cp}, version {v}\n  fuse:       ABI 7.{minor}, max_write {mw}, {resend}\n  upgrades:   {ups} done, {rbs} rolled back, {rs} client restarts{pause}\n{rollback}{crash}",
        ups = s.upgrades,
        rbs = s.rollbacks,
        rs = s.restarts,
        mp = s.mountpoint.display(),
        vol = s.volume,
        meta = s.meta_url,
        sp = s.supervisor_pid,
        hh = up / 3600,
        m = up / 60 % 60,
        sec = up % 60,
        g = s.generation,
        cp = s.client_pid,
        v = s.client_version,
        minor = s.fuse_minor,
        mw = s.max_write,
    )
}
