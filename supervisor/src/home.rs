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

/// A file name for things that belong to one mountpoint (control socket, log): a readable
/// part from the last component and a hash of the whole path, so that two mountpoints
/// never share a name and the name stays short (a Unix socket path has 107 bytes).
pub fn mount_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let last = mountpoint
        .file_name()
        .map(|n| n.as_bytes())
        .unwrap_or(b"root");
    let readable: String = last
        .iter()
        .take(32)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                b as char
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{readable}-{:016x}",
        fnv1a64(mountpoint.as_os_str().as_bytes())
    )
}

/// FNV-1a, 64 bits: stable across releases (unlike std's hasher), which matters because
/// the CLI and a running supervisor may be different builds.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_names_are_distinct_short_and_stable() {
        let a = mount_name(Path::new("/mnt/data"));
        let b = mount_name(Path::new("/srv/data"));
        assert_ne!(a, b);
        assert!(a.starts_with("data-"));
        assert_eq!(a, mount_name(Path::new("/mnt/data")));
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let long = mount_name(Path::new(&format!("/mnt/{}", "x y".repeat(100))));
        assert!(long.len() <= 32 + 17);
        assert!(!long.contains(' '));
        assert!(mount_name(Path::new("/")).starts_with("root-"));
    }

    #[test]
    fn default_urls() {
        let h = Home::new(PathBuf::from("/var/lib/baton"));
        assert_eq!(h.default_meta_url("v"), "redb:///var/lib/baton/v/meta.redb");
        assert_eq!(h.default_storage_url("v"), "fs:///var/lib/baton/v/data");
    }
}
