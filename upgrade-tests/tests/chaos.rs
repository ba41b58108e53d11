//! `baton-chaos` run the way a user runs it, on real mounts: the binary, its exit status
//! and its JSON report. Upgrades at random moments under the verifying workload, faults
//! alone under a job of the user's (nothing written), kills of the serving client at
//! random moments (≥ 50), and a run whose upgrades cannot happen (exit status 1). Then a
//! kill at every step of the upgrade protocol, on the old and on the new client, under
//! the workload. The kills and the kill at every step run again without
//! FUSE_NOTIFY_RESEND (`--no-resend`, as on kernels before 6.9), the kills on the embedded
//! engine and on Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Resend;
use testkit::mount::{MountOptions, TestMount, baton_bin};
use upgrade_tests::baton_cli::Upgrade;
use upgrade_tests::inject::ENV_CRASH_ON;

/// The `baton-chaos` binary cargo built for these tests.
const CHAOS: &str = env!("CARGO_BIN_EXE_baton-chaos");

/// What one `baton-chaos` run returned.
struct ChaosRun {
    code: Option<i32>,
    /// The `--json` report.
    report: serde_json::Value,
    /// The human summary and the per-fault lines.
    text: String,
}

impl ChaosRun {
    fn num(&self, k: &str) -> u64 {
        self.report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("`{k}` is not a number in the report:\n{}", self.text))
    }

    fn kind(&self, kind: &str, k: &str) -> serde_json::Value {
        self.report["faults_by_kind"][kind][k].clone()
    }

    /// Exit 0, verdict `clean`, no application error, no check failure, every
    /// acknowledged record read back once, intact and in order.
    fn assert_clean(&self) {
        assert_eq!(
            self.report["verdict"], "clean",
            "baton-chaos found failures:\n{}",
            self.text
        );
        assert_eq!(self.code, Some(0), "{}", self.text);
        for k in [
            "errors",
            "check_failures",
            "records_lost",
            "records_corrupted",
            "records_duplicated",
            "records_out_of_order",
        ] {
            assert_eq!(self.num(k), 0, "{k}:\n{}", self.text);
        }
        assert_eq!(self.report["errors_by_errno"], serde_json::json!({}));
        assert_eq!(self.report["stuck"], serde_json::json!([]));
        assert_eq!(self.report["still_mounted"], true);
        assert!(self.num("operations") > 0, "{}", self.text);
    }
}

/// Runs `baton-chaos MOUNTPOINT ARGS... --json=FILE` against `m`.
fn chaos(m: &TestMount, args: &[&str]) -> ChaosRun {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(CHAOS)
        .arg(&m.mountpoint)
        .args(args)
        .arg("--baton")
        .arg(baton_bin())
        .arg(format!("--json={}", json.display()))
        .env("BATON_HOME", &m.home)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    println!("baton-chaos {args:?} -> {:?}\n{text}", out.status.code());
    let report = match std::fs::read(&json) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(e) => panic!("no JSON report ({e}):\n{text}"),
    };
    ChaosRun {
        code: out.status.code(),
        report,
        text,
    }
}

/// Every fault of the report ended as it should, and was of `kind`.
fn assert_faults_ok(r: &ChaosRun, kind: &str, n: u64) {
    let faults = r.report["faults"].as_array().unwrap();
    assert_eq!(faults.len() as u64, n, "{}", r.text);
    for f in faults {
        assert_eq!(f["kind"], kind, "{f}");
        assert_eq!(f["ok"], true, "{f}\n{}", r.text);
        assert_ne!(f["before"]["pid"], f["after"]["pid"], "{f}");
    }
    assert_eq!(r.kind(kind, "count"), n);
    assert_eq!(r.kind(kind, "ok"), n);
}

