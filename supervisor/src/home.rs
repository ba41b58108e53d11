//! Baton's data directory (`$BATON_HOME`, default `/var/lib/baton`) and what lives in it:
//!
//! ```text
//! $BATON_HOME/
//!   NAME/meta.redb   NAME/data/   an embedded volume (redb metadata, local object storage)
//!   run/             control sockets, one per mount (0700)
//!   log/             logs of background supervisors (0700)
//!   cache/           block caches of the clients
//! ```

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The environment variable naming the data directory.
pub const HOME_ENV: &str = "BATON_HOME";
/// The data directory when [`HOME_ENV`] is not set.
pub const DEFAULT_HOME: &str = "/var/lib/baton";
/// The volume `baton mount` uses without `--meta`.
pub const DEFAULT_VOLUME: &str = "default";

/// A directory could not be created with the wanted mode.
#[derive(Debug, thiserror::Error)]
#[error("cannot create directory {path}")]
pub struct DirError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home(PathBuf);

impl Home {
    /// `$BATON_HOME` (made absolute), or [`DEFAULT_HOME`].
    pub fn from_env() -> Home {
        match std::env::var_os(HOME_ENV) {
            Some(p) if !p.is_empty() => Home::new(PathBuf::from(p)),
            _ => Home(PathBuf::from(DEFAULT_HOME)),
        }
    }

    pub fn new(path: PathBuf) -> Home {
        if path.is_absolute() {
            Home(path)
        } else {
            Home(
                std::env::current_dir()
                    .map(|d| d.join(&path))
                    .unwrap_or(path),
            )
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Directory of the control sockets.
    pub fn run_dir(&self) -> PathBuf {
        self.0.join("run")
    }

    /// Directory of background supervisors' logs.
    pub fn log_dir(&self) -> PathBuf {
        self.0.join("log")
    }

    /// Directory of an embedded volume.
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Metadata URL of an embedded volume: `redb://$BATON_HOME/NAME/meta.redb`.
    pub fn default_meta_url(&self, name: &str) -> String {
        format!(
            "redb://{}",
            self.volume_dir(name).join("meta.redb").display()
        )
    }

    /// Storage URL of an embedded volume: `fs://$BATON_HOME/NAME/data`.
    pub fn default_storage_url(&self, name: &str) -> String {
        format!("fs://{}", self.volume_dir(name).join("data").display())
    }
}

/// Creates `path` (and parents) and makes it mode `mode` exactly.
pub fn private_dir(path: &Path, mode: u32) -> Result<(), DirError> {
    let err = |source| DirError {
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

pub use handover_proto::rendezvous::mount_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_urls() {
        let h = Home::new(PathBuf::from("/var/lib/baton"));
        assert_eq!(h.default_meta_url("v"), "redb:///var/lib/baton/v/meta.redb");
        assert_eq!(h.default_storage_url("v"), "fs:///var/lib/baton/v/data");
    }
}
