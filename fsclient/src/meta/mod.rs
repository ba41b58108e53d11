//! The metadata engine: namespace, attributes, file layout, sessions and locks.
//!
//! One [`MetaEngine`] trait is what the rest of the client sees. It is implemented once,
//! by [`Meta`] in `ops.rs`, over a small transactional storage interface ([`Backend`] and
//! [`Tx`]) that each store provides:
//!
//! - `redb.rs`: embedded, one file (the default for a volume used by one node);
//! - `redis.rs`: Redis, for volumes shared by many clients on many nodes.
//!
//! So the POSIX rules (what rename does to link counts, when an inode is freed, how locks
//! conflict) are written once and both engines pass one conformance suite
//! (`conformance.rs`). Every operation runs in one transaction of the backend: a redb
//! write transaction, or a Redis WATCH/MULTI/EXEC retried on conflict.
//!
//! Inode numbers come from the engine and never change: they are the FUSE node ids.

mod error;
mod once;
mod ops;
pub mod types;

pub mod conformance;
pub mod redb;
pub mod redis;

use std::sync::Arc;

pub use error::MetaError;
pub use once::{RESEND_BIT, RequestId};
pub use ops::Meta;
pub use types::*;

/// Result of metadata operations.
pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// The caller of an operation, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };
}

/// A new inode to create under a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNode {
    pub kind: FileKind,
    /// Permission bits (already masked by the umask).
    pub perm: u16,
    pub rdev: u32,
    /// Target of a symlink.
    pub target: Vec<u8>,
}

/// A time to set in setattr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// The changes of one setattr call. Permission checks are the kernel's
/// (`default_permissions`); the engine applies what it is given, and clears set-uid/set-gid
/// bits on a change of owner as POSIX requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

/// Flags of rename(2) (`renameat2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// How setxattr treats an existing attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Any,
    /// Fail with EEXIST if it exists (XATTR_CREATE).
    Create,
    /// Fail with ENODATA if it does not exist (XATTR_REPLACE).
    Replace,
}

/// What an unlink, rmdir or a replacing rename did to the inode that lost a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    pub ino: Ino,
    /// The inode still exists: it has other links, or it is open in this session and is
    /// kept (nlink 0) until its last close.
    pub kept: bool,
}

/// Modes of fallocate(2) the engine implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Mode 0: allocate, extending the size if needed.
    Allocate { keep_size: bool },
    /// FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: the range reads as zeros.
    PunchHole,
    /// FALLOC_FL_ZERO_RANGE (optionally with KEEP_SIZE).
    ZeroRange { keep_size: bool },
}

/// A lock request for [`MetaEngine::setlk`]. `typ == None` unlocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    pub owner: LockOwner,
    pub typ: Option<LockType>,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

/// An object-store slice whose data is no longer referenced and can be deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadSlice {
    pub id: u64,
    pub size: u32,
    /// When it became unreferenced; deletion waits a grace period after it so that readers
    /// that resolved the old layout just before can finish.
    pub since: Timestamp,
}

/// The metadata operations of one volume. Implemented by [`Meta`] for each backend.
///
/// Names are bytes (`&[u8]`), as on Linux. Errors that are POSIX outcomes (ENOENT,
/// EEXIST...) are [`MetaError`] variants that map to one errno each.
///
/// The namespace and attribute mutations take the kernel request they serve, if any
/// (`req`): they are then applied at most once per request, also when the kernel delivers
/// the request again after the client process died (see `once.rs`). `None` (tools, tests,
/// internal work) applies unconditionally.
pub trait MetaEngine: Send + Sync + std::fmt::Debug {
    /// "redb" or "redis".
    fn backend_name(&self) -> &'static str;

    // --- volume ---
    /// Write the volume settings and create the root directory. Fails with
    /// [`MetaError::AlreadyFormatted`] if the volume exists, unless `force` (which only
    /// updates the settings and keeps the data).
    fn format(&self, format: &Format, force: bool) -> Result<()>;
    /// The volume settings, or [`MetaError::NotFormatted`].
    fn load_format(&self) -> Result<Format>;
    fn usage(&self) -> Result<Usage>;

