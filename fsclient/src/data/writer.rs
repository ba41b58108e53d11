//! Write buffering: writes become slices in memory, blocks are uploaded in the
//! background, and a flush commits the slices to the metadata engine in write order.
//!
//! Each inode has a list of pending slices in write order. A write that starts inside or
//! right at the end of the newest pending slice of its chunk goes into that slice
//! (overwriting in place or appending), as long as the blocks it touches are still being
//! filled; any other write starts a new slice, so "later slices win" keeps its meaning.
//! A block that fills up is uploaded at once (bounded concurrency); [`Writer::flush`]
//! seals the pending slices, uploads what is left, waits, and commits them one by one with
//! `write_slice`. A global bound on buffered bytes makes writers wait (and, when nothing
//! is uploading that would free memory, flush) instead of growing without limit.
//!
//! With a write journal ([`super::journal`]) taken over, every write is also appended to
//! it, under the inode's lock (so the records of an inode are in the order its bytes were
//! applied), before the write returns. A flush takes the inode's records together with
//! the slices it seals and marks them committed once every one of those slices is; a
//! failed flush puts them back, a discarded inode's records are marked dead. A full
//! journal makes the writer flush the inode whose record holds the journal's tail.
//! Replayed records are adopted (their bytes applied, their record kept), not appended.
//!
//! A committed slice leaves the buffers right after its commit, and every such departure
//! is counted ([`CommitMarks`]): a reader that adds the buffers' extent to attributes it
//! read from the engine can tell whether bytes may have moved from one to the other in
//! between (and been in neither when it looked).
//!
//! What it must never do: drop written data silently. A failed upload keeps the block in
//! memory; the error is reported on the next write or flush of that inode, and the next
//! flush uploads the block again. A slice is committed only after all its blocks are
//! stored, so metadata never points at an object that does not exist.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::Semaphore;

use crate::meta::{CHUNK_SIZE, Ino, MAX_FILE_SIZE, MetaError, Slice, Timestamp};

use super::Ctx;
use super::error::DataError;
use super::journal::{AppendError, Journal, RecordId};
use super::layout::block_key;

/// How one write is journaled.
#[derive(Clone, Copy, Debug)]
enum Journaling<'a> {
    /// No journal taken over by this process.
    Off,
    /// Append a new record.
    Append(&'a Journal),
    /// A replayed write: its record is already in the journal.
    Adopt(RecordId),
}

/// Inodes are counted in this many stripes (`ino % COMMIT_STRIPES`): a commit of one
/// inode rarely sends readers of another to read again.
const COMMIT_STRIPES: usize = 64;

fn stripe(ino: Ino) -> usize {
    (ino.0 % COMMIT_STRIPES as u64) as usize
}

/// The number of slices that left the buffers after their commit, per stripe of inodes,
/// at one moment ([`Writer::commit_marks`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitMarks([u64; COMMIT_STRIPES]);

/// How a flush that did not fail ended.
enum Flushed {
    Committed,
    /// The inode was discarded meanwhile.
    Retired,
}

/// Whether `e` says the inode no longer exists.
pub(crate) fn inode_gone(e: &DataError) -> bool {
    matches!(
        e,
        DataError::Meta {
            source: MetaError::NotFound,
            ..
        }
    )
}

/// One block of a slice being built.
#[derive(Debug)]
enum Block {
    /// Still being filled: writes may change it.
    Open(Vec<u8>),
    /// Complete (or sealed) and not stored yet: waiting for an upload, or for a retry
    /// after a failed one.
    Frozen(Bytes),
    Uploading(Bytes),
    Stored,
}

impl Block {
    fn buffered(&self) -> u64 {
        match self {
            Block::Open(v) => v.len() as u64,
            Block::Frozen(b) | Block::Uploading(b) => b.len() as u64,
            Block::Stored => 0,
        }
    }
}

/// A slice being built, not yet in the metadata engine.
#[derive(Debug)]
struct PendingSlice {
    /// Identifies the slice to its upload tasks (unique within the inode).
    seq: u64,
    chunk: u32,
    /// Chunk offset of the slice's first byte.
    pos: u32,
    len: u32,
    /// Object id, allocated when the first block is uploaded (0 = not yet).
    id: u64,
    blocks: Vec<Block>,
    /// A flush has claimed the slice: no more writes go into it.
    sealed: bool,
    mtime: Timestamp,
}

