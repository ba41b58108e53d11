//! The syscalls of publishing: bind mounts, unmounts, statvfs.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

/// Bind-mounts `source` at `target`, read-only if asked. The FUSE mount's `nosuid` and
/// `nodev` are kept on the bind.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), Errno> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    if readonly {
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            // Never leave a writable bind behind a failed read-only publish.
            let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
            return Err(e);
        }
    }
    Ok(())
}

/// How an unmount went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    Cleanly,
    /// It was busy and was detached (MNT_DETACH): gone from the tree, freed when unused.
    Detached,
    /// Nothing was mounted there.
    NotMounted,
}

/// Unmounts `target`; a busy mount is detached.
pub fn unmount(target: &Path) -> Result<Unmounted, Errno> {
    match nix::mount::umount2(target, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Cleanly),
        Err(Errno::EBUSY) => {
            nix::mount::umount2(target, MntFlags::MNT_DETACH).map(|()| Unmounted::Detached)
        }
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(Unmounted::NotMounted),
        Err(e) => Err(e),
    }
}

/// Detaches `target` whatever its state (a FUSE mount whose server is gone).
pub fn detach(target: &Path) -> Result<(), Errno> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Usage of the filesystem at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

pub fn usage(path: &Path) -> Result<Usage, Errno> {
    let s = nix::sys::statvfs::statvfs(path)?;
    let frsize = s.fragment_size() as u64;
    let blocks = s.blocks() as u64;
    let free = s.blocks_free() as u64;
    let avail = s.blocks_available() as u64;
    Ok(Usage {
        total_bytes: blocks.saturating_mul(frsize),
        available_bytes: avail.saturating_mul(frsize),
        used_bytes: blocks.saturating_sub(free).saturating_mul(frsize),
        total_inodes: s.files() as u64,
        free_inodes: s.files_free() as u64,
    })
}

/// Whether the FUSE server behind `path` answers: a mount whose server died answers
/// ENOTCONN (or ECONNABORTED) to everything.
pub fn is_alive(path: &Path) -> bool {
    !matches!(
        nix::sys::statvfs::statvfs(path),
        Err(Errno::ENOTCONN | Errno::ECONNABORTED)
    )
}
