//! Restarting a client from the state the old client handed over, when the client that
//! should serve died after the commit (or the frozen old client died before it): the
//! previous binary, the same session, the same state, RESEND, serve. A failed attempt is
//! killed and retried with backoff, without end: the mount stays.

use handover_proto::message::{ToSupervisor, capability};

use std::sync::Arc;

use super::{Input, Machine, Phase, Probation, Restart, RestartStep, Snapshot, Upgrade, short};
use crate::upgrade::negotiate;
use crate::upgrade::types::{ClientInfo, Outcome, Timestamp};

impl Machine {
    /// The client that should serve is gone, and the old one too: start another client of
    /// the old binary from the saved state. Without a complete state, the mount is lost.
    pub(super) fn restart(&mut self, now: Timestamp, up: Box<Upgrade>, reason: String) -> Phase {
        let Some(snapshot) = up.snapshot.clone() else {
            return self.lost(reason, Some(&up));
        };
        let base = up.old.clone();
        self.start_restart(now, reason, snapshot, base, 0, Some(up))
    }

    /// The serving client died within its probation: start its predecessor's binary
    /// again from the state it was handed.
    pub(super) fn restart_on_probation(
        &mut self,
        now: Timestamp,
        p: Probation,
        reason: String,
    ) -> Phase {
        self.start_restart(now, reason, p.snapshot, p.base, p.attempts, None)
    }

    fn start_restart(
        &mut self,
        now: Timestamp,
        reason: String,
        snapshot: Arc<Snapshot>,
        base: ClientInfo,
        attempts: u32,
        report: Option<Box<Upgrade>>,
    ) -> Phase {
        tracing::warn!(%reason, binary = %base.binary.display(), "restarting the previous client binary from the handed-over state");
        self.probation = None;
        let r = Restart {
            reason,
            snapshot,
            base,
            attempts,
            last_failure: None,
            step: RestartStep::Backoff {
                until: now + self.backoff(attempts),
                waiting: None,
            },
            report,
        };
        self.restart_progress(now, Box::new(r))
    }

    /// Wait before the next restart after `attempts` failed ones: none after none, then
    /// doubling from the minimum up to the maximum.
    fn backoff(&self, attempts: u32) -> std::time::Duration {
        if attempts == 0 {
            return std::time::Duration::ZERO;
        }
        let shift = (attempts - 1).min(16);
        (self.timings.backoff_min * (1u32 << shift)).min(self.timings.backoff_max)
    }

    fn restart_progress(&mut self, now: Timestamp, mut r: Box<Restart>) -> Phase {
        if let RestartStep::Backoff {
            until,
            waiting: None,
        } = r.step
        {
            if now >= until {
                r.attempts += 1;
                self.stats.restarts += 1;
                let base = r.base.clone();
                let attempt_gen = self.spawn(&base.binary, &base.spec, base.session);
                tracing::info!(generation = %attempt_gen, attempt = r.attempts, "restart: starting a client");
                r.step = RestartStep::Preparing {
                    attempt_gen,
                    deadline: now + self.timings.restart_timeout,
                };
            }
        }
        Phase::Restarting(r)
    }

    fn attempt_failed(&mut self, now: Timestamp, mut r: Box<Restart>, why: String) -> Phase {
        let attempt_gen = r.step.attempt();
        tracing::warn!(generation = ?attempt_gen, attempt = r.attempts, %why, "restart attempt failed");
        let waiting = attempt_gen.filter(|g| self.alive.contains(g));
        if let Some(g) = waiting {
            self.kill(g);
        }
        r.last_failure = Some(why.clone());
        if r.attempts >= self.timings.report_after_attempts && r.report.take().is_some() {
            self.report(Outcome::Failed {
                message: format!(
                    "{}; {} restarts of the previous client failed (last: {why}); the mount is kept and restarts go on: see `baton status`",
                    r.reason, r.attempts
                ),
            });
        }
        let backoff = self.backoff(r.attempts);
        r.step = RestartStep::Backoff {
            until: now + backoff,
            waiting,
        };
        Phase::Restarting(r)
    }

    fn restart_done(
        &mut self,
        now: Timestamp,
        r: Box<Restart>,
        info: ClientInfo,
        pause_end: Timestamp,
    ) -> Phase {
        tracing::info!(generation = %info.generation, "restart: the client serves");
        if let Some(up) = r.report {
            let reason = format!(
                "{}; generation {} of the previous binary serves from the handed-over state",
                r.reason, info.generation
            );
            let report = Self::upgrade_report(&up, now, &info, pause_end, Some(reason.clone()));
            self.stats.rollbacks += 1;
            self.stats.last_pause = Some(std::time::Duration::from_micros(report.pause_us));
            self.stats.last_rollback = Some(reason);
            self.report(Outcome::RolledBack(report));
        }
        self.probation = Some(Probation {
            snapshot: r.snapshot,
            base: r.base,
            until: now + self.timings.probation,
            attempts: r.attempts,
        });
        Phase::Idle
    }

