//! The Kubernetes control plane at scale (issue 6, item 7; docs/benchmarks.md, *Kubernetes
//! control plane at scale*): N simulated `baton-csi` node agents in this one process
//! against a real kube-apiserver 1.20 + etcd, and `baton-csi rollout`'s code driving a
//! rolling binary upgrade of all of them, for several `--max-parallel` values.
//!
//! ```sh
//! cargo bench -p csi-node --bench scale -- --nodes 5000 --max-parallel 10,50,200
//! ```
//!
//! What is real: the API server, etcd, the chart's RBAC (every agent authenticates as the
//! node DaemonSet's service account), N Node objects, one mount pod object per simulated
//! mount, one Baton PersistentVolume; per agent its own API client (its requests counted
//! by `csi_node::kube::counting`; see [`agent_client`] for its connections) and its three
//! watches opened by `csi_node::upgrade::watch::start` exactly as `baton-csi` opens them,
//! each on its own connection; the upgrade slots
//! (`csi_node::upgrade::slots::SlotPool`); the Node's answer (`handle::node_summary`); the
//! rollout (`csi_node::rollout::Rollout`).
//!
//! What is simulated: the per-node handler. `upgrade::handle::Handler` finds its mounts in
//! the host's mount table and upgrades them by running `baton upgrade`; here each agent has
//! `--mounts` fake mounts in memory that "upgrade" by sleeping `--upgrade-ms`. Around that
//! sleep the agent makes the same API requests, in the same order and under the same
//! conditions, as `Handler` does for a request on its Node: take a slot, patch the mount
//! pod's status to `running`, upgrade, free the slot, patch the final status, post one
//! Event, and patch the Node's status once every mount has answered (only when it
//! changed). `SimHandler` below mirrors `Handler::handle`, `answer`, `upgrade_all` and
//! `node_status` line for line; a change there must be made here too.
//!
//! A benchmark, not a test: it is not run by `cargo test` (a long, separate command), but
//! it checks its own outcome and exits non-zero if any node or mount did not end with the
//! rollout's request `succeeded`, or an agent's request failed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use csi_node::kube::counting::{ApiCounts, CountingLayer};
use csi_node::kube::mountpod::{LABEL_BACKEND, mount_pod_selector};
use csi_node::rollout::{Action, Ended, Rollout};
use csi_node::upgrade::handle::{NodeStatusMemo, event_about, node_summary};
use csi_node::upgrade::request::{
    Phase, STATUS_ANNOTATION, UPGRADE_ANNOTATION, UpgradeRequest, UpgradeStatus,
};
use csi_node::upgrade::slots::{DEFAULT_LEASE_SECS, SlotPool};
use csi_node::upgrade::watch::{self, Kind, Seen, WatchConfig};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, PersistentVolume, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use testkit::kube::{KubeCluster, User, apply_all, create_service_account, render_chart};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const NS: &str = "baton-system";
const SELECTOR_LABEL: &str = "baton.dev/scale";

#[derive(Parser, Debug)]
#[command(about = "Simulated baton-csi node agents and a rollout against a real kube-apiserver")]
struct Args {
    /// Node agents (and Node objects).
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// Simulated Baton mounts (mount pods) per node.
    #[arg(long, default_value_t = 1)]
    mounts: usize,
    /// One rollout per value, in order (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    max_parallel: Vec<usize>,
    /// Upgrade slots (Leases); 0 = no limit (the chart's default is 10).
    #[arg(long, default_value_t = 10)]
    slots: usize,
    /// How long a simulated mount upgrade takes, in milliseconds.
    #[arg(long, default_value_t = 100)]
    upgrade_ms: u64,
    /// The rollout's poll interval in seconds (`baton-csi rollout --poll`, default 2).
    #[arg(long, default_value_t = 2.0)]
    poll: f64,
    /// Agents started at once (the next wave starts when all of them see their objects).
    #[arg(long, default_value_t = 250)]
    wave: usize,
    /// Seconds to measure the API server with every watch open and nothing happening.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// Bound on each rollout, in seconds.
    #[arg(long, default_value_t = 3600)]
    rollout_timeout: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// CPU seconds (user + system) and resident memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct ProcUsage {
    cpu_secs: f64,
    rss_mib: f64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn usage(pid: &str) -> anyhow::Result<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i).context("short /proc stat")?.parse::<u64>()? as f64)
    };
    // utime is field 14, stime 15.
    let cpu_secs = (ticks(11)? + ticks(12)?) / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Ok(ProcUsage {
        cpu_secs,
        rss_mib: rss_kib / 1024.0,
    })
}

