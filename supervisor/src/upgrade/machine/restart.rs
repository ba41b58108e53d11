//! Restarting a client when the one that should serve died: from the state the old
//! client handed over when it died after the commit (or the frozen old client died
//! before it) — the previous binary, the same session, the same state, RESEND, serve —
//! or, after a crash, from no state at all: the serving binary, the same session (its
//! locks and open-but-unlinked files), the saved INIT, RESEND, serve; the successor
//! rebuilds handles from their numbers. A failed attempt is killed and retried with
//! backoff, without end: the mount stays, and requests wait in the kernel.

use handover_proto::message::{ToSupervisor, capability};

use std::sync::Arc;

use super::{
    Input, Machine, Phase, Probation, Requested, Restart, RestartStep, Snapshot, Upgrade, short,
};
use crate::upgrade::negotiate;
use crate::upgrade::types::{
    ClientInfo, Outcome, RequestRefused, RestartView, Timestamp, UpgradeRequest,
};
use handover_proto::control::UpgradeReport;

impl Machine {
    /// The client that should serve is gone, and the old one too: start another client of
    /// the old binary, from the saved state when there is a whole one.
    pub(super) fn restart(&mut self, now: Timestamp, up: Box<Upgrade>, reason: String) -> Phase {
        let snapshot = up.snapshot.clone();
        if snapshot.is_none() {
            self.stats.last_crash = Some(reason.clone());
        }
        let base = up.old.clone();
        self.start_restart(now, reason, snapshot, base, 0, Some(up))
    }

    /// The serving client died outside an upgrade and outside a probation: start the
    /// serving binary again, without a state.
    pub(super) fn crash_restart(&mut self, now: Timestamp, reason: String) -> Phase {
        self.stats.last_crash = Some(reason.clone());
        let base = self.serving.clone();
        self.start_restart(now, reason, None, base, 0, None)
    }

    /// `baton upgrade` while restarting: the next attempt runs the requested binary (an
    /// attempt of the previous one under way is killed); answered when it serves.
    pub(super) fn request_while_restarting(
        &mut self,
        now: Timestamp,
        req: UpgradeRequest,
    ) -> Result<(), RequestRefused> {
        let phase = std::mem::replace(&mut self.phase, super::Phase::Ended);
        let super::Phase::Restarting(mut r) = phase else {
            self.phase = phase;
            return Err(RequestRefused::InProgress);
        };
        let busy = r.report.is_some()
            || r.requested.is_some()
            || matches!(r.step, RestartStep::Confirming { .. });
        if busy {
            let reason = r.reason.clone();
            self.phase = super::Phase::Restarting(r);
            return Err(RequestRefused::Restarting { reason });
        }
        let binary = req.binary.unwrap_or_else(|| r.base.binary.clone());
        tracing::info!(binary = %binary.display(), attempts = r.attempts, "upgrade during restarts: the next attempt runs the requested binary");
        r.requested = Some(Requested {
            started: now,
            old: self.serving.clone(),
            previous: r.base.clone(),
        });
        r.base.binary = binary;
        r.base.spec = req.options.apply(&r.base.spec);
        r.attempts = 0;
        let waiting = match std::mem::replace(
            &mut r.step,
            RestartStep::Backoff {
                until: now,
                waiting: None,
            },
        ) {
            RestartStep::Backoff { waiting, .. } => waiting,
            step => step.attempt().filter(|g| self.alive.contains(g)),
        };
        if let Some(g) = waiting {
            self.kill(g);
        }
        r.step = RestartStep::Backoff {
            until: now,
            waiting,
        };
        self.phase = self.restart_progress(now, r);
        Ok(())
    }

    /// The restart in progress, if any, for status.
    pub fn restart_view(&self) -> Option<RestartView> {
        let super::Phase::Restarting(r) = &self.phase else {
            return None;
        };
        let next_attempt = match &r.step {
            RestartStep::Backoff { until, .. } => Some(*until),
            _ => None,
        };
        Some(RestartView {
            reason: r.reason.clone(),
            attempts: r.attempts,
            last_failure: r.last_failure.clone(),
            next_attempt,
            binary: r.base.binary.clone(),
            with_state: r.snapshot.is_some(),
        })
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
        snapshot: Option<Arc<Snapshot>>,
        base: ClientInfo,
        attempts: u32,
        report: Option<Box<Upgrade>>,
    ) -> Phase {
        if snapshot.is_some() {
            tracing::warn!(%reason, binary = %base.binary.display(), "restarting the previous client binary from the handed-over state");
        } else {
            tracing::warn!(%reason, binary = %base.binary.display(), attempts, "restarting the client without a state (handles are rebuilt from their numbers)");
        }
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
            since: now,
            requested: None,
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
        if r.attempts >= self.timings.report_after_attempts {
            if let Some(req) = r.requested.take() {
                self.give_up_request(&mut r, req, &why);
            }
        }
        let backoff = self.backoff(r.attempts);
        r.step = RestartStep::Backoff {
            until: now + backoff,
            waiting,
        };
        Phase::Restarting(r)
    }