impl PendingSlice {
    fn end(&self) -> u64 {
        u64::from(self.chunk) * CHUNK_SIZE + u64::from(self.pos) + u64::from(self.len)
    }

    /// Whether a write of `len` bytes at chunk offset `pos` may go into this slice.
    fn accepts(&self, pos: u32, len: u32, block_size: u32) -> bool {
        if self.sealed || pos < self.pos || pos > self.pos + self.len {
            return false;
        }
        let off = pos - self.pos;
        let first = (off / block_size) as usize;
        let last = ((off + len - 1) / block_size) as usize;
        (first..=last).all(|i| matches!(self.blocks.get(i), None | Some(Block::Open(_))))
    }

    /// Copies `data` to chunk offset `pos` (accepted by [`Self::accepts`]); returns the
    /// number of bytes the buffers grew by.
    fn apply(&mut self, pos: u32, data: &[u8], block_size: u32) -> u64 {
        let off = pos - self.pos;
        let end = off + data.len() as u32;
        let mut grown = 0;
        let mut at = off;
        while at < end {
            let index = (at / block_size) as usize;
            let block_start = index as u32 * block_size;
            let upto = end.min(block_start + block_size);
            if index == self.blocks.len() {
                // A stream's later blocks fill up: allocate them whole, once.
                let buf = if index > 0 {
                    Vec::with_capacity(block_size as usize)
                } else {
                    Vec::new()
                };
                self.blocks.push(Block::Open(buf));
            }
            if let Some(Block::Open(buf)) = self.blocks.get_mut(index) {
                let (from, to) = ((at - block_start) as usize, (upto - block_start) as usize);
                let src = &data[(at - off) as usize..(upto - off) as usize];
                if buf.len() < to {
                    grown += (to - buf.len()) as u64;
                    // Appended bytes are copied once, not zeroed first.
                    if from > buf.len() {
                        buf.resize(from, 0);
                    }
                    let overlap = buf.len() - from;
                    buf[from..].copy_from_slice(&src[..overlap]);
                    buf.extend_from_slice(&src[overlap..]);
                } else {
                    buf[from..to].copy_from_slice(src);
                }
            }
            at = upto;
        }
        self.len = self.len.max(end);
        self.mtime = Timestamp::now();
        grown
    }

    fn record(&self) -> Slice {
        Slice {
            pos: self.pos,
            id: self.id,
            size: self.len,
            off: 0,
            len: self.len,
        }
    }
}

#[derive(Debug, Default)]
struct FileState {
    slices: VecDeque<PendingSlice>,
    next_seq: u64,
    /// Bytes held by this inode's blocks.
    buffered: u64,
    /// The first upload failure not yet reported.
    error: Option<(String, Arc<opendal::Error>)>,
    /// The latest upload failure, reported or not: a flush that finds a block unstored
    /// fails with it even if a write already reported it.
    last_error: Option<(String, Arc<opendal::Error>)>,
    /// Removed from the writer's table (discarded, or clean): writers must look again.
    retired: bool,
    /// Journal records of the writes in `slices` that no flush has taken yet, in order.
    records: Vec<RecordId>,
}

impl FileState {
    fn take_error(&mut self, ino: Ino) -> Result<(), DataError> {
        match self.error.take() {
            Some((key, source)) => Err(DataError::Upload { ino, key, source }),
            None => Ok(()),
        }
    }

    fn slice_mut(&mut self, seq: u64) -> Option<&mut PendingSlice> {
        self.slices.iter_mut().find(|s| s.seq == seq)
    }
}

#[derive(Debug, Default)]
struct FileBuf {
    state: Mutex<FileState>,
    /// Signalled when an upload of this inode finishes.
    changed: Condvar,
    /// Held by a flush: flushes of one inode commit one after the other.
    commit: Mutex<()>,
}

