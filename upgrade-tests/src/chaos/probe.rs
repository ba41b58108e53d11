//! The probe of `--faults-only`: when the user's own job is the workload, chaos must not
//! write into their volume, but it still needs to see what an application sees. One
//! thread calls `statfs` on the mountpoint in a loop — a request the kernel never answers
//! from its caches, so every call reaches the client — and times each call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::workload::{OpReport, errno_name};

/// Calls this long or longer are kept with their start time.
const SLOW: Duration = Duration::from_millis(1);
/// Kept slow calls at most (about 20 bytes each).
const SLOW_CAP: usize = 1_000_000;
/// Between two calls, so the probe does not load the client noticeably.
const GAP: Duration = Duration::from_millis(2);
/// Failures described, per errno.
const EXAMPLES: usize = 5;

#[derive(Debug, Default)]
struct Record {
    slow: Vec<OpReport>,
    slow_dropped: u64,
    max_ms: f64,
    errors: BTreeMap<i32, (u64, Vec<String>)>,
}

/// A running probe; [`Probe::stop`] ends it.
#[derive(Debug)]
pub struct Probe {
    mountpoint: PathBuf,
    origin: Instant,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    /// Start of the call in progress (ns since `origin`, + 1), 0 when between calls.
    current: Arc<AtomicU64>,
    record: Arc<Mutex<Record>>,
    done: mpsc::Receiver<()>,
}

/// What the probe saw.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub mountpoint: String,
    pub operation: &'static str,
    pub duration_s: f64,
    pub total_ops: u64,
    pub total_errors: u64,
    /// Failed calls by errno name: count and a few examples.
    pub errors: BTreeMap<&'static str, u64>,
    pub error_examples: Vec<String>,
    pub longest_ms: f64,
    pub slow_threshold_ms: f64,
    #[serde(skip)]
    pub slow_ops: Vec<OpReport>,
    pub slow_ops_dropped: u64,
    /// A call that had not returned when the probe was stopped (a hung mount).
    pub stuck: Option<OpReport>,
}

impl Probe {
    /// Starts probing `mountpoint`; times are counted from `origin`.
    pub fn start(mountpoint: &Path, origin: Instant) -> std::io::Result<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let current = Arc::new(AtomicU64::new(0));
        let record = Arc::new(Mutex::new(Record::default()));
        let (tx, done) = mpsc::channel();
        let (mp, st, o, cur, rec) = (
            mountpoint.to_path_buf(),
            stop.clone(),
            ops.clone(),
            current.clone(),
            record.clone(),
        );
        std::thread::Builder::new()
            .name("chaos-probe".into())
            .spawn(move || {
                probe_loop(&mp, origin, &st, &o, &cur, &rec);
                let _ = tx.send(());
            })?;
        Ok(Probe {
            mountpoint: mountpoint.to_path_buf(),
            origin,
            stop,
            ops,
            current,
            record,
            done,
        })
    }

    /// Milliseconds since `origin` (the time base of the report).
    pub fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1e3
    }

    /// Calls completed so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Waits until `n` more calls completed, at most `timeout`; whether they did.
    pub fn wait_ops(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ops() + n;
        let deadline = Instant::now() + timeout;
        while self.ops() < target {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Stops the probe (waiting at most `timeout` for the call in progress).
    pub fn stop(self, timeout: Duration) -> ProbeReport {
        self.stop.store(true, Ordering::Relaxed);
        let finished = self.done.recv_timeout(timeout).is_ok();
        let now_ns = self.origin.elapsed().as_nanos() as u64;
        let stuck = match self.current.load(Ordering::Relaxed) {
            c if !finished && c > 0 => Some(OpReport {
                op: "statfs",
                start_ms: (c - 1) as f64 / 1e6,
                duration_ms: now_ns.saturating_sub(c - 1) as f64 / 1e6,
            }),
            _ => None,
        };
        let rec = std::mem::take(&mut *self.record.lock().unwrap_or_else(|p| p.into_inner()));
        let mut examples = Vec::new();
        let mut errors = BTreeMap::new();
        for (errno, (n, ex)) in rec.errors {
            *errors.entry(errno_name(errno)).or_insert(0) += n;
            examples.extend(ex);
        }
        let mut slow_ops = rec.slow;
        slow_ops.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
        ProbeReport {
            mountpoint: self.mountpoint.display().to_string(),
            operation: "statfs",
            duration_s: self.origin.elapsed().as_secs_f64(),
            total_ops: self.ops.load(Ordering::Relaxed),
            total_errors: errors.values().sum(),
            errors,
            error_examples: examples,
            longest_ms: rec.max_ms,
            slow_threshold_ms: SLOW.as_secs_f64() * 1e3,
            slow_ops,
            slow_ops_dropped: rec.slow_dropped,
            stuck,
        }
    }
}

fn probe_loop(
    mountpoint: &Path,
    origin: Instant,
    stop: &AtomicBool,
    ops: &AtomicU64,
    current: &AtomicU64,
    record: &Mutex<Record>,
) {
    while !stop.load(Ordering::Relaxed) {
        let start_ns = origin.elapsed().as_nanos() as u64;
        current.store(start_ns + 1, Ordering::Relaxed);
        let t = Instant::now();
        let result = nix::sys::statfs::statfs(mountpoint);
        let took = t.elapsed();
        current.store(0, Ordering::Relaxed);
        ops.fetch_add(1, Ordering::Relaxed);
        let mut rec = record.lock().unwrap_or_else(|p| p.into_inner());
        let ms = took.as_secs_f64() * 1e3;
        rec.max_ms = rec.max_ms.max(ms);
        if took >= SLOW {
            if rec.slow.len() < SLOW_CAP {
                rec.slow.push(OpReport {
                    op: "statfs",
                    start_ms: start_ns as f64 / 1e6,
                    duration_ms: ms,
                });
            } else {
                rec.slow_dropped += 1;
            }
        }
        if let Err(e) = result {
            let entry = rec.errors.entry(e as i32).or_default();
            entry.0 += 1;
            if entry.1.len() < EXAMPLES {
                entry.1.push(format!(
                    "[{:.1} ms] statfs {}: {e}",
                    start_ns as f64 / 1e6,
                    mountpoint.display()
                ));
            }
        }
        drop(rec);
        std::thread::sleep(GAP);
    }
}

impl ProbeReport {
    pub fn is_clean(&self) -> bool {
        self.total_errors == 0 && self.stuck.is_none()
    }

    /// The longest call that overlapped `[from_ms, to_ms]`, among the slow ones kept.
    pub fn longest_between(&self, from_ms: f64, to_ms: f64) -> Option<OpReport> {
        super::longest_overlapping(&self.slow_ops, from_ms, to_ms)
    }
}
