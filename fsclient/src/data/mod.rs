//! The data path: file contents as immutable block objects in object storage.
//!
//! A file is cut into chunks of [`CHUNK_SIZE`]; each chunk is a list of slices in the
//! metadata engine (later ones win), and each slice's bytes are stored as objects of at
//! most the volume's block size (`layout.rs` names them). Writes are buffered and become
//! new slices (`writer.rs`); nothing is modified in place. Reads resolve the slices and
//! fetch blocks through a size-bounded local cache (`reader.rs`, `cache.rs`) from the
//! store named by the volume's storage URL (`store.rs`). Dead slices are deleted after a
//! grace period (`gc.rs`).
//!
//! Acknowledged writes survive the process: with the mount's write journal attached
//! ([`DataStore::attach_journal`], `journal.rs`), a write is appended to it before it
//! returns and its record is marked committed once a flush committed its bytes; a client
//! that takes the journal over replays what is left before it serves.
//!
//! [`DataStore`] is the facade the filesystem layer uses. Its methods block and are
//! meant for FUSE worker threads; they drive async work on the runtime handle they are
//! given. What this module must never do: be called from inside that runtime (the
//! blocking methods would stall it), keep written data only in memory past a successful
//! [`DataStore::flush`], or reference an object from metadata before it is stored.

mod cache;
mod error;
mod gc;
pub mod journal;
pub mod layout;
mod reader;
mod store;
mod writer;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::Semaphore;

use crate::meta::{CHUNK_SIZE, Format, Ino, MetaEngine};

pub use cache::CacheStats;
pub use error::{DataError, OpenError};
pub use journal::{Journal, JournalError, JournalUsage, Replayed};
pub use reader::ReadState;
pub use store::{CheckError, StoreOpenError, redact};

use cache::BlockCache;
use reader::{Fetcher, Layouts};
use store::ObjectStore;
pub use writer::CommitMarks;
use writer::Writer;

/// Cache bound used without a cache directory: the cache then lives in memory.
const MEMORY_CACHE_MAX: u64 = 256 << 20;

/// Settings of the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataConfig {
    /// Directory of the local block cache; `None` keeps a cache in memory, bounded by
    /// `cache_bytes` and at most 256 MiB. Blocks are kept under a subdirectory named
    /// after the volume's uuid, so volumes may share a directory.
    pub cache_dir: Option<PathBuf>,
    /// Bound of the block cache in bytes (0 disables caching, and read-ahead with it).
    pub cache_bytes: u64,
    /// Bound of buffered, not yet uploaded, written bytes across all files.
    pub buffer_bytes: u64,
    /// Blocks fetched ahead of a sequential reader.
    pub readahead_blocks: u32,
    /// Block uploads running at once.
    pub upload_concurrency: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            cache_dir: None,
            cache_bytes: 1 << 30,
            buffer_bytes: 256 << 20,
            readahead_blocks: 4,
            upload_concurrency: 16,
        }
    }
}

/// How long the write journal keeps the memory it reuses after the last write.
pub const JOURNAL_IDLE: Duration = Duration::from_secs(60);

/// Counters of the data path (monotonic, except the gauges noted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    pub uploaded_blocks: u64,
    /// Blocks downloaded from object storage (by reads and read-ahead).
    pub downloaded_blocks: u64,
    /// Blocks downloaded by read-ahead.
    pub prefetched_blocks: u64,
    /// Gauge: bytes written and not yet uploaded.
    pub buffered_bytes: u64,
    pub cache: CacheStats,
    /// The write journal, once this process took it over.
    pub journal: Option<JournalUsage>,
}

#[derive(Debug, Default)]
struct Stats {
    uploaded_blocks: AtomicU64,
    downloaded_blocks: AtomicU64,
    prefetched_blocks: AtomicU64,
}

/// What the writer, the reader and their background tasks share.
#[derive(Debug)]
struct Ctx {
    meta: Arc<dyn MetaEngine>,
    store: ObjectStore,
    cache: Arc<BlockCache>,
    rt: Handle,
    block_size: u32,
    readahead_blocks: u32,
    layouts: Layouts,
    fetcher: Fetcher,
    /// Bounds the downloads read-ahead may have running.
    prefetch_slots: Arc<Semaphore>,
    stats: Stats,
}

/// The data path of one mounted volume. Share it as `Arc<DataStore>`.
#[derive(Debug)]
pub struct DataStore {
    ctx: Arc<Ctx>,
    writer: Writer,
    /// The volume's uuid: a journal holds the records of one volume.
    volume: String,
}

/// The outcome of [`DataStore::attach_journal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalStart {
    /// No other live process owned the journal: this one took it over and replayed it.
    TakenOver(Replayed),
    /// A live process (the predecessor of a live upgrade) owns it: take it over with
    /// [`DataStore::take_over_journal`] once that process has exited.
    Deferred,
}