#[derive(Debug)]
struct Inner {
    files: Mutex<HashMap<Ino, Arc<FileBuf>>>,
    /// Bytes buffered (or reserved by writes in progress) across all inodes.
    budget: Mutex<u64>,
    budget_freed: Condvar,
    limit: u64,
    uploads: Arc<Semaphore>,
    /// Uploads started and not finished.
    in_flight: AtomicUsize,
}

impl Inner {
    fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut used = self.budget.lock();
        *used = used.saturating_sub(n);
        drop(used);
        self.budget_freed.notify_all();
    }
}

/// The write buffers of every inode.
#[derive(Debug)]
pub(crate) struct Writer {
    ctx: Arc<Ctx>,
    inner: Arc<Inner>,
    /// The mount's write journal, once attached; writes use it once it is owned.
    journal: OnceLock<Arc<Journal>>,
    /// Slices that left the buffers after their commit, per stripe of inodes.
    commits: [AtomicU64; COMMIT_STRIPES],
}

impl Writer {
    pub(crate) fn new(ctx: Arc<Ctx>, buffer_bytes: u64, upload_concurrency: usize) -> Self {
        Writer {
            ctx,
            inner: Arc::new(Inner {
                files: Mutex::default(),
                budget: Mutex::new(0),
                budget_freed: Condvar::new(),
                limit: buffer_bytes.max(1),
                uploads: Arc::new(Semaphore::new(upload_concurrency.max(1))),
                in_flight: AtomicUsize::new(0),
            }),
            journal: OnceLock::new(),
            commits: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The commit counts now. Take them before reading attributes from the engine; if
    /// [`Writer::committed_since`] then says so for the inode, bytes of its buffers may have
    /// been committed after that read and dropped from the buffers before they were looked
    /// at.
    pub(crate) fn commit_marks(&self) -> CommitMarks {
        CommitMarks(std::array::from_fn(|i| {
            self.commits[i].load(Ordering::SeqCst)
        }))
    }

    /// Whether a slice of `ino` (or of an inode of its stripe) left the buffers after its
    /// commit since `marks` were taken.
    pub(crate) fn committed_since(&self, marks: &CommitMarks, ino: Ino) -> bool {
        let i = stripe(ino);
        self.commits[i].load(Ordering::SeqCst) != marks.0[i]
    }

    /// Attaches the mount's write journal; `false` if one is attached already.
    pub(crate) fn set_journal(&self, journal: Arc<Journal>) -> bool {
        self.journal.set(journal).is_ok()
    }

    pub(crate) fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.get()
    }

    fn file(&self, ino: Ino) -> Arc<FileBuf> {
        self.inner.files.lock().entry(ino).or_default().clone()
    }

    fn existing(&self, ino: Ino) -> Option<Arc<FileBuf>> {
        self.inner.files.lock().get(&ino).cloned()
    }

    /// Buffers a write. Blocks (waiting for memory) when the buffer bound is reached.
    pub(crate) fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<(), DataError> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(DataError::FileTooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(DataError::FileTooBig);
        }
        match self.journal.get().filter(|j| j.is_owned()) {
            Some(journal) => {
                // A record holds at most `max_record_data` bytes: a longer write is
                // journaled (and applied) in parts.
                let max = journal.max_record_data() as usize;
                let mut at = offset;
                for part in data.chunks(max) {
                    self.write_part(ino, at, part, Journaling::Append(journal))?;
                    at += part.len() as u64;
                }
                Ok(())
            }
            None => self.write_part(ino, offset, data, Journaling::Off),
        }
    }

    /// Applies a write replayed from the journal, adopting its record `id`.
    pub(crate) fn replay(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        id: RecordId,
    ) -> Result<(), DataError> {
        if data.is_empty() {
            return Ok(());
        }
        self.write_part(ino, offset, data, Journaling::Adopt(id))
    }

