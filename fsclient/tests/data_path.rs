//! The data path end to end, through `DataStore` on a redb metadata engine: what is written
//! is read back byte for byte (compared with an in-memory model), across block and chunk
//! boundaries, holes, overwrites and truncation; the cache stays within its bound and
//! never returns damaged bytes; read-ahead prefetches; backpressure does not deadlock;
//! failed uploads are kept and retried; garbage is deleted only after its grace period.
//!
//! The core scenarios run twice: on local storage (`fs://`) and on S3 (a `moto_server`
//! started by testkit).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use fsclient::data::{DataConfig, DataError, DataStore, OpenError, ReadState};
use fsclient::meta::{
    self, CHUNK_SIZE, Caller, FileKind, Format, Ino, MetaEngine, NewNode, SetAttr, Timestamp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::s3::S3Server;

const SMALL_BLOCK: u32 = Format::MIN_BLOCK_SIZE;

struct Env {
    dir: tempfile::TempDir,
    meta: Arc<dyn MetaEngine>,
    format: Format,
    storage: String,
    rt: tokio::runtime::Runtime,
    data: Arc<DataStore>,
    names: std::cell::Cell<u32>,
}

impl Env {
    fn fs(block_size: u32, config: DataConfig) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let storage = format!("fs://{}", dir.path().join("objects").display());
        Env::new(dir, storage, block_size, config)
    }

    fn s3(server: &S3Server, bucket: &str, block_size: u32, config: DataConfig) -> Env {
        server.create_bucket(bucket).unwrap();
        Env::new(
            tempfile::tempdir().unwrap(),
            server.url(bucket),
            block_size,
            config,
        )
    }

    fn new(
        dir: tempfile::TempDir,
        storage: String,
        block_size: u32,
        mut config: DataConfig,
    ) -> Env {
        let meta = meta::open(&format!("redb://{}/meta.redb", dir.path().display())).unwrap();
        let format = Format {
            name: "vol".into(),
            uuid: "0b7d0c5e-uuid".into(),
            storage: fsclient::data::redact(&storage),
            block_size,
            capacity: 0,
            inodes: 0,
            created: Timestamp::now(),
        };
        meta.format(&format, false).unwrap();
        if config.cache_dir.is_none() {
            config.cache_dir = Some(dir.path().join("cache"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let data =
            DataStore::open(&storage, &format, config, meta.clone(), rt.handle().clone()).unwrap();
        Env {
            dir,
            meta,
            format,
            storage,
            rt,
            data,
            names: Default::default(),
        }
    }

    /// Another client of the same volume (same metadata and storage), with its own cache.
    fn second_client(&self, config: DataConfig) -> Arc<DataStore> {
        DataStore::open(
            &self.storage,
            &self.format,
            config,
            self.meta.clone(),
            self.rt.handle().clone(),
        )
        .unwrap()
    }

    fn create(&self) -> Ino {
        let n = self.names.get();
        self.names.set(n + 1);
        let node = NewNode {
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            target: vec![],
        };
        self.meta
            .mknod(
                None,
                Ino::ROOT,
                format!("f{n}").as_bytes(),
                &node,
                Caller::ROOT,
            )
            .unwrap()
            .0
    }

    fn size(&self, ino: Ino) -> u64 {
        let committed = self.meta.getattr(ino).unwrap().size;
        committed.max(self.data.pending_end(ino).unwrap_or(0))
    }

    fn read(&self, ino: Ino, offset: u64, len: u64) -> Vec<u8> {
        read_with(
            &self.data,
            &self.meta,
            ino,
            offset,
            len,
            &mut ReadState::default(),
        )
    }

    fn truncate(&self, ino: Ino, size: u64) {
        self.data.flush(ino).unwrap();
        let set = SetAttr {
            size: Some(size),
            ..Default::default()
        };
        self.meta
            .setattr(None, ino, &set, Timestamp::now())
            .unwrap();
        self.data.invalidate(ino);
    }

    fn objects_dir(&self) -> PathBuf {
        self.dir.path().join("objects").join("chunks")
    }
}

/// Reads `offset..offset + len` in pieces of at most 1 MiB, as the kernel would.
fn read_with(
    data: &DataStore,
    meta: &Arc<dyn MetaEngine>,
    ino: Ino,
    offset: u64,
    len: u64,
    state: &mut ReadState,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    while pos < offset + len {
        let file_size = meta
            .getattr(ino)
            .unwrap()
            .size
            .max(data.pending_end(ino).unwrap_or(0));
        let want = (offset + len - pos).min(1 << 20) as u32;
        let got = data.read(ino, pos, want, file_size, state).unwrap();
        if got.is_empty() {
            break;
        }
        pos += got.len() as u64;
        out.extend_from_slice(&got);
    }
    out
}

/// The expected contents of a file.
#[derive(Default)]
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[offset as usize..end].copy_from_slice(data);
    }

    fn truncate(&mut self, size: u64) {
        self.0.resize(size as usize, 0);
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {} want {}",
            got[i], want[i]
        );
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn small_config() -> DataConfig {
    DataConfig {
        cache_bytes: 64 << 20,
        buffer_bytes: 16 << 20,
        ..DataConfig::default()
    }
}

// --- scenarios shared by the fs and S3 runs ---

fn sequential_writes(env: &Env) {
    let ino = env.create();
    let mut model = Model::default();
    let data = pattern(1, 3_000_000);
    // Odd-sized writes cross block boundaries at every possible phase.
    for (i, piece) in data.chunks(100_003).enumerate() {
        let off = i as u64 * 100_003;
        env.data.write(ino, off, piece).unwrap();
        model.write(off, piece);
    }
    assert!(env.data.is_dirty(ino));
    assert_eq!(env.data.pending_end(ino), Some(3_000_000));
    // A read of a dirty inode sees the pending writes (it flushes first).
    assert_same(
        &env.read(ino, 0, 3_000_000),
        &model.0,
        "sequential, before flush",
    );
    assert!(!env.data.is_dirty(ino));
    assert_eq!(env.meta.getattr(ino).unwrap().size, 3_000_000);
    // Reads past EOF are short; reads at EOF are empty.
    assert_eq!(
        env.data
            .read(ino, 2_999_990, 100, 3_000_000, &mut ReadState::default())
            .unwrap()
            .len(),
        10
    );
    assert!(
        env.data
            .read(ino, 3_000_000, 100, 3_000_000, &mut ReadState::default())
            .unwrap()
            .is_empty()
    );
    // A cold client reads the same bytes from object storage.
    let cold = env.second_client(DataConfig {
        cache_dir: Some(env.dir.path().join("cold")),
        ..small_config()
    });
    let got = read_with(
        &cold,
        &env.meta,
        ino,
        0,
        3_000_000,
        &mut ReadState::default(),
    );
    assert_same(&got, &model.0, "sequential, cold client");
    assert!(cold.stats().downloaded_blocks > 0);
}

fn random_overwrites(env: &Env, seed: u64, rounds: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ino = env.create();
    let mut model = Model::default();
    let span = 6 * u64::from(env.format.block_size);
    for round in 0..rounds {
        let off = rng.random_range(0..span);
        let len = rng.random_range(1..=(u64::from(env.format.block_size) * 3 / 2)) as usize;
        let data = pattern(seed * 1000 + round as u64, len);
        env.data.write(ino, off, &data).unwrap();
        model.write(off, &data);
        match rng.random_range(0..10) {
            0 => env.data.flush(ino).unwrap(),
            1 => {
                let at = rng.random_range(0..model.0.len() as u64);
                let n = rng
                    .random_range(0..200_000u64)
                    .min(model.0.len() as u64 - at);
                let got = env.read(ino, at, n);
                assert_same(
                    &got,
                    &model.0[at as usize..(at + n) as usize],
                    &format!("round {round} read"),
                );
            }
            _ => {}
        }
    }
    env.data.flush(ino).unwrap();
    assert_eq!(env.size(ino), model.0.len() as u64);
    assert_same(
        &env.read(ino, 0, model.0.len() as u64),
        &model.0,
        "random overwrites",
    );
}

fn sparse_and_chunk_boundaries(env: &Env) {
    let ino = env.create();
    let writes: [(u64, usize); 5] = [
        (10, 1000),
        (CHUNK_SIZE - 3000, 7000),    // crosses chunk 0 -> 1
        (2 * CHUNK_SIZE - 1, 2),      // the last byte of chunk 1 and first of chunk 2
        (3 * CHUNK_SIZE + 5, 70_000), // far past a whole empty chunk
        (CHUNK_SIZE - 1000, 500),     // overwrite inside the first crossing write
    ];
    let mut expect: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = pattern(50 + i as u64, len);
        env.data.write(ino, off, &d).unwrap();
        expect.push((off, d));
    }
    let size = 3 * CHUNK_SIZE + 5 + 70_000;
    assert_eq!(env.data.pending_end(ino), Some(size));
    env.data.flush(ino).unwrap();
    assert_eq!(env.meta.getattr(ino).unwrap().size, size);
    // Check windows around every write against a model of just that window.
    for &(off, len) in &writes {
        let from = off.saturating_sub(5000);
        let to = (off + len as u64 + 5000).min(size);
        let mut want = vec![0u8; (to - from) as usize];
        for (woff, d) in &expect {
            for (i, b) in d.iter().enumerate() {
                let p = woff + i as u64;
                if p >= from && p < to {
                    want[(p - from) as usize] = *b;
                }
            }
        }
        assert_same(
            &env.read(ino, from, to - from),
            &want,
            &format!("window at {off}"),
        );
    }
    // The empty middle of the file reads as zeros.
    let hole = env.read(ino, 2 * CHUNK_SIZE + 4096, 3 << 20);
    assert!(hole.len() == 3 << 20 && hole.iter().all(|&b| b == 0));
}

fn many_small_appends(env: &Env) {
    let ino = env.create();
    let mut model = Model::default();
    let mut off = 0u64;
    for i in 0..5000u64 {
        let d = pattern(i + 7, 97);
        env.data.write(ino, off, &d).unwrap();
        model.write(off, &d);
        off += 97;
    }
    env.data.flush(ino).unwrap();
    // Appends continue one slice: the chunk holds a single slice, not thousands.
    assert_eq!(env.meta.read_chunk(ino, 0).unwrap().len(), 1);
    assert_same(&env.read(ino, 0, off), &model.0, "small appends");
}

fn truncation(env: &Env) {
    let ino = env.create();
    let mut model = Model::default();
    let d = pattern(3, 1 << 20);
    env.data.write(ino, 0, &d).unwrap();
    model.write(0, &d);
    // Read once so the layout is cached, then shrink behind it.
    assert_same(&env.read(ino, 0, 1 << 20), &model.0, "before truncate");
    env.truncate(ino, 300_000);
    model.truncate(300_000);
    assert_same(&env.read(ino, 0, 1 << 20), &model.0, "after shrink");
    // Extending again must not resurrect the old bytes.
    let tail = pattern(4, 1000);
    env.data.write(ino, 600_000, &tail).unwrap();
    model.write(600_000, &tail);
    assert_same(
        &env.read(ino, 0, 2 << 20),
        &model.0,
        "after write past the end",
    );
    assert!(env.read(ino, 300_000, 300_000).iter().all(|&b| b == 0));
    // Pending writes are flushed before a truncate (as the filesystem layer does).
    let more = pattern(5, 4000);
    env.data.write(ino, 100, &more).unwrap();
    model.write(100, &more);
    env.truncate(ino, 2 << 20);
    model.truncate(2 << 20);
    assert_same(
        &env.read(ino, 0, 2 << 20),
        &model.0,
        "after extend by truncate",
    );
}

/// `objects` counts the block objects in storage, where the test can see them.
fn garbage_collection(env: &Env, objects: &dyn Fn() -> Option<usize>) -> usize {
    let dead = env.create();
    let live = env.create();
    let d = pattern(8, 500_000);
    let keep = pattern(9, 300_000);
    env.data.write(dead, 0, &d).unwrap();
    env.data.write(live, 0, &keep).unwrap();
    env.data.flush_all().unwrap();
    let before = objects();
    env.truncate(dead, 0);
    // Inside the grace period nothing is collected.
    assert_eq!(
        env.data.collect_garbage(Duration::from_secs(3600)).unwrap(),
        0
    );
    assert_eq!(objects(), before);
    let collected = env.data.collect_garbage(Duration::ZERO).unwrap();
    assert_eq!(collected, 1);
    if let Some(before) = before {
        // 500 000 bytes in 64 KiB blocks: 8 objects deleted; the live file's 5 stay.
        assert_eq!(before, 8 + 5);
        assert_eq!(objects(), Some(5));
    }
    assert_eq!(env.data.collect_garbage(Duration::ZERO).unwrap(), 0);
    // The live file is untouched, even for a client that must download it.
    let cold = env.second_client(DataConfig {
        cache_dir: Some(env.dir.path().join("gc-cold")),
        ..small_config()
    });
    let got = read_with(
        &cold,
        &env.meta,
        live,
        0,
        300_000,
        &mut ReadState::default(),
    );
    assert_same(&got, &keep, "live file after gc");
    collected
}

// --- local storage ---

#[test]
fn fs_sequential_writes() {
    sequential_writes(&Env::fs(SMALL_BLOCK, small_config()));
}

#[test]
fn fs_random_overwrites() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    for seed in 1..=3 {
        random_overwrites(&env, seed, 300);
    }
}

