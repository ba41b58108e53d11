//! Mounts made with `baton mount --no-resend`, which behave as on kernels without
//! FUSE_NOTIFY_RESEND (Linux before 6.9): a killed client's unanswered requests are found
//! in the request log by its successor, and upgrades drain, handing over through the log
//! what cannot finish (a lock wait). The mode is the mount's: it survives upgrades, crash
//! restarts, a new supervisor and an adoption by a `baton mount` that does not ask for it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{PATIENCE, kill9, wait_replaced};

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Resend;
use testkit::mount::{MountOptions, TestMount, baton};
use upgrade_tests::baton_cli::{self, Upgrade};

/// `flock FILE true`: util-linux's flock(1) waits for a flock(2) lock on `file`, then
/// exits 0.
fn waiter(file: &Path) -> Child {
    Command::new("flock")
        .arg(file)
        .arg("true")
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// A flock(2) lock this process holds on a file.
struct Held(std::fs::File);

impl Held {
    fn take(file: &Path) -> Held {
        let f = std::fs::File::open(file).unwrap();
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        Held(f)
    }

    fn release(self) {
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
        assert_eq!(rc, 0, "unlock: {}", std::io::Error::last_os_error());
    }
}

/// Whether a flock(2) lock on `file` is held by somebody else (a non-blocking try fails).
fn locked(file: &Path) -> bool {
    !Command::new("flock")
        .args(["-n", "-E", "75"])
        .arg(file)
        .arg("true")
        .status()
        .unwrap()
        .success()
}

/// Waits up to `within` for `child` to exit; its status, or `None` if it still runs.
fn exited(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process waits for a lock another holds, through an upgrade (a drain: the wait is
/// handed over through the request log instead of holding the drain up until it times
/// out) and through a kill -9 of the client (the successor runs the wait again from the
/// log): it gets the lock once the holder lets go, and nothing else waits or fails.
#[test]
fn a_lock_wait_is_handed_over_by_an_upgrade_and_survives_a_kill() {
    common::require_upgrade();
    let m = TestMount::new(&Resend::Disabled.mount(MountOptions::default())).unwrap();
    common::assert_resend_mode(&m, Resend::Disabled);
    let file = m.path("locked");
    std::fs::write(&file, b"x").unwrap();
    let holder = Held::take(&file);
    assert!(locked(&file), "the lock is not seen by another process");
    let mut waiter = waiter(&file);
    // Long enough for the waiter's request to reach the client and wait there.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        exited(&mut waiter, Duration::ZERO).is_none(),
        "the waiter got a held lock"
    );

    let out = common::upgrade(
        &m,
        &Upgrade {
            timeout_secs: Some(20.0),
            ..Upgrade::default()
        },
    );
    println!("baton upgrade: {}", out.output().trim());
    assert!(
        out.success,
        "the upgrade did not go through: {}",
        out.output()
    );
    assert_eq!(out.mode(), Some("drain"), "{}", out.output());
    let handed_over = out
        .report
        .as_ref()
        .and_then(|r| r["handed_over_requests"].as_u64())
        .unwrap_or(0);
    assert!(
        handed_over >= 1,
        "the lock wait was not handed over: {}",
        out.output()
    );
    assert!(
        exited(&mut waiter, Duration::from_millis(300)).is_none(),
        "the waiter got the lock while it is held"
    );

    // The successor answers the wait from the log (it runs it again): kill it too.
    let s = common::status(&m);
    kill9(s.client_pid);
    let s2 = wait_replaced(&m, &s);
    common::wait_answered_from_log(&m, 1);
    let (times, requests) = common::answered_from_log(&m);
    println!(
        "after the kill: generation {}, {times} successors answered {requests} requests from the log",
        s2.generation
    );
    assert!(
        times >= 2,
        "the upgrade's successor and the kill's both found the wait"
    );
    assert!(
        exited(&mut waiter, Duration::from_millis(300)).is_none(),
        "the waiter got the lock while it is held"
    );
    assert!(locked(&file), "the holder lost its lock in the kill");

    holder.release();
    let status = exited(&mut waiter, PATIENCE).expect("the waiter never got the lock");
    assert!(status.success(), "the waiter failed: {status}");
    assert!(!locked(&file), "the lock is still held after both let go");
    common::assert_resend_mode(&m, Resend::Disabled);
    m.umount().unwrap();
}

/// `--no-resend` is the mount's: `baton status` says `resend disabled` after an upgrade,
/// a crash restart, a new supervisor (`baton upgrade --supervisor`) and an adoption by a
/// plain `baton mount` after the supervisor was killed; and each time a kill -9 of the
/// client is answered from the request log (a request is kept waiting in the client at
/// each kill: a flock wait, which nothing but the log can answer without resend).
#[test]
fn the_mode_is_kept_by_upgrades_restarts_and_new_supervisors() {
    common::require_upgrade();
    let m = TestMount::new(&Resend::Disabled.mount(MountOptions::default())).unwrap();
    let run = common::start_workload(&m, 301);
    let file = m.path("lock");
    std::fs::write(&file, b"x").unwrap();
    let mp = m.mountpoint.display().to_string();
    let mut answered = common::answered_from_log(&m).0;
    // A kill of the client while a flock wait is in it: the wait must survive.
    let mut kill_with_a_waiter = |step: &str| {
        let holder = Held::take(&file);
        let mut waiter = waiter(&file);
        std::thread::sleep(Duration::from_millis(400));
        let s = common::status(&m);
        kill9(s.client_pid);
        wait_replaced(&m, &s);
        let now = common::wait_answered_from_log(&m, answered);
        assert!(
            now > answered,
            "{step}: the successor answered nothing from the log"
        );
        answered = now;
        holder.release();
        let st =
            exited(&mut waiter, PATIENCE).unwrap_or_else(|| panic!("{step}: the waiter hangs"));
        assert!(st.success(), "{step}: the waiter failed: {st}");
        common::assert_resend_mode(&m, Resend::Disabled);
    };

    common::assert_resend_mode(&m, Resend::Disabled);
    kill_with_a_waiter("first client");

    let out = common::upgrade(&m, &Upgrade::default());
    assert!(out.success, "{}", out.output());
    assert_eq!(out.mode(), Some("drain"), "{}", out.output());
    common::assert_resend_mode(&m, Resend::Disabled);
    kill_with_a_waiter("after an upgrade");

    let before = common::status(&m);
    let out = baton(
        &m.home,
        &[
            "upgrade",
            &mp,
            "--supervisor",
            &testkit::mount::baton_bin().display().to_string(),
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "baton upgrade --supervisor: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let after = common::status(&m);
    assert_ne!(
        before.supervisor_pid(),
        after.supervisor_pid(),
        "{}",
        after.json
    );
    common::assert_resend_mode(&m, Resend::Disabled);
    kill_with_a_waiter("under a new supervisor");

    // The supervisor killed; a `baton mount` without --no-resend adopts the client.
    kill9(common::status(&m).supervisor_pid());
    let deadline = Instant::now() + PATIENCE;
    while baton_cli::status(&m.home, &m.mountpoint).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the killed supervisor still answers"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = baton(&m.home, &["mount", &mp, "--background"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::assert_resend_mode(&m, Resend::Disabled);
    kill_with_a_waiter("under an adopting supervisor");

    common::stop_clean(run);
    m.umount().unwrap();
}
