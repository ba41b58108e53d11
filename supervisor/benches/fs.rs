//! Filesystem benchmark on a real Baton mount: sequential write and read of 1 GiB, 4 KiB
//! random reads, and create/stat/unlink of 10,000 small files, on the embedded redb
//! engine and on Redis (a local redis-server the bench starts).
//!
//! Run (as root; builds the release binaries first):
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p supervisor --bench fs
//! ```
//!
//! Options after `--`: `--size-mib N` (default 1024), `--files N` (default 10000),
//! `--random-reads N` (default 20000), `--engine redb|redis|all` (default all).
//! Prints a markdown table for docs/benchmarks.md.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use testkit::mount::{MountOptions, TestMount, baton};
use testkit::redis::RedisServer;

struct Opts {
    size_mib: u64,
    files: usize,
    random_reads: usize,
    engines: Vec<&'static str>,
}

fn opts() -> Opts {
    let mut o = Opts {
        size_mib: 1024,
        files: 10_000,
        random_reads: 20_000,
        engines: vec!["redb", "redis"],
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--size-mib" => o.size_mib = val.parse().unwrap(),
            "--files" => o.files = val.parse().unwrap(),
            "--random-reads" => o.random_reads = val.parse().unwrap(),
            "--engine" => {
                o.engines = match val.as_str() {
                    "redb" => vec!["redb"],
                    "redis" => vec!["redis"],
                    _ => vec!["redb", "redis"],
                }
            }
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

fn drop_caches() {
    // Make reads come through FUSE rather than the kernel page cache.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Row {
    engine: &'static str,
    test: String,
    result: String,
}

fn run(engine: &'static str, mount: &TestMount, o: &Opts, rows: &mut Vec<Row>) {
    let mut row = |test: &str, result: String| {
        eprintln!("{engine:6} {test:40} {result}");
        rows.push(Row {
            engine,
            test: test.to_string(),
            result,
        });
    };
    let big = mount.path("big");
    let size = o.size_mib << 20;
    let block: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();

    let t = Instant::now();
    let mut f = File::create(&big).unwrap();
    for _ in 0..o.size_mib {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let d = t.elapsed();
    row(
        &format!("sequential write {} MiB (1 MiB writes + fsync)", o.size_mib),
        format!("{:.0} MiB/s", mib_s(size, d)),
    );

    drop_caches();
    let t = Instant::now();
    let mut f = File::open(&big).unwrap();
    let mut buf = vec![0; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let d = t.elapsed();
    assert_eq!(total, size);
    row(
        &format!("sequential read {} MiB (1 MiB reads)", o.size_mib),
        format!("{:.0} MiB/s", mib_s(size, d)),
    );

    drop_caches();
    let f = File::open(&big).unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut lat = Vec::with_capacity(o.random_reads);
    let mut b4 = [0u8; 4096];
    let t = Instant::now();
    for _ in 0..o.random_reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        let s = Instant::now();
        f.read_exact_at(&mut b4, off).unwrap();
        lat.push(s.elapsed());
    }
    let d = t.elapsed();
    lat.sort();
    row(
        "4 KiB random reads",
        format!(
            "{:.0} IOPS (p50 {:.0} µs, p99 {:.0} µs)",
            o.random_reads as f64 / d.as_secs_f64(),
            percentile(&lat, 0.5).as_secs_f64() * 1e6,
            percentile(&lat, 0.99).as_secs_f64() * 1e6
        ),
    );
    fs::remove_file(&big).unwrap();

    let dir = mount.path("small");
    fs::create_dir(&dir).unwrap();
    let names: Vec<PathBuf> = (0..o.files)
        .map(|i| dir.join(format!("file-{i:06}")))
        .collect();
    let t = Instant::now();
    for n in &names {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(n)
            .unwrap();
        f.write_all(b"small file contents\n").unwrap();
    }
    let d = t.elapsed();
    row(
        &format!("create {} small files (create+write+close)", o.files),
        format!("{:.0} files/s", o.files as f64 / d.as_secs_f64()),
    );

    drop_caches();
    let t = Instant::now();
    for n in &names {
        fs::metadata(n).unwrap();
    }
    let d = t.elapsed();
    row(
        &format!("stat {} files (cold dentry cache)", o.files),
        format!("{:.0} stats/s", o.files as f64 / d.as_secs_f64()),
    );

    let t = Instant::now();
    for n in &names {
        fs::remove_file(n).unwrap();
    }
    let d = t.elapsed();
    row(
        &format!("unlink {} files", o.files),
        format!("{:.0} unlinks/s", o.files as f64 / d.as_secs_f64()),
    );
    fs::remove_dir(&dir).unwrap();
}

fn mount_engine(engine: &str, dir: &Path, redis: Option<&RedisServer>) -> TestMount {
    let home = dir.join(format!("home-{engine}"));
    let mnt = dir.join(format!("mnt-{engine}"));
    let meta = match engine {
        "redis" => redis.unwrap().url(0),
        _ => format!("redb://{}/{engine}/meta.redb", dir.display()),
    };
    let storage = format!("fs://{}/{engine}/data", dir.display());
    let out = baton(
        &home,
        &["format", engine, "--meta", &meta, "--storage", &storage],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    TestMount::at(
        &home,
        &mnt,
        &MountOptions {
            meta: Some(meta),
            args: vec!["--threads".into(), "16".into()],
        },
    )
    .unwrap()
}

fn main() {
    let o = opts();
    let dir = tempfile::Builder::new()
        .prefix("baton-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let redis = if o.engines.contains(&"redis") {
        Some(RedisServer::start().unwrap())
    } else {
        None
    };
    let mut rows = Vec::new();
    for &engine in &o.engines {
        let m = mount_engine(engine, dir.path(), redis.as_ref());
        run(engine, &m, &o, &mut rows);
        m.umount().unwrap();
    }
    println!("| engine | test | result |\n|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.engine, r.test, r.result);
    }
}
