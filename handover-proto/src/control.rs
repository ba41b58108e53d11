//! The control API: requests from the CLI (and later the CSI node plugin) to the
//! supervisor of one mount, over that mount's control socket (`SOCK_SEQPACKET`, one
//! request and one response per connection).

use std::path::PathBuf;

use crate::channel::WireMessage;
use crate::codec::{Decode, Encode};
use crate::message::Generation;

/// CLI -> supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ControlRequest {
    /// Unmount and stop. Without `lazy`, a busy mount is left serving and the answer is
    /// [`ControlResponse::Busy`]; with it, the mount is detached (MNT_DETACH).
    Umount { lazy: bool },
    /// Report on the mount.
    Status,
}

/// Supervisor -> CLI.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ControlResponse {
    /// Unmounted; the client flushed and exited.
    Umounted {
        /// What the client could not flush or close, if anything.
        flush_error: Option<String>,
    },
    /// The mount is in use; nothing was changed.
    Busy,
    Status(MountStatus),
    /// The request failed; the mount is unchanged unless the message says otherwise.
    Error {
        message: String,
    },
}

/// A mount as its supervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MountStatus {
    pub mountpoint: PathBuf,
    pub volume: String,
    pub meta_url: String,
    pub supervisor_pid: u32,
    pub generation: Generation,
    pub client_pid: u32,
    pub client_version: String,
    /// Since the mount was made, in milliseconds.
    pub uptime_ms: u64,
    /// FUSE ABI minor version negotiated at the first mount.
    pub fuse_minor: u32,
    /// Largest write request, negotiated at the first mount.
    pub max_write: u32,
}

impl WireMessage for ControlRequest {
    fn fd_count(&self) -> usize {
        0
    }
}

impl WireMessage for ControlResponse {
    fn fd_count(&self) -> usize {
        0
    }
}
