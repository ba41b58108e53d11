//! The INIT relay (DESIGN.md §1): start a stock fuser 0.18 session on a FUSE connection
//! whose FUSE_INIT request was read by somebody else (the supervisor).
//!
//! fuser's `Session::from_fd` insists on a handshake: it reads FUSE_INIT and writes its
//! reply. It does not care what kind of descriptor it reads, so:
//!
//! 1. [`handshake`] makes a `SOCK_SEQPACKET` socketpair, writes the INIT request into one
//!    end and gives fuser the other; fuser's handshake writes its reply into the
//!    socketpair, where we read it. Nothing has touched /dev/fuse yet: the reply goes back
//!    to the supervisor, which writes it to the kernel (first mount) or compares it with
//!    the reply the kernel already has (takeover).
//! 2. [`Handshaken::attach`] `dup3`s the real /dev/fuse descriptor over the descriptor
//!    number fuser holds, so that the session reads and writes the kernel connection
//!    from then on. Only then may the session `run()`.
//!
//! The session is always configured with `clone_fd = false`: a request read through a
//! clone that nobody else holds is lost when this process dies (DESIGN.md §1).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use fuser::{Filesystem, Session, SessionACL};
use handover_proto::fuse_init::{InitError, InitReply, InitRequest, MAX_INIT_LEN};
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, MsgFlags, Shutdown, SockFlag, SockType, socketpair};

