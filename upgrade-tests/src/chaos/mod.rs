//! Chaos on a live mount: kill the serving client and/or upgrade it at random moments
//! while an application works, then say whether the application noticed anything but
//! pauses. The library behind `baton-chaos`.
//!
//! The application is either the verifying [`workload`](crate::workload) (everything it
//! reads is checked, its append log is read back at the end), or — with
//! [`Observe::Probe`], for a mount whose own job is the workload — a `statfs` probe that
//! writes nothing. Faults are injected one at a time from one thread: each fault's
//! window runs from its injection until the application completed operations again, and
//! its pause is the longest application operation overlapping that window.
//!
//! Chaos judges Baton from the outside only (the mount, `baton status`, `baton upgrade`,
//! signals); it never reaches into a client or the supervisor.

mod fault;
mod probe;
mod report;
mod schedule;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use fault::{ClientId, Fault, FaultKind, Observer, Recovery, Target};
pub use probe::{Probe, ProbeReport};
pub use report::{ChaosReport, KindStats, Verdict};
pub use schedule::{BadDuration, Every, parse_duration, show_duration};

use crate::baton_cli::Upgrade;
use crate::workload::{self, OpReport, Running};

/// What the application side of a chaos run is.
#[derive(Clone, Debug)]
pub enum Observe {
    /// The verifying workload, with this configuration.
    Workload(workload::Config),
    /// Only the `statfs` probe (`--faults-only`): the user's job is the workload.
    Probe,
}

/// A chaos run.
#[derive(Clone, Debug)]
pub struct Config {
    pub target: Target,
    /// The run ends after this long (or earlier, once every fault limit is reached).
    pub duration: Duration,
    /// Kill the serving client about this often.
    pub kill_every: Option<Duration>,
    /// Upgrade the client about this often.
    pub upgrade_every: Option<Duration>,
    /// Stop killing after this many kills.
    pub max_kills: Option<usize>,
    /// Stop upgrading after this many upgrades.
    pub max_upgrades: Option<usize>,
    /// How `baton upgrade` is run (`--binary`, `--drain`, `--timeout`).
    pub upgrade: Upgrade,
    /// Each gap between two faults of a kind is `interval × [1 − jitter, 1 + jitter]`.
    pub jitter: f64,
    pub seed: u64,
    pub observe: Observe,
    pub recovery: Recovery,
    /// Run on this long after the last fault (so its window is followed by normal work),
    /// and before the first one.
    pub settle: Duration,
    /// Remove the workload's run directory after a clean run.
    pub clean_up: bool,
}

impl Config {
    /// A run of `duration` against `target` with the default workload and nothing
    /// scheduled yet.
    pub fn new(target: Target, duration: Duration) -> Config {
        Config {
            target,
            duration,
            kill_every: None,
            upgrade_every: None,
            max_kills: None,
            max_upgrades: None,
            upgrade: Upgrade::default(),
            jitter: 0.5,
            seed: 1,
            observe: Observe::Workload(workload::Config {
                dir: "baton-chaos".into(),
                slow_cap: 2_000_000,
                ..workload::Config::default()
            }),
            recovery: Recovery {
                timeout: Duration::from_secs(30),
                progress_ops: 20,
                progress_timeout: Duration::from_secs(30),
            },
            settle: Duration::from_millis(500),
            clean_up: true,
        }
    }
}