    // --- sessions ---
    fn new_session(&self, info: &SessionInfo) -> Result<SessionId>;
    /// Takes over an existing session (a successor client keeps its predecessor's, with
    /// its locks and open-but-unlinked inodes): replaces its info (pid, version, heartbeat).
    /// Fails with NotFound if the session was closed or cleaned up as stale.
    fn resume_session(&self, sid: SessionId, info: &SessionInfo) -> Result<()>;
    /// Record that the session is alive now; fails with NotFound if another client
    /// cleaned it up as stale.
    fn heartbeat(&self, sid: SessionId, now: Timestamp) -> Result<()>;
    /// Ends a session: frees its open-but-unlinked inodes, releases its locks and drops
    /// its request records.
    fn close_session(&self, sid: SessionId) -> Result<()>;
    fn list_sessions(&self) -> Result<Vec<(SessionId, SessionInfo)>>;
    /// Closes every session whose last heartbeat is older than `deadline`; returns them.
    fn clean_stale_sessions(&self, deadline: Timestamp) -> Result<Vec<SessionId>>;
    /// What session `sid` holds: its open-but-unlinked inodes, and the (inode, lock
    /// owner) pairs of its locks. A client that takes the session over after a crash
    /// (without its predecessor's tables) learns them here.
    fn session_holdings(&self, sid: SessionId) -> Result<SessionHoldings>;
    /// Drops the session's records of requests with a `unique` below `below`: they can no
    /// longer be delivered again (exactly-once, see `once.rs`).
    fn forget_requests(&self, sid: SessionId, below: u64) -> Result<()>;

    // --- namespace ---
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)>;
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Applies `set`. A size change truncates or extends the layout in the same
    /// transaction.
    fn setattr(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        set: &SetAttr,
        now: Timestamp,
    ) -> Result<Attr>;
    /// Creates a file, directory, symlink or special file.
    fn mknod(
        &self,
        req: Option<RequestId>,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        caller: Caller,
    ) -> Result<(Ino, Attr)>;
    /// Removes a non-directory name. `is_open(ino)` tells whether this session has the
    /// inode open: then an inode losing its last link is kept until
    /// [`MetaEngine::release_unlinked`].
    fn unlink(
        &self,
        req: Option<RequestId>,
        sid: SessionId,
        parent: Ino,
        name: &[u8],
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<Removed>;
    fn rmdir(&self, req: Option<RequestId>, parent: Ino, name: &[u8]) -> Result<Removed>;
    /// Renames; returns what happened to a replaced target, if any.
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        req: Option<RequestId>,
        sid: SessionId,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<Option<Removed>>;
    /// Adds a hard link; returns the inode's new attributes.
    fn link(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
    ) -> Result<Attr>;
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Up to `limit` entries of a directory after `cookie` (0 = from the start), in cookie
    /// order, without "." and "..". With `plus`, each entry carries its attributes.
    fn readdir(&self, ino: Ino, cookie: u64, limit: usize, plus: bool) -> Result<Vec<DirEntry>>;
    /// The inode's last close in this session: frees it if it has no links left.
    fn release_unlinked(&self, sid: SessionId, ino: Ino) -> Result<()>;

    // --- extended attributes ---
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    fn setxattr(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<()>;
    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    fn removexattr(&self, req: Option<RequestId>, ino: Ino, name: &[u8]) -> Result<()>;

    // --- file layout ---
    /// The slices of chunk `index` of a file, oldest first (later ones win).
    fn read_chunk(&self, ino: Ino, index: u32) -> Result<Vec<Slice>>;
    /// A new, never used slice id.
    fn new_slice_id(&self) -> Result<u64>;
    /// Appends a written slice to chunk `index` and extends the file size to cover it;
    /// sets mtime and ctime to `mtime`. Returns the new attributes.
    fn write_slice(&self, ino: Ino, index: u32, slice: Slice, mtime: Timestamp) -> Result<Attr>;
    fn fallocate(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        mode: Fallocate,
        offset: u64,
        len: u64,
        now: Timestamp,
    ) -> Result<Attr>;

    // --- locks (POSIX byte ranges; flock is a whole-file lock of the open file) ---
    /// The first lock that conflicts with `req`, if any.
    fn getlk(&self, ino: Ino, req: &LockRequest) -> Result<Option<RangeLock>>;
    /// Takes, changes or releases a lock; [`MetaError::WouldBlock`] on conflict.
    fn setlk(&self, ino: Ino, req: &LockRequest) -> Result<()>;
    /// Releases every lock `owner` holds on `ino`.
    fn release_locks(&self, ino: Ino, owner: LockOwner) -> Result<()>;

    // --- garbage ---
    /// Unreferenced slices that became dead before `before`, up to `limit`.
    fn dead_slices(&self, before: Timestamp, limit: usize) -> Result<Vec<DeadSlice>>;
    /// Forget dead slices whose objects were deleted.
    fn forget_dead_slices(&self, ids: &[u64]) -> Result<()>;
}

/// Named id counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    Inode,
    Slice,
    Session,
}

