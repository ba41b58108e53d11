//! What baton-csi does with an upgrade annotation it sees: find the mounts on this node it
//! names, skip what it already answered, refuse what is malformed or impossible, run the
//! binary upgrade, and say how it went — the status on each mount (in the state directory,
//! and as the `baton.dev/upgrade-status` annotation of its mount pod, one patch per phase
//! change) and an Event on the object that asked.
//!
//! A request is answered once per (object, value): the answer is kept in
//! `<state>/upgrades/<backend>.json`, so a restarted baton-csi, or the watch event of its
//! own status patch, does not upgrade again. Requests are handled one at a time per node.
//!
//! With upgrade slots ([`super::slots`]), each mount upgrade first waits for a slot (the
//! cluster-wide limit) and frees it after. A request on the Node is also answered on the
//! Node (one `baton.dev/upgrade-status` over all its mounts, see [`node_summary`]): that
//! is what `baton-csi rollout` waits for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument;

use super::binaries::BinaryStore;
use super::executor::{Executor, UpgradeOutcome};
use super::pod::PodUpgrader;
use super::request::{Phase, STATUS_ANNOTATION, UPGRADE_ANNOTATION, UpgradeRequest, UpgradeStatus};
use super::slots::SlotPool;
use super::watch::{Kind, Seen};
use crate::kube::mountpod::LABEL_BACKEND;
use crate::layout::{BackendRecord, Layout, TargetRecord, list_records, read_record, write_record};
use crate::mountinfo::MountTable;
use crate::volume::BackendId;

/// What baton-csi remembers about the upgrades of one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The latest status (what the mount pod's annotation says).
    pub status: Option<UpgradeStatus>,
    /// Source (`pod/..`, `pv/..`, `node/..`) → the request value last answered.
    pub answered: BTreeMap<String, String>,
}

/// Handles upgrade annotations for one node.
#[derive(Clone)]
pub struct Handler {
    pub client: kube::Client,
    pub node_name: String,
    pub layout: Layout,
    pub store: BinaryStore,
    pub executor: Executor,
    /// The cluster-wide upgrade slots (`None`: no limit).
    pub slots: Option<SlotPool>,
    /// Pod upgrades (mount pod mode only).
    pub pods: Option<PodUpgrader>,
    /// The Node status this handler wrote last, and when (see [`NodeStatusMemo`]).
    pub node_written: NodeStatusMemo,
}

/// The last status a handler wrote on its Node. Watch events queued while an upgrade ran
/// (and the periodic recheck) still carry the Node's annotations from before that write;
/// without this, each would write the same status again. A write is skipped only for
/// [`NodeStatusMemo::FOR`]: a status removed or changed by someone else is written again
/// after that.
#[derive(Clone, Debug, Default)]
pub struct NodeStatusMemo(
    std::sync::Arc<std::sync::Mutex<Option<(UpgradeStatus, std::time::Instant)>>>,
);

impl NodeStatusMemo {
    pub const FOR: std::time::Duration = std::time::Duration::from_secs(60);

    /// Whether `st` was written within [`Self::FOR`].
    pub fn recently_written(&self, st: &UpgradeStatus) -> bool {
        let last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.as_ref()
            .is_some_and(|(w, at)| w == st && at.elapsed() < Self::FOR)
    }

    pub fn written(&self, st: &UpgradeStatus) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((st.clone(), std::time::Instant::now()));
    }
}

