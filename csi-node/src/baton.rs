//! Running the `baton` CLI: format on first use, mount, unmount. baton-csi never links the
//! filesystem; it drives the same commands a user types, with `BATON_HOME` on the node's
//! state directory so that every supervisor's control socket is where the next baton-csi
//! (and the upgrade machinery) will look.
//!
//! Secrets reach `baton` through its arguments and environment only; whatever `baton`
//! prints is scrubbed of them before it can become an error message.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::volume::{MountOptions, VolumeSecrets};

/// A `baton` command failed.
#[derive(Debug, thiserror::Error)]
pub enum BatonError {
    #[error("cannot run {bin}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`baton {command}` did not finish within {timeout:?}")]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("`baton {command}` failed: {output}")]
    Failed {
        command: &'static str,
        output: String,
    },
}

/// How `baton umount` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UmountOutcome {
    Unmounted,
    NotMounted,
    Busy,
}

/// The `baton` binary and the home its supervisors share.
#[derive(Clone, Debug)]
pub struct Baton {
    pub bin: PathBuf,
    pub home: PathBuf,
    /// The descriptor keeper's socket, given to the supervisors it starts
    /// (`BATON_KEEPER`).
    pub keeper: Option<PathBuf>,
}

/// Replaces every secret value in `text` by a placeholder.
pub fn scrub(text: &str, secrets: &VolumeSecrets) -> String {
    let mut values: Vec<&str> = vec![secrets.meta_url.as_str()];
    if let Some((_, storage)) = &secrets.format {
        values.push(storage);
    }
    values.extend(secrets.env.iter().map(|(_, v)| v.as_str()));
    let mut out = text.to_string();
    for v in values.into_iter().filter(|v| v.len() >= 4) {
        out = out.replace(v, "<secret>");
    }
    out
}

impl Baton {
    /// `baton` next to the running executable if it is there, else from `PATH`.
    pub fn default_bin() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("baton")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("baton"))
    }

    fn command(&self, secrets: &VolumeSecrets) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("BATON_HOME", &self.home).stdin(Stdio::null());
        if let Some(k) = &self.keeper {
            cmd.env(handover_proto::keeper::KEEPER_ENV, k);
        }
        for (k, v) in &secrets.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `cmd` to completion within `timeout`; returns success and the combined output.
    fn run(
        &self,
        command: &'static str,
        mut cmd: Command,
        timeout: Duration,
        secrets: &VolumeSecrets,
    ) -> Result<(bool, String), BatonError> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| BatonError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        // Read both pipes on threads so a chatty command cannot block on a full pipe.
        let mut out_pipe = child.stdout.take();
        let mut err_pipe = child.stderr.take();
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = out_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(p) = err_pipe.as_mut() {
                let _ = p.read_to_string(&mut s);
            }
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(BatonError::Timeout { command, timeout });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(source) => {
                    return Err(BatonError::Spawn {
                        bin: self.bin.clone(),
                        source,
                    });
                }
            }
        };
        let out = out_t.join().unwrap_or_default() + &err_t.join().unwrap_or_default();
        Ok((status.success(), scrub(out.trim(), secrets)))
    }

    /// Formats the volume if the secrets ask for it and it is not formatted yet.
    pub fn format_if_missing(
        &self,
        secrets: &VolumeSecrets,
        timeout: Duration,
    ) -> Result<(), BatonError> {
        let Some((name, storage)) = &secrets.format else {
            return Ok(());
        };
        let mut cmd = self.command(secrets);
        cmd.args([
            "format",
            name,
            "--meta",
            &secrets.meta_url,
            "--storage",
            storage,
        ]);
        let (ok, output) = self.run("format", cmd, timeout, secrets)?;
        if ok || output.contains("already formatted") {
            return Ok(());
        }
        Err(BatonError::Failed {
            command: "format",
            output,
        })
    }

    /// `baton mount MOUNTPOINT --meta URL --background`: returns once the mount serves;
    /// the supervisor runs on detached, in its own session.
    pub fn mount_background(
        &self,
        mountpoint: &Path,
        secrets: &VolumeSecrets,
        options: &MountOptions,
        timeout: Duration,
    ) -> Result<(), BatonError> {
        let mut cmd = self.command(secrets);
        cmd.arg("--log-format")
            .arg("json")
            .arg("mount")
            .arg(mountpoint)
            .args(["--meta", &secrets.meta_url, "--background"])
            .args(options.args());
        let (ok, output) = self.run("mount", cmd, timeout, secrets)?;
        if ok {
            Ok(())
        } else {
            Err(BatonError::Failed {
                command: "mount",
                output,
            })
        }
    }

    /// `baton umount MOUNTPOINT [--lazy]`.
    pub fn umount(
        &self,
        mountpoint: &Path,
        lazy: bool,
        timeout: Duration,
    ) -> Result<UmountOutcome, BatonError> {
        let none = VolumeSecrets {
            meta_url: String::new(),
            format: None,
            env: Vec::new(),
        };
        let mut cmd = self.command(&none);
        cmd.arg("umount").arg(mountpoint);
        if lazy {
            cmd.arg("--lazy");
        }
        let (ok, output) = self.run("umount", cmd, timeout, &none)?;
        if ok {
            Ok(UmountOutcome::Unmounted)
        } else if output.contains("is busy") {
            Ok(UmountOutcome::Busy)
        } else if output.contains("not mounted") {
            Ok(UmountOutcome::NotMounted)
        } else {
            Err(BatonError::Failed {
                command: "umount",
                output,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_every_secret_value() {
        let s = VolumeSecrets {
            meta_url: "redis://:pw@db:6379/1".into(),
            format: Some(("vol".into(), "s3://bucket?secret_access_key=zzzz".into())),
            env: vec![("AWS_SECRET_ACCESS_KEY".into(), "abcd1234".into())],
        };
        let text = "cannot open redis://:pw@db:6379/1 with s3://bucket?secret_access_key=zzzz key abcd1234";
        let out = scrub(text, &s);
        assert!(
            !out.contains("pw@db") && !out.contains("zzzz") && !out.contains("abcd1234"),
            "{out}"
        );
    }
}
