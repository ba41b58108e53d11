//! `baton upgrade MOUNTPOINT [--binary PATH] [--timeout SECS] [--drain]`: ask the mount's
//! supervisor for a live upgrade, wait for its outcome, and say it.
//!
//! Output (stdout), then the exit status ([`UpgradeAnswer::exit_code`]):
//!
//! ```text
//! upgraded /mnt/data: generation 1 (0.1.0) -> 2 (0.2.0), resend mode
//!   pause 1.234 ms (3 requests handed over), total 48.102 ms
//!
//! rolled back /mnt/data: generation 1 (0.1.0) serves on
//!   reason: capability mismatch: the new client cannot take over ...
//!   pause 0.000 ms, total 12.040 ms
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use handover_proto::control::{ControlRequest, ControlResponse, UpgradeReport};
use handover_proto::message::FreezeMode;

use crate::control::{self, RequestError};
use crate::home::Home;
use crate::status::millis;
use crate::umount::resolve;

/// How much longer than its own timeout `baton upgrade` waits for the answer: a rollback
/// (thaw, shutdown of the new client) or, after the commit, restarts take their time.
const ANSWER_SLACK: Duration = Duration::from_secs(600);

/// What `baton upgrade` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeCommand {
    pub mountpoint: PathBuf,
    /// `None`: the serving client's binary.
    pub binary: Option<PathBuf>,
    pub timeout: Duration,
    pub force_drain: bool,
    /// New block cache directory for the new client.
    pub cache_dir: Option<PathBuf>,
    /// New block cache bound (bytes) for the new client.
    pub cache_bytes: Option<u64>,
}

/// `baton upgrade` could not get an outcome.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeCommandError {
    #[error("cannot reach the supervisor of {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: RequestError,
    },
    #[error("the supervisor of {path} refused the upgrade: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("the supervisor of {path} answered {answer}")]
    Unexpected { path: PathBuf, answer: String },
}

/// The outcome of a `baton upgrade`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeAnswer {
    Upgraded(UpgradeReport),
    RolledBack(UpgradeReport),
}

impl UpgradeAnswer {
    /// 0 when the new client serves, 3 when the upgrade rolled back (1 is left to errors,
    /// 2 to command-line mistakes).
    pub fn exit_code(&self) -> u8 {
        match self {
            UpgradeAnswer::Upgraded(_) => 0,
            UpgradeAnswer::RolledBack(_) => 3,
        }
    }

    pub fn report(&self) -> &UpgradeReport {
        match self {
            UpgradeAnswer::Upgraded(r) | UpgradeAnswer::RolledBack(r) => r,
        }
    }
}

/// An absolute path for the supervisor (whose working directory is not the caller's).
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
}

/// Sends the upgrade request and waits for its outcome.
pub fn upgrade(home: &Home, cmd: &UpgradeCommand) -> Result<UpgradeAnswer, UpgradeCommandError> {
    let mp = resolve(&cmd.mountpoint);
    let request = ControlRequest::Upgrade {
        binary: cmd.binary.as_deref().map(absolute),
        timeout_ms: u64::try_from(cmd.timeout.as_millis()).unwrap_or(u64::MAX),
        force_drain: cmd.force_drain,
        cache_dir: cmd.cache_dir.as_deref().map(absolute),
        cache_bytes: cmd.cache_bytes,
    };
    let wait = cmd.timeout.saturating_add(ANSWER_SLACK);
    match control::request(home, &mp, &request, wait) {
        Ok(ControlResponse::Upgraded(r)) => Ok(UpgradeAnswer::Upgraded(r)),
        Ok(ControlResponse::RolledBack(r)) => Ok(UpgradeAnswer::RolledBack(r)),
        Ok(ControlResponse::Error { message }) => {
            Err(UpgradeCommandError::Refused { path: mp, message })
        }
        Ok(other) => Err(UpgradeCommandError::Unexpected {
            path: mp,
            answer: format!("{other:?}"),
        }),
        Err(source) => Err(UpgradeCommandError::Control { path: mp, source }),
    }
}

/// `baton upgrade MOUNTPOINT --supervisor PATH` succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorUpgrade {
    pub old_pid: u32,
    pub new_pid: u32,
    pub new_version: String,
}

/// Asks the supervisor of the mount to hand the mount to a new supervisor process of
/// `binary` and waits for the outcome. `Refused` carries why it did not (the old
/// supervisor serves on).
pub fn upgrade_supervisor(
    home: &Home,
    mountpoint: &Path,
    binary: &Path,
    timeout: Duration,
) -> Result<SupervisorUpgrade, UpgradeCommandError> {
    let mp = resolve(mountpoint);
    let request = ControlRequest::UpgradeSupervisor {
        binary: absolute(binary),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let wait = timeout.saturating_add(ANSWER_SLACK);
    match control::request(home, &mp, &request, wait) {
        Ok(ControlResponse::SupervisorUpgraded {
            old_pid,
            new_pid,
            new_version,
        }) => Ok(SupervisorUpgrade {
            old_pid,
            new_pid,
            new_version,
        }),
        Ok(ControlResponse::Error { message }) => {
            Err(UpgradeCommandError::Refused { path: mp, message })
        }
        Ok(other) => Err(UpgradeCommandError::Unexpected {
            path: mp,
            answer: format!("{other:?}"),
        }),
        Err(source) => Err(UpgradeCommandError::Control { path: mp, source }),
    }
}

fn requests(n: u32) -> String {
    if n == 1 {
        "1 request".into()
    } else {
        format!("{n} requests")
    }
}

fn mode(m: Option<FreezeMode>) -> &'static str {
    match m {
        Some(FreezeMode::Resend) => "resend mode",
        Some(FreezeMode::Drain | FreezeMode::DrainLog) => "drain mode",
        None => "no mode chosen",
    }
}