/// Names of the entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A short chaos run with upgrades only, to the alternative build, under the mixed
/// workload: clean, every upgrade made a new generation, the last one runs the build.
#[test]
fn upgrades_at_random_moments_under_the_workload() {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let s0 = common::status(&m);
    let alt = common::alt_bin();
    let r = chaos(
        &m,
        &[
            "--duration",
            "2m",
            "--upgrade-every",
            "400ms",
            "--upgrades",
            "8",
            "--binary",
            alt.to_str().unwrap(),
            "--small",
            "--seed",
            "11",
        ],
    );
    r.assert_clean();
    assert_eq!(r.num("upgrades"), 8);
    assert_eq!(r.num("kills"), 0);
    assert_faults_ok(&r, "upgrade", 8);
    assert!(r.num("records_acknowledged") > 0, "{}", r.text);
    assert_eq!(r.num("generation_first"), s0.generation);
    assert_eq!(r.num("generation_last"), s0.generation + 8);
    assert_eq!(
        r.report["client_version_last"],
        format!("{}-alt", s0.client_version)
    );
    // The pause of every upgrade is known (the supervisor's and the application's).
    assert!(
        r.kind("upgrade", "supervisor_pause_max_ms")
            .as_f64()
            .is_some()
    );
    assert!(r.kind("upgrade", "pause_max_ms").as_f64().is_some());
    let s = common::status(&m);
    assert_eq!(s.upgrades, s0.upgrades + 8);
    assert_eq!(s.rollbacks, s0.rollbacks);
    // A clean run leaves nothing of the workload behind but its data set.
    assert_eq!(listing(&m.path("baton-chaos")), ["data"]);
    m.umount().unwrap();
}

