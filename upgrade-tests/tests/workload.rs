//! The workload itself: clean where nothing goes wrong (a local directory, a plain Baton
//! mount), and it does catch what it is meant to catch (bytes changed under it, records
//! lost).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use testkit::mount::{MountOptions, TestMount};
use upgrade_tests::workload::{self, Config, Profile};

fn local_config() -> Config {
    Config {
        threads: 3,
        ..common::workload_config(7)
    }
}

#[test]
fn clean_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let report = workload::run(dir.path(), local_config(), Duration::from_secs(2)).unwrap();
    println!("{}", report.summary());
    assert!(report.is_clean(), "{}", report.summary());
    for kind in [
        "pread",
        "append",
        "stat",
        "open",
        "read",
        "close",
        "create",
        "rename",
        "unlink",
        "readdir",
        "small_read",
        "shard_read",
    ] {
        assert!(
            report.ops.get(kind).is_some_and(|k| k.count > 0),
            "no {kind} ran:\n{}",
            report.summary()
        );
    }
    assert!(report.append.acknowledged > 0 && report.append.found == report.append.acknowledged);
    // The JSON form has the same verdict material.
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["total_errors"], 0);
    assert!(json["longest"]["duration_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn catches_changed_bytes_and_lost_records() {
    let dir = tempfile::tempdir().unwrap();
    let run = workload::start(dir.path(), local_config()).unwrap();
    assert!(run.wait_ops(2000, Duration::from_secs(10)));
    // Somebody else overwrites the pattern file and cuts the append log short.
    let pattern = dir.path().join("baton-workload/data/pattern.dat");
    let f = OpenOptions::new().write(true).open(&pattern).unwrap();
    let junk = vec![0xEEu8; 1 << 20];
    for off in (0..(2u64 << 20)).step_by(1 << 20) {
        f.write_at(&junk, off).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = run.run_dir().join("applog");
    OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(100)
        .unwrap();
    let report = run.stop();
    println!("{}", report.summary());
    assert!(!report.is_clean());
    assert!(
        report.check_failures > 0,
        "changed pattern bytes not caught"
    );
    assert!(
        report.append.lost > 0 && report.append.corrupted > 0,
        "{:?}",
        report.append
    );
}

#[test]
fn catches_duplicated_records() {
    let dir = tempfile::tempdir().unwrap();
    let run = workload::start(dir.path(), local_config()).unwrap();
    assert!(run.wait_ops(500, Duration::from_secs(10)));
    let report_dir = run.run_dir().to_path_buf();
    // An append applied twice: the first record again at the end.
    let report = {
        std::thread::sleep(Duration::from_millis(200));
        let log = report_dir.join("applog");
        let first = std::fs::read(&log).unwrap();
        let len = u32::from_le_bytes(first[12..16].try_into().unwrap()) as usize;
        let rec = first[..16 + len + 4].to_vec();
        OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(&rec)
            .unwrap();
        run.stop()
    };
    assert!(
        report.append.duplicates >= 1 || report.append.out_of_order >= 1,
        "{:?}",
        report.append
    );
}

#[test]
fn clean_on_a_baton_mount() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let report = workload::run(
        &m.mountpoint,
        common::workload_config(11),
        Duration::from_secs(5),
    )
    .unwrap();
    println!("{}", report.summary());
    assert!(report.is_clean(), "{}", report.summary());
    assert!(
        report.total_ops > 1000,
        "only {} operations in 5 s",
        report.total_ops
    );

    // The training mix, on the same data set.
    let cfg = Config {
        profile: Profile::Training,
        seed: 12,
        ..common::workload_config(12)
    };
    let report = workload::run(&m.mountpoint, cfg, Duration::from_secs(3)).unwrap();
    println!("{}", report.summary());
    assert!(report.is_clean(), "{}", report.summary());
    assert!(
        report.ops.get("ckpt_rename").is_some_and(|k| k.count > 0),
        "no checkpoint was written"
    );
    m.umount().unwrap();
}

/// The failure Baton exists to prevent, made on purpose: when every holder of the FUSE
/// connection dies, every request fails with ENOTCONN. The workload must see it (and
/// not hang), or its "zero errors" would mean nothing.
#[test]
fn sees_enotconn_when_every_holder_of_the_connection_dies() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let s = upgrade_tests::baton_cli::status(&m.home, &m.mountpoint).unwrap();
    let run = workload::start(&m.mountpoint, common::workload_config(13)).unwrap();
    assert!(run.wait_ops(300, Duration::from_secs(30)));
    for pid in [s.supervisor_pid(), s.client_pid] {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = run.stop();
    println!("{}", report.summary());
    assert!(!report.is_clean());
    assert!(report.stuck.is_empty(), "{:?}", report.stuck);
    let enotconn = report.errors.iter().find(|e| e.errno == libc::ENOTCONN);
    assert!(
        enotconn.is_some_and(|e| e.count > 10),
        "{}",
        report.summary()
    );
}
