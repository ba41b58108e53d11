//! Passing file descriptors with SCM_RIGHTS over a `SOCK_SEQPACKET` Unix socket.
//!
//! One datagram carries one frame and at most [`MAX_FDS`] descriptors. Receiving is strict:
//! a datagram larger than the buffer (MSG_TRUNC), descriptors that did not fit
//! (MSG_CTRUNC), or ancillary data other than SCM_RIGHTS are errors — and every descriptor
//! that did arrive is closed before the error is returned, so nothing leaks. Received
//! descriptors are close-on-exec (MSG_CMSG_CLOEXEC): a process only ever passes on what it
//! means to.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{ControlMessage, MsgFlags};

/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 4;

/// Bytes of ancillary buffer for [`MAX_FDS`] descriptors.
// SAFETY: CMSG_SPACE only does arithmetic on its argument.
const CMSG_BUF: usize = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;

/// A datagram could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{count} file descriptors in one message (at most {MAX_FDS})")]
    TooManyFds { count: usize },
    #[error("sendmsg of a {len}-byte message failed")]
    Sendmsg {
        len: usize,
        #[source]
        source: Errno,
    },
    #[error("sendmsg sent {sent} of {len} bytes")]
    Partial { sent: usize, len: usize },
}

/// A datagram could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("recvmsg failed")]
    Recvmsg(#[source] Errno),
    #[error("waiting for the socket to become readable failed")]
    Poll(#[source] Errno),
    #[error("no message within {0:?}")]
    TimedOut(Duration),
    #[error("message truncated: larger than the {buf} bytes buffer")]
    Truncated { buf: usize },
    #[error("file descriptors truncated: the message carried more than {MAX_FDS}")]
    FdsTruncated,
    #[error("unexpected ancillary data (level {level}, type {kind})")]
    UnexpectedControl { level: i32, kind: i32 },
}

/// One received datagram.
#[derive(Debug)]
pub struct Received {
    /// Bytes written at the start of the buffer. 0 with no fds means the peer closed.
    pub len: usize,
    pub fds: Vec<OwnedFd>,
}

/// Sends `bytes` as one datagram with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SendError> {
    if fds.len() > MAX_FDS {
        return Err(SendError::TooManyFds { count: fds.len() });
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let iov = [IoSlice::new(bytes)];
    let mut grown = false;
    loop {
        match nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(sent) if sent == bytes.len() => return Ok(()),
            Ok(sent) => {
                return Err(SendError::Partial {
                    sent,
                    len: bytes.len(),
                });
            }
            Err(Errno::EINTR) => continue,
            // A datagram larger than the socket's send buffer (212992 bytes by default)
            // is refused whole. Grow the buffer to fit this one and try again, once.
            Err(Errno::EMSGSIZE) if !grown => {
                grown = true;
                grow_send_buffer(sock, bytes.len());
            }
            Err(source) => {
                return Err(SendError::Sendmsg {
                    len: bytes.len(),
                    source,
                });
            }
        }
    }
}

/// Makes the send buffer of `sock` large enough for one datagram of `len` bytes.
///
/// An AF_UNIX datagram is charged to the sender's buffer and refused with EMSGSIZE when it
/// is larger (less 32 bytes); the default buffer (`net.core.wmem_default`, 212992 bytes)
/// is smaller than the largest frame. SO_SNDBUFFORCE (root) is not capped by
/// `net.core.wmem_max`; without the privilege SO_SNDBUF grows the buffer up to that cap.
/// Failures are ignored: the send that follows reports the EMSGSIZE.
fn grow_send_buffer(sock: BorrowedFd<'_>, len: usize) {
    // The kernel doubles the value for its bookkeeping; the slack covers the 32 bytes
    // and the ancillary data.
    let want = len.saturating_add(4096);
    if nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBufForce, &want).is_err() {
        let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBuf, &want);
    }
}

/// Waits until `sock` is readable (or closed). `None` waits forever.
pub fn wait_readable(sock: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<(), RecvError> {
    let poll_timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
    };
    loop {
        let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, poll_timeout) {
            Ok(0) => return Err(RecvError::TimedOut(timeout.unwrap_or_default())),
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(RecvError::Poll(e)),
        }
    }
}

