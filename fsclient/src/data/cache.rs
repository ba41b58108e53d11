//! A size-bounded cache of block objects, on local disk or in memory.
//!
//! Block objects are immutable (an overwrite writes a new slice with new keys), so a
//! cached copy never goes stale: it is filled on download and, for partial blocks (small
//! files, the tails of big ones), on upload (write-through), and only eviction (least
//! recently used, when the total exceeds the bound) or garbage collection removes it. On
//! disk each block is one file, `DIR/<object key>`, with a header holding the length and a
//! CRC32C of every 64 KiB segment, so that a read of a small range reads and verifies only
//! the segments it needs (a FUSE read is far smaller than a block). The index is rebuilt by
//! scanning the directory when the cache is opened, so the cache survives restarts (recency
//! starts from the files' modification times).
//!
//! What it must never do: return bytes that differ from what was put. A file that is
//! short, too long, fails its checksum or cannot be read is a miss, and is deleted.
//! Cache failures are never errors of the read or write that touched the cache.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;

const MAGIC: &[u8; 4] = b"BTNB";
const VERSION: u8 = 1;
/// magic, version, 3 reserved bytes, length (u32 LE), segment size (u32 LE); then one
/// CRC32C (u32 LE) per segment, then the bytes.
const FIXED_HEADER: usize = 16;
const SEGMENT: usize = 64 << 10;

/// Bytes a cache file of a `len`-byte block occupies.
fn file_len(len: usize) -> usize {
    header_len(len) + len
}

fn header_len(len: usize) -> usize {
    FIXED_HEADER + 4 * len.div_ceil(SEGMENT)
}

/// Counters of one cache, for statistics and tests.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    evictions: AtomicU64,
}

/// A snapshot of a cache's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries found damaged (and dropped) on read.
    pub corrupt: u64,
    pub evictions: u64,
    /// Bytes the cache holds now (files including headers, or memory).
    pub bytes: u64,
    pub entries: u64,
}

#[derive(Debug)]
enum Medium {
    Disk(PathBuf),
    Memory,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    tick: u64,
    /// The bytes, in memory mode.
    data: Option<Bytes>,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<String, Entry>,
    /// tick -> key, oldest first.
    lru: BTreeMap<u64, String>,
    tick: u64,
    used: u64,
}

impl Index {
    fn touch(&mut self, key: &str) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(key) else {
            return false;
        };
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, key.to_string());
        true
    }

    fn insert(&mut self, key: String, size: u64, data: Option<Bytes>) {
        self.remove(&key);
        self.tick += 1;
        self.lru.insert(self.tick, key.clone());
        self.used += size;
        self.entries.insert(
            key,
            Entry {
                size,
                tick: self.tick,
                data,
            },
        );
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.used -= e.size;
                true
            }
            None => false,
        }
    }

    /// Removes least recently used entries until `used <= capacity`; returns their keys.
    fn evict(&mut self, capacity: u64) -> Vec<String> {
        let mut out = Vec::new();
        while self.used > capacity {
            let Some((_, key)) = self.lru.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&key) {
                self.used -= e.size;
            }
            out.push(key);
        }
        out
    }
}

/// The block cache. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct BlockCache {
    medium: Medium,
    capacity: u64,
    index: Mutex<Index>,
    counters: Counters,
}

impl BlockCache {
    /// A cache kept in memory, bounded by `capacity` bytes.
    pub fn memory(capacity: u64) -> Self {
        BlockCache {
            medium: Medium::Memory,
            capacity,
            index: Mutex::default(),
            counters: Counters::default(),
        }
    }

    /// Opens (creating it if needed) a cache directory bounded by `capacity` bytes and
    /// indexes the blocks already there. Leftover temporary files are deleted.
    pub fn open_disk(dir: &Path, capacity: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        scan(dir, dir, &mut found)?;
        found.sort_by_key(|f| f.2);
        let mut index = Index::default();
        for (key, size, _) in found {
            index.insert(key, size, None);
        }
        let cache = BlockCache {
            medium: Medium::Disk(dir.to_path_buf()),
            capacity,
            index: Mutex::new(index),
            counters: Counters::default(),
        };
        let victims = cache.index.lock().evict(capacity);
        cache.drop_files(&victims);
        Ok(cache)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.lock().entries.contains_key(key)
    }