/// What an upgrade request asks of each mount.
#[derive(Clone, Copy, Debug)]
enum Target<'a> {
    /// Replace the client binary (from the node's state directory).
    Binary(&'a Path),
    /// Replace the mount pod by one of this image.
    Pod(&'a str),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("node_name", &self.node_name)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// The last-but-one component of a kubelet target path
/// (`<kubelet>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`): the PV's name.
fn pv_of_target(target: &Path) -> Option<&str> {
    target.parent()?.file_name()?.to_str()
}

impl Handler {
    fn record_path(&self, id: &BackendId) -> PathBuf {
        self.layout
            .root()
            .join("upgrades")
            .join(format!("{}.json", id.as_str()))
    }

    pub fn record(&self, id: &BackendId) -> UpgradeRecord {
        read_record(&self.record_path(id))
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn save(&self, id: &BackendId, rec: &UpgradeRecord) {
        let path = self.record_path(id);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = write_record(&path, rec) {
            tracing::warn!(backend = %id, error = %crate::error::chain(&e), "cannot save the upgrade record");
        }
    }

    /// The backends on this node that `seen` names (mounted ones only).
    fn backends(&self, seen: &Seen) -> Vec<BackendId> {
        let ids: BTreeSet<BackendId> = match seen.kind {
            Kind::Pod => seen
                .labels
                .get(LABEL_BACKEND)
                .and_then(|v| BackendId::from_hex(v))
                .into_iter()
                .collect(),
            Kind::PersistentVolume => list_records::<TargetRecord>(&self.layout.targets_dir())
                .into_iter()
                .filter(|(_, t)| {
                    t.volume_id == seen.name || pv_of_target(&t.target) == Some(&seen.name)
                })
                .map(|(_, t)| t.backend)
                .collect(),
            Kind::Node => list_records::<BackendRecord>(&self.layout.backends_dir())
                .into_iter()
                .map(|(_, b)| b.id)
                .collect(),
        };
        let table = MountTable::read().ok();
        ids.into_iter()
            .filter(|id| {
                let mp = self.layout.backend_mountpoint(id);
                table
                    .as_ref()
                    .is_some_and(|t| t.at(&mp).is_some_and(|e| e.is_baton()))
            })
            .collect()
    }

    /// Handles one watch event.
    pub async fn handle(&self, seen: &Seen) {
        if !seen.exists {
            return;
        }
        let Some(value) = seen.annotations.get(UPGRADE_ANNOTATION) else {
            return;
        };
        let source = seen.source();
        let backends = self.backends(seen);
        let pending: Vec<BackendId> = backends
            .iter()
            .filter(|id| self.record(id).answered.get(&source) != Some(value))
            .cloned()
            .collect();
        if !pending.is_empty() {
            let span = tracing::info_span!("upgrade", source = %source, request = %value);
            self.answer(seen, &source, value, &pending)
                .instrument(span)
                .await;
        }
        if seen.kind == Kind::Node {
            self.node_status(seen, &source, value, &backends).await;
        }
    }

    /// Answers a request on the Node on the Node itself (what `baton-csi rollout` waits
    /// for): one status over every mount of the node, written only when it changes.
    async fn node_status(&self, seen: &Seen, source: &str, value: &str, backends: &[BackendId]) {
        let statuses: Vec<UpgradeStatus> = backends
            .iter()
            .filter_map(|id| self.record(id).status)
            .filter(|s| s.request == value && s.source == source)
            .collect();
        if statuses.len() < backends.len() {
            // Some mount is not answered yet (it will be, then this runs again).
            return;
        }
        let st = node_summary(value, source, &statuses);
        let current = seen
            .annotations
            .get(STATUS_ANNOTATION)
            .and_then(|s| UpgradeStatus::from_json(s));
        if current.as_ref() == Some(&st) || self.node_written.recently_written(&st) {
            return;
        }
        let patch = json!({"metadata": {"annotations": {STATUS_ANNOTATION: st.to_json()}}});
        match Api::<Node>::all(self.client.clone())
            .patch(&seen.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.node_written.written(&st);
                tracing::info!(node = %seen.name, phase = ?st.phase, "node upgrade status written")
            }
            Err(e) => {
                tracing::warn!(node = %seen.name, error = %crate::error::chain(&e), "cannot write the node's upgrade status")
            }
        }
    }

    async fn answer(&self, seen: &Seen, source: &str, value: &str, pending: &[BackendId]) {
        let reason = match UpgradeRequest::parse(value) {
            Err(e) => format!("malformed {UPGRADE_ANNOTATION}: {e}"),
            Ok(UpgradeRequest::Pod(image)) => match &self.pods {
                None => "pod upgrades need mount pod mode (this node runs its mounts as processes)"
                    .to_string(),
                Some(_) => {
                    self.upgrade_all(seen, source, value, pending, Target::Pod(&image))
                        .await;
                    return;
                }
            },
            Ok(UpgradeRequest::Binary(v)) => match self.store.client(&v) {
                Err(e) => crate::error::chain(&e),
                Ok(binary) => {
                    self.upgrade_all(seen, source, value, pending, Target::Binary(&binary))
                        .await;
                    return;
                }
            },
        };
        tracing::warn!(reason = %reason, "upgrade refused; mounts untouched");
        for id in pending {
            let mut st = UpgradeStatus::new(Phase::Failed, value, source).with_reason(&reason);
            st.generation = self
                .executor
                .generation(&self.layout.backend_mountpoint(id))
                .await;
            self.finish(id, source, value, st).await;
        }
        self.event(seen, "Warning", "UpgradeRefused", &reason).await;
    }

    async fn upgrade_all(
        &self,
        seen: &Seen,
        source: &str,
        value: &str,
        ids: &[BackendId],
        target: Target<'_>,
    ) {
        let mut outcomes = Vec::new();
        for id in ids {
            let mp = self.layout.backend_mountpoint(id);
            let slot = match &self.slots {
                None => None,
                Some(pool) => match self.take_slot(pool, id, value, source).await {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let reason = crate::error::chain(&e);
                        tracing::warn!(backend = %id, reason = %reason, "no upgrade slot; mount untouched");
                        let mut st =
                            UpgradeStatus::new(Phase::Failed, value, source).with_reason(reason);
                        st.generation = self.executor.generation(&mp).await;
                        outcomes.push((id.clone(), st.clone()));
                        self.finish(id, source, value, st).await;
                        continue;
                    }
                },
            };
            tracing::info!(backend = %id, slot = ?slot.as_ref().map(|s| s.index), "upgrading");
            let running = UpgradeStatus::new(Phase::Running, value, source);
            let outcome = match target {
                Target::Binary(binary) => {
                    self.set_status(id, running).await;
                    self.executor.upgrade(&mp, binary).await
                }
                Target::Pod(image) => self.upgrade_pod(id, &mp, image, running).await,
            };
            if let Some(slot) = slot {
                slot.release().await;
            }
            let mut st = UpgradeStatus::new(Phase::Failed, value, source);
            match &outcome {
                UpgradeOutcome::Upgraded {
                    generation,
                    pause_ms,
                } => {
                    st.phase = Phase::Succeeded;
                    st.generation = Some(*generation);
                    st.pause_ms = Some(*pause_ms);
                }
                UpgradeOutcome::RolledBack { generation, reason } => {
                    st.phase = Phase::RolledBack;
                    st.generation = Some(*generation);
                    st.reason = Some(reason.clone());
                }
                UpgradeOutcome::Failed { generation, reason } => {
                    st.generation = *generation;
                    st.reason = Some(reason.clone());
                }
            }
            tracing::info!(backend = %id, phase = ?st.phase, generation = ?st.generation, pause_ms = ?st.pause_ms, reason = ?st.reason, "upgrade finished");
            outcomes.push((id.clone(), st.clone()));
            self.finish(id, source, value, st).await;
        }
        let failed = outcomes
            .iter()
            .filter(|(_, s)| s.phase != Phase::Succeeded)
            .count();
        let summary: Vec<String> = outcomes
            .iter()
            .map(|(id, s)| match (&s.phase, &s.reason) {
                (Phase::Succeeded, _) => format!(
                    "{id}: generation {} (paused {} ms)",
                    s.generation.unwrap_or_default(),
                    s.pause_ms.unwrap_or_default()
                ),
                (p, r) => format!("{id}: {p:?}: {}", r.as_deref().unwrap_or("")),
            })
            .collect();
        let (kind, reason) = if failed == 0 {
            ("Normal", "UpgradeSucceeded")
        } else {
            ("Warning", "UpgradeFailed")
        };
        let message = format!("{value} on node {}: {}", self.node_name, summary.join("; "));
        self.event(seen, kind, reason, &message).await;
    }

    /// Takes an upgrade slot for `id`'s upgrade; if every slot is busy, says so first
    /// (status `pending`, one patch) and waits for one.
    async fn take_slot(
        &self,
        pool: &SlotPool,
        id: &BackendId,
        value: &str,
        source: &str,
    ) -> Result<super::slots::Slot, super::slots::SlotError> {
        match pool.try_take().await? {
            Ok(slot) => Ok(slot),
            Err(retry_after) => {
                tracing::info!(backend = %id, "every upgrade slot is busy: pending");
                self.set_status(id, UpgradeStatus::new(Phase::Pending, value, source))
                    .await;
                tokio::time::sleep(retry_after).await;
                pool.acquire().await
            }
        }
    }

    /// A pod upgrade of one mount. The `running` status goes into the new pod as it is
    /// created (no write on the old one); the backend's record then names the pod whose
    /// supervisor serves the mount, so the final status lands there.
    async fn upgrade_pod(
        &self,
        id: &BackendId,
        mp: &Path,
        image: &str,
        running: UpgradeStatus,
    ) -> UpgradeOutcome {
        let Some(pods) = &self.pods else {
            return UpgradeOutcome::Failed {
                generation: None,
                reason: "pod upgrades need mount pod mode".into(),
            };
        };
        let record_path = self.layout.backend_record(id);
        let mut record = match read_record::<BackendRecord>(&record_path) {
            Ok(Some(r)) => r,
            _ => {
                return UpgradeOutcome::Failed {
                    generation: self.executor.generation(mp).await,
                    reason: "no record of this mount on the node".into(),
                };
            }
        };
        let Some((_, pod)) = record.pod.as_deref().and_then(|p| p.split_once('/')) else {
            return UpgradeOutcome::Failed {
                generation: self.executor.generation(mp).await,
                reason: "this mount has no mount pod (it runs as a process)".into(),
            };
        };
        let pod = pod.to_string();
        self.save_status(id, &running);
        let done = pods
            .upgrade(&self.executor, id, &pod, mp, image, &running)
            .await;
        if let Some(new_pod) = done.new_pod {
            record.pod = Some(new_pod);
            record.image = Some(image.to_string());
            if let Err(e) = write_record(&record_path, &record) {
                tracing::warn!(backend = %id, error = %crate::error::chain(&e), "cannot record the new mount pod");
            }
        }
        done.outcome
    }

    /// Records the final status and that `source`'s `value` is answered.
    async fn finish(&self, id: &BackendId, source: &str, value: &str, st: UpgradeStatus) {
        self.set_status(id, st).await;
        let mut rec = self.record(id);
        rec.answered.insert(source.to_string(), value.to_string());
        self.save(id, &rec);
    }

    /// Saves `st` in the state directory; false if it was already the status.
    fn save_status(&self, id: &BackendId, st: &UpgradeStatus) -> bool {
        let mut rec = self.record(id);
        if rec.status.as_ref() == Some(st) {
            return false;
        }
        rec.status = Some(st.clone());
        self.save(id, &rec);
        true
    }

    /// Saves `st` and, if the backend has a mount pod, patches its annotation (only when
    /// the status changed: one write per phase change).
    async fn set_status(&self, id: &BackendId, st: UpgradeStatus) {
        if !self.save_status(id, &st) {
            return;
        }
        let pod = read_record::<BackendRecord>(&self.layout.backend_record(id))
            .ok()
            .flatten()
            .and_then(|b| b.pod);
        let Some((ns, name)) = pod.as_deref().and_then(|p| p.split_once('/')) else {
            return;
        };
        let patch = json!({"metadata": {"annotations": {STATUS_ANNOTATION: st.to_json()}}});
        if let Err(e) = Api::<Pod>::namespaced(self.client.clone(), ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(pod = %name, error = %crate::error::chain(&e), "cannot write the upgrade status");
        }
    }

    /// Posts an Event about `seen` (Events of cluster-scoped objects go to `default`).
    async fn event(&self, seen: &Seen, kind: &str, reason: &str, message: &str) {
        let (ns, ev) = match event_about(seen, kind, reason, message, &self.node_name) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build an Event");
                return;
            }
        };
        if let Err(e) = Api::<Event>::namespaced(self.client.clone(), &ns)
            .create(&PostParams::default(), &ev)
            .await
        {
            tracing::warn!(error = %crate::error::chain(&e), "cannot post an Event");
        }
    }
}

