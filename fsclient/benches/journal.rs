//! What the write journal costs on write throughput: the data path (`DataStore`, the
//! layer under the FUSE adapter) driven directly, with and without the mount's journal
//! (a 512 MiB memfd, as the supervisor creates), on the embedded redb engine and local
//! object storage.
//!
//! Run:
//!
//! ```sh
//! cargo bench -p fsclient --bench journal
//! ```
//!
//! Options after `--`: `--seq-mib N` (default 256), `--random-writes N` (default 20000,
//! split over the threads), `--reps N` (default 3, the median is shown), `--dir DIR`
//! (default /var/tmp). Prints a markdown table for docs/benchmarks.md.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fsclient::data::journal::{self, HEADER_BYTES};
use fsclient::data::{DataConfig, DataStore, JournalStart};
use fsclient::meta::{self, Caller, FileKind, Format, Ino, MetaEngine, NewNode, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The supervisor's journal size (`supervisor::mount::JOURNAL_BYTES`).
const JOURNAL_BYTES: u64 = 512 << 20;
/// Random writes land in the first 64 MiB of their file.
const RANDOM_SPAN: u64 = 64 << 20;

struct Opts {
    seq_mib: u64,
    random_writes: usize,
    reps: usize,
    dir: PathBuf,
}

fn opts() -> Opts {
    let mut o = Opts {
        seq_mib: 256,
        random_writes: 20_000,
        reps: 3,
        dir: PathBuf::from("/var/tmp"),
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seq-mib" => o.seq_mib = val.parse().unwrap(),
            "--random-writes" => o.random_writes = val.parse().unwrap(),
            "--reps" => o.reps = val.parse().unwrap(),
            "--dir" => o.dir = PathBuf::from(val),
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

struct Volume {
    _dir: tempfile::TempDir,
    meta: Arc<dyn MetaEngine>,
    data: Arc<DataStore>,
    _rt: tokio::runtime::Runtime,
    files: u32,
}

impl Volume {
    fn new(base: &Path, journaled: bool) -> Volume {
        let dir = tempfile::Builder::new()
            .prefix("baton-journal-bench-")
            .tempdir_in(base)
            .unwrap();
        let meta = meta::open(&format!("redb://{}/meta.redb", dir.path().display())).unwrap();
        let storage = format!("fs://{}", dir.path().join("objects").display());
        let format = Format {
            name: "bench".into(),
            uuid: "journal-bench".into(),
            storage: storage.clone(),
            block_size: 4 << 20,
            capacity: 0,
            inodes: 0,
            created: Timestamp::now(),
        };
        meta.format(&format, false).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let config = DataConfig {
            cache_dir: Some(dir.path().join("cache")),
            ..DataConfig::default()
        };
        let data =
            DataStore::open(&storage, &format, config, meta.clone(), rt.handle().clone()).unwrap();
        if journaled {
            let memfd = journal::create_memfd(HEADER_BYTES + JOURNAL_BYTES).unwrap();
            let started = data.attach_journal(memfd).unwrap();
            assert!(matches!(started, JournalStart::TakenOver(_)), "{started:?}");
        }
        Volume {
            _dir: dir,
            meta,
            data,
            _rt: rt,
            files: 0,
        }
    }

    fn create(&mut self) -> Ino {
        self.files += 1;
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
                format!("f{}", self.files).as_bytes(),
                &node,
                Caller::ROOT,
            )
            .unwrap()
            .0
    }
}

/// One measurement: the time of the write calls and of the flush that follows.
#[derive(Clone, Copy)]
struct Run {
    writes: Duration,
    flush: Duration,
    p50: Duration,
    p99: Duration,
}

fn percentile(lat: &mut [Duration], p: f64) -> Duration {
    lat.sort_unstable();
    lat[((lat.len() - 1) as f64 * p) as usize]
}

/// `mib` sequential 1 MiB writes to a new file, then its flush.
fn sequential(v: &mut Volume, mib: u64) -> Run {
    let ino = v.create();
    let buf: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 + 7) as u8).collect();
    let mut lat = Vec::with_capacity(mib as usize);
    let start = Instant::now();
    for k in 0..mib {
        let t = Instant::now();
        v.data.write(ino, k << 20, &buf).unwrap();
        lat.push(t.elapsed());
    }
    let writes = start.elapsed();
    let t = Instant::now();
    v.data.flush(ino).unwrap();
    Run {
        writes,
        flush: t.elapsed(),
        p50: percentile(&mut lat, 0.5),
        p99: percentile(&mut lat, 0.99),
    }
}

