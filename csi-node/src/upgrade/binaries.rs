//! Client binaries on the node, without the API server: `baton-csi`'s image carries them
//! under a versioned directory (`--client-binaries-dir`, e.g. `/opt/baton/clients/<version>/
//! baton-fs`); at start baton-csi copies every version it carries into the state
//! directory (`<state>/bin/<version>/baton-fs`), a host path that every mount pod sees at
//! the same path, so a mount pod's supervisor can run a binary it was not built with.
//!
//! A copy is made under a temporary name, synced and renamed, so a supervisor never
//! starts a half-written binary; a version already present is left alone (versions are
//! immutable: a different build must have a different version).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::request::Version;

/// The client binary's file name inside a version directory.
pub const CLIENT_BINARY: &str = "baton-fs";

/// Installing or finding a client binary failed.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("client version {version} is not on this node (no {path})")]
    Missing { version: Version, path: PathBuf },
    #[error("cannot install client {version} into {path}")]
    Install {
        version: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `<state>/bin`: one directory per client version.
#[derive(Clone, Debug)]
pub struct BinaryStore {
    root: PathBuf,
}

impl BinaryStore {
    pub fn new(root: PathBuf) -> BinaryStore {
        BinaryStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `version`'s client binary, if it is installed (a regular, executable
    /// file).
    pub fn client(&self, version: &Version) -> Result<PathBuf, BinaryError> {
        let path = self.root.join(version.as_str()).join(CLIENT_BINARY);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(path),
            _ => Err(BinaryError::Missing {
                version: version.clone(),
                path,
            }),
        }
    }

    /// Copies every `<source>/<version>/baton-fs` not yet installed; returns the versions
    /// installed now. Directories whose name is not a valid version are skipped.
    pub fn install_from(&self, source: &Path) -> Result<Vec<Version>, BinaryError> {
        let mut installed = Vec::new();
        let Ok(entries) = std::fs::read_dir(source) else {
            tracing::warn!(dir = %source.display(), "no client binaries to install");
            return Ok(installed);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(version) = Version::parse(&name) else {
                tracing::warn!(dir = %e.path().display(), "not a client version directory; skipped");
                continue;
            };
            let from = e.path().join(CLIENT_BINARY);
            if !from.is_file() || self.client(&version).is_ok() {
                continue;
            }
            self.install(&version, &from)?;
            installed.push(version);
        }
        installed.sort();
        Ok(installed)
    }

    /// Installs `from` as `version`'s client binary.
    pub fn install(&self, version: &Version, from: &Path) -> Result<PathBuf, BinaryError> {
        let dir = self.root.join(version.as_str());
        let path = dir.join(CLIENT_BINARY);
        let err = |source| BinaryError::Install {
            version: version.to_string(),
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(err)?;
        let tmp = dir.join(format!(".{CLIENT_BINARY}.tmp"));
        std::fs::copy(from, &tmp).map_err(err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        tracing::info!(version = %version, path = %path.display(), "client binary installed");
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_versions_once_and_finds_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("image");
        for v in ["0.2.0", "../evil", ".hidden"] {
            let d = src.join(v);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join(CLIENT_BINARY), b"#!/bin/sh\n").expect("write");
        }
        std::fs::create_dir_all(src.join("0.3.0")).expect("an empty version dir");
        let store = BinaryStore::new(dir.path().join("bin"));
        let v = Version::parse("0.2.0").expect("version");
        assert!(matches!(store.client(&v), Err(BinaryError::Missing { .. })));
        assert_eq!(store.install_from(&src).expect("install"), vec![v.clone()]);
        let path = store.client(&v).expect("installed");
        assert_eq!(std::fs::read(&path).expect("read"), b"#!/bin/sh\n");
        // Already there: not copied again.
        assert!(store.install_from(&src).expect("again").is_empty());
        let missing = Version::parse("0.3.0").expect("version");
        assert!(store.client(&missing).is_err());
    }
}
