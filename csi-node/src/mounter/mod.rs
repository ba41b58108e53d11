//! Who runs a backend's FUSE server, so that it outlives `baton-csi`:
//! - [`process::ProcessMounter`]: a detached `baton mount --background` supervisor in its
//!   own session (hosts, tests; in a container it would die with the container);
//! - [`crate::kube::mountpod::PodMounter`]: a mount pod on this node (Kubernetes).

pub mod process;

use std::path::Path;

use crate::baton::BatonError;
use crate::error::{CsiError, chain};
use crate::layout::{BackendRecord, MountMode};
use crate::volume::{BackendId, BackendSpec};

/// Mounting or unmounting a backend failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("baton")]
    Baton(#[from] BatonError),
    #[error("the mount did not appear within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the mount pod failed: {0}")]
    PodFailed(String),
    #[error("the Kubernetes API")]
    Kube(#[source] kube::Error),
    #[error("{0}")]
    Other(String),
}

impl MountError {
    pub fn into_csi(self, step: &str) -> CsiError {
        match &self {
            MountError::Timeout(_) | MountError::Baton(BatonError::Timeout { .. }) => {
                CsiError::DeadlineExceeded(format!("{step}: {}", chain(&self)))
            }
            _ => CsiError::internal(step, &self),
        }
    }
}

/// Starts and stops backends.
pub trait Mounter: Send + Sync + std::fmt::Debug {
    fn mode(&self) -> MountMode;

    /// Mounts `spec` at `mountpoint` (an empty directory) and returns once the mount
    /// serves, with the mount pod's `namespace/name` in pod mode.
    fn mount(&self, spec: &BackendSpec, mountpoint: &Path) -> Result<Option<String>, MountError>;

    /// Unmounts the backend at `mountpoint` and stops its server. Returns once nothing is
    /// mounted there.
    fn unmount(
        &self,
        id: &BackendId,
        record: Option<&BackendRecord>,
        mountpoint: &Path,
    ) -> Result<(), MountError>;

    /// Makes sure something will serve the mounted backend `id` once what serves it now
    /// goes away: in pod mode, when every mount pod of the backend is being deleted (an
    /// eviction, a `kubectl delete`) or gone, a new one takes the mount over. Returns the
    /// new mount pod (`namespace/name`) if one was started.
    fn ensure_served(
        &self,
        _id: &BackendId,
        _record: &BackendRecord,
        _mountpoint: &Path,
    ) -> Result<Option<String>, MountError> {
        Ok(None)
    }

    /// Backends whose server this mounter runs on the node, mounted or not (mount pods of
    /// this node): what a restarted plugin must check besides the mount table.
    fn instances(&self) -> Result<Vec<BackendId>, MountError> {
        Ok(Vec::new())
    }
}