impl Counter {
    pub fn key(self) -> &'static str {
        match self {
            Counter::Inode => "next_inode",
            Counter::Slice => "next_slice",
            Counter::Session => "next_session",
        }
    }
}

/// Typed storage operations inside one transaction.
///
/// Point reads see the transaction's own earlier writes. Scans
/// ([`Tx::dir_entries`], [`Tx::dir_is_empty`], [`Tx::sessions`], [`Tx::sustained`],
/// [`Tx::session_locked`], [`Tx::dead_slices`]) may see only committed state: an operation
/// must do its scans before its writes. In a read-only transaction every write fails.
///
/// For Redis, every key read in a write transaction is WATCHed, and the writes are queued
/// and applied with MULTI/EXEC; the backend reruns the closure on a conflict, so a closure
/// has no side effects outside the transaction.
pub trait Tx {
    fn attr(&mut self, ino: Ino) -> Result<Option<Attr>>;
    fn set_attr(&mut self, ino: Ino, attr: &Attr) -> Result<()>;
    fn del_attr(&mut self, ino: Ino) -> Result<()>;

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Dentry>>;
    /// Stores the entry, indexed both by name and by its cookie.
    fn set_dentry(&mut self, parent: Ino, name: &[u8], dentry: &Dentry) -> Result<()>;
    /// Removes the entry (both indexes); `cookie` is the stored entry's cookie.
    fn del_dentry(&mut self, parent: Ino, name: &[u8], cookie: u64) -> Result<()>;
    /// Entries with a cookie greater than `after`, in cookie order, at most `limit`.
    fn dir_entries(
        &mut self,
        parent: Ino,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Dentry)>>;
    fn dir_is_empty(&mut self, parent: Ino) -> Result<bool>;