/// `count` 4 KiB writes at random aligned offsets, from `threads` threads (one file
/// each), then the flushes.
fn random(v: &mut Volume, count: usize, threads: usize) -> Run {
    let inos: Vec<Ino> = (0..threads).map(|_| v.create()).collect();
    let per = count / threads;
    let start = Instant::now();
    let lat: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = inos
            .iter()
            .enumerate()
            .map(|(n, &ino)| {
                let data = v.data.clone();
                s.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(n as u64);
                    let buf = [n as u8 + 1; 4096];
                    let mut lat = Vec::with_capacity(per);
                    for _ in 0..per {
                        let off = rng.random_range(0..RANDOM_SPAN / 4096) * 4096;
                        let t = Instant::now();
                        data.write(ino, off, &buf).unwrap();
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let writes = start.elapsed();
    let t = Instant::now();
    for ino in inos {
        v.data.flush(ino).unwrap();
    }
    let mut lat = lat;
    Run {
        writes,
        flush: t.elapsed(),
        p50: percentile(&mut lat, 0.5),
        p99: percentile(&mut lat, 0.99),
    }
}

/// The run with the median write time of `reps` runs, each on a new volume.
fn median(reps: usize, journaled: bool, base: &Path, f: impl Fn(&mut Volume) -> Run) -> Run {
    let mut runs: Vec<Run> = (0..reps)
        .map(|_| {
            let mut v = Volume::new(base, journaled);
            f(&mut v)
        })
        .collect();
    runs.sort_by_key(|r| r.writes);
    runs[runs.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn main() {
    let o = opts();
    std::fs::create_dir_all(&o.dir).unwrap();
    println!(
        "| workload | journal | write calls | with the final flush | write latency p50 / p99 (µs) | journal cost (write calls) |"
    );
    println!("|---|---|---|---|---|---|");
    let seq_mib = o.seq_mib;
    let mib = seq_mib as f64;
    let mut base = None;
    for journaled in [false, true] {
        let r = median(o.reps, journaled, &o.dir, |v| sequential(v, seq_mib));
        let rate = mib / r.writes.as_secs_f64();
        let cost = base.map_or(String::from("—"), |b: f64| {
            format!("{:+.0}%", (b / rate - 1.0) * 100.0)
        });
        base.get_or_insert(rate);
        println!(
            "| sequential {seq_mib} MiB, 1 MiB writes | {} | {rate:.0} MiB/s | {:.0} MiB/s | {} / {} | {cost} |",
            if journaled { "on" } else { "off" },
            mib / (r.writes + r.flush).as_secs_f64(),
            us(r.p50),
            us(r.p99),
        );
    }
    for threads in [1usize, 4] {
        let count = o.random_writes / threads * threads;
        let mut base = None;
        for journaled in [false, true] {
            let r = median(o.reps, journaled, &o.dir, |v| random(v, count, threads));
            let iops = count as f64 / r.writes.as_secs_f64();
            let cost = base.map_or(String::from("—"), |b: f64| {
                format!("{:+.0}%", (b / iops - 1.0) * 100.0)
            });
            base.get_or_insert(iops);
            println!(
                "| {count} random 4 KiB writes, {threads} thread{} | {} | {iops:.0} writes/s | {:.0} writes/s | {} / {} | {cost} |",
                if threads == 1 { "" } else { "s" },
                if journaled { "on" } else { "off" },
                count as f64 / (r.writes + r.flush).as_secs_f64(),
                us(r.p50),
                us(r.p99),
            );
        }
    }
}
