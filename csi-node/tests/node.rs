//! The Node service through the real Unix socket, as root, with real FUSE mounts (process
//! mode: detached `baton` supervisors) and real bind mounts.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use csi_node::proto::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodeGetVolumeStatsRequest, VolumeCapability, volume_capability,
    volume_usage,
};
use tonic::Code;

fn stats_req(volume_id: &str, path: &std::path::Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_share_and_unpublish_with_real_mounts() {
    let d = Driver::start(DriverOptions::default());
    d.wait_ready().await;
    let mut node = d.node().await;
    let secrets = embedded_secrets(d.dir.path());
    let (t1, t2, t3, t4) = (
        d.target("p1"),
        d.target("p2"),
        d.target("p3"),
        d.target("p4"),
    );

    // Publish: the driver formats the volume on first use, mounts it once, binds it.
    node.node_publish_volume(publish_req("vol-a", &t1, &secrets, None, false))
        .await
        .unwrap();
    assert!(is_mounted(&t1));
    std::fs::write(t1.join("hello.txt"), b"from p1").unwrap();
    std::fs::create_dir(t1.join("sub")).unwrap();
    std::fs::write(t1.join("sub/inner.txt"), b"inner").unwrap();

    // Publish again with the same arguments: OK, nothing new mounted.
    node.node_publish_volume(publish_req("vol-a", &t1, &secrets, None, false))
        .await
        .unwrap();
    // Same target, different arguments: ALREADY_EXISTS.
    let r = node
        .node_publish_volume(publish_req("vol-a", &t1, &secrets, None, true))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let r = node
        .node_publish_volume(publish_req("vol-b", &t1, &secrets, Some("sub"), false))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);

    // Publish elsewhere, and a second volume (a subdirectory) of the same Baton volume:
    // both share the one backend mount.
    node.node_publish_volume(publish_req("vol-a", &t2, &secrets, None, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(t2.join("hello.txt")).unwrap(), b"from p1");
    node.node_publish_volume(publish_req("vol-b", &t3, &secrets, Some("/sub/"), false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(t3.join("inner.txt")).unwrap(), b"inner");
    assert!(
        !t3.join("hello.txt").exists(),
        "a subdir publish must not show the volume root"
    );
    // Read-only publish: writes fail with EROFS.
    node.node_publish_volume(publish_req("vol-c", &t4, &secrets, Some("sub"), true))
        .await
        .unwrap();
    assert_eq!(std::fs::read(t4.join("inner.txt")).unwrap(), b"inner");
    let e = std::fs::write(t4.join("nope"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        d.backend_mounts().len(),
        1,
        "one Baton mount per volume and node"
    );
    let dev = std::fs::metadata(&d.backend_mounts()[0]).unwrap().dev();
    for t in [&t1, &t2, &t3, &t4] {
        assert_eq!(std::fs::metadata(t).unwrap().dev(), dev);
    }

    // Stats of a published target; NOT_FOUND for a path that is not one.
    let st = node
        .node_get_volume_stats(stats_req("vol-a", &t2))
        .await
        .unwrap()
        .into_inner();
    let units: Vec<i32> = st.usage.iter().map(|u| u.unit).collect();
    assert_eq!(
        units,
        [
            volume_usage::Unit::Bytes as i32,
            volume_usage::Unit::Inodes as i32
        ]
    );
    assert!(st.usage[1].used >= 3, "{st:?}");
    assert_eq!(st.volume_condition.map(|c| c.abnormal), Some(false));
    let r = node
        .node_get_volume_stats(stats_req("vol-a", &d.dir.path().join("nowhere")))
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = node.node_get_volume_stats(stats_req("vol-b", &t2)).await;
    assert_eq!(code(r), Code::NotFound, "t2 is vol-a's");

    // Unpublish, twice: OK both times; the target directory is removed.
    node.node_unpublish_volume(unpublish_req("vol-a", &t1))
        .await
        .unwrap();
    assert!(!t1.exists());
    node.node_unpublish_volume(unpublish_req("vol-a", &t1))
        .await
        .unwrap();
    assert_eq!(d.backend_mounts().len(), 1, "still used by three targets");
    assert_eq!(std::fs::read(t2.join("hello.txt")).unwrap(), b"from p1");
    // Unpublishing a target with another volume's id is refused.
    let r = node
        .node_unpublish_volume(unpublish_req("vol-a", &t3))
        .await;
    assert_eq!(code(r), Code::NotFound);
    assert!(is_mounted(&t3));

    for (v, t) in [("vol-a", &t2), ("vol-b", &t3), ("vol-c", &t4)] {
        node.node_unpublish_volume(unpublish_req(v, t))
            .await
            .unwrap();
        assert!(!t.exists());
    }
    // The last user is gone: the backend is unmounted and its supervisor stopped.
    assert!(d.backend_mounts().is_empty(), "backend still mounted");
    assert_eq!(d.backend_records(), 0);
    let socks = std::fs::read_dir(d.state.join("home/run"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(socks, 0, "a supervisor control socket is left");

    // The data outlives the mounts: publish again and read it back.
    node.node_publish_volume(publish_req("vol-a", &t1, &secrets, None, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(t1.join("hello.txt")).unwrap(), b"from p1");
    node.node_unpublish_volume(unpublish_req("vol-a", &t1))
        .await
        .unwrap();
    assert!(d.backend_mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_error_code() {
    let d = Driver::start(DriverOptions::default());
    d.wait_ready().await;
    let mut node = d.node().await;
    let secrets = embedded_secrets(d.dir.path());
    let t = d.target("e");

    let mut req = publish_req("", &t, &secrets, None, false);
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    req.volume_id = "v".into();
    req.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    req.target_path = "relative/path".into();
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    let mut req = publish_req("v", &t, &secrets, None, false);
    req.volume_capability = None;
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    req.volume_capability = Some(VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode { mode: 1 }),
    });
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    req.volume_capability = Some(mount_cap(
        volume_capability::access_mode::Mode::Unknown,
        &[],
    ));
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    req.volume_capability = Some(mount_cap(
        volume_capability::access_mode::Mode::SingleNodeWriter,
        &["exec"],
    ));
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    let mut req = publish_req("v", &t, &Default::default(), None, false);
    let status = node.node_publish_volume(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("metaurl"), "{}", status.message());
    req.secrets = secrets.clone();
    req.volume_context
        .insert("subdir".into(), "../escape".into());
    assert_eq!(
        code(node.node_publish_volume(req.clone()).await),
        Code::InvalidArgument
    );
    // A volume whose directory does not exist: NOT_FOUND, and nothing stays mounted.
    req.volume_context
        .insert("subdir".into(), "no/such/dir".into());
    let status = node.node_publish_volume(req.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        !status.message().contains("redb://"),
        "a secret leaked: {}",
        status.message()
    );
    assert!(
        d.backend_mounts().is_empty(),
        "the backend of a failed publish stayed mounted"
    );
    assert!(!is_mounted(&t));

    assert_eq!(
        code(node.node_unpublish_volume(unpublish_req("", &t)).await),
        Code::InvalidArgument
    );
    let mut u = unpublish_req("v", &t);
    u.target_path.clear();
    assert_eq!(
        code(node.node_unpublish_volume(u).await),
        Code::InvalidArgument
    );
    // Unpublishing what was never published is fine.
    node.node_unpublish_volume(unpublish_req("v", &t))
        .await
        .unwrap();
    assert_eq!(
        code(node.node_get_volume_stats(stats_req("", &t)).await),
        Code::InvalidArgument
    );
    let mut s = stats_req("v", &t);
    s.volume_path.clear();
    assert_eq!(
        code(node.node_get_volume_stats(s).await),
        Code::InvalidArgument
    );

    // No secret ever reaches the log.
    let log = d.log();
    assert!(
        !log.contains("meta.redb"),
        "the metadata URL was logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_on_one_volume_are_aborted() {
    let d = Driver::start(DriverOptions::default());
    d.wait_ready().await;
    let secrets = embedded_secrets(d.dir.path());
    let t = d.target("c");
    // Connect every client first, then send the calls together: the first one formats
    // and mounts the volume (child processes, FUSE), during which the others arrive.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(d.node().await);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut calls = Vec::new();
    for mut node in clients {
        let req = publish_req("vol-c", &t, &secrets, None, false);
        let start = std::sync::Arc::clone(&start);
        calls.push(tokio::spawn(async move {
            start.wait().await;
            node.node_publish_volume(req).await.map(|_| ())
        }));
    }
    let mut ok = 0;
    let mut aborted = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) if s.code() == Code::Aborted => aborted += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(ok >= 1 && aborted >= 1, "ok {ok}, aborted {aborted}");
    // The CO's retry after ABORTED succeeds, and everything is mounted once.
    let mut node = d.node().await;
    node.node_publish_volume(publish_req("vol-c", &t, &secrets, None, false))
        .await
        .unwrap();
    let stacked = csi_node::mountinfo::MountTable::read()
        .unwrap()
        .0
        .iter()
        .filter(|e| e.mountpoint == t)
        .count();
    assert_eq!(stacked, 1);
    node.node_unpublish_volume(unpublish_req("vol-c", &t))
        .await
        .unwrap();
    assert!(d.backend_mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounts_outlive_the_plugin_and_are_rediscovered() {
    let mut d = Driver::start(DriverOptions::default());
    d.wait_ready().await;
    let secrets = embedded_secrets(d.dir.path());
    let (t1, t2, t3) = (d.target("r1"), d.target("r2"), d.target("r3"));
    {
        let mut node = d.node().await;
        for t in [&t1, &t2, &t3] {
            node.node_publish_volume(publish_req("vol-r", t, &secrets, None, false))
                .await
                .unwrap();
        }
        std::fs::write(t1.join("kept.txt"), b"survives").unwrap();
    }
    // The plugin dies; the mount keeps serving (its supervisor is in its own session).
    d.kill();
    assert_eq!(std::fs::read(t2.join("kept.txt")).unwrap(), b"survives");
    // Meanwhile the kubelet-like cleanup of one pod happened without the plugin.
    nix::mount::umount2(&t3, nix::mount::MntFlags::MNT_DETACH).unwrap();

    d.spawn();
    d.wait_ready().await;
    let mut node = d.node().await;
    // A repeated publish is recognised from the host (record + mountinfo).
    node.node_publish_volume(publish_req("vol-r", &t1, &secrets, None, false))
        .await
        .unwrap();
    let r = node
        .node_publish_volume(publish_req("vol-r", &t2, &secrets, None, true))
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    node.node_unpublish_volume(unpublish_req("vol-r", &t1))
        .await
        .unwrap();
    assert_eq!(d.backend_mounts().len(), 1, "t2 still uses the backend");
    assert_eq!(std::fs::read(t2.join("kept.txt")).unwrap(), b"survives");
    node.node_unpublish_volume(unpublish_req("vol-r", &t2))
        .await
        .unwrap();
    assert!(d.backend_mounts().is_empty());

    // A plugin that died after the last unpublish but before unmounting the backend:
    // the next one finds the backend unused and unmounts it.
    node.node_publish_volume(publish_req("vol-r", &t1, &secrets, None, false))
        .await
        .unwrap();
    drop(node);
    d.kill();
    nix::mount::umount2(&t1, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(d.backend_mounts().len(), 1);
    d.spawn();
    d.wait_ready().await;
    assert!(
        d.backend_mounts().is_empty(),
        "the unused backend was not released:\n{}",
        d.log()
    );
    assert_eq!(d.backend_records(), 0);
}

/// Pids of the processes whose command line mentions `needle`, and their children.
fn processes_of(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
        parents.push((pid, ppid.unwrap_or(0)));
    }
    let children: Vec<i32> = parents
        .iter()
        .filter(|(_, pp)| pids.contains(pp))
        .map(|(p, _)| *p)
        .collect();
    pids.extend(children);
    pids
}

/// A supervisor told to wait for a successor (`BATON_SIGTERM_WAIT`, as in a mount pod),
/// whose mount the keeper holds, serves on after SIGTERM; when nobody takes the mount over
/// within the wait, it flushes what the client buffered and unmounts, as without a keeper
/// (a node shutting down must not lose written data).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_serves_on_for_a_successor_then_flushes_and_unmounts() {
    let d = Driver::start(DriverOptions {
        env: vec![("BATON_SIGTERM_WAIT".into(), "3".into())],
        ..Default::default()
    });
    d.wait_ready().await;
    let mut node = d.node().await;
    let secrets = embedded_secrets(d.dir.path());
    let (t1, t2) = (d.target("w1"), d.target("w2"));
    node.node_publish_volume(publish_req("vol-w", &t1, &secrets, None, false))
        .await
        .unwrap();
    // Written, never synced: in the client's buffers.
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(t1.join("unsynced.bin"), &data).unwrap();
    let backend = d.backend_mounts()[0].display().to_string();
    let out = std::process::Command::new(testkit::mount::baton_bin())
        .args(["status", &backend, "--json"])
        .env("BATON_HOME", d.state.join("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let supervisor = nix::unistd::Pid::from_raw(status["supervisor_pid"].as_i64().unwrap() as i32);
    let started = std::time::Instant::now();
    nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGTERM).unwrap();

    // It serves on meanwhile.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(csi_node::sys::is_alive(&t1), "the mount died at SIGTERM");
    assert_eq!(std::fs::read(t1.join("unsynced.bin")).unwrap(), data);
    assert!(
        handover_proto::keeper::process_runs(supervisor.as_raw() as u32),
        "the supervisor exited at SIGTERM"
    );
    // Then it stops as without a keeper.
    while handover_proto::keeper::process_runs(supervisor.as_raw() as u32) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the supervisor did not stop after the wait"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "the supervisor stopped {:?} after SIGTERM",
        started.elapsed()
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(3));
    let logs = d.logs();
    assert!(
        logs.contains("SIGTERM: the mount stays")
            && logs.contains("no supervisor took the mount over after SIGTERM"),
        "{logs}"
    );
    // What was buffered reached the volume: a new mount reads it.
    node.node_publish_volume(publish_req("vol-w", &t2, &secrets, None, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(t2.join("unsynced.bin")).unwrap(), data);
    for t in [&t1, &t2] {
        node.node_unpublish_volume(unpublish_req("vol-w", t))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_backend_is_reported_and_mounted_afresh() {
    // The descriptor keeper holds a mount whose processes all died for a while, waiting
    // for a supervisor to re-seed it; none does here (process mode): after 2 s the mount
    // fails, as it must.
    let d = Driver::start(DriverOptions {
        extra_args: vec!["--keeper-orphan-grace".into(), "2".into()],
        ..Default::default()
    });
    d.wait_ready().await;
    let mut node = d.node().await;
    let secrets = embedded_secrets(d.dir.path());
    let (t1, t2) = (d.target("d1"), d.target("d2"));
    node.node_publish_volume(publish_req("vol-d", &t1, &secrets, None, false))
        .await
        .unwrap();
    let f = std::fs::File::create(t1.join("durable.txt")).unwrap();
    std::io::Write::write_all(&mut &f, b"flushed").unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Kill the backend's supervisor and client (what an OOM kill of a mount pod does).
    let backend = d.backend_mounts()[0].clone();
    let pids = processes_of(&backend.display().to_string());
    assert!(pids.len() >= 2, "supervisor and client not found: {pids:?}");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while csi_node::sys::is_alive(&t1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the mount survived its processes"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The volume condition says so.
    let st = node
        .node_get_volume_stats(stats_req("vol-d", &t1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.volume_condition.map(|c| c.abnormal), Some(true));
    // A new publish mounts the volume afresh; the data is there.
    node.node_publish_volume(publish_req("vol-d", &t2, &secrets, None, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(t2.join("durable.txt")).unwrap(), b"flushed");
    // The dead target can still be unpublished; then the backend goes.
    node.node_unpublish_volume(unpublish_req("vol-d", &t1))
        .await
        .unwrap();
    assert!(!t1.exists());
    node.node_unpublish_volume(unpublish_req("vol-d", &t2))
        .await
        .unwrap();
    assert!(d.backend_mounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info() {
    let d = Driver::start(DriverOptions {
        node_id: "node-7".into(),
        ..Default::default()
    });
    d.wait_ready().await;
    // Only root may talk to the driver (a caller can mount anything anywhere).
    let mode = std::fs::metadata(&d.socket).unwrap().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let mut id = d.identity().await;
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.baton.dev");
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "a node-only plugin does not offer the controller"
    );
    let mut node = d.node().await;
    assert_eq!(
        node.node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .node_id,
        "node-7"
    );
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.is_empty());
    // The controller is not served by a node plugin.
    let mut ctl = d.controller().await;
    let r = ctl
        .controller_get_capabilities(csi_node::proto::ControllerGetCapabilitiesRequest {})
        .await;
    assert_eq!(code(r), Code::Unimplemented);
}

/// A Redis volume with a password and a storage credential: neither appears in any log
/// (baton-csi's, the backend supervisor's and client's), any record in the state
/// directory, or any error a CO sees — including the errors of a wrong password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_reach_a_log_or_an_error() {
    const PASSWORD: &str = "pw-Kq7-never-logged";
    const WRONG: &str = "pw-wrong-never-logged";
    const AWS_KEY: &str = "aws-key-never-logged";
    let redis = testkit::redis::RedisServer::start().unwrap();
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string()])
        .args(["CONFIG", "SET", "requirepass", PASSWORD])
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{out:?}"
    );
    let d = Driver::start(DriverOptions::default());
    d.wait_ready().await;
    let mut node = d.node().await;
    let url = |pw: &str| format!("redis://:{pw}@127.0.0.1:{}/1", redis.port());
    let secrets = std::collections::HashMap::from([
        ("metaurl".to_string(), url(PASSWORD)),
        ("name".to_string(), "locked".to_string()),
        (
            "storage".to_string(),
            format!("fs://{}", d.dir.path().join("objects").display()),
        ),
        ("AWS_SECRET_ACCESS_KEY".to_string(), AWS_KEY.to_string()),
    ]);
    let (t1, t2) = (d.target("s1"), d.target("s2"));
    node.node_publish_volume(publish_req("vol-s", &t1, &secrets, None, false))
        .await
        .unwrap();
    std::fs::write(t1.join("f"), b"secret-free").unwrap();
    assert_eq!(std::fs::read(t1.join("f")).unwrap(), b"secret-free");

    // A wrong password fails the publish; the error names the step, not the password.
    let mut wrong = secrets.clone();
    wrong.insert("metaurl".into(), url(WRONG));
    let status = node
        .node_publish_volume(publish_req("vol-w", &t2, &wrong, None, false))
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    assert!(
        !status.message().contains(WRONG) && !status.message().contains(AWS_KEY),
        "{}",
        status.message()
    );
    assert!(!is_mounted(&t2));
    assert_eq!(
        d.backend_mounts().len(),
        1,
        "only the good volume is mounted"
    );

    node.node_unpublish_volume(unpublish_req("vol-s", &t1))
        .await
        .unwrap();
    assert!(d.backend_mounts().is_empty());
    assert!(
        !d.all_logs().iter().all(|(_, t)| t.is_empty()),
        "no log was written at all"
    );
    d.assert_no_secret_logged(&[PASSWORD, WRONG, AWS_KEY]);
}