#[test]
fn fs_sparse_and_chunk_boundaries() {
    sparse_and_chunk_boundaries(&Env::fs(Format::DEFAULT_BLOCK_SIZE, small_config()));
}

#[test]
fn fs_many_small_appends() {
    many_small_appends(&Env::fs(SMALL_BLOCK, small_config()));
}

#[test]
fn fs_truncation() {
    truncation(&Env::fs(SMALL_BLOCK, small_config()));
}

#[test]
fn fs_garbage_collection_waits_for_grace() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    let dir = env.objects_dir();
    garbage_collection(&env, &|| Some(files_under(&dir).len()));
}

#[test]
fn fs_256_mib_file_checksum() {
    let env = Env::fs(
        Format::DEFAULT_BLOCK_SIZE,
        DataConfig {
            cache_bytes: 512 << 20,
            ..DataConfig::default()
        },
    );
    let ino = env.create();
    const SIZE: u64 = 256 << 20;
    const PIECE: usize = 1 << 20;
    let mut want = crc32c::crc32c(&[]);
    for i in 0..SIZE / PIECE as u64 {
        let d = pattern(1000 + i, PIECE);
        want = crc32c::crc32c_append(want, &d);
        env.data.write(ino, i * PIECE as u64, &d).unwrap();
    }
    env.data.flush(ino).unwrap();
    assert_eq!(env.meta.getattr(ino).unwrap().size, SIZE);
    let mut got = crc32c::crc32c(&[]);
    let mut state = ReadState::default();
    let mut pos = 0;
    while pos < SIZE {
        let d = env
            .data
            .read(ino, pos, PIECE as u32, SIZE, &mut state)
            .unwrap();
        assert_eq!(d.len(), PIECE);
        got = crc32c::crc32c_append(got, &d);
        pos += d.len() as u64;
    }
    assert_eq!(got, want);
    assert_eq!(env.data.stats().buffered_bytes, 0);
}

