//! Driving the `baton` CLI the way an operator does: `baton upgrade` with its exit status
//! and output, `baton status --json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::mount::baton_bin;

/// `baton upgrade MOUNTPOINT` options.
#[derive(Clone, Debug, Default)]
pub struct Upgrade {
    /// `--binary PATH`.
    pub binary: Option<PathBuf>,
    /// `--timeout SECS`.
    pub timeout_secs: Option<f64>,
    /// `--drain`: finish every request read instead of parking them for a resend.
    pub drain: bool,
}

/// Exit status of `baton upgrade` when it rolled back (the old client serves on).
pub const EXIT_ROLLED_BACK: i32 = 3;

/// What one `baton upgrade` did.
#[derive(Clone, Debug)]
pub struct UpgradeOutcome {
    /// Exit status 0: upgraded. [`EXIT_ROLLED_BACK`]: rolled back. Else an error.
    pub success: bool,
    pub code: Option<i32>,
    /// The `--json` report: `outcome`, `mode`, `pause_us`, `reason`, generations and
    /// versions (`None` if the command printed none).
    pub report: Option<serde_json::Value>,
    pub stdout: String,
    pub stderr: String,
    /// Wall time of the command.
    pub wall: Duration,
}

impl UpgradeOutcome {
    fn field(&self, k: &str) -> Option<&serde_json::Value> {
        self.report
            .as_ref()
            .and_then(|r| r.get(k))
            .filter(|v| !v.is_null())
    }

    /// `upgraded` or `rolled-back`.
    pub fn outcome(&self) -> Option<&str> {
        self.field("outcome").and_then(|v| v.as_str())
    }

    /// `resend` or `drain`, once chosen.
    pub fn mode(&self) -> Option<&str> {
        self.field("mode").and_then(|v| v.as_str())
    }

    /// Why it rolled back.
    pub fn reason(&self) -> Option<&str> {
        self.field("reason").and_then(|v| v.as_str())
    }

    /// The pause the supervisor measured (freeze to first request served).
    pub fn pause(&self) -> Option<Duration> {
        self.field("pause_us")
            .and_then(number)
            .map(Duration::from_micros)
    }

    /// stdout and stderr together, for messages and for looking for words.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `baton upgrade MOUNTPOINT --json ...` with `BATON_HOME=home`.
pub fn upgrade(home: &Path, mountpoint: &Path, opts: &Upgrade) -> anyhow::Result<UpgradeOutcome> {
    upgrade_with(&baton_bin(), home, mountpoint, opts)
}

/// [`upgrade`] with the `baton` executable `baton`.
pub fn upgrade_with(
    baton: &Path,
    home: &Path,
    mountpoint: &Path,
    opts: &Upgrade,
) -> anyhow::Result<UpgradeOutcome> {
    let mut cmd = Command::new(baton);
    cmd.arg("upgrade")
        .arg(mountpoint)
        .arg("--json")
        .env("BATON_HOME", home);
    if let Some(b) = &opts.binary {
        cmd.arg("--binary").arg(b);
    }
    if let Some(t) = opts.timeout_secs {
        cmd.arg("--timeout").arg(t.to_string());
    }
    if opts.drain {
        cmd.arg("--drain");
    }
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {} upgrade", baton.display()))?;
    Ok(UpgradeOutcome {
        success: out.status.success(),
        code: out.status.code(),
        report: serde_json::from_slice(&out.stdout).ok(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        wall: start.elapsed(),
    })
}

/// The fields of `baton status --json` the tests rely on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub generation: u64,
    pub client_pid: u64,
    pub client_version: String,
    pub upgrades: u64,
    pub rollbacks: u64,
    pub restarts: u64,
    pub resend: bool,
    pub last_pause_us: Option<u64>,
    pub last_rollback: Option<String>,
    /// `serving`, `upgrading`, `rolling back`, `restarting` (`None` from a supervisor
    /// that does not report it).
    pub state: Option<String>,
    /// The pause of the last crash recovery the supervisor measured (crash to the first
    /// request served).
    pub last_crash_pause_us: Option<u64>,
    /// The whole document.
    pub json: serde_json::Value,
}

/// A number, or a newtype around one however it was serialised (`5`, `[5]`, `{"0": 5}`).
fn number(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::Array(a) => a.first().and_then(number),
        serde_json::Value::Object(o) if o.len() == 1 => o.values().next().and_then(number),
        _ => None,
    }
}

