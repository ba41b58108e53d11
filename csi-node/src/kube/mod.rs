//! The Kubernetes side of baton-csi: the API client and mount pods. Every request of a
//! node plugin is narrowed to its own node (a field selector on `spec.nodeName` for pods,
//! a label for the secrets it made), so that a cluster of thousands of nodes costs the API
//! server one small request per node, not a cluster-wide list.

pub mod counting;
pub mod mountpod;

/// A client from the in-cluster service account, or `$KUBECONFIG` / `~/.kube/config`.
pub async fn client() -> Result<::kube::Client, ::kube::Error> {
    ::kube::Client::try_default().await
}
