//! Kubernetes, for real: the Helm chart rendered by Helm's engine, its objects created in a
//! real kube-apiserver (v1.20, with etcd, RBAC on), `baton-csi` running with the node
//! service account's identity and permissions from that chart, mount pods created through
//! the API server and run by a fake kubelet (this test plays the kubelet of node-a: it runs
//! the pod's command as a local process with the host paths), real FUSE and bind mounts.
//!
//! Needs etcd and kube-apiserver: `scripts/k8s-test-deps.sh` installs them.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use testkit::kube::{
    ADMIN_TOKEN, FakeKubelet, KubeCluster, KubeletConfig, User, apply_all, create_service_account,
    parse_manifests, render_chart,
};
use tonic::Code;

const NS: &str = "baton-system";
const RELEASE: &str = "baton";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/baton-csi")
}

fn find<'a>(objects: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(name_suffix))
        })
        .unwrap_or_else(|| panic!("no {kind} *{name_suffix} in the rendered chart"))
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn mount_of<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap()
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap()
}

#[test]
fn helm_chart_renders_the_objects_that_matter() {
    let objects = render_chart(
        &chart_dir(),
        RELEASE,
        NS,
        &json!({"kubeletDir": "/data/kubelet"}),
    )
    .unwrap();
    for o in &objects {
        assert!(o["apiVersion"].is_string() && o["kind"].is_string(), "{o}");
        let namespaced = !matches!(
            o["kind"].as_str().unwrap(),
            "CSIDriver" | "ClusterRole" | "ClusterRoleBinding" | "StorageClass"
        );
        if namespaced {
            assert_eq!(o["metadata"]["namespace"], NS, "{}", o["metadata"]["name"]);
        }
    }
    // Without credentials in the values, the chart makes no Secret.
    assert!(!objects.iter().any(|o| o["kind"] == "Secret"));

    let driver = find(&objects, "CSIDriver", "csi.baton.dev");
    assert_eq!(driver["spec"]["attachRequired"], false);
    assert_eq!(
        driver["spec"]["volumeLifecycleModes"],
        json!(["Persistent"])
    );

    // The node plugin: privileged, Bidirectional on the kubelet and state directories,
    // the same host path for the state directory as inside, pod mode, its node's name.
    let ds = find(&objects, "DaemonSet", "-node");
    let csi = container(ds, "baton-csi");
    assert_eq!(csi["securityContext"]["privileged"], true);
    let a = args(csi);
    for want in [
        "--services=node",
        "--mount-mode=pod",
        "--state-dir=/var/lib/baton-csi",
        "--endpoint=unix:///csi/csi.sock",
    ] {
        assert!(a.contains(&want.to_string()), "{a:?} lacks {want}");
    }
    assert!(
        a.iter()
            .any(|x| x.starts_with("--mount-image=ghcr.io/baton-fs/baton:"))
    );
    let kubelet = mount_of(csi, "kubelet-dir");
    assert_eq!(
        (
            kubelet["mountPath"].as_str(),
            kubelet["mountPropagation"].as_str()
        ),
        (Some("/data/kubelet"), Some("Bidirectional"))
    );
    let state = mount_of(csi, "state");
    assert_eq!(state["mountPropagation"], "Bidirectional");
    assert_eq!(state["mountPath"], volume(ds, "state")["hostPath"]["path"]);
    let env = csi["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_ID"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    assert!(env.iter().any(|e| e["name"] == "POD_NAMESPACE"));
    let reg = container(ds, "node-driver-registrar");
    assert!(args(reg).contains(
        &"--kubelet-registration-path=/data/kubelet/plugins/csi.baton.dev/csi.sock".to_string()
    ));
    assert_eq!(
        volume(ds, "registration-dir")["hostPath"]["path"],
        "/data/kubelet/plugins_registry"
    );
    assert_eq!(
        volume(ds, "socket-dir")["hostPath"]["path"],
        "/data/kubelet/plugins/csi.baton.dev"
    );
    assert_eq!(
        ds["spec"]["template"]["spec"]["tolerations"],
        json!([{"operator": "Exists"}])
    );

    // The controller: baton-csi (controller service) + csi-provisioner on one socket.
    let dep = find(&objects, "Deployment", "-controller");
    assert!(args(container(dep, "baton-csi")).contains(&"--services=controller".to_string()));
    let prov = args(container(dep, "csi-provisioner"));
    assert!(
        prov.contains(&"--csi-address=/csi/csi.sock".to_string())
            && prov.contains(&"--leader-election".to_string())
    );

    // Minimal RBAC: the node plugin gets a namespaced Role (mount pods and their Secrets
    // here, never application pods) and cluster-wide only `get` on nodes, plus, for the
    // upgrade watch (on by default in pod mode), `watch` (never `list`) on nodes and PVs
    // and `create` on Events, `patch` on its Node (the node's upgrade status) and the
    // upgrade slots (Leases, no `watch`, no `delete`).
    let role = find(&objects, "Role", "-node");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete", "patch"]},
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "create", "delete"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "create", "update"]},
        ])
    );
    let cr = find(&objects, "ClusterRole", "-node");
    assert_eq!(
        cr["rules"],
        json!([
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "watch", "patch"]},
            {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["watch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        ])
    );
    let a = args(container(find(&objects, "DaemonSet", "-node"), "baton-csi"));
    for want in [
        "--upgrade-watch=auto",
        "--client-binaries-dir=/opt/baton/clients",
        "--upgrade-slots=10",
    ] {
        assert!(a.contains(&want.to_string()), "{a:?} lacks {want}");
    }

    let sc = find(&objects, "StorageClass", "baton");
    assert_eq!(sc["provisioner"], "csi.baton.dev");
    assert_eq!(sc["parameters"]["onDelete"], "delete");
    assert_eq!(
        sc["parameters"]["csi.storage.k8s.io/node-publish-secret-namespace"],
        NS
    );

    // Values change what they should.
    let objects = render_chart(
        &chart_dir(),
        RELEASE,
        NS,
        &json!({
            "controller": {"enabled": false},
            "storageClass": {"onDelete": "archive", "mountOptions": ["threads=32"]},
            "volume": {"metaurl": "redis://r:6379/1", "env": {"AWS_REGION": "eu-1"}},
            "node": {"mountMode": "process"},
        }),
    )
    .unwrap();
    assert!(!objects.iter().any(|o| o["kind"] == "Deployment"));
    let sc = find(&objects, "StorageClass", "baton");
    assert_eq!(
        (&sc["parameters"]["onDelete"], &sc["mountOptions"]),
        (&json!("archive"), &json!(["threads=32"]))
    );
    let secret = find(&objects, "Secret", "baton-volume");
    assert_eq!(
        secret["stringData"],
        json!({"metaurl": "redis://r:6379/1", "AWS_REGION": "eu-1"})
    );
    assert!(
        args(container(find(&objects, "DaemonSet", "-node"), "baton-csi"))
            .contains(&"--mount-mode=process".to_string())
    );
    // Without the upgrade watch (process mode, auto), the node plugin gets no watch verbs.
    assert_eq!(
        find(&objects, "Role", "-node")["rules"][0]["verbs"],
        json!(["get", "list", "create", "delete"])
    );
    assert_eq!(
        find(&objects, "ClusterRole", "-node")["rules"],
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}])
    );
}

