//! Mount pod mode: each backend's FUSE server runs in a pod on this node, so that it
//! outlives any restart or upgrade of the `baton-csi` container.
//!
//! The mount pod (see [`mount_pod`]):
//! - is pinned to the node (`spec.nodeName`), tolerates every taint, runs at
//!   `system-node-critical` priority, has no service account token (it never talks to the
//!   API server) and no service links;
//! - runs `baton mount <state>/mnt/<backend>` in the foreground, privileged (it opens
//!   /dev/fuse and calls mount(2)), with the state directory mounted from the host at the
//!   same path with Bidirectional propagation, so the mount appears on the host and in
//!   `baton-csi`, and `BATON_HOME=<state>/home` so its control socket is on the host too;
//! - gets the metadata URL and credentials from a Secret through `envFrom`
//!   (`--meta $(BATON_META_URL)`), never from its spec;
//! - `restartPolicy: OnFailure`: a crash restarts it; `baton umount` ends it cleanly;
//! - `hostPID: true`: a pod upgrade ([`crate::upgrade::pod`]) has the new pod's
//!   supervisor adopt the old pod's client, which it identifies and watches by pid
//!   (SO_PEERCRED, pidfd), so both must see the same pid namespace;
//! - is owned by the Node (deleted by the garbage collector with the node), and so is its
//!   Secret, which every pod of the backend uses (a pod upgrade replaces the pod, not the
//!   Secret).
//!
//! A backend's pods are found by label (`baton.dev/backend` and the node's hash): the
//! first is named [`MountPodConfig::pod_name`], a pod upgrade's successor gets a suffix.
//! `baton-csi` unmounts a backend through the supervisor's control socket (`baton
//! umount`), then deletes its pods and the Secret.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use crate::baton::Baton;
use crate::layout::{BackendRecord, MountMode, hex};
use crate::mounter::process::unmount_backend;
use crate::mounter::{MountError, Mounter};
use crate::mountinfo::MountTable;
use crate::upgrade::executor::{Executor, MountState};
use crate::upgrade::handle::event_about;
use crate::upgrade::pod::successor_pod;
use crate::upgrade::watch::{Kind, Seen};
use crate::volume::{BackendId, BackendSpec};

/// Beyond the mount timeout, how long a replacement mount pod may take to serve (its
/// supervisor takes the mount over, then moves the client into its own pod).
const REPLACEMENT_GRACE: Duration = Duration::from_secs(90);

/// Seconds a mount pod's supervisor serves on after SIGTERM, waiting for its replacement
/// to take the mount over (`BATON_SIGTERM_WAIT`), well within the pod's 60 s grace
/// period, so that what it flushes and unmounts after that is done before the kill.
pub const SIGTERM_WAIT_SECS: u64 = 30;

/// Label: which backend a mount pod (and its Secret) serves.
pub const LABEL_BACKEND: &str = "baton.dev/backend";
/// Label: a hash of the node name (label values are limited to 63 characters).
pub const LABEL_NODE_HASH: &str = "baton.dev/node-hash";
/// Labels every mount pod has.
pub const MOUNT_POD_LABELS: [(&str, &str); 3] = [
    ("app.kubernetes.io/name", "baton"),
    ("app.kubernetes.io/component", "mount"),
    ("app.kubernetes.io/managed-by", "baton-csi"),
];
/// The Secret key holding the metadata URL.
pub const SECRET_META_KEY: &str = "BATON_META_URL";

/// How mount pods are made.
#[derive(Clone, Debug)]
pub struct MountPodConfig {
    pub namespace: String,
    pub node_name: String,
    pub image: String,
    /// The state directory: the same path on the host, in baton-csi and in mount pods.
    pub state_dir: PathBuf,
    pub priority_class: Option<String>,
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    pub mount_timeout: Duration,
    /// The descriptor keeper's socket (the same host path in the pod), given to the
    /// supervisor as `BATON_KEEPER`.
    pub keeper: Option<PathBuf>,
}

impl MountPodConfig {
    fn node_hash(&self) -> String {
        hex(&Sha256::digest(self.node_name.as_bytes())[..4])
    }