impl DataStore {
    /// Opens the object store named by `storage_url` (which may carry credentials that
    /// `format.storage` does not), checks it with a probe object, and opens the cache.
    /// Blocks the calling thread; do not call it from inside `rt`.
    pub fn open(
        storage_url: &str,
        format: &Format,
        config: DataConfig,
        meta: Arc<dyn MetaEngine>,
        rt: Handle,
    ) -> Result<Arc<Self>, OpenError> {
        let bs = format.block_size;
        if !(Format::MIN_BLOCK_SIZE..=Format::MAX_BLOCK_SIZE).contains(&bs)
            || !bs.is_power_of_two()
            || CHUNK_SIZE % u64::from(bs) != 0
        {
            return Err(OpenError::BlockSize(bs));
        }
        let store =
            ObjectStore::open(storage_url).map_err(|e| OpenError::StorageUrl(Box::new(e)))?;
        rt.block_on(store.check())
            .map_err(|source| OpenError::StorageCheck {
                url: store.url().to_string(),
                source: Box::new(source),
            })?;
        let cache = match &config.cache_dir {
            Some(dir) => {
                let dir = dir.join(&format.uuid);
                BlockCache::open_disk(&dir, config.cache_bytes)
                    .map_err(|source| OpenError::CacheDir { dir, source })?
            }
            None => BlockCache::memory(config.cache_bytes.min(MEMORY_CACHE_MAX)),
        };
        let readahead_blocks = if cache.capacity() == 0 {
            0
        } else {
            config.readahead_blocks
        };
        tracing::info!(
            storage = store.url(),
            block_size = bs,
            cache_dir = ?config.cache_dir,
            cache_bytes = cache.capacity(),
            "data path ready"
        );
        let ctx = Arc::new(Ctx {
            meta,
            store,
            cache: Arc::new(cache),
            rt,
            block_size: bs,
            readahead_blocks,
            layouts: Layouts::default(),
            fetcher: Fetcher::default(),
            prefetch_slots: Arc::new(Semaphore::new((readahead_blocks as usize).clamp(1, 64))),
            stats: Stats::default(),
        });
        let writer = Writer::new(ctx.clone(), config.buffer_bytes, config.upload_concurrency);
        Ok(Arc::new(DataStore {
            ctx,
            writer,
            volume: format.uuid.clone(),
        }))
    }

    /// Attaches the mount's write journal (the memfd the supervisor passes with `Start`)
    /// and, if no other live process owns it, takes it over: replays the acknowledged,
    /// uncommitted writes a dead predecessor left in it and flushes them. Call it before
    /// serving anything. Until the journal is taken over, writes are not journaled.
    pub fn attach_journal(&self, fd: OwnedFd) -> Result<JournalStart, JournalError> {
        let journal = Arc::new(Journal::open(fd).map_err(JournalError::Open)?);
        if !self.writer.set_journal(journal.clone()) {
            return Err(JournalError::Attached);
        }
        if journal.try_lock().map_err(JournalError::Takeover)? {
            self.replay_journal(&journal).map(JournalStart::TakenOver)
        } else {
            tracing::info!("the write journal is owned by a live process: taking it over later");
            Ok(JournalStart::Deferred)
        }
    }

    /// Takes over the attached journal once its owner has exited (waiting up to `wait`
    /// for that), replays and flushes what it holds. `Ok(None)` when there is no journal
    /// or this process owns it already.
    pub fn take_over_journal(&self, wait: Duration) -> Result<Option<Replayed>, JournalError> {
        let Some(journal) = self.writer.journal().cloned() else {
            return Ok(None);
        };
        if journal.is_owned() {
            return Ok(None);
        }
        journal.lock(wait).map_err(JournalError::Takeover)?;
        self.replay_journal(&journal).map(Some)
    }

    /// Takes the locked journal over and replays its live records in sequence order
    /// through the write path, then flushes every inode they touched.
    fn replay_journal(&self, journal: &Journal) -> Result<Replayed, JournalError> {
        let scan = journal
            .take_over(&self.volume)
            .map_err(JournalError::Takeover)?;
        let mut out = Replayed {
            torn: scan.torn,
            corrupt: scan.corrupt,
            initialized: scan.initialized,
            ..Replayed::default()
        };
        let mut inodes: Vec<(Ino, usize)> = Vec::new();
        for record in &scan.live {
            if record.len == 0 {
                journal.commit(&[record.id]);
                continue;
            }
            let bytes = journal.read(record);
            match self
                .writer
                .replay(record.ino, record.offset, &bytes, record.id)
            {
                Ok(()) => {}
                Err(e) if writer::inode_gone(&e) => {
                    // Only a flush made to make room can fail so; the inode is gone.
                    self.discard(record.ino);
                    journal.kill(&[record.id]);
                }
                Err(e) => {
                    return Err(JournalError::Replay {
                        ino: record.ino,
                        source: Box::new(e),
                    });
                }
            }
            out.records += 1;
            out.bytes += u64::from(record.len);
            match inodes.iter_mut().find(|(i, _)| *i == record.ino) {
                Some((_, n)) => *n += 1,
                None => inodes.push((record.ino, 1)),
            }
        }
        out.inodes = inodes.len();
        for (ino, n) in inodes {
            match self.writer.flush(ino) {
                Ok(()) => {}
                Err(e) if writer::inode_gone(&e) => {
                    // Deleted before its writes were committed (the process died between
                    // the unlink and dropping its buffers): its records are dead.
                    self.discard(ino);
                    out.deleted += n;
                }
                Err(e) => {
                    let mut why = e.to_string();
                    let mut cause = std::error::Error::source(&e);
                    while let Some(c) = cause {
                        why = format!("{why}: {c}");
                        cause = c.source();
                    }
                    tracing::error!(%ino, error = %why, "cannot flush replayed writes; they stay journaled");
                    out.unflushed.push((ino, why));
                }
            }
        }
        if out.records > 0 || out.torn > 0 || out.corrupt > 0 {
            tracing::warn!(
                records = out.records,
                bytes = out.bytes,
                inodes = out.inodes,
                deleted = out.deleted,
                torn = out.torn,
                corrupt = out.corrupt,
                unflushed = out.unflushed.len(),
                "replayed acknowledged writes a previous client left in the write journal"
            );
        } else {
            tracing::info!(initialized = ?out.initialized, capacity = journal.capacity(), "write journal taken over");
        }
        Ok(out)
    }

