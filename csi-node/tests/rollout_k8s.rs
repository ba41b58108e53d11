//! Rolling binary upgrades across simulated nodes, for real: a kube-apiserver 1.20 + etcd,
//! the chart's RBAC, four `baton-csi` node agents (process mode, one real FUSE mount each,
//! under a workload that reads back every record it writes) sharing two upgrade slots
//! (Leases), and `baton-csi rollout` run as a user would.
//!
//! - a rollout with `--max-parallel 2` upgrades every selected node (generation + 1), and
//!   the Lease holders, watched all along, never number more than two;
//! - a rollout to a version no node has stops at its first node and leaves the others
//!   unannotated, every mount serving on its old generation;
//! - `--status` reads the progress back from the API server; a rollout command killed
//!   after its first batch, then `--pause`d, shows as paused, and `--resume` finishes it;
//! - the API requests of the rollout command and of each agent are counted.
//!
//! Needs etcd and kube-apiserver: `scripts/k8s-test-deps.sh` installs them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use csi_node::rollout::STATE_CONFIGMAP;
use csi_node::upgrade::request::{Phase, STATUS_ANNOTATION, UPGRADE_ANNOTATION, UpgradeStatus};
use csi_node::upgrade::slots::slot_index;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, PostParams};
use serde_json::json;
use testkit::kube::{
    ADMIN_TOKEN, KubeCluster, User, apply_all, create_service_account, render_chart,
};

const NS: &str = "baton-system";
const VERSION: &str = "0.2.0";
/// A second version on every node (the same binary), for the paused rollout.
const NEXT: &str = "0.2.1";
const SELECTOR: &str = "baton.dev/rollout-test=yes";
const NODES: [&str; 4] = ["node-1", "node-2", "node-3", "node-4"];

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/baton-csi")
}

