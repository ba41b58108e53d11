//! A rollout's state and its next step, pure: no API server, no clock. The state is kept
//! in the API server (ConfigMap `baton-rollout`, key `state`, JSON), so `--pause`,
//! `--resume` and `--status` work from any machine and survive the rollout command.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::upgrade::request::{Phase, UpgradeStatus};

/// How a rollout ended, or that it has not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Outcome {
    Running,
    Succeeded,
    /// Stopped at the first node whose upgrade did not succeed.
    Failed {
        node: String,
        reason: String,
    },
}

/// What is kept in the API server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The `baton.dev/upgrade` value set on each Node (`binary:<v>` or `pod:<image>`).
    pub target: String,
    pub selector: Option<String>,
    pub max_parallel: usize,
    pub paused: bool,
    /// Every node of the rollout, in the order they are upgraded (fixed at the start).
    pub nodes: Vec<String>,
    /// `nodes[..annotated]` carry the request.
    pub annotated: usize,
    pub outcome: Outcome,
}

/// Where one node is, from its `baton.dev/upgrade-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeProgress {
    /// No final answer to this rollout's request yet.
    Waiting,
    Done,
    Failed(String),
}

impl NodeProgress {
    /// The progress of node `node` towards `target`, from its status annotation (`None`
    /// if absent; a status about another request counts as no answer).
    pub fn of(node: &str, target: &str, status: Option<&UpgradeStatus>) -> NodeProgress {
        match status {
            Some(s) if s.request == target && s.source == format!("node/{node}") => match s.phase {
                Phase::Succeeded => NodeProgress::Done,
                Phase::Failed | Phase::RolledBack => NodeProgress::Failed(format!(
                    "{:?}: {}",
                    s.phase,
                    s.reason.as_deref().unwrap_or("")
                )),
                Phase::Pending | Phase::Running => NodeProgress::Waiting,
            },
            _ => NodeProgress::Waiting,
        }
    }
}

/// What the rollout command does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Put the request on these nodes (the next batch), then record `annotated += len`.
    Annotate(Vec<String>),
    /// A batch is in flight.
    Wait,
    Paused,
    Succeeded,
    Failed {
        node: String,
        reason: String,
    },
}

/// Counts for a progress line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub total: usize,
    pub done: usize,
    pub running: usize,
    pub failed: usize,
    pub waiting_to_start: usize,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} nodes upgraded, {} running, {} failed, {} not started",
            self.done, self.total, self.running, self.failed, self.waiting_to_start
        )
    }
}

impl RolloutState {
    pub fn new(
        target: &str,
        selector: Option<String>,
        max_parallel: usize,
        mut nodes: Vec<String>,
    ) -> RolloutState {
        nodes.sort();
        nodes.dedup();
        RolloutState {
            target: target.to_string(),
            selector,
            max_parallel: max_parallel.max(1),
            paused: false,
            nodes,
            annotated: 0,
            outcome: Outcome::Running,
        }
    }

