//! Rollouts across 20 simulated nodes, for real: a kube-apiserver 1.20 + etcd, the chart's
//! RBAC, 20 Node objects, and per node a `baton-csi` agent in mount pod mode with its own
//! fake kubelet (node name = node id) and two real FUSE mounts (two embedded volumes, so
//! two mount pods), all 40 mounts under a workload that reads back every record it
//! writes. The agents share 5 upgrade slots (Leases); `baton-csi rollout` runs as a user
//! would:
//!
//! - `--to binary:<version> --max-parallel 5`: every mount generation + 1, never more than
//!   5 slots held at once;
//! - `--to pod:<image>`: every mount moved to a new mount pod of that image (its client
//!   is the image's `baton-fs`), the old pods deleted;
//! - `--to pod:<image that cannot be pulled> --max-parallel 1`: the first node fails
//!   (`ErrImagePull`), the rollout stops there (exit 2), no other node is annotated,
//!   every mount serves on;
//! - `--to pod:<image whose client crashes> --max-parallel 5`: the first batch's mounts
//!   roll back (`rolled-back` stops a rollout like `failed`), the rollout stops (exit 2),
//!   the batch in flight finishes, no later node is annotated, every mount serves on its
//!   old client;
//!
//! with zero application errors and every record read back at the end.
//!
//! Images are played by directories of executables (hard links of this build's binaries);
//! the client version of the binary rollout is a script that execs this build's
//! `baton-fs` (each agent copies the versions it carries into its node's state directory,
//! and 20 copies of a debug `baton-fs` would be 5 GB).
//!
//! Needs etcd and kube-apiserver: `scripts/k8s-test-deps.sh` installs them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use csi_node::upgrade::request::Phase;
use csi_node::upgrade::slots::slot_index;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use testkit::kube::{ADMIN_TOKEN, FakeKubelet, KubeletConfig, User};

const NS: &str = "baton-system";
const RELEASE: &str = "baton";
const NODES: usize = 20;
const SLOTS: u64 = 5;
const MAX_PARALLEL: &str = "5";
const SELECTOR: &str = "baton.dev/scale-test=yes";
const VERSION: &str = "0.2.0";
/// The image the mount pods start with (this build's directory).
const IMAGE: &str = "baton:test";
/// An image with another client (`baton-fs-alt`).
const IMAGE_V2: &str = "baton:v2";
/// An image whose client exits at once.
const IMAGE_CRASH: &str = "baton:crash";
/// An image the fake kubelets do not have (`ErrImagePull`).
const IMAGE_MISSING: &str = "baton:missing";
/// Between two records of one mount's workload: 40 mounts on two cores.
const PACE: Duration = Duration::from_millis(25);
/// Bounds on waits: only a hung test reaches them.
const LONG: Duration = Duration::from_secs(240);

fn node_name(i: usize) -> String {
    format!("node-{:02}", i + 1)
}

/// One simulated node. Field order is drop order: the agent goes first (its drop unmounts
/// every target and backend under its directory), then the kubelet (it stops what is left
/// of the mount pods' processes).
struct SimNode {
    name: String,
    driver: Driver,
    _kubelet: FakeKubelet,
    targets: Vec<PathBuf>,
    /// The backends' mountpoints (one per volume).
    mounts: Vec<String>,
}

/// Starts node `name`'s agent (as the node service account, `kubeconfig`) and kubelet
/// (as the admin, `admin_kubeconfig`) and publishes two volumes on it.
async fn start_node(
    kubeconfig: PathBuf,
    admin_kubeconfig: PathBuf,
    name: String,
    images: Arc<HashMap<String, PathBuf>>,
    work: PathBuf,
) -> SimNode {
    let args: Vec<String> = vec![
        "--namespace".into(),
        NS.into(),
        "--mount-image".into(),
        IMAGE.into(),
        "--upgrade-slots".into(),
        SLOTS.to_string(),
        "--client-binaries-dir".into(),
        work.join("clients").display().to_string(),
        "--api-request-counts".into(),
        work.join(format!("{name}-api.json")).display().to_string(),
    ];
    let n = name.clone();
    let (driver, kubelet) = tokio::task::spawn_blocking(move || {
        let d = Driver::start(DriverOptions {
            mount_mode: "pod",
            node_id: n.clone(),
            extra_args: args,
            env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
            ..Default::default()
        });
        let kubelet = FakeKubelet::start(KubeletConfig {
            kubeconfig: admin_kubeconfig,
            node_name: n,
            binaries: HashMap::new(),
            images: (*images).clone(),
            log_dir: d.dir.path().join("kubelet"),
        })
        .unwrap();
        (d, kubelet)
    })
    .await
    .unwrap();
    driver.wait_ready().await;
    let mut node = driver.node().await;
    let mut targets = Vec::new();
    for v in ["1", "2"] {
        let target = driver.target(&format!("app-{v}"));
        let secrets = embedded_secrets(&driver.dir.path().join(format!("v{v}")));
        node.node_publish_volume(publish_req(
            &format!("handle-{v}"),
            &target,
            &secrets,
            None,
            false,
        ))
        .await
        .unwrap_or_else(|e| panic!("publish on {name}: {e}\n{}", driver.log()));
        targets.push(target);
    }
    let mut mounts: Vec<String> = driver
        .backend_mounts()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    mounts.sort();
    assert_eq!(mounts.len(), 2, "{name}: {mounts:?}");
    SimNode {
        name,
        driver,
        _kubelet: kubelet,
        targets,
        mounts,
    }
}