#[test]
fn fs_cache_bound_and_corruption() {
    let bound = 5 * (u64::from(SMALL_BLOCK) + 64);
    let env = Env::fs(
        SMALL_BLOCK,
        DataConfig {
            cache_bytes: bound,
            ..small_config()
        },
    );
    let ino = env.create();
    let d = pattern(11, 20 * SMALL_BLOCK as usize);
    env.data.write(ino, 0, &d).unwrap();
    env.data.flush(ino).unwrap();
    // Full blocks are not cached on upload: the reads below fill the cache.
    assert_eq!(env.data.stats().cache.entries, 0);
    assert_same(
        &env.read(ino, 0, d.len() as u64),
        &d,
        "through a small cache",
    );
    let s = env.data.stats().cache;
    assert!(s.bytes <= bound && s.entries <= 5, "{s:?}");
    assert!(s.evictions >= 15, "{s:?}");
    let cache_dir = env.dir.path().join("cache");
    let on_disk: u64 = files_under(&cache_dir)
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= bound, "{on_disk} bytes on disk");

    // Damage every cached block: reads must still return the right bytes.
    let files = files_under(&cache_dir);
    assert!(!files.is_empty());
    for p in &files {
        let mut b = std::fs::read(p).unwrap();
        let i = b.len() - 100;
        b[i] ^= 0xff;
        std::fs::write(p, b).unwrap();
    }
    let before = env.data.stats().cache.corrupt;
    assert_same(
        &env.read(ino, 0, d.len() as u64),
        &d,
        "with damaged cache files",
    );
    assert!(env.data.stats().cache.corrupt > before);

    // A restarted client indexes the cache it finds, within the bound.
    let again = env.second_client(DataConfig {
        cache_dir: Some(cache_dir.clone()),
        cache_bytes: bound,
        ..small_config()
    });
    assert!(again.stats().cache.entries > 0);
    let got = read_with(
        &again,
        &env.meta,
        ino,
        0,
        d.len() as u64,
        &mut ReadState::default(),
    );
    assert_same(&got, &d, "after reopening the cache");
}

