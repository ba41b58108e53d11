//! The supervisor itself on real mounts: killed (`kill -9`) under the verifying workload,
//! restarted with `baton mount` (which adopts the live client), and replaced by
//! `baton upgrade --supervisor`. The application must see nothing at all: the client
//! serves without a supervisor, and the new supervisor supervises it (status, client
//! upgrades, client crash restarts, umount) as if it had started it.
#![allow(clippy::unwrap_used)]

mod common;

use common::{PATIENCE, kill9, wait_replaced};

use std::path::Path;
use std::time::{Duration, Instant};

use handover_proto::message::ToClient;
use testkit::mount::{MountOptions, TestMount, baton, baton_bin};
use upgrade_tests::baton_cli::{self, Upgrade};

/// Waits until no supervisor answers for the mount (the killed one is gone).
fn wait_no_supervisor(m: &TestMount) {
    let deadline = Instant::now() + PATIENCE;
    while baton_cli::status(&m.home, &m.mountpoint).is_ok() {
        assert!(
            Instant::now() < deadline,
            "a supervisor still answers after kill -9"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `baton mount MOUNTPOINT --background` again, on the live mount.
fn remount(m: &TestMount) -> std::process::Output {
    let mp = m.mountpoint.display().to_string();
    baton(&m.home, &["mount", &mp, "--background"]).unwrap()
}

fn upgrade_supervisor(m: &TestMount, binary: &Path) -> std::process::Output {
    let mp = m.mountpoint.display().to_string();
    let bin = binary.display().to_string();
    baton(&m.home, &["upgrade", &mp, "--supervisor", &bin]).unwrap()
}

/// Connects to the client's adopt socket as root and sends `bytes` as one packet (junk,
/// or a frame that is not `Adopt`), then hangs up: the client must refuse it and wait on.
fn bad_adopter(m: &TestMount, bytes: &[u8]) {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, send, socket,
    };
    use std::os::fd::AsRawFd;
    let path = handover_proto::rendezvous::adopt_socket_path(
        &m.home,
        &std::fs::canonicalize(&m.mountpoint).unwrap(),
    );
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(sock.as_raw_fd(), &UnixAddr::new(&path).unwrap())
        .unwrap_or_else(|e| panic!("the client does not listen on {}: {e}", path.display()));
    send(sock.as_raw_fd(), bytes, MsgFlags::empty()).unwrap();
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Client upgrade and client kill -9 under the supervisor now in charge: both still work.
fn client_upgrade_and_crash(m: &TestMount) {
    let before = common::status(m);
    let up = common::upgrade(m, &Upgrade::default());
    assert!(up.success, "client upgrade failed: {}", up.output());
    assert_eq!(up.outcome(), Some("upgraded"), "{}", up.output());
    let upgraded = common::status(m);
    assert!(upgraded.generation > before.generation, "{}", upgraded.json);
    assert_ne!(upgraded.client_pid, before.client_pid, "{}", upgraded.json);

    kill9(upgraded.client_pid);
    let restarted = wait_replaced(m, &upgraded);
    assert!(
        restarted.generation > upgraded.generation,
        "{}",
        restarted.json
    );
    assert_eq!(
        restarted.restarts,
        upgraded.restarts + 1,
        "{}",
        restarted.json
    );
}

/// kill -9 of the supervisor under the workload: the client serves on alone; a restarted
/// `baton mount` adopts it (same client pid, generation and session), `baton status`
/// answers, a client upgrade and a client kill -9 work under the new supervisor, and the
/// mount unmounts. The application sees no error and loses no record throughout.
#[test]
fn supervisor_killed_then_restarted_mount_adopts_the_client() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let first = common::status(&m);
    let run = common::start_workload(&m, 501);

    kill9(first.supervisor_pid());
    wait_no_supervisor(&m);
    assert!(
        run.wait_ops(300, Duration::from_secs(30)),
        "the workload stopped making progress without a supervisor"
    );
    let mp = m.mountpoint.display().to_string();
    let out = baton(&m.home, &["status", &mp]).unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("waits for one"),
        "baton status must say the client waits for a supervisor: {}",
        text(&out)
    );

    // Bad peers on the adopt socket: refused, the client serves on and waits.
    bad_adopter(&m, b"not a frame at all");
    let wrong = handover_proto::channel::encode_frame(&ToClient::Serve).unwrap();
    bad_adopter(&m, &wrong);
    assert!(run.wait_ops(200, Duration::from_secs(30)));

    let out = remount(&m);
    assert!(out.status.success(), "baton mount again: {}", text(&out));
    let adopted = common::status(&m);
    assert_ne!(adopted.supervisor_pid(), first.supervisor_pid());
    assert_eq!(
        adopted.client_pid, first.client_pid,
        "the restarted supervisor must adopt the live client: {}",
        adopted.json
    );
    assert_eq!(adopted.generation, first.generation, "{}", adopted.json);
    assert!(adopted.serving(), "{}", adopted.json);
    assert!(run.wait_ops(200, Duration::from_secs(30)));

    // The adopted client is not a child of the new supervisor: its death is seen on its
    // pidfd, and it is restarted like any other.
    kill9(adopted.client_pid);
    let restarted = wait_replaced(&m, &adopted);
    assert!(
        restarted.generation > adopted.generation,
        "{}",
        restarted.json
    );
    assert!(run.wait_ops(200, Duration::from_secs(30)));

    client_upgrade_and_crash(&m);
    assert!(run.wait_ops(200, Duration::from_secs(30)));
    common::stop_clean(run);
    m.umount().unwrap();
}

/// `baton upgrade --supervisor target/debug/baton`, twice, under the workload: a new
/// supervisor process supervises the same client; a failing new supervisor leaves the
/// old one in charge (exit status 1 with the reason); client upgrades and crash restarts
/// work afterwards; umount works. The application sees no error.
#[test]
fn supervisor_upgrade_under_the_workload() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let first = common::status(&m);
    let run = common::start_workload(&m, 502);

    let mut prev = first.clone();
    for i in 0..2 {
        let out = upgrade_supervisor(&m, &baton_bin());
        assert!(
            out.status.success(),
            "supervisor upgrade {i}: {}",
            text(&out)
        );
        assert!(text(&out).contains("supervisor upgraded"), "{}", text(&out));
        let s = common::status(&m);
        assert_ne!(s.supervisor_pid(), prev.supervisor_pid(), "{}", s.json);
        assert_eq!(s.client_pid, first.client_pid, "{}", s.json);
        assert_eq!(s.generation, first.generation, "{}", s.json);
        assert!(run.wait_ops(200, Duration::from_secs(30)));
        prev = s;
    }

    // A new supervisor that passes `--version` but exits at once: refused, the old one
    // supervises on (it adopts its client back).
    let dir = tempfile::tempdir().unwrap();
    let bad = common::script(
        dir.path(),
        "baton-broken",
        "if [ \"$1\" = --version ]; then echo 'baton 9.9.9'; exit 0; fi\nexit 7",
    );
    let out = upgrade_supervisor(&m, &bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exit status: 7"), "{}", text(&out));
    assert!(text(&out).contains("serves on"), "{}", text(&out));
    let s = common::status(&m);
    assert_eq!(s.supervisor_pid(), prev.supervisor_pid(), "{}", s.json);
    assert_eq!(s.client_pid, first.client_pid, "{}", s.json);

    // A new supervisor that adopts the client, then gives up (it is pointed at another
    // volume): the client waits again and the old supervisor takes it back.
    let other = common::script(
        dir.path(),
        "baton-other-volume",
        &format!(
            "if [ \"$1\" = --version ]; then exec {baton} --version; fi\nexec {baton} \"$@\" --meta redb:///nonexistent/other.redb",
            baton = baton_bin().display()
        ),
    );
    let out = upgrade_supervisor(&m, &other);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("serves on"), "{}", text(&out));
    let s = common::status(&m);
    assert_eq!(s.supervisor_pid(), prev.supervisor_pid(), "{}", s.json);
    assert_eq!(s.client_pid, first.client_pid, "{}", s.json);
    assert!(run.wait_ops(200, Duration::from_secs(30)));

    // A binary that does not exist: refused before anything changes.
    let out = upgrade_supervisor(&m, Path::new("/nonexistent/baton"));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));

    client_upgrade_and_crash(&m);
    assert!(run.wait_ops(200, Duration::from_secs(30)));
    common::stop_clean(run);
    m.umount().unwrap();
}

