//! Answering the requests a dead predecessor read from /dev/fuse and never answered, found
//! in the request log (`super::reqlog`), on connections where the kernel does not resend
//! them (no FUSE_HAS_RESEND, or a mount made with `--no-resend`).
//!
//! The kernel still waits for a reply to each of them, by its `unique`, on the connection
//! this process holds. A request whose effect was complete when its reader died has its
//! answer in the log: it is written as it is, never run again. Every other request is run
//! by a second fuser session of the same filesystem, fed through a socketpair, exactly as
//! if it had been read from /dev/fuse: one more parser of FUSE requests would be one more
//! place for the two to differ. Its handlers treat each request as one that may have been
//! applied already (a mutation finds its record in the metadata engine and answers the
//! recorded outcome), and take recovery passes through the gate (they read nothing from
//! /dev/fuse, a drain does not wait for them to park). A relay thread reads each reply,
//! stores it in the request's slot, writes it to /dev/fuse, and only then frees the slot:
//! if this process dies half way, its successor finds the stored reply and writes it again
//! (a reply the kernel had already is refused with ENOENT and harms nothing).
//!
//! The main session reads /dev/fuse meanwhile: a recovered request may wait for a lock
//! that a later request releases.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use handover_proto::reqlog::{self, Verdict};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, Shutdown, SockFlag, SockType, setsockopt, socketpair, sockopt,
};

use super::adapter::BatonFs;
use super::park::Gate;
use super::relay::{self, RelayError};
use super::reqlog::{Pending, RequestLog};

/// Socket buffers of the recovery socketpair: room for the largest request (a WRITE of
/// `max_write` with its headers) and the largest reply (a READ of 1 MiB) in one datagram.
const SOCKET_BUFFER: usize = 4 << 20;
/// Most threads the recovery session runs (one per request, so that a request that waits
/// for a lock does not hold the others up).
const MAX_THREADS: usize = 256;

