//! Mount pods deleted while their mount is in use (an eviction, `kubectl delete pod`, a
//! drain): the node's pod watch ([`super::watch`], no extra request) tells which backends
//! have no mount pod left that is not being deleted, and each is handed to
//! [`crate::publish::Publisher::ensure_served`], which starts a replacement mount pod if
//! the backend is mounted and in use. The replacement's supervisor takes the mount over
//! from the terminating pod's (which serves on after SIGTERM while the descriptor keeper
//! holds the mount), or re-seeds it from the keeper once that pod's processes are dead:
//! applications see a pause, never ENOTCONN.
//!
//! A replacement that fails is tried again every [`RETRY_INTERVAL`] until one serves or
//! the backend needs none (unmounted, no user left).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::watch::{Kind, Seen};
use crate::kube::mountpod::LABEL_BACKEND;
use crate::publish::Served;
use crate::volume::BackendId;

/// Between two attempts to replace the mount pods of a backend.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// After this long, a backend in use of which the watch has shown no mount pod at all
/// (its pods were deleted while baton-csi was down) is looked at too.
pub const STARTUP_SETTLE: Duration = Duration::from_secs(5);

/// Starts a replacement for backend `id`'s mount pods if it needs one (blocking).
pub type EnsureServed = Arc<dyn Fn(&BackendId) -> Result<Served, String> + Send + Sync>;

/// What the watch loop needs to replace deleted mount pods.
#[derive(Clone)]
pub struct Replacements {
    pub ensure: EnsureServed,
    /// The backends in use when baton-csi started.
    pub in_use: Vec<BackendId>,
}

impl std::fmt::Debug for Replacements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacements")
            .field("in_use", &self.in_use)
            .finish_non_exhaustive()
    }
}

/// The mount pods of this node as the watch shows them: name → (backend, being deleted).
#[derive(Debug, Default)]
pub struct PodTracker {
    pods: BTreeMap<String, (BackendId, bool)>,
}

impl PodTracker {
    /// Records what the watch saw of a mount pod. Returns its backend when no pod of that
    /// backend is left that is not being deleted.
    pub fn update(&mut self, seen: &Seen) -> Option<BackendId> {
        if seen.kind != Kind::Pod {
            return None;
        }
        let id = BackendId::from_hex(seen.labels.get(LABEL_BACKEND)?)?;
        if seen.exists {
            self.pods
                .insert(seen.name.clone(), (id.clone(), seen.deleting));
        } else {
            self.pods.remove(&seen.name);
        }
        let live = self
            .pods
            .values()
            .any(|(backend, deleting)| *backend == id && !deleting);
        (!live).then_some(id)
    }

    /// Of `ids`, those the watch has shown no mount pod of.
    pub fn unseen<'a>(&self, ids: &'a [BackendId]) -> Vec<&'a BackendId> {
        ids.iter()
            .filter(|id| !self.pods.values().any(|(b, _)| b == *id))
            .collect()
    }
}

/// Replaces the mount pods of the backends sent on `rx`, retrying failures.
pub async fn run(mut rx: mpsc::UnboundedReceiver<BackendId>, ensure: EnsureServed) {
    let mut pending: BTreeSet<BackendId> = BTreeSet::new();
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            id = rx.recv() => {
                let Some(id) = id else { return };
                pending.insert(id);
                // Whatever else arrived meanwhile is handled in the same round.
                while let Ok(id) = rx.try_recv() {
                    pending.insert(id);
                }
            }
            _ = retry.tick() => {}
        }
        for id in pending.clone() {
            let f = Arc::clone(&ensure);
            let backend = id.clone();
            let result = tokio::task::spawn_blocking(move || f(&backend))
                .await
                .unwrap_or_else(|e| Err(format!("the replacement task failed: {e}")));
            match result {
                Ok(served) => {
                    if let Served::Replaced(pod) = &served {
                        tracing::info!(backend = %id, %pod, "mount pod replaced");
                    }
                    pending.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(backend = %id, error = %e, retry_in = ?RETRY_INTERVAL, "cannot replace the deleted mount pod");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, backend: &str, exists: bool, deleting: bool) -> Seen {
        Seen {
            kind: Kind::Pod,
            namespace: Some("ns".into()),
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: [(LABEL_BACKEND.to_string(), backend.to_string())].into(),
            annotations: BTreeMap::new(),
            exists,
            deleting,
        }
    }

    #[test]
    fn a_backend_is_orphaned_when_its_last_live_pod_goes() {
        let a = "aa".repeat(10);
        let b = "bb".repeat(10);
        let id_a = BackendId::from_hex(&a).expect("hex");
        let mut t = PodTracker::default();
        assert_eq!(t.update(&pod("p1", &a, true, false)), None);
        assert_eq!(t.update(&pod("q1", &b, true, false)), None);
        // A pod upgrade: the successor exists before the old pod is deleted.
        assert_eq!(t.update(&pod("p2", &a, true, false)), None);
        assert_eq!(t.update(&pod("p1", &a, true, true)), None);
        assert_eq!(t.update(&pod("p1", &a, false, true)), None);
        // An eviction of the only pod: orphaned as soon as it is being deleted, and
        // still when it is gone.
        assert_eq!(t.update(&pod("p2", &a, true, true)), Some(id_a.clone()));
        assert_eq!(t.update(&pod("p2", &a, false, true)), Some(id_a.clone()));
        // Its replacement serves it again.
        assert_eq!(t.update(&pod("p3", &a, true, false)), None);
        let c = BackendId::from_hex(&"cc".repeat(10)).expect("hex");
        assert_eq!(t.unseen(&[id_a.clone(), c.clone()]), [&c]);
        // Other objects, and pods without a backend label, are not tracked.
        let mut node = pod("n", &a, true, true);
        node.kind = Kind::Node;
        assert_eq!(t.update(&node), None);
        let mut bare = pod("x", &a, true, true);
        bare.labels.clear();
        assert_eq!(t.update(&bare), None);
    }
}
