//! A verifying application workload against a mountpoint: N threads doing what
//! applications on a Baton mount do, every operation timed and its errno kept, everything
//! read checked against what was written.
//!
//! What it checks:
//! - `pread` at random offsets through ONE long-lived descriptor of a pattern file (every
//!   byte a function of its offset) returns exactly the pattern;
//! - records appended through ONE long-lived `O_APPEND` descriptor (`fsync` now and
//!   then): at the end, every acknowledged record is read back once, in order, intact;
//! - stat/open/read/close of a set of files: right size, right bytes;
//! - create/write/rename/unlink/mkdir/rmdir in a private directory per worker: readdir
//!   shows exactly what was created and not removed, files read back with their content;
//! - a training-style mix: small files read at random, large shards streamed
//!   sequentially, a checkpoint written, fsynced, renamed into place and read back.
//!
//! It must never run against a directory holding anything else: it writes under
//! `MOUNTPOINT/<dir>` only.

mod applog;
mod layout;
mod pattern;
mod report;
mod stats;
mod tasks;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use applog::AppendReport;
pub use pattern::Rng;
pub use report::{ErrnoReport, KindReport, OpReport, Report, errno_name};
pub use stats::{ErrorExample, OpKind};

use stats::{CurrentOp, Recorder, Sample};

/// Which mix of operations the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Every kind of operation in about equal measure.
    Mixed,
    /// Mostly small-file reads and shard streaming, with checkpoints and a log.
    Training,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Profile, String> {
        match s {
            "mixed" => Ok(Profile::Mixed),
            "training" => Ok(Profile::Training),
            _ => Err(format!("unknown workload {s:?} (mixed or training)")),
        }
    }
}

/// What the workload does and how big its data set is.
#[derive(Clone, Debug)]
pub struct Config {
    pub threads: usize,
    pub profile: Profile,
    pub seed: u64,
    /// Directory under the mountpoint that holds everything the workload writes.
    pub dir: String,
    pub pattern_size: u64,
    /// Largest `pread` (most are 4 KiB).
    pub pread_max: usize,
    /// Files of the stat/open/read/close loop.
    pub files: usize,
    pub small_files: usize,
    pub shards: usize,
    pub shard_size: u64,
    pub checkpoint_size: u64,
    /// Appended records between two `fsync`s.
    pub fsync_every: u32,
    /// Files a worker keeps in its churn directory at most.
    pub churn_files: usize,
    /// Operations at least this long are kept with their start time (for locating pauses).
    pub slow_threshold: Duration,
    pub slow_cap: usize,
    /// How long `stop` waits for the workers before it reports their operations as stuck.
    pub stop_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            threads: 4,
            profile: Profile::Mixed,
            seed: 1,
            dir: "baton-workload".into(),
            pattern_size: 4 << 20,
            pread_max: 64 << 10,
            files: 32,
            small_files: 256,
            shards: 2,
            shard_size: 8 << 20,
            checkpoint_size: 1 << 20,
            fsync_every: 16,
            churn_files: 32,
            slow_threshold: Duration::from_millis(1),
            slow_cap: 200_000,
            stop_timeout: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// A data set that is made in a second or two (about 8 MiB) with the default mix:
    /// what the end-to-end tests and the pause benchmark use.
    pub fn small(seed: u64) -> Config {
        Config {
            seed,
            pattern_size: 2 << 20,
            small_files: 128,
            shard_size: 4 << 20,
            checkpoint_size: 512 << 10,
            ..Config::default()
        }
    }
}

/// The writer side of the append log.
#[derive(Debug)]
struct Appender {
    file: File,
    written: applog::Written,
    since_fsync: u32,
}

/// What every worker shares.
#[derive(Debug)]
struct Shared {
    cfg: Config,
    data_dir: PathBuf,
    run_dir: PathBuf,
    /// The one long-lived descriptor of the pattern file.
    pattern: File,
    appender: Mutex<Appender>,
    stop: AtomicBool,
}

/// The workload could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot make the data set under {path}")]
    DataSet {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a worker thread")]
    Spawn(#[source] std::io::Error),
}

/// A running workload; [`Running::stop`] ends it and returns the [`Report`].
#[derive(Debug)]
pub struct Running {
    shared: Arc<Shared>,
    mountpoint: PathBuf,
    origin: Instant,
    ops: Arc<AtomicU64>,
    workers: Vec<(JoinHandle<()>, Arc<CurrentOp>)>,
    results: mpsc::Receiver<(usize, Recorder)>,
}

/// Starts `cfg.threads` workers on `mountpoint` (making the data set first if needed).
pub fn start(mountpoint: &Path, cfg: Config) -> Result<Running, StartError> {
    let root = mountpoint.join(&cfg.dir);
    let data_dir = root.join("data");
    layout::make_data_set(&data_dir, &cfg).map_err(|source| StartError::DataSet {
        path: data_dir.clone(),
        source,
    })?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let run_dir = root.join(format!("run-{stamp}-{}", cfg.seed));
    let prep = |path: &Path, source| StartError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    fs::create_dir_all(&run_dir).map_err(|e| prep(&run_dir, e))?;
    let pattern_path = layout::pattern_path(&data_dir);
    let pattern = File::open(&pattern_path).map_err(|e| prep(&pattern_path, e))?;
    let log = run_dir.join("applog");
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(&log)
        .map_err(|e| prep(&log, e))?;
    let threads = cfg.threads.max(1);
    let slow_ns = cfg.slow_threshold.as_nanos() as u64;
    let slow_cap = cfg.slow_cap / threads;
    let shared = Arc::new(Shared {
        cfg,
        data_dir,
        run_dir,
        pattern,
        appender: Mutex::new(Appender {
            file,
            written: applog::Written::default(),
            since_fsync: 0,
        }),
        stop: AtomicBool::new(false),
    });
    let ops = Arc::new(AtomicU64::new(0));
    let origin = Instant::now();
    let (tx, results) = mpsc::channel();
    let mut workers = Vec::new();
    for id in 0..threads {
        let current = Arc::new(CurrentOp::default());
        let rec = Recorder::new(origin, slow_ns, slow_cap, ops.clone(), current.clone());
        let worker =
            tasks::Worker::new(id, shared.clone(), rec).map_err(|e| prep(&shared.run_dir, e))?;
        let tx = tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("workload-{id}"))
            .spawn(move || {
                let rec = worker.run();
                let _ = tx.send((id, rec));
            })
            .map_err(StartError::Spawn)?;
        workers.push((handle, current));
    }
    Ok(Running {
        shared,
        mountpoint: mountpoint.to_path_buf(),
        origin,
        ops,
        workers,
        results,
    })
}

