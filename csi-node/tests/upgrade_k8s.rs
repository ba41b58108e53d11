//! Kubernetes-triggered binary upgrades, for real: a kube-apiserver 1.20 + etcd, the
//! chart's RBAC, `baton-csi` in pod mode with the node service account's identity, mount
//! pods run by a fake kubelet of node-a, real FUSE mounts under a verifying workload
//! (every record written is read back, through a file held open across the upgrades).
//!
//! Annotations on a mount pod, a PersistentVolume and the Node upgrade the right mounts
//! (generation + 1 in `baton status`), malformed and impossible requests are refused with a
//! status and an Event and leave the mounts alone, and the API requests of one mount
//! upgrade are counted.
//!
//! Needs etcd and kube-apiserver: `scripts/k8s-test-deps.sh` installs them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use csi_node::upgrade::request::{Phase, STATUS_ANNOTATION, UPGRADE_ANNOTATION, UpgradeStatus};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use testkit::kube::{
    ADMIN_TOKEN, FakeKubelet, KubeCluster, KubeletConfig, User, apply_all, create_service_account,
    render_chart,
};

const NS: &str = "baton-system";
const RELEASE: &str = "baton";
const VERSION: &str = "0.2.0";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/baton-csi")
}

/// A kubelet-style target path: `.../pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`.
fn kubelet_target(d: &Driver, pod_uid: &str, pv: &str) -> PathBuf {
    d.dir
        .path()
        .join("pods")
        .join(pod_uid)
        .join("volumes/kubernetes.io~csi")
        .join(pv)
        .join("mount")
}

/// Writes numbered records to a file it keeps open and to new files, reading each back,
/// until stopped; counts every error and mismatch.
struct Workload {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    records: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Workload {
    fn start(dirs: &[PathBuf]) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let records = Arc::new(AtomicU64::new(0));
        let threads = dirs
            .iter()
            .map(|dir| {
                let (dir, stop, errors, records) =
                    (dir.clone(), stop.clone(), errors.clone(), records.clone());
                std::thread::spawn(move || {
                    let mut problems = Vec::new();
                    let mut held = std::fs::OpenOptions::new()
                        .create(true)
                        .read(true)
                        .append(true)
                        .open(dir.join("held.log"))
                        .unwrap();
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::Acquire) {
                        let rec = format!("record {n:08}\n");
                        let mut fail = |what: String| {
                            errors.fetch_add(1, Ordering::AcqRel);
                            if problems.len() < 10 {
                                problems.push(what);
                            }
                        };
                        if let Err(e) = held.write_all(rec.as_bytes()) {
                            fail(format!("append {n}: {e}"));
                        }
                        let mut back = vec![0u8; rec.len()];
                        let read = held
                            .seek(SeekFrom::Start(n * rec.len() as u64))
                            .and_then(|_| held.read_exact(&mut back));
                        match read {
                            Ok(()) if back == rec.as_bytes() => {}
                            Ok(()) => fail(format!("record {n} read back as {back:?}")),
                            Err(e) => fail(format!("read back {n}: {e}")),
                        }
                        let f = dir.join(format!("file-{}", n % 50));
                        match std::fs::write(&f, rec.as_bytes()).and_then(|()| std::fs::read(&f)) {
                            Ok(b) if b == rec.as_bytes() => {}
                            Ok(b) => fail(format!("file {n}: {b:?}")),
                            Err(e) => fail(format!("file {n}: {e}")),
                        }
                        records.fetch_add(1, Ordering::AcqRel);
                        n += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    // Every record is there, in order.
                    let mut all = String::new();
                    std::fs::File::open(dir.join("held.log"))
                        .and_then(|mut f| f.read_to_string(&mut all))
                        .unwrap();
                    let want: String = (0..n).map(|i| format!("record {i:08}\n")).collect();
                    if all != want {
                        errors.fetch_add(1, Ordering::AcqRel);
                        problems.push(format!(
                            "held.log has {} bytes, want {}",
                            all.len(),
                            want.len()
                        ));
                    }
                    problems
                })
            })
            .collect();
        Workload {
            stop,
            errors,
            records,
            threads,
        }
    }

