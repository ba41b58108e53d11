//! What a chaos run found: the verdict, what the application saw (operations, errors by
//! errno, lost records), the faults with their pauses (p50/p99/max per kind), as JSON
//! and as a summary for a person.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::fault::Fault;
use super::{Config, Observe, Observed, ProbeReport, show_duration};
use crate::baton_cli::Status;
use crate::workload::{OpReport, Report};

/// Whether the application noticed nothing but pauses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Clean,
    Failed,
}

/// The faults of one kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindStats {
    pub count: usize,
    /// Ended as they should (a new client serves, the application made progress).
    pub ok: usize,
    /// Outcomes other than the expected one, by outcome.
    pub other_outcomes: BTreeMap<String, usize>,
    /// The longest application operation overlapping each fault. A fault during which no
    /// operation reached the recording threshold counts as the threshold.
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    /// Faults whose pause was below the recording threshold.
    pub pause_below_threshold: usize,
    /// Kill: time until `baton status` named a new client. Upgrade: `baton upgrade`'s wall
    /// time.
    pub recovery_p50_ms: f64,
    pub recovery_max_ms: f64,
    /// The pauses the supervisor measured (freeze, or crash, to the first request served).
    pub supervisor_pause_p50_ms: Option<f64>,
    pub supervisor_pause_max_ms: Option<f64>,
    /// Client restarts the supervisor counted during these faults.
    pub restarts: u64,
}

/// The facts a report is built from.
#[derive(Debug)]
pub(crate) struct Inputs<'a> {
    pub mountpoint: String,
    pub cfg: &'a Config,
    pub wall_s: f64,
    pub first: Status,
    pub last: Option<Status>,
    pub mounted: bool,
    pub faults: Vec<Fault>,
    pub observed: Observed,
    pub stopped_early: Option<String>,
}

/// The settings of the run, as the report records them.
#[derive(Clone, Debug, Serialize)]
pub struct RunSettings {
    pub duration_s: f64,
    pub kill_every_s: Option<f64>,
    pub upgrade_every_s: Option<f64>,
    pub max_kills: Option<usize>,
    pub max_upgrades: Option<usize>,
    pub jitter: f64,
    pub seed: u64,
    /// `workload mixed`, `workload training` or `probe`.
    pub application: String,
    pub threads: Option<usize>,
    pub upgrade_binary: Option<String>,
    pub upgrade_drain: bool,
}

/// Everything a chaos run found. [`ChaosReport::verdict`] is the answer.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    pub verdict: Verdict,
    /// Why the verdict is `failed`.
    pub failures: Vec<String>,
    pub mountpoint: String,
    pub settings: RunSettings,
    pub wall_s: f64,
    /// Application operations (the workload's, or the probe's calls).
    pub operations: u64,
    pub errors: u64,
    /// Failed application operations by errno name.
    pub errors_by_errno: BTreeMap<String, u64>,
    /// Data or listings that did not match what was written.
    pub check_failures: u64,
    /// Acknowledged append-log records: written, then not found, damaged, found twice,
    /// or out of order when read back.
    pub records_acknowledged: u64,
    pub records_lost: u64,
    pub records_corrupted: u64,
    pub records_duplicated: u64,
    pub records_out_of_order: u64,
    /// Operations that never returned.
    pub stuck: Vec<OpReport>,
    pub kills: usize,
    pub upgrades: usize,
    /// Per fault kind (`kill`, `upgrade`).
    pub faults_by_kind: BTreeMap<&'static str, KindStats>,
    /// Client restarts the supervisor counted over the run, and generations.
    pub restarts_seen: u64,
    pub generation_first: u64,
    pub generation_last: Option<u64>,
    pub client_version_first: String,
    pub client_version_last: Option<String>,
    /// The longest application operation outside every fault window (what the
    /// application sees anyway), for comparing pauses with.
    pub longest_away_from_faults_ms: Option<f64>,
    /// Operations of at least this long are kept with their time.
    pub slow_threshold_ms: f64,
    pub still_mounted: bool,
    pub stopped_early: Option<String>,
    pub faults: Vec<Fault>,
    /// The workload's own report (with `--faults-only`: the probe's).
    pub workload: Option<Box<Report>>,
    pub probe: Option<ProbeReport>,
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn kind_stats(faults: &[&Fault], threshold_ms: f64) -> KindStats {
    let mut s = KindStats {
        count: faults.len(),
        ..KindStats::default()
    };
    for f in faults {
        if f.ok {
            s.ok += 1;
        } else {
            *s.other_outcomes.entry(f.outcome.clone()).or_default() += 1;
        }
        if f.pause_ms.is_none() {
            s.pause_below_threshold += 1;
        }
        s.restarts += f.restarts;
    }
    let pauses = sorted(
        faults
            .iter()
            .map(|f| f.pause_ms.unwrap_or(threshold_ms))
            .collect(),
    );
    s.pause_p50_ms = quantile(&pauses, 0.5);
    s.pause_p99_ms = quantile(&pauses, 0.99);
    s.pause_max_ms = pauses.last().copied().unwrap_or(0.0);
    let rec = sorted(faults.iter().filter_map(|f| f.recovered_ms).collect());
    s.recovery_p50_ms = quantile(&rec, 0.5);
    s.recovery_max_ms = rec.last().copied().unwrap_or(0.0);
    let sup = sorted(
        faults
            .iter()
            .filter_map(|f| f.supervisor_pause_ms)
            .collect(),
    );
    if !sup.is_empty() {
        s.supervisor_pause_p50_ms = Some(quantile(&sup, 0.5));
        s.supervisor_pause_max_ms = sup.last().copied();
    }
    s
}

