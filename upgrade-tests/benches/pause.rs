//! Pause benchmark of the live upgrade: what an application notices of `baton upgrade`.
//!
//! pause = the longest application operation during an upgrade minus the longest one
//! without an upgrade, same workload, same window lengths: each upgrade's window is the
//! wall time of its `baton upgrade`; the baseline run has windows of the same lengths at
//! the same moments. The table gives the median and the worst over the upgrades of a row
//! (pause p50 = median with − median without; pause max = worst with − worst without). Measured with the verifying
//! workload running, at 1, 1k, 10k and 100k open handles (held by helper processes, on top of
//! the workload's own) and at 10k, 100k and 1M cached inodes (files the kernel looked up:
//! created and stat'ed first). Also reports the wall time of `baton upgrade` and the pause
//! the supervisor measured (freeze to first request served by the successor).
//!
//! Run (as root; release binaries):
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p upgrade-tests --bench pause
//! ```
//!
//! Options after `--`: `--upgrades N` (per point, default 5), `--gap-ms MS` between
//! upgrades (default 700), `--threads N` (workload threads, default 4), `--handles LIST`
//! (default 1,1000,10000,100000), `--inodes LIST` (default 10000,100000,1000000; `none`
//! to skip), `--workload mixed|training`, `--dir DIR` where the volume and the mountpoint
//! go (default: the system's temporary directory; `/dev/shm` makes creating a million
//! files take minutes instead of half an hour, since every create is a durable metadata
//! commit). Prints a markdown table for docs/benchmarks.md.
#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::mount::{MountOptions, TestMount};
use upgrade_tests::baton_cli::{self, Upgrade};
use upgrade_tests::workload::{self, Config, Profile, Report};

struct Opts {
    upgrades: usize,
    gap: Duration,
    threads: usize,
    handles: Vec<usize>,
    inodes: Vec<usize>,
    profile: Profile,
    /// Where the mounts' `BATON_HOME` (metadata, objects, cache) and mountpoints go.
    base: Option<PathBuf>,
    args: String,
}

fn list(v: &str) -> Vec<usize> {
    if v == "none" {
        return Vec::new();
    }
    v.split(',').map(|s| s.trim().parse().unwrap()).collect()
}

fn opts() -> Opts {
    let mut o = Opts {
        upgrades: 5,
        gap: Duration::from_millis(700),
        threads: 4,
        handles: vec![1, 1_000, 10_000, 100_000],
        inodes: vec![10_000, 100_000, 1_000_000],
        profile: Profile::Mixed,
        base: None,
        args: String::new(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut shown = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--upgrades" => o.upgrades = val.parse().unwrap(),
            "--gap-ms" => o.gap = Duration::from_millis(val.parse().unwrap()),
            "--threads" => o.threads = val.parse().unwrap(),
            "--handles" => o.handles = list(&val),
            "--inodes" => o.inodes = list(&val),
            "--workload" => o.profile = val.parse().unwrap(),
            "--dir" => o.base = Some(PathBuf::from(&val)),
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        shown.push(format!("{} {val}", args[i]));
        i += 2;
    }
    o.args = shown.join(" ");
    o
}

/// Raises this process's descriptor limit to its hard limit; returns the new limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// Handles are held by helper processes (this binary with `--hold`), each below the
/// descriptor limit a process may have (which an unprivileged container cannot raise).
struct Holders(Vec<std::process::Child>);

impl Holders {
    fn open(root: &Path, files: usize, n: usize) -> Holders {
        let per = (raise_nofile() as usize)
            .saturating_sub(1024)
            .clamp(1, 50_000);
        let mut children = Vec::new();
        let mut start = 0;
        while start < n {
            let count = per.min(n - start);
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--hold",
                    &root.display().to_string(),
                    &files.to_string(),
                    &start.to_string(),
                    &count.to_string(),
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line.trim(), "ready", "a handle holder failed");
            children.push(child);
            start += count;
        }
        Holders(children)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for mut c in self.0.drain(..) {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

/// `--hold ROOT FILES START COUNT`: opens COUNT handles of the files, says `ready`, waits
/// for stdin to close.
fn hold(args: &[String]) {
    raise_nofile();
    let root = PathBuf::from(&args[0]);
    let files: usize = args[1].parse().unwrap();
    let (start, count): (usize, usize) = (args[2].parse().unwrap(), args[3].parse().unwrap());
    let held: Vec<File> = (start..start + count)
        .map(|i| File::open(inode_path(&root, i % files)).unwrap())
        .collect();
    println!("ready");
    let mut sink = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
    drop(held);
}

fn progress(msg: &str) {
    eprintln!("[pause] {msg}");
}

/// Runs `f(i)` for `0..n` on a few threads.
fn parallel(n: usize, f: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    f(i);
                }
            });
        }
    });
}