/// The outcome for a human.
pub fn render(mountpoint: &Path, answer: &UpgradeAnswer) -> String {
    let r = answer.report();
    let mp = mountpoint.display();
    match answer {
        // No mode: the upgrade came while the client was being restarted after a crash;
        // the pause is from that crash.
        UpgradeAnswer::Upgraded(_) if r.mode.is_none() => format!(
            "upgraded {mp}: generation {} ({}) had died; generation {} ({}) serves in its place\n  pause since the crash {}, total {}\n",
            r.old_generation,
            r.old_version,
            r.new_generation,
            r.new_version,
            millis(r.pause_us),
            millis(r.total_us),
        ),
        UpgradeAnswer::Upgraded(_) => format!(
            "upgraded {mp}: generation {} ({}) -> {} ({}), {}\n  pause {} ({} handed over), total {}\n",
            r.old_generation,
            r.old_version,
            r.new_generation,
            r.new_version,
            mode(r.mode),
            millis(r.pause_us),
            requests(r.handed_over_requests),
            millis(r.total_us),
        ),
        UpgradeAnswer::RolledBack(_) => {
            let serves = if r.new_generation == r.old_generation {
                format!(
                    "generation {} ({}) serves on",
                    r.old_generation, r.old_version
                )
            } else {
                format!(
                    "generation {} ({}) serves in place of {} ({})",
                    r.new_generation, r.new_version, r.old_generation, r.old_version
                )
            };
            format!(
                "rolled back {mp}: {serves}\n  reason: {}\n  pause {}, total {}\n",
                r.reason.as_deref().unwrap_or("unknown"),
                millis(r.pause_us),
                millis(r.total_us),
            )
        }
    }
}

/// The outcome as JSON (`outcome`: `upgraded` or `rolled-back`, then the report's fields).
pub fn to_json(answer: &UpgradeAnswer) -> serde_json::Value {
    let r = answer.report();
    let outcome = match answer {
        UpgradeAnswer::Upgraded(_) => "upgraded",
        UpgradeAnswer::RolledBack(_) => "rolled-back",
    };
    serde_json::json!({
        "outcome": outcome,
        "old_generation": r.old_generation.0,
        "old_version": r.old_version,
        "new_generation": r.new_generation.0,
        "new_version": r.new_version,
        "mode": r.mode.map(|m| match m {
            FreezeMode::Resend => "resend",
            FreezeMode::Drain | FreezeMode::DrainLog => "drain",
        }),
        "pause_us": r.pause_us,
        "handed_over_requests": r.handed_over_requests,
        "total_us": r.total_us,
        "reason": r.reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use handover_proto::message::Generation;

    fn report(reason: Option<&str>, new: u64) -> UpgradeReport {
        UpgradeReport {
            old_generation: Generation(1),
            old_version: "0.1.0".into(),
            new_generation: Generation(new),
            new_version: "0.2.0".into(),
            mode: Some(FreezeMode::Resend),
            pause_us: 1234,
            handed_over_requests: 3,
            total_us: 48_102,
            reason: reason.map(String::from),
        }
    }

    #[test]
    fn renders_outcomes() {
        let mp = Path::new("/mnt/data");
        let up = UpgradeAnswer::Upgraded(report(None, 2));
        assert_eq!(
            render(mp, &up),
            "upgraded /mnt/data: generation 1 (0.1.0) -> 2 (0.2.0), resend mode\n  pause 1.234 ms (3 requests handed over), total 48.102 ms\n"
        );
        assert_eq!(up.exit_code(), 0);
        let mut r = report(Some("timed out"), 1);
        r.new_version = "0.1.0".into();
        let back = UpgradeAnswer::RolledBack(r);
        assert_eq!(
            render(mp, &back),
            "rolled back /mnt/data: generation 1 (0.1.0) serves on\n  reason: timed out\n  pause 1.234 ms, total 48.102 ms\n"
        );
        assert_eq!(back.exit_code(), 3);
        let restarted = UpgradeAnswer::RolledBack(report(Some("died"), 3));
        assert!(
            render(mp, &restarted).contains("generation 3 (0.2.0) serves in place of 1 (0.1.0)")
        );
        assert_eq!(to_json(&back)["outcome"], "rolled-back");
        assert_eq!(to_json(&up)["pause_us"], 1234);
    }
}