    /// The cached block `key` if present and intact (`block_len` bytes long).
    #[cfg(test)]
    pub fn get(&self, key: &str, block_len: usize) -> Option<Bytes> {
        self.get_range(key, block_len, 0, block_len)
    }

    /// Bytes `start..start + len` of the cached block `key` (of `block_len` bytes), if
    /// present and intact. Only the segments holding the range are read and verified.
    pub fn get_range(
        &self,
        key: &str,
        block_len: usize,
        start: usize,
        len: usize,
    ) -> Option<Bytes> {
        let end = start.checked_add(len).filter(|&e| e <= block_len)?;
        let data = {
            let mut index = self.index.lock();
            if !index.touch(key) {
                drop(index);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            index.entries.get(key).and_then(|e| e.data.clone())
        };
        let found = match (&self.medium, data) {
            (Medium::Memory, data) => Ok(data
                .filter(|d| d.len() == block_len)
                .map(|d| d.slice(start..end))),
            (Medium::Disk(root), _) => read_range(&path_of(root, key), block_len, start, end),
        };
        match found {
            Ok(Some(b)) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(b)
            }
            // Another client sharing the directory evicted it: a plain miss.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.index.lock().remove(key);
                None
            }
            Ok(None) | Err(_) => {
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key, "damaged block cache entry dropped");
                self.remove(key);
                None
            }
        }
    }

    /// Stores a block (replacing any copy). Failures are logged and otherwise ignored:
    /// the block stays readable from object storage.
    pub fn put(&self, key: &str, data: &Bytes) {
        let size = match self.medium {
            Medium::Disk(_) => file_len(data.len()) as u64,
            Medium::Memory => data.len() as u64,
        };
        if size > self.capacity
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return;
        }
        let kept = match &self.medium {
            Medium::Memory => Some(data.clone()),
            Medium::Disk(root) => {
                if let Err(e) = write_file(&path_of(root, key), data) {
                    tracing::warn!(key, error = %e, "cannot write block cache entry");
                    return;
                }
                None
            }
        };
        let victims = {
            let mut index = self.index.lock();
            index.insert(key.to_string(), size, kept);
            index.evict(self.capacity)
        };
        self.counters
            .evictions
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.drop_files(&victims);
    }

    /// Forgets a block (its object was deleted).
    pub fn remove(&self, key: &str) {
        if self.index.lock().remove(key) {
            self.drop_files(&[key.to_string()]);
        }
    }

    pub fn stats(&self) -> CacheStats {
        let index = self.index.lock();
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            corrupt: self.counters.corrupt.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            bytes: index.used,
            entries: index.entries.len() as u64,
        }
    }

    fn drop_files(&self, keys: &[String]) {
        if let Medium::Disk(root) = &self.medium {
            for key in keys {
                if let Err(e) = fs::remove_file(path_of(root, key))
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(key, error = %e, "cannot delete block cache file");
                }
            }
        }
    }
}

fn path_of(root: &Path, key: &str) -> PathBuf {
    root.join(key)
}

/// A temporary file older than this is a leftover of a client that died while writing it;
/// a younger one may belong to another client writing in the same directory right now.
const STALE_TEMPORARY: Duration = Duration::from_secs(600);

