//! The upgrade itself: new client prepared, pre-flush, freeze and state transfer, INIT
//! check, commit, serve; and the rollback of everything before the commit.

use std::sync::Arc;

use handover_proto::message::{FreezeMode, ToClient, ToSupervisor};
use handover_proto::state::Assembler;

use super::{
    BaseTransfer, Input, Machine, Phase, Probation, Rollback, Snapshot, Step, Upgrade, short,
};
use crate::upgrade::negotiate::{self, Agreement};
use crate::upgrade::types::{ClientInfo, ExitInfo, Outcome, Timestamp};

impl Machine {
    pub(super) fn on_upgrading(
        &mut self,
        now: Timestamp,
        mut up: Box<Upgrade>,
        input: Input,
    ) -> Phase {
        let (old, new) = (up.old.generation, up.new_gen);
        match input {
            Input::Message(g, msg) if g == old => self.old_message(now, up, msg),
            Input::Message(g, msg) if g == new => self.new_message(now, up, msg),
            Input::Message(g, msg) => {
                tracing::debug!(generation = %g, message = %short(&msg), "ignoring a message from a retiring client");
                Phase::Upgrading(up)
            }
            Input::Exit(g, exit) if g == old => self.old_exited(now, up, exit),
            Input::Exit(g, exit) if g == new => {
                up.new_alive = false;
                up.new_fate = Some(format!(
                    "the new client (generation {new}) exited ({exit}) {}",
                    if up.step.before_commit() {
                        "before it was ready"
                    } else {
                        "after the commit"
                    }
                ));
                self.new_gone(now, up)
            }
            Input::SpawnFailed(g, error) if g == new => {
                up.new_alive = false;
                let reason = format!(
                    "cannot start the new client {}: {error}",
                    up.new_binary.display()
                );
                up.new_fate = Some(reason.clone());
                self.rollback(now, up, reason)
            }
            Input::SendFailed(g, error) if g == new => {
                self.new_failed(now, up, format!("cannot talk to the new client: {error}"))
            }
            Input::SendFailed(g, error) if g == old && up.step.before_commit() => {
                self.rollback(now, up, format!("cannot talk to the old client: {error}"))
            }
            Input::Timeout => match up.step {
                Step::Confirming { serve_at, until } if now >= until => {
                    self.upgraded(now, up, serve_at)
                }
                ref s if s.before_commit() && now >= up.deadline => {
                    let reason = format!(
                        "timed out after {:?} waiting for {}",
                        up.timeout,
                        up.step.name()
                    );
                    self.new_failed(now, up, reason)
                }
                _ => Phase::Upgrading(up),
            },
            Input::Cancel(reason) if up.step.before_commit() => self.rollback(now, up, reason),
            Input::Exit(..) | Input::SpawnFailed(..) | Input::SendFailed(..) | Input::Cancel(_) => {
                Phase::Upgrading(up)
            }
        }
    }