    /// The mount pod's (and its Secret's) name: unique per node and backend.
    pub fn pod_name(&self, id: &BackendId) -> String {
        format!("baton-mount-{}-{}", self.node_hash(), id)
    }

    fn labels(&self, id: &BackendId) -> BTreeMap<String, String> {
        let mut l: BTreeMap<String, String> = MOUNT_POD_LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.insert(LABEL_BACKEND.into(), id.to_string());
        l.insert(LABEL_NODE_HASH.into(), self.node_hash());
        l
    }

    fn selector(&self) -> String {
        mount_pod_selector(&self.node_name)
    }

    /// A name for another mount pod of backend `id` (a pod upgrade's successor, the
    /// replacement of a deleted pod): the first pod's name and a short hash of `salt` and
    /// the time.
    pub fn successor_name(&self, id: &BackendId, salt: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let digest = Sha256::digest(format!("{salt}\n{nanos}").as_bytes());
        format!("{}-{}", self.pod_name(id), hex(&digest[..3]))
    }

    /// The label selector of backend `id`'s mount pods on this node.
    pub fn backend_selector(&self, id: &BackendId) -> String {
        format!("{},{LABEL_BACKEND}={id}", self.selector())
    }
}

/// The label selector of the mount pods (and their Secrets) of node `node_name`.
pub fn mount_pod_selector(node_name: &str) -> String {
    let mut s: Vec<String> = MOUNT_POD_LABELS
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    s.push(format!(
        "{LABEL_NODE_HASH}={}",
        hex(&Sha256::digest(node_name.as_bytes())[..4])
    ));
    s.join(",")
}

/// The mount pod of `spec` at `mountpoint`, owned by `node_uid`.
pub fn mount_pod(
    cfg: &MountPodConfig,
    spec: &BackendSpec,
    mountpoint: &Path,
    node_uid: &str,
) -> Pod {
    backend_pod(cfg, &spec.id, &spec.options.args(), mountpoint, node_uid)
}

/// The first mount pod of backend `id` (`baton mount` with `options`) at `mountpoint`.
fn backend_pod(
    cfg: &MountPodConfig,
    id: &BackendId,
    options: &[String],
    mountpoint: &Path,
    node_uid: &str,
) -> Pod {
    let name = cfg.pod_name(id);
    let state = cfg.state_dir.display().to_string();
    let mut command: Vec<String> = vec![
        "baton".into(),
        "--log-format".into(),
        "json".into(),
        "mount".into(),
        mountpoint.display().to_string(),
        "--meta".into(),
        format!("$({SECRET_META_KEY})"),
    ];
    command.extend(options.iter().cloned());
    let mut requests = serde_json::Map::new();
    if let Some(c) = &cfg.cpu_request {
        requests.insert("cpu".into(), json!(c));
    }
    if let Some(m) = &cfg.memory_request {
        requests.insert("memory".into(), json!(m));
    }
    let mut limits = serde_json::Map::new();
    if let Some(m) = &cfg.memory_limit {
        limits.insert("memory".into(), json!(m));
    }
    let mut env = vec![json!({"name": "BATON_HOME", "value": format!("{state}/home")})];
    if let Some(k) = &cfg.keeper {
        env.push(
            json!({"name": handover_proto::keeper::KEEPER_ENV, "value": k.display().to_string()}),
        );
        // A mount pod deleted while in use is replaced (crate::upgrade::evicted): its
        // supervisor serves on until the replacement takes over, at most this long.
        env.push(json!({
            "name": handover_proto::keeper::SIGTERM_WAIT_ENV,
            "value": SIGTERM_WAIT_SECS.to_string(),
        }));
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            "labels": cfg.labels(id),
            "annotations": {
                "baton.dev/mountpoint": mountpoint.display().to_string(),
                "baton.dev/node": cfg.node_name,
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Node",
                "name": cfg.node_name,
                "uid": node_uid,
            }],
        },
        "spec": {
            "nodeName": cfg.node_name,
            "restartPolicy": "OnFailure",
            "hostPID": true,
            "tolerations": [{"operator": "Exists"}],
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "terminationGracePeriodSeconds": 60,
            "containers": [{
                "name": "baton",
                "image": cfg.image,
                "imagePullPolicy": "IfNotPresent",
                "command": command,
                "env": env,
                "envFrom": [{"secretRef": {"name": name}}],
                "securityContext": {"privileged": true},
                "resources": {"requests": requests, "limits": limits},
                "volumeMounts": [
                    {"name": "state", "mountPath": state, "mountPropagation": "Bidirectional"},
                    {"name": "fuse", "mountPath": "/dev/fuse"},
                ],
            }],
            "volumes": [
                {"name": "state", "hostPath": {"path": state, "type": "DirectoryOrCreate"}},
                {"name": "fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
            ],
        },
    });
    if let Some(pc) = &cfg.priority_class {
        pod["spec"]["priorityClassName"] = json!(pc);
    }
    // The JSON above is fixed apart from strings; it always has a Pod's shape.
    serde_json::from_value(pod).unwrap_or_default()
}

