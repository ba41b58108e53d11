//! Kubernetes-triggered upgrades of the mounts on this node (docs/kubernetes.md,
//! *Upgrades*): `baton.dev/upgrade=binary:<version>` on a mount pod, a PersistentVolume
//! (every mount of it on this node) or the Node (every mount on it) replaces the client
//! binary of those mounts through their supervisors' control sockets, with the binary
//! taken from the node (`<state>/bin/<version>/`), never through the API server and never
//! by `kubectl exec`.
//!
//! - [`request`]: the annotation grammar and the status value (pure);
//! - [`binaries`]: client binaries copied from baton-csi's image into the state directory;
//! - [`executor`]: `baton upgrade` / `baton status` against one mount;
//! - [`watch`]: the node's narrowed, metadata-only watches;
//! - [`pod`]: pod upgrades (`pod:<image>`), a new mount pod taking the mount over;
//! - [`handle`]: from an annotation to upgraded mounts, statuses and Events;
//! - [`evicted`]: mount pods deleted while in use are replaced.
//!
//! It must never leave a mount half upgraded (the supervisor commits or rolls back), nor
//! panic on what another process wrote in an annotation.

pub mod binaries;
pub mod evicted;
pub mod executor;
pub mod handle;
pub mod pod;
pub mod request;
pub mod slots;
pub mod watch;

use tokio::sync::mpsc;

/// How often requests already seen are looked at again, for mounts that were not mounted
/// yet when the request arrived (a request answered once, even by a failure, is not
/// retried until its value changes). Costs no API request: the answers are local records.
pub const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the watches until the process ends: upgrade requests go to `handler`, one at a
/// time; with `replacements` (mount pod mode), backends whose mount pods are all being
/// deleted get a replacement at once ([`evicted`]), whatever upgrade is in progress.
pub async fn run(
    client: kube::Client,
    cfg: watch::WatchConfig,
    handler: handle::Handler,
    replacements: Option<evicted::Replacements>,
) {
    let mut rx = watch::start(&client, &cfg);
    let (to_handler, requests) = mpsc::unbounded_channel();
    tokio::spawn(handle_requests(handler, requests));
    let in_use = replacements
        .as_ref()
        .map(|r| r.in_use.clone())
        .unwrap_or_default();
    let orphans = replacements.map(|r| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(evicted::run(rx, r.ensure));
        tx
    });
    let mut tracker = evicted::PodTracker::default();
    let settle = tokio::time::sleep(evicted::STARTUP_SETTLE);
    let mut settle = std::pin::pin!(settle);
    let mut settled = false;
    loop {
        tokio::select! {
            seen = rx.recv() => {
                let Some(seen) = seen else { return };
                if let Some(tx) = &orphans
                    && let Some(id) = tracker.update(&seen)
                {
                    let _ = tx.send(id);
                }
                if to_handler.send(seen).is_err() {
                    return;
                }
            }
            () = &mut settle, if !settled => {
                settled = true;
                if let Some(tx) = &orphans {
                    for id in tracker.unseen(&in_use) {
                        let _ = tx.send(id.clone());
                    }
                }
            }
        }
    }
}

/// Handles what the watches saw, one request at a time.
async fn handle_requests(handler: handle::Handler, mut rx: mpsc::UnboundedReceiver<watch::Seen>) {
    // The latest state of every object seen with an upgrade request.
    let mut requests: std::collections::BTreeMap<String, watch::Seen> =
        std::collections::BTreeMap::new();
    let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            seen = rx.recv() => {
                let Some(seen) = seen else { return };
                if seen.exists && seen.annotations.contains_key(request::UPGRADE_ANNOTATION) {
                    requests.insert(seen.source(), seen.clone());
                } else {
                    requests.remove(&seen.source());
                }
                handler.handle(&seen).await;
            }
            _ = recheck.tick() => {
                for seen in requests.values() {
                    handler.handle(seen).await;
                }
            }
        }
    }
}