/// A chaos run could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path} is not a Baton mount that answers `baton status`")]
    NotBaton {
        path: PathBuf,
        #[source]
        source: anyhow::Error,
    },
    #[error("cannot start the workload")]
    Workload(#[source] workload::StartError),
    #[error("cannot start the probe")]
    Probe(#[source] std::io::Error),
    #[error("nothing to do: the duration is zero")]
    NothingToDo,
}

/// The application side while the faults run.
#[derive(Debug)]
enum App {
    Workload(Running),
    Probe(Probe),
}

impl Observer for App {
    fn now_ms(&self) -> f64 {
        match self {
            App::Workload(r) => r.now_ms(),
            App::Probe(p) => p.now_ms(),
        }
    }

    fn wait_ops(&self, n: u64, timeout: Duration) -> bool {
        match self {
            App::Workload(r) => r.wait_ops(n, timeout),
            App::Probe(p) => p.wait_ops(n, timeout),
        }
    }
}

/// What the application side observed at the end.
#[derive(Clone, Debug)]
pub enum Observed {
    Workload(Box<workload::Report>),
    Probe(ProbeReport),
}

impl Observed {
    fn longest_between(&self, from_ms: f64, to_ms: f64) -> Option<OpReport> {
        match self {
            Observed::Workload(r) => r.longest_between(from_ms, to_ms),
            Observed::Probe(p) => p.longest_between(from_ms, to_ms),
        }
    }

    fn slow_ops(&self) -> &[OpReport] {
        match self {
            Observed::Workload(r) => &r.slow_ops,
            Observed::Probe(p) => &p.slow_ops,
        }
    }

    fn slow_threshold_ms(&self) -> f64 {
        match self {
            Observed::Workload(r) => r.slow_threshold_ms,
            Observed::Probe(p) => p.slow_threshold_ms,
        }
    }
}

/// The longest of `ops` (sorted by start) overlapping `[from_ms, to_ms]`.
pub(crate) fn longest_overlapping(ops: &[OpReport], from_ms: f64, to_ms: f64) -> Option<OpReport> {
    ops.iter()
        .take_while(|o| o.start_ms <= to_ms)
        .filter(|o| o.start_ms + o.duration_ms >= from_ms)
        .max_by(|a, b| a.duration_ms.total_cmp(&b.duration_ms))
        .copied()
}

/// Runs the chaos: starts the application side, injects faults on schedule, stops, and
/// reports. `log` gets one line per fault as it happens.
pub fn run(cfg: &Config, log: &mut dyn FnMut(&str)) -> Result<ChaosReport, StartError> {
    if cfg.duration.is_zero() {
        return Err(StartError::NothingToDo);
    }
    let mut target = cfg.target.clone();
    // mountinfo has canonical paths.
    if let Ok(p) = target.mountpoint.canonicalize() {
        target.mountpoint = p;
    }
    let first = target.status().map_err(|source| StartError::NotBaton {
        path: target.mountpoint.clone(),
        source,
    })?;
    let started = Instant::now();
    let app = match &cfg.observe {
        Observe::Workload(w) => App::Workload(
            workload::start(&target.mountpoint, w.clone()).map_err(StartError::Workload)?,
        ),
        Observe::Probe => {
            App::Probe(Probe::start(&target.mountpoint, Instant::now()).map_err(StartError::Probe)?)
        }
    };
    log(&format!(
        "chaos on {}: client generation {} (pid {}, {}), for up to {}{}{}",
        target.mountpoint.display(),
        first.generation,
        first.client_pid,
        first.client_version,
        show_duration(cfg.duration),
        cfg.kill_every.map_or(String::new(), |d| format!(
            ", a kill every ~{}",
            show_duration(d)
        )),
        cfg.upgrade_every.map_or(String::new(), |d| format!(
            ", an upgrade every ~{}",
            show_duration(d)
        )),
    ));
    // The schedules start once the application runs (setting up a data set takes time).
    let origin = Instant::now();
    let mut kills = cfg
        .kill_every
        .map(|d| Every::new(d, cfg.jitter, cfg.seed ^ 0x6b69_6c6c));
    let mut upgrades = cfg
        .upgrade_every
        .map(|d| Every::new(d, cfg.jitter, cfg.seed ^ 0x7570_6772));
    let mut faults: Vec<Fault> = Vec::new();
    let mut n_kills = 0;
    let mut n_upgrades = 0;
    let mut stopped_early = None;
    loop {
        let now = origin.elapsed();
        if now >= cfg.duration {
            break;
        }
        let kill_due = kills
            .as_ref()
            .filter(|_| cfg.max_kills.is_none_or(|m| n_kills < m))
            .map(Every::due);
        let upgrade_due = upgrades
            .as_ref()
            .filter(|_| cfg.max_upgrades.is_none_or(|m| n_upgrades < m))
            .map(Every::due);
        let next = match (kill_due, upgrade_due) {
            (None, None) if kills.is_some() || upgrades.is_some() => {
                // Every limit reached: a little normal work after the last fault, then end.
                std::thread::sleep(cfg.settle.min(cfg.duration.saturating_sub(now)));
                break;
            }
            (None, None) => cfg.duration,
            (Some(k), None) => k,
            (None, Some(u)) => u,
            (Some(k), Some(u)) => k.min(u),
        };
        if next > now {
            std::thread::sleep(
                (next - now)
                    .min(cfg.duration - now)
                    .min(Duration::from_millis(200)),
            );
            continue;
        }
        let is_kill = kill_due == Some(next);
        let f = if is_kill {
            n_kills += 1;
            fault::kill(&target, &app, cfg.recovery)
        } else {
            n_upgrades += 1;
            fault::upgrade(&target, &cfg.upgrade, &app, cfg.recovery)
        };
        let after = origin.elapsed();
        if is_kill {
            if let Some(k) = kills.as_mut() {
                k.done(after);
            }
        } else if let Some(u) = upgrades.as_mut() {
            u.done(after);
        }
        log(&fault_line(faults.len() + 1, &f));
        let lost = !fault::is_mounted(&target.mountpoint);
        let ok = f.ok;
        faults.push(f);
        if lost {
            stopped_early = Some(format!(
                "{} is not mounted any more: stopping",
                target.mountpoint.display()
            ));
            break;
        }
        if !ok && faults.last().is_some_and(|f| f.after.is_none()) {
            stopped_early = Some("the mount did not recover from the last fault: stopping".into());
            break;
        }
    }
    if let Some(s) = &stopped_early {
        log(s);
    }
    let stop_timeout = match &cfg.observe {
        Observe::Workload(w) => w.stop_timeout,
        Observe::Probe => Duration::from_secs(30),
    };
    let observed = match app {
        App::Workload(r) => {
            let run_dir = r.run_dir().to_path_buf();
            let report = r.stop();
            if cfg.clean_up && report.is_clean() {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
            Observed::Workload(Box::new(report))
        }
        App::Probe(p) => Observed::Probe(p.stop(stop_timeout)),
    };
    for f in &mut faults {
        if let Some(op) = observed.longest_between(f.at_ms, f.window_end_ms) {
            f.pause_ms = Some(op.duration_ms);
            f.pause_op = Some(op.op);
        }
    }
    let last = target.status().ok();
    Ok(ChaosReport::build(report::Inputs {
        mountpoint: target.mountpoint.display().to_string(),
        cfg,
        wall_s: started.elapsed().as_secs_f64(),
        first,
        last,
        mounted: fault::is_mounted(&target.mountpoint),
        faults,
        observed,
        stopped_early,
    }))
}

/// One line per fault for the log.
fn fault_line(i: usize, f: &Fault) -> String {
    let who = |c: &Option<ClientId>| {
        c.as_ref().map_or("?".into(), |c| {
            format!("gen {} pid {}", c.generation, c.pid)
        })
    };
    let mut s = format!(
        "[{:8.1} s] #{i} {}: {} -> {} {}",
        f.at_ms / 1e3,
        f.kind.name(),
        who(&f.before),
        who(&f.after),
        f.outcome
    );
    if let Some(r) = f.recovered_ms {
        s.push_str(&format!(
            " ({} {:.0} ms)",
            match f.kind {
                FaultKind::Kill => "new client after",
                FaultKind::Upgrade => "baton upgrade took",
            },
            r
        ));
    }
    if let Some(p) = f.supervisor_pause_ms {
        s.push_str(&format!(", supervisor pause {p:.1} ms"));
    }
    if let Some(d) = &f.detail {
        s.push_str(&format!(": {d}"));
    }
    s
}
