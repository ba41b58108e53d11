//! The node's state directory (`--state-dir`, default `/var/lib/baton-csi`, a host path
//! shared with the mount pods at the same path) and the small records kept in it:
//!
//! ```text
//! /var/lib/baton-csi/
//!   mnt/<backend>/          the Baton mount of one backend (0700 parent: only root walks in)
//!   backends/<backend>.json how that mount was made (mode, mount pod) — no secrets
//!   targets/<hash>.json     one per published target path: volume id, backend, subdir,
//!                           read-only, capability — to answer a repeated publish exactly
//!   home/                   BATON_HOME of every supervisor on the node: run/ (control
//!                           sockets), log/, cache/
//! ```
//!
//! The records are hints for idempotency and cleanup: what is mounted, and how many users
//! a backend has, is always read from /proc/self/mountinfo.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

use crate::volume::BackendId;

/// How a backend's FUSE server runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountMode {
    /// A detached `baton mount --background` supervisor in its own session.
    Process,
    /// A mount pod on this node, created through the API server.
    Pod,
}

/// How a backend was mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRecord {
    pub id: BackendId,
    pub mode: MountMode,
    /// `namespace/name` of the mount pod (pod mode).
    pub pod: Option<String>,
    /// Mount options given to `baton mount` (no secrets).
    pub options: Vec<String>,
    pub created_unix: u64,
    /// The image a pod upgrade moved the mount to (pod mode; `None`: the configured
    /// mount image). A mount pod deleted outright is replaced by one of this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A published target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    pub volume_id: String,
    pub target: PathBuf,
    pub backend: BackendId,
    /// Relative to the volume root; empty for the whole volume.
    pub subdir: String,
    pub readonly: bool,
    /// `VolumeCapability.AccessMode.Mode`.
    pub access_mode: i32,
    pub fs_type: String,
    pub mount_flags: Vec<String>,
}

/// A record file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid record")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Layout {
        Layout { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Parent of every backend mountpoint.
    pub fn mnt_dir(&self) -> PathBuf {
        self.root.join("mnt")
    }

    pub fn backend_mountpoint(&self, id: &BackendId) -> PathBuf {
        self.mnt_dir().join(id.as_str())
    }

    pub fn backends_dir(&self) -> PathBuf {
        self.root.join("backends")
    }

    pub fn backend_record(&self, id: &BackendId) -> PathBuf {
        self.backends_dir().join(format!("{}.json", id.as_str()))
    }

    pub fn targets_dir(&self) -> PathBuf {
        self.root.join("targets")
    }

    /// The record of `target`, named by a hash of the path.
    pub fn target_record(&self, target: &Path) -> PathBuf {
        let digest = Sha256::digest(target.as_os_str().as_encoded_bytes());
        self.targets_dir()
            .join(format!("{}.json", hex(&digest[..16])))
    }

    /// `BATON_HOME` of the node's supervisors.
    pub fn baton_home(&self) -> PathBuf {
        self.root.join("home")
    }

    /// Creates the directories (mnt/ and home/ only for root: they lead into volumes and
    /// control sockets).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for (dir, mode) in [
            (self.root.clone(), 0o755),
            (self.mnt_dir(), 0o700),
            (self.backends_dir(), 0o700),
            (self.targets_dir(), 0o700),
            (self.baton_home(), 0o700),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&dir)?;
        }
        Ok(())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `value` as JSON to `path` atomically (temporary file, fsync, rename).
pub fn write_record<T: Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let err = |source| RecordError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| err(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads a JSON record; `None` if there is none.
pub fn read_record<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, RecordError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| RecordError::Decode {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecordError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Removes a record; a missing one is fine.
pub fn remove_record(path: &Path) -> Result<(), RecordError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Every record in `dir` (unreadable ones are skipped with a warning).
pub fn list_records<T: DeserializeOwned>(dir: &Path) -> Vec<(PathBuf, T)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match read_record::<T>(&path) {
            Ok(Some(r)) => out.push((path, r)),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %crate::error::chain(&e), "skipping a record"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path().to_path_buf());
        layout.create().expect("create");
        let rec = TargetRecord {
            volume_id: "v1".into(),
            target: "/t".into(),
            backend: BackendId::from_hex("0123456789abcdef0123").expect("id"),
            subdir: "a/b".into(),
            readonly: true,
            access_mode: 1,
            fs_type: String::new(),
            mount_flags: vec![],
        };
        let p = layout.target_record(Path::new("/t"));
        assert!(read_record::<TargetRecord>(&p).expect("read").is_none());
        write_record(&p, &rec).expect("write");
        assert_eq!(read_record::<TargetRecord>(&p).expect("read"), Some(rec));
        assert_eq!(list_records::<TargetRecord>(&layout.targets_dir()).len(), 1);
        remove_record(&p).expect("remove");
        remove_record(&p).expect("remove twice");
        assert_ne!(
            layout.target_record(Path::new("/t")),
            layout.target_record(Path::new("/u"))
        );
    }
}