/// The INIT relay failed; nothing was written to the kernel connection.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the INIT request is invalid")]
    BadRequest(#[source] InitError),
    #[error("cannot create the relay socketpair")]
    Socketpair(#[source] Errno),
    #[error("cannot write the INIT request into the relay")]
    WriteRequest(#[source] Errno),
    #[error("fuser's INIT handshake failed")]
    Handshake(#[source] io::Error),
    #[error("cannot read fuser's INIT reply from the relay")]
    ReadReply(#[source] Errno),
    #[error("fuser wrote no INIT reply")]
    NoReply,
    #[error("fuser's INIT reply is not a successful reply to the request")]
    BadReply(#[source] InitError),
    #[error("cannot put the FUSE connection under fuser's descriptor")]
    Attach(#[source] Errno),
}

/// A session that has answered INIT through the relay and is not attached to the kernel
/// connection yet.
#[derive(Debug)]
pub struct Handshaken<FS: Filesystem> {
    session: Session<FS>,
    reply: Vec<u8>,
    negotiated: InitReply,
}

/// fuser configuration for Baton: every reader thread reads the one shared open file
/// (`clone_fd = false`), any user may use the mount (the kernel checks permissions:
/// `default_permissions`).
fn session_config(threads: usize) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = false;
    config
}

/// Runs fuser's INIT handshake for `fs` against `request` (the kernel's FUSE_INIT bytes)
/// over a socketpair, with `threads` reader threads for the later `run()`.
pub fn handshake<FS: Filesystem>(
    fs: FS,
    request: &[u8],
    threads: usize,
) -> Result<Handshaken<FS>, RelayError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(RelayError::Socketpair)?;
    // If fuser wants a second INIT (it does when the kernel's major is newer than its
    // own), it reads end-of-file instead of waiting forever.
    handshake_on(fs, request, threads, &ours, theirs, true)
}

/// Like [`handshake`], over a socketpair the caller made (`ours`, `theirs`), left open
/// for writing when `!end_requests`: the session can then be run on it (never
/// [`Handshaken::attach`]ed) and be fed requests through `ours`, its replies read there.
/// The caller has shaken hands on the same connection already, with the same `request`.
pub fn handshake_on<FS: Filesystem>(
    fs: FS,
    request: &[u8],
    threads: usize,
    ours: &OwnedFd,
    theirs: OwnedFd,
    end_requests: bool,
) -> Result<Handshaken<FS>, RelayError> {
    let init = InitRequest::parse(request).map_err(RelayError::BadRequest)?;
    let written = nix::unistd::write(ours, request).map_err(RelayError::WriteRequest)?;
    if written != request.len() {
        return Err(RelayError::WriteRequest(Errno::EMSGSIZE));
    }
    if end_requests {
        nix::sys::socket::shutdown(ours.as_raw_fd(), Shutdown::Write)
            .map_err(RelayError::WriteRequest)?;
    }

    let session = Session::from_fd(fs, theirs, SessionACL::All, session_config(threads))
        .map_err(RelayError::Handshake)?;

    // fuser wrote its reply before from_fd returned: it is waiting in the socket.
    let mut buf = vec![0u8; MAX_INIT_LEN];
    let len = loop {
        match nix::sys::socket::recv(
            ours.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
        ) {
            Ok(0) => return Err(RelayError::NoReply),
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(RelayError::NoReply),
            Err(e) => return Err(RelayError::ReadReply(e)),
        }
    };
    if len > buf.len() {
        return Err(RelayError::BadReply(InitError::TooLong { len }));
    }
    buf.truncate(len);
    let negotiated = InitReply::parse(&buf, init.unique).map_err(RelayError::BadReply)?;
    tracing::debug!(
        minor = negotiated.minor,
        max_write = negotiated.max_write,
        flags = format_args!("{:#x}", negotiated.flags),
        "INIT relayed through fuser"
    );
    Ok(Handshaken {
        session,
        reply: buf,
        negotiated,
    })
}

impl<FS: Filesystem> Handshaken<FS> {
    /// The session, still reading the relay socketpair (see [`handshake_on`]).
    pub fn into_session(self) -> Session<FS> {
        self.session
    }
}

impl<FS: Filesystem> Handshaken<FS> {
    /// fuser's INIT reply, byte for byte.
    pub fn reply(&self) -> &[u8] {
        &self.reply
    }

    /// The parameters fuser negotiated.
    pub fn negotiated(&self) -> &InitReply {
        &self.negotiated
    }

    /// Makes the session serve `fuse` (the /dev/fuse connection): duplicates it over the
    /// descriptor number fuser holds. The caller may close its own `fuse` afterwards.
    pub fn attach(self, fuse: BorrowedFd<'_>) -> Result<Session<FS>, RelayError> {
        let target = self.session.as_fd().as_raw_fd();
        loop {
            // SAFETY: `target` is the descriptor owned by `self.session` (alive for the
            // whole call) and `fuse` is a valid descriptor borrowed for the call. dup3
            // atomically closes the socket behind `target` and makes `target` refer to the
            // FUSE connection; fuser keeps owning `target`, which stays a valid, open
            // descriptor of the same number, now close-on-exec like the original.
            let r = unsafe { libc::dup3(fuse.as_raw_fd(), target, libc::O_CLOEXEC) };
            if r >= 0 {
                break;
            }
            match Errno::last() {
                Errno::EINTR | Errno::EBUSY => continue,
                e => return Err(RelayError::Attach(e)),
            }
        }
        Ok(self.session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::{FileAttr, FileType, INodeNo, KernelConfig, ReplyAttr, Request};
    use handover_proto::fuse_init::{FUSE_INIT, IN_HEADER_LEN, OUT_HEADER_LEN};
    use std::time::{Duration, UNIX_EPOCH};

    /// A filesystem with nothing but a root directory.
    struct Root;

    impl Filesystem for Root {
        fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
            let _ = config.set_max_write(1 << 20);
            Ok(())
        }

        fn getattr(
            &self,
            _req: &Request,
            ino: INodeNo,
            _fh: Option<fuser::FileHandle>,
            reply: ReplyAttr,
        ) {
            reply.attr(
                &Duration::from_secs(1),
                &FileAttr {
                    ino,
                    size: 0,
                    blocks: 0,
                    atime: UNIX_EPOCH,
                    mtime: UNIX_EPOCH,
                    ctime: UNIX_EPOCH,
                    crtime: UNIX_EPOCH,
                    kind: FileType::Directory,
                    perm: 0o755,
                    nlink: 2,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    blksize: 4096,
                    flags: 0,
                },
            );
        }
    }

    fn header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&opcode.to_le_bytes());
        b.extend_from_slice(&unique.to_le_bytes());
        b.extend_from_slice(&nodeid.to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b
    }

    /// The INIT request of a 7.45 kernel.
    fn init_request(unique: u64) -> Vec<u8> {
        let mut b = header(104, FUSE_INIT, unique, 0);
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&45u32.to_le_bytes());
        b.extend_from_slice(&(128u32 << 10).to_le_bytes());
        b.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
        b.extend_from_slice(&[0u8; 48]);
        b
    }

    #[test]
    fn relays_init_then_serves_the_attached_connection() {
        let hs = handshake(Root, &init_request(42), 1).expect("handshake");
        let reply = InitReply::parse(hs.reply(), 42).expect("successful reply");
        assert_eq!(reply.max_write, 1 << 20);
        assert_eq!(reply.major, 7);

        // A socketpair stands in for the kernel: what the session reads after attach must
        // come from it, not from the relay.
        let (kernel, conn) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let session = hs.attach(conn.as_fd()).expect("attach");
        let fd = session.as_fd().as_raw_fd();
        let flags =
            nix::fcntl::fcntl(session.as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert!(
            flags & libc::FD_CLOEXEC != 0,
            "fd {fd} must stay close-on-exec"
        );
        drop(conn);
        let runner = std::thread::spawn(move || session.run());

        // FUSE_GETATTR (3) of the root, with an empty fuse_getattr_in (16 bytes).
        let mut req = header((IN_HEADER_LEN + 16) as u32, 3, 7, 1);
        req.extend_from_slice(&[0u8; 16]);
        nix::unistd::write(&kernel, &req).expect("write request");
        let mut buf = vec![0u8; 4096];
        let n = nix::unistd::read(&kernel, &mut buf).expect("read reply");
        assert!(n > OUT_HEADER_LEN);
        assert_eq!(
            i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]),
            0,
            "getattr succeeds"
        );
        let mut unique = [0u8; 8];
        unique.copy_from_slice(&buf[8..16]);
        assert_eq!(u64::from_le_bytes(unique), 7);

        // Closing the fake kernel ends the session loop.
        drop(kernel);
        let _ = runner.join().expect("session thread");
    }

    #[test]
    fn refuses_a_request_that_is_not_init() {
        let mut bad = init_request(1);
        bad[4] = 3;
        assert!(matches!(
            handshake(Root, &bad, 1),
            Err(RelayError::BadRequest(InitError::NotInit(3)))
        ));
    }

    #[test]
    fn a_newer_kernel_major_does_not_hang() {
        // fuser answers a newer major with its own version and waits for a second INIT;
        // the relay gives it end-of-file instead.
        let mut req = init_request(5);
        req[IN_HEADER_LEN..IN_HEADER_LEN + 4].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            handshake(Root, &req, 1),
            Err(RelayError::Handshake(_))
        ));
    }
}