    /// The binary a `baton upgrade` asked for during the restarts cannot serve: answer it,
    /// and go back to the binary the restarts ran before.
    fn give_up_request(&mut self, r: &mut Restart, req: Requested, why: &str) {
        let message = format!(
            "{} attempts to start {} failed (last: {why}); restarts go on with {}: see `baton status`",
            r.attempts,
            r.base.binary.display(),
            req.previous.binary.display()
        );
        tracing::warn!(%message, "upgrade during restarts: giving up the requested binary");
        r.base = req.previous;
        self.report(Outcome::Failed { message });
    }

    fn restart_done(
        &mut self,
        now: Timestamp,
        r: Box<Restart>,
        info: ClientInfo,
        pause_end: Timestamp,
        answered: bool,
    ) -> Phase {
        tracing::info!(generation = %info.generation, "restart: the client serves");
        // A death outside an upgrade: its pause is a crash pause.
        if r.report.is_none() {
            let pause = pause_end.saturating_since(r.since);
            tracing::info!(
                pause_us = pause.as_micros() as u64,
                attempts = r.attempts,
                "crash recovered: the mount serves again"
            );
            self.stats.last_crash_pause = Some(pause);
        }
        if let Some(req) = r.requested {
            let report = UpgradeReport {
                old_generation: req.old.generation,
                old_version: req.old.version.clone(),
                new_generation: info.generation,
                new_version: info.version.clone(),
                mode: None,
                pause_us: super::micros(pause_end.saturating_since(r.since)),
                handed_over_requests: 0,
                total_us: super::micros(now.saturating_since(req.started)),
                reason: None,
            };
            self.stats.upgrades += 1;
            self.report(Outcome::Upgraded(report));
        }
        if let Some(up) = r.report {
            let reason = format!(
                "{}; generation {} of the previous binary serves {}",
                r.reason,
                info.generation,
                if r.snapshot.is_some() {
                    "from the handed-over state"
                } else {
                    "(restarted without a state)"
                }
            );
            let report = Self::upgrade_report(&up, now, &info, pause_end, Some(reason.clone()));
            self.stats.rollbacks += 1;
            self.stats.last_pause = Some(std::time::Duration::from_micros(report.pause_us));
            self.stats.last_rollback = Some(reason);
            self.report(Outcome::RolledBack(report));
        }
        // A client restarted after a crash that answered a request is healthy: if it
        // dies later (killed from outside, a rare bug), its successor starts at once.
        // One that died before it answered anything counts towards the crash loop.
        let attempts = if answered && r.snapshot.is_none() {
            0
        } else {
            r.attempts
        };
        self.probation = Some(Probation {
            snapshot: r.snapshot,
            base: r.base,
            until: now + self.timings.probation,
            attempts,
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
                if !takeover {
                    let why = format!(
                        "the client cannot take over a connection (it announces {hello:?})"
                    );
                    return self.attempt_failed(now, r, why);
                }
                if let Some(v) = r
                    .snapshot
                    .as_ref()
                    .map(|s| s.version)
                    .filter(|v| !hello.state_versions.contains(v))
                {
                    // The binary on disk is not the one that exported the state (replaced
                    // since, or a successor's version was negotiated): it would refuse that
                    // state on every attempt. A client restarts without a state after any
                    // crash (handles are rebuilt from their numbers), so this one does too.
                    tracing::warn!(
                        state_version = v,
                        ?hello,
                        "the restarted client cannot take over the handed-over state: restarting it without one"
                    );
                    r.snapshot = None;
                }
                if session != r.base.session {
                    let why = format!(
                        "the client opened session {session}, not {}",
                        r.base.session
                    );
                    return self.attempt_failed(now, r, why);
                }
                match r.snapshot.clone() {
                    Some(snapshot) => self.send_state_and_init(attempt_gen, &snapshot),
                    None => self.send_init(attempt_gen),
                }
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
                        self.resend_and_serve(&info, self.resend());
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
                self.restart_done(now, r, info, t, true)
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
                // A binary that cannot be started will not start on the next attempt.
                if let Some(req) = r.requested.take() {
                    self.give_up_request(&mut r, req, &why);
                }
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
            ) if now >= until => self.restart_done(now, r, info, serve_at, false),
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
