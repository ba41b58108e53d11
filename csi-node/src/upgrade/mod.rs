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
//! - [`handle`]: from an annotation to upgraded mounts, statuses and Events.
//!
//! It must never leave a mount half upgraded (the supervisor commits or rolls back), nor
//! panic on what another process wrote in an annotation.

pub mod binaries;
pub mod executor;
pub mod handle;
pub mod pod;
pub mod request;
pub mod slots;
pub mod watch;

/// How often requests already seen are looked at again, for mounts that were not mounted
/// yet when the request arrived (a request answered once, even by a failure, is not
/// retried until its value changes). Costs no API request: the answers are local records.
pub const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the watches and handles what they see, one request at a time, until the process
/// ends.
pub async fn run(client: kube::Client, cfg: watch::WatchConfig, handler: handle::Handler) {
    let mut rx = watch::start(&client, &cfg);
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