    fn symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>>;
    fn set_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()>;
    fn del_symlink(&mut self, ino: Ino) -> Result<()>;

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>>;
    fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()>;
    fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<()>;
    fn xattr_names(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    fn del_xattrs(&mut self, ino: Ino) -> Result<()>;

    /// The slices of a chunk, oldest first; empty if the chunk has none.
    fn chunk(&mut self, ino: Ino, index: u32) -> Result<Vec<Slice>>;
    fn append_slice(&mut self, ino: Ino, index: u32, slice: &Slice) -> Result<()>;
    /// Replaces a chunk's slices; an empty list deletes the chunk.
    fn set_chunk(&mut self, ino: Ino, index: u32, slices: &[Slice]) -> Result<()>;

    fn format(&mut self) -> Result<Option<Format>>;
    fn set_format(&mut self, format: &Format) -> Result<()>;

    /// Reserves `n` ids of `counter` and returns the first: the counter holds the last id
    /// handed out (0 at first; format sets the inode counter to 1, the root). May take
    /// effect even if the transaction is rerun or aborted: an id is never handed out
    /// twice, some may be skipped.
    fn alloc(&mut self, counter: Counter, n: u64) -> Result<u64>;
    /// Adds to the usage counters (applied atomically with the transaction).
    fn add_usage(&mut self, bytes: i64, inodes: i64) -> Result<()>;
    fn usage(&mut self) -> Result<Usage>;

    fn session(&mut self, sid: SessionId) -> Result<Option<SessionInfo>>;
    fn set_session(&mut self, sid: SessionId, info: &SessionInfo) -> Result<()>;
    fn del_session(&mut self, sid: SessionId) -> Result<()>;
    fn sessions(&mut self) -> Result<Vec<(SessionId, SessionInfo)>>;

    /// Inodes kept open-but-unlinked by a session.
    fn sustained(&mut self, sid: SessionId) -> Result<Vec<Ino>>;
    fn add_sustained(&mut self, sid: SessionId, ino: Ino) -> Result<()>;
    fn del_sustained(&mut self, sid: SessionId, ino: Ino) -> Result<()>;

    /// All locks on an inode.
    fn locks(&mut self, ino: Ino) -> Result<Vec<RangeLock>>;
    /// Replaces the locks on an inode; empty deletes.
    fn set_locks(&mut self, ino: Ino, locks: &[RangeLock]) -> Result<()>;
    /// Inodes on which a session may hold locks.
    fn session_locked(&mut self, sid: SessionId) -> Result<Vec<Ino>>;
    fn add_session_locked(&mut self, sid: SessionId, ino: Ino) -> Result<()>;
    fn del_session_locked(&mut self, sid: SessionId, ino: Ino) -> Result<()>;

    fn add_dead_slice(&mut self, dead: &DeadSlice) -> Result<()>;
    /// Dead slices in order of `since`, before `before`, at most `limit`.
    fn dead_slices(&mut self, before: Timestamp, limit: usize) -> Result<Vec<DeadSlice>>;
    fn del_dead_slice(&mut self, id: u64) -> Result<()>;

    /// The outcome recorded for request `unique` of session `sid` (a point read).
    fn request(&mut self, sid: SessionId, unique: u64) -> Result<Option<Vec<u8>>>;
    fn set_request(&mut self, sid: SessionId, unique: u64, outcome: &[u8]) -> Result<()>;
    /// Deletes the session's request records with a unique below `below` (`u64::MAX`:
    /// all of them).
    fn del_requests(&mut self, sid: SessionId, below: u64) -> Result<()>;
}

/// A transactional store the metadata logic runs on.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    fn name(&self) -> &'static str;
    /// Runs `f` in a read-write transaction and commits it if `f` returns Ok. May run `f`
    /// more than once (optimistic backends retry on conflict).
    fn write<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T>;
    /// Runs `f` in a read-only transaction.
    fn read<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T>;
}

/// Open the metadata engine named by `url`: `redb:///path/meta.redb` or
/// `redis://host:port/db`.
pub fn open(url: &str) -> Result<Arc<dyn MetaEngine>, MetaError> {
    let parsed = url::Url::parse(url).map_err(|e| MetaError::BadUrl {
        url: redis::redact(url),
        reason: e.to_string(),
    })?;
    match parsed.scheme() {
        "redb" => {
            let path = parsed.path();
            if path.is_empty() || path == "/" {
                return Err(MetaError::BadUrl {
                    url: url.to_string(),
                    reason: "redb URL needs a file path, e.g. redb:///var/lib/baton/meta.redb"
                        .into(),
                });
            }
            Ok(Arc::new(Meta::new(redb::RedbBackend::open(
                std::path::Path::new(path),
            )?)))
        }
        "redis" | "rediss" => Ok(Arc::new(Meta::new(redis::RedisBackend::open(url)?))),
        other => Err(MetaError::BadUrl {
            url: redis::redact(url),
            reason: format!("unknown metadata scheme {other:?} (use redb:// or redis://)"),
        }),
    }
}
