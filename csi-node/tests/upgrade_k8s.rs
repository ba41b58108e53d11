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
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use csi_node::proto::node_client::NodeClient;
use csi_node::proto::volume_capability;
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

/// `baton status --json` of `mountpoint`.
fn mount_status(d: &Driver, mountpoint: &str) -> serde_json::Value {
    try_mount_status(d, mountpoint).unwrap_or_else(|out| panic!("{out:?}"))
}

/// `baton status --json` of `mountpoint`, or its output if no supervisor answered.
fn try_mount_status(
    d: &Driver,
    mountpoint: &str,
) -> Result<serde_json::Value, std::process::Output> {
    let out = std::process::Command::new(baton_bin())
        .args(["status", mountpoint, "--json"])
        .env("BATON_HOME", d.state.join("home"))
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(out);
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// What the fake kubelet logged of mount pod `pod`'s processes.
fn pod_log(d: &Driver, pod: &str) -> String {
    let path = d.dir.path().join("kubelet").join(format!("{NS}_{pod}.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The generation serving `mountpoint`.
fn generation(d: &Driver, mountpoint: &str) -> u64 {
    mount_status(d, mountpoint)["generation"].as_u64().unwrap()
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
    final_status_from(pods, pod, request, None).await
}

/// Waits for the final status answering `request` from `source` (any, if `None`) on
/// mount pod `pod`.
async fn final_status_from(
    pods: &Api<Pod>,
    pod: &str,
    request: &str,
    source: Option<&str>,
) -> UpgradeStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = pods.get(pod).await.unwrap();
        let st = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(STATUS_ANNOTATION))
            .and_then(|s| UpgradeStatus::from_json(s));
        let wanted = |s: &UpgradeStatus| {
            s.request == request && s.phase.is_final() && source.is_none_or(|x| s.source == x)
        };
        if let Some(st) = st.filter(wanted) {
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

/// The client binaries of baton-csi's image (under `clients/`): version [`VERSION`] is
/// this build's baton-fs.
fn client_images() -> tempfile::TempDir {
    let images = tempfile::tempdir().unwrap();
    let client_dir = images.path().join("clients").join(VERSION);
    std::fs::create_dir_all(&client_dir).unwrap();
    std::fs::copy(
        baton_bin().with_file_name("baton-fs"),
        client_dir.join("baton-fs"),
    )
    .unwrap();
    images
}

/// A kube-apiserver with the chart applied, node-a, and PersistentVolumes pv-one and
/// pv-two; returns the cluster, an admin client and baton-csi's service account.
async fn cluster_with_node_a() -> (KubeCluster, kube::Client, User) {
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
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a"}})).unwrap();
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    for (name, handle) in [("pv-one", "handle-one"), ("pv-two", "handle-two")] {
        pvs.create(&PostParams::default(), &pv(name, handle))
            .await
            .unwrap();
    }
    (cluster, admin, sa)
}

/// baton-csi of node-a in pod mode (image `baton:test`) with `extra` arguments, and the
/// fake kubelet of node-a: with `images` empty it runs `baton` as this build, else the
/// images' directories.
async fn start_node_a(
    cluster: &KubeCluster,
    sa: &User,
    extra: Vec<String>,
    images: HashMap<String, PathBuf>,
) -> (Driver, FakeKubelet) {
    let mut args: Vec<String> = ["--namespace", NS, "--mount-image", "baton:test"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra);
    let d = Driver::start(DriverOptions {
        mount_mode: "pod",
        node_id: "node-a".into(),
        extra_args: args,
        env: vec![(
            "KUBECONFIG".into(),
            cluster.kubeconfig(&sa.token).unwrap().display().to_string(),
        )],
        ..Default::default()
    });
    let kubelet = FakeKubelet::start(KubeletConfig {
        kubeconfig: cluster.kubeconfig(ADMIN_TOKEN).unwrap(),
        node_name: "node-a".into(),
        binaries: HashMap::from([("baton".to_string(), baton_bin())]),
        images,
        log_dir: d.dir.path().join("kubelet"),
    })
    .unwrap();
    d.wait_ready().await;
    (d, kubelet)
}

/// Stops the workload and checks that the applications saw nothing.
fn finish_clean(workload: Workload) {
    let (records, errors, problems) = workload.finish();
    eprintln!("workload: {records} records, {errors} errors");
    assert!(records > 0);
    assert_eq!(errors, 0, "application errors: {problems:?}");
}

/// Unpublishes the targets through the driver and waits until the mount pods are gone.
async fn unpublish_all(
    node: &mut NodeClient<tonic::transport::Channel>,
    pods: &Api<Pod>,
    targets: &[(&str, &Path)],
) {
    for (vol, t) in targets {
        node.node_unpublish_volume(unpublish_req(vol, t))
            .await
            .unwrap();
    }
    let pods = pods.clone();
    wait_until(
        "the mount pods are deleted",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn annotations_upgrade_the_right_mounts_through_a_real_api_server() {
    let (cluster, admin, sa) = cluster_with_node_a().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());

    let images = client_images();
    let counts_file = images.path().join("api-requests.json");

    let (mut d, _kubelet) = start_node_a(
        &cluster,
        &sa,
        vec![
            "--client-binaries-dir".into(),
            images.path().join("clients").display().to_string(),
            "--api-request-counts".into(),
            counts_file.display().to_string(),
        ],
        HashMap::new(),
    )
    .await;
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

    // 5. The Node: a binary upgrade of every mount on it.
    annotate(&nodes, "node-a", &format!("binary:{VERSION}")).await;
    for p in [&pod_a, &pod_b] {
        let st =
            final_status_from(&pods, p, &format!("binary:{VERSION}"), Some("node/node-a")).await;
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
    // A pod upgrade needs mount pods: refused, the mount untouched.
    annotate(&nodes, "node-b", "pod:baton:0.2.0").await;
    let ev = wait_event(&admin, "default", "node-b", "UpgradeRefused").await;
    assert!(ev.message.unwrap().contains("mount pod mode"));
    assert_eq!(generation(&d2, &mp_c), gc);
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
    finish_clean(workload);
    let c = api_counts(&counts_file);
    eprintln!("API requests of baton-csi over the whole test: {c:?}");
    // One watch per kind (pods, node, PVs); a watch is re-opened only after the API
    // server ends it (its 290 s timeout) or on an error.
    assert!(c.get("watch_metadata").copied().unwrap_or(0) >= 3, "{c:?}");

    // Cleanup through the driver: the mount pods go.
    unpublish_all(
        &mut node,
        &pods,
        &[("handle-one", &t1), ("handle-two", &t2)],
    )
    .await;
    d.kill();
}

/// Mount pods of backend `mountpoint` (by its annotation), with their phase.
async fn pods_of(pods: &Api<Pod>, mountpoint: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels("app.kubernetes.io/component=mount"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("baton.dev/mountpoint"))
                .is_some_and(|m| m == mountpoint)
        })
        .collect()
}

/// Waits until the mount at `mountpoint` has one pod left.
async fn wait_one_pod(pods: &Api<Pod>, mountpoint: &str, what: &str) {
    wait_until(what, Duration::from_secs(60), || async {
        pods_of(pods, mountpoint).await.len() == 1
    })
    .await;
}

/// The status of the mount's pod that answers `request` (a pod upgrade moves the status
/// to the new pod), once final.
async fn final_status_of_mount(
    pods: &Api<Pod>,
    mountpoint: &str,
    request: &str,
) -> (String, UpgradeStatus) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        for p in pods_of(pods, mountpoint).await {
            let st = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(STATUS_ANNOTATION))
                .and_then(|s| UpgradeStatus::from_json(s));
            if let Some(st) = st.filter(|s| s.request == request && s.phase.is_final()) {
                return (p.metadata.name.clone().unwrap(), st);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no final status for {request} on the pods of {mountpoint}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The version of the client serving `mountpoint`.
fn client_version(d: &Driver, mountpoint: &str) -> String {
    mount_status(d, mountpoint)["client_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A directory playing an image: `baton` (this build) and `client` as `baton-fs`.
fn image_dir(root: &Path, name: &str, client: &Path) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(baton_bin(), dir.join("baton")).unwrap();
    std::fs::copy(client, dir.join("baton-fs")).unwrap();
    dir
}

/// Pod upgrades through a real API server under the verifying workload: a new mount pod
/// of the new image takes each mount over (supervisor to supervisor, client moved to the
/// image's baton-fs) and the old pod goes; an image that cannot be pulled and a
/// successor client that crashes are refused or rolled back with every mount serving; a
/// later upgrade of the Node recovers the rolled-back mount. The API writes of one pod
/// upgrade are counted. Zero application errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pod_upgrades_move_mounts_to_new_mount_pods() {
    let (cluster, admin, sa) = cluster_with_node_a().await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);

    // Images: baton:test is this build; baton:v2 has the alt client (another version);
    // baton:crash has a client that exits at once.
    let images = tempfile::tempdir().unwrap();
    let alt = baton_bin().with_file_name("baton-fs-alt");
    assert!(
        alt.exists(),
        "build baton-fs-alt: cargo build -p upgrade-tests --bins"
    );
    let crash = images.path().join("crash-client");
    std::fs::write(&crash, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(&crash, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let image_map = HashMap::from([
        (
            "baton:test".to_string(),
            baton_bin().parent().unwrap().to_path_buf(),
        ),
        ("baton:v2".to_string(), image_dir(images.path(), "v2", &alt)),
        (
            "baton:crash".to_string(),
            image_dir(images.path(), "crash", &crash),
        ),
    ]);
    let counts_file = images.path().join("api-requests.json");
    let (mut d, _kubelet) = start_node_a(
        &cluster,
        &sa,
        vec![
            "--api-request-counts".into(),
            counts_file.display().to_string(),
        ],
        image_map,
    )
    .await;

    let mut node = d.node().await;
    let t1 = kubelet_target(&d, "uid-1", "pv-one");
    let t2 = kubelet_target(&d, "uid-2", "pv-two");
    let s1 = embedded_secrets(&d.dir.path().join("v1"));
    let s2 = embedded_secrets(&d.dir.path().join("v2"));
    node.node_publish_volume(publish_req("handle-one", &t1, &s1, None, false))
        .await
        .unwrap();
    node.node_publish_volume(publish_req("handle-two", &t2, &s2, None, false))
        .await
        .unwrap();
    // pv-one's mount first: the one t1 is a bind of (same device).
    let dev = |p: &Path| std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(p).unwrap());
    let mut mps: Vec<String> = d
        .backend_mounts()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    mps.sort_by_key(|m| dev(Path::new(m)) != dev(&t1));
    let pod_of = |mp: String| {
        let pods = pods.clone();
        async move { pods_of(&pods, &mp).await[0].metadata.name.clone().unwrap() }
    };
    let (mp_a, mp_b) = (mps[0].clone(), mps[1].clone());
    let (pod_a, pod_b) = (pod_of(mp_a.clone()).await, pod_of(mp_b.clone()).await);
    let (ga, gb) = (generation(&d, &mp_a), generation(&d, &mp_b));
    let v1 = client_version(&d, &mp_a);
    let workload = Workload::start(&[t1.clone(), t2.clone()]);

    // 1. The mount pod of mount a: a new pod of baton:v2 serves it, the old pod goes.
    let before = api_counts(&counts_file);
    annotate(&pods, &pod_a, "pod:baton:v2").await;
    let ev = wait_event(&admin, NS, &pod_a, "UpgradeSucceeded").await;
    eprintln!("pod upgrade: {:?}", ev.message);
    let (new_a, st) = final_status_of_mount(&pods, &mp_a, "pod:baton:v2").await;
    assert_eq!(st.phase, Phase::Succeeded, "{st:?}");
    assert_eq!(st.generation, Some(ga + 1), "{st:?}");
    assert!(st.pause_ms.is_some(), "{st:?}");
    assert_ne!(new_a, pod_a);
    assert_eq!(generation(&d, &mp_a), ga + 1);
    assert!(
        client_version(&d, &mp_a).ends_with("-alt"),
        "{}",
        client_version(&d, &mp_a)
    );
    assert_eq!(generation(&d, &mp_b), gb, "the other mount was upgraded");
    let pods2 = pods.clone();
    let gone = pod_a.clone();
    wait_until(
        "the replaced mount pod is deleted",
        Duration::from_secs(60),
        || {
            let (pods, gone) = (pods2.clone(), gone.clone());
            async move { pods.get_opt(&gone).await.unwrap().is_none() }
        },
    )
    .await;
    let per_upgrade = diff(&api_counts(&counts_file), &before);
    let writes: u64 = per_upgrade
        .iter()
        .filter(|(k, _)| csi_node::kube::counting::is_write(k))
        .map(|(_, v)| v)
        .sum();
    eprintln!("API requests of baton-csi for one pod upgrade: {per_upgrade:?} ({writes} writes)");
    // The pod create and the Event; the old pod's delete; the final status on the new pod.
    assert_eq!(per_upgrade.get("create"), Some(&2), "{per_upgrade:?}");
    assert_eq!(per_upgrade.get("delete"), Some(&1), "{per_upgrade:?}");
    assert_eq!(per_upgrade.get("patch"), Some(&1), "{per_upgrade:?}");
    assert_eq!(writes, 4, "{per_upgrade:?}");

    // 2. An image that cannot be pulled: failed with the reason, the new pod removed,
    // the mount untouched under its pod.
    annotate(&pods, &new_a, "pod:baton:missing").await;
    let st = final_status(&pods, &new_a, "pod:baton:missing").await;
    assert_eq!(st.phase, Phase::Failed, "{st:?}");
    assert!(
        st.reason.as_deref().unwrap().contains("ErrImagePull"),
        "{st:?}"
    );
    assert_eq!(generation(&d, &mp_a), ga + 1);
    wait_event(&admin, NS, &new_a, "UpgradeFailed").await;
    wait_one_pod(&pods, &mp_a, "the failed mount pod is deleted").await;

    // 3. A successor whose client crashes (pv-two's mount): the new pod takes over, its
    // client does not start, the upgrade rolls back and the old client serves on.
    annotate(&pvs, "pv-two", "pod:baton:crash").await;
    let (holder, st) = final_status_of_mount(&pods, &mp_b, "pod:baton:crash").await;
    assert_eq!(st.phase, Phase::RolledBack, "{st:?}");
    assert_eq!(st.generation, Some(gb), "{st:?}");
    assert_ne!(holder, pod_b);
    assert_eq!(generation(&d, &mp_b), gb);
    assert_eq!(client_version(&d, &mp_b), v1);
    wait_event(&admin, "default", "pv-two", "UpgradeFailed").await;

    // 4. The Node to baton:v2: mount a already runs it; mount b moves to a third pod, and
    // the pods it came through go.
    annotate(&nodes, "node-a", "pod:baton:v2").await;
    let ev = wait_event(&admin, "default", "node-a", "UpgradeSucceeded").await;
    eprintln!("node pod upgrade: {:?}", ev.message);
    let (_, st) = final_status_of_mount(&pods, &mp_b, "pod:baton:v2").await;
    assert_eq!(
        (st.phase, st.generation),
        (Phase::Succeeded, Some(gb + 1)),
        "{st:?}"
    );
    assert!(client_version(&d, &mp_b).ends_with("-alt"));
    assert_eq!(generation(&d, &mp_a), ga + 1, "mount a was upgraded again");
    wait_one_pod(&pods, &mp_b, "mount b's earlier pods are deleted").await;

    finish_clean(workload);

    unpublish_all(
        &mut node,
        &pods,
        &[("handle-one", &t1), ("handle-two", &t2)],
    )
    .await;
    d.kill();
}

/// A mount pod whose processes all die at once (an OOM kill of the container): baton-csi's
/// descriptor keeper holds the FUSE connection and the write journal, so the kernel does
/// not abort the mount; the kubelet restarts the container, whose `baton mount` withdraws
/// them from the keeper and restarts a client on the same connection. The application —
/// another process, appending records through a descriptor it holds open — sees a pause
/// and no error, and every record is there once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_pod_killed_whole_is_reseeded_from_the_keeper() {
    reseeded_from_the_keeper(&[]).await;
}

/// The same with the `no-resend` mount option (as on a kernel without
/// FUSE_NOTIFY_RESEND): the keeper holds the request log too, and the re-seeded client
/// answers from it what the dead one had read — here a flock wait of another process,
/// which nothing else could answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_pod_killed_whole_is_reseeded_from_the_keeper_without_resend() {
    reseeded_from_the_keeper(&["no-resend"]).await;
}

async fn reseeded_from_the_keeper(flags: &[&str]) {
    let OneMount {
        pods,
        d,
        mut node,
        target: t1,
        mp,
        app,
        _kubelet,
        _cluster,
        admin: _,
    } = OneMount::start(flags).await;
    let no_resend = flags.contains(&"no-resend");
    let logs = || d.logs();
    // The supervisor deposits the mount once its client serves.
    let before = mount_status(&d, &mp);
    let mode = if no_resend { "disabled" } else { "resend" };
    assert_eq!(before["resend_mode"], mode, "{before}");
    // A flock held by one process, and another process waiting for it in the client.
    // Neither is this one: the fake kubelet starts containers from this process, which
    // must not hold anything on the mount while nobody serves it.
    let lock_file = t1.join("lock");
    std::fs::write(&lock_file, b"x").unwrap();
    let mut holder = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 9<lock && flock -n 9 && echo held && exec sleep 600")
        .current_dir(&t1)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held", "the holder could not take the lock");
    let mut waiter = std::process::Command::new("flock")
        .arg(&lock_file)
        .arg("true")
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "the waiter got a held lock"
    );
    let at_kill = app.records();

    // kill -9 of the supervisor and the client together, as an OOM kill of the container.
    let pids = [&before["supervisor_pid"], &before["client_pid"]].map(|v| v.as_i64().unwrap());
    for pid in pids {
        // SAFETY: kill(2) has no memory effects; the pids are the mount's processes.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    }
    // The restarted container re-seeds the mount: a new supervisor serves it.
    let after = served_by_another(&d, &mp, &before, logs).await;
    eprintln!("re-seeded: {after}");
    assert!(
        after["generation"].as_u64() > before["generation"].as_u64(),
        "{after}"
    );
    let pod = &pods_of(&pods, &mp).await[0];
    let restarts = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .restart_count;
    assert_eq!(restarts, 1, "the container was restarted once");
    assert_eq!(after["resend_mode"], mode, "{after}");
    // The application goes on through its descriptor.
    app.goes_on(at_kill).await;
    // The waiter waits on, and gets the lock once it is let go.
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "the waiter got a held lock"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = waiter.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the flock waiter hangs after the re-seed:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the waiter failed: {status}");
    if no_resend {
        let log = logs();
        assert!(
            log.contains("answering the requests the predecessor read and left unanswered"),
            "the re-seeded client answered nothing from the request log:\n{log}"
        );
    }
    let n = app.finish();
    eprintln!("{n} records appended, {at_kill} before the kill");
    unpublish_all(&mut node, &pods, &[("handle-one", &t1)]).await;
    drop(d);
}

/// node-a with volume `handle-one` published at a kubelet target and a [`HeldAppender`]
/// on it. Fields drop in order: the application, the kubelet, the driver, the cluster.
struct OneMount {
    app: HeldAppender,
    node: NodeClient<tonic::transport::Channel>,
    _kubelet: FakeKubelet,
    d: Driver,
    admin: kube::Client,
    pods: Api<Pod>,
    target: PathBuf,
    /// The backend's mountpoint.
    mp: String,
    _cluster: KubeCluster,
}

impl OneMount {
    /// `flags`: the volume's mount options.
    async fn start(flags: &[&str]) -> OneMount {
        let (cluster, admin, sa) = cluster_with_node_a().await;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
        let (d, kubelet) = start_node_a(&cluster, &sa, Vec::new(), HashMap::new()).await;
        let mut node = d.node().await;
        let target = kubelet_target(&d, "uid-1", "pv-one");
        let secrets = embedded_secrets(&d.dir.path().join("v1"));
        let mut req = publish_req("handle-one", &target, &secrets, None, false);
        req.volume_capability = Some(mount_cap(
            volume_capability::access_mode::Mode::MultiNodeMultiWriter,
            flags,
        ));
        node.node_publish_volume(req).await.unwrap();
        let mp = d.backend_mounts().pop().unwrap().display().to_string();
        let app = HeldAppender::start(&target, &d.dir.path().join("app-errors"));
        OneMount {
            app,
            node,
            _kubelet: kubelet,
            d,
            admin,
            pods,
            target,
            mp,
            _cluster: cluster,
        }
    }
}

/// An application in its own process (as in a pod): it appends numbered records to
/// `held.log` through a descriptor it holds open, so its calls wait in the kernel while
/// no client serves; it writes every failed call to its error file. Killed when dropped.
struct HeldAppender {
    child: std::process::Child,
    log: PathBuf,
    errors: PathBuf,
}

impl HeldAppender {
    fn start(dir: &Path, errors: &Path) -> HeldAppender {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                "exec 3>>held.log; i=0; while :; do \
                 echo \"record $i\" >&3 || echo \"append $i failed\" >&2; \
                 i=$((i+1)); sleep 0.005; done",
            )
            .current_dir(dir)
            .stderr(std::fs::File::create(errors).unwrap())
            .spawn()
            .unwrap();
        HeldAppender {
            child,
            log: dir.join("held.log"),
            errors: errors.to_path_buf(),
        }
    }

    fn records(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap().lines().count()
    }

    /// Waits until 50 records more than `since` are there.
    async fn goes_on(&self, since: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.records() < since + 50 {
            assert!(Instant::now() < deadline, "the application does not go on");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the application; checks that every record is there once, in order, and
    /// that no call failed. Returns the number of records.
    fn finish(mut self) -> usize {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap();
        let n = log.lines().count();
        let want: String = (0..n).map(|i| format!("record {i}\n")).collect();
        assert!(
            log == want,
            "records lost, doubled or out of order ({n} lines)"
        );
        let errors = std::fs::read_to_string(&self.errors).unwrap();
        assert!(errors.is_empty(), "the application saw errors: {errors}");
        n
    }
}

impl Drop for HeldAppender {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mount's status once a supervisor other than `before`'s serves it.
async fn served_by_another(
    d: &Driver,
    mp: &str,
    before: &serde_json::Value,
    logs: impl Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(v) = try_mount_status(d, mp)
            && v["supervisor_pid"] != before["supervisor_pid"]
            && v["state"] == "serving"
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no other supervisor serves the mount; logs:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mount pod deleted while its mount is in use (an eviction, `kubectl delete pod`) is
/// replaced: its supervisor serves on after SIGTERM, baton-csi starts another mount pod
/// whose supervisor takes the mount over, and the old pod ends. Deleted without a grace
/// period, its processes die at once: the keeper holds the connection and the
/// replacement re-seeds it. The application, appending through a descriptor it holds,
/// sees pauses and no error; every record is there once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_mount_pod_is_replaced_without_an_application_error() {
    let OneMount {
        admin,
        pods,
        d,
        mut node,
        target: t1,
        mp,
        app,
        _kubelet,
        _cluster,
    } = OneMount::start(&[]).await;
    let logs = || d.logs();
    let only_pod = || async {
        let list = pods_of(&pods, &mp).await;
        assert_eq!(list.len(), 1, "one mount pod");
        list[0].metadata.name.clone().unwrap()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Deleted with its grace period: the new pod's supervisor takes the mount over
    // from the old one, which serves on meanwhile.
    let first = only_pod().await;
    let before = mount_status(&d, &mp);
    let at_delete = app.records();
    let deleted = Instant::now();
    pods.delete(&first, &Default::default()).await.unwrap();
    let after = served_by_another(&d, &mp, &before, logs).await;
    eprintln!(
        "taken over {:?} after the delete: {after}",
        deleted.elapsed()
    );
    wait_one_pod(&pods, &mp, "the deleted mount pod ends").await;
    let second = only_pod().await;
    assert_ne!(second, first);
    let ev = wait_event(&admin, NS, &second, "MountPodReplaced").await;
    assert!(
        ev.message.as_deref().is_some_and(|m| m.contains(&first)),
        "{ev:?}"
    );
    app.goes_on(at_delete).await;
    let old_log = pod_log(&d, &first);
    assert!(
        old_log.contains("SIGTERM: the mount stays"),
        "the old supervisor did not serve on after SIGTERM:\n{old_log}"
    );
    // The record names the pod that serves now.
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.state.join("backends").join(format!(
            "{}.json",
            Path::new(&mp).file_name().unwrap().to_string_lossy()
        )))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["pod"], format!("{NS}/{second}"), "{record}");

    // 2. Deleted without a grace period: its processes die at once; the keeper holds the
    // connection and the replacement re-seeds the mount from it.
    let before = mount_status(&d, &mp);
    let at_delete = app.records();
    let now = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let deleted = Instant::now();
    pods.delete(&second, &now).await.unwrap();
    let after = served_by_another(&d, &mp, &before, logs).await;
    eprintln!(
        "re-seeded {:?} after the delete: {after}",
        deleted.elapsed()
    );
    assert!(
        after["generation"].as_u64() > before["generation"].as_u64(),
        "{after}"
    );
    wait_one_pod(&pods, &mp, "one mount pod").await;
    let third = only_pod().await;
    assert!(third != second && third != first);
    wait_event(&admin, NS, &third, "MountPodReplaced").await;
    let new_log = pod_log(&d, &third);
    assert!(
        new_log.contains("re-seeding the mount from the descriptor keeper"),
        "the replacement did not re-seed from the keeper:\n{new_log}"
    );
    app.goes_on(at_delete).await;
    let n = app.finish();
    eprintln!("{n} records appended");
    unpublish_all(&mut node, &pods, &[("handle-one", &t1)]).await;
    drop(d);
}

/// With every upgrade slot busy, a mount's upgrade says `pending` on its mount pod and
/// waits; once a slot is free it goes on and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mount_waiting_for_an_upgrade_slot_is_pending() {
    use csi_node::upgrade::slots::{SLOT_LABEL, slot_name};
    use k8s_openapi::api::coordination::v1::Lease;
    let (cluster, admin, sa) = cluster_with_node_a().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    // The only slot, held (and just renewed) by another node.
    let now = k8s_openapi::chrono::Utc::now()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Micros, true);
    let held: Lease = serde_json::from_value(json!({
        "metadata": {"name": slot_name(0), "labels": {SLOT_LABEL: "true"}},
        "spec": {"holderIdentity": "node-z", "leaseDurationSeconds": 30,
                 "acquireTime": now, "renewTime": now},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &held).await.unwrap();
    let images = client_images();
    let (d, _kubelet) = start_node_a(
        &cluster,
        &sa,
        vec![
            "--client-binaries-dir".into(),
            images.path().join("clients").display().to_string(),
            "--upgrade-slots".into(),
            "1".into(),
        ],
        HashMap::new(),
    )
    .await;
    let mut node = d.node().await;
    let t1 = kubelet_target(&d, "uid-1", "pv-one");
    let s1 = embedded_secrets(&d.dir.path().join("v1"));
    node.node_publish_volume(publish_req("handle-one", &t1, &s1, None, false))
        .await
        .unwrap();
    let mp = d.backend_mounts().pop().unwrap().display().to_string();
    let pod = pods_of(&pods, &mp).await[0].metadata.name.clone().unwrap();
    let request = format!("binary:{VERSION}");
    annotate(&pods, &pod, &request).await;

    let status = |p: Pod| {
        p.metadata
            .annotations
            .and_then(|a| a.get(STATUS_ANNOTATION).cloned())
            .and_then(|s| UpgradeStatus::from_json(&s))
    };
    let (pods2, pod2, request2) = (pods.clone(), pod.clone(), request.clone());
    wait_until("the upgrade is pending", Duration::from_secs(30), || {
        let (pods, pod, request) = (pods2.clone(), pod2.clone(), request2.clone());
        async move {
            status(pods.get(&pod).await.unwrap())
                .is_some_and(|s| s.phase == Phase::Pending && s.request == request)
        }
    })
    .await;
    let before = generation(&d, &mp);
    // Still waiting a moment later: the slot is live.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = status(pods.get(&pod).await.unwrap()).unwrap();
    assert_eq!(st.phase, Phase::Pending, "{st:?}");
    assert_eq!(generation(&d, &mp), before);

    // The other node frees the slot: the upgrade goes on.
    let free = json!({"spec": {"holderIdentity": null}});
    leases
        .patch(&slot_name(0), &PatchParams::default(), &Patch::Merge(&free))
        .await
        .unwrap();
    let st = final_status(&pods, &pod, &request).await;
    assert_eq!(st.phase, Phase::Succeeded, "{st:?}");
    assert_eq!(generation(&d, &mp), before + 1);
    let lease = leases.get(&slot_name(0)).await.unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "the slot is freed after the upgrade"
    );
    unpublish_all(&mut node, &pods, &[("handle-one", &t1)]).await;
    drop(d);
}
