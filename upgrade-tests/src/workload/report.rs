//! What a run of the workload observed, as a struct, as JSON and as a human summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::applog::AppendReport;
use super::stats::{ErrorExample, OpKind, Recorder, Sample};

/// Latency and outcome of one kind of operation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindReport {
    pub count: u64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Failures with one errno.
#[derive(Clone, Debug, Serialize)]
pub struct ErrnoReport {
    pub errno: i32,
    pub name: &'static str,
    pub count: u64,
    pub examples: Vec<ErrorExample>,
}

/// One operation, for the report (milliseconds since the workload started).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    pub start_ms: f64,
    pub duration_ms: f64,
}

impl From<Sample> for OpReport {
    fn from(s: Sample) -> OpReport {
        OpReport {
            op: s.kind.name(),
            start_ms: s.start_ns as f64 / 1e6,
            duration_ms: s.duration_ns as f64 / 1e6,
        }
    }
}

/// Everything a run observed. [`Report::is_clean`] is the verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mountpoint: String,
    pub threads: usize,
    pub duration_s: f64,
    pub total_ops: u64,
    /// By operation kind name (only kinds that ran).
    pub ops: BTreeMap<&'static str, KindReport>,
    /// Failed operations by errno.
    pub errors: Vec<ErrnoReport>,
    pub total_errors: u64,
    /// Data or listings that did not match what was written.
    pub check_failures: u64,
    pub check_examples: Vec<String>,
    /// The append log read back.
    pub append: AppendReport,
    /// The longest operation of the run.
    pub longest: Option<OpReport>,
    /// The ten longest operations, longest first.
    pub slowest: Vec<OpReport>,
    /// Operations at least `slow_threshold_ms` long, by start time, for locating pauses
    /// ([`Report::longest_between`]); not in the JSON (it can be long).
    pub slow_threshold_ms: f64,
    #[serde(skip)]
    pub slow_ops: Vec<OpReport>,
    /// Slow operations not kept (the list is capped).
    pub slow_ops_dropped: u64,
    /// Operations that had not returned when the run was stopped (a hung mount).
    pub stuck: Vec<OpReport>,
    /// Setup or verification could not run (then nothing else means much).
    pub fatal: Option<String>,
}

/// Facts about the run itself, for [`Report::build`].
#[derive(Debug)]
pub(crate) struct RunInfo {
    pub mountpoint: String,
    pub threads: usize,
    pub duration_s: f64,
    pub slow_threshold_ns: u64,
    pub fatal: Option<String>,
}

/// The symbolic name of an errno.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::EDEADLK => "EDEADLK",
        libc::ENOLCK => "ENOLCK",
        _ => "E?",
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

impl Report {
    pub(crate) fn build(
        run: RunInfo,
        rec: Recorder,
        append: AppendReport,
        stuck: Vec<Sample>,
    ) -> Report {
        let RunInfo {
            mountpoint,
            threads,
            duration_s,
            slow_threshold_ns,
            fatal,
        } = run;
        let mut ops = BTreeMap::new();
        let mut total_ops = 0;
        let mut longest: Option<Sample> = None;
        for (i, h) in rec.hist.iter().enumerate() {
            let Some(kind) = Recorder::kind_of(i) else {
                continue;
            };
            if h.count() == 0 {
                continue;
            }
            total_ops += h.count();
            let max = rec.longest[i];
            let max_ns = max.map_or(0, |m| m.duration_ns);
            // The verification read at the end is not an application operation.
            if kind != OpKind::Verify
                && max.is_some_and(|m| longest.is_none_or(|l| m.duration_ns > l.duration_ns))
            {
                longest = max;
            }
            ops.insert(
                kind.name(),
                KindReport {
                    count: h.count(),
                    errors: rec.errors_by_kind[i],
                    // Quantiles are bucket upper bounds: never above the true maximum.
                    p50_us: us(h.quantile(0.5).min(max_ns)),
                    p99_us: us(h.quantile(0.99).min(max_ns)),
                    max_us: us(max_ns),
                },
            );
        }
        let total_errors = rec.errors.values().map(|(n, _)| n).sum();
        let errors = rec
            .errors
            .into_iter()
            .map(|(errno, (count, examples))| ErrnoReport {
                errno,
                name: errno_name(errno),
                count,
                examples,
            })
            .collect();
        let mut slow: Vec<Sample> = rec
            .slow
            .into_iter()
            .filter(|s| s.kind != OpKind::Verify)
            .collect();
        slow.sort_by_key(|s| std::cmp::Reverse(s.duration_ns));
        let slowest = slow.iter().take(10).map(|s| OpReport::from(*s)).collect();
        slow.sort_by_key(|s| s.start_ns);
        let slow_ops = slow.into_iter().map(Into::into).collect();
        Report {
            mountpoint,
            threads,
            duration_s,
            total_ops,
            ops,
            errors,
            total_errors,
            check_failures: rec.check_failures,
            check_examples: rec.check_examples,
            append,
            longest: longest.map(Into::into),
            slow_threshold_ms: slow_threshold_ns as f64 / 1e6,
            slowest,
            slow_ops,
            slow_ops_dropped: rec.slow_dropped,
            stuck: stuck.into_iter().map(Into::into).collect(),
            fatal,
        }
    }

