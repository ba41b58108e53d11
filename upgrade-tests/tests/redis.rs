//! The basic live upgrade on a volume whose metadata is in Redis (shared volumes): the
//! successor reuses the mount's metadata session, and the application sees no error.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use testkit::mount::{MountOptions, TestMount, baton};
use testkit::redis::RedisServer;
use upgrade_tests::baton_cli::Upgrade;

const UPGRADES: u64 = 10;

#[test]
fn upgrades_of_a_redis_volume_under_the_workload() {
    common::require_upgrade();
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let meta = redis.url(1);
    let storage = format!("fs://{}/objects", dir.path().display());
    let out = baton(
        &home,
        &["format", "shared", "--meta", &meta, "--storage", &storage],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = TestMount::at(
        &home,
        &dir.path().join("mnt"),
        &MountOptions {
            meta: Some(meta),
            args: Vec::new(),
        },
    )
    .unwrap();
    let s0 = common::status(&m);
    let run = common::start_workload(&m, 301);
    let mut failures = Vec::new();
    for i in 0..UPGRADES {
        let out = common::upgrade(&m, &Upgrade::default());
        if !out.success {
            failures.push(format!("upgrade {i} failed: {}", out.output()));
            break;
        }
        if !run.wait_ops(100, Duration::from_secs(10)) {
            failures.push(format!("no progress after upgrade {i}"));
            break;
        }
    }
    common::stop_clean(run);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let s = common::status(&m);
    assert_eq!(
        (s.upgrades, s.generation),
        (s0.upgrades + UPGRADES, s0.generation + UPGRADES),
        "{s:?}"
    );
    m.umount().unwrap();
}
