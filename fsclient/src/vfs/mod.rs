//! The filesystem: POSIX operations over the metadata engine and the data path, with no
//! FUSE types (the adapter in `fuse::adapter` converts).
//!
//! What it keeps in memory is either a cache or is rebuilt from the metadata engine and
//! the handle numbers ([`handle`]): a successor process can serve any request this one
//! was serving. What it must never do: answer before the metadata change is committed, or
//! drop written data that was acknowledged (it is flushed on fsync, flush, close, and
//! before anything that depends on it: truncate, reads, shutdown).

mod background;
mod errno;
pub mod fault;
pub mod handle;
pub mod perm;
pub mod requests;
mod tracked;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::data::{CommitMarks, DataConfig, DataStore};
use crate::meta::{
    self, Attr, Caller, DirEntry, Fallocate, FileKind, Format, Ino, LockOwner, LockRequest,
    LockType, MetaEngine, MetaError, NewNode, RangeLock, RenameFlags, RequestId, SessionId,
    SessionInfo, SetAttr, Timestamp, XattrMode,
};

pub use errno::{FsError, meta_errno};
use fault::{Faults, Op};
use handle::{Fh, Handle, HandleFlags, HandleTable, NEXT_HANDLE_INCOMPLETE};
use requests::{InFlight, Requests};
use tracked::Tracked;

pub type Result<T, E = FsError> = std::result::Result<T, E>;

/// How a client serves a volume.
#[derive(Clone, Debug)]
pub struct VfsConfig {
    pub meta_url: String,
    pub mountpoint: String,
    /// Baton's data directory; the block cache defaults to `home/cache/<volume uuid>`.
    pub home: PathBuf,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub cache_dir: Option<PathBuf>,
    pub cache_bytes: u64,
    pub version: String,
    /// How often the session's heartbeat is written.
    pub heartbeat: Duration,
    /// Sessions silent for longer than this are cleaned up by other clients.
    pub session_timeout: Duration,
    /// How long an unreferenced object is kept before it is deleted (readers that
    /// resolved the old layout may still fetch it).
    pub gc_grace: Duration,
    /// The metadata session to take over (a successor keeps its predecessor's, with its
    /// locks and open-but-unlinked files); `None` opens a new one.
    pub resume_session: Option<SessionId>,
    /// How long the records that make resent requests run once are kept after their
    /// unique was seen ([`requests::RETENTION`]; see `vfs::requests`).
    pub request_retention: Duration,
}

impl VfsConfig {
    pub fn new(
        meta_url: impl Into<String>,
        mountpoint: impl Into<String>,
        home: impl Into<PathBuf>,
    ) -> Self {
        VfsConfig {
            meta_url: meta_url.into(),
            mountpoint: mountpoint.into(),
            home: home.into(),
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            cache_dir: None,
            cache_bytes: 1 << 30,
            version: env!("CARGO_PKG_VERSION").to_string(),
            heartbeat: Duration::from_secs(10),
            session_timeout: Duration::from_secs(300),
            gc_grace: Duration::from_secs(60),
            resume_session: None,
            request_retention: requests::RETENTION,
        }
    }
}

