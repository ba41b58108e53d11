//! `baton-csi rollout` (the `baton rollout` of docs/kubernetes.md, *Rolling upgrades*):
//! puts `baton.dev/upgrade=<target>` on the selected Nodes, `--max-parallel` at a time,
//! waits for each Node's `baton.dev/upgrade-status` (written by its baton-csi once every
//! mount on it is answered), prints progress and stops at the first node that did not
//! succeed. The real concurrency is bounded by the cluster's upgrade slots
//! ([`crate::upgrade::slots`]), whatever `--max-parallel` says.
//!
//! The state lives in the API server (ConfigMap [`STATE_CONFIGMAP`]), never only in this
//! process: `--pause` marks it paused (the batch in flight finishes, no new one starts),
//! `--resume` continues it, `--status` prints it; the command can be killed and resumed
//! from another machine.
//!
//! API cost: one `list` of the selected Nodes, then one metadata-only watch of them
//! ([`nodes::NodeWatch`]: only the Nodes that change come through, and the command acts
//! as soon as they do); one `get` of the ConfigMap per poll (`--poll`, for a `--pause`
//! from another command); one `patch` per Node annotated and one `replace` of the
//! ConfigMap per batch.

pub mod nodes;
pub mod plan;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::upgrade::request::{UPGRADE_ANNOTATION, UpgradeRequest};
use nodes::NodeWatch;
use plan::{NodeProgress, Outcome, RolloutState, Step};

/// The ConfigMap that holds the rollout's state, in the driver's namespace.
pub const STATE_CONFIGMAP: &str = "baton-rollout";
const STATE_KEY: &str = "state";

/// What the command was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a new rollout (refused while another one is running).
    Start {
        target: String,
        selector: Option<String>,
        max_parallel: usize,
    },
    Resume,
    Pause,
    Status,
}