/// The generation serving `mountpoint`, from `baton status --json`.
fn generation(d: &Driver, mountpoint: &Path) -> u64 {
    let out = std::process::Command::new(baton_bin())
        .arg("status")
        .arg(mountpoint)
        .arg("--json")
        .env("BATON_HOME", d.state.join("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["generation"].as_u64().unwrap()
}

/// Runs `baton-csi rollout ARGS` as the cluster admin; returns (exit code, stdout).
async fn rollout(cluster: &KubeCluster, counts: &Path, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton-csi"))
        .arg("rollout")
        .args(["--namespace", NS, "--poll", "1"])
        .arg("--api-request-counts")
        .arg(counts)
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig(ADMIN_TOKEN).unwrap())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "$ baton-csi rollout {}\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn api_counts(path: &Path) -> BTreeMap<String, u64> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

async fn node_status(nodes: &Api<Node>, name: &str) -> (Option<String>, Option<UpgradeStatus>) {
    let n = nodes.get(name).await.unwrap();
    let a = n.metadata.annotations.unwrap_or_default();
    (
        a.get(UPGRADE_ANNOTATION).cloned(),
        a.get(STATUS_ANNOTATION)
            .and_then(|s| UpgradeStatus::from_json(s)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_upgrades_every_node_two_at_a_time_and_stops_on_failure() {
    let sa = User::service_account(NS, "baton-baton-csi-node");
    let cluster = KubeCluster::start(std::slice::from_ref(&sa)).await.unwrap();
    let admin = cluster.client().await.unwrap();
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    create_service_account(&admin, NS, "default").await.unwrap();
    let objects = render_chart(&chart_dir(), "baton", NS, &json!({})).unwrap();
    apply_all(&admin, &objects, NS).await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    for n in NODES {
        let node: Node = serde_json::from_value(
            json!({"metadata": {"name": n, "labels": {"baton.dev/rollout-test": "yes"}}}),
        )
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    // A node outside the selector: never annotated.
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "node-other"}})).unwrap();
    nodes.create(&PostParams::default(), &other).await.unwrap();

    let images = tempfile::tempdir().unwrap();
    for v in [VERSION, NEXT] {
        let client_dir = images.path().join("clients").join(v);
        std::fs::create_dir_all(&client_dir).unwrap();
        std::fs::copy(
            baton_bin().with_file_name("baton-fs"),
            client_dir.join("baton-fs"),
        )
        .unwrap();
    }

    // Four node agents sharing two upgrade slots, one mount each.
    let mut drivers = Vec::new();
    let mut targets = Vec::new();
    let mut mounts = Vec::new();
    for n in NODES {
        let counts = images.path().join(format!("{n}-api.json"));
        let d = Driver::start(DriverOptions {
            mount_mode: "process",
            node_id: n.into(),
            extra_args: vec![
                "--namespace".into(),
                NS.into(),
                "--upgrade-watch".into(),
                "on".into(),
                "--upgrade-slots".into(),
                "2".into(),
                "--client-binaries-dir".into(),
                images.path().join("clients").display().to_string(),
                "--api-request-counts".into(),
                counts.display().to_string(),
            ],
            env: vec![(
                "KUBECONFIG".into(),
                cluster.kubeconfig(&sa.token).unwrap().display().to_string(),
            )],
            ..Default::default()
        });
        d.wait_ready().await;
        let mut node = d.node().await;
        let target = d.target("app");
        let secrets = embedded_secrets(&d.dir.path().join("vol"));
        node.node_publish_volume(publish_req("handle-1", &target, &secrets, None, false))
            .await
            .unwrap();
        let mp = d.backend_mounts().pop().unwrap();
        mounts.push((mp.clone(), generation(&d, &mp)));
        targets.push(target);
        drivers.push(d);
    }
    let workload = Workload::start(&targets);
    let slots = SlotWatch::start(admin.clone(), NS);

    // 1. max-parallel 2: every node upgraded, never more than two slots held at once.
    let counts = images.path().join("rollout-api.json");
    let to = format!("binary:{VERSION}");
    let (code, out) = rollout(
        &cluster,
        &counts,
        &["--to", &to, "--selector", SELECTOR, "--max-parallel", "2"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("rollout of binary:0.2.0 to 4 nodes, 2 at a time"),
        "{out}"
    );
    assert!(out.contains("started node-1, node-2"), "{out}");
    assert!(out.contains("started node-3, node-4"), "{out}");
    assert!(out.contains("4/4 nodes upgraded"), "{out}");
    for ((d, (mp, g)), n) in drivers.iter().zip(&mounts).zip(NODES) {
        assert_eq!(generation(d, mp), g + 1, "{n} was not upgraded");
        let (req, st) = node_status(&nodes, n).await;
        assert_eq!(req.as_deref(), Some(to.as_str()));
        let st = st.unwrap();
        assert_eq!(
            (st.phase, st.source.as_str()),
            (Phase::Succeeded, format!("node/{n}").as_str()),
            "{st:?}"
        );
    }
    assert_eq!(node_status(&nodes, "node-other").await, (None, None));
    let rollout_counts = api_counts(&counts);
    eprintln!("API requests of the rollout command: {rollout_counts:?}");
    // One annotation per node; the state saved once at the start, per batch and at the end.
    assert_eq!(rollout_counts.get("patch"), Some(&4), "{rollout_counts:?}");
    assert_eq!(rollout_counts.get("create"), Some(&1), "{rollout_counts:?}");
    assert_eq!(
        rollout_counts.get("replace"),
        Some(&3),
        "{rollout_counts:?}"
    );

    // Every node took a slot; at most two were ever held at once; all are free again.
    let ever = slots.ever.lock().unwrap().clone();
    assert_eq!(
        ever,
        NODES.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>()
    );
    let max = slots.max_at_once.load(Ordering::Acquire);
    eprintln!("upgrade slots held at once: at most {max}");
    assert!((1..=2).contains(&max), "{max} slots held at once");
    let leases: Vec<Lease> = Api::<Lease>::namespaced(admin.clone(), NS)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|l| l.metadata.name.as_deref().and_then(slot_index).is_some())
        .collect();
    assert_eq!(leases.len(), 2, "slot leases: {leases:?}");
    assert!(
        leases
            .iter()
            .all(|l| l.spec.as_ref().unwrap().holder_identity.is_none()),
        "a slot is still held: {leases:?}"
    );
    for n in NODES {
        let c = api_counts(&images.path().join(format!("{n}-api.json")));
        eprintln!("API requests of {n}'s agent (whole test so far): {c:?}");
    }

    // 2. --status reads it back from the API server.
    let (code, out) = rollout(&cluster, &counts, &["--status"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("rollout of binary:0.2.0 (2 at a time): succeeded; 4/4 nodes upgraded"),
        "{out}"
    );
    assert!(out.contains("  node-4: upgraded"), "{out}");

    // 3. A version no node has: the first node fails, the rollout stops there.
    let (code, out) = rollout(
        &cluster,
        &counts,
        &[
            "--to",
            "binary:9.9.9",
            "--selector",
            SELECTOR,
            "--max-parallel",
            "1",
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("stopped: node node-1 failed"), "{out}");
    let (req, st) = node_status(&nodes, "node-1").await;
    assert_eq!(req.as_deref(), Some("binary:9.9.9"));
    let st = st.unwrap();
    assert_eq!(st.phase, Phase::Failed, "{st:?}");
    assert!(st.reason.unwrap().contains("not on this node"));
    for n in &NODES[1..] {
        let (req, _) = node_status(&nodes, n).await;
        assert_eq!(
            req.as_deref(),
            Some(to.as_str()),
            "{n} was annotated after the failure"
        );
    }
    for ((d, (mp, g)), n) in drivers.iter().zip(&mounts).zip(NODES) {
        assert_eq!(generation(d, mp), g + 1, "{n}'s mount changed");
    }
    let (code, out) = rollout(&cluster, &counts, &["--status"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("failed on node-1"), "{out}");
    assert!(
        out.contains("0/4 nodes upgraded, 0 running, 1 failed, 3 not started"),
        "{out}"
    );
    assert!(out.contains("  node-2: not started"), "{out}");
    // A stopped rollout is not resumed into more failures: a new one is needed.
    let (code, out) = rollout(&cluster, &counts, &["--resume"]).await;
    assert_eq!(code, 2, "{out}");
    assert_eq!(
        node_status(&nodes, "node-2").await.0.as_deref(),
        Some(to.as_str())
    );

    // 4. Interrupted, paused, resumed: the state is the API server's. A rollout command
    // that polls every 60 s is killed once its first batch is annotated (it sleeps then).
    let next = format!("binary:{NEXT}");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton-csi"));
    cmd.args(["rollout", "--namespace", NS, "--poll", "60"])
        .args(["--to", &next, "--selector", SELECTOR, "--max-parallel", "2"])
        .env("KUBECONFIG", cluster.kubeconfig(ADMIN_TOKEN).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let stored = || async {
        let cm = cms.get_opt(STATE_CONFIGMAP).await.unwrap()?;
        let json = cm.data?.remove("state")?;
        Some(serde_json::from_str::<serde_json::Value>(&json).unwrap())
    };
    wait_until(
        "the first batch is annotated",
        Duration::from_secs(60),
        || async {
            stored()
                .await
                .is_some_and(|s| s["target"] == next.as_str() && s["annotated"] == 2)
        },
    )
    .await;
    child.kill().await.unwrap();
    for n in ["node-1", "node-2"] {
        wait_until(
            "the first batch is upgraded",
            Duration::from_secs(120),
            || async {
                node_status(&nodes, n)
                    .await
                    .1
                    .is_some_and(|st| st.request == next && st.phase == Phase::Succeeded)
            },
        )
        .await;
    }
    let (code, out) = rollout(&cluster, &counts, &["--pause"]).await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = rollout(&cluster, &counts, &["--status"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("paused; 2/4 nodes upgraded, 0 running, 0 failed, 2 not started"),
        "{out}"
    );
    assert_eq!(
        node_status(&nodes, "node-3").await.0.as_deref(),
        Some(to.as_str())
    );
    let (code, out) = rollout(&cluster, &counts, &["--resume"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("started node-3, node-4"), "{out}");
    assert!(out.contains("4/4 nodes upgraded"), "{out}");
    for ((d, (mp, g)), n) in drivers.iter().zip(&mounts).zip(NODES) {
        assert_eq!(generation(d, mp), g + 2, "{n} was not upgraded to {NEXT}");
    }
    let max = slots.max_at_once.load(Ordering::Acquire);
    assert!((1..=2).contains(&max), "{max} slots held at once");

    // Every mount served all along.
    let (records, errors, problems) = workload.finish();
    eprintln!("workload: {records} records, {errors} errors");
    assert!(records > 0);
    assert_eq!(errors, 0, "application errors: {problems:?}");
    assert!(problems.is_empty(), "{problems:?}");
    drop(drivers);
}