const PER_DIR: usize = 1000;

fn inode_path(root: &Path, i: usize) -> PathBuf {
    root.join(format!("d{:04}", i / PER_DIR))
        .join(format!("f{:04}", i % PER_DIR))
}

/// Makes `root/dNNNN/fNNNN` for `from..to` (empty files, one MKNOD each).
fn make_files(root: &Path, from: usize, to: usize) {
    let t = Instant::now();
    for d in from / PER_DIR..to.div_ceil(PER_DIR) {
        fs::create_dir_all(root.join(format!("d{d:04}"))).unwrap();
    }
    parallel(to - from, |i| {
        let p = CString::new(inode_path(root, from + i).as_os_str().as_bytes()).unwrap();
        // SAFETY: `p` is a valid NUL-terminated path for the duration of the call.
        let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFREG | 0o644, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "mknod: {e}");
        }
    });
    progress(&format!(
        "created {} files in {:.1} s",
        to - from,
        t.elapsed().as_secs_f64()
    ));
}

/// `stat`s `0..n`, so the kernel has looked every one of them up.
fn stat_files(root: &Path, n: usize) {
    let t = Instant::now();
    parallel(n, |i| {
        fs::metadata(inode_path(root, i)).unwrap();
    });
    progress(&format!(
        "stat'ed {n} files in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
}

#[derive(Debug)]
struct Row {
    point: String,
    upgrades: usize,
    failed: usize,
    wall_ms: Vec<f64>,
    supervisor_pause_ms: Vec<f64>,
    during_ms: Vec<f64>,
    without_ms: Vec<f64>,
    errors: u64,
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn workload_config(o: &Opts, seed: u64) -> Config {
    Config {
        threads: o.threads,
        profile: o.profile,
        ..Config::small(seed)
    }
}

/// The longest operation overlapping `[from, to]`; operations under the recording
/// threshold (1 ms) count as 1 ms.
fn longest(r: &Report, from: f64, to: f64) -> f64 {
    r.longest_between(from, to)
        .map_or(r.slow_threshold_ms, |o| o.duration_ms)
}

fn check(r: &Report, what: &str) -> u64 {
    if !r.is_clean() {
        eprintln!("{what}: the workload saw errors\n{}", r.summary());
    }
    r.total_errors + r.check_failures + r.append.lost + r.append.corrupted + r.stuck.len() as u64
}

/// Upgrades under the workload, then the same schedule without upgrades.
fn measure(m: &TestMount, o: &Opts, point: &str, seed: u64) -> Row {
    progress(&format!(
        "{point}: {} upgrades under the workload",
        o.upgrades
    ));
    let run = workload::start(&m.mountpoint, workload_config(o, seed)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut windows = Vec::new();
    let mut row = Row {
        point: point.to_string(),
        upgrades: o.upgrades,
        failed: 0,
        wall_ms: Vec::new(),
        supervisor_pause_ms: Vec::new(),
        during_ms: Vec::new(),
        without_ms: Vec::new(),
        errors: 0,
    };
    for _ in 0..o.upgrades {
        std::thread::sleep(o.gap);
        let from = run.now_ms();
        let out = baton_cli::upgrade(&m.home, &m.mountpoint, &Upgrade::default()).unwrap();
        let to = run.now_ms();
        if !out.success {
            eprintln!("upgrade failed: {}", out.output());
            row.failed += 1;
        }
        windows.push((from, to));
        row.wall_ms.push(out.wall.as_secs_f64() * 1e3);
        if let Some(p) = out.pause() {
            row.supervisor_pause_ms.push(p.as_secs_f64() * 1e3);
        }
    }
    std::thread::sleep(o.gap);
    let with = run.stop();
    row.errors += check(&with, point);
    row.during_ms = windows
        .iter()
        .map(|(a, b)| longest(&with, *a, *b))
        .collect();

    progress(&format!("{point}: the same without upgrades"));
    let run = workload::start(&m.mountpoint, workload_config(o, seed + 1)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut base = Vec::new();
    for (a, b) in &windows {
        std::thread::sleep(o.gap);
        let from = run.now_ms();
        std::thread::sleep(Duration::from_secs_f64((b - a) / 1e3));
        base.push((from, run.now_ms()));
    }
    std::thread::sleep(o.gap);
    let without = run.stop();
    row.errors += check(&without, point);
    row.without_ms = base
        .iter()
        .map(|(a, b)| longest(&without, *a, *b))
        .collect();
    progress(&format!("{row:?}"));
    row
}

/// A fresh embedded volume mounted under `o.base`.
fn mount(o: &Opts) -> (TestMount, tempfile::TempDir) {
    let mut b = tempfile::Builder::new();
    b.prefix("baton-pause-");
    let dir = match &o.base {
        Some(base) => b.tempdir_in(base).unwrap(),
        None => b.tempdir().unwrap(),
    };
    let m = TestMount::at(
        &dir.path().join("home"),
        &dir.path().join("mnt"),
        &MountOptions::default(),
    )
    .unwrap();
    (m, dir)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hold") {
        return hold(&args[2..]);
    }
    let o = opts();
    let max_handles = o.handles.iter().copied().max().unwrap_or(0);
    let mut rows = Vec::new();

    if !o.handles.is_empty() {
        let (m, _dir) = mount(&o);
        let root = m.path("handles");
        let files = max_handles.clamp(1, PER_DIR);
        make_files(&root, 0, files);
        for (k, &n) in o.handles.iter().enumerate() {
            let t = Instant::now();
            let held = Holders::open(&root, files, n);
            progress(&format!(
                "opened {n} handles in {:.1} s",
                t.elapsed().as_secs_f64()
            ));
            rows.push(measure(
                &m,
                &o,
                &format!("{n} open handles"),
                1000 + k as u64 * 10,
            ));
            drop(held);
        }
        m.umount().unwrap();
    }

    if !o.inodes.is_empty() {
        let (m, _dir) = mount(&o);
        let root = m.path("inodes");
        let mut made = 0;
        for (k, &n) in o.inodes.iter().enumerate() {
            if n > made {
                make_files(&root, made, n);
                made = n;
            }
            stat_files(&root, n);
            rows.push(measure(
                &m,
                &o,
                &format!("{n} cached inodes"),
                2000 + k as u64 * 10,
            ));
        }
        m.umount().unwrap();
    }

    let cmd = format!(
        "cargo build --release --bins && cargo bench -p upgrade-tests --bench pause{}",
        if o.args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", o.args)
        }
    );
    println!();
    println!(
        "Live-upgrade pause ({} upgrades per row, {:?} workload, {} threads, embedded volume in {}). Command: `{cmd}`",
        o.upgrades,
        o.profile,
        o.threads,
        o.base.as_deref().unwrap_or(&std::env::temp_dir()).display()
    );
    println!();
    println!(
        "| point | `baton upgrade` wall p50 / max (ms) | supervisor-measured pause p50 / max (ms) | longest op, window without upgrade p50 / max (ms) | longest op, window with upgrade p50 / max (ms) | pause p50 / max (ms) | failed upgrades | app errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} / {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} of {} | {} |",
            r.point,
            median(&r.wall_ms),
            max(&r.wall_ms),
            median(&r.supervisor_pause_ms),
            max(&r.supervisor_pause_ms),
            median(&r.without_ms),
            max(&r.without_ms),
            median(&r.during_ms),
            max(&r.during_ms),
            (median(&r.during_ms) - median(&r.without_ms)).max(0.0),
            (max(&r.during_ms) - max(&r.without_ms)).max(0.0),
            r.failed,
            r.upgrades,
            r.errors,
        );
    }
}