    fn old_message(&mut self, now: Timestamp, mut up: Box<Upgrade>, msg: ToSupervisor) -> Phase {
        let step = std::mem::replace(&mut up.step, Step::Preparing);
        match (step, msg) {
            (_, ToSupervisor::SessionEnded { error }) => self.ended(error, true),
            (Step::PreFlushing(a), ToSupervisor::State(chunk)) if up.base.is_some() => {
                let forwarded = chunk.clone();
                let Some(base) = up.base.as_mut() else {
                    unreachable!("checked by the guard")
                };
                match base.asm.push(chunk) {
                    Ok(Some(bytes)) => {
                        tracing::info!(
                            bytes = bytes.len(),
                            "upgrade: base state exported; the new client stages it"
                        );
                        base.bytes = Some(Arc::new(bytes));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        up.step = Step::PreFlushing(a);
                        return self.rollback(
                            now,
                            up,
                            format!("the old client sent a malformed base state: {e}"),
                        );
                    }
                }
                if up.new_alive {
                    self.send(up.new_gen, ToClient::BaseState(forwarded));
                }
                up.step = Step::PreFlushing(a);
                Phase::Upgrading(up)
            }
            (Step::PreFlushing(a), ToSupervisor::PreFlushed { error: None }) => {
                match up.base.as_ref().map(|b| (b.bytes.is_some(), b.staged)) {
                    None | Some((true, true)) => self.freeze(now, up, a),
                    Some((true, false)) => {
                        up.step = Step::Staging(a);
                        Phase::Upgrading(up)
                    }
                    Some((false, _)) => {
                        up.step = Step::PreFlushing(a);
                        self.rollback(
                            now,
                            up,
                            "the old client pre-exported without sending its whole base state"
                                .into(),
                        )
                    }
                }
            }
            (Step::PreFlushing(a), ToSupervisor::PreFlushed { error: Some(e) }) => {
                up.step = Step::PreFlushing(a);
                self.rollback(
                    now,
                    up,
                    format!("the old client could not flush before the freeze: {e}"),
                )
            }
            (Step::Freezing(a, mut asm), ToSupervisor::State(chunk)) => {
                let forwarded = chunk.clone();
                match asm.push(chunk) {
                    Ok(Some(bytes)) => {
                        up.snapshot = Some(Arc::new(Snapshot {
                            version: a.state_version,
                            bytes,
                            base: up.base.as_ref().and_then(|b| b.bytes.clone()),
                        }));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        up.step = Step::Freezing(a, asm);
                        return self.rollback(
                            now,
                            up,
                            format!("the old client sent a malformed state: {e}"),
                        );
                    }
                }
                if up.new_alive {
                    self.send(up.new_gen, ToClient::State(forwarded));
                }
                up.step = Step::Freezing(a, asm);
                Phase::Upgrading(up)
            }
            (Step::Freezing(a, asm), ToSupervisor::Frozen { parked, drained }) => {
                up.handed_over = parked.saturating_add(drained);
                if up.snapshot.is_none() {
                    up.step = Step::Freezing(a, asm);
                    return self.rollback(
                        now,
                        up,
                        "the old client froze without sending its whole state".into(),
                    );
                }
                tracing::info!(
                    parked,
                    drained,
                    "upgrade: old client frozen; new client imports"
                );
                self.send_init(up.new_gen);
                up.step = Step::Importing;
                Phase::Upgrading(up)
            }
            (Step::Freezing(a, asm), ToSupervisor::FreezeFailed { reason }) => {
                up.step = Step::Freezing(a, asm);
                self.rollback(
                    now,
                    up,
                    format!("the old client could not freeze: {reason}"),
                )
            }
            (step, ToSupervisor::Failed { reason }) if step.before_commit() => {
                up.step = step;
                self.rollback(now, up, format!("the old client failed: {reason}"))
            }
            (
                step,
                msg @ (ToSupervisor::Prepared { .. }
                | ToSupervisor::Failed { .. }
                | ToSupervisor::InitReply { .. }
                | ToSupervisor::ShutdownDone { .. }
                | ToSupervisor::PreFlushed { .. }
                | ToSupervisor::State(_)
                | ToSupervisor::Frozen { .. }
                | ToSupervisor::FreezeFailed { .. }
                | ToSupervisor::Thawed
                | ToSupervisor::FirstServed { .. }
                | ToSupervisor::Adopted(_)
                | ToSupervisor::RequestLog { .. }
                | ToSupervisor::BaseStaged { .. }),
            ) => {
                tracing::warn!(message = %short(&msg), waiting_for = step.name(), "ignoring an unexpected message from the old client");
                up.step = step;
                Phase::Upgrading(up)
            }
        }
    }

    /// `Freeze` to the old client.
    fn freeze(&mut self, now: Timestamp, mut up: Box<Upgrade>, a: Agreement) -> Phase {
        self.send(
            up.old.generation,
            ToClient::Freeze {
                mode: a.mode,
                state_version: a.state_version,
            },
        );
        up.freeze_at = Some(now);
        tracing::info!(mode = ?a.mode, state_version = a.state_version, delta = a.delta, "upgrade: freezing the old client");
        up.step = Step::Freezing(a, Assembler::default());
        Phase::Upgrading(up)
    }