/// Runs the workload on `mountpoint` for `duration` and returns its report.
pub fn run(mountpoint: &Path, cfg: Config, duration: Duration) -> Result<Report, StartError> {
    let r = start(mountpoint, cfg)?;
    std::thread::sleep(duration);
    Ok(r.stop())
}

impl Running {
    /// Operations completed so far (successful or not).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// When the workers started: the origin of every time in the report.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Milliseconds since the workers started (the report's time base).
    pub fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1e3
    }

    /// The directory this run writes to.
    pub fn run_dir(&self) -> &Path {
        &self.shared.run_dir
    }

    /// Waits until `n` more operations completed, at most `timeout`; whether they did.
    pub fn wait_ops(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ops() + n;
        let deadline = Instant::now() + timeout;
        while self.ops() < target {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops the workers, reads the append log back and reports. Workers that do not
    /// finish within `stop_timeout` are reported as stuck (and left behind).
    pub fn stop(self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        let stopped_at = Instant::now();
        let duration_s = self.origin.elapsed().as_secs_f64();
        let threads = self.workers.len();
        let deadline = stopped_at + self.shared.cfg.stop_timeout;
        let slow_ns = self.shared.cfg.slow_threshold.as_nanos() as u64;
        let mut total = Recorder::new(
            self.origin,
            slow_ns,
            self.shared.cfg.slow_cap,
            self.ops.clone(),
            Arc::default(),
        );
        let mut done = vec![false; threads];
        while done.iter().any(|d| !d) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.results.recv_timeout(left) {
                Ok((id, rec)) => {
                    done[id] = true;
                    total.merge(rec);
                }
                Err(_) => break,
            }
        }
        let mut stuck = Vec::new();
        let mut fatal = None;
        let now_ns = self.origin.elapsed().as_nanos() as u64;
        for (id, (handle, current)) in self.workers.into_iter().enumerate() {
            if done[id] {
                let _ = handle.join();
            } else if let Some((kind, start_ns)) = current.get() {
                stuck.push(Sample {
                    kind,
                    start_ns,
                    duration_ns: now_ns.saturating_sub(start_ns),
                });
            } else if handle.is_finished() {
                fatal = Some(format!("worker {id} panicked"));
            } else {
                fatal = Some(format!(
                    "worker {id} did not stop (not inside an operation)"
                ));
            }
        }
        let append = if stuck.is_empty() {
            // In a thread: a hung mount must give a report, not hang the caller.
            let (tx, rx) = mpsc::channel();
            let shared = self.shared.clone();
            let mut vrec =
                Recorder::new(self.origin, slow_ns, 16, self.ops.clone(), Arc::default());
            let spawned = std::thread::Builder::new()
                .name("workload-verify".into())
                .spawn(move || {
                    let r = verify_log(&shared, &mut vrec);
                    let _ = tx.send((r, vrec));
                });
            match spawned.map(|_| rx.recv_timeout(self.shared.cfg.stop_timeout)) {
                Ok(Ok((r, vrec))) => {
                    total.merge(vrec);
                    r
                }
                _ => {
                    fatal = Some("reading the append log back did not finish".into());
                    AppendReport::default()
                }
            }
        } else {
            AppendReport {
                read_error: Some("not read back: operations are stuck".into()),
                ..AppendReport::default()
            }
        };
        let info = report::RunInfo {
            mountpoint: self.mountpoint.display().to_string(),
            threads,
            duration_s,
            slow_threshold_ns: slow_ns,
            fatal,
        };
        Report::build(info, total, append, stuck)
    }
}

/// Fsyncs the writer's descriptor, then reads the log through a new one and checks it.
fn verify_log(shared: &Shared, rec: &mut Recorder) -> AppendReport {
    let mut a = shared.appender.lock().unwrap_or_else(|p| p.into_inner());
    let path = shared.run_dir.join("applog");
    let t = || path.display().to_string();
    // The writer's last records are acknowledged; flushing them is part of the run.
    if rec
        .op(OpKind::AppendFsync, t, || a.file.sync_data())
        .is_some()
    {
        a.written.fsynced = a.written.acknowledged.len() as u64;
    }
    let data = rec.op(OpKind::Verify, t, || {
        let mut v = Vec::new();
        File::open(&path)?.read_to_end(&mut v)?;
        Ok(v)
    });
    match data {
        Some(d) => applog::verify(&d, &a.written),
        None => AppendReport {
            read_error: Some(format!("cannot read {} back", path.display())),
            acknowledged: a.written.acknowledged.len() as u64,
            ..AppendReport::default()
        },
    }
}
