//! Shared by the end-to-end tests: mounts, workload settings, upgrade steps, wrapper
//! scripts for faulty successors.
#![allow(dead_code)] // Each test file uses its own part.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::mount::{MountOptions, TestMount, target_dir};
use upgrade_tests::baton_cli::{self, Status, Upgrade, UpgradeOutcome};
use upgrade_tests::workload::{self, Config, Report, Running};

/// Fails the test unless this `baton` has `upgrade`.
pub fn require_upgrade() {
    assert!(
        baton_cli::has_upgrade(),
        "`{} upgrade --help` fails: this build has no live upgrade yet",
        testkit::mount::baton_bin().display()
    );
}

/// A workload small enough to set up in a second or two, busy enough to have requests
/// in flight at every moment of an upgrade.
pub fn workload_config(seed: u64) -> Config {
    Config::small(seed)
}

pub fn start_workload(m: &TestMount, seed: u64) -> Running {
    let run = workload::start(&m.mountpoint, workload_config(seed)).expect("workload start");
    assert!(
        run.wait_ops(200, Duration::from_secs(30)),
        "the workload does not make progress on a fresh mount"
    );
    run
}

/// Stops the workload, prints its summary and asserts it saw nothing wrong.
pub fn stop_clean(run: Running) -> Report {
    let report = run.stop();
    println!("{}", report.summary());
    assert!(
        report.is_clean(),
        "the application saw errors:\n{}",
        report.summary()
    );
    report
}

pub fn status(m: &TestMount) -> Status {
    baton_cli::status(&m.home, &m.mountpoint).expect("baton status --json")
}

pub fn upgrade(m: &TestMount, opts: &Upgrade) -> UpgradeOutcome {
    baton_cli::upgrade(&m.home, &m.mountpoint, opts).expect("running baton upgrade")
}

/// `baton-fs` and `baton-fs-alt`, next to `baton`.
pub fn client_bin() -> PathBuf {
    target_dir().join("baton-fs")
}

pub fn alt_bin() -> PathBuf {
    let p = target_dir().join("baton-fs-alt");
    assert!(
        p.exists(),
        "{} is missing: build it (cargo build -p upgrade-tests --bins)",
        p.display()
    );
    p
}

/// Writes an executable script `name` in `dir`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A wrapper that runs `baton-fs-alt` under the name `argv0` with the given variables
/// (the name lets a test find the process afterwards).
pub fn alt_wrapper(dir: &Path, name: &str, argv0: &str, env: &[(&str, &str)]) -> PathBuf {
    let vars: String = env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    script(
        dir,
        name,
        &format!("{vars}exec -a {argv0} {} \"$@\"", alt_bin().display()),
    )
}

/// Pids of processes whose command line contains `needle`.
pub fn processes_named(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        cmd.contains(needle).then_some(pid)
    })
    .collect()
}

/// How a test mount survives a dead client: the kernel's FUSE_NOTIFY_RESEND (this
/// machine's kernel offers it), or the request log, as on kernels before 6.9
/// (`baton mount --no-resend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    Kernel,
    Disabled,
}

impl Resend {
    pub const BOTH: [Resend; 2] = [Resend::Kernel, Resend::Disabled];

    /// The `baton mount` arguments.
    pub fn args(self) -> Vec<String> {
        match self {
            Resend::Kernel => Vec::new(),
            Resend::Disabled => vec!["--no-resend".into()],
        }
    }

    /// Mount options with these arguments added.
    pub fn mount(self, mut opts: MountOptions) -> MountOptions {
        opts.args.extend(self.args());
        opts
    }

    /// What `baton status --json` says in `resend_mode`.
    pub fn status_word(self) -> &'static str {
        match self {
            Resend::Kernel => "resend",
            Resend::Disabled => "disabled",
        }
    }
}

/// Checks that the mount is in `mode` (`baton status --json`: `resend_mode`, and `resend`
/// false without it).
pub fn assert_resend_mode(m: &TestMount, mode: Resend) {
    let s = status(m);
    assert_eq!(
        s.json["resend_mode"].as_str(),
        Some(mode.status_word()),
        "{}",
        s.json
    );
    assert_eq!(s.resend, mode == Resend::Kernel, "{}", s.json);
    assert_eq!(s.json["request_log"], true, "{}", s.json);
}

/// Everything the mount's supervisor and clients logged (`$BATON_HOME/log`).
pub fn logs(m: &TestMount) -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir(m.home.join("log")) {
        for e in dir.flatten() {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

/// How many successors found requests their dead predecessor had read and left
/// unanswered in the request log, and how many requests that was, from the logs.
pub fn answered_from_log(m: &TestMount) -> (usize, u64) {
    let log = logs(m);
    let mut times = 0;
    let mut requests = 0;
    for line in log.lines() {
        if !line.contains("answering the requests the predecessor read and left unanswered") {
            continue;
        }
        times += 1;
        // "answered=N running=M", possibly with colour codes around the names.
        let plain: String = strip_ansi(line);
        for key in ["answered=", "running="] {
            if let Some(i) = plain.find(key) {
                let n: String = plain[i + key.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                requests += n.parse::<u64>().unwrap_or(0);
            }
        }
    }
    (times, requests)
}

/// Waits up to 10 s until more than `before` successors answered from the request log (the
/// line is logged just after the successor starts serving); how many have.
pub fn wait_answered_from_log(m: &TestMount, before: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = answered_from_log(m).0;
        if now > before || std::time::Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How long a test waits for something that should take milliseconds before it gives up
/// (a bound on the wait, not a measurement).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `kill -9 pid`.
pub fn kill9(pid: u64) {
    assert!(pid > 1, "no pid to kill");
    // SAFETY: kill(2) has no memory effects; the pid is one `baton status` names.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

/// Waits until a client other than `dead` serves the mount.
pub fn wait_replaced(m: &TestMount, dead: &Status) -> Status {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let s = baton_cli::status(&m.home, &m.mountpoint);
        if let Ok(s) = &s
            && s.serving()
            && s.client_pid != 0
            && s.client_pid != dead.client_pid
        {
            return s.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no client replaced pid {} within {PATIENCE:?}: {s:?}",
            dead.client_pid
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new volume `name` whose metadata is in a Redis server of its own, and its objects
/// in a temporary directory: mounted with `args` at `dir/mnt`. Keep all three alive.
pub fn redis_mount(
    name: &str,
    args: Vec<String>,
) -> (testkit::redis::RedisServer, tempfile::TempDir, TestMount) {
    let redis = testkit::redis::RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let meta = redis.url(1);
    let storage = format!("fs://{}/objects", dir.path().display());
    let out = testkit::mount::baton(
        &home,
        &["format", name, "--meta", &meta, "--storage", &storage],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opts = MountOptions {
        meta: Some(meta),
        args,
    };
    let m = TestMount::at(&home, &dir.path().join("mnt"), &opts).unwrap();
    (redis, dir, m)
}