    fn new_message(&mut self, now: Timestamp, mut up: Box<Upgrade>, msg: ToSupervisor) -> Phase {
        let step = std::mem::replace(&mut up.step, Step::Preparing);
        let base_whole = up
            .base
            .as_ref()
            .is_some_and(|b| b.bytes.is_some() && !b.staged);
        match (step, msg) {
            (Step::PreFlushing(a), ToSupervisor::BaseStaged { error: None }) if base_whole => {
                if let Some(b) = up.base.as_mut() {
                    b.staged = true;
                }
                up.step = Step::PreFlushing(a);
                Phase::Upgrading(up)
            }
            (Step::Staging(a), ToSupervisor::BaseStaged { error: None }) if base_whole => {
                if let Some(b) = up.base.as_mut() {
                    b.staged = true;
                }
                tracing::info!("upgrade: the new client staged the base state");
                self.freeze(now, up, a)
            }
            (step, ToSupervisor::BaseStaged { error: Some(e) }) if step.before_commit() => {
                up.step = step;
                self.new_failed(
                    now,
                    up,
                    format!("the new client cannot take over the base state: {e}"),
                )
            }
            (
                Step::Preparing,
                ToSupervisor::Prepared {
                    version,
                    hello,
                    session,
                    ..
                },
            ) => {
                if session != up.old.session {
                    let reason = format!(
                        "the new client opened metadata session {session}, not the mount's {}",
                        up.old.session
                    );
                    return self.rollback(now, up, reason);
                }
                let agreement = match negotiate::negotiate(
                    &up.old.hello,
                    &hello,
                    self.resend(),
                    up.force_drain,
                    self.request_log,
                ) {
                    Ok(a) => a,
                    Err(e) => return self.rollback(now, up, e.to_string()),
                };
                tracing::info!(%version, mode = ?agreement.mode, state_version = agreement.state_version, "upgrade: new client prepared; pre-flushing the old one");
                up.new = Some(ClientInfo {
                    generation: up.new_gen,
                    binary: up.new_binary.clone(),
                    version,
                    hello,
                    session,
                    spec: up.new_spec.clone(),
                });
                up.mode = Some(agreement.mode);
                if agreement.delta {
                    self.send(
                        up.old.generation,
                        ToClient::PreExport {
                            state_version: agreement.state_version,
                        },
                    );
                    up.base = Some(BaseTransfer::default());
                } else {
                    self.send(up.old.generation, ToClient::PreFlush);
                }
                up.step = Step::PreFlushing(agreement);
                Phase::Upgrading(up)
            }
            (Step::Importing, ToSupervisor::InitReply { reply }) => {
                match negotiate::compare_init_reply(&self.init_reply, &reply, self.init_unique) {
                    Ok(()) => self.commit(now, up),
                    Err(diff) => {
                        up.step = Step::Importing;
                        self.new_failed(now, up, format!("INIT parameters mismatch: {diff}"))
                    }
                }
            }
            (Step::Confirming { serve_at, .. }, ToSupervisor::FirstServed { monotonic_ns }) => {
                // Same clock, same host: a first request cannot be answered before
                // `Serve` nor after now; clamp what would say otherwise.
                let t = Timestamp(monotonic_ns).clamp(serve_at, now.max(serve_at));
                self.upgraded(now, up, t)
            }
            (step, ToSupervisor::SessionEnded { error }) if self.readers.contains(&up.new_gen) => {
                up.step = step;
                self.ended(error, true)
            }
            (step, ToSupervisor::Failed { reason }) => {
                up.step = step;
                let reason = if up.step.before_commit() {
                    format!("the new client failed: {reason}")
                } else {
                    format!("the new client failed after the commit: {reason}")
                };
                self.new_failed(now, up, reason)
            }
            (step, msg) if !step.before_commit() => {
                tracing::debug!(message = %short(&msg), "ignoring a message from the new client");
                up.step = step;
                Phase::Upgrading(up)
            }
            (
                step,
                msg @ (ToSupervisor::Prepared { .. }
                | ToSupervisor::InitReply { .. }
                | ToSupervisor::ShutdownDone { .. }
                | ToSupervisor::SessionEnded { .. }
                | ToSupervisor::PreFlushed { .. }
                | ToSupervisor::State(_)
                | ToSupervisor::Frozen { .. }
                | ToSupervisor::FreezeFailed { .. }
                | ToSupervisor::Thawed
                | ToSupervisor::FirstServed { .. }
                | ToSupervisor::Adopted(_)
                | ToSupervisor::RequestLog { .. }
                | ToSupervisor::BaseStaged { .. }),
            ) => {
                let reason = format!(
                    "protocol error: the new client sent {} while the supervisor waited for {}",
                    short(&msg),
                    step.name()
                );
                up.step = step;
                self.new_failed(now, up, reason)
            }
        }
    }