/// The longest of `ops` (sorted by start) that overlaps none of `windows` (sorted,
/// disjoint).
fn longest_away(ops: &[OpReport], windows: &[(f64, f64)]) -> Option<f64> {
    ops.iter()
        .filter(|o| {
            let (s, e) = (o.start_ms, o.start_ms + o.duration_ms);
            // The first window that ends at or after the operation starts.
            let i = windows.partition_point(|w| w.1 < s);
            windows.get(i).is_none_or(|w| w.0 > e)
        })
        .map(|o| o.duration_ms)
        .max_by(f64::total_cmp)
}

impl ChaosReport {
    pub(crate) fn build(inp: Inputs<'_>) -> ChaosReport {
        let Inputs {
            mountpoint,
            cfg,
            wall_s,
            first,
            last,
            mounted,
            faults,
            observed,
            stopped_early,
        } = inp;
        let threshold_ms = observed.slow_threshold_ms();
        let mut by_kind: BTreeMap<&'static str, Vec<&Fault>> = BTreeMap::new();
        for f in &faults {
            by_kind.entry(f.kind.name()).or_default().push(f);
        }
        let faults_by_kind: BTreeMap<&'static str, KindStats> = by_kind
            .iter()
            .map(|(k, v)| (*k, kind_stats(v, threshold_ms)))
            .collect();
        let windows: Vec<(f64, f64)> = faults.iter().map(|f| (f.at_ms, f.window_end_ms)).collect();
        let longest_away_from_faults_ms = longest_away(observed.slow_ops(), &windows);

        let mut failures = Vec::new();
        let (application, threads) = match &cfg.observe {
            Observe::Workload(w) => (
                format!(
                    "workload {}",
                    match w.profile {
                        crate::workload::Profile::Mixed => "mixed",
                        crate::workload::Profile::Training => "training",
                    }
                ),
                Some(w.threads),
            ),
            Observe::Probe => ("probe".to_string(), None),
        };
        let mut r = ChaosReport {
            verdict: Verdict::Clean,
            failures: Vec::new(),
            mountpoint,
            settings: RunSettings {
                duration_s: cfg.duration.as_secs_f64(),
                kill_every_s: cfg.kill_every.map(|d| d.as_secs_f64()),
                upgrade_every_s: cfg.upgrade_every.map(|d| d.as_secs_f64()),
                max_kills: cfg.max_kills,
                max_upgrades: cfg.max_upgrades,
                jitter: cfg.jitter,
                seed: cfg.seed,
                application,
                threads,
                upgrade_binary: cfg.upgrade.binary.as_ref().map(|b| b.display().to_string()),
                upgrade_drain: cfg.upgrade.drain,
            },
            wall_s,
            operations: 0,
            errors: 0,
            errors_by_errno: BTreeMap::new(),
            check_failures: 0,
            records_acknowledged: 0,
            records_lost: 0,
            records_corrupted: 0,
            records_duplicated: 0,
            records_out_of_order: 0,
            stuck: Vec::new(),
            kills: by_kind.get("kill").map_or(0, Vec::len),
            upgrades: by_kind.get("upgrade").map_or(0, Vec::len),
            faults_by_kind,
            restarts_seen: last
                .as_ref()
                .map_or(0, |l| l.restarts.saturating_sub(first.restarts)),
            generation_first: first.generation,
            generation_last: last.as_ref().map(|l| l.generation),
            client_version_first: first.client_version.clone(),
            client_version_last: last.as_ref().map(|l| l.client_version.clone()),
            longest_away_from_faults_ms,
            slow_threshold_ms: threshold_ms,
            still_mounted: mounted,
            stopped_early: stopped_early.clone(),
            faults: Vec::new(),
            workload: None,
            probe: None,
        };
        match observed {
            Observed::Workload(w) => {
                r.operations = w.total_ops;
                r.errors = w.total_errors;
                for e in &w.errors {
                    *r.errors_by_errno.entry(e.name.to_string()).or_default() += e.count;
                }
                r.check_failures = w.check_failures;
                let a = &w.append;
                r.records_acknowledged = a.acknowledged;
                r.records_lost = a.lost;
                r.records_corrupted = a.corrupted;
                r.records_duplicated = a.duplicates;
                r.records_out_of_order = a.out_of_order;
                r.stuck = w.stuck.clone();
                if let Some(f) = &w.fatal {
                    failures.push(format!("workload: {f}"));
                }
                if let Some(e) = &a.read_error {
                    failures.push(format!("the append log could not be read back: {e}"));
                }
                r.workload = Some(w);
            }
            Observed::Probe(p) => {
                r.operations = p.total_ops;
                r.errors = p.total_errors;
                for (k, v) in &p.errors {
                    r.errors_by_errno.insert((*k).to_string(), *v);
                }
                r.stuck = p.stuck.iter().copied().collect();
                r.probe = Some(p);
            }
        }
        if r.errors > 0 {
            let by: Vec<String> = r
                .errors_by_errno
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            failures.push(format!(
                "{} application errors ({})",
                r.errors,
                by.join(", ")
            ));
        }
        if r.check_failures > 0 {
            failures.push(format!(
                "{} reads or listings did not match what was written",
                r.check_failures
            ));
        }
        for (n, what) in [
            (r.records_lost, "lost"),
            (r.records_corrupted, "corrupted"),
            (r.records_duplicated, "duplicated"),
            (r.records_out_of_order, "out of order"),
        ] {
            if n > 0 {
                failures.push(format!("{n} append-log records {what}"));
            }
        }
        if !r.stuck.is_empty() {
            failures.push(format!("{} operations never returned", r.stuck.len()));
        }
        for (i, f) in faults.iter().enumerate() {
            if !f.ok {
                failures.push(format!(
                    "fault #{} ({} at {:.1} s): {}{}",
                    i + 1,
                    f.kind.name(),
                    f.at_ms / 1e3,
                    f.outcome,
                    f.detail
                        .as_ref()
                        .map_or(String::new(), |d| format!(": {d}"))
                ));
            }
        }
        if !mounted {
            failures.push("the mount is gone".into());
        }
        if let Some(s) = stopped_early {
            failures.push(format!("stopped early: {s}"));
        }
        r.verdict = if failures.is_empty() {
            Verdict::Clean
        } else {
            Verdict::Failed
        };
        r.failures = failures;
        r.faults = faults;
        r
    }

