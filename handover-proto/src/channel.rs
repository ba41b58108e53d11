//! One typed message per `SOCK_SEQPACKET` datagram: encode ([`codec`]),
//! frame ([`frame`]), send with its descriptors ([`fdpass`]),
//! and the reverse — checking on receipt that the number of descriptors is the one the
//! message says it carries.

use std::fmt::Debug;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::codec::{self, Decode, DecodeError, Encode, EncodeError};
use crate::fdpass;
use crate::frame::{self, FrameError, MAX_FRAME};

/// A message type that travels over a channel.
pub trait WireMessage: Encode + Decode<()> + Debug {
    /// How many file descriptors travel with this message.
    fn fd_count(&self) -> usize;
}

/// A message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("message {message} carries {expected} file descriptors, {got} given")]
    FdCount {
        message: String,
        expected: usize,
        got: usize,
    },
    #[error("cannot encode the message")]
    Encode(#[source] EncodeError),
    #[error("cannot frame the message")]
    Frame(#[source] FrameError),
    #[error("cannot send the message")]
    Transport(#[source] fdpass::SendError),
}

/// A message could not be received.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("cannot receive a message")]
    Transport(#[source] fdpass::RecvError),
    #[error("received an invalid frame")]
    Frame(#[source] FrameError),
    #[error("received an undecodable message")]
    Decode(#[source] DecodeError),
    #[error("message {message} must carry {expected} file descriptors, it came with {got}")]
    FdCount {
        message: String,
        expected: usize,
        got: usize,
    },
}

impl SendError {
    /// Whether the peer is gone (the connection was closed or reset).
    pub fn is_closed(&self) -> bool {
        matches!(
            self,
            SendError::Transport(fdpass::SendError::Sendmsg {
                source: nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET,
                ..
            })
        )
    }
}

impl RecvError {
    /// Whether the peer is gone (closed, or the connection was reset).
    pub fn is_closed(&self) -> bool {
        matches!(
            self,
            RecvError::Closed
                | RecvError::Transport(fdpass::RecvError::Recvmsg(nix::errno::Errno::ECONNRESET))
        )
    }

    /// Whether no message came within the timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, RecvError::Transport(fdpass::RecvError::TimedOut(_)))
    }
}

/// A short name of a message for errors: its Debug form up to the first field.
fn name<M: Debug>(msg: &M) -> String {
    let s = format!("{msg:?}");
    let end = s.find([' ', '(', '{']).unwrap_or(s.len());
    s[..end].to_string()
}

/// Sends `msg` with exactly the descriptors it carries.
pub fn send<M: WireMessage>(
    sock: BorrowedFd<'_>,
    msg: &M,
    fds: &[BorrowedFd<'_>],
) -> Result<(), SendError> {
    let expected = msg.fd_count();
    if fds.len() != expected {
        return Err(SendError::FdCount {
            message: name(msg),
            expected,
            got: fds.len(),
        });
    }
    let body = codec::encode(msg).map_err(SendError::Encode)?;
    let bytes = frame::encode(&body).map_err(SendError::Frame)?;
    fdpass::send(sock, &bytes, fds).map_err(SendError::Transport)
}

/// Receives one message and its descriptors; waits at most `timeout` (`None`: forever).
pub fn recv<M: WireMessage>(
    sock: BorrowedFd<'_>,
    timeout: Option<Duration>,
) -> Result<(M, Vec<OwnedFd>), RecvError> {
    if timeout.is_some() {
        fdpass::wait_readable(sock, timeout).map_err(RecvError::Transport)?;
    }
    let mut buf = vec![0u8; MAX_FRAME];
    let got = fdpass::recv(sock, &mut buf).map_err(RecvError::Transport)?;
    if got.len == 0 && got.fds.is_empty() {
        return Err(RecvError::Closed);
    }
    let msg = decode_frame::<M>(&buf[..got.len])?;
    let expected = msg.fd_count();
    if got.fds.len() != expected {
        return Err(RecvError::FdCount {
            message: name(&msg),
            expected,
            got: got.fds.len(),
        });
    }
    Ok((msg, got.fds))
}

/// Decodes one framed message (no descriptors involved): the decoder for bytes that come
/// from another process, exposed for robustness tests and fuzzing.
pub fn decode_frame<M: WireMessage>(bytes: &[u8]) -> Result<M, RecvError> {
    let (_header, payload) = frame::decode(bytes).map_err(RecvError::Frame)?;
    codec::decode::<M>(payload).map_err(RecvError::Decode)
}

/// Encodes one message into a frame (no descriptors).
pub fn encode_frame<M: WireMessage>(msg: &M) -> Result<Vec<u8>, SendError> {
    let body = codec::encode(msg).map_err(SendError::Encode)?;
    frame::encode(&body).map_err(SendError::Frame)
}

/// The check every frame decoder's fuzz target makes (`handover-proto/fuzz`): `data` is
/// refused with a typed error, or decodes to a message that encodes back to a frame that
/// decodes to the same message. An input that starts with the magic is taken as a whole
/// frame; any other is a body put into a valid frame, so that a fuzzer reaches the body
/// decoder without having to solve the CRC. Panics when the check fails.
pub fn check_frame_roundtrip<M>(data: &[u8])
where
    M: WireMessage + PartialEq + std::fmt::Debug,
{
    let wrapped;
    let bytes = if data.starts_with(&crate::frame::MAGIC) {
        data
    } else {
        let Ok(f) = crate::frame::encode(data) else {
            return;
        };
        wrapped = f;
        &wrapped
    };
    if let Ok(msg) = decode_frame::<M>(bytes) {
        let again = encode_frame(&msg).expect("a decoded message encodes");
        let back = decode_frame::<M>(&again).expect("its own frame decodes");
        assert_eq!(back, msg);
    }
}
