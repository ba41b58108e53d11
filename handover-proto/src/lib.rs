//! Everything that crosses a Baton process boundary.
//!
//! What it does: defines the bytes exchanged between the CLI, the supervisor (`baton`)
//! and the filesystem client (`baton-fs`) — the frame every message travels in
//! ([`frame`]), the encoding of message bodies ([`codec`], the only module that knows
//! bincode), passing file descriptors with SCM_RIGHTS ([`fdpass`]), the supervisor <->
//! client start-up, live-handover and shutdown messages ([`message`]), the client state
//! handed from one generation to the next, versioned and chunked ([`state`]), the
//! FUSE_INIT bytes they relay ([`fuse_init`]), the control API ([`control`]) and the
//! descriptor keeper that lets a new supervisor re-seed a mount whose processes all
//! died ([`keeper`]), and the layout of the request log, the shared memory in which a
//! successor finds the requests a dead client had read and not answered ([`reqlog`]).
//! [`channel`] puts them together: one message per `SOCK_SEQPACKET` datagram. The
//! protocol as a whole (sequences, rollback, state schema) is described in
//! `docs/handover-protocol.md`; golden files of every released format are kept in
//! `tests/fixtures/` and never regenerated.
//!
//! What it must never do: depend on a FUSE library, tokio or any other Baton crate, panic on bytes
//! from another process, or change the meaning of a released format version.
//!
//! # Frame
//!
//! Every message is one frame, sent as one `SOCK_SEQPACKET` datagram (so the datagram
//! length is the frame length; file descriptors ride along as SCM_RIGHTS ancillary data):
//!
//! ```text
//!  0       4       6       8               12              16
//!  +-------+-------+-------+---------------+---------------+---------------------+
//!  | magic | major | minor | payload len   | CRC32C        | payload (bincode)   |
//!  | BTON  | u16le | u16le | u32le         | of payload    | len bytes           |
//!  +-------+-------+-------+---------------+---------------+---------------------+
//! ```
//!
//! - `magic` is the four bytes `BTON`.
//! - `major.minor` is the *format* version ([`frame::FORMAT_MAJOR`],
//!   [`frame::FORMAT_MINOR`]), independent of the release version of the binaries.
//! - `payload len` is at most [`frame::MAX_PAYLOAD`]; a reader refuses a larger one
//!   before it looks at the payload.
//! - `CRC32C` (Castagnoli) covers the payload only; the header is checked field by field.
//!
//! # Version rules
//!
//! - A reader accepts frames of its own major version and any minor version; a different
//!   major is refused with [`frame::FrameError::UnsupportedVersion`].
//! - A minor version may only *add*: new message variants at the end of an enum, never a
//!   changed or removed field. A peer of an older minor that receives a variant it does
//!   not know gets a typed decode error, not a misread message, because enum variants
//!   are encoded by index.
//! - Anything else (a changed field, a new field in an existing message) is a new major.
//!   Released formats are never changed after the fact.

pub mod channel;
pub mod codec;
pub mod control;
pub mod fdpass;
pub mod frame;
pub mod fuse_init;
pub mod keeper;
pub mod message;
pub mod rendezvous;
pub mod reqlog;
pub mod state;

pub use channel::{RecvError, SendError, WireMessage};