    /// The new client cannot go on: before the commit, roll back; after it, kill it and
    /// restart from the state once it is gone.
    pub(super) fn new_failed(
        &mut self,
        now: Timestamp,
        mut up: Box<Upgrade>,
        reason: String,
    ) -> Phase {
        if up.step.before_commit() {
            if up.old_alive {
                return self.rollback(now, up, reason);
            }
            // The frozen old client died after handing over its whole state: there is
            // nothing to roll back to, but everything to restart from.
            self.kill(up.new_gen);
            return self.restart(now, up, reason);
        }
        up.new_fate = Some(reason);
        self.kill(up.new_gen);
        Phase::Upgrading(up)
    }

    /// The new client exited.
    fn new_gone(&mut self, now: Timestamp, up: Box<Upgrade>) -> Phase {
        let fate = up.new_fate.clone().unwrap_or_default();
        match up.step {
            Step::Committing => self.after_commit(now, up),
            Step::Confirming { .. } => self.restart(now, up, fate),
            Step::Preparing
            | Step::PreFlushing(_)
            | Step::Staging(_)
            | Step::Freezing(..)
            | Step::Importing => self.new_failed(now, up, fate),
        }
    }

    fn old_exited(&mut self, now: Timestamp, mut up: Box<Upgrade>, exit: ExitInfo) -> Phase {
        up.old_alive = false;
        let old = up.old.generation;
        match up.step {
            Step::Committing => self.after_commit(now, up),
            Step::Confirming { .. } => Phase::Upgrading(up),
            Step::Importing => {
                tracing::warn!(%exit, "the frozen old client exited before the commit; going on with its state");
                Phase::Upgrading(up)
            }
            Step::Freezing(..) if up.snapshot.is_some() && up.new_alive => {
                tracing::warn!(%exit, "the old client exited after exporting its state; going on with it");
                self.send_init(up.new_gen);
                up.step = Step::Importing;
                Phase::Upgrading(up)
            }
            Step::Preparing | Step::PreFlushing(_) | Step::Staging(_) | Step::Freezing(..) => {
                self.shut_down(now, up.new_gen);
                let reason = format!(
                    "the client (generation {old}) exited unexpectedly ({exit}) during an upgrade, before it handed over its state"
                );
                self.restart(now, up, reason)
            }
        }
    }

    /// Both sides agreed: the old client exits (without unmounting), the new one waits.
    fn commit(&mut self, now: Timestamp, mut up: Box<Upgrade>) -> Phase {
        let old = up.old.generation;
        if up.old_alive {
            tracing::info!(%old, "upgrade: committed; the old client exits");
            self.send(old, ToClient::Commit);
            self.retiring
                .insert(old, Some(now + self.timings.exit_grace));
        } else {
            tracing::info!(%old, "upgrade: committed (the old client is already gone)");
        }
        up.step = Step::Committing;
        self.after_commit(now, up)
    }

    /// Committing: once the old client is reaped, resend and serve (or restart, if the new
    /// one died meanwhile).
    fn after_commit(&mut self, now: Timestamp, mut up: Box<Upgrade>) -> Phase {
        if up.old_alive {
            return Phase::Upgrading(up);
        }
        if !up.new_alive {
            let fate = up.new_fate.clone().unwrap_or_default();
            return self.restart(now, up, fate);
        }
        let Some(info) = up.new.clone() else {
            // Unreachable: the commit needs the new client's Prepared. Keep the mount.
            return self.restart(now, up, "the new client was never prepared".into());
        };
        let resend = up.mode == Some(FreezeMode::Resend);
        tracing::info!(generation = %info.generation, resend, "upgrade: old client reaped; the new client serves");
        self.resend_and_serve(&info, resend);
        up.step = Step::Confirming {
            serve_at: now,
            until: now + self.timings.confirm_window,
        };
        Phase::Upgrading(up)
    }