    pub fn is_clean(&self) -> bool {
        self.verdict == Verdict::Clean
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The verdict, what the application saw, then the faults.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let verdict = match self.verdict {
            Verdict::Clean => "CLEAN",
            Verdict::Failed => "FAILED",
        };
        let _ = writeln!(
            s,
            "baton-chaos on {}: {verdict} — {} kills, {} upgrades in {}; {} operations ({}), {} errors, {} of {} acknowledged records lost, {} corrupted",
            self.mountpoint,
            self.kills,
            self.upgrades,
            show_duration(std::time::Duration::from_secs_f64(self.wall_s)),
            self.operations,
            self.settings.application,
            self.errors,
            self.records_lost,
            self.records_acknowledged,
            self.records_corrupted + self.records_duplicated + self.records_out_of_order,
        );
        for f in &self.failures {
            let _ = writeln!(s, "  FAILURE: {f}");
        }
        if !self.errors_by_errno.is_empty() {
            let by: Vec<String> = self
                .errors_by_errno
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "  errors by errno: {}", by.join(", "));
        }
        if !self.faults_by_kind.is_empty() {
            let _ = writeln!(
                s,
                "  {:<8} {:>5} {:>5}  {:>9} {:>9} {:>9}  {:>13} {:>13}  {:>16}",
                "fault",
                "count",
                "ok",
                "pause p50",
                "p99",
                "max",
                "recovery p50",
                "recovery max",
                "supervisor p50",
            );
        }
        for (k, st) in &self.faults_by_kind {
            let _ = writeln!(
                s,
                "  {k:<8} {:>5} {:>5}  {:>6.1} ms {:>6.1} ms {:>6.1} ms  {:>10.1} ms {:>10.1} ms  {:>13} ms",
                st.count,
                st.ok,
                st.pause_p50_ms,
                st.pause_p99_ms,
                st.pause_max_ms,
                st.recovery_p50_ms,
                st.recovery_max_ms,
                st.supervisor_pause_p50_ms
                    .map_or("-".into(), |p| format!("{p:.1}")),
            );
            for (o, n) in &st.other_outcomes {
                let _ = writeln!(s, "           {n} not ok: {o}");
            }
        }
        if !self.faults.is_empty() {
            let _ = writeln!(
                s,
                "  pause = the longest application operation overlapping a fault (from the fault until operations complete again); below {:.0} ms counts as {:.0} ms",
                self.slow_threshold_ms, self.slow_threshold_ms
            );
        }
        let _ = writeln!(
            s,
            "  client: generation {} ({}) -> {} ({}), {} restarts seen",
            self.generation_first,
            self.client_version_first,
            self.generation_last.map_or("?".into(), |g| g.to_string()),
            self.client_version_last.as_deref().unwrap_or("?"),
            self.restarts_seen
        );
        if let Some(l) = self.longest_away_from_faults_ms {
            let _ = writeln!(s, "  longest operation away from faults: {l:.1} ms");
        }
        if let Some(w) = &self.workload {
            for line in w.summary().lines() {
                let _ = writeln!(s, "  | {line}");
            }
        }
        if let Some(p) = &self.probe {
            let _ = writeln!(
                s,
                "  probe: {} statfs calls, {} errors, longest {:.1} ms",
                p.total_ops, p.total_errors, p.longest_ms
            );
            for e in &p.error_examples {
                let _ = writeln!(s, "    {e}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::FaultKind;

    fn op(start_ms: f64, duration_ms: f64) -> OpReport {
        OpReport {
            op: "pread",
            start_ms,
            duration_ms,
        }
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn the_longest_operation_away_from_faults_ignores_overlapping_ones() {
        let ops = [op(0.0, 5.0), op(8.0, 50.0), op(100.0, 3.0), op(200.0, 7.0)];
        let windows = [(10.0, 20.0), (150.0, 160.0)];
        // 8..58 overlaps the first window; 200..207 is the longest of the rest.
        assert_eq!(longest_away(&ops, &windows), Some(7.0));
        assert_eq!(longest_away(&ops, &[]), Some(50.0));
        assert_eq!(longest_away(&ops[1..2], &windows), None);
    }

    #[test]
    fn pauses_below_the_threshold_count_as_the_threshold() {
        let mk = |pause| Fault {
            kind: FaultKind::Kill,
            at_ms: 0.0,
            recovered_ms: Some(10.0),
            window_end_ms: 20.0,
            before: None,
            after: None,
            restarts: 1,
            outcome: "restarted".into(),
            ok: true,
            detail: None,
            supervisor_pause_ms: None,
            pause_ms: pause,
            pause_op: None,
        };
        let f = [mk(Some(40.0)), mk(None), mk(Some(90.0))];
        let refs: Vec<&Fault> = f.iter().collect();
        let s = kind_stats(&refs, 1.0);
        assert_eq!((s.count, s.ok, s.restarts), (3, 3, 3));
        assert_eq!(s.pause_below_threshold, 1);
        assert_eq!((s.pause_p50_ms, s.pause_max_ms), (40.0, 90.0));
    }

    fn status() -> Status {
        Status::from_json(serde_json::json!({
            "generation": 1, "client_pid": 42, "client_version": "0.1.0", "upgrades": 0
        }))
        .unwrap()
    }

    fn probe(errors: &[(&'static str, u64)], stuck: Option<OpReport>) -> ProbeReport {
        ProbeReport {
            mountpoint: "/m".into(),
            operation: "statfs",
            duration_s: 1.0,
            total_ops: 500,
            total_errors: errors.iter().map(|e| e.1).sum(),
            errors: errors.iter().copied().collect(),
            error_examples: Vec::new(),
            longest_ms: 30.0,
            slow_threshold_ms: 1.0,
            slow_ops: vec![op(100.0, 30.0), op(900.0, 2.0)],
            slow_ops_dropped: 0,
            stuck,
        }
    }

    fn kill_at(at_ms: f64, ok: bool) -> Fault {
        Fault {
            kind: FaultKind::Kill,
            at_ms,
            recovered_ms: ok.then_some(5.0),
            window_end_ms: at_ms + 50.0,
            before: None,
            after: None,
            restarts: u64::from(ok),
            outcome: if ok { "restarted" } else { "not restarted" }.into(),
            ok,
            detail: None,
            supervisor_pause_ms: None,
            pause_ms: Some(30.0),
            pause_op: Some("statfs"),
        }
    }

    fn build(faults: Vec<Fault>, p: ProbeReport, mounted: bool) -> ChaosReport {
        let mut cfg = Config::new(
            super::super::Target {
                baton: "baton".into(),
                home: "/h".into(),
                mountpoint: "/m".into(),
            },
            std::time::Duration::from_secs(1),
        );
        cfg.observe = Observe::Probe;
        ChaosReport::build(Inputs {
            mountpoint: "/m".into(),
            cfg: &cfg,
            wall_s: 1.0,
            first: status(),
            last: Some(status()),
            mounted,
            faults,
            observed: Observed::Probe(p),
            stopped_early: None,
        })
    }

    #[test]
    fn a_run_with_nothing_wrong_is_clean() {
        let r = build(vec![kill_at(90.0, true)], probe(&[], None), true);
        assert!(r.is_clean(), "{:?}", r.failures);
        assert_eq!((r.kills, r.operations, r.errors), (1, 500, 0));
        assert_eq!(r.faults_by_kind["kill"].pause_max_ms, 30.0);
        // The 30 ms call overlaps the fault; the 2 ms one is the longest away from it.
        assert_eq!(r.longest_away_from_faults_ms, Some(2.0));
        assert!(r.summary().contains("CLEAN"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["verdict"], "clean");
        assert_eq!(json["faults_by_kind"]["kill"]["count"], 1);
    }

    #[test]
    fn application_errors_hangs_bad_faults_and_a_lost_mount_each_fail_the_run() {
        let errors = build(vec![], probe(&[("ENOTCONN", 3), ("EIO", 1)], None), true);
        assert_eq!(errors.verdict, Verdict::Failed);
        assert_eq!(errors.errors, 4);
        assert_eq!(errors.errors_by_errno["ENOTCONN"], 3);
        assert!(
            errors.failures[0].contains("ENOTCONN 3"),
            "{:?}",
            errors.failures
        );
        assert!(errors.summary().contains("FAILED"));

        let hung = build(vec![], probe(&[], Some(op(10.0, 9000.0))), true);
        assert!(!hung.is_clean());
        assert_eq!(hung.stuck.len(), 1);

        let bad_fault = build(vec![kill_at(90.0, false)], probe(&[], None), true);
        assert!(!bad_fault.is_clean());
        assert!(
            bad_fault
                .failures
                .iter()
                .any(|f| f.contains("not restarted")),
            "{:?}",
            bad_fault.failures
        );
        assert_eq!(
            bad_fault.faults_by_kind["kill"].other_outcomes["not restarted"],
            1
        );

        let gone = build(vec![], probe(&[], None), false);
        assert!(!gone.is_clean());
        assert!(gone.failures.iter().any(|f| f.contains("mount is gone")));
    }
}
