//! Reading file ranges: resolve the chunks' slices, fetch the blocks (cache first, one
//! download per block however many readers want it), assemble the bytes; and read-ahead
//! for handles that read sequentially.
//!
//! The slice lists of chunks are cached per inode ([`Layouts`]) until invalidated by a
//! commit of this client, a truncate, or an open (close-to-open consistency with other
//! clients). A list loaded while an invalidation happened is used once but not cached.
//!
//! What it must never do: return bytes past the file size, or bytes of a block object
//! whose length differs from the one its key records (that is a corrupt object, an
//! error, never data).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::meta::{CHUNK_SIZE, Ino, MetaEngine, MetaError, Slice};

use super::Ctx;
use super::error::DataError;
use super::layout::{BlockRange, Source, block_ranges, resolve};

/// Inodes whose layouts are cached before the table is emptied wholesale.
const MAX_CACHED_INODES: usize = 4096;

/// Read-ahead bookkeeping of one open file handle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadState {
    /// Where the next read starts if the handle reads sequentially.
    next: u64,
    /// Consecutive sequential reads.
    streak: u32,
    /// End of the range already handed to prefetch.
    ahead: u64,
}

#[derive(Debug, Default)]
struct InodeLayout {
    /// The epoch of the last invalidation of this inode.
    invalidated: u64,
    chunks: HashMap<u32, Arc<Vec<Slice>>>,
}

#[derive(Debug, Default)]
struct LayoutTable {
    /// Bumped by every invalidation.
    epoch: u64,
    /// Epoch of the last wholesale clear: nothing loaded before it may be cached.
    floor: u64,
    inodes: HashMap<Ino, InodeLayout>,
}

/// Cached slice lists of chunks.
#[derive(Debug, Default)]
pub(crate) struct Layouts {
    table: Mutex<LayoutTable>,
}

impl Layouts {
    pub(crate) fn get(
        &self,
        meta: &dyn MetaEngine,
        ino: Ino,
        index: u32,
    ) -> Result<Arc<Vec<Slice>>, MetaError> {
        let started = {
            let t = self.table.lock();
            if let Some(s) = t.inodes.get(&ino).and_then(|l| l.chunks.get(&index)) {
                return Ok(s.clone());
            }
            t.epoch
        };
        let slices = Arc::new(meta.read_chunk(ino, index)?);
        let mut t = self.table.lock();
        let invalidated = t.inodes.get(&ino).map_or(0, |l| l.invalidated).max(t.floor);
        if invalidated <= started {
            if t.inodes.len() >= MAX_CACHED_INODES && !t.inodes.contains_key(&ino) {
                t.epoch += 1;
                t.floor = t.epoch;
                t.inodes.clear();
                return Ok(slices);
            }
            t.inodes
                .entry(ino)
                .or_default()
                .chunks
                .insert(index, slices.clone());
        }
        Ok(slices)
    }

    pub(crate) fn invalidate(&self, ino: Ino) {
        let mut t = self.table.lock();
        t.epoch += 1;
        let epoch = t.epoch;
        if t.inodes.len() >= MAX_CACHED_INODES && !t.inodes.contains_key(&ino) {
            // Keeps the table bounded when many inodes are written: a wholesale clear
            // invalidates every inode, this one included.
            t.floor = epoch;
            t.inodes.clear();
            return;
        }
        let l = t.inodes.entry(ino).or_default();
        l.invalidated = epoch;
        l.chunks.clear();
    }
}

/// A failed download, shared by every reader that waited for it.
#[derive(Clone, Debug)]
enum FetchError {
    Store(Arc<opendal::Error>),
    Length { expected: usize, got: usize },
}

impl FetchError {
    fn into_data(self, key: String) -> DataError {
        match self {
            FetchError::Store(source) => DataError::Download { key, source },
            FetchError::Length { expected, got } => DataError::CorruptBlock { key, expected, got },
        }
    }
}

type Download = Arc<OnceCell<Result<Bytes, FetchError>>>;

/// Downloads of blocks, deduplicated by key.
#[derive(Debug, Default)]
pub(crate) struct Fetcher {
    in_flight: Mutex<HashMap<String, Download>>,
}

impl Fetcher {
    fn is_fetching(&self, key: &str) -> bool {
        self.in_flight.lock().contains_key(key)
    }
}

/// Downloads one block (or joins the download already running), checks its length and
/// puts it in the cache.
async fn fetch(ctx: Arc<Ctx>, key: String, len: usize) -> Result<Bytes, FetchError> {
    let cell = ctx
        .fetcher
        .in_flight
        .lock()
        .entry(key.clone())
        .or_default()
        .clone();
    let result = cell
        .get_or_init(|| async {
            let data = ctx
                .store
                .get(&key)
                .await
                .map_err(|e| FetchError::Store(Arc::new(e)))?;
            if data.len() != len {
                return Err(FetchError::Length {
                    expected: len,
                    got: data.len(),
                });
            }
            ctx.stats.downloaded_blocks.fetch_add(1, Ordering::Relaxed);
            let (cache, k, d) = (ctx.cache.clone(), key.clone(), data.clone());
            let _ = tokio::task::spawn_blocking(move || cache.put(&k, &d)).await;
            Ok(data)
        })
        .await
        .clone();
    let mut in_flight = ctx.fetcher.in_flight.lock();
    if in_flight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
        in_flight.remove(&key);
    }
    result
}

/// One piece of the answer: `len` bytes at `at` in the output come from `range`.
struct Piece {
    at: usize,
    range: BlockRange,
}

