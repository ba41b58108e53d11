//! Where a supervisor finds the processes of a mount on this host: the names of the
//! per-mount sockets under `$BATON_HOME/run/`.
//!
//! The CLI, a running supervisor and a client of another release must agree on these
//! names, so they are part of the protocol: the hash is FNV-1a (stable across releases,
//! unlike std's hasher), and a name never changes once released.
//!
//! ```text
//! $BATON_HOME/run/            0700
//!   <mount name>.sock         control socket of the supervisor (0600)
//!   <mount name>.adopt        a client whose supervisor is gone waits here for a new
//!                             one (0600, peer must be root)
//! ```

use std::path::{Path, PathBuf};

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

/// The socket on which a client of `mountpoint` whose supervisor is gone (or asked it to)
/// waits for a new supervisor to adopt it (`ToClient::Adopt`).
pub fn adopt_socket_path(home: &Path, mountpoint: &Path) -> PathBuf {
    home.join("run")
        .join(format!("{}.adopt", mount_name(mountpoint)))
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
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
    fn adopt_socket_sits_beside_the_control_socket() {
        let p = adopt_socket_path(Path::new("/var/lib/baton"), Path::new("/mnt/data"));
        assert_eq!(
            p,
            Path::new("/var/lib/baton/run")
                .join(format!("{}.adopt", mount_name(Path::new("/mnt/data"))))
        );
    }
}