impl Status {
    /// The supervisor's pid (0 if the status has none).
    /// Whether the supervisor says a client serves (a supervisor that does not report
    /// its state is taken to serve when it answers).
    pub fn serving(&self) -> bool {
        self.state.as_deref().is_none_or(|s| s == "serving")
    }

    pub fn supervisor_pid(&self) -> u64 {
        self.json
            .get("supervisor_pid")
            .and_then(number)
            .unwrap_or(0)
    }

    /// Reads the fields from one mount's JSON object.
    pub fn from_json(json: serde_json::Value) -> anyhow::Result<Status> {
        let get = |k: &str| {
            json.get(k)
                .with_context(|| format!("`{k}` missing in {json}"))
        };
        let num = |k: &str| -> anyhow::Result<u64> {
            number(get(k)?).with_context(|| format!("`{k}` is not a number in {json}"))
        };
        let opt_num = |k: &str| json.get(k).and_then(number);
        Ok(Status {
            generation: num("generation")?,
            client_pid: num("client_pid")?,
            client_version: get("client_version")?
                .as_str()
                .context("client_version is not a string")?
                .to_string(),
            upgrades: num("upgrades")?,
            rollbacks: opt_num("rollbacks").unwrap_or(0),
            restarts: opt_num("restarts").unwrap_or(0),
            resend: json
                .get("resend")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            last_pause_us: opt_num("last_pause_us"),
            last_rollback: json
                .get("last_rollback")
                .and_then(|v| v.as_str())
                .map(String::from),
            state: json.get("state").and_then(|v| v.as_str()).map(String::from),
            last_crash_pause_us: opt_num("last_crash_pause_us"),
            json,
        })
    }
}

/// `baton status MOUNTPOINT --json`.
pub fn status(home: &Path, mountpoint: &Path) -> anyhow::Result<Status> {
    status_with(&baton_bin(), home, mountpoint)
}

/// [`status`] with the `baton` executable `baton`.
pub fn status_with(baton: &Path, home: &Path, mountpoint: &Path) -> anyhow::Result<Status> {
    let out = Command::new(baton)
        .arg("status")
        .arg(mountpoint)
        .arg("--json")
        .env("BATON_HOME", home)
        .output()
        .context("running baton status --json")?;
    if !out.status.success() {
        bail!(
            "baton status --json failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "baton status --json printed {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    // One mount asked for: an object, or a list holding it.
    let one = match v {
        serde_json::Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
        other => other,
    };
    Status::from_json(one)
}

/// Whether this `baton` has the `upgrade` command (the live-upgrade work may not have
/// landed in the tree being tested).
pub fn has_upgrade() -> bool {
    Command::new(baton_bin())
        .args(["upgrade", "--help"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_whatever_the_newtype_encoding() {
        let j = serde_json::json!({
            "generation": {"0": 3}, "client_pid": 42, "client_version": "0.1.0-alt",
            "upgrades": 2, "rollbacks": 1, "resend": true, "last_pause_us": null
        });
        let s = Status::from_json(j).unwrap();
        assert_eq!(
            (
                s.generation,
                s.client_pid,
                s.client_version.as_str(),
                s.upgrades,
                s.rollbacks
            ),
            (3, 42, "0.1.0-alt", 2, 1)
        );
        assert!(s.resend);
        assert_eq!(s.last_pause_us, None);
    }
}
