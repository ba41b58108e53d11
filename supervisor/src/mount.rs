//! The kernel side of a mount: open /dev/fuse, mount(2) it, read the kernel's FUSE_INIT,
//! answer it, unmount; and reading /proc/self/mountinfo.
//!
//! The supervisor owns the mount and keeps its /dev/fuse descriptor for as long as the
//! mount lives: the connection survives any client as long as this descriptor is open.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use handover_proto::fuse_init::{self, InitError, InitRequest};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;

/// The filesystem type in mount(2) and /proc/self/mountinfo.
pub const FSTYPE: &str = "fuse.baton";

/// Read buffer for /dev/fuse: the kernel refuses reads smaller than 8 KiB, or smaller
/// than a write request of the connection's max_write plus headers.
const READ_BUFFER: usize = (1 << 20) + (8 << 10);

/// Mounting failed; nothing is left mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot open /dev/fuse")]
    OpenDevice(#[source] Errno),
    #[error("mount(2) of {mountpoint} failed")]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: Errno,
    },
}

/// The kernel's FUSE_INIT request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadInitError {
    #[error("no FUSE_INIT request from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("waiting for FUSE_INIT failed")]
    Poll(#[source] Errno),
    #[error("reading FUSE_INIT from /dev/fuse failed")]
    Read(#[source] Errno),
    #[error("the kernel's first request is not a valid FUSE_INIT")]
    Invalid(#[source] InitError),
}

/// Unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum UmountError {
    #[error("{0} is busy (open files or a process working inside it)")]
    Busy(PathBuf),
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    #[error("umount2({mountpoint}) failed")]
    Failed {
        mountpoint: PathBuf,
        #[source]
        source: Errno,
    },
}

/// The kernel's FUSE_INIT request, raw and parsed.
#[derive(Clone, Debug)]
pub struct KernelInit {
    pub bytes: Vec<u8>,
    pub request: InitRequest,
}

/// Opens /dev/fuse (close-on-exec: it reaches a client only by SCM_RIGHTS).
pub fn open_device() -> Result<OwnedFd, MountError> {
    nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(MountError::OpenDevice)
}

/// Mounts the connection `fuse` at `mountpoint` as `baton:<volume>`.
pub fn mount(fuse: BorrowedFd<'_>, volume: &str, mountpoint: &Path) -> Result<(), MountError> {
    use std::os::fd::AsRawFd;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fuse.as_raw_fd()
    );
    let source = format!("baton:{volume}");
    nix::mount::mount(
        Some(source.as_str()),
        mountpoint,
        Some(FSTYPE),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|source| MountError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })
}

/// Reads the kernel's FUSE_INIT request (the first request of every new connection).
pub fn read_init(fuse: BorrowedFd<'_>, timeout: Duration) -> Result<KernelInit, ReadInitError> {
    loop {
        let mut fds = [PollFd::new(fuse, PollFlags::POLLIN)];
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, t) {
            Ok(0) => return Err(ReadInitError::Timeout(timeout)),
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ReadInitError::Poll(e)),
        }
    }
    let mut buf = vec![0u8; READ_BUFFER];
    let n = loop {
        match nix::unistd::read(fuse, &mut buf) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ReadInitError::Read(e)),
        }
    };
    buf.truncate(n);
    let request = InitRequest::parse(&buf).map_err(ReadInitError::Invalid)?;
    Ok(KernelInit {
        bytes: buf,
        request,
    })
}

/// Writes one reply to the kernel (one write(2): the kernel takes a reply whole or not
/// at all).
pub fn write_reply(fuse: BorrowedFd<'_>, reply: &[u8]) -> Result<(), Errno> {
    loop {
        match nix::unistd::write(fuse, reply) {
            Ok(n) if n == reply.len() => return Ok(()),
            Ok(_) => return Err(Errno::EIO),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Writes FUSE_NOTIFY_RESEND: the kernel moves every request a client read and did not
/// answer back to the head of its pending queue. Only when no client reads (DESIGN.md §1):
/// written while a client reads, it makes that client's requests run twice.
pub fn notify_resend(fuse: BorrowedFd<'_>) -> Result<(), Errno> {
    write_reply(fuse, &fuse_init::notify_resend())
}

/// Fails the INIT request `unique` with `errno`, so that nothing waits on a connection
/// that will never be served.
pub fn fail_init(fuse: BorrowedFd<'_>, unique: u64, errno: i32) -> Result<(), Errno> {
    write_reply(fuse, &fuse_init::error_reply(unique, errno))
}

/// Unmounts `mountpoint`; `lazy` detaches it even when busy (MNT_DETACH).
pub fn umount(mountpoint: &Path, lazy: bool) -> Result<(), UmountError> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match nix::mount::umount2(mountpoint, flags) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => Err(UmountError::Busy(mountpoint.to_path_buf())),
        Err(Errno::EINVAL) => Err(UmountError::NotMounted(mountpoint.to_path_buf())),
        Err(source) => Err(UmountError::Failed {
            mountpoint: mountpoint.to_path_buf(),
            source,
        }),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes of mountinfo (`\040` for a space...).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parses the text of /proc/self/mountinfo.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    use std::os::unix::ffi::OsStringExt;
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let source = String::from_utf8_lossy(&unescape(r.next().unwrap_or(""))).into_owned();
            Some(MountEntry {
                mountpoint: PathBuf::from(std::ffi::OsString::from_vec(unescape(mountpoint))),
                fstype,
                source,
            })
        })
        .collect()
}

/// The topmost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|e| e.mountpoint == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    95 22 0:50 / /mnt/a\\040b rw,nosuid,nodev,relatime shared:60 - fuse.baton baton:default rw,user_id=0\n";
        let e = parse_mountinfo(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(e[1].fstype, FSTYPE);
        assert_eq!(e[1].source, "baton:default");
        assert_eq!(e[0].mountpoint, PathBuf::from("/"));
    }

    #[test]
    fn root_is_a_mount() {
        assert!(mount_at(Path::new("/")).expect("mountinfo").is_some());
    }
}

/// Default size of a mount's write journal (a sparse memfd: memory is used only by the
/// writes that are acknowledged and not yet committed).
pub const JOURNAL_BYTES: u64 = 512 << 20;

/// Creating the write journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the write journal (memfd)")]
    Create(#[source] Errno),
    #[error("cannot size the write journal to {bytes} bytes")]
    Size {
        bytes: u64,
        #[source]
        source: Errno,
    },
}

/// Creates the mount's write journal: a memfd (close-on-exec; it reaches clients only by
/// SCM_RIGHTS) that the supervisor keeps for the life of the mount, so that what a
/// client wrote into it survives the client.
pub fn create_journal(bytes: u64) -> Result<OwnedFd, JournalError> {
    let fd =
        nix::sys::memfd::memfd_create(c"baton-journal", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(JournalError::Create)?;
    let len = libc::off_t::try_from(bytes).map_err(|_| JournalError::Size {
        bytes,
        source: Errno::EFBIG,
    })?;
    nix::unistd::ftruncate(&fd, len).map_err(|source| JournalError::Size { bytes, source })?;
    Ok(fd)
}
