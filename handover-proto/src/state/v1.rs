//! Client state schema version 1. Released formats never change: a change is a new
//! module (`v2.rs`) with a `From<ClientStateV1>` migration.

use crate::codec::{Decode, Encode};
use crate::message::MountSpec;

/// Everything a successor needs to serve a live FUSE connection in place of its
/// predecessor. Dirty data is not part of it: the predecessor flushed before exporting.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ClientStateV1 {
    /// Generation of the client that exported this state.
    pub generation: u64,
    /// The mount's metadata session (owner of its locks and open-but-unlinked files).
    pub session: u64,
    /// UUID of the volume served (a successor refuses a state of another volume).
    pub volume_uuid: String,
    pub spec: MountSpec,
    /// The kernel's FUSE_INIT request and the reply it got: the negotiated parameters.
    pub init_request: Vec<u8>,
    pub init_reply: Vec<u8>,
    /// Kernel lookup references per inode: (inode, count).
    pub lookups: Vec<(u64, u64)>,
    /// Open files.
    pub files: Vec<FileHandleV1>,
    /// Open directories.
    pub dirs: Vec<DirHandleV1>,
    /// Inodes unlinked while open here, freed at their last close.
    pub orphans: Vec<u64>,
    /// Next value of the handle counter (so new handle numbers do not repeat old ones).
    pub next_handle: u32,
}

/// An open file. The number alone rebuilds the handle (inode, mode, counter); the rest is
/// what the predecessor knew beyond it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct FileHandleV1 {
    pub fh: u64,
    pub ino: u64,
    /// open(2) flags.
    pub flags: i32,
    /// Lock owners that took locks through this handle (released at close).
    pub lock_owners: Vec<u64>,
}

/// An open directory stream.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct DirHandleV1 {
    pub fh: u64,
    pub ino: u64,
    /// Last readdir cookie handed out (readdir offsets are stable cookies, so this is
    /// informative: the kernel passes the offset it wants).
    pub cursor: u64,
}
