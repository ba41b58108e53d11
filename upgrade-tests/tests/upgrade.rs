//! Live upgrades under a verifying application workload, on real mounts: the application
//! sees no error and loses no record, whether requests are parked and resent or drained,
//! and between two different builds in both directions.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use testkit::mount::{MountOptions, TestMount};
use upgrade_tests::baton_cli::Upgrade;
use upgrade_tests::inject::ENV_CRASH_ON;

const UPGRADES: usize = 20;
/// An operation this long means requests waited for a timeout, not for a handover.
const STALL: Duration = Duration::from_secs(5);

/// `UPGRADES` upgrades of the client under the workload; each must succeed, make a new
/// generation with a new pid, and leave the mount serving.
fn upgrades_under_the_workload(opts: &Upgrade, seed: u64) {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let first = common::status(&m);
    if !opts.drain {
        // This kernel (6.18) offers FUSE_HAS_RESEND, so parked requests are resent.
        assert!(
            first.resend,
            "the kernel did not offer FUSE_HAS_RESEND: {:?}",
            first.json
        );
    }
    let run = common::start_workload(&m, seed);
    let mut windows = Vec::new();
    let mut prev = first.clone();
    let mut failure = None;
    for i in 0..UPGRADES {
        let from = run.now_ms();
        let out = common::upgrade(&m, opts);
        let to = run.now_ms();
        windows.push((from, to, out.wall, out.pause()));
        if !out.success {
            failure = Some(format!(
                "upgrade {i} failed ({:?}):\n{}",
                out.code,
                out.output()
            ));
            break;
        }
        let mode = if opts.drain { "drain" } else { "resend" };
        if out.mode() != Some(mode) {
            failure = Some(format!(
                "upgrade {i} did not use the {mode} mode: {}",
                out.output()
            ));
            break;
        }
        let s = common::status(&m);
        if s.generation <= prev.generation || s.client_pid == prev.client_pid {
            failure = Some(format!(
                "upgrade {i} reported success but status did not change: {prev:?} -> {s:?}"
            ));
            break;
        }
        prev = s;
        if !run.wait_ops(100, Duration::from_secs(10)) {
            failure = Some(format!(
                "the workload stopped making progress after upgrade {i}"
            ));
            break;
        }
    }
    let report = run.stop();
    println!("{}", report.summary());
    for (i, (from, to, wall, pause)) in windows.iter().enumerate() {
        let worst = report.longest_between(*from, *to);
        println!(
            "upgrade {i:2}: baton upgrade {:6.1} ms, pause {:5.1} ms, longest overlapping operation {}",
            wall.as_secs_f64() * 1e3,
            pause.map_or(f64::NAN, |p| p.as_secs_f64() * 1e3),
            worst.map_or("< 1 ms".into(), |o| format!(
                "{} {:.1} ms",
                o.op, o.duration_ms
            ))
        );
    }
    if let Some(f) = failure {
        panic!("{f}\n{}", report.summary());
    }
    assert!(
        report.is_clean(),
        "the application saw errors:\n{}",
        report.summary()
    );
    let longest = report.longest.unwrap();
    assert!(
        longest.duration_ms < STALL.as_secs_f64() * 1e3,
        "an operation stalled: {longest:?}"
    );

    let last = common::status(&m);
    assert_eq!(last.upgrades, first.upgrades + UPGRADES as u64, "{last:?}");
    assert_eq!(
        last.generation,
        first.generation + UPGRADES as u64,
        "{last:?}"
    );
    assert_eq!(last.rollbacks, first.rollbacks, "{last:?}");
    m.umount().unwrap();
}

#[test]
fn twenty_upgrades_with_resend() {
    upgrades_under_the_workload(&Upgrade::default(), 101);
}

#[test]
fn twenty_upgrades_with_drain() {
    upgrades_under_the_workload(
        &Upgrade {
            drain: true,
            ..Upgrade::default()
        },
        102,
    );
}

/// To the alternative build (another version, another capability set) and back, twice.
#[test]
fn upgrade_to_another_build_and_back() {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let s0 = common::status(&m);
    assert!(!s0.client_version.ends_with("-alt"), "{s0:?}");
    let run = common::start_workload(&m, 103);
    let mut expected_gen = s0.generation;
    let mut failures = Vec::new();
    for round in 0..2 {
        for (binary, version) in [
            (common::alt_bin(), format!("{}-alt", s0.client_version)),
            (common::client_bin(), s0.client_version.clone()),
        ] {
            let out = common::upgrade(
                &m,
                &Upgrade {
                    binary: Some(binary.clone()),
                    ..Upgrade::default()
                },
            );
            println!(
                "round {round}, to {}: {}",
                binary.display(),
                out.output().trim()
            );
            if !out.success {
                failures.push(format!(
                    "upgrade to {} failed ({:?}): {}",
                    binary.display(),
                    out.code,
                    out.output()
                ));
                continue;
            }
            expected_gen += 1;
            let s = common::status(&m);
            if s.client_version != version || s.generation != expected_gen {
                failures.push(format!("after upgrading to {}: status {:?}, expected version {version}, generation {expected_gen}", binary.display(), s.json));
            }
            if !run.wait_ops(100, Duration::from_secs(10)) {
                failures.push(format!(
                    "no progress after upgrading to {}",
                    binary.display()
                ));
            }
        }
    }
    common::stop_clean(run);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    m.umount().unwrap();
}

/// The successor acknowledged, the old client is gone, and the successor dies before it
/// serves: the supervisor starts another generation (the previous binary) from the same
/// state; the connection was never lost and the application sees nothing but a pause.
#[test]
fn a_successor_dying_after_its_acknowledgement_is_replaced() {
    common::require_upgrade();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s0 = common::status(&m);
    let run = common::start_workload(&m, 104);
    let wrapper = common::alt_wrapper(
        dir.path(),
        "alt-dies-on-serve",
        "baton-alt-dies-on-serve",
        &[(ENV_CRASH_ON, "Serve")],
    );
    let out = common::upgrade(
        &m,
        &Upgrade {
            binary: Some(wrapper),
            ..Upgrade::default()
        },
    );
    println!("baton upgrade ({:?}): {}", out.code, out.output().trim());
    assert!(
        run.wait_ops(200, Duration::from_secs(20)),
        "the mount does not serve after the successor died"
    );
    let s = common::status(&m);
    println!("status after: {}", s.json);
    common::stop_clean(run);
    assert!(
        s.generation > s0.generation + 1,
        "no new generation after the successor died: {s:?}"
    );
    assert_eq!(
        s.client_version, s0.client_version,
        "the replacement should run the previous binary"
    );
    assert!(common::processes_named("baton-alt-dies-on-serve").is_empty());
    m.umount().unwrap();
}
