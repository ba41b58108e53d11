//! Runs a binary upgrade of one backend: `baton upgrade MOUNTPOINT --binary PATH --json`
//! against the supervisor's control socket, found through `BATON_HOME` on the node's
//! state directory — the same host path in a mount pod (pod mode) and for a detached
//! supervisor (process mode), so both modes take this one path. No `kubectl exec`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

use crate::baton::Baton;

/// What `baton upgrade --json` printed (the fields baton-csi uses).
#[derive(Clone, Debug, Deserialize)]
struct UpgradeAnswer {
    outcome: String,
    new_generation: u64,
    old_generation: u64,
    pause_us: u64,
    reason: Option<String>,
}

/// How a binary upgrade of one mount ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The new client serves.
    Upgraded { generation: u64, pause_ms: u64 },
    /// The new client did not take over; the old one serves on.
    RolledBack { generation: u64, reason: String },
    /// The upgrade could not be attempted or its answer is unknown; the mount was not
    /// changed by baton-csi.
    Failed {
        generation: Option<u64>,
        reason: String,
    },
}

/// `baton` with its home on the node's state directory.
#[derive(Clone, Debug)]
pub struct Executor {
    pub baton: Baton,
    /// Bound on the whole `baton upgrade` command (its own `--timeout` is inside it).
    pub timeout: Duration,
}

/// Output of a `baton` command, its exit code and whether it finished in time.
async fn run(
    baton: &Baton,
    args: &[&std::ffi::OsStr],
    timeout: Duration,
) -> Result<(Option<i32>, String, String), String> {
    let mut cmd = tokio::process::Command::new(&baton.bin);
    cmd.args(args)
        .env("BATON_HOME", &baton.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", baton.bin.display()))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )),
        Ok(Err(e)) => Err(format!("waiting for baton: {e}")),
        Err(_) => Err(format!("baton did not answer within {timeout:?}")),
    }
}

/// What `baton status --json` says of one mount (the fields baton-csi uses).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MountState {
    pub supervisor_pid: u64,
    pub generation: u64,
    pub client_version: String,
    /// Upgrades and rollbacks since this supervisor took charge.
    pub upgrades: u64,
    #[serde(default)]
    pub rollbacks: u64,
    pub last_pause_us: Option<u64>,
    pub last_rollback: Option<String>,
    /// `serving`, `upgrading`, `rolling back`, `restarting` or `ended`.
    #[serde(default)]
    pub state: Option<String>,
}

impl Executor {
    /// The mount as its supervisor reports it (`baton status --json`); `None` if no
    /// supervisor answers.
    pub async fn state(&self, mountpoint: &Path) -> Option<MountState> {
        let args = ["status".as_ref(), mountpoint.as_os_str(), "--json".as_ref()];
        let (code, out, _) = run(&self.baton, &args, Duration::from_secs(10))
            .await
            .ok()?;
        if code != Some(0) {
            return None;
        }
        serde_json::from_str::<MountState>(&out).ok()
    }

    /// The generation serving `mountpoint` (`baton status --json`).
    pub async fn generation(&self, mountpoint: &Path) -> Option<u64> {
        self.state(mountpoint).await.map(|s| s.generation)
    }

    /// Upgrades the client of `mountpoint` to `binary`.
    pub async fn upgrade(&self, mountpoint: &Path, binary: &Path) -> UpgradeOutcome {
        let args = [
            "upgrade".as_ref(),
            mountpoint.as_os_str(),
            "--binary".as_ref(),
            binary.as_os_str(),
            "--json".as_ref(),
        ];
        let (code, out, err) = match run(&self.baton, &args, self.timeout).await {
            Ok(r) => r,
            Err(reason) => {
                return UpgradeOutcome::Failed {
                    generation: self.generation(mountpoint).await,
                    reason,
                };
            }
        };
        match (code, serde_json::from_str::<UpgradeAnswer>(&out)) {
            (Some(0), Ok(a)) if a.outcome == "upgraded" => UpgradeOutcome::Upgraded {
                generation: a.new_generation,
                pause_ms: a.pause_us.div_ceil(1000),
            },
            (_, Ok(a)) => UpgradeOutcome::RolledBack {
                generation: a.old_generation,
                reason: a.reason.unwrap_or_else(|| format!("outcome {}", a.outcome)),
            },
            (_, Err(_)) => UpgradeOutcome::Failed {
                generation: self.generation(mountpoint).await,
                reason: if err.is_empty() {
                    format!("baton upgrade exited with {code:?}")
                } else {
                    err.lines().last().unwrap_or_default().to_string()
                },
            },
        }
    }
}