/// Pods of component `mount` in the driver namespace.
async fn mount_pods(client: &kube::Client) -> Vec<Pod> {
    let lp = ListParams::default().labels("app.kubernetes.io/component=mount");
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
        .items
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mount_pods_through_a_real_api_server() {
    let sa = User::service_account(NS, "baton-baton-csi-node");
    let cluster = KubeCluster::start(std::slice::from_ref(&sa)).await.unwrap();
    let admin = cluster.client().await.unwrap();

    // What `helm install` and the cluster would have made.
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    Api::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    // The controller-manager would create the default service accounts.
    create_service_account(&admin, NS, "default").await.unwrap();
    create_service_account(&admin, "default", "default")
        .await
        .unwrap();
    let objects = render_chart(&chart_dir(), RELEASE, NS, &json!({})).unwrap();
    apply_all(&admin, &objects, NS).await.unwrap();
    for n in ["node-a", "node-b"] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": n}})).unwrap();
        Api::all(admin.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }
    let node_a_uid = Api::<Node>::all(admin.clone())
        .get("node-a")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    // The examples are valid objects for this API server too.
    for example in ["static-pv.yaml", "dynamic-pvc.yaml"] {
        let path = chart_dir().join("../../examples").join(example);
        let objects = parse_manifests(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(objects.len() >= 2, "{example}");
        apply_all(&admin, &objects, "default")
            .await
            .unwrap_or_else(|e| panic!("{example}: {e:#}"));
    }

    // The node plugin's permissions are the chart's, no more.
    let as_node = cluster.client_for(&sa.token).await.unwrap();
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    assert!(forbidden(
        Api::<Pod>::all(as_node.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Pod>::namespaced(as_node.clone(), "default")
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Secret>::namespaced(as_node.clone(), "default")
            .get("x")
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Node>::all(as_node.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));

    let mut d = Driver::start(DriverOptions {
        mount_mode: "pod",
        node_id: "node-a".into(),
        extra_args: vec![
            "--namespace".into(),
            NS.into(),
            "--mount-image".into(),
            "baton:test".into(),
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
        images: HashMap::new(),
        log_dir: d.dir.path().join("kubelet"),
    })
    .unwrap();
    d.wait_ready().await;
    // A storage credential travels with the volume: into the mount pod's Secret and
    // environment, never into a log or the pod spec.
    const AWS_KEY: &str = "aws-key-kube-never-logged";
    const BAD_PASSWORD: &str = "pw-kube-never-logged";
    let mut secrets = embedded_secrets(d.dir.path());
    secrets.insert("AWS_SECRET_ACCESS_KEY".into(), AWS_KEY.into());
    let (t1, t2, t3) = (d.target("k1"), d.target("k2"), d.target("k3"));

    // Publish: a mount pod on node-a serves the Baton mount; the target is a bind of it.
    let mut node = d.node().await;
    node.node_publish_volume(publish_req("vol-k", &t1, &secrets, None, false))
        .await
        .unwrap();
    std::fs::write(t1.join("through-the-pod.txt"), b"hello").unwrap();
    let pods = mount_pods(&admin).await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-a"));
    assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
    assert_eq!(spec.containers[0].image.as_deref(), Some("baton:test"));
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Node", node_a_uid.as_str())
    );
    let pod_json = serde_json::to_string(pod).unwrap();
    assert!(
        !pod_json.contains("meta.redb") && !pod_json.contains(AWS_KEY),
        "a secret is in the pod spec"
    );
    let pod_name = pod.metadata.name.clone().unwrap();
    let secret = Api::<Secret>::namespaced(admin.clone(), NS)
        .get(&pod_name)
        .await
        .unwrap();
    let sowner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (sowner.kind.as_str(), sowner.uid.as_str()),
        ("Node", node_a_uid.as_str())
    );
    assert_eq!(spec.host_pid, Some(true));
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );

    // A second target of the same volume shares the pod.
    node.node_publish_volume(publish_req("vol-k", &t2, &secrets, None, false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(t2.join("through-the-pod.txt")).unwrap(),
        b"hello"
    );
    assert_eq!(mount_pods(&admin).await.len(), 1);

    // baton-csi dies and comes back: the mount pod kept serving; the new one finds it.
    drop(node);
    d.kill();
    assert_eq!(
        std::fs::read(t1.join("through-the-pod.txt")).unwrap(),
        b"hello"
    );
    d.spawn();
    d.wait_ready().await;
    let mut node = d.node().await;
    assert_eq!(
        mount_pods(&admin).await.len(),
        1,
        "a mount in use was torn down after a restart"
    );
    node.node_publish_volume(publish_req("vol-k", &t1, &secrets, None, false))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req("vol-k", &t1))
        .await
        .unwrap();
    assert_eq!(mount_pods(&admin).await.len(), 1, "t2 still uses it");
    assert_eq!(
        std::fs::read(t2.join("through-the-pod.txt")).unwrap(),
        b"hello"
    );

    // The last user goes: the mount pod and its Secret are deleted, the mount is gone.
    node.node_unpublish_volume(unpublish_req("vol-k", &t2))
        .await
        .unwrap();
    let c = admin.clone();
    wait_until("the mount pod is deleted", Duration::from_secs(60), || {
        let c = c.clone();
        async move { mount_pods(&c).await.is_empty() }
    })
    .await;
    assert!(
        Api::<Secret>::namespaced(admin.clone(), NS)
            .get_opt(&pod_name)
            .await
            .unwrap()
            .is_none()
    );
    assert!(d.backend_mounts().is_empty());

    // A plugin that died before releasing an unused mount: the next one deletes the pod.
    node.node_publish_volume(publish_req("vol-k", &t3, &secrets, None, false))
        .await
        .unwrap();
    assert_eq!(mount_pods(&admin).await.len(), 1);
    drop(node);
    d.kill();
    nix::mount::umount2(&t3, nix::mount::MntFlags::MNT_DETACH).unwrap();
    d.spawn();
    d.wait_ready().await;
    let c = admin.clone();
    wait_until(
        "the orphaned mount pod is deleted",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            async move { mount_pods(&c).await.is_empty() }
        },
    )
    .await;
    assert!(d.backend_mounts().is_empty());

    // A mount pod that cannot mount: the publish fails in time, with the reason, and
    // leaves no pod behind.
    d.kill();
    d.opts.mount_timeout_secs = 8;
    d.spawn();
    d.wait_ready().await;
    let mut node = d.node().await;
    let bad = HashMap::from([(
        "metaurl".to_string(),
        format!("redis://:{BAD_PASSWORD}@127.0.0.1:9/0"),
    )]);
    let status = node
        .node_publish_volume(publish_req("vol-bad", &t3, &bad, None, false))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Internal),
        "{status:?}"
    );
    assert!(
        !status.message().contains("127.0.0.1:9") && !status.message().contains(BAD_PASSWORD),
        "secret in the message: {}",
        status.message()
    );
    assert!(mount_pods(&admin).await.is_empty());
    assert!(!is_mounted(&t3));
    let log = d.log();
    assert!(
        !log.contains("meta.redb") && !log.contains("127.0.0.1:9") && !log.contains(BAD_PASSWORD),
        "a secret was logged:\n{log}"
    );
    // Nor did the mount pods (their output, as the fake kubelet keeps it) log a credential.
    assert!(
        std::fs::read_dir(d.dir.path().join("kubelet"))
            .unwrap()
            .count()
            >= 2,
        "the mount pods' output is missing"
    );
    // (The bad password is checked in baton-csi's log and errors above only: `baton mount`
    // itself prints the URL of a metadata engine it cannot reach, in the mount pod's log.)
    d.assert_no_secret_logged(&[AWS_KEY]);
}
