//! Shared by the end-to-end tests: mounts, workload settings, upgrade steps, wrapper
//! scripts for faulty successors.
#![allow(dead_code)] // Each test file uses its own part.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::mount::{TestMount, target_dir};
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