#[test]
fn fs_readahead_prefetches() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    let ino = env.create();
    let d = pattern(12, 64 * SMALL_BLOCK as usize);
    env.data.write(ino, 0, &d).unwrap();
    env.data.flush(ino).unwrap();

    let config = |name: &str| DataConfig {
        cache_dir: Some(env.dir.path().join(name)),
        readahead_blocks: 8,
        ..small_config()
    };
    // A sequential reader with a cold cache: later reads find prefetched blocks.
    let seq = env.second_client(config("seq"));
    let mut state = ReadState::default();
    let mut got = Vec::new();
    for off in (0..d.len() as u64).step_by(32 << 10) {
        got.extend(
            seq.read(ino, off, 32 << 10, d.len() as u64, &mut state)
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_same(&got, &d, "sequential reader");
    let s = seq.stats();
    assert!(s.prefetched_blocks > 0, "{s:?}");
    assert!(s.cache.hits > 0, "{s:?}");
    // Each block was downloaded once, by the reader or by read-ahead — or twice when the
    // reader asked for a block whose prefetch was still in flight (a race a loaded CI
    // machine hits): at most one read-ahead window more than the file.
    assert!(s.downloaded_blocks <= 64 + 8, "{s:?}");

    // A reader jumping around does not trigger read-ahead.
    let random = env.second_client(config("random"));
    let mut state = ReadState::default();
    for i in [40u64, 3, 27, 9, 60, 15] {
        let off = i * u64::from(SMALL_BLOCK) + 100;
        let got = random
            .read(ino, off, 1000, d.len() as u64, &mut state)
            .unwrap();
        assert_same(&got, &d[off as usize..off as usize + 1000], "random reader");
    }
    assert_eq!(random.stats().prefetched_blocks, 0);
}

#[test]
fn fs_backpressure_small_buffer_no_deadlock() {
    let env = Env::fs(
        SMALL_BLOCK,
        DataConfig {
            buffer_bytes: 200 << 10,
            upload_concurrency: 2,
            ..small_config()
        },
    );
    let inos: Vec<Ino> = (0..4).map(|_| env.create()).collect();
    let data = env.data.clone();
    let (tx, rx) = mpsc::channel();
    let mut models = Vec::new();
    for (t, &ino) in inos.iter().enumerate() {
        let data = data.clone();
        let tx = tx.clone();
        let content = pattern(100 + t as u64, 2 << 20);
        models.push(content.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(t as u64);
            // Mostly sequential, with some rewrites behind the write head.
            let mut off = 0usize;
            while off < content.len() {
                let n = rng.random_range(1..30_000).min(content.len() - off);
                data.write(ino, off as u64, &content[off..off + n]).unwrap();
                if rng.random_range(0..8) == 0 && off > 0 {
                    let back = rng.random_range(0..off);
                    let m = (off - back).min(20_000);
                    data.write(ino, back as u64, &content[back..back + m])
                        .unwrap();
                }
                off += n;
            }
            tx.send(()).unwrap();
        });
    }
    // The buffered bytes never exceed the bound (a write waits instead).
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (data, watching) = (env.data.clone(), watching.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while watching.load(std::sync::atomic::Ordering::Acquire) {
                max = max.max(data.stats().buffered_bytes);
                std::thread::sleep(Duration::from_micros(200));
            }
            max
        })
    };
    for _ in 0..inos.len() {
        rx.recv_timeout(Duration::from_secs(90))
            .expect("writers stalled: backpressure deadlock");
    }
    watching.store(false, std::sync::atomic::Ordering::Release);
    let max = watcher.join().unwrap();
    assert!(max > 0 && max <= 200 << 10, "buffered up to {max} bytes");
    env.data.flush_all().unwrap();
    assert_eq!(env.data.stats().buffered_bytes, 0);
    for (ino, want) in inos.iter().zip(&models) {
        assert_same(
            &env.read(*ino, 0, want.len() as u64),
            want,
            "backpressure file",
        );
    }
}

