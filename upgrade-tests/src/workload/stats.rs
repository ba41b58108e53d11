//! Recording every operation: which kind, how long, when it started, and the errno if it
//! failed. Each worker thread records into its own [`Recorder`] (no contention on the
//! measured path); the recorders are merged when the run ends.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// What an application operation was. One system call each, except `Readdir` (a whole
/// listing: opendir, getdents until the end, closedir).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    /// `pread` of the pattern file through the one long-lived descriptor.
    Pread,
    /// `write` of one record through the one long-lived `O_APPEND` descriptor.
    Append,
    /// `fsync` of the append log.
    AppendFsync,
    Stat,
    Open,
    Read,
    Close,
    /// `open(O_CREAT|O_EXCL)` in the churn directory.
    Create,
    /// `write` of a churn file's content.
    Write,
    Rename,
    Unlink,
    Mkdir,
    Rmdir,
    Readdir,
    SmallOpen,
    SmallRead,
    SmallClose,
    ShardOpen,
    ShardRead,
    ShardClose,
    CkptCreate,
    CkptWrite,
    CkptFsync,
    CkptClose,
    CkptRename,
    CkptOpen,
    CkptRead,
    /// Reading the append log back at the end (not part of the measured mix).
    Verify,
}

impl OpKind {
    pub const ALL: [OpKind; 28] = [
        OpKind::Pread,
        OpKind::Append,
        OpKind::AppendFsync,
        OpKind::Stat,
        OpKind::Open,
        OpKind::Read,
        OpKind::Close,
        OpKind::Create,
        OpKind::Write,
        OpKind::Rename,
        OpKind::Unlink,
        OpKind::Mkdir,
        OpKind::Rmdir,
        OpKind::Readdir,
        OpKind::SmallOpen,
        OpKind::SmallRead,
        OpKind::SmallClose,
        OpKind::ShardOpen,
        OpKind::ShardRead,
        OpKind::ShardClose,
        OpKind::CkptCreate,
        OpKind::CkptWrite,
        OpKind::CkptFsync,
        OpKind::CkptClose,
        OpKind::CkptRename,
        OpKind::CkptOpen,
        OpKind::CkptRead,
        OpKind::Verify,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Pread => "pread",
            OpKind::Append => "append",
            OpKind::AppendFsync => "append_fsync",
            OpKind::Stat => "stat",
            OpKind::Open => "open",
            OpKind::Read => "read",
            OpKind::Close => "close",
            OpKind::Create => "create",
            OpKind::Write => "write",
            OpKind::Rename => "rename",
            OpKind::Unlink => "unlink",
            OpKind::Mkdir => "mkdir",
            OpKind::Rmdir => "rmdir",
            OpKind::Readdir => "readdir",
            OpKind::SmallOpen => "small_open",
            OpKind::SmallRead => "small_read",
            OpKind::SmallClose => "small_close",
            OpKind::ShardOpen => "shard_open",
            OpKind::ShardRead => "shard_read",
            OpKind::ShardClose => "shard_close",
            OpKind::CkptCreate => "ckpt_create",
            OpKind::CkptWrite => "ckpt_write",
            OpKind::CkptFsync => "ckpt_fsync",
            OpKind::CkptClose => "ckpt_close",
            OpKind::CkptRename => "ckpt_rename",
            OpKind::CkptOpen => "ckpt_open",
            OpKind::CkptRead => "ckpt_read",
            OpKind::Verify => "verify",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: usize) -> Option<OpKind> {
        OpKind::ALL.get(i).copied()
    }
}

/// Latencies in nanoseconds in log-linear buckets: 64 per power of two (under 1.6 %
/// error), exact below 128 ns, up to about 18 minutes.
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const MAX_NS: u64 = 1 << 40;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; Self::index(MAX_NS) + 1],
            count: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        let v = v.min(MAX_NS);
        if v < 2 * SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        (shift as usize) * SUB as usize + (v >> shift) as usize
    }

    /// The largest value of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let top = i - shift * SUB;
        ((top + 1) << shift) - 1
    }

    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), rounded up to its bucket's upper bound.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i);
            }
        }
        MAX_NS
    }
}

/// One operation, located in time (nanoseconds since the workload started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub kind: OpKind,
    pub start_ns: u64,
    pub duration_ns: u64,
}

/// A failed operation, kept as an example for the report.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorExample {
    pub op: &'static str,
    pub target: String,
    pub message: String,
    pub at_ms: f64,
}

/// Per-thread "what am I doing now", readable by the controller to name operations that
/// never return (a hung mount). `start_ns + 1` and the kind index; 0 when idle.
#[derive(Debug, Default)]
pub struct CurrentOp {
    start: AtomicU64,
    kind: AtomicU64,
}

impl CurrentOp {
    /// The operation in progress, if any.
    pub fn get(&self) -> Option<(OpKind, u64)> {
        let s = self.start.load(Ordering::Acquire);
        if s == 0 {
            return None;
        }
        let kind = OpKind::from_index(self.kind.load(Ordering::Acquire) as usize)?;
        Some((kind, s - 1))
    }
}

/// Everything one thread observed.
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    slow_threshold_ns: u64,
    slow_cap: usize,
    pub(crate) hist: Vec<Histogram>,
    pub(crate) errors_by_kind: Vec<u64>,
    pub(crate) longest: Vec<Option<Sample>>,
    /// errno → (count, examples).
    pub(crate) errors: BTreeMap<i32, (u64, Vec<ErrorExample>)>,
    pub(crate) check_failures: u64,
    pub(crate) check_examples: Vec<String>,
    /// Operations at least `slow_threshold_ns` long, for locating pauses in time.
    pub(crate) slow: Vec<Sample>,
    pub(crate) slow_dropped: u64,
    ops: Arc<AtomicU64>,
    current: Arc<CurrentOp>,
}

