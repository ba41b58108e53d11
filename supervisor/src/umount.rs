//! `baton umount MOUNTPOINT [--lazy]`: ask the mount's supervisor to unmount and stop; if
//! no supervisor answers but the mountpoint is a Baton mount, unmount it directly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use handover_proto::control::{ControlRequest, ControlResponse};

use crate::control::{self, RequestError};
use crate::home::Home;
use crate::mount::{self, UmountError};

/// How long the supervisor may take to unmount and let its client flush.
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(660);

/// How the mount went away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Umounted {
    /// The supervisor unmounted, its client flushed and exited.
    BySupervisor,
    /// No supervisor answered; the mount was removed with umount2(2).
    Directly,
}

/// `baton umount` failed; the mount is unchanged unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum UmountCommandError {
    #[error("{0} is busy (open files or a process working inside it); close them, or use --lazy")]
    Busy(PathBuf),
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    #[error("cannot reach the supervisor of {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: RequestError,
    },
    #[error("the supervisor of {path} refused: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("{path} was unmounted, but its client could not flush or close cleanly: {message}")]
    Flush { path: PathBuf, message: String },
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error("no supervisor answered and unmounting directly failed")]
    Direct(#[source] UmountError),
}

/// The absolute form of `path`, resolved if possible (a mountpoint whose server is gone
/// cannot be resolved: then its lexical absolute form).
pub fn resolve(path: &Path) -> PathBuf {
    match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) if path.is_absolute() => path.to_path_buf(),
        Err(_) => std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Runs `baton umount`.
pub fn umount(home: &Home, mountpoint: &Path, lazy: bool) -> Result<Umounted, UmountCommandError> {
    let mp = resolve(mountpoint);
    match control::request(home, &mp, &ControlRequest::Umount { lazy }, UMOUNT_TIMEOUT) {
        Ok(ControlResponse::Umounted { flush_error: None }) => Ok(Umounted::BySupervisor),
        Ok(ControlResponse::Umounted {
            flush_error: Some(message),
        }) => Err(UmountCommandError::Flush { path: mp, message }),
        Ok(ControlResponse::Busy) => Err(UmountCommandError::Busy(mp)),
        Ok(ControlResponse::Error { message }) => {
            Err(UmountCommandError::Refused { path: mp, message })
        }
        Ok(other) => Err(UmountCommandError::Refused {
            path: mp,
            message: format!("unexpected answer {other:?}"),
        }),
        Err(RequestError::NoSupervisor(_)) => {
            let entry = mount::mount_at(&mp).map_err(UmountCommandError::Mountinfo)?;
            match entry {
                Some(e) if e.fstype == mount::FSTYPE => {
                    tracing::warn!(mountpoint = %mp.display(), "no supervisor answers; unmounting directly");
                    match mount::umount(&mp, lazy) {
                        Ok(()) => Ok(Umounted::Directly),
                        Err(UmountError::Busy(p)) => Err(UmountCommandError::Busy(p)),
                        Err(e) => Err(UmountCommandError::Direct(e)),
                    }
                }
                _ => Err(UmountCommandError::NotMounted(mp)),
            }
        }
        Err(source) => Err(UmountCommandError::Control { path: mp, source }),
    }
}