    /// Buffers a write of `data` at `offset`. Fails with the inode's pending upload error,
    /// if any, and waits while the buffer bound is reached.
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<(), DataError> {
        self.writer.write(ino, offset, data)
    }

    /// Uploads and commits every write of `ino` made before the call.
    pub fn flush(&self, ino: Ino) -> Result<(), DataError> {
        self.writer.flush(ino)
    }

    /// Flushes every inode with pending writes (before unmount or handover).
    pub fn flush_all(&self) -> Result<(), DataError> {
        self.writer.flush_all()
    }

    /// End offset of the furthest unflushed write of `ino`: the file is at least this
    /// long once flushed.
    pub fn pending_end(&self, ino: Ino) -> Option<u64> {
        self.writer.pending_end(ino)
    }

    pub fn is_dirty(&self, ino: Ino) -> bool {
        self.writer.is_dirty(ino)
    }

    /// Commit counts now, to take before reading attributes from the metadata engine
    /// that [`DataStore::pending_end`] will complete: see [`DataStore::committed_since`].
    pub fn commit_marks(&self) -> CommitMarks {
        self.writer.commit_marks()
    }

    /// Whether bytes of `ino` may have been committed and dropped from the buffers since
    /// `marks` were taken: attributes read from the engine after the marks and the
    /// buffers' extent read now may then both miss them.
    pub fn committed_since(&self, marks: &CommitMarks, ino: Ino) -> bool {
        self.writer.committed_since(marks, ino)
    }

    /// Reads up to `size` bytes at `offset` of a file of `file_size` bytes (short at EOF).
    /// Flushes the inode first if it has pending writes, so a reader sees them.
    pub fn read(
        &self,
        ino: Ino,
        offset: u64,
        size: u32,
        file_size: u64,
        state: &mut ReadState,
    ) -> Result<Vec<u8>, DataError> {
        if self.writer.is_dirty(ino) {
            self.writer.flush(ino)?;
        }
        reader::read(&self.ctx, ino, offset, size, file_size, state)
    }

    /// Forgets the cached layout of `ino` (after a truncate, or on open to see other
    /// clients' writes).
    pub fn invalidate(&self, ino: Ino) {
        self.ctx.layouts.invalidate(ino);
    }

    /// Drops the pending writes of a deleted inode.
    pub fn discard(&self, ino: Ino) {
        self.writer.discard(ino);
        self.ctx.layouts.invalidate(ino);
    }

    /// Returns the write journal's free memory to the kernel once nothing was written for
    /// [`JOURNAL_IDLE`] (called from the background tick); see `journal`.
    pub fn trim_journal_if_idle(&self, now: Instant) {
        if let Some(j) = self.writer.journal().filter(|j| j.is_owned()) {
            j.trim_if_idle(now, JOURNAL_IDLE);
        }
    }

    /// Deletes the objects of slices dead for longer than `grace` and forgets them;
    /// returns the number of slices collected.
    pub fn collect_garbage(&self, grace: Duration) -> Result<usize, DataError> {
        gc::collect(&self.ctx, grace)
    }

    pub fn stats(&self) -> DataStats {
        let s = &self.ctx.stats;
        DataStats {
            uploaded_blocks: s.uploaded_blocks.load(Ordering::Relaxed),
            downloaded_blocks: s.downloaded_blocks.load(Ordering::Relaxed),
            prefetched_blocks: s.prefetched_blocks.load(Ordering::Relaxed),
            buffered_bytes: self.writer.buffered(),
            cache: self.ctx.cache.stats(),
            journal: self
                .writer
                .journal()
                .filter(|j| j.is_owned())
                .map(|j| j.usage()),
        }
    }

    /// The object storage URL, without credentials.
    pub fn storage_url(&self) -> &str {
        self.ctx.store.url()
    }

    pub fn block_size(&self) -> u32 {
        self.ctx.block_size
    }
}