    pub(super) fn on_restarting(
        &mut self,
        now: Timestamp,
        mut r: Box<Restart>,
        input: Input,
    ) -> Phase {
        let attempt = r.step.attempt();
        let step = std::mem::replace(
            &mut r.step,
            RestartStep::Backoff {
                until: now,
                waiting: None,
            },
        );
        match (step, input) {
            (
                RestartStep::Preparing {
                    attempt_gen,
                    deadline,
                },
                Input::Message(
                    g,
                    ToSupervisor::Prepared {
                        version,
                        hello,
                        session,
                        ..
                    },
                ),
            ) if g == attempt_gen => {
                r.step = RestartStep::Preparing {
                    attempt_gen,
                    deadline,
                };
                let takeover = hello.capabilities.iter().any(|c| c == capability::TAKEOVER);
                if !takeover || !hello.state_versions.contains(&r.snapshot.version) {
                    let why = format!(
                        "the client cannot take over state version {} (it announces {hello:?})",
                        r.snapshot.version
                    );
                    return self.attempt_failed(now, r, why);
                }
                if session != r.base.session {
                    let why = format!(
                        "the client opened session {session}, not {}",
                        r.base.session
                    );
                    return self.attempt_failed(now, r, why);
                }
                let snapshot = r.snapshot.clone();
                self.send_state_and_init(attempt_gen, &snapshot);
                let info = ClientInfo {
                    generation: attempt_gen,
                    version,
                    hello,
                    session,
                    ..r.base.clone()
                };
                r.step = RestartStep::Importing { info, deadline };
                Phase::Restarting(r)
            }
            (
                RestartStep::Importing { info, deadline },
                Input::Message(g, ToSupervisor::InitReply { reply }),
            ) if g == info.generation => {
                match negotiate::compare_init_reply(&self.init_reply, &reply, self.init_unique) {
                    Ok(()) => {
                        self.resend_and_serve(&info, self.kernel_resend);
                        r.step = RestartStep::Confirming {
                            info,
                            serve_at: now,
                            until: now + self.timings.confirm_window,
                        };
                        Phase::Restarting(r)
                    }
                    Err(diff) => {
                        r.step = RestartStep::Importing { info, deadline };
                        self.attempt_failed(now, r, format!("INIT parameters mismatch: {diff}"))
                    }
                }
            }
            (
                RestartStep::Confirming { info, serve_at, .. },
                Input::Message(g, ToSupervisor::FirstServed { monotonic_ns }),
            ) if g == info.generation => {
                let t = Timestamp(monotonic_ns).clamp(serve_at, now.max(serve_at));
                self.restart_done(now, r, info, t)
            }
            (
                RestartStep::Confirming { .. },
                Input::Message(g, ToSupervisor::SessionEnded { error }),
            ) if Some(g) == attempt => self.ended(error, r.report.is_some()),
            (step, Input::Message(g, ToSupervisor::Failed { reason })) if Some(g) == attempt => {
                r.step = step;
                self.attempt_failed(now, r, format!("the client failed: {reason}"))
            }
            (step @ RestartStep::Confirming { .. }, Input::Message(g, msg))
                if Some(g) == attempt =>
            {
                tracing::debug!(message = %short(&msg), "ignoring a message from the restarted client");
                r.step = step;
                Phase::Restarting(r)
            }
            (step, Input::Message(g, msg)) if Some(g) == attempt => {
                r.step = step;
                self.attempt_failed(
                    now,
                    r,
                    format!("protocol error: the client sent {}", short(&msg)),
                )
            }
            (step, Input::Message(g, msg)) => {
                tracing::debug!(generation = %g, message = %short(&msg), "ignoring a message while restarting");
                r.step = step;
                Phase::Restarting(r)
            }
            (step, Input::Exit(g, exit)) if Some(g) == attempt => {
                r.step = step;
                self.attempt_failed(now, r, format!("the client exited ({exit})"))
            }
            (step, Input::SpawnFailed(g, error)) if Some(g) == attempt => {
                r.step = step;
                let why = format!("cannot start {}: {error}", r.base.binary.display());
                self.attempt_failed(now, r, why)
            }
            (RestartStep::Backoff { until, waiting }, Input::Exit(g, _)) if waiting == Some(g) => {
                r.step = RestartStep::Backoff {
                    until,
                    waiting: None,
                };
                self.restart_progress(now, r)
            }
            (step, Input::SendFailed(g, error)) if Some(g) == attempt => {
                r.step = step;
                self.attempt_failed(now, r, format!("cannot talk to the client: {error}"))
            }
            (
                RestartStep::Confirming {
                    info,
                    serve_at,
                    until,
                },
                Input::Timeout,
            ) if now >= until => self.restart_done(now, r, info, serve_at),
            (
                step @ (RestartStep::Preparing { .. } | RestartStep::Importing { .. }),
                Input::Timeout,
            ) if matches!(step, RestartStep::Preparing { deadline, .. } | RestartStep::Importing { deadline, .. } if now >= deadline) =>
            {
                r.step = step;
                let why = format!("no answer within {:?}", self.timings.restart_timeout);
                self.attempt_failed(now, r, why)
            }
            (step @ RestartStep::Backoff { .. }, Input::Timeout) => {
                r.step = step;
                self.restart_progress(now, r)
            }
            (
                step,
                Input::Exit(..)
                | Input::SpawnFailed(..)
                | Input::SendFailed(..)
                | Input::Timeout
                | Input::Cancel(_),
            ) => {
                r.step = step;
                Phase::Restarting(r)
            }
        }
    }
}
