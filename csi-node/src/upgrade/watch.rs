//! The node's watches: three metadata-only streams, each narrowed to what this node may
//! have to act on (docs/kubernetes.md, *Upgrades*):
//!
//! - mount pods: `fieldSelector=spec.nodeName=<node>` and the mount pod labels with this
//!   node's hash, in the driver's namespace;
//! - its own Node: `fieldSelector=metadata.name=<node>`;
//! - PersistentVolumes: the API server has no field selector on `spec.csi.driver`, so the
//!   stream is narrowed in what it carries (metadata only: name, labels, annotations — no
//!   spec, no status) and, if set, by `--pv-label-selector`; baton-csi then ignores every
//!   PV that none of its published targets uses.
//!
//! Each stream starts with `resourceVersion=0` (the API server's watch cache answers with
//! the current objects as ADDED events: no `list` needed, so RBAC grants only `watch`),
//! resumes from the last version it saw, and starts over on `410 Gone`.

use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::{Api, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

/// The kind of object that carried an annotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    PersistentVolume,
    Node,
}

/// What a watch saw: one object's identity and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// False for a DELETED event.
    pub exists: bool,
    /// The object is being deleted (it has a deletion timestamp).
    pub deleting: bool,
}

impl Seen {
    /// `pod/<ns>/<name>`, `pv/<name>` or `node/<name>`.
    pub fn source(&self) -> String {
        match self.kind {
            Kind::Pod => format!(
                "pod/{}/{}",
                self.namespace.as_deref().unwrap_or_default(),
                self.name
            ),
            Kind::PersistentVolume => format!("pv/{}", self.name),
            Kind::Node => format!("node/{}", self.name),
        }
    }
}

/// What to watch.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    pub namespace: String,
    pub node_name: String,
    /// Label selector of this node's mount pods.
    pub mount_pod_labels: String,
    /// Optional label selector narrowing the PV stream.
    pub pv_labels: Option<String>,
}

fn seen<K>(kind: Kind, m: &PartialObjectMeta<K>, exists: bool) -> Seen {
    let md = &m.metadata;
    Seen {
        kind,
        namespace: md.namespace.clone(),
        name: md.name.clone().unwrap_or_default(),
        uid: md.uid.clone().unwrap_or_default(),
        labels: md.labels.clone().unwrap_or_default(),
        annotations: md.annotations.clone().unwrap_or_default(),
        exists,
        deleting: md.deletion_timestamp.is_some(),
    }
}

/// Watches `api` with `wp` forever, sending what it sees to `tx`; returns when `tx` is
/// closed.
async fn watch_one<K>(api: Api<K>, wp: WatchParams, kind: Kind, tx: mpsc::Sender<Seen>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut version = "0".to_string();
    // Backs off up to a minute while the API server refuses or is away, so a thousand
    // nodes do not hammer it.
    let mut backoff = Duration::from_secs(1);
    loop {
        let stream = match api.watch_metadata(&wp, &version).await {
            Ok(s) => {
                backoff = Duration::from_secs(1);
                s
            }
            Err(e) => {
                tracing::warn!(?kind, error = %crate::error::chain(&e), retry_in = ?backoff, "watch failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let s = match ev {
                Ok(WatchEvent::Added(m)) | Ok(WatchEvent::Modified(m)) => {
                    if let Some(v) = &m.metadata.resource_version {
                        version.clone_from(v);
                    }
                    seen(kind, &m, true)
                }
                Ok(WatchEvent::Deleted(m)) => {
                    if let Some(v) = &m.metadata.resource_version {
                        version.clone_from(v);
                    }
                    seen(kind, &m, false)
                }
                Ok(WatchEvent::Bookmark(b)) => {
                    version = b.metadata.resource_version;
                    continue;
                }
                Ok(WatchEvent::Error(e)) => {
                    if e.code == 410 {
                        // Too old: start over from the current state.
                        version = "0".into();
                    } else {
                        tracing::warn!(?kind, code = e.code, message = %e.message, "watch error");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(?kind, error = %crate::error::chain(&e), "watch stream failed");
                    break;
                }
            };
            if tx.send(s).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts the three watches; what they see arrives on the returned channel.
pub fn start(client: &kube::Client, cfg: &WatchConfig) -> mpsc::Receiver<Seen> {
    let (tx, rx) = mpsc::channel(256);
    let pods = WatchParams::default()
        .fields(&format!("spec.nodeName={}", cfg.node_name))
        .labels(&cfg.mount_pod_labels)
        .timeout(290);
    tokio::spawn(watch_one(
        Api::<Pod>::namespaced(client.clone(), &cfg.namespace),
        pods,
        Kind::Pod,
        tx.clone(),
    ));
    let node = WatchParams::default()
        .fields(&format!("metadata.name={}", cfg.node_name))
        .timeout(290);
    tokio::spawn(watch_one(
        Api::<Node>::all(client.clone()),
        node,
        Kind::Node,
        tx.clone(),
    ));
    let mut pvs = WatchParams::default().timeout(290);
    if let Some(l) = &cfg.pv_labels {
        pvs = pvs.labels(l);
    }
    tokio::spawn(watch_one(
        Api::<PersistentVolume>::all(client.clone()),
        pvs,
        Kind::PersistentVolume,
        tx,
    ));
    rx
}
