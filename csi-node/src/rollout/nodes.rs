//! The selected Nodes' upgrade statuses as the rollout command follows them: one
//! metadata-only `list` to start, then one metadata-only watch that carries only the Nodes
//! that change (their baton-csi writing `baton.dev/upgrade-status`), instead of listing
//! every selected Node at each poll. The watch resumes from the last version it saw and
//! starts over with a `list` when the API server says that version is too old (410).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use tokio_stream::{Stream, StreamExt};

use super::plan::NodeProgress;
use crate::upgrade::request::{STATUS_ANNOTATION, UpgradeStatus};

type Events =
    Pin<Box<dyn Stream<Item = Result<WatchEvent<PartialObjectMeta<Node>>, kube::Error>> + Send>>;

/// The selected Nodes and their upgrade statuses, kept current.
pub struct NodeWatch {
    api: Api<Node>,
    selector: Option<String>,
    version: String,
    statuses: BTreeMap<String, Option<UpgradeStatus>>,
    events: Option<Events>,
}

impl std::fmt::Debug for NodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWatch")
            .field("selector", &self.selector)
            .field("version", &self.version)
            .field("nodes", &self.statuses.len())
            .finish_non_exhaustive()
    }
}

fn status_of(m: &PartialObjectMeta<Node>) -> Option<UpgradeStatus> {
    m.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .and_then(|s| UpgradeStatus::from_json(s))
}

impl NodeWatch {
    /// Lists the Nodes `selector` selects (every Node without one).
    pub async fn start(client: kube::Client, selector: Option<&str>) -> Result<Self, kube::Error> {
        let mut w = NodeWatch {
            api: Api::all(client),
            selector: selector.map(str::to_string),
            version: String::new(),
            statuses: BTreeMap::new(),
            events: None,
        };
        w.relist().await?;
        Ok(w)
    }

    async fn relist(&mut self) -> Result<(), kube::Error> {
        let mut lp = ListParams::default();
        if let Some(s) = &self.selector {
            lp = lp.labels(s);
        }
        let list = self.api.list_metadata(&lp).await?;
        self.version = list.metadata.resource_version.unwrap_or_default();
        self.statuses = list
            .items
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, status_of(n))))
            .collect();
        self.events = None;
        Ok(())
    }

    /// Each selected Node's progress towards `target`.
    pub fn progress(&self, target: &str) -> BTreeMap<String, NodeProgress> {
        self.statuses
            .iter()
            .map(|(name, st)| (name.clone(), NodeProgress::of(name, target, st.as_ref())))
            .collect()
    }

    /// Applies what changes within `wait`; returns early, once the changes that have
    /// arrived are applied, if there are any. Watch failures are retried here (a failed
    /// re-list is the only error).
    pub async fn follow(&mut self, wait: Duration) -> Result<(), kube::Error> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = false;
        loop {
            let events = match &mut self.events {
                Some(e) => e,
                None => {
                    let mut wp = WatchParams::default().timeout(290);
                    if let Some(s) = &self.selector {
                        wp = wp.labels(s);
                    }
                    match self.api.watch_metadata(&wp, &self.version).await {
                        Ok(s) => self.events.insert(Box::pin(s)),
                        Err(e) => {
                            tracing::warn!(error = %crate::error::chain(&e), "cannot watch the nodes; retrying");
                            tokio::time::sleep_until(deadline).await;
                            return Ok(());
                        }
                    }
                }
            };
            // Once something changed, only what is already there is taken.
            let next = if changed {
                tokio::time::timeout(Duration::ZERO, events.next()).await
            } else {
                tokio::time::timeout_at(deadline, events.next()).await
            };
            let ev = match next {
                Err(_) => return Ok(()),
                // The API server ended the watch (its timeout): open another.
                Ok(None) => {
                    self.events = None;
                    continue;
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %crate::error::chain(&e), "the node watch failed; reopening it");
                    self.events = None;
                    continue;
                }
                Ok(Some(Ok(ev))) => ev,
            };
            match ev {
                WatchEvent::Added(m) | WatchEvent::Modified(m) => {
                    if let Some(v) = &m.metadata.resource_version {
                        self.version.clone_from(v);
                    }
                    if let Some(name) = m.metadata.name.clone() {
                        self.statuses.insert(name, status_of(&m));
                        changed = true;
                    }
                }
                WatchEvent::Deleted(m) => {
                    if let Some(v) = &m.metadata.resource_version {
                        self.version.clone_from(v);
                    }
                    if let Some(name) = &m.metadata.name {
                        self.statuses.remove(name);
                        changed = true;
                    }
                }
                WatchEvent::Bookmark(b) => self.version = b.metadata.resource_version,
                WatchEvent::Error(e) if e.code == 410 => {
                    // Too old: start over from the current state.
                    self.relist().await?;
                    changed = true;
                }
                WatchEvent::Error(e) => {
                    tracing::warn!(code = e.code, message = %e.message, "node watch error; reopening it");
                    self.events = None;
                }
            }
        }
    }
}