/// The mount pods that are not being deleted, by the mountpoint they serve.
async fn pods_by_mount(pods: &Api<Pod>) -> BTreeMap<String, Vec<Pod>> {
    let mut by = BTreeMap::<String, Vec<Pod>>::new();
    for p in pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=mount"))
        .await
        .unwrap()
        .items
    {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(mp) = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("baton.dev/mountpoint"))
            .cloned()
        else {
            continue;
        };
        by.entry(mp).or_default().push(p);
    }
    by
}

fn image_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

/// Waits until every mount of `nodes` has exactly one mount pod, of `image`.
async fn wait_one_pod_each(pods: &Api<Pod>, nodes: &[SimNode], image: &str) {
    wait_until(
        &format!("every mount has one mount pod, of {image}"),
        LONG,
        || async {
            let by = pods_by_mount(pods).await;
            nodes.iter().flat_map(|n| &n.mounts).all(|mp| {
                by.get(mp)
                    .is_some_and(|ps| ps.len() == 1 && image_of(&ps[0]) == image)
            })
        },
    )
    .await;
}

/// (generation, client version) of every mount, node by node; panics if a supervisor
/// does not answer.
fn states(nodes: &[SimNode]) -> Vec<Vec<(u64, String)>> {
    nodes
        .iter()
        .map(|n| {
            n.mounts
                .iter()
                .map(|mp| {
                    let st = try_mount_status(&n.driver, mp)
                        .unwrap_or_else(|| panic!("{}: no supervisor answers for {mp}", n.name));
                    (
                        st["generation"].as_u64().unwrap(),
                        st["client_version"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Panics unless the rollout exited with `want`; first prints the last lines of every log
/// of the nodes its output names (baton-csi's, and the mount pods' as the fake kubelet
/// kept them), since the nodes' directories go with the test.
fn expect_exit(code: i32, want: i32, out: &str, nodes: &[SimNode]) {
    if code == want {
        return;
    }
    for n in nodes
        .iter()
        .filter(|n| out.contains(&format!("node {} ", n.name)))
    {
        for (path, text) in n.driver.all_logs() {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "== {} {} (last 40 lines)\n{}",
                n.name,
                path.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
    panic!("baton-csi rollout exited with {code}, want {want}:\n{out}");
}

/// Copies every log of the nodes that `problems` name (baton-csi's, the mount pods' with
/// their supervisors and clients) to `$BATON_TEST_KEEP_LOGS` (default
/// `/tmp/rollout-scale-logs`): the nodes' directories go with the test.
fn keep_logs_of_failing_nodes(nodes: &[SimNode], problems: &[String]) {
    let root = std::env::var_os("BATON_TEST_KEEP_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/rollout-scale-logs"));
    for n in nodes {
        let dir = n.driver.dir.path().display().to_string();
        if !problems.iter().any(|p| p.contains(&dir)) {
            continue;
        }
        let to = root.join(&n.name);
        if let Err(e) = std::fs::create_dir_all(&to) {
            eprintln!(
                "cannot keep the logs of {} in {}: {e}",
                n.name,
                to.display()
            );
            continue;
        }
        for (path, text) in n.driver.all_logs() {
            let name = path.file_name().unwrap_or_default();
            if let Err(e) = std::fs::write(to.join(name), text) {
                eprintln!("cannot keep {}: {e}", path.display());
            }
        }
        eprintln!("logs of {} ({dir}) kept in {}", n.name, to.display());
    }
}

async fn assert_untouched(nodes_api: &Api<Node>, nodes: &[SimNode], request: &str) {
    for n in nodes {
        let (req, st) = node_upgrade(nodes_api, &n.name).await;
        assert_eq!(
            req.as_deref(),
            Some(request),
            "{} was annotated after the failure",
            n.name
        );
        assert_eq!(st.map(|s| s.phase), Some(Phase::Succeeded), "{}", n.name);
    }
}

// On 2026-11-27 it found application errors: a record appended through a held file and
// read back at its offset failed with "failed to fill whole buffer", for every record after
// some point, on 2 of 40 mounts. The cause was a GETATTR answered during an upgrade's
// pre-flush with a size one record short (`fsclient/tests/attr_during_flush.rs`,
// docs/design.md, *Consistency*). On a failure the nodes' logs are kept
// (`keep_logs_of_failing_nodes`).
// A clean-clone run also failed once because, in the pod rollout, a new client could not
// open its block cache directory: its scan of `home/cache/<volume uuid>` met a file the old
// client (still serving) had just evicted or renamed, "No such file", and the mount rolled
// back (no application error). Scans now skip vanished files
// (`opens_while_another_cache_writes_and_evicts_in_the_same_directory` in
// fsclient/src/data/cache.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_across_twenty_nodes_with_two_mounts_each() {
    let started = Instant::now();
    let sa = User::service_account(NS, "baton-baton-csi-node");
    let (cluster, admin) = cluster_with_chart(NS, RELEASE, &sa).await;
    // Written once: every agent, kubelet and rollout command reads them.
    let sa_kubeconfig = cluster.kubeconfig(&sa.token).unwrap();
    let admin_kubeconfig = cluster.kubeconfig(ADMIN_TOKEN).unwrap();
    let nodes_api: Api<Node> = Api::all(admin.clone());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let names: Vec<String> = (0..NODES).map(node_name).collect();
    for n in &names {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": n, "labels": {"baton.dev/scale-test": "yes"}}}),
        )
        .unwrap();
        nodes_api
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }

    // Client version 0.2.0 (this build's client, through a script) and the images.
    let work = tempfile::tempdir().unwrap();
    let client_dir = work.path().join("clients").join(VERSION);
    std::fs::create_dir_all(&client_dir).unwrap();
    let real_client = baton_bin().with_file_name("baton-fs");
    script(
        &client_dir.join("baton-fs"),
        &format!("exec '{}' \"$@\"", real_client.display()),
    );
    let alt = baton_bin().with_file_name("baton-fs-alt");
    assert!(
        alt.exists(),
        "build baton-fs-alt: cargo build -p upgrade-tests --bins"
    );
    let crash = work.path().join("crash-client");
    script(&crash, "exit 1");
    let images = Arc::new(HashMap::from([
        (
            IMAGE.to_string(),
            baton_bin().parent().unwrap().to_path_buf(),
        ),
        (
            IMAGE_V2.to_string(),
            image_dir_linked(&work.path().join("images"), "v2", &alt),
        ),
        (
            IMAGE_CRASH.to_string(),
            image_dir_linked(&work.path().join("images"), "crash", &crash),
        ),
    ]));

    // 20 agents, 40 mounts; five nodes start at a time (two cores).
    let gate = Arc::new(tokio::sync::Semaphore::new(5));
    let mut set = tokio::task::JoinSet::new();
    for n in &names {
        let (kc, admin_kc, n, images, work, gate) = (
            sa_kubeconfig.clone(),
            admin_kubeconfig.clone(),
            n.clone(),
            images.clone(),
            work.path().to_path_buf(),
            gate.clone(),
        );
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            start_node(kc, admin_kc, n, images, work).await
        });
    }
    let mut nodes: Vec<SimNode> = Vec::new();
    while let Some(n) = set.join_next().await {
        nodes.push(n.unwrap());
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    eprintln!(
        "{NODES} nodes, {} mounts up after {:?}",
        nodes.len() * 2,
        started.elapsed()
    );
    wait_one_pod_each(&pods, &nodes, IMAGE).await;
    let g0 = states(&nodes);

    let targets: Vec<PathBuf> = nodes.iter().flat_map(|n| n.targets.clone()).collect();
    let workload = Workload::start_paced(&targets, PACE);
    workload
        .wait_progress("the workload runs on every mount", 3, LONG)
        .await;
    let slots = SlotWatch::start(admin.clone(), NS);

    // 1. A binary rollout, 5 nodes at a time: every mount generation + 1.
    workload.phase("the binary rollout");
    let t = Instant::now();
    let counts = work.path().join("rollout-binary-api.json");
    let to = format!("binary:{VERSION}");
    let (code, out) = run_rollout(
        &admin_kubeconfig,
        NS,
        &counts,
        &[
            "--to",
            &to,
            "--selector",
            SELECTOR,
            "--max-parallel",
            MAX_PARALLEL,
        ],
    )
    .await;
    expect_exit(code, 0, &out, &nodes);
    assert!(out.contains("20/20 nodes upgraded"), "{out}");
    eprintln!("binary rollout of {NODES} nodes: {:?}", t.elapsed());
    let g1 = states(&nodes);
    for ((n, before), after) in nodes.iter().zip(&g0).zip(&g1) {
        for (b, a) in before.iter().zip(after) {
            assert_eq!(a.0, b.0 + 1, "{} was not upgraded", n.name);
        }
        let (_, st) = node_upgrade(&nodes_api, &n.name).await;
        assert_eq!(st.map(|s| s.phase), Some(Phase::Succeeded), "{}", n.name);
    }
    let c = read_api_counts(&counts);
    eprintln!("API requests of the binary rollout command: {c:?}");
    assert_eq!(c.get("patch"), Some(&(NODES as u64)), "{c:?}");
    let max = slots.max_at_once();
    eprintln!("upgrade slots held at once: at most {max}");
    assert!((1..=SLOTS).contains(&max), "{max} slots held at once");
    assert_eq!(slots.ever.lock().unwrap().len(), NODES);
    workload
        .wait_progress("every mount serves after the binary rollout", 3, LONG)
        .await;

    // 2. A pod rollout: every mount moves to a new mount pod of baton:v2, whose client
    // serves it; the old pods go.
    workload.phase("the pod rollout");
    let t = Instant::now();
    let counts = work.path().join("rollout-pod-api.json");
    let to_v2 = format!("pod:{IMAGE_V2}");
    let (code, out) = run_rollout(
        &admin_kubeconfig,
        NS,
        &counts,
        &[
            "--to",
            &to_v2,
            "--selector",
            SELECTOR,
            "--max-parallel",
            MAX_PARALLEL,
        ],
    )
    .await;
    expect_exit(code, 0, &out, &nodes);
    assert!(out.contains("20/20 nodes upgraded"), "{out}");
    eprintln!("pod rollout of {NODES} nodes: {:?}", t.elapsed());
    let g2 = states(&nodes);
    for ((n, before), after) in nodes.iter().zip(&g1).zip(&g2) {
        for (b, a) in before.iter().zip(after) {
            assert_eq!(a.0, b.0 + 1, "{} was not upgraded", n.name);
            assert!(a.1.ends_with("-alt"), "{}: client {}", n.name, a.1);
        }
    }
    wait_one_pod_each(&pods, &nodes, IMAGE_V2).await;
    eprintln!(
        "API requests of the pod rollout command: {:?}",
        read_api_counts(&counts)
    );
    let max = slots.max_at_once();
    assert!((1..=SLOTS).contains(&max), "{max} slots held at once");
    workload
        .wait_progress("every mount serves after the pod rollout", 3, LONG)
        .await;

    // 3. An image that cannot be pulled, one node at a time: the first node fails, the
    // rollout stops there, every mount serves on.
    workload.phase("the missing-image rollout");
    let counts = work.path().join("rollout-missing-api.json");
    let to_missing = format!("pod:{IMAGE_MISSING}");
    let (code, out) = run_rollout(
        &admin_kubeconfig,
        NS,
        &counts,
        &[
            "--to",
            &to_missing,
            "--selector",
            SELECTOR,
            "--max-parallel",
            "1",
        ],
    )
    .await;
    expect_exit(code, 2, &out, &nodes);
    assert!(out.contains("stopped: node node-01 failed"), "{out}");
    assert!(out.contains("ErrImagePull"), "{out}");
    let (req, st) = node_upgrade(&nodes_api, "node-01").await;
    assert_eq!(req.as_deref(), Some(to_missing.as_str()));
    let st = st.unwrap();
    assert_eq!(st.phase, Phase::Failed, "{st:?}");
    assert!(
        st.reason.as_deref().unwrap().contains("2 of 2 mounts"),
        "{st:?}"
    );
    assert_untouched(&nodes_api, &nodes[1..], &to_v2).await;
    // The new pods are removed; each mount is still served by its baton:v2 pod.
    wait_one_pod_each(&pods, &nodes, IMAGE_V2).await;
    assert_eq!(states(&nodes), g2, "a mount changed");
    workload
        .wait_progress("every mount serves after the failed rollout", 3, LONG)
        .await;

    // 4. An image whose client crashes, 5 nodes at a time: the first batch's mounts roll
    // back (the new pods' supervisors keep serving the old clients), the rollout stops at
    // a node of that batch, no later node is annotated.
    workload.phase("the crashing-client rollout");
    let counts = work.path().join("rollout-crash-api.json");
    let to_crash = format!("pod:{IMAGE_CRASH}");
    let (code, out) = run_rollout(
        &admin_kubeconfig,
        NS,
        &counts,
        &[
            "--to",
            &to_crash,
            "--selector",
            SELECTOR,
            "--max-parallel",
            MAX_PARALLEL,
        ],
    )
    .await;
    expect_exit(code, 2, &out, &nodes);
    let batch = &nodes[..5];
    assert!(
        batch
            .iter()
            .any(|n| out.contains(&format!("stopped: node {} failed: RolledBack", n.name))),
        "{out}"
    );
    // The batch in flight finishes: each of its nodes answers rolled-back.
    for n in batch {
        wait_until(&format!("{} answers {to_crash}", n.name), LONG, || async {
            let (req, st) = node_upgrade(&nodes_api, &n.name).await;
            req.as_deref() == Some(to_crash.as_str())
                && st.is_some_and(|s| s.request == to_crash && s.phase.is_final())
        })
        .await;
        let st = node_upgrade(&nodes_api, &n.name).await.1.unwrap();
        assert_eq!(st.phase, Phase::RolledBack, "{}: {st:?}", n.name);
    }
    assert_untouched(&nodes_api, &nodes[5..], &to_v2).await;
    assert_eq!(states(&nodes), g2, "a mount changed");
    // A rolled-back pod upgrade keeps both pods: the new one's supervisor serves the old
    // client, which lives in the old pod; later nodes keep their one pod.
    let by = pods_by_mount(&pods).await;
    for (i, n) in nodes.iter().enumerate() {
        for mp in &n.mounts {
            let mut imgs: Vec<String> = by.get(mp).into_iter().flatten().map(image_of).collect();
            imgs.sort();
            let want = if i < 5 {
                vec![IMAGE_CRASH, IMAGE_V2]
            } else {
                vec![IMAGE_V2]
            };
            assert_eq!(imgs, want, "{}: the mount pods of {mp}", n.name);
        }
    }
    let (code, out) = run_rollout(&admin_kubeconfig, NS, &counts, &["--status"]).await;
    expect_exit(code, 2, &out, &nodes);
    assert!(
        out.contains("0/20 nodes upgraded, 0 running, 5 failed, 15 not started"),
        "{out}"
    );
    workload
        .wait_progress("every mount serves after the rolled-back rollout", 3, LONG)
        .await;

    workload.phase("the end checks");
    // Slots are all free at the end.
    let leases: Vec<Lease> = Api::<Lease>::namespaced(admin.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|l| l.metadata.name.as_deref().and_then(slot_index).is_some())
        .collect();
    assert_eq!(leases.len() as u64, SLOTS, "slot leases: {leases:?}");
    assert!(
        leases
            .iter()
            .all(|l| l.spec.as_ref().unwrap().holder_identity.is_none()),
        "a slot is still held: {leases:?}"
    );

    // The applications saw nothing and every record is there.
    let per_mount = workload.records_per_dir();
    let (records, errors, problems) = workload.finish();
    eprintln!(
        "workload: {records} records on {} mounts (fewest on one mount: {:?}), {errors} errors",
        per_mount.len(),
        per_mount.iter().min()
    );
    if errors > 0 {
        keep_logs_of_failing_nodes(&nodes, &problems);
    }
    assert_eq!(errors, 0, "application errors: {problems:?}");
    assert!(problems.is_empty(), "{problems:?}");
    assert!(per_mount.iter().all(|r| *r > 0));
    for n in &nodes {
        let c = read_api_counts(&work.path().join(format!("{}-api.json", n.name)));
        eprintln!("API requests of {}'s agent (whole test): {c:?}", n.name);
    }
    eprintln!("whole test: {:?}", started.elapsed());
    // Tear the nodes down in parallel: each one's drop unmounts its targets and backends
    // (`baton umount`) and stops its kubelet's processes.
    let mut set = tokio::task::JoinSet::new();
    for n in nodes {
        set.spawn_blocking(move || drop(n));
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}