/// The block pieces that make up bytes `offset..end` of a file (zeros need none).
fn plan(ctx: &Ctx, ino: Ino, offset: u64, end: u64) -> Result<Vec<Piece>, DataError> {
    let mut pieces = Vec::new();
    let mut pos = offset;
    while pos < end {
        let index = (pos / CHUNK_SIZE) as u32;
        let chunk_start = u64::from(index) * CHUNK_SIZE;
        let chunk_end = end.min(chunk_start + CHUNK_SIZE);
        let slices = ctx
            .layouts
            .get(ctx.meta.as_ref(), ino, index)
            .map_err(DataError::meta("read_chunk"))?;
        let (from, to) = ((pos - chunk_start) as u32, (chunk_end - chunk_start) as u32);
        for seg in resolve(&slices, from, to) {
            if let Source::Slice { id, size, off } = seg.source {
                let mut at = (chunk_start + u64::from(seg.pos) - offset) as usize;
                for range in block_ranges(id, size, off, seg.len, ctx.block_size) {
                    let len = range.len as usize;
                    pieces.push(Piece { at, range });
                    at += len;
                }
            }
        }
        pos = chunk_end;
    }
    Ok(pieces)
}

/// Reads bytes `offset..offset + size` of a file of `file_size` bytes (short at EOF).
pub(crate) fn read(
    ctx: &Arc<Ctx>,
    ino: Ino,
    offset: u64,
    size: u32,
    file_size: u64,
    state: &mut ReadState,
) -> Result<Vec<u8>, DataError> {
    if offset >= file_size || size == 0 {
        return Ok(Vec::new());
    }
    let end = file_size.min(offset.saturating_add(u64::from(size)));
    let mut out = vec![0u8; (end - offset) as usize];
    let pieces = plan(ctx, ino, offset, end)?;

    // The span of each block this read needs: the cache reads (and verifies) only that.
    let mut spans: HashMap<String, (u32, u32, u32)> = HashMap::new();
    for p in &pieces {
        let r = &p.range;
        let span = spans
            .entry(r.key())
            .or_insert((r.block_len, r.start, r.start + r.len));
        span.1 = span.1.min(r.start);
        span.2 = span.2.max(r.start + r.len);
    }
    // key -> (offset in the block of the first byte held, bytes)
    let mut blocks: HashMap<String, (u32, Bytes)> = HashMap::new();
    let mut missing: Vec<(String, usize)> = Vec::new();
    for (key, (block_len, start, end)) in spans {
        match ctx.cache.get_range(
            &key,
            block_len as usize,
            start as usize,
            (end - start) as usize,
        ) {
            Some(b) => {
                blocks.insert(key, (start, b));
            }
            None => missing.push((key, block_len as usize)),
        }
    }
    if !missing.is_empty() {
        let handles: Vec<_> = missing
            .into_iter()
            .map(|(key, len)| {
                let task = ctx.rt.spawn(fetch(ctx.clone(), key.clone(), len));
                (key, task)
            })
            .collect();
        let fetched = ctx.rt.block_on(async {
            let mut fetched = Vec::with_capacity(handles.len());
            for (key, task) in handles {
                fetched.push((key, task.await));
            }
            fetched
        });
        for (key, joined) in fetched {
            let data = joined
                .map_err(DataError::Task)?
                .map_err(|e| e.into_data(key.clone()))?;
            blocks.insert(key, (0, data));
        }
    }
    for p in &pieces {
        let r = &p.range;
        let Some((base, b)) = blocks.get(&r.key()) else {
            continue;
        };
        let from = (r.start - base) as usize;
        let src = &b[from..from + r.len as usize];
        out[p.at..p.at + src.len()].copy_from_slice(src);
    }

    readahead(ctx, ino, offset, end, file_size, state);
    Ok(out)
}

/// Updates the handle's read pattern and, for a sequential reader, starts downloading
/// the next blocks into the cache.
fn readahead(
    ctx: &Arc<Ctx>,
    ino: Ino,
    offset: u64,
    end: u64,
    file_size: u64,
    state: &mut ReadState,
) {
    if offset == state.next {
        state.streak = state.streak.saturating_add(1);
    } else {
        state.streak = 0;
        state.ahead = 0;
    }
    state.next = end;
    if state.streak == 0 || ctx.readahead_blocks == 0 {
        return;
    }
    let window = u64::from(ctx.readahead_blocks) * u64::from(ctx.block_size);
    let target = file_size.min(end.saturating_add(window));
    // Top the window up only when half of it has been consumed, not on every read.
    let from = state.ahead.max(end);
    if from >= target || (target - from < window / 2 && target < file_size) {
        return;
    }
    state.ahead = target;
    let pieces = match plan(ctx, ino, from, target) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%ino, error = %e, "read-ahead skipped");
            return;
        }
    };
    let mut seen = std::collections::HashSet::new();
    for p in pieces {
        let key = p.range.key();
        if !seen.insert(key.clone()) || ctx.cache.contains(&key) || ctx.fetcher.is_fetching(&key) {
            continue;
        }
        // Read-ahead is best effort: when the prefetch slots are busy, stop here and
        // let a later read continue from this block.
        let Ok(permit) = ctx.prefetch_slots.clone().try_acquire_owned() else {
            state.ahead = from + p.at as u64;
            break;
        };
        let len = p.range.block_len as usize;
        let task_ctx = ctx.clone();
        ctx.rt.spawn(async move {
            let stats = task_ctx.clone();
            if fetch(task_ctx, key, len).await.is_ok() {
                stats
                    .stats
                    .prefetched_blocks
                    .fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
}
