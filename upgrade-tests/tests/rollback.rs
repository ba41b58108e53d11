//! Every cause of rollback, under the workload: the upgrade exits non-zero with the
//! reason, the old client (same generation, same pid) keeps serving, the failed successor
//! is gone, and the application sees no error. Then an upgrade still works.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use testkit::mount::{MountOptions, TestMount};
use upgrade_tests::baton_cli::{EXIT_ROLLED_BACK, Upgrade};
use upgrade_tests::inject::{
    ENV_CAPABILITIES, ENV_CORRUPT_STATE, ENV_CRASH_ON, ENV_HANG_ON, ENV_INIT_MISMATCH,
    ENV_STATE_VERSIONS,
};

/// How long a hung successor is waited for.
const TIMEOUT_SECS: f64 = 3.0;
/// How long after the rollback a failed successor may still run.
const REAP_WITHIN: Duration = Duration::from_secs(15);

struct Cause {
    name: &'static str,
    upgrade: Upgrade,
    /// A word of the successor's command line, to check it is gone afterwards.
    process: Option<String>,
}

fn causes(dir: &Path) -> Vec<Cause> {
    let bin = |p: std::path::PathBuf| Upgrade {
        binary: Some(p),
        ..Upgrade::default()
    };
    let hung = |p: std::path::PathBuf| Upgrade {
        binary: Some(p),
        timeout_secs: Some(TIMEOUT_SECS),
        ..Upgrade::default()
    };
    let alt = |name: &'static str, env: &[(&str, &str)]| {
        let argv0 = format!("baton-alt-{name}");
        (common::alt_wrapper(dir, name, &argv0, env), argv0)
    };
    let mut v = Vec::new();
    v.push(Cause {
        name: "binary missing",
        upgrade: bin(dir.join("no-such-baton-fs")),
        process: None,
    });
    let not_exec = dir.join("not-executable");
    std::fs::write(
        &not_exec,
        format!(
            "#!/bin/sh\nexec {} \"$@\"\n",
            common::client_bin().display()
        ),
    )
    .unwrap();
    v.push(Cause {
        name: "binary not executable",
        upgrade: bin(not_exec),
        process: None,
    });
    v.push(Cause {
        name: "successor exits 1 at once",
        upgrade: bin(common::script(dir, "exit-1", "exit 1")),
        process: None,
    });
    for (name, at) in [
        ("crash-at-start", "Start"),
        ("crash-during-base-transfer", "BaseState"),
        ("crash-after-staging-the-base", "BaseStaged"),
        ("crash-during-state-transfer", "ToClient::State"),
        ("crash-on-receiving-the-fd", "Init"),
        ("crash-instead-of-acknowledging", "InitReply"),
    ] {
        let (p, argv0) = alt(name, &[(ENV_CRASH_ON, at)]);
        v.push(Cause {
            name,
            upgrade: bin(p),
            process: Some(argv0),
        });
    }
    let (p, argv0) = alt("no-common-capability", &[(ENV_CAPABILITIES, "none")]);
    v.push(Cause {
        name: "no common capability",
        upgrade: bin(p),
        process: Some(argv0),
    });
    let (p, argv0) = alt("no-common-state-version", &[(ENV_STATE_VERSIONS, "999")]);
    v.push(Cause {
        name: "no common state version",
        upgrade: bin(p),
        process: Some(argv0),
    });
    let (p, argv0) = alt("init-mismatch", &[(ENV_INIT_MISMATCH, "1")]);
    v.push(Cause {
        name: "INIT parameters differ",
        upgrade: bin(p),
        process: Some(argv0),
    });
    let (p, argv0) = alt("bad-state", &[(ENV_CORRUPT_STATE, "1")]);
    v.push(Cause {
        name: "state import fails",
        upgrade: bin(p),
        process: Some(argv0),
    });
    let hang = common::script(dir, "hang", "exec -a baton-hang-at-exec sleep 600");
    v.push(Cause {
        name: "timeout: successor hangs at once",
        upgrade: hung(hang),
        process: Some("baton-hang-at-exec".into()),
    });
    let (p, argv0) = alt("hang-after-freeze", &[(ENV_HANG_ON, "Init")]);
    v.push(Cause {
        name: "timeout: successor hangs while the old client is frozen",
        upgrade: hung(p),
        process: Some(argv0),
    });
    v
}

#[test]
fn every_rollback_cause_keeps_the_old_client_serving() {
    common::require_upgrade();
    let dir = tempfile::tempdir().unwrap();
    let m = TestMount::new(&MountOptions::default()).unwrap();
    let run = common::start_workload(&m, 201);
    let mut failures = Vec::new();
    for cause in causes(dir.path()) {
        let before = common::status(&m);
        let out = common::upgrade(&m, &cause.upgrade);
        println!(
            "{}: exit {:?} in {:.0} ms: {}",
            cause.name,
            out.code,
            out.wall.as_secs_f64() * 1e3,
            out.output().trim()
        );
        let after = common::status(&m);
        let mut fail = |what: String| failures.push(format!("{}: {what}", cause.name));
        if out.code != Some(EXIT_ROLLED_BACK) || out.outcome() != Some("rolled-back") {
            fail(format!(
                "baton upgrade did not report a rollback (exit {:?}): {}",
                out.code,
                out.output()
            ));
        }
        if out.reason().is_none_or(str::is_empty) {
            fail(format!("baton upgrade gives no reason: {}", out.output()));
        }
        if (after.generation, after.client_pid, &after.client_version)
            != (before.generation, before.client_pid, &before.client_version)
        {
            fail(format!(
                "another client serves: {:?} -> {:?}",
                before.json, after.json
            ));
        }
        if after.rollbacks != before.rollbacks + 1 {
            fail(format!(
                "rollbacks {} -> {}",
                before.rollbacks, after.rollbacks
            ));
        }
        if after.last_rollback.is_none() {
            fail("status gives no reason for the rollback".into());
        }
        if !run.wait_ops(100, Duration::from_secs(10)) {
            fail("the old client does not serve after the rollback".into());
        }
        if let Some(p) = &cause.process {
            // The supervisor may give a failed successor a few seconds to exit by itself.
            let since = Instant::now();
            while !common::processes_named(p).is_empty() && since.elapsed() < REAP_WITHIN {
                std::thread::sleep(Duration::from_millis(50));
            }
            let left = common::processes_named(p);
            if left.is_empty() {
                println!(
                    "  the failed successor was gone {:.1} s after the rollback",
                    since.elapsed().as_secs_f64()
                );
            } else {
                fail(format!(
                    "the failed successor still runs {REAP_WITHIN:?} after the rollback: pids {left:?}"
                ));
            }
        }
    }
    // After all that, the mount still upgrades.
    let out = common::upgrade(&m, &Upgrade::default());
    if !out.success {
        failures.push(format!(
            "a plain upgrade after the rollbacks failed: {}",
            out.output()
        ));
    }
    assert!(run.wait_ops(100, Duration::from_secs(10)));
    common::stop_clean(run);
    assert!(
        failures.is_empty(),
        "{} rollback checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    m.umount().unwrap();
}