/// Opening the filesystem failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the metadata engine")]
    Meta(#[source] MetaError),
    #[error("cannot read the volume settings")]
    Format(#[source] MetaError),
    #[error("cannot open the object storage")]
    Data(#[source] crate::data::OpenError),
    #[error("cannot open a session in the metadata engine")]
    Session(#[source] MetaError),
    #[error("cannot resume session {sid} (it was closed or cleaned up as stale)")]
    ResumeSession {
        sid: SessionId,
        #[source]
        source: MetaError,
    },
    #[error("cannot start the background worker")]
    Background(#[source] std::io::Error),
    #[error("bad fault injection setting")]
    Fault(#[source] fault::BadFault),
}

/// The FUSE `unique` of a kernel request, as the kernel sent it (bit 63 set: delivered
/// again after FUSE_NOTIFY_RESEND). Mutations take it so that a request a dead process
/// already applied is not applied twice (`meta/once.rs`); `None` is not a kernel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unique(pub u64);

/// Shutting the filesystem down failed; data may not have been written.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("flushing written data failed")]
    Flush(#[source] crate::data::DataError),
    #[error("closing the session failed")]
    Session(#[source] MetaError),
}

/// How a blocking lock request (F_SETLKW) waits between two attempts.
pub trait LockWait {
    /// Waits about `delay` before the next attempt. May return early, or block much longer
    /// (the FUSE adapter parks the request here while a live upgrade hands over).
    fn wait(&self, delay: Duration);
}

/// Waits by sleeping.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sleep;

impl LockWait for Sleep {
    fn wait(&self, delay: Duration) {
        std::thread::sleep(delay);
    }
}

/// The per-process tables of a [`Vfs`] that a successor process takes over: everything
/// else is in the metadata engine or rebuilt from handle numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Kernel lookup references per inode.
    pub lookups: Vec<(Ino, u64)>,
    /// Open file and directory handles.
    pub handles: Vec<Fh>,
    /// (inode, lock owner) pairs that took a lock.
    pub lockers: Vec<(Ino, u64)>,
    /// Inodes unlinked while open, freed at their last close.
    pub orphans: Vec<Ino>,
    /// Next value of the handle counter.
    pub next_handle: u32,
}

/// What changed in the [`Tables`] since [`Vfs::export_base`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableChanges {
    /// Inodes whose lookup count changed: (inode, count now), 0 when none is left.
    pub lookups: Vec<(Ino, u64)>,
    /// Handles opened since, still open.
    pub opened: Vec<Fh>,
    /// Handles closed since (some opened since, too).
    pub closed: Vec<Fh>,
    /// Open file handles of the inodes whose lock owners changed.
    pub relocked: Vec<Fh>,
    /// (inode, lock owner) pairs now, whole.
    pub lockers: Vec<(Ino, u64)>,
    /// Inodes unlinked while open, whole.
    pub orphans: Vec<Ino>,
    pub next_handle: u32,
}

/// What `statfs` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// Reported capacity of a volume without a quota: 1 PiB.
const UNLIMITED_BYTES: u64 = 1 << 50;
const UNLIMITED_INODES: u64 = 1 << 40;

/// One Baton volume, served to the kernel.
#[derive(Debug)]
pub struct Vfs {
    meta: Arc<dyn MetaEngine>,
    data: Arc<DataStore>,
    format: Format,
    sid: SessionId,
    config: VfsConfig,
    handles: HandleTable,
    /// Kernel lookup references per inode (entries handed out minus forgets).
    lookups: Mutex<Tracked<HashMap<Ino, u64>, Ino>>,
    /// Inodes that lost their last name while open here: freed at their last close.
    orphans: Mutex<HashSet<Ino>>,
    /// (inode, lock owner) pairs that took a lock here, so that a close only writes to
    /// the metadata engine when there is a lock to release. Changes are recorded by inode.
    lockers: Mutex<Tracked<HashSet<(Ino, u64)>, Ino>>,
    /// The kernel may hold handles this process never saw: it (or a predecessor) took the
    /// session over after a crash. Then no inode is known to be closed: an unlinked file
    /// is always kept, and freed when the kernel forgets the inode (which it does only
    /// once no descriptor is open), not at the last close seen here.
    unknown_handles: AtomicBool,
    background: Mutex<Option<background::Worker>>,
    /// Mutations executing here, which bound the dropping of request records.
    requests: Requests,
    faults: Faults,
}

/// A mutation being executed for a kernel request.
struct Mutation<'a> {
    id: Option<RequestId>,
    _in_flight: Option<InFlight<'a>>,
}

impl Vfs {
    /// Opens the volume: metadata engine, settings, object storage (checked), session.
    pub fn open(config: VfsConfig, rt: tokio::runtime::Handle) -> Result<Arc<Vfs>, OpenError> {
        let meta = meta::open(&config.meta_url).map_err(OpenError::Meta)?;
        let format = meta.load_format().map_err(OpenError::Format)?;
        // The data store keeps each volume's blocks under `<cache_dir>/<uuid>`.
        let cache_dir = config
            .cache_dir
            .clone()
            .unwrap_or_else(|| config.home.join("cache"));
        let data_config = DataConfig {
            cache_dir: Some(cache_dir),
            cache_bytes: config.cache_bytes,
            ..DataConfig::default()
        };
        let data = DataStore::open(&format.storage, &format, data_config, meta.clone(), rt)
            .map_err(OpenError::Data)?;
        let info = SessionInfo {
            host: hostname(),
            mountpoint: config.mountpoint.clone(),
            pid: std::process::id(),
            version: config.version.clone(),
            heartbeat: Timestamp::now(),
        };
        let sid = match config.resume_session {
            Some(sid) => {
                meta.resume_session(sid, &info)
                    .map_err(|source| OpenError::ResumeSession { sid, source })?;
                sid
            }
            None => meta.new_session(&info).map_err(OpenError::Session)?,
        };
        let resumed = config.resume_session.is_some();
        let faults = if resumed {
            Faults::NONE
        } else {
            Faults::from_env().map_err(OpenError::Fault)?
        };
        if let Some(op) = faults.after_apply_of() {
            tracing::warn!(%op, "fault injection armed: this client aborts after its first {op}");
        }
        tracing::info!(volume = %format.name, session = %sid, resumed, meta = meta.backend_name(), "volume opened");
        let vfs = Arc::new(Vfs {
            meta,
            data,
            format,
            sid,
            config,
            handles: HandleTable::default(),
            lookups: Mutex::new(Tracked::new(HashMap::new())),
            orphans: Mutex::new(HashSet::new()),
            lockers: Mutex::new(Tracked::new(HashSet::new())),
            unknown_handles: AtomicBool::new(false),
            background: Mutex::new(None),
            requests: Requests::default(),
            faults,
        });
        let worker = background::Worker::start(&vfs).map_err(OpenError::Background)?;
        *vfs.background.lock() = Some(worker);
        Ok(vfs)
    }

    /// Flushes every written byte and closes the session (releasing its locks and freeing
    /// its open-but-unlinked files). Called once, after the kernel connection ended.
    pub fn shutdown(&self) -> Result<(), ShutdownError> {
        if let Some(w) = self.background.lock().take() {
            w.stop();
        }
        self.data.flush_all().map_err(ShutdownError::Flush)?;
        self.meta
            .close_session(self.sid)
            .map_err(ShutdownError::Session)?;
        tracing::info!(session = %self.sid, "session closed");
        Ok(())
    }

    /// Stops the background work without flushing or closing the session: for a successor
    /// that gives up before it served (its predecessor still uses the session and has
    /// written nothing through this process).
    pub fn abandon(&self) {
        if let Some(w) = self.background.lock().take() {
            w.stop();
        }
        tracing::info!(session = %self.sid, "volume left without closing the session");
    }

    /// Everything a successor process needs of this one's tables. Consistent only while no
    /// request executes (the caller freezes the FUSE adapter first).
    pub fn export_tables(&self) -> Tables {
        self.tables(false)
    }

    /// [`Vfs::export_tables`] while serving, for a handover that sends only the changes
    /// inside the freeze: from now on every table records what changes (anew if a base
    /// was out already), until [`Vfs::export_changes`] or [`Vfs::drop_base`]. Each table
    /// is read and starts recording under its own lock, so that no change falls between.
    pub fn export_base(&self) -> Tables {
        self.tables(true)
    }

    /// The tables, sorted; with `base`, every table starts recording its changes.
    fn tables(&self, base: bool) -> Tables {
        let (handles, mut next_handle) = if base {
            self.handles.export_base()
        } else {
            self.handles.snapshot()
        };
        if self.unknown_handles.load(Ordering::Relaxed) {
            next_handle |= NEXT_HANDLE_INCOMPLETE;
        }
        let mut lookups: Vec<(Ino, u64)> = {
            let mut l = self.lookups.lock();
            if base {
                l.start();
            }
            l.iter().map(|(i, n)| (*i, *n)).collect()
        };
        lookups.sort_unstable();
        if base {
            self.lockers.lock().start();
        }
        let (lockers, orphans) = self.lockers_and_orphans();
        Tables {
            lookups,
            handles,
            lockers,
            orphans,
            next_handle,
        }
    }

    /// The (inode, lock owner) pairs and the orphans, sorted.
    fn lockers_and_orphans(&self) -> (Vec<(Ino, u64)>, Vec<Ino>) {
        let mut lockers: Vec<(Ino, u64)> = self.lockers.lock().iter().copied().collect();
        lockers.sort_unstable();
        let mut orphans: Vec<Ino> = self.orphans.lock().iter().copied().collect();
        orphans.sort_unstable();
        (lockers, orphans)
    }

    /// What changed since [`Vfs::export_base`]; `None` if no base is out. The base is
    /// done with. Consistent only while no request executes (the caller froze).
    pub fn export_changes(&self) -> Option<TableChanges> {
        let handles = self.handles.take_changes();
        let lookups = self.lookups.lock().take();
        let relocked = self.lockers.lock().take();
        let ((opened, closed, mut next_handle), changed, relocked) =
            match (handles, lookups, relocked) {
                (Some(h), Some(l), Some(r)) => (h, l, r),
                _ => {
                    self.drop_base();
                    return None;
                }
            };
        if self.unknown_handles.load(Ordering::Relaxed) {
            next_handle |= NEXT_HANDLE_INCOMPLETE;
        }
        let mut lookups: Vec<(Ino, u64)> = {
            let l = self.lookups.lock();
            changed
                .into_iter()
                .map(|ino| (ino, l.get(&ino).copied().unwrap_or(0)))
                .collect()
        };
        lookups.sort_unstable();
        let (lockers, orphans) = self.lockers_and_orphans();
        Some(TableChanges {
            lookups,
            opened,
            closed,
            relocked: self.handles.files_of(&relocked),
            lockers,
            orphans,
            next_handle,
        })
    }

    /// The base is dropped (the handover it was for ended): stop recording changes.
    pub fn drop_base(&self) {
        self.handles.stop_recording();
        self.lookups.lock().stop();
        self.lockers.lock().stop();
    }

    /// Adds a predecessor's tables to this process's (which has served nothing yet).
    pub fn import_tables(&self, t: &Tables) {
        if t.next_handle & NEXT_HANDLE_INCOMPLETE != 0 {
            self.unknown_handles.store(true, Ordering::Relaxed);
        }
        self.handles.restore(&t.handles, t.next_handle);
        {
            let mut l = self.lookups.lock();
            let l = l.edit_untracked();
            for (ino, n) in &t.lookups {
                *l.entry(*ino).or_insert(0) += n;
            }
        }
        self.lockers
            .lock()
            .edit_untracked()
            .extend(t.lockers.iter().copied());
        self.orphans.lock().extend(t.orphans.iter().copied());
    }

    /// Adds a predecessor's lookup counts, built as a table already (a staged base):
    /// taken as it is when this process has none yet (it has served nothing).
    pub fn import_lookups(&self, counts: HashMap<Ino, u64>) {
        let mut l = self.lookups.lock();
        let l = l.edit_untracked();
        if l.is_empty() {
            *l = counts;
        } else {
            for (ino, n) in counts {
                *l.entry(ino).or_insert(0) += n;
            }
        }
    }

    /// Takes over the session of a predecessor that crashed (no tables came with it):
    /// learns the session's open-but-unlinked inodes and locks from the metadata engine,
    /// and from now on assumes the kernel holds handles this process never saw (they are
    /// rebuilt from their numbers when used). Called before serving.
    pub fn take_over_after_crash(&self) -> Result<(), MetaError> {
        let held = self.meta.session_holdings(self.sid)?;
        tracing::info!(
            session = %self.sid,
            unlinked = held.unlinked.len(),
            locks = held.lockers.len(),
            "took over a crashed client's session"
        );
        self.unknown_handles.store(true, Ordering::Relaxed);
        self.orphans.lock().extend(held.unlinked);
        self.lockers.lock().edit_untracked().extend(held.lockers);
        Ok(())
    }

    /// Frees the open-but-unlinked files the kernel no longer has (`kernel_holds` says
    /// whether it has an inode in its cache: without it, no descriptor of it is open).
    /// For a process that took over after a crash: it inherited the session's unlinked
    /// files, and the FORGETs that would free some of them may have died with its
    /// predecessor. Stops at the first probe that fails. Returns how many were freed.
    pub fn sweep_orphans(&self, kernel_holds: &dyn Fn(Ino) -> std::io::Result<bool>) -> usize {
        if !self.unknown_handles.load(Ordering::Relaxed) {
            return 0;
        }
        let candidates: Vec<Ino> = self.orphans.lock().iter().copied().collect();
        let mut freed = 0;
        for ino in candidates {
            match kernel_holds(ino) {
                Ok(true) => {}
                Ok(false) => {
                    if self.orphans.lock().remove(&ino) {
                        self.data.discard(ino);
                        match self.meta.release_unlinked(self.sid, ino) {
                            Ok(()) => freed += 1,
                            Err(e) => {
                                tracing::warn!(%ino, error = %e, "cannot free an open-but-unlinked file (the session frees it at its end)")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%ino, error = %e, "cannot ask the kernel about an inode; unlinked files are freed when it forgets them");
                    break;
                }
            }
        }
        freed
    }

    /// Sets the epoch of the handle numbers this process opens (its client generation),
    /// so that they never repeat one a crashed predecessor handed to the kernel.
    pub fn set_handle_epoch(&self, generation: u64) {
        self.handles.set_epoch(generation);
    }

    /// Whether the kernel may hold handles this process never saw (it, or a predecessor,
    /// took over after a crash).
    pub fn has_unknown_handles(&self) -> bool {
        self.unknown_handles.load(Ordering::Relaxed)
    }

    /// Whether `ino` may be open in the kernel.
    fn may_be_open(&self, ino: Ino) -> bool {
        self.unknown_handles.load(Ordering::Relaxed) || self.handles.is_open(ino)
    }

    pub fn config(&self) -> &VfsConfig {
        &self.config
    }

    pub fn format(&self) -> &Format {
        &self.format
    }

    pub fn session(&self) -> SessionId {
        self.sid
    }

    pub fn meta(&self) -> &Arc<dyn MetaEngine> {
        &self.meta
    }

    pub fn data(&self) -> &Arc<DataStore> {
        &self.data
    }

    /// Attributes as the kernel must see them: the size includes written, unflushed data.
    /// `marks` were taken before `attr` was read from the engine.
    ///
    /// The kernel takes the size of every reply (Baton does not use its writeback cache)
    /// and computes each `O_APPEND` write's offset from it, so it must never fall below
    /// what acknowledged writes made it. A flush on another thread (a handover's pre-flush,
    /// a close, a reader's) commits buffered bytes to the engine, then drops them from the
    /// buffers: committed after `attr` was read and dropped before the buffers are looked
    /// at, they would be in neither. When that may have happened, the attributes are read
    /// again, the buffers first: bytes that left them by then are in the engine.
    fn with_pending(&self, ino: Ino, attr: Attr, marks: &CommitMarks) -> Result<Attr> {
        if attr.kind != FileKind::File {
            return Ok(attr);
        }
        let end = self.data.pending_end(ino);
        if !self.data.committed_since(marks, ino) {
            return Ok(grown_to(attr, end));
        }
        let end = self.data.pending_end(ino);
        Ok(grown_to(self.meta.getattr(ino)?, end))
    }

    /// Starts executing a mutation for kernel request `unique`, if it is one.
    fn mutation(&self, unique: Option<Unique>) -> Mutation<'_> {
        match unique {
            Some(Unique(u)) => {
                let id = RequestId::from_fuse(self.sid, u);
                Mutation {
                    id: Some(id),
                    _in_flight: Some(self.requests.begin(id.unique)),
                }
            }
            None => Mutation {
                id: None,
                _in_flight: None,
            },
        }
    }

    /// Drops the request records that can no longer be needed (background, periodically).
    fn forget_requests(&self, now: std::time::Instant) {
        let Some(below) = self.requests.sweep(now, self.config.request_retention) else {
            return;
        };
        match self.meta.forget_requests(self.sid, below) {
            Ok(()) => self.requests.dropped(below),
            Err(e) => tracing::warn!(error = %e, "dropping old request records failed"),
        }
    }

    fn remember(&self, ino: Ino) {
        *self.lookups.lock().edit(ino).entry(ino).or_insert(0) += 1;
    }

    fn removed(&self, r: meta::Removed) {
        if r.kept {
            self.orphans.lock().insert(r.ino);
        } else {
            self.data.discard(r.ino);
        }
        self.data.invalidate(r.ino);
    }

    fn handle(&self, ino: Ino, fh: u64) -> Result<Arc<Handle>> {
        self.handles.get(ino, fh).ok_or(FsError::Posix(libc::EBADF))
    }

    // --- namespace ---

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)> {
        let marks = self.data.commit_marks();
        let (ino, attr) = self.meta.lookup(parent, name)?;
        let attr = self.with_pending(ino, attr, &marks)?;
        self.remember(ino);
        Ok((ino, attr))
    }

    /// The kernel dropped `n` references to `ino` (an inode never looked up here is
    /// ignored). The kernel forgets an inode only once no descriptor of it is open: when
    /// handles may be unknown here, that is when an open-but-unlinked file is freed.
    pub fn forget(&self, ino: Ino, n: u64) {
        {
            let mut l = self.lookups.lock();
            let l = l.edit(ino);
            if let Some(c) = l.get_mut(&ino) {
                *c = c.saturating_sub(n);
                if *c == 0 {
                    l.remove(&ino);
                }
            }
        }
        if self.unknown_handles.load(Ordering::Relaxed) && self.orphans.lock().remove(&ino) {
            self.data.discard(ino);
            if let Err(e) = self.meta.release_unlinked(self.sid, ino) {
                tracing::warn!(%ino, error = %e, "cannot free an open-but-unlinked file (the session frees it at its end)");
            }
        }
    }

    /// Kernel lookup references per inode (handed to a successor).
    pub fn lookup_counts(&self) -> Vec<(Ino, u64)> {
        self.lookups.lock().iter().map(|(i, n)| (*i, *n)).collect()
    }

    /// A new handle number for `ino`; ENFILE when this generation has no free number for
    /// it (thousands of opens of one inode with the same flags at once).
    fn open_handle(&self, ino: Ino, flags: HandleFlags) -> Result<u64> {
        self.handles
            .open(ino, flags)
            .map(|h| h.fh.0)
            .ok_or(FsError::Posix(libc::ENFILE))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let marks = self.data.commit_marks();
        let attr = self.meta.getattr(ino)?;
        self.with_pending(ino, attr, &marks)
    }

    pub fn setattr(&self, unique: Option<Unique>, ino: Ino, set: &SetAttr) -> Result<Attr> {
        let m = self.mutation(unique);
        if set.size.is_some() {
            // Written data lands before the size changes, not after it.
            self.data.flush(ino)?;
        }
        let marks = self.data.commit_marks();
        let attr = self.meta.setattr(m.id, ino, set, Timestamp::now())?;
        self.faults.after_apply(Op::Setattr);
        if set.size.is_some() {
            self.data.invalidate(ino);
        }
        self.with_pending(ino, attr, &marks)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.meta.readlink(ino)?)
    }

    /// Creates a non-directory node (regular file, fifo, device, socket) from a full
    /// `st_mode`.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        unique: Option<Unique>,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Ino, Attr)> {
        let kind = FileKind::from_mode(mode).unwrap_or(FileKind::File);
        if kind == FileKind::Dir || kind == FileKind::Symlink {
            return Err(FsError::Posix(libc::EINVAL));
        }
        let perm = (mode & !umask & 0o7777) as u16;
        let node = NewNode {
            kind,
            perm,
            rdev,
            target: Vec::new(),
        };
        self.create_node(unique, caller, parent, name, &node, Op::Mknod)
    }

    pub fn mkdir(
        &self,
        unique: Option<Unique>,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> Result<(Ino, Attr)> {
        let perm = (mode & !umask & 0o7777) as u16;
        let node = NewNode {
            kind: FileKind::Dir,
            perm,
            rdev: 0,
            target: Vec::new(),
        };
        self.create_node(unique, caller, parent, name, &node, Op::Mkdir)
    }

    pub fn symlink(
        &self,
        unique: Option<Unique>,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<(Ino, Attr)> {
        let node = NewNode {
            kind: FileKind::Symlink,
            perm: 0o777,
            rdev: 0,
            target: target.to_vec(),
        };
        self.create_node(unique, caller, parent, name, &node, Op::Symlink)
    }

    fn create_node(
        &self,
        unique: Option<Unique>,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        op: Op,
    ) -> Result<(Ino, Attr)> {
        let m = self.mutation(unique);
        let (ino, attr) = self.meta.mknod(m.id, parent, name, node, caller)?;
        self.faults.after_apply(op);
        self.remember(ino);
        Ok((ino, attr))
    }

    pub fn unlink(&self, unique: Option<Unique>, parent: Ino, name: &[u8]) -> Result<()> {
        let m = self.mutation(unique);
        let r = self
            .meta
            .unlink(m.id, self.sid, parent, name, &|ino| self.may_be_open(ino))?;
        self.faults.after_apply(Op::Unlink);
        self.removed(r);
        Ok(())
    }

    pub fn rmdir(&self, unique: Option<Unique>, parent: Ino, name: &[u8]) -> Result<()> {
        let m = self.mutation(unique);
        self.meta.rmdir(m.id, parent, name)?;
        self.faults.after_apply(Op::Rmdir);
        Ok(())
    }

    /// rename(2) with renameat2 flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename(
        &self,
        unique: Option<Unique>,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<()> {
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 {
            // RENAME_WHITEOUT is for overlay filesystems.
            return Err(FsError::Posix(libc::EINVAL));
        }
        let flags = RenameFlags {
            noreplace: flags & libc::RENAME_NOREPLACE != 0,
            exchange: flags & libc::RENAME_EXCHANGE != 0,
        };
        let m = self.mutation(unique);
        let is_open = |ino| self.may_be_open(ino);
        let replaced = self.meta.rename(
            m.id, self.sid, parent, name, new_parent, new_name, flags, &is_open,
        )?;
        self.faults.after_apply(Op::Rename);
        if let Some(r) = replaced {
            self.removed(r);
        }
        Ok(())
    }

    pub fn link(
        &self,
        unique: Option<Unique>,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
    ) -> Result<(Ino, Attr)> {
        let m = self.mutation(unique);
        let marks = self.data.commit_marks();
        let attr = self.meta.link(m.id, ino, new_parent, new_name)?;
        self.faults.after_apply(Op::Link);
        let attr = self.with_pending(ino, attr, &marks)?;
        self.remember(ino);
        Ok((ino, attr))
    }

    // --- files ---

    /// Opens a file; returns the handle number.
    pub fn open_file(&self, ino: Ino, flags: i32) -> Result<u64> {
        let attr = self.meta.getattr(ino)?;
        match attr.kind {
            FileKind::Dir => return Err(FsError::Posix(libc::EISDIR)),
            FileKind::Symlink => return Err(FsError::Posix(libc::ELOOP)),
            _ => {}
        }
        // Close-to-open: what another client wrote before our open is read fresh.
        self.data.invalidate(ino);
        self.open_handle(ino, HandleFlags::from_open_flags(flags))
    }

    /// Creates and opens a regular file. Without O_EXCL an existing file (created by
    /// another client since the kernel's lookup) is opened instead.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        unique: Option<Unique>,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Ino, Attr, u64)> {
        let m = self.mutation(unique);
        let marks = self.data.commit_marks();
        let perm = (mode & !umask & 0o7777) as u16;
        let node = NewNode {
            kind: FileKind::File,
            perm,
            rdev: 0,
            target: Vec::new(),
        };
        let (ino, attr) = match self.meta.mknod(m.id, parent, name, &node, caller) {
            Ok(x) => {
                self.faults.after_apply(Op::Create);
                x
            }
            Err(MetaError::Exists) if flags & libc::O_EXCL == 0 => {
                let (ino, attr) = self.meta.lookup(parent, name)?;
                if attr.kind == FileKind::Dir {
                    return Err(FsError::Posix(libc::EISDIR));
                }
                (ino, attr)
            }
            Err(e) => return Err(e.into()),
        };
        let attr = self.with_pending(ino, attr, &marks)?;
        self.remember(ino);
        let fh = self.open_handle(ino, HandleFlags::from_open_flags(flags))?;
        Ok((ino, attr, fh))
    }

    pub fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.handle(ino, fh)?;
        if h.flags().dir {
            return Err(FsError::Posix(libc::EISDIR));
        }
        if self.data.is_dirty(ino) {
            self.data.flush(ino)?;
        }
        let attr = self.meta.getattr(ino)?;
        let mut state = h.read_state.lock();
        Ok(self.data.read(ino, offset, size, attr.size, &mut state)?)
    }

    /// Writes need no request record: a write carries its offset, also for O_APPEND (the
    /// kernel computed it), so one delivered again after a crash writes the same bytes at
    /// the same place.
    pub fn write(&self, ino: Ino, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(ino, fh)?;
        if !h.flags().write {
            return Err(FsError::Posix(libc::EBADF));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::Posix(libc::EFBIG))?;
        if end > meta::MAX_FILE_SIZE {
            return Err(FsError::Posix(libc::EFBIG));
        }
        self.data.write(ino, offset, data)?;
        self.faults.after_apply(Op::Write);
        Ok(data.len() as u32)
    }

    /// close(2) of one descriptor: written data is committed (close-to-open), and the
    /// POSIX locks of `lock_owner` on the file are released.
    pub fn flush(&self, ino: Ino, fh: u64, lock_owner: u64) -> Result<()> {
        let h = self.handle(ino, fh)?;
        let flushed = if h.flags().write {
            self.data.flush(ino)
        } else {
            Ok(())
        };
        self.release_locks(ino, lock_owner)?;
        Ok(flushed?)
    }

    /// The last close of an open file description.
    pub fn release(&self, ino: Ino, fh: u64, flock_owner: Option<u64>) -> Result<()> {
        let flags = Fh(fh).flags();
        let mut result = if flags.write {
            self.data.flush(ino).map_err(FsError::from)
        } else {
            Ok(())
        };
        if let Some(owner) = flock_owner {
            if let Err(e) = self.release_locks(ino, owner) {
                result = result.and(Err(e));
            }
        }
        // With unknown handles, the last close seen here may not be the last one: the
        // inode is freed when the kernel forgets it (`forget`).
        let last = self.handles.close(fh) && !self.unknown_handles.load(Ordering::Relaxed);
        if last && self.orphans.lock().remove(&ino) {
            self.data.discard(ino);
            if let Err(e) = self.meta.release_unlinked(self.sid, ino) {
                result = result.and(Err(e.into()));
            }
        }
        result
    }

    pub fn fsync(&self, ino: Ino, _fh: u64) -> Result<()> {
        // Metadata commits are already durable; data needs its upload.
        Ok(self.data.flush(ino)?)
    }

    pub fn fallocate(
        &self,
        unique: Option<Unique>,
        ino: Ino,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        let m = self.mutation(unique);
        let h = self.handle(ino, fh)?;
        if !h.flags().write {
            return Err(FsError::Posix(libc::EBADF));
        }
        const KEEP: i32 = libc::FALLOC_FL_KEEP_SIZE;
        let how = match mode {
            0 => Fallocate::Allocate { keep_size: false },
            KEEP => Fallocate::Allocate { keep_size: true },
            m if m == libc::FALLOC_FL_PUNCH_HOLE | KEEP => Fallocate::PunchHole,
            m if m == libc::FALLOC_FL_ZERO_RANGE => Fallocate::ZeroRange { keep_size: false },
            m if m == libc::FALLOC_FL_ZERO_RANGE | KEEP => Fallocate::ZeroRange { keep_size: true },
            // COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, PUNCH_HOLE without KEEP_SIZE.
            _ => return Err(FsError::Posix(libc::EOPNOTSUPP)),
        };
        self.data.flush(ino)?;
        self.meta
            .fallocate(m.id, ino, how, offset, length, Timestamp::now())?;
        self.faults.after_apply(Op::Fallocate);
        self.data.invalidate(ino);
        Ok(())
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel does the other whences itself). The whole
    /// file is reported as data, which POSIX allows.
    pub fn lseek(&self, ino: Ino, _fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let size = self.getattr(ino)?.size;
        let off = u64::try_from(offset).map_err(|_| FsError::Posix(libc::EINVAL))?;
        match whence {
            libc::SEEK_DATA if off < size => Ok(offset),
            libc::SEEK_HOLE if off < size => Ok(size as i64),
            libc::SEEK_DATA | libc::SEEK_HOLE => Err(FsError::Posix(libc::ENXIO)),
            _ => Err(FsError::Posix(libc::EINVAL)),
        }
    }

    // --- directories ---

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let attr = self.meta.getattr(ino)?;
        if attr.kind != FileKind::Dir {
            return Err(FsError::Posix(libc::ENOTDIR));
        }
        self.open_handle(ino, HandleFlags::directory())
    }

    /// Entries after `offset` (a cookie from an earlier entry, or 0), "." and ".."
    /// first. With `plus`, entries carry attributes and count as lookups (the kernel
    /// takes a reference on each, except "." and "..").
    pub fn readdir(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        limit: usize,
        plus: bool,
    ) -> Result<Vec<DirEntry>> {
        let h = self.handle(ino, fh)?;
        if !h.flags().dir {
            return Err(FsError::Posix(libc::ENOTDIR));
        }
        let mut out = Vec::new();
        if offset < 2 {
            let dir = self.meta.getattr(ino)?;
            if offset == 0 {
                out.push(DirEntry {
                    name: b".".to_vec(),
                    ino,
                    kind: FileKind::Dir,
                    cookie: 1,
                    attr: plus.then(|| dir.clone()),
                });
            }
            let parent = if dir.parent.0 == 0 { ino } else { dir.parent };
            let pattr = if plus {
                Some(self.meta.getattr(parent)?)
            } else {
                None
            };
            out.push(DirEntry {
                name: b"..".to_vec(),
                ino: parent,
                kind: FileKind::Dir,
                cookie: 2,
                attr: pattr,
            });
        }
        let want = limit.saturating_sub(out.len()).max(1);
        let marks = self.data.commit_marks();
        let mut entries = self.meta.readdir(ino, offset, want, plus)?;
        if plus {
            for e in &mut entries {
                if let Some(a) = e.attr.take() {
                    e.attr = Some(match self.with_pending(e.ino, a.clone(), &marks) {
                        Ok(a) => a,
                        // Removed since the listing was read: listed as it was then.
                        Err(FsError::Meta(MetaError::NotFound)) => {
                            grown_to(a, self.data.pending_end(e.ino))
                        }
                        Err(err) => return Err(err),
                    });
                }
            }
        }
        out.extend(entries);
        Ok(out)
    }

    /// The adapter reports which readdirplus entries reached the kernel.
    pub fn readdirplus_sent(&self, ino: Ino) {
        self.remember(ino);
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.close(fh);
    }

    // --- volume ---

    pub fn statfs(&self) -> Result<StatFs> {
        let usage = self.meta.usage()?;
        let bsize = 4096u64;
        let cap = if self.format.capacity > 0 {
            self.format.capacity
        } else {
            UNLIMITED_BYTES
        };
        let inodes = if self.format.inodes > 0 {
            self.format.inodes
        } else {
            UNLIMITED_INODES
        };
        Ok(StatFs {
            blocks: cap / bsize,
            bfree: cap.saturating_sub(usage.used_bytes) / bsize,
            files: inodes,
            ffree: inodes.saturating_sub(usage.used_inodes),
            bsize: bsize as u32,
            namelen: meta::NAME_MAX as u32,
        })
    }

    // --- extended attributes ---

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        Ok(self.meta.getxattr(ino, name)?)
    }

    pub fn setxattr(
        &self,
        unique: Option<Unique>,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        if name.starts_with(b"system.posix_acl_") {
            // ACLs would be stored but not enforced; refuse rather than pretend.
            return Err(FsError::Posix(libc::EOPNOTSUPP));
        }
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return Err(FsError::Posix(libc::EINVAL)),
        };
        let m = self.mutation(unique);
        self.meta.setxattr(m.id, ino, name, value, mode)?;
        self.faults.after_apply(Op::Setxattr);
        Ok(())
    }

    /// Attribute names, each followed by a NUL byte.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for n in self.meta.listxattr(ino)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, unique: Option<Unique>, ino: Ino, name: &[u8]) -> Result<()> {
        let m = self.mutation(unique);
        self.meta.removexattr(m.id, ino, name)?;
        self.faults.after_apply(Op::Removexattr);
        Ok(())
    }

    pub fn access(&self, caller: Caller, ino: Ino, mask: u32) -> Result<()> {
        let attr = self.meta.getattr(ino)?;
        let groups = perm::process_groups(caller.pid);
        if perm::may_access(&attr, caller, &groups, mask) {
            Ok(())
        } else {
            Err(FsError::Posix(libc::EACCES))
        }
    }

    // --- locks ---

    fn lock_request(
        &self,
        owner: u64,
        typ: i32,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Result<LockRequest> {
        let typ = match typ {
            libc::F_RDLCK => Some(LockType::Read),
            libc::F_WRLCK => Some(LockType::Write),
            libc::F_UNLCK => None,
            _ => return Err(FsError::Posix(libc::EINVAL)),
        };
        Ok(LockRequest {
            owner: LockOwner {
                sid: self.sid,
                owner,
            },
            typ,
            start,
            end,
            pid,
        })
    }

    /// F_GETLK: the conflicting lock, or `None` (the caller reports F_UNLCK).
    pub fn getlk(
        &self,
        ino: Ino,
        owner: u64,
        typ: i32,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Result<Option<RangeLock>> {
        let req = self.lock_request(owner, typ, start, end, pid)?;
        Ok(self.meta.getlk(ino, &req)?)
    }

    /// F_SETLK / F_SETLKW (and flock, which the kernel sends as a whole-file lock owned
    /// by the open file). With `wait` (F_SETLKW), retries until the lock is free, calling
    /// `wait` between attempts: an attempt that fails has changed nothing, so the request
    /// may be parked there and executed again by another process.
    #[allow(clippy::too_many_arguments)]
    pub fn setlk(
        &self,
        ino: Ino,
        owner: u64,
        typ: i32,
        start: u64,
        end: u64,
        pid: u32,
        wait: Option<&dyn LockWait>,
    ) -> Result<()> {
        let req = self.lock_request(owner, typ, start, end, pid)?;
        let mut delay = Duration::from_millis(5);
        loop {
            match self.meta.setlk(ino, &req) {
                Ok(()) => {
                    if req.typ.is_some() {
                        self.lockers.lock().edit(ino).insert((ino, owner));
                    }
                    return Ok(());
                }
                Err(MetaError::WouldBlock) => match wait {
                    Some(w) => {
                        w.wait(delay);
                        delay = (delay * 2).min(Duration::from_millis(100));
                    }
                    None => return Err(MetaError::WouldBlock.into()),
                },
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn release_locks(&self, ino: Ino, owner: u64) -> Result<()> {
        if self.lockers.lock().edit(ino).remove(&(ino, owner)) {
            self.meta.release_locks(
                ino,
                LockOwner {
                    sid: self.sid,
                    owner,
                },
            )?;
        }
        Ok(())
    }
}

/// `attr` with its size raised to `end`, the extent of unflushed writes, if any.
fn grown_to(mut attr: Attr, end: Option<u64>) -> Attr {
    if let Some(end) = end {
        attr.size = attr.size.max(end);
    }
    attr
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}
