//! Asking the kernel whether it still has an inode: `FUSE_NOTIFY_INVAL_INODE` with no
//! data range fails with ENOENT when the inode is not in the kernel's inode cache, and
//! otherwise only makes the kernel fetch its attributes again.
//!
//! A client that took over after a crash uses it once for the open-but-unlinked files it
//! inherited: the kernel frees an inode only after its last descriptor is closed, so one
//! it no longer has can be freed here too — also when the FORGET that said so was read by
//! the dead client and lost. (fuser's notifier treats ENOENT as success, hence the raw
//! write.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use handover_proto::fuse_init::OUT_HEADER_LEN;

use crate::meta::Ino;

/// `fuse_notify_code::FUSE_NOTIFY_INVAL_INODE`.
const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
/// `fuse_out_header` + `fuse_notify_inval_inode_out { ino: u64, off: i64, len: i64 }`.
const MESSAGE_LEN: usize = OUT_HEADER_LEN + 24;

/// A close-on-exec descriptor of the FUSE connection, for inode probes.
#[derive(Debug)]
pub struct KernelInodes {
    fuse: OwnedFd,
}

impl KernelInodes {
    /// Keeps its own descriptor of the connection `fuse` (F_DUPFD_CLOEXEC).
    pub fn new(fuse: BorrowedFd<'_>) -> io::Result<KernelInodes> {
        Ok(KernelInodes {
            fuse: fuse.try_clone_to_owned()?,
        })
    }

    /// Whether the kernel has `ino` in its inode cache (and so may have it open).
    pub fn holds(&self, ino: Ino) -> io::Result<bool> {
        let msg = message(ino);
        // SAFETY: writes `msg.len()` bytes from a live buffer to a descriptor we own.
        let n = unsafe { libc::write(self.fuse.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        if n >= 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) => Ok(false),
            _ => Err(e),
        }
    }
}

/// The notification for `ino`: attributes only (`off` -1: no page cache range).
fn message(ino: Ino) -> [u8; MESSAGE_LEN] {
    let mut b = [0u8; MESSAGE_LEN];
    b[0..4].copy_from_slice(&(MESSAGE_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_NOTIFY_INVAL_INODE.to_le_bytes());
    // unique 0: a notification.
    b[16..24].copy_from_slice(&ino.0.to_le_bytes());
    b[24..32].copy_from_slice(&(-1i64).to_le_bytes());
    b[32..40].copy_from_slice(&0i64.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_an_attribute_only_inval_inode_notification() {
        let b = message(Ino(0x1234));
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().expect("a field")), 40);
        assert_eq!(i32::from_le_bytes(b[4..8].try_into().expect("a field")), 2);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().expect("a field")), 0);
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().expect("a field")),
            0x1234
        );
        assert_eq!(
            i64::from_le_bytes(b[24..32].try_into().expect("a field")),
            -1
        );
        assert_eq!(
            i64::from_le_bytes(b[32..40].try_into().expect("a field")),
            0
        );
    }
}
