//! Process mode: each backend is served by a detached `baton` supervisor (`baton mount
//! --background` starts it in a new session, logging to `$BATON_HOME/log/`), so killing or
//! restarting `baton-csi` leaves the mount serving.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{MountError, Mounter};
use crate::baton::{Baton, UmountOutcome};
use crate::layout::{BackendRecord, MountMode};
use crate::mountinfo::MountTable;
use crate::sys;
use crate::volume::{BackendId, BackendSpec};

#[derive(Debug, Clone)]
pub struct ProcessMounter {
    pub baton: Baton,
    /// Bounds `baton mount` (connecting to the metadata engine, the first mount).
    pub mount_timeout: Duration,
}

/// Waits until `path` is unmounted (a supervisor may unmount just after answering).
pub(crate) fn wait_unmounted(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match MountTable::read() {
            Ok(t) if t.at(path).is_none() => return true,
            _ if Instant::now() >= deadline => return false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Unmounts a backend through its supervisor (`baton umount`, lazily if busy), and
/// detaches it directly if that did not work.
pub(crate) fn unmount_backend(
    baton: &Baton,
    id: &BackendId,
    mountpoint: &Path,
) -> Result<(), MountError> {
    let timeout = Duration::from_secs(120);
    let outcome = match baton.umount(mountpoint, false, timeout)? {
        UmountOutcome::Busy => {
            tracing::warn!(backend = %id, "backend mount busy; detaching it");
            baton.umount(mountpoint, true, timeout)?
        }
        other => other,
    };
    tracing::info!(backend = %id, ?outcome, "backend unmounted");
    if !wait_unmounted(mountpoint, Duration::from_secs(10)) {
        tracing::warn!(backend = %id, "still mounted after baton umount; detaching");
        sys::detach(mountpoint)
            .map_err(|e| MountError::Other(format!("detaching the backend: {e}")))?;
    }
    Ok(())
}

impl Mounter for ProcessMounter {
    fn mode(&self) -> MountMode {
        MountMode::Process
    }

    fn mount(&self, spec: &BackendSpec, mountpoint: &Path) -> Result<Option<String>, MountError> {
        self.baton.mount_background(
            mountpoint,
            &spec.secrets,
            &spec.options,
            self.mount_timeout,
        )?;
        Ok(None)
    }

    fn unmount(
        &self,
        id: &BackendId,
        _record: Option<&BackendRecord>,
        mountpoint: &Path,
    ) -> Result<(), MountError> {
        let mounted = MountTable::read()
            .map(|t| t.at(mountpoint).is_some())
            .unwrap_or(true);
        if !mounted {
            return Ok(());
        }
        unmount_backend(&self.baton, id, mountpoint)
    }
}
