//! Kubernetes for tests, for real where it matters:
//! - [`KubeCluster`]: etcd and kube-apiserver (v1.20, built from Debian's source package by
//!   `scripts/k8s-test-deps.sh`) on free loopback ports, with RBAC and static-token users,
//!   in a temporary directory; killed and reaped on drop.
//! - [`FakeKubelet`]: no kubelet runs here, so this plays one for the pods bound to one
//!   node name: it runs their first container's command as a local process (host paths:
//!   `hostPath` volumes are mounted at their own path, or translated), reports their
//!   status, restarts them per `restartPolicy`, and stops them (SIGTERM, then SIGKILL after
//!   the grace period) when they are deleted, then removes the pod object like a kubelet.
//! - [`render_chart`]: `helm template`, with `helm` if installed, else Helm's own engine
//!   through the helm-python-sdk wheel.
//!
//! Nothing here touches a cluster it did not start.

mod cluster;
mod helm;
mod kubelet;

pub use cluster::{
    ADMIN_TOKEN, DEFAULT_CACHE, KUBE_VERSION, KubeCluster, User, apiserver_bin, apply_all,
    create_service_account, etcd_bin,
};
pub use helm::{parse_manifests, render_chart};
pub use kubelet::{FakeKubelet, KubeletConfig};