    fn upgraded(&mut self, now: Timestamp, up: Box<Upgrade>, pause_end: Timestamp) -> Phase {
        let serving = self.serving.clone();
        let report = Self::upgrade_report(&up, now, &serving, pause_end, None);
        tracing::info!(
            generation = %serving.generation, version = %serving.version,
            pause_us = report.pause_us, total_us = report.total_us, "upgrade: done"
        );
        self.stats.upgrades += 1;
        self.stats.last_pause = Some(std::time::Duration::from_micros(report.pause_us));
        self.report(Outcome::Upgraded(report));
        if let Some(snapshot) = up.snapshot.clone() {
            self.probation = Some(Probation {
                snapshot: Some(snapshot),
                base: up.old.clone(),
                until: now + self.timings.probation,
                attempts: 0,
            });
        }
        Phase::Idle
    }

    pub(super) fn rollback(
        &mut self,
        now: Timestamp,
        mut up: Box<Upgrade>,
        reason: String,
    ) -> Phase {
        tracing::warn!(%reason, "upgrade: rolling back");
        let assembling = match std::mem::replace(&mut up.step, Step::Preparing) {
            Step::Freezing(a, asm) if up.snapshot.is_none() => Some((a.state_version, asm)),
            _ => None,
        };
        self.shut_down(now, up.new_gen);
        if !up.old_alive {
            return self.restart(now, up, reason);
        }
        if up.freeze_at.is_none() {
            if up.base.is_some() {
                // It serves, with a base out that recorded changes: a thaw drops it. Its
                // `Thawed` needs no waiting for.
                self.send(up.old.generation, ToClient::Thaw);
            }
            return self.rolled_back(now, up, reason, now);
        }
        self.send(up.old.generation, ToClient::Thaw);
        Phase::RollingBack(Box::new(Rollback {
            up,
            reason,
            thaw_until: now + self.timings.thaw_timeout,
            assembling,
        }))
    }

    fn rolled_back(
        &mut self,
        now: Timestamp,
        up: Box<Upgrade>,
        reason: String,
        pause_end: Timestamp,
    ) -> Phase {
        let old = up.old.clone();
        let report = Self::upgrade_report(&up, now, &old, pause_end, Some(reason.clone()));
        tracing::info!(generation = %old.generation, %reason, "upgrade: rolled back; the old client serves");
        self.stats.rollbacks += 1;
        self.stats.last_pause = Some(std::time::Duration::from_micros(report.pause_us));
        self.stats.last_rollback = Some(reason);
        self.report(Outcome::RolledBack(report));
        Phase::Idle
    }

    pub(super) fn on_rolling_back(
        &mut self,
        now: Timestamp,
        mut rb: Box<Rollback>,
        input: Input,
    ) -> Phase {
        let old = rb.up.old.generation;
        match input {
            Input::Message(g, ToSupervisor::State(chunk)) if g == old => {
                if let Some((version, asm)) = &mut rb.assembling {
                    match asm.push(chunk) {
                        Ok(Some(bytes)) => {
                            rb.up.snapshot = Some(Arc::new(Snapshot {
                                version: *version,
                                bytes,
                                base: rb.up.base.as_ref().and_then(|b| b.bytes.clone()),
                            }));
                            rb.assembling = None;
                        }
                        Ok(None) => {}
                        Err(_) => rb.assembling = None,
                    }
                }
                Phase::RollingBack(rb)
            }
            Input::Message(g, ToSupervisor::Thawed) if g == old => {
                let Rollback { up, reason, .. } = *rb;
                self.rolled_back(now, up, reason, now)
            }
            Input::Message(g, ToSupervisor::SessionEnded { error }) if g == old => {
                self.ended(error, true)
            }
            Input::Message(g, msg) => {
                tracing::debug!(generation = %g, message = %short(&msg), "ignoring a message while rolling back");
                Phase::RollingBack(rb)
            }
            Input::Exit(g, exit) if g == old => {
                let Rollback { mut up, reason, .. } = *rb;
                up.old_alive = false;
                let reason = format!("{reason}; then the old client exited ({exit}) while thawing");
                self.restart(now, up, reason)
            }
            Input::Timeout if now >= rb.thaw_until => {
                let Rollback { up, reason, .. } = *rb;
                let reason = format!(
                    "{reason} (the old client did not confirm the thaw within {:?})",
                    self.timings.thaw_timeout
                );
                self.rolled_back(now, up, reason, now)
            }
            Input::Exit(..)
            | Input::SpawnFailed(..)
            | Input::SendFailed(..)
            | Input::Timeout
            | Input::Cancel(_) => Phase::RollingBack(rb),
        }
    }
}