    /// Stops and returns (records, errors, problems).
    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        let problems: Vec<String> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (
            self.records.load(Ordering::Acquire),
            self.errors.load(Ordering::Acquire),
            problems,
        )
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The generation serving `mountpoint`, from `baton status --json`.
fn generation(d: &Driver, mountpoint: &str) -> u64 {
    let out = std::process::Command::new(baton_bin())
        .args(["status", mountpoint, "--json"])
        .env("BATON_HOME", d.state.join("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["generation"].as_u64().unwrap()
}

async fn annotate<K>(api: &Api<K>, name: &str, value: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"metadata": {"annotations": {UPGRADE_ANNOTATION: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// Waits for the final status answering `request` on mount pod `pod`.
async fn final_status(pods: &Api<Pod>, pod: &str, request: &str) -> UpgradeStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = pods.get(pod).await.unwrap();
        let st = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATUS_ANNOTATION))
            .and_then(|s| UpgradeStatus::from_json(s));
        if let Some(st) = st.filter(|s| s.request == request && s.phase.is_final()) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "no final status for {request} on {pod}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events with `reason` about object `name`, in `ns`.
async fn events(admin: &kube::Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(admin.clone(), ns)
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

async fn wait_event(admin: &kube::Client, ns: &str, name: &str, reason: &str) -> Event {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(e) = events(admin, ns, name, reason).await.pop() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} Event about {name} in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn api_counts(path: &Path) -> BTreeMap<String, u64> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn pv(name: &str, handle: &str) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "csi": {"driver": "csi.baton.dev", "volumeHandle": handle},
        },
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn annotations_upgrade_the_right_mounts_through_a_real_api_server() {
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
    let objects = render_chart(&chart_dir(), RELEASE, NS, &json!({})).unwrap();
    apply_all(&admin, &objects, NS).await.unwrap();
    let nodes: Api<Node> = Api::all(admin.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    for (name, handle) in [("pv-one", "handle-one"), ("pv-two", "handle-two")] {
        pvs.create(&PostParams::default(), &pv(name, handle))
            .await
            .unwrap();
    }

    // The image's client binaries: version 0.2.0 is this build's baton-fs.
    let images = tempfile::tempdir().unwrap();
    let client_dir = images.path().join("clients").join(VERSION);
    std::fs::create_dir_all(&client_dir).unwrap();
    std::fs::copy(
        baton_bin().with_file_name("baton-fs"),
        client_dir.join("baton-fs"),
    )
    .unwrap();
    let counts_file = images.path().join("api-requests.json");

    let mut d = Driver::start(DriverOptions {
        mount_mode: "pod",
        node_id: "node-a".into(),
        extra_args: vec![
            "--namespace".into(),
            NS.into(),
            "--mount-image".into(),
            "baton:test".into(),
            "--client-binaries-dir".into(),
            images.path().join("clients").display().to_string(),
            "--api-request-counts".into(),
            counts_file.display().to_string(),
        ],
        env: vec![(
            "KUBECONFIG".into(),
            cluster.kubeconfig(&sa.token).unwrap().display().to_string(),
        )],
        ..Default::default()
    });
    let _kubelet = FakeKubelet::start(KubeletConfig {
        kubeconfig: cluster.kubeconfig(ADMIN_TOKEN).unwrap(),
        node_name: "node-a".into(),
        binaries: HashMap::from([("baton".to_string(), baton_bin())]),
        log_dir: d.dir.path().join("kubelet"),
    })
    .unwrap();
    d.wait_ready().await;
    assert!(
        d.state.join("bin").join(VERSION).join("baton-fs").is_file(),
        "the client binary was not installed on the node"
    );

    // Two mounts on node-a: two Baton volumes, so two mount pods.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let mut node = d.node().await;
    let t1 = kubelet_target(&d, "uid-1", "pv-one");
    let t2 = kubelet_target(&d, "uid-2", "pv-two");
    let s1 = embedded_secrets(&d.dir.path().join("v1"));
    let s2 = embedded_secrets(&d.dir.path().join("v2"));
    let mount_pods = || async {
        pods.list(&ListParams::default().labels("app.kubernetes.io/component=mount"))
            .await
            .unwrap()
            .items
    };
    node.node_publish_volume(publish_req("handle-one", &t1, &s1, None, false))
        .await
        .unwrap();
    let pod_a = mount_pods().await[0].metadata.name.clone().unwrap();
    node.node_publish_volume(publish_req("handle-two", &t2, &s2, None, false))
        .await
        .unwrap();
    let all = mount_pods().await;
    assert_eq!(all.len(), 2);
    let pod_b = all
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .find(|n| *n != pod_a)
        .unwrap();
    let mountpoint = |name: &str| {
        let p = all
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap();
        p.metadata.annotations.as_ref().unwrap()["baton.dev/mountpoint"].clone()
    };
    let (mp_a, mp_b) = (mountpoint(&pod_a), mountpoint(&pod_b));
    let (ga, gb) = (generation(&d, &mp_a), generation(&d, &mp_b));

    let workload = Workload::start(&[t1.clone(), t2.clone()]);

    // 1. The mount pod: only its mount is upgraded. Count the API requests it takes.
    let before = api_counts(&counts_file);
    annotate(&pods, &pod_a, &format!("binary:{VERSION}")).await;
    let st = final_status(&pods, &pod_a, &format!("binary:{VERSION}")).await;
    assert_eq!(st.phase, Phase::Succeeded, "{st:?}");
    eprintln!("mount pod upgrade: {}", st.to_json());
    assert_eq!(st.generation, Some(ga + 1));
    assert!(st.pause_ms.is_some());
    assert_eq!(st.source, format!("pod/{NS}/{pod_a}"));
    assert_eq!(generation(&d, &mp_a), ga + 1);
    assert_eq!(generation(&d, &mp_b), gb, "the other mount was upgraded");
    wait_event(&admin, NS, &pod_a, "UpgradeSucceeded").await;
    let per_upgrade = diff(&api_counts(&counts_file), &before);
    let writes: u64 = per_upgrade
        .iter()
        .filter(|(k, _)| csi_node::kube::counting::is_write(k))
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "API requests of baton-csi for one mount upgrade: {per_upgrade:?} ({writes} writes); \
         watches opened so far: {:?}",
        api_counts(&counts_file).get("watch_metadata")
    );
    // Two status patches (running, succeeded) and one Event; no read, no list.
    assert_eq!(
        per_upgrade,
        BTreeMap::from([("create".to_string(), 1), ("patch".to_string(), 2)])
    );
    // The same annotation seen again (our own patch, a resync) does not upgrade again.
    assert_eq!(generation(&d, &mp_a), ga + 1);

    // 2. The PersistentVolume: every mount of that volume on the node (pv-two's).
    annotate(&pvs, "pv-two", &format!("binary:{VERSION}")).await;
    let st = final_status(&pods, &pod_b, &format!("binary:{VERSION}")).await;
    assert_eq!(
        (st.phase, st.generation, st.source.as_str()),
        (Phase::Succeeded, Some(gb + 1), "pv/pv-two"),
        "{st:?}"
    );
    assert_eq!(generation(&d, &mp_b), gb + 1);
    assert_eq!(generation(&d, &mp_a), ga + 1, "pv-one's mount was upgraded");
    let ev = wait_event(&admin, "default", "pv-two", "UpgradeSucceeded").await;
    assert_eq!(ev.involved_object.kind.as_deref(), Some("PersistentVolume"));

    // 3. Malformed: refused with the reason, the mount untouched.
    annotate(&pods, &pod_a, "binary:../../bin/sh").await;
    let st = final_status(&pods, &pod_a, "binary:../../bin/sh").await;
    assert_eq!(st.phase, Phase::Failed);
    assert!(
        st.reason.as_deref().unwrap().contains("invalid version"),
        "{st:?}"
    );
    assert_eq!(st.generation, Some(ga + 1));
    let ev = wait_event(&admin, NS, &pod_a, "UpgradeRefused").await;
    assert!(ev.message.unwrap().contains("invalid version"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));

    // 4. A version that is not on the node: failed, the mount untouched.
    annotate(&pods, &pod_a, "binary:9.9.9").await;
    let st = final_status(&pods, &pod_a, "binary:9.9.9").await;
    assert_eq!(st.phase, Phase::Failed);
    assert!(
        st.reason.as_deref().unwrap().contains("not on this node"),
        "{st:?}"
    );
    assert_eq!(generation(&d, &mp_a), ga + 1);

    // 5. The Node: a pod upgrade is parsed but not supported yet; then a binary upgrade
    // of every mount on it.
    annotate(&nodes, "node-a", "pod:ghcr.io/baton-fs/baton:0.2.0").await;
    for p in [&pod_a, &pod_b] {
        let st = final_status(&pods, p, "pod:ghcr.io/baton-fs/baton:0.2.0").await;
        assert_eq!(st.phase, Phase::Failed);
        assert!(st.reason.unwrap().contains("not supported yet"));
    }
    wait_event(&admin, "default", "node-a", "UpgradeRefused").await;
    assert_eq!(
        (generation(&d, &mp_a), generation(&d, &mp_b)),
        (ga + 1, gb + 1)
    );
    annotate(&nodes, "node-a", &format!("binary:{VERSION}")).await;
    for p in [&pod_a, &pod_b] {
        let st = final_status(&pods, p, &format!("binary:{VERSION}")).await;
        assert_eq!(st.source, "node/node-a");
        assert_eq!(st.phase, Phase::Succeeded, "{st:?}");
    }
    assert_eq!(
        (generation(&d, &mp_a), generation(&d, &mp_b)),
        (ga + 2, gb + 2)
    );

    // Process mode takes the same path with local supervisors: node-b's baton-csi runs
    // its backend as a detached supervisor; the Node's annotation upgrades it (no mount
    // pod, so the status is the node's record and the Event is on the Node).
    let node_b: Node = serde_json::from_value(json!({"metadata": {"name": "node-b"}})).unwrap();
    nodes.create(&PostParams::default(), &node_b).await.unwrap();
    let d2 = Driver::start(DriverOptions {
        mount_mode: "process",
        node_id: "node-b".into(),
        extra_args: vec![
            "--namespace".into(),
            NS.into(),
            "--upgrade-watch".into(),
            "on".into(),
            "--client-binaries-dir".into(),
            images.path().join("clients").display().to_string(),
        ],
        env: vec![(
            "KUBECONFIG".into(),
            cluster.kubeconfig(&sa.token).unwrap().display().to_string(),
        )],
        ..Default::default()
    });
    d2.wait_ready().await;
    let mut node2 = d2.node().await;
    let t3 = kubelet_target(&d2, "uid-3", "pv-one");
    let s3 = embedded_secrets(&d2.dir.path().join("v3"));
    node2
        .node_publish_volume(publish_req("handle-one", &t3, &s3, None, false))
        .await
        .unwrap();
    let mp_c = d2.backend_mounts().pop().unwrap().display().to_string();
    let gc = generation(&d2, &mp_c);
    let workload_b = Workload::start(std::slice::from_ref(&t3));
    annotate(&nodes, "node-b", &format!("binary:{VERSION}")).await;
    let ev = wait_event(&admin, "default", "node-b", "UpgradeSucceeded").await;
    assert!(ev.message.unwrap().contains("paused"));
    assert_eq!(generation(&d2, &mp_c), gc + 1);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read_dir(d2.state.join("upgrades"))
            .unwrap()
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap())
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record["status"]["phase"], "succeeded", "{record}");
    assert_eq!(record["status"]["generation"], gc + 1);
    // node-a's mounts were not touched by node-b's request.
    assert_eq!(
        (generation(&d, &mp_a), generation(&d, &mp_b)),
        (ga + 2, gb + 2)
    );
    let (_, errors_b, problems_b) = workload_b.finish();
    assert_eq!(errors_b, 0, "application errors on node-b: {problems_b:?}");
    node2
        .node_unpublish_volume(unpublish_req("handle-one", &t3))
        .await
        .unwrap();
    drop(d2);

    // The applications saw nothing.
    let (records, errors, problems) = workload.finish();
    eprintln!("workload: {records} records, {errors} errors");
    assert!(records > 0);
    assert_eq!(errors, 0, "application errors: {problems:?}");
    let c = api_counts(&counts_file);
    eprintln!("API requests of baton-csi over the whole test: {c:?}");
    // One watch per kind (pods, node, PVs); a watch is re-opened only after the API
    // server ends it (its 290 s timeout) or on an error.
    assert!(c.get("watch_metadata").copied().unwrap_or(0) >= 3, "{c:?}");

    // Cleanup through the driver: the mount pods go.
    for (vol, t) in [("handle-one", &t1), ("handle-two", &t2)] {
        node.node_unpublish_volume(unpublish_req(vol, t))
            .await
            .unwrap();
    }
    let pods2 = pods.clone();
    wait_until(
        "the mount pods are deleted",
        Duration::from_secs(60),
        || {
            let pods = pods2.clone();
            async move {
                pods.list(&ListParams::default().labels("app.kubernetes.io/component=mount"))
                    .await
                    .unwrap()
                    .items
                    .is_empty()
            }
        },
    )
    .await;
    d.kill();
}