/// Starting the recovery failed; the requests stay claimed in the log (a successor of
/// this process would try again) and their callers wait.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("cannot create the recovery socketpair")]
    Socketpair(#[source] Errno),
    #[error("cannot start the recovery session")]
    Session(#[source] RelayError),
    #[error("cannot start a recovery thread")]
    Spawn(#[source] std::io::Error),
}

/// What [`start`] did at once, and what it left to its threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Started {
    /// Requests answered from the answers recorded in the log.
    pub answered: u32,
    /// Requests handed to the recovery session (answered as they complete).
    pub running: u32,
}

/// Writes a reply to the kernel. ENOENT: the kernel had the answer already (the dead
/// process wrote it just before it died); nothing to do.
fn write_reply(fuse: &OwnedFd, reply: &[u8], unique: u64) {
    match nix::unistd::write(fuse, reply) {
        Ok(_) => {}
        Err(Errno::ENOENT) => {
            tracing::debug!(
                unique,
                "the kernel had the answer to a recovered request already"
            )
        }
        Err(e) => {
            tracing::warn!(unique, error = %e, "cannot write the answer to a recovered request")
        }
    }
}

/// Room for a datagram of [`SOCKET_BUFFER`] bytes: past the system's limit with
/// CAP_NET_ADMIN (which the client has as root), else up to it.
fn grow_buffers(fd: &OwnedFd) {
    if setsockopt(fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let r = setsockopt(fd, sockopt::SndBuf, &SOCKET_BUFFER);
        let got = nix::sys::socket::getsockopt(fd, sockopt::SndBuf).unwrap_or(0);
        tracing::warn!(
            ok = r.is_ok(),
            bytes = got,
            "the recovery socket buffer cannot be grown past the system's limit (no CAP_NET_ADMIN): a recovered request or reply larger than that is not answered"
        );
    }
}

/// `n` recovered requests will not be answered by this process (left in the log for a
/// successor): a drain no longer waits for them.
fn give_up(gate: &Gate, n: usize) {
    for _ in 0..n {
        gate.recovery_answered();
    }
}

/// Answers the `pending` requests of `log` (claimed by [`RequestLog::take_over`]) on the
/// connection `fuse`: those with a recorded answer now, the others through a recovery
/// session of `fs` (made with [`BatonFs::for_recovery`]) started with the connection's
/// INIT request `init_request`, in background threads.
pub fn start(
    log: &'static RequestLog,
    pending: Vec<Pending>,
    fs: BatonFs,
    init_request: &[u8],
    fuse: Arc<OwnedFd>,
) -> Result<Started, RecoverError> {
    let mut started = Started::default();
    let mut run = Vec::new();
    for p in pending {
        match p.verdict {
            Verdict::AnswerResult {
                header,
                errno,
                written,
            } => {
                write_reply(
                    &fuse,
                    &reqlog::result_reply(&header, errno, written),
                    header.unique,
                );
                log.release(p.slot);
                started.answered += 1;
            }
            Verdict::AnswerStored {
                header,
                offset,
                len,
            } => {
                // SAFETY: the slot is claimed by this process; only this thread touches it.
                let reply = unsafe { log.area_bytes(p.slot, offset, len) };
                write_reply(&fuse, &reply, header.unique);
                log.release(p.slot);
                started.answered += 1;
            }
            Verdict::Execute(header) => {
                // SAFETY: as above.
                let request = unsafe { log.area_bytes(p.slot, 0, header.len) };
                run.push((p.slot, header, request));
            }
            Verdict::Idle | Verdict::NoReply(_) | Verdict::Garbage(_) => log.release(p.slot),
        }
    }
    if run.is_empty() {
        return Ok(started);
    }
    started.running = run.len() as u32;
    let gate = fs.gate().clone();
    gate.recovery_started(run.len());

    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(RecoverError::Socketpair)?;
    grow_buffers(&ours);
    grow_buffers(&theirs);
    let threads = run.len().clamp(1, MAX_THREADS);
    let session = relay::handshake_on(fs, init_request, threads, &ours, theirs, false)
        .map_err(RecoverError::Session)?
        .into_session();
    let span = tracing::info_span!("recovery");
    let s = span.clone();
    std::thread::Builder::new()
        .name("recovery-session".into())
        .spawn(move || {
            let _entered = s.enter();
            // Ends with an error when the relay closes the socketpair: expected.
            let r = session.run();
            tracing::debug!(?r, "the recovery session ended");
        })
        .map_err(RecoverError::Spawn)?;

    let ours = Arc::new(ours);
    let mut waiting: HashMap<u64, (u32, u32)> = run
        .iter()
        .map(|(slot, h, _)| (h.unique, (*slot, h.len)))
        .collect();
    let feed = ours.clone();
    let s = span.clone();
    let feed_gate = gate.clone();
    std::thread::Builder::new()
        .name("recovery-feed".into())
        .spawn(move || {
            let _entered = s.enter();
            for (slot, h, request) in run {
                loop {
                    match nix::sys::socket::send(feed.as_raw_fd(), &request, MsgFlags::empty()) {
                        Ok(_) => break,
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            tracing::error!(slot, unique = h.unique, opcode = h.opcode, error = %e, "cannot hand a recovered request to the recovery session: its caller waits");
                            // Left to a successor; a drain does not wait for it.
                            feed_gate.recovery_answered();
                            break;
                        }
                    }
                }
            }
        })
        .map_err(RecoverError::Spawn)?;
    std::thread::Builder::new()
        .name("recovery-relay".into())
        .spawn(move || {
            let _entered = span.enter();
            let mut buf = vec![0u8; SOCKET_BUFFER];
            let total = waiting.len();
            while !waiting.is_empty() {
                let n = match nix::sys::socket::recv(
                    ours.as_raw_fd(),
                    &mut buf,
                    MsgFlags::MSG_TRUNC,
                ) {
                    Ok(0) => {
                        tracing::error!(left = waiting.len(), "the recovery session ended before it answered every request");
                        give_up(&gate, waiting.len());
                        return;
                    }
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, left = waiting.len(), "cannot read the recovery session's replies");
                        give_up(&gate, waiting.len());
                        return;
                    }
                };
                if n > buf.len() || n < 16 {
                    tracing::error!(len = n, "the recovery session wrote a reply of an impossible size");
                    continue;
                }
                let reply = &buf[..n];
                let mut u = [0u8; 8];
                u.copy_from_slice(&reply[8..16]);
                let unique = u64::from_le_bytes(u);
                let Some((slot, request_len)) = waiting.remove(&unique) else {
                    tracing::warn!(unique, "a reply from the recovery session to no recovered request");
                    continue;
                };
                if !log.store_answer(slot, request_len, unique, reply) {
                    tracing::debug!(slot, unique, len = n, "the answer does not fit in the slot: not stored");
                }
                write_reply(&fuse, reply, unique);
                log.release(slot);
                gate.recovery_answered();
            }
            tracing::info!(answered = total, "every request the predecessor left unanswered is answered");
            let _ = nix::sys::socket::shutdown(ours.as_fd().as_raw_fd(), Shutdown::Both);
        })
        .map_err(RecoverError::Spawn)?;
    Ok(started)
}