    fn write_part(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        journaling: Journaling<'_>,
    ) -> Result<(), DataError> {
        let reserved = data.len() as u64;
        self.reserve(ino, reserved)?;
        loop {
            let file = self.file(ino);
            let mut st = file.state.lock();
            if st.retired {
                // Flushed clean and removed meanwhile: take the new entry.
                continue;
            }
            if let Err(e) = st.take_error(ino) {
                drop(st);
                self.inner.release(reserved);
                return Err(e);
            }
            // The record is reserved under the inode's lock, so that the journal holds an
            // inode's writes in the order they are applied.
            let record = match journaling {
                Journaling::Off => None,
                Journaling::Adopt(id) => Some((id, None)),
                Journaling::Append(journal) => match journal.reserve(ino, offset, data.len()) {
                    Ok(id) => Some((id, Some(journal))),
                    Err(AppendError::NotOwner) => None,
                    Err(AppendError::Full { oldest }) => {
                        drop(st);
                        if let Err(e) = self.make_room(ino, oldest) {
                            self.inner.release(reserved);
                            return Err(e);
                        }
                        continue;
                    }
                },
            };
            if let Some((id, fill)) = record {
                if let Some(journal) = fill {
                    journal.fill(id, ino, offset, data);
                }
                st.records.push(id);
            }
            self.write_locked(ino, &file, st, offset, data, reserved);
            return Ok(());
        }
    }

    /// The journal is full: commits the inode whose record holds its tail (`None`: that
    /// record is still being copied by another writer, which is about to finish).
    fn make_room(&self, ino: Ino, oldest: Option<Ino>) -> Result<(), DataError> {
        let Some(victim) = oldest else {
            std::thread::sleep(Duration::from_micros(100));
            return Ok(());
        };
        tracing::debug!(%ino, %victim, "write journal full: flushing the oldest inode");
        match self.flush(victim) {
            Ok(()) => Ok(()),
            // A deleted inode's records are dead.
            Err(e) if inode_gone(&e) => {
                self.discard(victim);
                Ok(())
            }
            Err(e) if victim == ino => Err(e),
            Err(e) => Err(DataError::JournalFull {
                ino: victim,
                source: Box::new(e),
            }),
        }
    }