/// Receives one datagram into `buf`, with up to [`MAX_FDS`] descriptors.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, RecvError> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CMSG_BUF.div_ceil(8)];
    let mut iov = [IoSliceMut::new(buf)];
    let buf_len = iov[0].len();
    // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSliceMut is ABI-compatible with iovec on Unix.
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF as _;
    let len = loop {
        // SAFETY: `msg` points at `iov` (one buffer of `buf_len` writable bytes) and at
        // `control` (CMSG_BUF bytes), all alive for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(RecvError::Recvmsg(e)),
        }
    };

    // Take ownership of every descriptor the kernel installed before any check, so that
    // an error return closes them.
    let mut fds = Vec::new();
    let mut unexpected = None;
    // SAFETY: `msg` was filled by recvmsg; msg_controllen is the length it wrote.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/NXTHDR return null or a header inside the control buffer.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only does arithmetic.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(header_len) / size_of::<RawFd>();
            // SAFETY: `c` is a valid header; its data follows it in the control buffer.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `count` descriptors lie within cmsg_len; they may be unaligned.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `fd` in this process for us; nobody
                // else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        } else {
            unexpected = Some((hdr.cmsg_level, hdr.cmsg_type));
        }
        // SAFETY: `c` is a valid header of `msg`.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }

    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(RecvError::FdsTruncated);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(RecvError::Truncated { buf: buf_len });
    }
    if let Some((level, kind)) = unexpected {
        return Err(RecvError::UnexpectedControl { level, kind });
    }
    Ok(Received { len, fds })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair")
    }

    fn is_cloexec(fd: BorrowedFd<'_>) -> bool {
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn passes_fds_cloexec() {
        let (a, b) = pair();
        let (p1, p2) = nix::unistd::pipe().expect("pipe");
        send(a.as_fd(), b"hi", &[p1.as_fd(), p2.as_fd()]).expect("send");
        let mut buf = [0u8; 16];
        let r = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..r.len], b"hi");
        assert_eq!(r.fds.len(), 2);
        for fd in &r.fds {
            assert!(is_cloexec(fd.as_fd()));
        }
        // The received write end reaches the original read end.
        nix::unistd::write(&r.fds[1], b"x").expect("write");
        let mut one = [0u8; 1];
        nix::unistd::read(&p1, &mut one).expect("read");
        assert_eq!(&one, b"x");
    }

    /// A datagram larger than the default socket buffer (212992 bytes) goes through:
    /// the sender grows its buffer.
    #[test]
    fn large_datagram_goes_through() {
        let (a, b) = pair();
        let big: Vec<u8> = (0..(1usize << 20) + 16).map(|i| i as u8).collect();
        let sender = std::thread::spawn(move || send(a.as_fd(), &big, &[]).map(|()| big));
        let mut buf = vec![0u8; (1 << 20) + 16];
        let r = recv(b.as_fd(), &mut buf).expect("recv");
        let big = sender.join().expect("sender thread").expect("send");
        assert_eq!(r.len, big.len());
        assert!(buf == big);
    }

    #[test]
    fn truncated_message_is_an_error() {
        let (a, b) = pair();
        send(a.as_fd(), &[7u8; 100], &[]).expect("send");
        let mut buf = [0u8; 10];
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(RecvError::Truncated { buf: 10 })
        ));
    }

    #[test]
    fn too_many_fds() {
        let (a, _b) = pair();
        let fds: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 1).map(|_| a.as_fd()).collect();
        assert!(matches!(
            send(a.as_fd(), b"x", &fds),
            Err(SendError::TooManyFds { .. })
        ));
    }

    #[test]
    fn more_fds_than_the_receiver_takes_is_an_error() {
        // Send MAX_FDS + 2 descriptors with raw nix, bypassing our own sender's check.
        let (a, b) = pair();
        let raw: Vec<RawFd> = (0..MAX_FDS + 2).map(|_| a.as_raw_fd()).collect();
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        let mut buf = [0u8; 8];
        assert!(matches!(
            recv(b.as_fd(), &mut buf),
            Err(RecvError::FdsTruncated)
        ));
    }

    #[test]
    fn eof_and_timeout() {
        let (a, b) = pair();
        assert!(matches!(
            wait_readable(b.as_fd(), Some(Duration::from_millis(10))),
            Err(RecvError::TimedOut(_))
        ));
        drop(a);
        wait_readable(b.as_fd(), Some(Duration::from_secs(1))).expect("readable at EOF");
        let mut buf = [0u8; 8];
        let r = recv(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((r.len, r.fds.len()), (0, 0));
    }
}