#[test]
fn fs_flushes_race_with_writes() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    let ino = env.create();
    let content = pattern(15, 2 << 20);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (data, done) = (env.data.clone(), done.clone());
        std::thread::spawn(move || {
            let mut flushes = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                data.flush(ino).unwrap();
                flushes += 1;
            }
            flushes
        })
    };
    let mut rng = StdRng::seed_from_u64(5);
    let mut off = 0;
    while off < content.len() {
        let n = rng.random_range(1..20_000).min(content.len() - off);
        env.data
            .write(ino, off as u64, &content[off..off + n])
            .unwrap();
        off += n;
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(flusher.join().unwrap() > 0);
    env.data.flush(ino).unwrap();
    assert_same(
        &env.read(ino, 0, content.len() as u64),
        &content,
        "written while flushing",
    );
}

#[test]
fn fs_failed_uploads_are_kept_and_retried() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    let ino = env.create();
    // A file where the objects' directory should be: every upload fails (even as root).
    let objects = env.dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    std::fs::write(objects.join("chunks"), b"in the way").unwrap();
    let mut d = pattern(13, 5 * SMALL_BLOCK as usize + 123);
    env.data.write(ino, 0, &d).unwrap();
    // The full blocks' background uploads fail; a later write of the inode reports it.
    let mut reported = None;
    for _ in 0..500 {
        match env.data.write(ino, d.len() as u64, b"x") {
            Ok(()) => d.push(b'x'),
            Err(e) => {
                reported = Some(e);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let reported = reported.expect("the failed upload was never reported");
    assert!(matches!(reported, DataError::Upload { .. }), "{reported:?}");
    let err = env.data.flush(ino).unwrap_err();
    assert!(matches!(err, DataError::Upload { .. }), "{err:?}");
    assert!(env.data.is_dirty(ino));
    assert_eq!(
        env.meta.getattr(ino).unwrap().size,
        0,
        "nothing committed without its objects"
    );
    assert_eq!(env.data.pending_end(ino), Some(d.len() as u64));
    std::fs::remove_file(objects.join("chunks")).unwrap();
    env.data.flush(ino).unwrap();
    assert!(!env.data.is_dirty(ino));
    assert_same(&env.read(ino, 0, d.len() as u64), &d, "after the retry");
}

#[test]
fn fs_discard_drops_pending_writes() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    let ino = env.create();
    env.data
        .write(ino, 0, &pattern(14, 3 * SMALL_BLOCK as usize + 10))
        .unwrap();
    assert!(env.data.is_dirty(ino));
    env.data.discard(ino);
    assert!(!env.data.is_dirty(ino));
    assert_eq!(env.data.pending_end(ino), None);
    env.data.flush(ino).unwrap();
    assert_eq!(env.meta.getattr(ino).unwrap().size, 0);
    // Background uploads that were running finish and give their memory back.
    for _ in 0..200 {
        if env.data.stats().buffered_bytes == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(env.data.stats().buffered_bytes, 0);
}

#[test]
fn fs_writes_past_the_largest_file_fail() {
    let env = Env::fs(SMALL_BLOCK, small_config());
    let ino = env.create();
    let err = env
        .data
        .write(ino, meta::MAX_FILE_SIZE - 1, b"ab")
        .unwrap_err();
    assert!(matches!(err, DataError::FileTooBig));
    let err = env.data.write(ino, u64::MAX, b"a").unwrap_err();
    assert!(matches!(err, DataError::FileTooBig));
}

#[test]
fn open_rejects_bad_storage() {
    let dir = tempfile::tempdir().unwrap();
    let meta = meta::open(&format!("redb://{}/meta.redb", dir.path().display())).unwrap();
    let format = Format {
        name: "v".into(),
        uuid: "u".into(),
        storage: String::new(),
        block_size: SMALL_BLOCK,
        capacity: 0,
        inodes: 0,
        created: Timestamp::now(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let open = |url: &str| {
        DataStore::open(
            url,
            &format,
            DataConfig::default(),
            meta.clone(),
            rt.handle().clone(),
        )
    };
    let err = open("gcs://bucket").unwrap_err();
    assert!(matches!(err, OpenError::StorageUrl(_)), "{err:?}");
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(text.contains("fs://") && text.contains("s3://"), "{text}");
    // An endpoint nobody listens on fails the startup check, without showing secrets.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "s3://b?endpoint=http://127.0.0.1:{port}&region=us-east-1&access_key_id=AKIDEXAMPLE&secret_access_key=SUPERSECRET"
    );
    let err = open(&url).unwrap_err();
    assert!(matches!(err, OpenError::StorageCheck { .. }), "{err:?}");
    let mut text = format!("{err:?}");
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = source {
        text.push_str(&e.to_string());
        source = e.source();
    }
    assert!(
        !text.contains("SUPERSECRET") && !text.contains("AKIDEXAMPLE"),
        "{text}"
    );
}

// --- S3 (moto) ---

#[test]
fn s3_core_scenarios() {
    let server = S3Server::start().expect("start moto_server (pip install 'moto[server]')");
    let env = Env::s3(&server, "core", SMALL_BLOCK, small_config());
    sequential_writes(&env);
    random_overwrites(&env, 21, 150);
    many_small_appends(&env);
    truncation(&env);
    assert_eq!(garbage_collection(&env, &|| None), 1);
    let env = Env::s3(
        &server,
        "chunks",
        Format::DEFAULT_BLOCK_SIZE,
        small_config(),
    );
    sparse_and_chunk_boundaries(&env);
}

#[test]
fn s3_missing_bucket_fails_the_startup_check() {
    let server = S3Server::start().expect("start moto_server");
    let dir = tempfile::tempdir().unwrap();
    let meta = meta::open(&format!("redb://{}/meta.redb", dir.path().display())).unwrap();
    let format = Format {
        name: "v".into(),
        uuid: "u".into(),
        storage: String::new(),
        block_size: SMALL_BLOCK,
        capacity: 0,
        inodes: 0,
        created: Timestamp::now(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = server.url("no-such-bucket");
    let err = DataStore::open(
        &url,
        &format,
        DataConfig::default(),
        meta,
        rt.handle().clone(),
    )
    .unwrap_err();
    assert!(matches!(err, OpenError::StorageCheck { .. }), "{err:?}");
}