    /// The body of [`Writer::write`], with the inode's state locked and `reserved` bytes
    /// of the budget held (the unused part is given back).
    fn write_locked(
        &self,
        ino: Ino,
        file: &Arc<FileBuf>,
        mut st: MutexGuard<'_, FileState>,
        offset: u64,
        data: &[u8],
        reserved: u64,
    ) {
        let bs = self.ctx.block_size;
        let mut grown = 0;
        let mut full = Vec::new();
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let chunk = (at / CHUNK_SIZE) as u32;
            let pos = (at % CHUNK_SIZE) as u32;
            let n = rest.len().min((CHUNK_SIZE - u64::from(pos)) as usize);
            let (part, tail) = rest.split_at(n);
            // Only the newest pending slice of the chunk may take the write: writing into
            // an older one would be hidden by the newer slices over it.
            let newest = st.slices.iter().rposition(|s| s.chunk == chunk);
            let index = match newest.filter(|&i| st.slices[i].accepts(pos, n as u32, bs)) {
                Some(i) => i,
                None => {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.slices.push_back(PendingSlice {
                        seq,
                        chunk,
                        pos,
                        len: 0,
                        id: 0,
                        blocks: Vec::new(),
                        sealed: false,
                        mtime: Timestamp::now(),
                    });
                    st.slices.len() - 1
                }
            };
            let slice = &mut st.slices[index];
            grown += slice.apply(pos, part, bs);
            // Blocks this write completed are uploaded now, while the writer goes on.
            let first = ((pos - slice.pos) / bs) as usize;
            for index in first..slice.blocks.len() {
                if matches!(&slice.blocks[index], Block::Open(v) if v.len() == bs as usize) {
                    full.push((slice.seq, index));
                }
            }
            at += n as u64;
            rest = tail;
        }
        st.buffered += grown;
        for (seq, index) in full {
            if let Err(e) = self.start_upload(ino, file, &mut st, seq, index) {
                // The block stays buffered; the flush that must follow reports this.
                tracing::warn!(%ino, error = %e, "cannot start a block upload; left for the flush");
                break;
            }
        }
        drop(st);
        self.inner.release(reserved.saturating_sub(grown));
    }

    /// Waits until `n` more bytes fit in the buffer bound and reserves them.
    fn reserve(&self, ino: Ino, n: u64) -> Result<(), DataError> {
        let mut used = self.inner.budget.lock();
        loop {
            // An empty buffer always admits a write, however large: it cannot wait for
            // anything else to drain.
            if *used == 0 || *used + n <= self.inner.limit {
                *used += n;
                return Ok(());
            }
            if self.inner.in_flight.load(Ordering::Acquire) == 0 {
                // Nothing in flight will free memory: flush someone, this inode first.
                drop(used);
                let victim = self.flush_victim(ino);
                match victim {
                    Some(v) if v == ino => self.flush(v)?,
                    // Another inode's failure is reported to its own writer too; this
                    // write fails because its bytes cannot be buffered.
                    Some(v) => self.flush(v).map_err(|e| DataError::BufferFull {
                        ino: v,
                        source: Box::new(e),
                    })?,
                    None => std::thread::sleep(Duration::from_millis(1)),
                }
                used = self.inner.budget.lock();
                continue;
            }
            self.inner
                .budget_freed
                .wait_for(&mut used, Duration::from_millis(50));
        }
    }

    /// The inode whose flush frees the most: `ino` itself if it holds anything.
    fn flush_victim(&self, ino: Ino) -> Option<Ino> {
        let files: Vec<(Ino, Arc<FileBuf>)> = self
            .inner
            .files
            .lock()
            .iter()
            .map(|(i, f)| (*i, f.clone()))
            .collect();
        let mut best: Option<(Ino, u64)> = None;
        for (i, f) in files {
            let b = f.state.lock().buffered;
            if b > 0 && (i == ino || best.is_none_or(|(bi, bb)| bi != ino && b > bb)) {
                best = Some((i, b));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Freezes block `index` of slice `seq` and uploads it in the background.
    fn start_upload(
        &self,
        ino: Ino,
        file: &Arc<FileBuf>,
        st: &mut FileState,
        seq: u64,
        index: usize,
    ) -> Result<(), DataError> {
        let Some(slice) = st.slice_mut(seq) else {
            return Ok(());
        };
        if slice.id == 0 {
            slice.id = self
                .ctx
                .meta
                .new_slice_id()
                .map_err(DataError::meta("new_slice_id"))?;
        }
        let Some(block) = slice.blocks.get_mut(index) else {
            return Ok(());
        };
        let data = match std::mem::replace(block, Block::Stored) {
            Block::Open(mut v) => {
                // A partial block allocated whole (see `apply`) must not keep the rest of
                // its allocation alive in the cache and the buffers, which count only its
                // length.
                if v.len() < v.capacity() {
                    v.shrink_to_fit();
                }
                Bytes::from(v)
            }
            Block::Frozen(b) => b,
            other => {
                *block = other;
                return Ok(());
            }
        };
        *block = Block::Uploading(data.clone());
        let key = block_key(slice.id, index as u32, data.len() as u32);
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let (ctx, inner, file) = (self.ctx.clone(), self.inner.clone(), file.clone());
        self.ctx.rt.spawn(async move {
            let permit = inner.uploads.clone().acquire_owned().await;
            let result = ctx.store.put(&key, data.clone()).await;
            drop(permit);
            // Write-through for partial blocks only (small files, the tails of big ones):
            // they are what is read back soon, while full blocks of a stream would write
            // the disk twice and push the readers' blocks out of the cache. Done after the
            // block counts as stored: a flush does not wait for it.
            let partial = data.len() < ctx.block_size as usize;
            let cache_copy = match &result {
                Ok(()) => {
                    ctx.stats.uploaded_blocks.fetch_add(1, Ordering::Relaxed);
                    partial.then(|| (key.clone(), data.clone()))
                }
                Err(_) => None,
            };
            let freed = Self::upload_done(&ctx, &file, ino, seq, index, key, data, result);
            inner.in_flight.fetch_sub(1, Ordering::AcqRel);
            file.changed.notify_all();
            inner.release(freed);
            if let Some((key, data)) = cache_copy {
                let cache = ctx.cache.clone();
                let _ = tokio::task::spawn_blocking(move || cache.put(&key, &data)).await;
            }
        });
        Ok(())
    }

    /// Records the end of the upload of block `index` of slice `seq`; returns the bytes
    /// it frees from the buffers.
    #[allow(clippy::too_many_arguments)]
    fn upload_done(
        ctx: &Ctx,
        file: &FileBuf,
        ino: Ino,
        seq: u64,
        index: usize,
        key: String,
        data: Bytes,
        result: opendal::Result<()>,
    ) -> u64 {
        let mut st = file.state.lock();
        let len = data.len() as u64;
        let block = st.slice_mut(seq).and_then(|s| s.blocks.get_mut(index));
        let freed = match (block, result) {
            (Some(b), Ok(())) => {
                *b = Block::Stored;
                len
            }
            (Some(b), Err(e)) => {
                tracing::warn!(%ino, key, error = %e, "block upload failed; kept for a retry");
                *b = Block::Frozen(data);
                let e = (key, Arc::new(e));
                st.last_error = Some(e.clone());
                if st.error.is_none() {
                    st.error = Some(e);
                }
                0
            }
            (None, result) => {
                // Discarded while uploading: nothing will ever reference the object.
                if result.is_ok() {
                    let store = ctx.store.clone();
                    ctx.rt.spawn(async move { store.delete(&key).await });
                }
                len
            }
        };
        st.buffered = st.buffered.saturating_sub(freed);
        freed
    }

    /// Uploads and commits every slice of `ino` written before the call.
    pub(crate) fn flush(&self, ino: Ino) -> Result<(), DataError> {
        let Some(file) = self.existing(ino) else {
            return Ok(());
        };
        let _commit = file.commit.lock();
        let mut st = file.state.lock();
        let count = st.slices.len();
        // Exactly the records of the writes in the slices sealed below.
        let records = std::mem::take(&mut st.records);
        if count == 0 {
            drop(st);
            // (Never expected: records always come with pending slices.)
            self.finish_records(&records, true);
            self.retire_if_clean(ino, &file);
            return Ok(());
        }
        match self.flush_sealed(ino, &file, st, count) {
            Ok(Flushed::Committed) => {
                self.finish_records(&records, true);
                self.retire_if_clean(ino, &file);
                Ok(())
            }
            Ok(Flushed::Retired) => {
                self.finish_records(&records, false);
                Ok(())
            }
            Err(e) => {
                let mut st = file.state.lock();
                if st.retired {
                    drop(st);
                    self.finish_records(&records, false);
                } else {
                    // Kept for the next flush, before the records of later writes.
                    st.records.splice(0..0, records);
                }
                Err(e)
            }
        }
    }

    /// Marks journal records committed (`true`) or dead.
    fn finish_records(&self, records: &[RecordId], committed: bool) {
        if let (Some(journal), false) = (self.journal.get(), records.is_empty()) {
            if committed {
                journal.commit(records);
            } else {
                journal.kill(records);
            }
        }
    }

    /// The body of [`Writer::flush`]: seals the first `count` slices, uploads and commits
    /// them.
    fn flush_sealed<'a>(
        &self,
        ino: Ino,
        file: &'a Arc<FileBuf>,
        mut st: MutexGuard<'a, FileState>,
        count: usize,
    ) -> Result<Flushed, DataError> {
        // Reported now or superseded by the retry below.
        st.error = None;
        let mut todo = Vec::new();
        for s in st.slices.iter_mut().take(count) {
            s.sealed = true;
            for (i, b) in s.blocks.iter().enumerate() {
                if matches!(b, Block::Open(_) | Block::Frozen(_)) {
                    todo.push((s.seq, i));
                }
            }
        }
        for (seq, index) in todo {
            self.start_upload(ino, file, &mut st, seq, index)?;
        }
        let sealed_busy = |st: &FileState| {
            st.slices
                .iter()
                .take(count)
                .any(|s| s.blocks.iter().any(|b| matches!(b, Block::Uploading(_))))
        };
        while sealed_busy(&st) {
            file.changed.wait(&mut st);
        }
        if st.retired {
            return Ok(Flushed::Retired);
        }
        let stored = st
            .slices
            .iter()
            .take(count)
            .all(|s| s.blocks.iter().all(|b| matches!(b, Block::Stored)));
        if !stored {
            let (key, source) = st
                .error
                .take()
                .or_else(|| st.last_error.clone())
                .unwrap_or_else(|| {
                    (
                        String::new(),
                        Arc::new(opendal::Error::new(
                            opendal::ErrorKind::Unexpected,
                            "block not stored",
                        )),
                    )
                });
            return Err(DataError::Upload { ino, key, source });
        }
        st.last_error = None;
        // Slices of different chunks may have been written in another order than they
        // are committed: the file's mtime must not go back.
        let mut mtime = Timestamp(i64::MIN);
        for _ in 0..count {
            let Some(front) = st.slices.front() else {
                break;
            };
            mtime = mtime.max(front.mtime);
            let (chunk, record) = (front.chunk, front.record());
            drop(st);
            // Committed outside the state lock so writes to this inode go on meanwhile;
            // the commit lock keeps the front of the list ours.
            let committed = self.ctx.meta.write_slice(ino, chunk, record, mtime);
            self.ctx.layouts.invalidate(ino);
            st = file.state.lock();
            if st.retired {
                // Discarded meanwhile: the inode is gone, whatever the commit did.
                return Ok(Flushed::Retired);
            }
            committed.map_err(DataError::meta("write_slice"))?;
            // Counted before the bytes leave the buffers (under the state lock that
            // `pending_end` takes): whoever no longer sees them here sees the count move.
            self.commits[stripe(ino)].fetch_add(1, Ordering::SeqCst);
            st.slices.pop_front();
        }
        Ok(Flushed::Committed)
    }

    /// Flushes every inode with pending writes; returns the first error after trying all.
    pub(crate) fn flush_all(&self) -> Result<(), DataError> {
        let inos: Vec<Ino> = self.inner.files.lock().keys().copied().collect();
        let mut first = None;
        for ino in inos {
            if let Err(e) = self.flush(ino) {
                tracing::warn!(%ino, error = %e, "flush failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// End offset of the furthest pending write of `ino`.
    pub(crate) fn pending_end(&self, ino: Ino) -> Option<u64> {
        let file = self.existing(ino)?;
        let st = file.state.lock();
        st.slices.iter().map(PendingSlice::end).max()
    }

    pub(crate) fn is_dirty(&self, ino: Ino) -> bool {
        self.existing(ino)
            .is_some_and(|f| !f.state.lock().slices.is_empty())
    }

    /// Drops the pending writes of a deleted inode, and the objects already uploaded.
    pub(crate) fn discard(&self, ino: Ino) {
        let Some(file) = self.inner.files.lock().remove(&ino) else {
            return;
        };
        let mut st = file.state.lock();
        st.retired = true;
        let mut freed = 0;
        for s in st.slices.drain(..) {
            for (i, b) in s.blocks.iter().enumerate() {
                match b {
                    Block::Open(_) | Block::Frozen(_) => freed += b.buffered(),
                    // Its task frees it when it finishes and deletes the object.
                    Block::Uploading(_) => {}
                    Block::Stored => {
                        let key = block_key(
                            s.id,
                            i as u32,
                            super::layout::block_len(s.len, self.ctx.block_size, i as u32),
                        );
                        let store = self.ctx.store.clone();
                        self.ctx.rt.spawn(async move { store.delete(&key).await });
                    }
                }
            }
        }
        st.buffered = st.buffered.saturating_sub(freed);
        st.error = None;
        let records = std::mem::take(&mut st.records);
        drop(st);
        // Records a flush in progress took are marked dead by that flush.
        self.finish_records(&records, false);
        file.changed.notify_all();
        self.inner.release(freed);
    }

    /// Bytes buffered across all inodes.
    pub(crate) fn buffered(&self) -> u64 {
        *self.inner.budget.lock()
    }

    /// Removes a clean inode from the table, so the table holds dirty inodes only.
    fn retire_if_clean(&self, ino: Ino, file: &Arc<FileBuf>) {
        let mut files = self.inner.files.lock();
        let mut st = file.state.lock();
        if st.slices.is_empty()
            && st.records.is_empty()
            && st.error.is_none()
            && files.get(&ino).is_some_and(|f| Arc::ptr_eq(f, file))
        {
            st.retired = true;
            files.remove(&ino);
        }
    }
}
