//! Pod upgrades (`baton.dev/upgrade=pod:<image>`): a new mount pod of the new image takes
//! the mount over from the old one, supervisor to supervisor, without unmounting.
//!
//! ```text
//! baton-csi                    old mount pod (P1)              new mount pod (P2)
//!   create P2: P1's spec, the new image, `baton mount --take-over`,
//!   its status annotation already `running` (no extra write)
//!                                                              HandOver on the control
//!                               Detach, control socket  ---->  socket (host path), adopt
//!                                                              the client, TookOver
//!                                                              upgrade the client to its
//!                                                              own baton-fs (freeze, RESEND)
//!                               old client exits -> exit 0
//!   `baton status`: another supervisor, one upgrade done
//!   delete P1, status on P2
//! ```
//!
//! API writes per mount: the pod create, the delete of the old pod and the final status
//! patch (plus the Event the handler posts for the request). Everything else goes through
//! the host (the control socket, `baton status`).
//!
//! If the new pod fails before it takes over (its image does not pull, it crashes), it is
//! deleted and the old supervisor, which adopts its client back when the new one did not
//! confirm, serves on: the mount is never left half upgraded. If the new supervisor's
//! upgrade of the client rolls back, the old client serves on under the new supervisor,
//! still inside the old pod (a process belongs to its container), so the old pod is kept
//! until that client ends; the status says so.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use super::executor::{Executor, MountState, UpgradeOutcome};
use super::request::{STATUS_ANNOTATION, UPGRADE_ANNOTATION, UpgradeStatus};
use crate::kube::mountpod::{MountPodConfig, pod_problem};
use crate::volume::BackendId;

/// The flag that makes `baton mount` take a live mount over.
pub const TAKE_OVER_FLAG: &str = "--take-over";
/// Annotation on a new mount pod: the pod it replaces.
pub const REPLACES_ANNOTATION: &str = "baton.dev/replaces";
/// How long the new supervisor may take to upgrade the client once it took over (the
/// bound `baton mount --take-over` puts on that upgrade, plus margin).
const TAKE_OVER_UPGRADE: Duration = Duration::from_secs(90);
/// Between two looks at `baton status` while the new pod takes over.
const POLL: Duration = Duration::from_millis(200);
/// Between two looks at the new pod's status in the API server.
const POD_CHECK: Duration = Duration::from_secs(2);

/// Runs pod upgrades on this node (mount pod mode).
#[derive(Clone)]
pub struct PodUpgrader {
    pub client: kube::Client,
    pub config: MountPodConfig,
}

impl std::fmt::Debug for PodUpgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodUpgrader")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How a pod upgrade of one mount ended, and which pod serves it now.
#[derive(Debug)]
pub struct PodUpgrade {
    pub outcome: UpgradeOutcome,
    /// `namespace/name` of the pod whose supervisor serves the mount, if it changed.
    pub new_pod: Option<String>,
}

fn failed(generation: Option<u64>, reason: impl Into<String>) -> PodUpgrade {
    PodUpgrade {
        outcome: UpgradeOutcome::Failed {
            generation,
            reason: reason.into(),
        },
        new_pod: None,
    }
}

/// Whether `pod` replaced another one that an earlier rolled-back pod upgrade kept.
fn old_kept(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .and_then(|s| UpgradeStatus::from_json(s))
        .is_some_and(|s| s.phase == super::request::Phase::RolledBack)
}

/// The successor of `old`: its spec with `image` and `--take-over`, a new name, the same
/// labels and owner, `status` (if given) as its status annotation.
pub fn successor_pod(old: &Pod, name: &str, image: &str, status: Option<&UpgradeStatus>) -> Pod {
    let mut annotations = old.metadata.annotations.clone().unwrap_or_default();
    annotations.remove(UPGRADE_ANNOTATION);
    if let Some(st) = status {
        annotations.insert(STATUS_ANNOTATION.into(), st.to_json());
    }
    annotations.insert(
        REPLACES_ANNOTATION.into(),
        old.metadata.name.clone().unwrap_or_default(),
    );
    let mut spec = old.spec.clone().unwrap_or_default();
    if let Some(c) = spec.containers.first_mut() {
        c.image = Some(image.to_string());
        let cmd = c.command.get_or_insert_with(Vec::new);
        if !cmd.iter().any(|a| a == TAKE_OVER_FLAG) {
            cmd.push(TAKE_OVER_FLAG.into());
        }
    }
    let meta = json!({
        "name": name,
        "namespace": old.metadata.namespace,
        "labels": old.metadata.labels,
        "annotations": annotations,
        "ownerReferences": old.metadata.owner_references,
    });
    Pod {
        metadata: serde_json::from_value(meta).unwrap_or_default(),
        spec: Some(spec),
        status: None,
    }
}