    /// No application error, no wrong data, no lost, duplicated or damaged record, nothing
    /// hung.
    pub fn is_clean(&self) -> bool {
        self.fatal.is_none()
            && self.total_errors == 0
            && self.check_failures == 0
            && self.append.is_clean()
            && self.stuck.is_empty()
    }

    /// The longest operation that overlapped `[from_ms, to_ms]` (workload time), among
    /// the slow operations kept; `None` if none of them did.
    pub fn longest_between(&self, from_ms: f64, to_ms: f64) -> Option<OpReport> {
        self.slow_ops
            .iter()
            .filter(|o| o.start_ms <= to_ms && o.start_ms + o.duration_ms >= from_ms)
            .max_by(|a, b| a.duration_ms.total_cmp(&b.duration_ms))
            .copied()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A few lines for a person: the verdict first, then what went wrong, then latencies.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let verdict = if self.is_clean() { "CLEAN" } else { "FAILED" };
        let _ = writeln!(
            s,
            "workload on {}: {verdict} — {} operations in {:.1} s by {} threads, {} errors, {} check failures",
            self.mountpoint,
            self.total_ops,
            self.duration_s,
            self.threads,
            self.total_errors,
            self.check_failures
        );
        if let Some(f) = &self.fatal {
            let _ = writeln!(s, "  fatal: {f}");
        }
        let a = &self.append;
        let _ = writeln!(
            s,
            "  append log: {} acknowledged ({} fsynced, {} uncertain), {} found, {} lost, {} corrupted, {} duplicated, {} out of order",
            a.acknowledged,
            a.fsynced,
            a.uncertain,
            a.found,
            a.lost,
            a.corrupted,
            a.duplicates,
            a.out_of_order
        );
        if let Some(e) = &a.read_error {
            let _ = writeln!(s, "    cannot read the log back: {e}");
        }
        if !a.lost_examples.is_empty() {
            let _ = writeln!(s, "    lost: {:?}", a.lost_examples);
        }
        for ex in &a.corrupted_examples {
            let _ = writeln!(s, "    {ex}");
        }
        for e in &self.errors {
            let _ = writeln!(s, "  {} ({}): {}", e.name, e.errno, e.count);
            for ex in &e.examples {
                let _ = writeln!(
                    s,
                    "    [{:.1} ms] {} {}: {}",
                    ex.at_ms, ex.op, ex.target, ex.message
                );
            }
        }
        for ex in &self.check_examples {
            let _ = writeln!(s, "  check: {ex}");
        }
        for o in &self.stuck {
            let _ = writeln!(
                s,
                "  STUCK: {} started at {:.1} ms, still running after {:.1} ms",
                o.op, o.start_ms, o.duration_ms
            );
        }
        if let Some(l) = &self.longest {
            let _ = writeln!(
                s,
                "  longest operation: {} of {:.2} ms at {:.1} ms",
                l.op, l.duration_ms, l.start_ms
            );
        }
        if self.slowest.len() > 1 {
            let next: Vec<String> = self.slowest[1..]
                .iter()
                .take(4)
                .map(|o| format!("{} {:.1} ms at {:.0} ms", o.op, o.duration_ms, o.start_ms))
                .collect();
            let _ = writeln!(s, "  then: {}", next.join(", "));
        }
        let _ = writeln!(
            s,
            "  {:<13} {:>9} {:>6} {:>10} {:>10} {:>10}",
            "op", "count", "errors", "p50 µs", "p99 µs", "max µs"
        );
        for (name, k) in &self.ops {
            let _ = writeln!(
                s,
                "  {name:<13} {:>9} {:>6} {:>10.1} {:>10.1} {:>10.1}",
                k.count, k.errors, k.p50_us, k.p99_us, k.max_us
            );
        }
        s
    }
}