/// With its supervisor alive, a mount is not adopted: a second `baton mount` is refused
/// as before, and the first supervisor is left alone.
#[test]
fn mount_on_a_supervised_mount_is_refused() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let first = common::status(&m);
    let out = remount(&m);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("busy"), "{}", text(&out));
    let s = common::status(&m);
    assert_eq!(s.supervisor_pid(), first.supervisor_pid(), "{}", s.json);
    assert_eq!(s.client_pid, first.client_pid, "{}", s.json);
    m.umount().unwrap();
}

/// `baton mount MOUNTPOINT --take-over`, as a new mount pod runs it: under the workload,
/// a supervisor that the first one did not start takes the mount over (HandOver on the
/// control socket, adoption), moves the client to its own client binary (here the alt
/// build), and the first supervisor exits once its client has. Refused take-overs
/// (another volume, nothing mounted) leave the supervisor in charge. The application
/// sees no error and loses no record.
#[test]
fn take_over_moves_the_mount_to_a_new_supervisor_and_client() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let first = common::status(&m);
    let run = common::start_workload(&m, 503);
    let mp = m.mountpoint.display().to_string();
    let alt = common::alt_bin().display().to_string();

    let out = baton(
        &m.home,
        &[
            "mount",
            &mp,
            "--take-over",
            "--client",
            &alt,
            "--background",
        ],
    )
    .unwrap();
    assert!(out.status.success(), "take-over: {}", text(&out));
    // The new supervisor's first upgrade moves the client to its binary.
    let deadline = Instant::now() + PATIENCE;
    let taken = loop {
        let s = common::status(&m);
        if s.supervisor_pid() != first.supervisor_pid() && s.upgrades + s.rollbacks > 0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "take-over unfinished: {}",
            s.json
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(taken.upgrades, 1, "{}", taken.json);
    assert_eq!(taken.generation, first.generation + 1, "{}", taken.json);
    assert_ne!(taken.client_pid, first.client_pid, "{}", taken.json);
    assert!(
        taken.client_version.ends_with("-alt"),
        "the client must run the new supervisor's binary: {}",
        taken.json
    );
    // The old supervisor exits once its client has.
    let old = first.supervisor_pid();
    let deadline = Instant::now() + PATIENCE;
    while Path::new(&format!("/proc/{old}")).exists()
        && !std::fs::read_to_string(format!("/proc/{old}/stat")).is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            Instant::now() < deadline,
            "the old supervisor {old} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(run.wait_ops(200, Duration::from_secs(30)));

    // Another volume: the new supervisor gives up after adopting; the one in charge
    // takes its client back and serves on.
    let out = baton(
        &m.home,
        &[
            "mount",
            &mp,
            "--take-over",
            "--meta",
            "redb:///nonexistent/other.redb",
        ],
    )
    .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("serves"), "{}", text(&out));
    let s = common::status(&m);
    assert_eq!(s.supervisor_pid(), taken.supervisor_pid(), "{}", s.json);
    assert_eq!(s.client_pid, taken.client_pid, "{}", s.json);
    assert!(run.wait_ops(200, Duration::from_secs(30)));

    // Nothing mounted: refused with the reason.
    let empty = tempfile::tempdir().unwrap();
    let out = baton(
        &m.home,
        &["mount", &empty.path().display().to_string(), "--take-over"],
    )
    .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("nothing to take over"),
        "{}",
        text(&out)
    );

    client_upgrade_and_crash(&m);
    assert!(run.wait_ops(200, Duration::from_secs(30)));
    common::stop_clean(run);
    m.umount().unwrap();
}