/// Collects (key, file size, mtime) of every cache file under `dir`; deletes stale
/// temporaries.
///
/// Another client may use the directory at the same time (an upgrade's old client keeps
/// serving while the new one opens the cache): files and directories that vanish during
/// the scan are skipped.
fn scan(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, u64, std::time::SystemTime)>,
) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound && dir != root => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let ft = match entry.file_type() {
            Ok(ft) => ft,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if ft.is_dir() {
            scan(root, &path, out)?;
        } else if ft.is_file() {
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if path.extension().is_some_and(|e| e == "tmp") {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok());
                if age.is_some_and(|a| a >= STALE_TEMPORARY) {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let Some(key) = rel.to_str() else { continue };
            out.push((
                key.to_string(),
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("block too large"))?;
    let mut header = Vec::with_capacity(header_len(data.len()));
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&[VERSION, 0, 0, 0]);
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&(SEGMENT as u32).to_le_bytes());
    for segment in data.chunks(SEGMENT) {
        header.extend_from_slice(&crc32c::crc32c(segment).to_le_bytes());
    }
    // Write beside the final name and rename: a reader never sees a half-written file
    // under a block's name (the checksums would catch it, but as a miss).
    let tmp = path.with_extension(format!("{:08x}.tmp", rand::random::<u32>()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&header)?;
        f.write_all(data)?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Verified bytes `start..end` of the cache file of a `block_len`-byte block; None if
/// the file does not describe such a block or a segment fails its checksum.
fn read_range(
    path: &Path,
    block_len: usize,
    start: usize,
    end: usize,
) -> io::Result<Option<Bytes>> {
    use std::os::unix::fs::FileExt as _;
    let f = fs::File::open(path)?;
    if f.metadata()?.len() != file_len(block_len) as u64 {
        return Ok(None);
    }
    let mut fixed = [0u8; FIXED_HEADER];
    f.read_exact_at(&mut fixed, 0)?;
    let word = |i: usize| {
        u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]) as usize
    };
    if &fixed[..4] != MAGIC || fixed[4] != VERSION || word(8) != block_len || word(12) != SEGMENT {
        return Ok(None);
    }
    if start == end {
        return Ok(Some(Bytes::new()));
    }
    let (first, last) = (start / SEGMENT, (end - 1) / SEGMENT);
    let mut crcs = vec![0u8; 4 * (last - first + 1)];
    f.read_exact_at(&mut crcs, (FIXED_HEADER + 4 * first) as u64)?;
    let from = first * SEGMENT;
    let to = ((last + 1) * SEGMENT).min(block_len);
    let mut buf = vec![0u8; to - from];
    f.read_exact_at(&mut buf, (header_len(block_len) + from) as u64)?;
    for (segment, crc) in buf.chunks(SEGMENT).zip(crcs.chunks_exact(4)) {
        if crc32c::crc32c(segment).to_le_bytes() != crc {
            return Ok(None);
        }
    }
    Ok(Some(Bytes::from(buf).slice(start - from..end - from)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block(n: usize, seed: u8) -> Bytes {
        Bytes::from(
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn evicts_least_recently_used_within_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 3 * file_len(1000) as u64;
        let c = BlockCache::open_disk(dir.path(), cap).unwrap();
        c.put("chunks/0/0/1_0_1000", &block(1000, 1));
        c.put("chunks/0/0/2_0_1000", &block(1000, 2));
        c.put("chunks/0/0/3_0_1000", &block(1000, 3));
        assert!(c.get("chunks/0/0/1_0_1000", 1000).is_some()); // 1 is now the most recent
        c.put("chunks/0/0/4_0_1000", &block(1000, 4));
        assert!(c.stats().bytes <= cap);
        assert!(!c.contains("chunks/0/0/2_0_1000"));
        assert!(!dir.path().join("chunks/0/0/2_0_1000").exists());
        assert_eq!(c.get("chunks/0/0/1_0_1000", 1000), Some(block(1000, 1)));
        assert_eq!(c.get("chunks/0/0/4_0_1000", 1000), Some(block(1000, 4)));
    }

    #[test]
    fn survives_reopen_and_drops_damage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = BlockCache::open_disk(dir.path(), 1 << 20).unwrap();
            c.put("chunks/0/0/1_0_500", &block(500, 1));
            c.put("chunks/0/0/2_0_500", &block(500, 2));
            c.put("chunks/0/0/3_0_500", &block(500, 3));
        }
        // A temporary of a client that died while writing it, and one another client is
        // writing now.
        let stale = dir.path().join("chunks/0/0/leftover.1234.tmp");
        fs::write(&stale, b"x").unwrap();
        fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - STALE_TEMPORARY)
            .unwrap();
        let live = dir.path().join("chunks/0/0/4_0_500.5678.tmp");
        fs::write(&live, b"y").unwrap();
        // Flip one payload byte of block 2 and truncate block 3.
        let p2 = dir.path().join("chunks/0/0/2_0_500");
        let mut b = fs::read(&p2).unwrap();
        let i = b.len() - 500 + 7;
        b[i] ^= 0x40;
        fs::write(&p2, b).unwrap();
        let p3 = dir.path().join("chunks/0/0/3_0_500");
        let b = fs::read(&p3).unwrap();
        fs::write(&p3, &b[..b.len() - 1]).unwrap();

        let c = BlockCache::open_disk(dir.path(), 1 << 20).unwrap();
        assert!(!stale.exists() && live.exists());
        assert!(!c.contains("chunks/0/0/4_0_500.5678.tmp"));
        assert_eq!(c.get("chunks/0/0/1_0_500", 500), Some(block(500, 1)));
        assert_eq!(c.get("chunks/0/0/2_0_500", 500), None);
        assert_eq!(c.get("chunks/0/0/3_0_500", 500), None);
        assert_eq!(c.stats().corrupt, 2);
        assert!(!p2.exists() && !p3.exists());
        // A length that does not match the key's is a miss too.
        assert_eq!(c.get("chunks/0/0/1_0_500", 499), None);
    }

    /// An upgrade's new client opens the cache directory while the old client still
    /// writes (temporary file, rename) and evicts in it: files that vanish under the
    /// scan are skipped, never an error that fails the new client's start.
    #[test]
    fn opens_while_another_cache_writes_and_evicts_in_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 200 * file_len(2_000) as u64;
        let other = BlockCache::open_disk(dir.path(), cap).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let puts = AtomicU64::new(0);
        let key = |i: u64| format!("chunks/{}/0/{i}_0_2000", i % 7);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    other.put(&key(i), &block(2_000, i as u8));
                    i += 1;
                    puts.store(i, Ordering::Relaxed);
                }
            });
            // Past the bound: the writer evicts from now on.
            while puts.load(Ordering::Relaxed) < 250 {
                std::thread::yield_now();
            }
            let mut failures = Vec::new();
            for _ in 0..300 {
                if let Err(e) = BlockCache::open_disk(dir.path(), cap) {
                    failures.push(e.to_string());
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(
                failures.is_empty(),
                "{} opens failed: {:?}",
                failures.len(),
                &failures[..failures.len().min(3)]
            );
        });
        // Whatever the two left behind is intact.
        let c = BlockCache::open_disk(dir.path(), cap).unwrap();
        assert!(c.stats().entries > 0);
        for i in 0..puts.load(Ordering::Relaxed) {
            if c.contains(&key(i)) {
                assert_eq!(c.get(&key(i), 2_000), Some(block(2_000, i as u8)));
            }
        }
        assert_eq!(c.stats().corrupt, 0);
    }

    #[test]
    fn range_reads_verify_only_their_segments() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open_disk(dir.path(), 1 << 20).unwrap();
        let data = block(5 * SEGMENT + 123, 9);
        c.put("chunks/0/0/7_0_x", &data);
        let n = data.len();
        for (start, len) in [
            (0, 1),
            (SEGMENT - 1, 2),
            (3 * SEGMENT + 5, 2 * SEGMENT + 118),
            (n, 0),
            (0, n),
        ] {
            assert_eq!(
                c.get_range("chunks/0/0/7_0_x", n, start, len),
                Some(data.slice(start..start + len))
            );
        }
        assert_eq!(
            c.get_range("chunks/0/0/7_0_x", n, n - 1, 2),
            None,
            "past the block"
        );
        c.put("chunks/0/0/7_0_x", &data);
        // Damage segment 3: ranges elsewhere still verify, a range over it is a miss.
        let p = dir.path().join("chunks/0/0/7_0_x");
        let mut b = fs::read(&p).unwrap();
        let i = header_len(n) + 3 * SEGMENT + 10;
        b[i] ^= 1;
        fs::write(&p, b).unwrap();
        assert_eq!(
            c.get_range("chunks/0/0/7_0_x", n, 0, 100),
            Some(data.slice(0..100))
        );
        assert_eq!(c.get_range("chunks/0/0/7_0_x", n, 3 * SEGMENT, 100), None);
        assert!(!p.exists() && !c.contains("chunks/0/0/7_0_x"));
    }

    #[test]
    fn memory_cache_is_bounded() {
        let c = BlockCache::memory(2500);
        for i in 0..10u8 {
            c.put(&format!("chunks/0/0/{i}_0_1000"), &block(1000, i));
        }
        let s = c.stats();
        assert!(s.bytes <= 2500 && s.entries == 2, "{s:?}");
        assert_eq!(c.get("chunks/0/0/9_0_1000", 1000), Some(block(1000, 9)));
        assert!(c.get("chunks/0/0/0_0_1000", 1000).is_none());
    }
}
