//! A Baton mount for tests, made with the real `baton` CLI like a user would, and torn
//! down (unmounted, processes killed and reaped) when dropped, even if the test failed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the `baton` binary is: `BATON_BIN`, else next to the test executable's
/// `target/<profile>` directory.
pub fn baton_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BATON_BIN") {
        return PathBuf::from(p);
    }
    target_dir().join("baton")
}

/// `target/<profile>`, derived from the running test binary (`target/<profile>/deps/x`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Runs `baton` with `args` and `BATON_HOME=home`.
pub fn baton(home: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(baton_bin())
        .args(args)
        .env("BATON_HOME", home)
        .output()
        .with_context(|| format!("running {} {args:?}", baton_bin().display()))
}

/// Options of a test mount.
#[derive(Clone, Debug, Default)]
pub struct MountOptions {
    /// `--meta URL`; `None` uses the embedded default volume.
    pub meta: Option<String>,
    /// Extra `baton mount` arguments.
    pub args: Vec<String>,
}

/// A mounted volume.
#[derive(Debug)]
pub struct TestMount {
    pub mountpoint: PathBuf,
    pub home: PathBuf,
    mounted: bool,
    _dir: Option<tempfile::TempDir>,
}

impl TestMount {
    /// Mounts in a new temporary directory with its own `BATON_HOME`.
    pub fn new(opts: &MountOptions) -> anyhow::Result<TestMount> {
        let dir = tempfile::Builder::new().prefix("baton-test-").tempdir()?;
        let home = dir.path().join("home");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let mut m = Self::at(&home, &mnt, opts)?;
        m._dir = Some(dir);
        Ok(m)
    }

    /// Mounts at `mountpoint` with `BATON_HOME=home` (both kept by the caller).
    pub fn at(home: &Path, mountpoint: &Path, opts: &MountOptions) -> anyhow::Result<TestMount> {
        std::fs::create_dir_all(mountpoint)?;
        let mut args: Vec<String> = vec![
            "mount".into(),
            mountpoint.display().to_string(),
            "--background".into(),
        ];
        if let Some(meta) = &opts.meta {
            args.push("--meta".into());
            args.push(meta.clone());
        }
        args.extend(opts.args.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = baton(home, &argv)?;
        let m = TestMount {
            mountpoint: mountpoint.to_path_buf(),
            home: home.to_path_buf(),
            mounted: true,
            _dir: None,
        };
        if !out.status.success() {
            bail!(
                "baton mount failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !is_mountpoint(mountpoint) {
            bail!(
                "baton mount returned but {} is not mounted",
                mountpoint.display()
            );
        }
        Ok(m)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// `baton umount`; an error if it fails (the Drop guard still cleans up).
    pub fn umount(mut self) -> anyhow::Result<()> {
        self.umount_inner()
    }

    fn umount_inner(&mut self) -> anyhow::Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let mp = self.mountpoint.display().to_string();
        // Tests run in parallel and some fork: a forked child briefly holds copies of
        // every open file of the test process, which makes another test's mount busy.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = baton(&self.home, &["umount", &mp])?;
            if out.status.success() {
                break;
            }
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            if !err.contains("busy") || Instant::now() > deadline {
                bail!("baton umount failed: {err}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        while is_mountpoint(&self.mountpoint) {
            if Instant::now() > deadline {
                bail!(
                    "{} still mounted after baton umount",
                    self.mountpoint.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.mounted = false;
        Ok(())
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        // The processes of this mount, asked before anything is torn down.
        let pids = self.pids();
        if self.umount_inner().is_err() {
            // Last resort: detach the mount so the test machine is not left with it, and
            // stop this mount's supervisor and client (by pid, nothing else).
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
            for pid in pids {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

impl TestMount {
    /// The supervisor and client pids `baton status --json` reports for this mount.
    pub fn pids(&self) -> Vec<i32> {
        let mp = self.mountpoint.display().to_string();
        let Ok(out) = baton(&self.home, &["status", &mp, "--json"]) else {
            return Vec::new();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        ["supervisor_pid", "client_pid"]
            .iter()
            .filter_map(|key| json_number(&text, key))
            .filter_map(|n| i32::try_from(n).ok())
            .filter(|&n| n > 1)
            .collect()
    }
}

/// The number after `"key":` in a flat JSON object (enough for `baton status --json`).
fn json_number(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\""))?;
    let rest = &text[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether `path` is a mountpoint (in /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

#[cfg(test)]
mod tests {
    use super::json_number;

    #[test]
    fn reads_pids_from_status_json() {
        let text =
            r#"{"mountpoint": "/m", "supervisor_pid": 1234, "client_pid":  99, "x": "client_pid"}"#;
        assert_eq!(json_number(text, "supervisor_pid"), Some(1234));
        assert_eq!(json_number(text, "client_pid"), Some(99));
        assert_eq!(json_number(text, "missing"), None);
    }
}