/// `--faults-only`, for a mount whose own job is the workload: kills and upgrades at
/// random moments, the probe sees no error, nothing is written into the volume, and the
/// user's file, held open by a reader across the faults, reads back unchanged.
#[test]
fn faults_only_writes_nothing_and_sees_no_error() {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let data: Vec<u8> = (0..(3 << 20) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(m.path("users-file"), &data).unwrap();
    let held = std::fs::File::open(m.path("users-file")).unwrap();
    let before = listing(&m.mountpoint);
    let r = chaos(
        &m,
        &[
            "--faults-only",
            "--duration",
            "1m",
            "--kill-every",
            "300ms",
            "--kills",
            "5",
            "--upgrade-every",
            "300ms",
            "--upgrades",
            "5",
        ],
    );
    r.assert_clean();
    assert_eq!((r.num("kills"), r.num("upgrades")), (5, 5));
    assert_eq!(r.kind("kill", "ok"), 5);
    assert_eq!(r.kind("upgrade", "ok"), 5);
    assert_eq!(r.report["settings"]["application"], "probe");
    assert!(r.report["probe"]["total_ops"].as_u64().unwrap() > 0);
    assert_eq!(listing(&m.mountpoint), before);
    assert!(std::fs::read(m.path("users-file")).unwrap() == data);
    let mut again = vec![0u8; data.len()];
    std::os::unix::fs::FileExt::read_exact_at(&held, &mut again, 0).unwrap();
    assert!(
        again == data,
        "the descriptor held across the faults reads other bytes"
    );
    drop(held);
    m.umount().unwrap();
}

/// Upgrades to a client binary that does not exist roll back: the application sees
/// nothing, but the run is not clean (the upgrades asked for did not happen) and the
/// exit status says so.
#[test]
fn upgrades_that_roll_back_fail_the_run() {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let s0 = common::status(&m);
    let r = chaos(
        &m,
        &[
            "--faults-only",
            "--duration",
            "1m",
            "--upgrade-every",
            "200ms",
            "--upgrades",
            "2",
            "--binary",
            "/nonexistent/baton-fs",
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert_eq!(r.report["verdict"], "failed");
    assert_eq!(r.num("errors"), 0, "{}", r.text);
    assert_eq!(r.kind("upgrade", "ok"), 0);
    let failures = r.report["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{}", r.text);
    for f in r.report["faults"].as_array().unwrap() {
        assert_eq!(f["outcome"], "rolled-back", "{f}");
    }
    // The mount serves on with the client it had.
    let s = common::status(&m);
    assert_eq!((s.client_pid, s.generation), (s0.client_pid, s0.generation));
    assert_eq!(s.rollbacks, s0.rollbacks + 2);
    std::fs::write(m.path("after"), b"still serving").unwrap();
    assert_eq!(std::fs::read(m.path("after")).unwrap(), b"still serving");
    m.umount().unwrap();
}

const KILLS: u64 = 50;

/// `KILLS` SIGKILLs of the serving client at random moments under the mixed workload:
/// each is followed by a new client, the application sees no error, and every
/// acknowledged record (fsynced or not) is read back once, intact, in order.
#[test]
fn fifty_kills_at_random_moments_under_the_workload() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    fifty_kills(&m, 12);
    m.umount().unwrap();
}

/// The same without FUSE_NOTIFY_RESEND: every successor answers from the request log what
/// its predecessor had read.
#[test]
fn fifty_kills_at_random_moments_without_resend() {
    let m = TestMount::new(&Resend::Disabled.mount(MountOptions::default())).unwrap();
    fifty_kills(&m, 15);
    common::assert_resend_mode(&m, Resend::Disabled);
    common::wait_answered_from_log(&m, 0);
    let (times, requests) = common::answered_from_log(&m);
    println!("{times} successors answered {requests} requests from the request log");
    assert!(times > 0, "no kill left a request in the request log");
    m.umount().unwrap();
}

/// The same without FUSE_NOTIFY_RESEND on a volume whose metadata is in Redis.
#[test]
fn fifty_kills_at_random_moments_on_redis_without_resend() {
    let (_redis, _dir, m) = common::redis_mount("chaos", Resend::Disabled.args());
    fifty_kills(&m, 16);
    common::assert_resend_mode(&m, Resend::Disabled);
    m.umount().unwrap();
}

fn fifty_kills(m: &TestMount, seed: u64) {
    let s0 = common::status(m);
    let kills = KILLS.to_string();
    let r = chaos(
        m,
        &[
            "--duration",
            "10m",
            "--kill-every",
            "300ms",
            "--kills",
            &kills,
            "--small",
            "--seed",
            &seed.to_string(),
        ],
    );
    r.assert_clean();
    assert_eq!(r.num("kills"), KILLS);
    assert_faults_ok(&r, "kill", KILLS);
    assert!(r.num("records_acknowledged") > 0, "{}", r.text);
    let s = common::status(m);
    assert!(s.restarts >= s0.restarts + KILLS, "{:?}", s.json);
}

/// Kills and upgrades mixed, under the training profile.
#[test]
fn kills_and_upgrades_under_the_training_workload() {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let r = chaos(
        &m,
        &[
            "--duration",
            "10m",
            "--kill-every",
            "400ms",
            "--kills",
            "20",
            "--upgrade-every",
            "700ms",
            "--upgrades",
            "10",
            "--workload",
            "training",
            "--small",
            "--seed",
            "13",
        ],
    );
    r.assert_clean();
    assert_eq!((r.num("kills"), r.num("upgrades")), (20, 10));
    assert_eq!(r.kind("kill", "ok"), 20);
    assert_eq!(r.kind("upgrade", "ok"), 10);
    assert!(r.num("records_acknowledged") > 0, "{}", r.text);
    m.umount().unwrap();
}

/// A client binary that SIGKILLs itself when the handover message `at` passes — armed
/// only in the first process started from it (a flag file is consumed at start), so a
/// restart of the same binary serves normally.
fn armed_once(dir: &Path, name: &str, at: &str) -> PathBuf {
    let flag = dir.join(format!("{name}.armed"));
    std::fs::write(&flag, b"").unwrap();
    common::script(
        dir,
        name,
        &format!(
            "if rm {flag} 2>/dev/null; then export {ENV_CRASH_ON}='{at}'; fi\nexec -a baton-{name} {alt} \"$@\"",
            flag = flag.display(),
            alt = common::alt_bin().display(),
        ),
    )
}

/// Waits until a client serves again and the application completes operations; the
/// status then.
fn wait_serving(m: &TestMount, run: &upgrade_tests::workload::Running, step: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match upgrade_tests::baton_cli::status(&m.home, &m.mountpoint) {
            Ok(s) if s.serving() && s.client_pid > 1 => {
                assert!(
                    run.wait_ops(100, Duration::from_secs(30)),
                    "{step}: a client serves ({}) but the application makes no progress",
                    s.json
                );
                return s.json.to_string();
            }
            Ok(s) if Instant::now() > deadline => {
                panic!("{step}: no client serves 30 s later: {}", s.json)
            }
            Err(e) if Instant::now() > deadline => {
                panic!("{step}: no status 30 s later: {e:#}")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A kill (SIGKILL) at every step of the upgrade protocol, on the old client and on the
/// new one, under the verifying workload: whatever the supervisor does (roll back,
/// restart, finish the upgrade), a client serves again and the application sees no
/// error and loses no record.
#[test]
fn a_kill_at_every_step_of_the_upgrade_protocol() {
    kill_at_every_step(Resend::Kernel);
}

/// The same without FUSE_NOTIFY_RESEND: the upgrades drain (handing lock waits over
/// through the request log), and the kills are answered from it.
#[test]
fn a_kill_at_every_step_of_the_upgrade_protocol_without_resend() {
    kill_at_every_step(Resend::Disabled);
}

fn kill_at_every_step(mode: Resend) {
    common::require_upgrade();
    // The two variants run at once: their armed processes have names of their own.
    let tag = match mode {
        Resend::Kernel => "",
        Resend::Disabled => "nr-",
    };
    let m = TestMount::new(&mode.mount(MountOptions::default())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = common::start_workload(&m, 14);
    let to = |binary: PathBuf| Upgrade {
        binary: Some(binary),
        timeout_secs: Some(10.0),
        ..Upgrade::default()
    };
    let mut lines = Vec::new();
    // The old (serving) client dies when it gets or answers these: both clients hand
    // over changes, so it exports a base (its first State) before the freeze and the
    // changes (its second) inside it.
    for (i, at) in [
        "PreExport",
        "ToSupervisor::State",
        "PreFlushed",
        "Freeze",
        "ToSupervisor::State:2",
        "Frozen",
        "Commit",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("{tag}old-dies-{i}");
        let armed = armed_once(dir.path(), &name, at);
        // It becomes the serving client (the trigger is a message only an old client
        // sees)...
        let setup = common::upgrade(&m, &to(armed));
        assert!(
            setup.success,
            "old client dying at {at}: the setup upgrade failed: {}",
            setup.output()
        );
        wait_serving(&m, &run, &format!("setup for {at}"));
        // ...and dies at `at` when it is upgraded from.
        let out = common::upgrade(&m, &to(common::client_bin()));
        let step = format!("old client killed at {at}");
        let s = wait_serving(&m, &run, &step);
        lines.push(format!(
            "{step}: upgrade {:?} {}; then {s}",
            out.code,
            out.output().trim()
        ));
    }
    // The new client dies when it gets or sends these.
    for (i, at) in [
        "Start",
        "Prepared",
        "BaseState",
        "BaseStaged",
        "ToClient::State",
        "Init",
        "InitReply",
        "Serve",
        "FirstServed",
    ]
    .into_iter()
    .enumerate()
    {
        let armed = armed_once(dir.path(), &format!("{tag}new-dies-{i}"), at);
        let out = common::upgrade(&m, &to(armed));
        let step = format!("new client killed at {at}");
        let s = wait_serving(&m, &run, &step);
        lines.push(format!(
            "{step}: upgrade {:?} {}; then {s}",
            out.code,
            out.output().trim()
        ));
    }
    for l in &lines {
        println!("{l}");
    }
    common::stop_clean(run);
    // Every armed process fired (its flag is gone) and none is left behind.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".armed"), "{name}: never started");
    }
    // The serving client is the plain build again; no process of an armed build is left.
    let last = common::status(&m);
    assert!(!last.client_version.ends_with("-alt"), "{:?}", last.json);
    for name in [
        format!("baton-{tag}old-dies-"),
        format!("baton-{tag}new-dies-"),
    ] {
        assert_eq!(common::processes_named(&name), Vec::<u32>::new(), "{name}*");
    }
    m.umount().unwrap();
}