/// The Event baton-csi posts about `seen` from node `node_name`, and the namespace it goes
/// to (Events of cluster-scoped objects go to `default`).
pub fn event_about(
    seen: &Seen,
    kind: &str,
    reason: &str,
    message: &str,
    node_name: &str,
) -> Result<(String, Event), serde_json::Error> {
    let (api_kind, ns) = match seen.kind {
        Kind::Pod => ("Pod", seen.namespace.clone().unwrap_or_default()),
        Kind::PersistentVolume => ("PersistentVolume", "default".to_string()),
        Kind::Node => ("Node", "default".to_string()),
    };
    let now = k8s_openapi::chrono::Utc::now()
        .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
    let mut involved =
        json!({"apiVersion": "v1", "kind": api_kind, "name": seen.name, "uid": seen.uid});
    if seen.kind == Kind::Pod {
        involved["namespace"] = json!(ns);
    }
    let message: String = message.chars().take(1024).collect();
    let ev = json!({
        "metadata": {"generateName": format!("{}.", seen.name), "namespace": ns},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": "baton-csi", "host": node_name},
        "reportingComponent": "csi.baton.dev/baton-csi",
        "reportingInstance": node_name,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    });
    Ok((ns, serde_json::from_value(ev)?))
}

/// One status for a node: succeeded if every mount succeeded (or there is none), else the
/// first mount's failure (failed before rolled-back), with the pause of the slowest mount.
pub fn node_summary(value: &str, source: &str, mounts: &[UpgradeStatus]) -> UpgradeStatus {
    let worst = mounts
        .iter()
        .find(|s| s.phase == Phase::Failed)
        .or_else(|| mounts.iter().find(|s| s.phase != Phase::Succeeded));
    match worst {
        Some(w) => {
            let mut st = UpgradeStatus::new(w.phase, value, source);
            st.reason = Some(format!(
                "{} of {} mounts not upgraded: {}",
                mounts
                    .iter()
                    .filter(|s| s.phase != Phase::Succeeded)
                    .count(),
                mounts.len(),
                w.reason.as_deref().unwrap_or("")
            ));
            st
        }
        None => {
            let mut st = UpgradeStatus::new(Phase::Succeeded, value, source);
            st.pause_ms = mounts.iter().filter_map(|s| s.pause_ms).max();
            if mounts.is_empty() {
                st.reason = Some("no Baton mount on this node".into());
            }
            st
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_succeeds_only_if_every_mount_did() {
        let ok = |p| {
            let mut s = UpgradeStatus::new(Phase::Succeeded, "binary:1", "node/n");
            s.pause_ms = Some(p);
            s
        };
        let st = node_summary("binary:1", "node/n", &[ok(3), ok(9)]);
        assert_eq!((st.phase, st.pause_ms), (Phase::Succeeded, Some(9)));
        let bad =
            UpgradeStatus::new(Phase::RolledBack, "binary:1", "node/n").with_reason("ping failed");
        let st = node_summary("binary:1", "node/n", &[ok(3), bad]);
        assert_eq!(st.phase, Phase::RolledBack);
        assert_eq!(
            st.reason.as_deref(),
            Some("1 of 2 mounts not upgraded: ping failed")
        );
        let st = node_summary("binary:1", "node/n", &[]);
        assert_eq!(st.phase, Phase::Succeeded);
    }

    #[test]
    fn a_node_status_just_written_is_not_written_again() {
        let memo = NodeStatusMemo::default();
        let a = UpgradeStatus::new(Phase::Succeeded, "binary:1", "node/n");
        let b = UpgradeStatus::new(Phase::Failed, "binary:1", "node/n");
        assert!(!memo.recently_written(&a));
        memo.written(&a);
        assert!(memo.recently_written(&a));
        assert!(!memo.recently_written(&b));
        // Clones share the memo (the handler is cloned into its task).
        let clone = memo.clone();
        clone.written(&b);
        assert!(memo.recently_written(&b) && !memo.recently_written(&a));
    }

    #[test]
    fn the_pv_of_a_kubelet_target_path() {
        let t = Path::new("/var/lib/kubelet/pods/1234/volumes/kubernetes.io~csi/pv-data/mount");
        assert_eq!(pv_of_target(t), Some("pv-data"));
        assert_eq!(pv_of_target(Path::new("/")), None);
    }
}