/// CPU of the API server, etcd and this process (the agents and the rollout).
#[derive(Clone, Copy, Debug)]
struct Cpu {
    apiserver: ProcUsage,
    etcd: ProcUsage,
    agents: ProcUsage,
    at: Instant,
}

impl Cpu {
    fn read(cluster: &KubeCluster) -> anyhow::Result<Cpu> {
        Ok(Cpu {
            apiserver: usage(&cluster.apiserver_pid().to_string())?,
            etcd: usage(&cluster.etcd_pid().to_string())?,
            agents: usage("self")?,
            at: Instant::now(),
        })
    }

    /// (wall s, API server CPU s, etcd CPU s, agents CPU s) since `before`.
    fn since(&self, before: &Cpu) -> PhaseCost {
        PhaseCost {
            wall_secs: (self.at - before.at).as_secs_f64(),
            apiserver_cpu_secs: self.apiserver.cpu_secs - before.apiserver.cpu_secs,
            etcd_cpu_secs: self.etcd.cpu_secs - before.etcd.cpu_secs,
            agents_cpu_secs: self.agents.cpu_secs - before.agents.cpu_secs,
            apiserver_rss_mib: self.apiserver.rss_mib,
        }
    }
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct PhaseCost {
    wall_secs: f64,
    apiserver_cpu_secs: f64,
    etcd_cpu_secs: f64,
    agents_cpu_secs: f64,
    apiserver_rss_mib: f64,
}

/// Counters shared by every simulated agent.
#[derive(Debug, Default)]
struct Shared {
    /// Slots held right now, and the most ever held at once.
    holding: AtomicUsize,
    most_holding: AtomicUsize,
    /// Requests of the simulated handler that failed (a patch, an Event, a slot).
    failures: AtomicU64,
}

/// One simulated mount: its mount pod and what `Handler` keeps in
/// `<state>/upgrades/<backend>.json`.
#[derive(Debug)]
struct SimMount {
    pod: String,
    generation: u64,
    status: Option<UpgradeStatus>,
    answered: BTreeMap<String, String>,
}

/// `upgrade::handle::Handler` for fake mounts (see the module doc).
struct SimHandler {
    client: kube::Client,
    node_name: String,
    mounts: Vec<SimMount>,
    slots: Option<SlotPool>,
    upgrade: Duration,
    shared: Arc<Shared>,
    node_written: NodeStatusMemo,
}

impl SimHandler {
    /// `Handler::handle`.
    async fn handle(&mut self, seen: &Seen) {
        if !seen.exists {
            return;
        }
        let Some(value) = seen.annotations.get(UPGRADE_ANNOTATION) else {
            return;
        };
        let source = seen.source();
        // `Handler::backends`: a PV names no mount here (no published targets).
        let backends: Vec<usize> = match seen.kind {
            Kind::Pod => (0..self.mounts.len())
                .filter(|&i| self.mounts[i].pod == seen.name)
                .collect(),
            Kind::PersistentVolume => Vec::new(),
            Kind::Node => (0..self.mounts.len()).collect(),
        };
        let pending: Vec<usize> = backends
            .iter()
            .copied()
            .filter(|&i| self.mounts[i].answered.get(&source) != Some(value))
            .collect();
        if !pending.is_empty() {
            self.answer(seen, &source, value, &pending).await;
        }
        if seen.kind == Kind::Node {
            self.node_status(seen, &source, value, &backends).await;
        }
    }

