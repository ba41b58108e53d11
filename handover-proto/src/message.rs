//! The supervisor <-> client startup and shutdown messages.
//!
//! The sequence on one `SOCK_SEQPACKET` socketpair whose client end is the only
//! descriptor the client inherits:
//!
//! ```text
//! supervisor                                   client (baton-fs)
//!   Start { generation, spec }           --->
//!                                        <---  Prepared { pid, version } | Failed { reason }
//!   (mount(2), read the kernel's INIT)
//!   Init { request } + /dev/fuse fd      --->
//!                                              INIT relay through fuser
//!                                        <---  InitReply { reply } | Failed { reason }
//!   (check it, write it to /dev/fuse)
//!   Serve                                --->
//!                                              serves FUSE requests
//!                                        <---  SessionEnded { error } (if the mount
//!                                              was removed from outside)
//!   Shutdown                             --->
//!                                        <---  ShutdownDone { error }
//! ```
//!
//! `Failed` before `Prepared` means nothing was mounted; after `Init` the supervisor
//! answers the kernel's INIT with an error itself and unmounts.

use std::fmt;
use std::path::PathBuf;

use crate::channel::WireMessage;
use crate::codec::{Decode, Encode};

/// The environment variable that tells `baton-fs` the number of its end of the handover
/// socketpair, the only descriptor it inherits.
pub const CHANNEL_FD_ENV: &str = "BATON_HANDOVER_FD";

/// Generation of a client process for one mount: 1 for the first, +1 for each successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a client is to serve, as decided by the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MountSpec {
    /// Volume name (from the volume's format).
    pub volume: String,
    /// Metadata engine URL (`redb:///…`, `redis://…`).
    pub meta_url: String,
    /// Absolute mountpoint.
    pub mountpoint: PathBuf,
    /// Baton's data directory (`$BATON_HOME`).
    pub home: PathBuf,
    /// FUSE reader threads.
    pub threads: u32,
    /// Kernel attribute cache lifetime, in milliseconds.
    pub attr_ttl_ms: u64,
    /// Kernel dentry cache lifetime, in milliseconds.
    pub entry_ttl_ms: u64,
    /// Block cache directory; `None` for the default under `home`.
    pub cache_dir: Option<PathBuf>,
    /// Block cache size bound in bytes.
    pub cache_bytes: u64,
}

/// Supervisor -> client.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ToClient {
    /// Open the filesystem (metadata, data store, session); do not touch FUSE yet.
    Start {
        generation: Generation,
        spec: MountSpec,
    },
    /// The kernel's FUSE_INIT request, as read from /dev/fuse. Carries one descriptor: the
    /// /dev/fuse connection.
    Init { request: Vec<u8> },
    /// The INIT reply reached the kernel: start serving.
    Serve,
    /// The mount is gone or going: flush, close the session, answer, exit.
    Shutdown,
}

/// Client -> supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ToSupervisor {
    /// The filesystem is open and ready for the INIT relay.
    Prepared { pid: u32, version: String },
    /// The client cannot go on; `reason` is meant for the operator.
    Failed { reason: String },
    /// The filesystem's reply to the INIT request, to be written to /dev/fuse.
    InitReply { reply: Vec<u8> },
    /// Answer to `Shutdown`: `error` says what could not be flushed or closed.
    ShutdownDone { error: Option<String> },
    /// Unsolicited: the FUSE connection ended (the mount was removed by somebody else);
    /// the client has flushed and waits for `Shutdown`. `error` as in `ShutdownDone`.
    SessionEnded { error: Option<String> },
}

impl WireMessage for ToClient {
    fn fd_count(&self) -> usize {
        match self {
            ToClient::Init { .. } => 1,
            ToClient::Start { .. } | ToClient::Serve | ToClient::Shutdown => 0,
        }
    }
}

impl WireMessage for ToSupervisor {
    fn fd_count(&self) -> usize {
        match self {
            ToSupervisor::Prepared { .. }
            | ToSupervisor::Failed { .. }
            | ToSupervisor::InitReply { .. }
            | ToSupervisor::ShutdownDone { .. }
            | ToSupervisor::SessionEnded { .. } => 0,
        }
    }
}