/// Examples kept per errno and of check failures.
pub const EXAMPLES: usize = 5;

impl Recorder {
    pub fn new(
        origin: Instant,
        slow_threshold_ns: u64,
        slow_cap: usize,
        ops: Arc<AtomicU64>,
        current: Arc<CurrentOp>,
    ) -> Recorder {
        let n = OpKind::ALL.len();
        Recorder {
            origin,
            slow_threshold_ns,
            slow_cap,
            hist: vec![Histogram::default(); n],
            errors_by_kind: vec![0; n],
            longest: vec![None; n],
            errors: BTreeMap::new(),
            check_failures: 0,
            check_examples: Vec::new(),
            slow: Vec::new(),
            slow_dropped: 0,
            ops,
            current,
        }
    }

    fn since_origin(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Runs one operation and records it; a failure is recorded with its errno and the
    /// target (`target` is only called then) and returned as `None`.
    pub fn op<T>(
        &mut self,
        kind: OpKind,
        target: impl FnOnce() -> String,
        f: impl FnOnce() -> io::Result<T>,
    ) -> Option<T> {
        let start = Instant::now();
        let start_ns = self.since_origin(start);
        self.current
            .kind
            .store(kind.index() as u64, Ordering::Release);
        self.current.start.store(start_ns + 1, Ordering::Release);
        let r = f();
        let duration_ns = start.elapsed().as_nanos() as u64;
        self.current.start.store(0, Ordering::Release);
        self.ops.fetch_add(1, Ordering::Relaxed);
        let sample = Sample {
            kind,
            start_ns,
            duration_ns,
        };
        let i = kind.index();
        self.hist[i].record(duration_ns);
        if self.longest[i].is_none_or(|l| duration_ns > l.duration_ns) {
            self.longest[i] = Some(sample);
        }
        if duration_ns >= self.slow_threshold_ns {
            if self.slow.len() < self.slow_cap {
                self.slow.push(sample);
            } else {
                self.slow_dropped += 1;
            }
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors_by_kind[i] += 1;
                // An error without an errno (std's own, e.g. a short read_exact) counts as EIO.
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let at_ms = start_ns as f64 / 1e6;
                let entry = self.errors.entry(errno).or_insert((0, Vec::new()));
                entry.0 += 1;
                if entry.1.len() < EXAMPLES {
                    entry.1.push(ErrorExample {
                        op: kind.name(),
                        target: target(),
                        message: e.to_string(),
                        at_ms,
                    });
                }
                None
            }
        }
    }

    /// Records a verification failure (wrong bytes, a readdir that does not match).
    pub fn check_failed(&mut self, what: impl FnOnce() -> String) {
        self.check_failures += 1;
        if self.check_examples.len() < EXAMPLES {
            let at = self.since_origin(Instant::now()) as f64 / 1e6;
            self.check_examples.push(format!("[{at:.1} ms] {}", what()));
        }
    }

    /// Adds `other`'s observations to this one.
    pub fn merge(&mut self, other: Recorder) {
        for i in 0..self.hist.len() {
            self.hist[i].merge(&other.hist[i]);
            self.errors_by_kind[i] += other.errors_by_kind[i];
            if let Some(o) = other.longest[i] {
                if self.longest[i].is_none_or(|l| o.duration_ns > l.duration_ns) {
                    self.longest[i] = Some(o);
                }
            }
        }
        for (errno, (n, ex)) in other.errors {
            let e = self.errors.entry(errno).or_insert((0, Vec::new()));
            e.0 += n;
            e.1.extend(ex);
            e.1.truncate(EXAMPLES);
        }
        self.check_failures += other.check_failures;
        self.check_examples.extend(other.check_examples);
        self.check_examples.truncate(EXAMPLES * 4);
        self.slow.extend(other.slow);
        self.slow_dropped += other.slow_dropped;
    }

    pub fn kind_of(i: usize) -> Option<OpKind> {
        OpKind::from_index(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_two_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [(0.5, 50_000_000u64), (0.99, 99_000_000), (1.0, 100_000_000)] {
            let got = h.quantile(q);
            assert!(
                got >= want && (got - want) as f64 / (want as f64) < 0.02,
                "q{q}: {got} vs {want}"
            );
        }
        assert_eq!(h.count(), 100_000);
    }

    #[test]
    fn bucket_bounds_are_monotonic_and_cover_their_values() {
        let mut prev = 0;
        for i in 1..Histogram::index(MAX_NS) {
            let v = Histogram::value(i);
            assert!(v > prev, "bucket {i}");
            assert_eq!(Histogram::index(v), i);
            prev = v;
        }
    }

    #[test]
    fn errors_are_counted_by_errno_with_examples() {
        let mut r = Recorder::new(Instant::now(), u64::MAX, 0, Arc::default(), Arc::default());
        for _ in 0..7 {
            let got: Option<()> = r.op(
                OpKind::Stat,
                || "x".into(),
                || Err(io::Error::from_raw_os_error(libc::ENOTCONN)),
            );
            assert!(got.is_none());
        }
        assert_eq!(r.op(OpKind::Stat, String::new, || Ok(3)), Some(3));
        let (n, ex) = &r.errors[&libc::ENOTCONN];
        assert_eq!((*n, ex.len()), (7, EXAMPLES));
        assert_eq!(r.hist[OpKind::Stat.index()].count(), 8);
        assert_eq!(r.errors_by_kind[OpKind::Stat.index()], 7);
    }
}