    fn progress_of<'a>(
        &self,
        seen: &'a BTreeMap<String, NodeProgress>,
        node: &str,
    ) -> &'a NodeProgress {
        seen.get(node).unwrap_or(&NodeProgress::Waiting)
    }

    /// The next step, given what each node says.
    pub fn step(&self, seen: &BTreeMap<String, NodeProgress>) -> Step {
        match &self.outcome {
            Outcome::Succeeded => return Step::Succeeded,
            Outcome::Failed { node, reason } => {
                return Step::Failed {
                    node: node.clone(),
                    reason: reason.clone(),
                };
            }
            Outcome::Running => {}
        }
        let started = &self.nodes[..self.annotated.min(self.nodes.len())];
        // Stop on the first failure (in rollout order).
        for n in started {
            if let NodeProgress::Failed(reason) = self.progress_of(seen, n) {
                return Step::Failed {
                    node: n.clone(),
                    reason: reason.clone(),
                };
            }
        }
        if started
            .iter()
            .any(|n| *self.progress_of(seen, n) == NodeProgress::Waiting)
        {
            return Step::Wait;
        }
        if self.annotated >= self.nodes.len() {
            return Step::Succeeded;
        }
        if self.paused {
            return Step::Paused;
        }
        let end = (self.annotated + self.max_parallel).min(self.nodes.len());
        Step::Annotate(self.nodes[self.annotated..end].to_vec())
    }

    pub fn progress(&self, seen: &BTreeMap<String, NodeProgress>) -> Progress {
        let mut p = Progress {
            total: self.nodes.len(),
            ..Progress::default()
        };
        for (i, n) in self.nodes.iter().enumerate() {
            match (i < self.annotated, self.progress_of(seen, n)) {
                (false, _) => p.waiting_to_start += 1,
                (true, NodeProgress::Done) => p.done += 1,
                (true, NodeProgress::Failed(_)) => p.failed += 1,
                (true, NodeProgress::Waiting) => p.running += 1,
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(v: &[(&str, NodeProgress)]) -> BTreeMap<String, NodeProgress> {
        v.iter().map(|(n, p)| (n.to_string(), p.clone())).collect()
    }

    #[test]
    fn batches_of_max_parallel_one_after_the_other() {
        let mut s = RolloutState::new(
            "binary:2",
            None,
            2,
            vec!["c".into(), "a".into(), "b".into()],
        );
        assert_eq!(
            s.step(&seen(&[])),
            Step::Annotate(vec!["a".into(), "b".into()])
        );
        s.annotated = 2;
        let half = seen(&[("a", NodeProgress::Done), ("b", NodeProgress::Waiting)]);
        assert_eq!(s.step(&half), Step::Wait);
        assert_eq!(
            s.progress(&half).to_string(),
            "1/3 nodes upgraded, 1 running, 0 failed, 1 not started"
        );
        let both = seen(&[("a", NodeProgress::Done), ("b", NodeProgress::Done)]);
        assert_eq!(s.step(&both), Step::Annotate(vec!["c".into()]));
        s.annotated = 3;
        let all = seen(&[
            ("a", NodeProgress::Done),
            ("b", NodeProgress::Done),
            ("c", NodeProgress::Done),
        ]);
        assert_eq!(s.step(&all), Step::Succeeded);
    }

    #[test]
    fn the_first_failure_stops_the_rollout_and_pause_holds_the_next_batch() {
        let mut s = RolloutState::new("binary:2", None, 1, vec!["a".into(), "b".into()]);
        s.annotated = 1;
        let failed = seen(&[("a", NodeProgress::Failed("Failed: not on this node".into()))]);
        assert_eq!(
            s.step(&failed),
            Step::Failed {
                node: "a".into(),
                reason: "Failed: not on this node".into()
            }
        );
        s.paused = true;
        assert_eq!(s.step(&seen(&[("a", NodeProgress::Done)])), Step::Paused);
        s.paused = false;
        assert_eq!(
            s.step(&seen(&[("a", NodeProgress::Done)])),
            Step::Annotate(vec!["b".into()])
        );
        s.outcome = Outcome::Failed {
            node: "a".into(),
            reason: "x".into(),
        };
        assert!(matches!(s.step(&seen(&[])), Step::Failed { .. }));
    }

    #[test]
    fn only_a_final_answer_to_this_request_from_this_node_counts() {
        let mut st = UpgradeStatus::new(Phase::Succeeded, "binary:2", "node/a");
        assert_eq!(
            NodeProgress::of("a", "binary:2", Some(&st)),
            NodeProgress::Done
        );
        assert_eq!(
            NodeProgress::of("a", "binary:3", Some(&st)),
            NodeProgress::Waiting
        );
        assert_eq!(
            NodeProgress::of("b", "binary:2", Some(&st)),
            NodeProgress::Waiting
        );
        st.phase = Phase::Running;
        assert_eq!(
            NodeProgress::of("a", "binary:2", Some(&st)),
            NodeProgress::Waiting
        );
        st.phase = Phase::RolledBack;
        assert!(matches!(
            NodeProgress::of("a", "binary:2", Some(&st)),
            NodeProgress::Failed(_)
        ));
        assert_eq!(
            NodeProgress::of("a", "binary:2", None),
            NodeProgress::Waiting
        );
    }
}