/// The Secret of a mount pod: the metadata URL and the environment for `baton`.
pub fn mount_secret(cfg: &MountPodConfig, spec: &BackendSpec, node_uid: &str) -> Secret {
    let mut data: BTreeMap<String, String> = spec.secrets.env.iter().cloned().collect();
    data.insert(SECRET_META_KEY.into(), spec.secrets.meta_url.clone());
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": cfg.pod_name(&spec.id),
            "namespace": cfg.namespace,
            "labels": cfg.labels(&spec.id),
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": cfg.node_name, "uid": node_uid}],
        },
        "type": "Opaque",
        "stringData": data,
    });
    serde_json::from_value(secret).unwrap_or_default()
}

/// Runs backends in mount pods.
#[derive(Clone)]
pub struct PodMounter {
    client: kube::Client,
    config: MountPodConfig,
    baton: Baton,
    runtime: Handle,
}

impl std::fmt::Debug for PodMounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodMounter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn kube_err(e: kube::Error) -> MountError {
    MountError::Kube(e)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Why a mount pod is not running, if its status says.
pub fn pod_problem(pod: &Pod) -> Option<(bool, String)> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some((
            true,
            status
                .message
                .clone()
                .or(status.reason.clone())
                .unwrap_or_else(|| "phase Failed".into()),
        ));
    }
    for cs in status.container_statuses.iter().flatten() {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            if let Some(r) = &w.reason {
                return Some((
                    false,
                    format!("{r}: {}", w.message.clone().unwrap_or_default()),
                ));
            }
        }
        if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return Some((
                false,
                format!(
                    "last exit {}: {}",
                    t.exit_code,
                    t.message.clone().unwrap_or_default()
                ),
            ));
        }
    }
    None
}