/// How the command ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    Succeeded,
    Paused,
    /// `--status`/`--pause` of a rollout that goes on.
    Running,
    Failed {
        node: String,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("invalid target")]
    BadTarget(#[source] crate::upgrade::request::RequestError),
    #[error("a rollout to {0} is in progress: use --status, --pause or --resume")]
    InProgress(String),
    #[error("no rollout to resume, pause or show")]
    NoRollout,
    #[error("no node matches the selector")]
    NoNodes,
    #[error("the rollout state in ConfigMap {STATE_CONFIGMAP} is damaged")]
    Damaged(#[source] serde_json::Error),
    #[error("the rollout state changed under us (another rollout command?)")]
    Conflict,
    #[error("reading the rollout state")]
    ReadState(#[source] kube::Error),
    #[error("saving the rollout state")]
    SaveState(#[source] kube::Error),
    #[error("listing the nodes")]
    ListNodes(#[source] kube::Error),
    #[error("annotating node {0}")]
    Annotate(String, #[source] kube::Error),
}

/// Drives rollouts against one API server.
pub struct Rollout<W> {
    pub client: kube::Client,
    pub namespace: String,
    pub poll: Duration,
    /// Where progress goes (stdout).
    pub out: W,
}

impl<W> std::fmt::Debug for Rollout<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollout")
            .field("namespace", &self.namespace)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

type Stored = (RolloutState, Option<String>);

impl<W: Write> Rollout<W> {
    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The stored state and its resourceVersion.
    async fn load(&self) -> Result<Option<Stored>, RolloutError> {
        let cm = self
            .configmaps()
            .get_opt(STATE_CONFIGMAP)
            .await
            .map_err(RolloutError::ReadState)?;
        let Some(cm) = cm else { return Ok(None) };
        let Some(json) = cm.data.as_ref().and_then(|d| d.get(STATE_KEY)) else {
            return Ok(None);
        };
        let state = serde_json::from_str(json).map_err(RolloutError::Damaged)?;
        Ok(Some((state, cm.metadata.resource_version.clone())))
    }

    /// Saves `state` over the version read (`None`: create); returns the new version.
    async fn save(
        &self,
        state: &RolloutState,
        version: Option<&str>,
    ) -> Result<Option<String>, RolloutError> {
        let json = serde_json::to_string(state).map_err(RolloutError::Damaged)?;
        let mut cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": STATE_CONFIGMAP, "namespace": self.namespace},
            "data": {STATE_KEY: json},
        }))
        .map_err(RolloutError::Damaged)?;
        let res = match version {
            None => self.configmaps().create(&PostParams::default(), &cm).await,
            Some(v) => {
                cm.metadata.resource_version = Some(v.to_string());
                self.configmaps()
                    .replace(STATE_CONFIGMAP, &PostParams::default(), &cm)
                    .await
            }
        };
        match res {
            Ok(cm) => Ok(cm.metadata.resource_version),
            Err(kube::Error::Api(e)) if e.code == 409 => Err(RolloutError::Conflict),
            Err(e) => Err(RolloutError::SaveState(e)),
        }
    }

    fn say(&mut self, line: &str) {
        // Progress output is best effort (a closed stdout must not stop the rollout).
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    /// Runs `action` to its end.
    pub async fn run(&mut self, action: Action) -> Result<Ended, RolloutError> {
        let stored = self.load().await?;
        let mut watch = None;
        let (mut state, mut version) = match (action, stored) {
            (
                Action::Start {
                    target,
                    selector,
                    max_parallel,
                },
                stored,
            ) => {
                UpgradeRequest::parse(&target).map_err(RolloutError::BadTarget)?;
                if let Some((s, _)) = &stored
                    && s.outcome == Outcome::Running
                {
                    return Err(RolloutError::InProgress(s.target.clone()));
                }
                let w = NodeWatch::start(self.client.clone(), selector.as_deref())
                    .await
                    .map_err(RolloutError::ListNodes)?;
                let nodes: Vec<String> = w.progress(&target).into_keys().collect();
                watch = Some(w);
                if nodes.is_empty() {
                    return Err(RolloutError::NoNodes);
                }
                let state = RolloutState::new(&target, selector, max_parallel, nodes);
                let version = self
                    .save(&state, stored.as_ref().and_then(|(_, v)| v.as_deref()))
                    .await?;
                self.say(&format!(
                    "rollout of {} to {} nodes, {} at a time",
                    state.target,
                    state.nodes.len(),
                    state.max_parallel
                ));
                (state, version)
            }
            (_, None) => return Err(RolloutError::NoRollout),
            (Action::Status, Some((state, _))) => {
                let seen = NodeWatch::start(self.client.clone(), state.selector.as_deref())
                    .await
                    .map_err(RolloutError::ListNodes)?
                    .progress(&state.target);
                self.print_status(&state, &seen);
                return Ok(match state.step(&seen) {
                    Step::Succeeded => Ended::Succeeded,
                    Step::Failed { node, reason } => Ended::Failed { node, reason },
                    Step::Paused => Ended::Paused,
                    Step::Annotate(_) | Step::Wait => Ended::Running,
                });
            }
            (Action::Pause, Some((mut state, version))) => {
                state.paused = true;
                self.save(&state, version.as_deref()).await?;
                self.say(&format!(
                    "rollout of {} paused: the batch in flight finishes, no new one starts",
                    state.target
                ));
                return Ok(Ended::Paused);
            }
            (Action::Resume, Some((mut state, mut version))) => {
                if state.paused {
                    state.paused = false;
                    version = self.save(&state, version.as_deref()).await?;
                }
                if state.outcome == Outcome::Running {
                    self.say(&format!("rollout of {} resumed", state.target));
                }
                (state, version)
            }
        };
        let mut nodes = match watch {
            Some(w) => w,
            None => NodeWatch::start(self.client.clone(), state.selector.as_deref())
                .await
                .map_err(RolloutError::ListNodes)?,
        };
        let mut last_line = String::new();
        let mut loaded = tokio::time::Instant::now();
        loop {
            let seen = nodes.progress(&state.target);
            let line = format!("{}: {}", state.target, state.progress(&seen));
            if line != last_line {
                self.say(&line);
                last_line = line;
            }
            match state.step(&seen) {
                Step::Wait => {}
                Step::Annotate(batch) => {
                    for n in &batch {
                        let patch = json!({"metadata": {"annotations": {UPGRADE_ANNOTATION: state.target}}});
                        Api::<Node>::all(self.client.clone())
                            .patch(n, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                            .map_err(|e| RolloutError::Annotate(n.clone(), e))?;
                    }
                    state.annotated += batch.len();
                    version = self.save(&state, version.as_deref()).await?;
                    self.say(&format!("{}: started {}", state.target, batch.join(", ")));
                }
                Step::Paused => {
                    self.say(&format!("{}: paused (resume with --resume)", state.target));
                    return Ok(Ended::Paused);
                }
                Step::Succeeded => {
                    state.outcome = Outcome::Succeeded;
                    self.save(&state, version.as_deref()).await?;
                    self.say(&format!("{}: succeeded on every node", state.target));
                    return Ok(Ended::Succeeded);
                }
                Step::Failed { node, reason } => {
                    state.outcome = Outcome::Failed {
                        node: node.clone(),
                        reason: reason.clone(),
                    };
                    self.save(&state, version.as_deref()).await?;
                    self.say(&format!(
                        "{}: stopped: node {node} failed: {reason}",
                        state.target
                    ));
                    return Ok(Ended::Failed { node, reason });
                }
            }
            nodes
                .follow(self.poll)
                .await
                .map_err(RolloutError::ListNodes)?;
            if loaded.elapsed() < self.poll {
                continue;
            }
            loaded = tokio::time::Instant::now();
            // Another command may have paused it: take its word (and its version).
            if let Some((stored, v)) = self.load().await? {
                if stored.target != state.target || stored.annotated != state.annotated {
                    return Err(RolloutError::Conflict);
                }
                state.paused = stored.paused;
                version = v;
            }
        }
    }

    fn print_status(&mut self, state: &RolloutState, seen: &BTreeMap<String, NodeProgress>) {
        let outcome = match (&state.outcome, state.paused) {
            (Outcome::Running, true) => "paused".to_string(),
            (Outcome::Running, false) => "running".to_string(),
            (Outcome::Succeeded, _) => "succeeded".to_string(),
            (Outcome::Failed { node, reason }, _) => format!("failed on {node}: {reason}"),
        };
        self.say(&format!(
            "rollout of {} ({} at a time): {outcome}; {}",
            state.target,
            state.max_parallel,
            state.progress(seen)
        ));
        for (i, n) in state.nodes.iter().enumerate() {
            let p = match (i < state.annotated, seen.get(n)) {
                (false, _) => "not started".to_string(),
                (true, Some(NodeProgress::Done)) => "upgraded".to_string(),
                (true, Some(NodeProgress::Failed(r))) => format!("failed: {r}"),
                (true, _) => "running".to_string(),
            };
            self.say(&format!("  {n}: {p}"));
        }
    }
}