impl PodUpgrader {
    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Replaces mount pod `pod` (its name) of backend `id`, serving `mountpoint`, by one
    /// of `image`.
    pub async fn upgrade(
        &self,
        executor: &Executor,
        id: &BackendId,
        pod: &str,
        mountpoint: &Path,
        image: &str,
        running: &UpgradeStatus,
    ) -> PodUpgrade {
        let Some(before) = executor.state(mountpoint).await else {
            return failed(None, "no supervisor answers for the mount");
        };
        let g0 = Some(before.generation);
        let old = match self.pods().get_opt(pod).await {
            Ok(Some(p)) => p,
            Ok(None) => return failed(g0, format!("mount pod {pod} does not exist")),
            Err(e) => return failed(g0, crate::error::chain(&e)),
        };
        let current = old
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone());
        if current.as_deref() == Some(image) {
            return PodUpgrade {
                outcome: UpgradeOutcome::Upgraded {
                    generation: before.generation,
                    pause_ms: 0,
                },
                new_pod: None,
            };
        }
        let name = self.config.successor_name(id, image);
        let new = successor_pod(&old, &name, image, Some(running));
        if let Err(e) = self.pods().create(&PostParams::default(), &new).await {
            return failed(
                g0,
                format!(
                    "cannot create the new mount pod: {}",
                    crate::error::chain(&e)
                ),
            );
        }
        let full = format!("{}/{name}", self.config.namespace);
        tracing::info!(pod = %name, %image, "new mount pod created; waiting for it to take over");
        let taken = match self
            .wait_taken_over(executor, &name, mountpoint, &before)
            .await
        {
            Ok(s) => s,
            Err((reason, supervised)) => {
                if supervised {
                    // The new supervisor is in charge: deleting its pod would leave the
                    // client without one. Report, keep both pods.
                    return PodUpgrade {
                        outcome: UpgradeOutcome::Failed {
                            generation: executor.generation(mountpoint).await,
                            reason,
                        },
                        new_pod: Some(full),
                    };
                }
                // Not taken over: remove the new pod; the old supervisor serves on (it
                // took its client back if the new one had asked for it).
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                if let Err(e) = self.pods().delete(&name, &dp).await {
                    tracing::warn!(pod = %name, error = %crate::error::chain(&e), "cannot delete the failed mount pod");
                }
                return failed(executor.generation(mountpoint).await.or(g0), reason);
            }
        };
        if taken.upgrades == 0 {
            let reason = format!(
                "the new mount pod {name} took over but its client did not: {}; the old client serves on, supervised from {name}, and {pod} stays until it ends",
                taken
                    .last_rollback
                    .as_deref()
                    .unwrap_or("the upgrade rolled back")
            );
            return PodUpgrade {
                outcome: UpgradeOutcome::RolledBack {
                    generation: taken.generation,
                    reason,
                },
                new_pod: Some(full),
            };
        }
        // The old client has exited (the new supervisor reaped it before it counted the
        // upgrade), so the old supervisor is exiting: the old pod can go, and so can a pod
        // kept by an earlier rolled-back upgrade (it held the client that just exited).
        let mut done = if old_kept(&old) {
            self.other_pods(id, &name).await
        } else {
            Vec::new()
        };
        if !done.iter().any(|p| p == pod) {
            done.push(pod.to_string());
        }
        for p in done {
            match self.pods().delete(&p, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(pod = %p, "replaced mount pod deleted"),
                Err(e) => {
                    tracing::warn!(pod = %p, error = %crate::error::chain(&e), "cannot delete a replaced mount pod")
                }
            }
        }
        PodUpgrade {
            outcome: UpgradeOutcome::Upgraded {
                generation: taken.generation,
                pause_ms: taken.last_pause_us.unwrap_or(0).div_ceil(1000),
            },
            new_pod: Some(full),
        }
    }

    /// The backend's pods other than `keep`. Once `keep`'s supervisor has moved the
    /// client into its own pod, every other pod of the backend has ended or is ending
    /// (each one's supervisor exits when the client it started or adopted exits).
    async fn other_pods(&self, id: &BackendId, keep: &str) -> Vec<String> {
        let lp = ListParams::default().labels(&self.config.backend_selector(id));
        match self.pods().list_metadata(&lp).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .filter(|n| n != keep)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "cannot list the mount's pods");
                Vec::new()
            }
        }
    }

    /// Waits until another supervisor than `before`'s serves the mount with its first
    /// upgrade finished. `Err((reason, supervised))`: it did not; `supervised` if the new
    /// supervisor is in charge anyway.
    async fn wait_taken_over(
        &self,
        executor: &Executor,
        name: &str,
        mountpoint: &Path,
        before: &MountState,
    ) -> Result<MountState, (String, bool)> {
        let deadline = Instant::now() + self.config.mount_timeout + TAKE_OVER_UPGRADE;
        let mut last_check = Instant::now();
        let mut supervised = false;
        loop {
            tokio::time::sleep(POLL).await;
            if let Some(s) = executor.state(mountpoint).await {
                supervised = s.supervisor_pid != before.supervisor_pid;
                let idle = s.state.as_deref().is_none_or(|st| st == "serving");
                if supervised && idle && s.upgrades + s.rollbacks > 0 {
                    return Ok(s);
                }
            }
            if !supervised && last_check.elapsed() >= POD_CHECK {
                last_check = Instant::now();
                match self.pods().get_opt(name).await {
                    Ok(None) => {
                        return Err((format!("the new mount pod {name} disappeared"), false));
                    }
                    Ok(Some(p)) => {
                        if let Some((_, why)) = pod_problem(&p) {
                            return Err((format!("the new mount pod {name} failed: {why}"), false));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::error::chain(&e), "cannot read the new mount pod");
                    }
                }
            }
            if Instant::now() >= deadline {
                let what = if supervised {
                    "took over but did not finish moving the client"
                } else {
                    "did not take over"
                };
                return Err((
                    format!(
                        "the new mount pod {name} {what} within {:?}",
                        self.config.mount_timeout + TAKE_OVER_UPGRADE
                    ),
                    supervised,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::Phase;
    use super::*;

    #[test]
    fn the_successor_has_the_new_image_take_over_and_no_request() {
        let old: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "baton-mount-aa-bb", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "labels": {"baton.dev/backend": "bb"},
                "annotations": {UPGRADE_ANNOTATION: "pod:img:2", "baton.dev/mountpoint": "/m"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "nu"}],
            },
            "spec": {"nodeName": "n", "hostPID": true, "containers": [{"name": "baton", "image": "img:1",
                "command": ["baton", "mount", "/m"]}]},
            "status": {"phase": "Running"},
        }))
        .expect("pod");
        let running = UpgradeStatus::new(Phase::Running, "pod:img:2", "pod/ns/baton-mount-aa-bb");
        let new = successor_pod(&old, "baton-mount-aa-bb-0a0b0c", "img:2", Some(&running));
        let c = &new.spec.as_ref().expect("spec").containers[0];
        assert_eq!(c.image.as_deref(), Some("img:2"));
        assert_eq!(
            c.command.as_deref().expect("command"),
            ["baton", "mount", "/m", TAKE_OVER_FLAG]
        );
        let a = new.metadata.annotations.as_ref().expect("annotations");
        assert!(!a.contains_key(UPGRADE_ANNOTATION), "{a:?}");
        assert_eq!(a[REPLACES_ANNOTATION], "baton-mount-aa-bb");
        assert_eq!(
            UpgradeStatus::from_json(&a[STATUS_ANNOTATION]).map(|s| s.phase),
            Some(Phase::Running)
        );
        assert_eq!(a["baton.dev/mountpoint"], "/m");
        assert!(new.metadata.uid.is_none() && new.metadata.resource_version.is_none());
        assert!(new.status.is_none());
        assert_eq!(
            new.metadata.owner_references.as_ref().expect("owner")[0].kind,
            "Node"
        );
        // A successor of a successor does not repeat the flag.
        let again = successor_pod(&new, "x", "img:3", None);
        let cmd = again.spec.expect("spec").containers[0]
            .command
            .clone()
            .expect("cmd");
        assert_eq!(cmd.iter().filter(|a| *a == TAKE_OVER_FLAG).count(), 1);
    }
}