    /// `Handler::node_status`.
    async fn node_status(&self, seen: &Seen, source: &str, value: &str, backends: &[usize]) {
        let statuses: Vec<UpgradeStatus> = backends
            .iter()
            .filter_map(|&i| self.mounts[i].status.clone())
            .filter(|s| s.request == value && s.source == source)
            .collect();
        if statuses.len() < backends.len() {
            return;
        }
        let st = node_summary(value, source, &statuses);
        let current = seen
            .annotations
            .get(STATUS_ANNOTATION)
            .and_then(|s| UpgradeStatus::from_json(s));
        if current.as_ref() == Some(&st) || self.node_written.recently_written(&st) {
            return;
        }
        let patch = json!({"metadata": {"annotations": {STATUS_ANNOTATION: st.to_json()}}});
        match Api::<Node>::all(self.client.clone())
            .patch(&seen.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.node_written.written(&st),
            Err(e) => {
                tracing::warn!(node = %seen.name, error = %e, "cannot write the node's upgrade status");
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `Handler::answer`.
    async fn answer(&mut self, seen: &Seen, source: &str, value: &str, pending: &[usize]) {
        let reason = match UpgradeRequest::parse(value) {
            Err(e) => format!("malformed {UPGRADE_ANNOTATION}: {e}"),
            Ok(UpgradeRequest::Pod(_)) => "pod upgrades are not simulated".to_string(),
            Ok(UpgradeRequest::Binary(_)) => {
                self.upgrade_all(seen, source, value, pending).await;
                return;
            }
        };
        for &i in pending {
            let mut st = UpgradeStatus::new(Phase::Failed, value, source).with_reason(&reason);
            st.generation = Some(self.mounts[i].generation);
            self.finish(i, source, value, st).await;
        }
        self.event(seen, "Warning", "UpgradeRefused", &reason).await;
    }

    /// `Handler::upgrade_all`, with `Executor::upgrade` replaced by a sleep.
    async fn upgrade_all(&mut self, seen: &Seen, source: &str, value: &str, ids: &[usize]) {
        let mut outcomes = Vec::new();
        for &i in ids {
            // `Handler::take_slot`: `pending` when every slot is busy, then wait.
            let taken = match self.slots.clone() {
                None => None,
                Some(pool) => Some(match pool.try_take().await {
                    Ok(Ok(s)) => Ok(s),
                    Ok(Err(retry_after)) => {
                        self.set_status(i, UpgradeStatus::new(Phase::Pending, value, source))
                            .await;
                        tokio::time::sleep(retry_after).await;
                        pool.acquire().await
                    }
                    Err(e) => Err(e),
                }),
            };
            let slot = match taken {
                None => None,
                Some(taken) => match taken {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %csi_node::error::chain(&e), "no upgrade slot");
                        self.shared.failures.fetch_add(1, Ordering::Relaxed);
                        let mut st = UpgradeStatus::new(Phase::Failed, value, source)
                            .with_reason(csi_node::error::chain(&e));
                        st.generation = Some(self.mounts[i].generation);
                        outcomes.push(st.clone());
                        self.finish(i, source, value, st).await;
                        continue;
                    }
                },
            };
            if slot.is_some() {
                let now = self.shared.holding.fetch_add(1, Ordering::AcqRel) + 1;
                self.shared.most_holding.fetch_max(now, Ordering::AcqRel);
            }
            self.set_status(i, UpgradeStatus::new(Phase::Running, value, source))
                .await;
            tokio::time::sleep(self.upgrade).await;
            self.mounts[i].generation += 1;
            if let Some(slot) = slot {
                self.shared.holding.fetch_sub(1, Ordering::AcqRel);
                slot.release().await;
            }
            let mut st = UpgradeStatus::new(Phase::Succeeded, value, source);
            st.generation = Some(self.mounts[i].generation);
            // No application pause is simulated.
            st.pause_ms = Some(0);
            outcomes.push(st.clone());
            self.finish(i, source, value, st).await;
        }
        let failed = outcomes
            .iter()
            .filter(|s| s.phase != Phase::Succeeded)
            .count();
        let summary: Vec<String> = outcomes
            .iter()
            .zip(ids)
            .map(|(s, i)| match (&s.phase, &s.reason) {
                (Phase::Succeeded, _) => format!(
                    "{}: generation {} (paused {} ms)",
                    self.mounts[*i].pod,
                    s.generation.unwrap_or_default(),
                    s.pause_ms.unwrap_or_default()
                ),
                (p, r) => format!(
                    "{}: {p:?}: {}",
                    self.mounts[*i].pod,
                    r.as_deref().unwrap_or("")
                ),
            })
            .collect();
        let (kind, reason) = if failed == 0 {
            ("Normal", "UpgradeSucceeded")
        } else {
            ("Warning", "UpgradeFailed")
        };
        let message = format!("{value} on node {}: {}", self.node_name, summary.join("; "));
        self.event(seen, kind, reason, &message).await;
    }

    /// `Handler::finish`.
    async fn finish(&mut self, i: usize, source: &str, value: &str, st: UpgradeStatus) {
        self.set_status(i, st).await;
        self.mounts[i]
            .answered
            .insert(source.to_string(), value.to_string());
    }

    /// `Handler::set_status`: one patch of the mount pod per phase change.
    async fn set_status(&mut self, i: usize, st: UpgradeStatus) {
        if self.mounts[i].status.as_ref() == Some(&st) {
            return;
        }
        self.mounts[i].status = Some(st.clone());
        let patch = json!({"metadata": {"annotations": {STATUS_ANNOTATION: st.to_json()}}});
        if let Err(e) = Api::<Pod>::namespaced(self.client.clone(), NS)
            .patch(
                &self.mounts[i].pod,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            tracing::warn!(pod = %self.mounts[i].pod, error = %e, "cannot write the upgrade status");
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Handler::event`.
    async fn event(&self, seen: &Seen, kind: &str, reason: &str, message: &str) {
        let created = match event_about(seen, kind, reason, message, &self.node_name) {
            Ok((ns, ev)) => Api::<Event>::namespaced(self.client.clone(), &ns)
                .create(&PostParams::default(), &ev)
                .await
                .map(drop)
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = created {
            tracing::warn!(error = %e, "cannot post an Event");
            self.shared.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `csi_node::upgrade::run` for the simulated handler; reports on `ready` once its Node,
/// its mount pods and the PV have come through its watches.
async fn run_agent(
    client: kube::Client,
    cfg: WatchConfig,
    mut handler: SimHandler,
    ready: mpsc::UnboundedSender<()>,
) {
    let mut rx = watch::start(&client, &cfg);
    let mut requests: BTreeMap<String, Seen> = BTreeMap::new();
    let mut recheck = tokio::time::interval(csi_node::upgrade::RECHECK_INTERVAL);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut node_seen, mut pv_seen) = (false, false);
    let mut pods_seen = std::collections::BTreeSet::new();
    let mut ready = Some(ready);
    loop {
        tokio::select! {
            seen = rx.recv() => {
                let Some(seen) = seen else { return };
                match seen.kind {
                    Kind::Node => node_seen = true,
                    Kind::PersistentVolume => pv_seen = true,
                    Kind::Pod => {
                        pods_seen.insert(seen.name.clone());
                    }
                }
                if node_seen && pv_seen && pods_seen.len() >= handler.mounts.len()
                    && let Some(r) = ready.take()
                {
                    let _ = r.send(());
                }
                if seen.exists && seen.annotations.contains_key(UPGRADE_ANNOTATION) {
                    requests.insert(seen.source(), seen.clone());
                } else {
                    requests.remove(&seen.source());
                }
                handler.handle(&seen).await;
            }
            _ = recheck.tick() => {
                for seen in requests.values() {
                    handler.handle(seen).await;
                }
            }
        }
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// Runs `n` futures made by `f`, at most `width` at a time.
async fn bounded<F, Fut>(n: usize, width: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        if set.len() >= width
            && let Some(r) = set.join_next().await
        {
            r??;
        }
        set.spawn(f(i));
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Requests by verb, per node: the mean and the extremes over every agent.
#[derive(Clone, Debug, serde::Serialize)]
struct PerNode {
    verb: String,
    mean: f64,
    min: u64,
    max: u64,
}

fn per_node(before: &[BTreeMap<String, u64>], after: &[BTreeMap<String, u64>]) -> Vec<PerNode> {
    let mut verbs: Vec<String> = after.iter().flat_map(|m| m.keys().cloned()).collect();
    verbs.sort();
    verbs.dedup();
    let mut rows: Vec<PerNode> = verbs
        .into_iter()
        .map(|verb| {
            let d: Vec<u64> = before
                .iter()
                .zip(after)
                .map(|(b, a)| a.get(&verb).unwrap_or(&0) - b.get(&verb).unwrap_or(&0))
                .collect();
            PerNode {
                mean: d.iter().sum::<u64>() as f64 / d.len().max(1) as f64,
                min: d.iter().copied().min().unwrap_or(0),
                max: d.iter().copied().max().unwrap_or(0),
                verb,
            }
        })
        .collect();
    let totals: Vec<u64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.values().sum::<u64>() - b.values().sum::<u64>())
        .collect();
    rows.push(PerNode {
        verb: "all".into(),
        mean: totals.iter().sum::<u64>() as f64 / totals.len().max(1) as f64,
        min: totals.iter().copied().min().unwrap_or(0),
        max: totals.iter().copied().max().unwrap_or(0),
    });
    rows
}

fn fmt_per_node(rows: &[PerNode]) -> String {
    rows.iter()
        .filter(|r| r.max > 0)
        .map(|r| format!("{} {:.2} [{}-{}]", r.verb, r.mean, r.min, r.max))
        .collect::<Vec<_>>()
        .join(", ")
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).unwrap_or(&0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

#[derive(Debug, serde::Serialize)]
struct RolloutResult {
    max_parallel: usize,
    target: String,
    cost: PhaseCost,
    nodes_succeeded: usize,
    mounts_succeeded: usize,
    most_slots_held: usize,
    agent_requests_per_node: Vec<PerNode>,
    rollout_requests: BTreeMap<String, u64>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    nodes: usize,
    mounts_per_node: usize,
    slots: usize,
    upgrade_ms: u64,
    poll_secs: f64,
    create_objects: PhaseCost,
    start_agents: PhaseCost,
    registered_watchers: BTreeMap<String, u64>,
    agent_requests_at_start_per_node: Vec<PerNode>,
    idle: PhaseCost,
    idle_requests_per_node: Vec<PerNode>,
    rollouts: Vec<RolloutResult>,
    failures: u64,
}

/// `apiserver_registered_watchers` by kind, from the API server's /metrics.
async fn registered_watchers(admin: &kube::Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = admin
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("apiserver_registered_watchers{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let kind = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("kind=\""))
            .map(|k| k.trim_end_matches('"').to_string())
            .unwrap_or_default();
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        if v > 0.0 {
            out.insert(kind, v as u64);
        }
    }
    Ok(out)
}

/// Raises the soft open-file limit to the hard one (every watch is its own HTTP/1.1
/// connection, on both sides; the API server and etcd inherit the limit) and returns it.
fn raise_nofile() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Agent `counts`' own client: its requests are counted on their own, and go out through
/// `base`'s connection pool. A watch holds its HTTP/1.1 connection for its lifetime, so
/// every watch is its own connection as on a real node; only the short requests of
/// different agents may reuse each other's idle connections (on real nodes each agent
/// keeps its own: 3 connections per node here instead of 3 to 4).
fn agent_client(base: &kube::Client, counts: &ApiCounts) -> kube::Client {
    use tower::Layer;
    let base = base.clone();
    let send = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let base = base.clone();
        async move { base.send(req).await }
    });
    kube::Client::new(CountingLayer(counts.clone()).layer(send), NS)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, log_filter) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let nofile = raise_nofile()?;
    let n = args.nodes;
    // 3 watch connections per agent in this process and in the API server, plus the
    // pool's, etcd's and the files of both.
    if (3 * n + 1000) as u64 > nofile {
        bail!(
            "{n} agents need about {} open files per process; the limit here is {nofile}",
            3 * n + 1000
        );
    }
    let sa = User::service_account(NS, "baton-baton-csi-node");
    eprintln!("starting etcd + kube-apiserver");
    let cluster = KubeCluster::start(std::slice::from_ref(&sa)).await?;
    let admin = cluster.client().await?;

    // The namespace, the chart (RBAC of the node agents), N Nodes, the mount pods, a PV.
    let t0 = Cpu::read(&cluster)?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}}))?;
    Api::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    create_service_account(&admin, NS, "default").await?;
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/baton-csi");
    let objects = render_chart(&chart, "baton", NS, &json!({}))?;
    apply_all(&admin, &objects, NS).await?;
    eprintln!("creating {n} Nodes and {} mount pods", n * args.mounts);
    let a = admin.clone();
    bounded(n, 16, move |i| {
        let nodes: Api<Node> = Api::all(a.clone());
        async move {
            let node: Node = serde_json::from_value(json!({"metadata": {
                "name": node_name(i), "labels": {SELECTOR_LABEL: "yes"}}}))?;
            nodes.create(&PostParams::default(), &node).await?;
            Ok(())
        }
    })
    .await?;
    let mounts = args.mounts;
    let a = admin.clone();
    bounded(n * mounts, 16, move |k| {
        let pods: Api<Pod> = Api::namespaced(a.clone(), NS);
        async move {
            let (i, m) = (k / mounts, k % mounts);
            let node = node_name(i);
            let mut labels: BTreeMap<String, String> = mount_pod_selector(&node)
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            labels.insert(LABEL_BACKEND.into(), format!("{m:020x}"));
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("baton-mount-{node}-{m}"), "labels": labels},
                "spec": {
                    "nodeName": node,
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "baton", "image": "baton:sim"}],
                },
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
            Ok(())
        }
    })
    .await?;
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "datasets"},
        "spec": {
            "capacity": {"storage": "10Ti"},
            "accessModes": ["ReadWriteMany"],
            "csi": {"driver": "csi.baton.dev", "volumeHandle": "datasets"},
        },
    }))?;
    Api::<PersistentVolume>::all(admin.clone())
        .create(&PostParams::default(), &pv)
        .await?;
    let t1 = Cpu::read(&cluster)?;
    let create_objects = t1.since(&t0);

    // The agents, in waves.
    let kc = Kubeconfig::read_from(cluster.kubeconfig(&sa.token)?)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let base = kube::Client::try_from(config)?;
    let shared = Arc::new(Shared::default());
    let mut counts: Vec<ApiCounts> = Vec::with_capacity(n);
    let mut agents = Vec::with_capacity(n);
    let start = Instant::now();
    for wave in (0..n).collect::<Vec<_>>().chunks(args.wave.max(1)) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for &i in wave {
            let c = ApiCounts::new(None);
            let client = agent_client(&base, &c);
            counts.push(c);
            let node = node_name(i);
            let cfg = WatchConfig {
                namespace: NS.into(),
                node_name: node.clone(),
                mount_pod_labels: mount_pod_selector(&node),
                pv_labels: None,
            };
            let handler = SimHandler {
                client: client.clone(),
                node_name: node.clone(),
                mounts: (0..mounts)
                    .map(|m| SimMount {
                        pod: format!("baton-mount-{node}-{m}"),
                        generation: 1,
                        status: None,
                        answered: BTreeMap::new(),
                    })
                    .collect(),
                slots: (args.slots > 0).then(|| SlotPool {
                    client: client.clone(),
                    namespace: NS.into(),
                    count: args.slots,
                    holder: node.clone(),
                    lease_secs: DEFAULT_LEASE_SECS,
                }),
                upgrade: Duration::from_millis(args.upgrade_ms),
                shared: shared.clone(),
                node_written: NodeStatusMemo::default(),
            };
            agents.push(tokio::spawn(run_agent(client, cfg, handler, tx.clone())));
        }
        drop(tx);
        for _ in wave {
            rx.recv()
                .await
                .context("an agent ended before its watches saw its objects")?;
        }
        eprintln!(
            "{} agents watching ({:.1} s)",
            counts.len(),
            start.elapsed().as_secs_f64()
        );
    }
    let t2 = Cpu::read(&cluster)?;
    let start_agents = t2.since(&t1);
    let snap = |counts: &[ApiCounts]| counts.iter().map(ApiCounts::snapshot).collect::<Vec<_>>();
    let zero = vec![BTreeMap::new(); n];
    let at_start = snap(&counts);
    let agent_requests_at_start_per_node = per_node(&zero, &at_start);
    let watchers = registered_watchers(&admin).await?;

    // Idle: every watch open, nothing changes.
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let t3 = Cpu::read(&cluster)?;
    let idle = t3.since(&t2);
    let after_idle = snap(&counts);
    let idle_requests_per_node = per_node(&at_start, &after_idle);

    // The rollouts.
    let rollout_counts = ApiCounts::new(None);
    let kc = Kubeconfig::read_from(cluster.kubeconfig(testkit::kube::ADMIN_TOKEN)?)?;
    let rconfig = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let rclient = kube::client::ClientBuilder::try_from(rconfig)?
        .with_layer(&CountingLayer(rollout_counts.clone()))
        .build();
    let mut rollouts = Vec::new();
    let mut before = after_idle;
    for (k, &mp) in args.max_parallel.iter().enumerate() {
        let target = format!("binary:0.{}.0", k + 2);
        eprintln!("rollout of {target} to {n} nodes, {mp} at a time");
        shared.most_holding.store(0, Ordering::Release);
        let r_before = rollout_counts.snapshot();
        let c0 = Cpu::read(&cluster)?;
        let mut r = Rollout {
            client: rclient.clone(),
            namespace: NS.into(),
            poll: Duration::from_secs_f64(args.poll),
            out: Vec::new(),
        };
        let ended = tokio::time::timeout(
            Duration::from_secs(args.rollout_timeout),
            r.run(Action::Start {
                target: target.clone(),
                selector: Some(format!("{SELECTOR_LABEL}=yes")),
                max_parallel: mp,
            }),
        )
        .await
        .context("the rollout did not end in time")??;
        let c1 = Cpu::read(&cluster)?;
        if ended != Ended::Succeeded {
            bail!("rollout of {target} ended {ended:?}");
        }
        let after = snap(&counts);
        let agent_requests_per_node = per_node(&before, &after);
        before = after;
        // Every Node and every mount pod says succeeded for this request.
        let nodes = Api::<Node>::all(admin.clone())
            .list_metadata(&ListParams::default().labels(&format!("{SELECTOR_LABEL}=yes")))
            .await?;
        let ok = |a: Option<&BTreeMap<String, String>>, source: &str| {
            a.and_then(|a| a.get(STATUS_ANNOTATION))
                .and_then(|s| UpgradeStatus::from_json(s))
                .is_some_and(|s| {
                    s.phase == Phase::Succeeded && s.request == target && s.source == source
                })
        };
        let nodes_succeeded = nodes
            .items
            .iter()
            .filter(|m| {
                let name = m.metadata.name.clone().unwrap_or_default();
                ok(m.metadata.annotations.as_ref(), &format!("node/{name}"))
            })
            .count();
        let pods = Api::<Pod>::namespaced(admin.clone(), NS)
            .list_metadata(&ListParams::default().labels("app.kubernetes.io/component=mount"))
            .await?;
        let mounts_succeeded = pods
            .items
            .iter()
            .filter(|p| {
                let is_mount = p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_BACKEND))
                    .is_some();
                let name = p.metadata.name.clone().unwrap_or_default();
                // The pod's status names its node's request: `node/<node>`.
                let owner = name
                    .strip_prefix("baton-mount-")
                    .and_then(|r| r.rsplit_once('-'))
                    .map(|(node, _)| format!("node/{node}"))
                    .unwrap_or_default();
                is_mount && ok(p.metadata.annotations.as_ref(), &owner)
            })
            .count();
        let res = RolloutResult {
            max_parallel: mp,
            target: target.clone(),
            cost: c1.since(&c0),
            nodes_succeeded,
            mounts_succeeded,
            most_slots_held: shared.most_holding.load(Ordering::Acquire),
            agent_requests_per_node,
            rollout_requests: delta(&r_before, &rollout_counts.snapshot()),
        };
        eprintln!(
            "  {:.1} s, API server CPU {:.1} s; {nodes_succeeded}/{n} nodes and {mounts_succeeded}/{} mounts succeeded",
            res.cost.wall_secs,
            res.cost.apiserver_cpu_secs,
            n * mounts
        );
        rollouts.push(res);
    }

    // The agents' watches see the cluster go away: not worth a warning each.
    for a in &agents {
        a.abort();
    }
    let _ = log_filter.modify(|f| *f = tracing_subscriber::EnvFilter::new("off"));
    let report = Report {
        nodes: n,
        mounts_per_node: mounts,
        slots: args.slots,
        upgrade_ms: args.upgrade_ms,
        poll_secs: args.poll,
        create_objects,
        start_agents,
        registered_watchers: watchers,
        agent_requests_at_start_per_node,
        idle,
        idle_requests_per_node,
        rollouts,
        failures: shared.failures.load(Ordering::Acquire),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    let bad = report
        .rollouts
        .iter()
        .any(|r| r.nodes_succeeded != n || r.mounts_succeeded != n * mounts);
    if bad || report.failures > 0 {
        bail!(
            "not every node and mount succeeded, or {} agent requests failed",
            report.failures
        );
    }
    Ok(())
}

fn print_report(r: &Report) {
    let cost = |c: &PhaseCost| {
        format!(
            "{:.1} s wall; CPU: API server {:.1} s, etcd {:.1} s, agents {:.1} s; API server RSS {:.0} MiB",
            c.wall_secs,
            c.apiserver_cpu_secs,
            c.etcd_cpu_secs,
            c.agents_cpu_secs,
            c.apiserver_rss_mib
        )
    };
    println!(
        "\n{} node agents, {} mount(s) each, {} upgrade slots, {} ms per simulated upgrade, rollout poll {} s",
        r.nodes, r.mounts_per_node, r.slots, r.upgrade_ms, r.poll_secs
    );
    println!("create Nodes, mount pods, PV: {}", cost(&r.create_objects));
    println!("start agents (watches open):  {}", cost(&r.start_agents));
    println!(
        "registered watchers (API server /metrics): {:?}",
        r.registered_watchers
    );
    println!(
        "agent requests per node at start (mean [min-max]): {}",
        fmt_per_node(&r.agent_requests_at_start_per_node)
    );
    println!("idle: {}", cost(&r.idle));
    println!(
        "agent requests per node while idle: {}",
        fmt_per_node(&r.idle_requests_per_node)
    );
    println!();
    println!(
        "| max-parallel | rollout time | API server CPU | etcd CPU | agents CPU | nodes ok | mounts ok | most slots held | agent requests per node, mean [min-max] | rollout command requests |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for x in &r.rollouts {
        println!(
            "| {} | {:.1} s | {:.1} s | {:.1} s | {:.1} s | {}/{} | {}/{} | {} | {} | {:?} |",
            x.max_parallel,
            x.cost.wall_secs,
            x.cost.apiserver_cpu_secs,
            x.cost.etcd_cpu_secs,
            x.cost.agents_cpu_secs,
            x.nodes_succeeded,
            r.nodes,
            x.mounts_succeeded,
            r.nodes * r.mounts_per_node,
            x.most_slots_held,
            fmt_per_node(&x.agent_requests_per_node),
            x.rollout_requests,
        );
    }
    println!("agent requests that failed: {}", r.failures);
}