impl PodMounter {
    pub fn new(
        client: kube::Client,
        config: MountPodConfig,
        baton: Baton,
        runtime: Handle,
    ) -> PodMounter {
        PodMounter {
            client,
            config,
            baton,
            runtime,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Deletes every mount pod of backend `id` on this node and its Secret (missing ones
    /// are fine) and waits until the pod objects are gone (their kubelet stopped them).
    async fn delete_pods(&self, id: &BackendId, wait: Duration) -> Result<(), MountError> {
        let dp = DeleteParams::default();
        let lp = ListParams::default().labels(&self.config.backend_selector(id));
        let names = |list: kube::core::ObjectList<kube::core::PartialObjectMeta<Pod>>| {
            list.items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect::<Vec<String>>()
        };
        let pods = names(self.pods().list_metadata(&lp).await.map_err(kube_err)?);
        for name in &pods {
            match self.pods().delete(name, &dp).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(kube_err(e)),
            }
        }
        match self.secrets().delete(&self.config.pod_name(id), &dp).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(kube_err(e)),
        }
        if pods.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = names(self.pods().list_metadata(&lp).await.map_err(kube_err)?);
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MountError::Other(format!(
                    "mount pods {} are still terminating",
                    left.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn mount_async(
        &self,
        spec: &BackendSpec,
        mountpoint: &Path,
    ) -> Result<String, MountError> {
        let name = self.config.pod_name(&spec.id);
        let node = Api::<Node>::all(self.client.clone())
            .get(&self.config.node_name)
            .await
            .map_err(kube_err)?;
        let node_uid = node.metadata.uid.unwrap_or_default();
        // Whatever leftover pods of this backend do, they do not serve this mountpoint
        // (the caller found nothing mounted there): start afresh, with the current secrets.
        self.delete_pods(&spec.id, self.config.mount_timeout)
            .await?;
        let secret = mount_secret(&self.config, spec, &node_uid);
        let pp = PostParams::default();
        match self.secrets().create(&pp, &secret).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {
                self.secrets()
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map_err(kube_err)?;
                self.secrets()
                    .create(&pp, &secret)
                    .await
                    .map_err(kube_err)?;
            }
            Err(e) => return Err(kube_err(e)),
        }
        self.pods()
            .create(&pp, &mount_pod(&self.config, spec, mountpoint, &node_uid))
            .await
            .map_err(kube_err)?;
        tracing::info!(pod = %name, "mount pod created");
        self.wait_mounted(&name, mountpoint).await?;
        Ok(format!("{}/{}", self.config.namespace, name))
    }

    /// [`Mounter::ensure_served`]: if every pod of backend `id` is being deleted or gone
    /// while the backend is mounted, starts a replacement with `baton mount --take-over`.
    /// Its supervisor takes the mount over from the terminating pod's supervisor (which
    /// serves on after SIGTERM while the keeper holds the mount), or, if that one is
    /// dead already, withdraws the connection from the descriptor keeper and re-seeds it.
    async fn ensure_served_async(
        &self,
        id: &BackendId,
        record: &BackendRecord,
        mountpoint: &Path,
    ) -> Result<Option<String>, MountError> {
        let lp = ListParams::default().labels(&self.config.backend_selector(id));
        let pods = self.pods().list(&lp).await.map_err(kube_err)?.items;
        if pods.iter().any(|p| p.metadata.deletion_timestamp.is_none()) {
            return Ok(None);
        }
        let executor = Executor {
            baton: self.baton.clone(),
            timeout: Duration::from_secs(30),
        };
        let before = executor.state(mountpoint).await;
        // The newest of the terminating pods is what served the mount last.
        let template = pods
            .iter()
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let image = template
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .or_else(|| record.image.clone())
            .unwrap_or_else(|| self.config.image.clone());
        let name = self.config.successor_name(id, "replacement");
        let pod = match template {
            Some(old) => successor_pod(old, &name, &image, None),
            None => {
                // Deleted without a grace period: nothing to copy, build it afresh.
                let node = Api::<Node>::all(self.client.clone())
                    .get(&self.config.node_name)
                    .await
                    .map_err(kube_err)?;
                let mut cfg = self.config.clone();
                cfg.image = image.clone();
                let first = backend_pod(
                    &cfg,
                    id,
                    &record.options,
                    mountpoint,
                    &node.metadata.uid.unwrap_or_default(),
                );
                successor_pod(&first, &name, &image, None)
            }
        };
        let created = self
            .pods()
            .create(&PostParams::default(), &pod)
            .await
            .map_err(kube_err)?;
        let replaced: Vec<&str> = pods
            .iter()
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        tracing::warn!(backend = %id, pod = %name, ?replaced, "every mount pod of a mounted backend is being deleted: a new one takes the mount over");
        let replaced = if replaced.is_empty() {
            "its mount pod (deleted without a grace period)".to_string()
        } else {
            format!("mount pod {}", replaced.join(", "))
        };
        match self
            .wait_served_by_another(&executor, &name, mountpoint, before.as_ref())
            .await
        {
            Ok(()) => {
                tracing::info!(backend = %id, pod = %name, "the new mount pod serves the mount");
                let message = format!(
                    "{replaced} was deleted while the mount was in use; {name} took the mount over"
                );
                self.event(&created, "Normal", "MountPodReplaced", &message)
                    .await;
                Ok(Some(format!("{}/{name}", self.config.namespace)))
            }
            Err(e) => {
                let message = format!(
                    "{replaced} was deleted while the mount was in use; {name} did not take the mount over: {}",
                    crate::error::chain(&e)
                );
                self.event(&created, "Warning", "MountPodReplacementFailed", &message)
                    .await;
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                if let Err(d) = self.pods().delete(&name, &dp).await {
                    tracing::warn!(pod = %name, error = %crate::error::chain(&d), "cannot delete the failed replacement mount pod");
                }
                Err(e)
            }
        }
    }

    /// Posts an Event about mount pod `pod` (failures are logged).
    async fn event(&self, pod: &Pod, kind: &str, reason: &str, message: &str) {
        let seen = Seen {
            kind: Kind::Pod,
            namespace: Some(self.config.namespace.clone()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            exists: true,
            deleting: false,
        };
        let posted = match event_about(&seen, kind, reason, message, &self.config.node_name) {
            Ok((ns, ev)) => Api::<Event>::namespaced(self.client.clone(), &ns)
                .create(&PostParams::default(), &ev)
                .await
                .map(drop)
                .map_err(|e| crate::error::chain(&e)),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = posted {
            tracing::warn!(error = %e, reason, "cannot post an Event");
        }
    }

    /// Waits until a supervisor other than `before`'s serves `mountpoint` (the one of pod
    /// `name`), the pod fails, or the timeout.
    async fn wait_served_by_another(
        &self,
        executor: &Executor,
        name: &str,
        mountpoint: &Path,
        before: Option<&MountState>,
    ) -> Result<(), MountError> {
        let deadline = Instant::now() + self.config.mount_timeout + REPLACEMENT_GRACE;
        let mut last_check = Instant::now();
        loop {
            if let Some(s) = executor.state(mountpoint).await {
                let another = before.is_none_or(|b| b.supervisor_pid != s.supervisor_pid);
                if another && s.state.as_deref().is_none_or(|st| st == "serving") {
                    return Ok(());
                }
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                if let Some((_, why)) = self.problem_of(name).await? {
                    return Err(MountError::PodFailed(format!("{name}: {why}")));
                }
            }
            if Instant::now() >= deadline {
                return Err(MountError::Timeout(
                    self.config.mount_timeout + REPLACEMENT_GRACE,
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What is wrong with mount pod `name` ([`pod_problem`]); an error if it is gone.
    async fn problem_of(&self, name: &str) -> Result<Option<(bool, String)>, MountError> {
        match self.pods().get_opt(name).await.map_err(kube_err)? {
            None => Err(MountError::PodFailed(format!(
                "mount pod {name} disappeared"
            ))),
            Some(p) => Ok(pod_problem(&p)),
        }
    }

    /// Waits until the mount serves, the pod fails, or the timeout.
    async fn wait_mounted(&self, name: &str, mountpoint: &Path) -> Result<(), MountError> {
        let deadline = Instant::now() + self.config.mount_timeout;
        let mut last_check = Instant::now();
        let mut problem = None;
        loop {
            let mounted = MountTable::read()
                .map(|t| t.at(mountpoint).is_some_and(|e| e.is_baton()))
                .unwrap_or(false);
            if mounted {
                tracing::info!(pod = %name, "mount pod serves");
                return Ok(());
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                match self.problem_of(name).await? {
                    Some((true, why)) => {
                        return Err(MountError::PodFailed(format!("{name}: {why}")));
                    }
                    Some((false, why)) => problem = Some(why),
                    None => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(match problem {
                    Some(why) => {
                        MountError::PodFailed(format!("{name} did not mount in time: {why}"))
                    }
                    None => MountError::Timeout(self.config.mount_timeout),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Mounter for PodMounter {
    fn mode(&self) -> MountMode {
        MountMode::Pod
    }

    fn mount(&self, spec: &BackendSpec, mountpoint: &Path) -> Result<Option<String>, MountError> {
        let result = self.runtime.block_on(self.mount_async(spec, mountpoint));
        match result {
            Ok(pod) => Ok(Some(pod)),
            Err(e) => {
                // Leave nothing half-made behind: the CO retries from scratch.
                if let Err(d) = self
                    .runtime
                    .block_on(self.delete_pods(&spec.id, Duration::from_secs(30)))
                {
                    tracing::warn!(backend = %spec.id, error = %crate::error::chain(&d), "cannot remove a failed mount pod");
                }
                Err(e)
            }
        }
    }

    fn unmount(
        &self,
        id: &BackendId,
        _record: Option<&BackendRecord>,
        mountpoint: &Path,
    ) -> Result<(), MountError> {
        let mounted = MountTable::read()
            .map(|t| t.at(mountpoint).is_some())
            .unwrap_or(true);
        if mounted {
            unmount_backend(&self.baton, id, mountpoint)?;
        }
        self.runtime
            .block_on(self.delete_pods(id, self.config.mount_timeout))?;
        tracing::info!(backend = %id, "mount pods deleted");
        Ok(())
    }

    fn ensure_served(
        &self,
        id: &BackendId,
        record: &BackendRecord,
        mountpoint: &Path,
    ) -> Result<Option<String>, MountError> {
        self.runtime
            .block_on(self.ensure_served_async(id, record, mountpoint))
    }

    fn instances(&self) -> Result<Vec<BackendId>, MountError> {
        self.runtime.block_on(async {
            let lp = ListParams::default()
                .labels(&self.config.selector())
                .fields(&format!("spec.nodeName={}", self.config.node_name));
            let pods = self.pods().list_metadata(&lp).await.map_err(kube_err)?;
            let secrets = self
                .secrets()
                .list_metadata(&ListParams::default().labels(&self.config.selector()))
                .await
                .map_err(kube_err)?;
            Ok(pods
                .items
                .iter()
                .map(|p| &p.metadata)
                .chain(secrets.items.iter().map(|s| &s.metadata))
                .filter_map(|m| {
                    m.labels
                        .as_ref()?
                        .get(LABEL_BACKEND)
                        .and_then(|v| BackendId::from_hex(v))
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{MountOptions, VolumeSecrets, parse_mount_flags};

    fn cfg() -> MountPodConfig {
        MountPodConfig {
            namespace: "baton-system".into(),
            node_name: "node-a".into(),
            image: "baton:test".into(),
            state_dir: "/var/lib/baton-csi".into(),
            priority_class: Some("system-node-critical".into()),
            cpu_request: Some("100m".into()),
            memory_request: None,
            memory_limit: Some("1Gi".into()),
            mount_timeout: Duration::from_secs(5),
            keeper: Some("/var/lib/baton-csi/run/keeper.sock".into()),
        }
    }

    fn spec() -> BackendSpec {
        let secrets = VolumeSecrets {
            meta_url: "redis://:pw@db/1".into(),
            format: None,
            env: vec![("AWS_SECRET_ACCESS_KEY".into(), "k".into())],
        };
        let opts: MountOptions = parse_mount_flags(&["threads=4".into()])
            .expect("valid")
            .options;
        BackendSpec::new(secrets, opts)
    }

    #[test]
    fn mount_pod_has_the_fields_that_matter_and_no_secret() {
        let (c, s) = (cfg(), spec());
        let mp = c.state_dir.join("mnt").join(s.id.as_str());
        let pod = mount_pod(&c, &s, &mp, "uid-1");
        let text = serde_json::to_string(&pod).expect("json");
        assert!(!text.contains("pw@db") && !text.contains("\"k\""), "{text}");
        let spec_ = pod.spec.as_ref().expect("spec");
        assert_eq!(spec_.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec_.restart_policy.as_deref(), Some("OnFailure"));
        assert_eq!(spec_.automount_service_account_token, Some(false));
        let ctr = &spec_.containers[0];
        let cmd = ctr.command.as_ref().expect("command");
        assert_eq!(
            &cmd[3..7],
            [
                "mount",
                &mp.display().to_string(),
                "--meta",
                "$(BATON_META_URL)"
            ]
        );
        assert!(cmd.ends_with(&["--threads".to_string(), "4".to_string()]));
        let vm = &ctr.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(vm.mount_propagation.as_deref(), Some("Bidirectional"));
        assert_eq!(vm.mount_path, "/var/lib/baton-csi");
        let env = ctr.env.as_ref().expect("env");
        assert!(
            env.iter().any(|e| e.name == "BATON_KEEPER"
                && e.value.as_deref() == Some("/var/lib/baton-csi/run/keeper.sock")),
            "{env:?}"
        );
        let owner = &pod.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Node", "uid-1"));
        let secret = mount_secret(&c, &s, "uid-1");
        let data = secret.string_data.expect("data");
        assert_eq!(
            data.get(SECRET_META_KEY).map(String::as_str),
            Some("redis://:pw@db/1")
        );
        assert_eq!(secret.metadata.name, pod.metadata.name);
    }
}
