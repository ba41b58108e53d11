//! The upgrade state machine: one live upgrade at a time, its rollback, and the restart of
//! a successor that dies after the commit. Sans-IO: no sockets, no clock, no processes.
//! Inputs are `handle_*(now, ...)`, outputs [`Machine::poll_action`] and
//! [`Machine::poll_timeout`]; [`super::driver`] is the only code that acts on them. Clients
//! are addressed by generation, which only grows.
//!
//! ```text
//!  Idle ──request──> Upgrading: Preparing ──Prepared(new); hello(old) ∩ hello(new)──>
//!     PreFlushing ──PreFlushed(old)──> Freezing ──State*(old, forwarded to new), Frozen──>
//!     Importing ──InitReply(new) == saved reply──> Committing ──old reaped──>
//!     [WriteResend] Serve(new) ──> Confirming ──FirstServed, or 200 ms──> Idle: Upgraded,
//!     the new client on probation (30 s) with the handed-over state kept
//!
//!  any failure before the commit ──> RollingBack: Shutdown(new), Thaw(old) ──Thawed──>
//!     Idle: RolledBack (no Thaw when nothing was frozen)
//!  new dies after the commit, or on probation; or the frozen old one dies and the new one
//!     fails ──> Restarting: the previous binary, same session, the kept state, Init,
//!     InitReply ──> [WriteResend] Serve ──> Confirming ──> Idle (RolledBack if an upgrade
//!     waits); a failed attempt is killed and retried with backoff, without end
//!  the serving client dies outside an upgrade (a crash), or the old one dies during an
//!     upgrade before its state is whole ──> Restarting without a state: the serving
//!     binary, same session, Init only (the successor rebuilds handles from their
//!     numbers) ──> [WriteResend] Serve ──> Idle, the successor on probation: if it dies
//!     within it, the next attempt waits longer (0, 100 ms, 200 ms ... 5 s). A `baton
//!     upgrade` during the restarts replaces the binary of the next attempt and is
//!     answered `Upgraded` once a client of it serves
//!  SessionEnded from a serving client ──> Ended
//! ```
//!
//! What must hold (property-tested in `tests.rs`): at most one generation is told to
//! serve at a time and none while another one that was told may still read; RESEND is
//! written only when no client reads (after the old one was reaped, before `Serve`);
//! generations only grow; every upgrade ends in exactly one report; nothing here can drop
//! the supervisor's /dev/fuse descriptor (no action does).

mod handover;
mod restart;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use handover_proto::control::UpgradeReport;
use handover_proto::fuse_init::InitRequest;
use handover_proto::message::{
    FreezeMode, Generation, MountSpec, ToClient, ToSupervisor, capability,
};
use handover_proto::state::{self, Assembler};

use super::negotiate::Agreement;
use super::types::{
    Action, ClientInfo, ExitInfo, Outcome, PhaseKind, RequestRefused, Stats, Timestamp, Timings,
    UpgradeRequest,
};

/// A client's complete exported state, kept until the successor serves (it is needed
/// again to restart a successor that dies after the commit).
#[derive(Debug)]
struct Snapshot {
    version: u16,
    /// The state, or (with `base`) the changes since the base.
    bytes: Vec<u8>,
    /// The base of a delta handover, exported before the freeze.
    base: Option<Arc<Vec<u8>>>,
}

impl Snapshot {
    /// The whole state: the base with the changes, merged (only for a restart).
    fn whole(&self) -> Result<std::borrow::Cow<'_, [u8]>, state::StateError> {
        match &self.base {
            None => Ok(std::borrow::Cow::Borrowed(&self.bytes)),
            Some(base) => {
                state::merge(self.version, base, &self.bytes).map(std::borrow::Cow::Owned)
            }
        }
    }
}

/// The base of a delta handover: the old client's state exported while it serves
/// (`PreExport`), forwarded to the new client as it comes.
#[derive(Debug, Default)]
struct BaseTransfer {
    asm: Assembler,
    /// The whole base, once its last chunk came.
    bytes: Option<Arc<Vec<u8>>>,
    /// The new client staged it (`BaseStaged` without an error).
    staged: bool,
}

/// A client that took over recently: if it dies before `until`, its predecessor's binary
/// is started again from the state it was handed (it is presumed broken, and the state
/// is still close to the truth); after `until` the state is dropped.
#[derive(Debug)]
struct Probation {
    /// `None` after a crash restart (there was no state to keep).
    snapshot: Option<Arc<Snapshot>>,
    /// The client whose binary, spec and session a restart reuses.
    base: ClientInfo,
    until: Timestamp,
    /// Restarts in a row so far (for the backoff).
    attempts: u32,
}

/// One upgrade, from the request to its report.
#[derive(Debug)]
struct Upgrade {
    started: Timestamp,
    deadline: Timestamp,
    timeout: std::time::Duration,
    force_drain: bool,
    old: ClientInfo,
    old_alive: bool,
    new_gen: Generation,
    new_binary: std::path::PathBuf,
    new_spec: MountSpec,
    new: Option<ClientInfo>,
    new_alive: bool,
    /// Why the new client is gone, once it is.
    new_fate: Option<String>,
    mode: Option<FreezeMode>,
    freeze_at: Option<Timestamp>,
    handed_over: u32,
    snapshot: Option<Arc<Snapshot>>,
    /// `PreExport` was sent (a delta handover): the base as it comes.
    base: Option<BaseTransfer>,
    step: Step,
}

#[derive(Debug)]
enum Step {
    /// The new client was spawned and sent `Start`; waiting for `Prepared`.
    Preparing,
    /// `PreFlush` (or `PreExport`, whose base chunks are forwarded as they come) sent to
    /// the old client.
    PreFlushing(Agreement),
    /// The old client pre-exported; waiting for the new one to stage the base.
    Staging(Agreement),
    /// `Freeze` sent; the old client's state chunks are forwarded as they come.
    Freezing(Agreement, Assembler),
    /// The state and `Init` + fd went to the new client; waiting for its INIT reply.
    Importing,
    /// `Commit` sent (or the frozen old client died): waiting until it is reaped.
    Committing,
    /// The new client was told to serve; waiting for its first request to be answered.
    Confirming {
        serve_at: Timestamp,
        until: Timestamp,
    },
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Preparing => "Prepared",
            Step::PreFlushing(_) => "PreFlushed",
            Step::Staging(_) => "BaseStaged",
            Step::Freezing(..) => "Frozen",
            Step::Importing => "InitReply",
            Step::Committing => "the old client's exit",
            Step::Confirming { .. } => "FirstServed",
        }
    }

    fn before_commit(&self) -> bool {
        match self {
            Step::Preparing
            | Step::PreFlushing(_)
            | Step::Staging(_)
            | Step::Freezing(..)
            | Step::Importing => true,
            Step::Committing | Step::Confirming { .. } => false,
        }
    }
}

/// Rolling back: the new client was told to shut down; the old one to thaw.
#[derive(Debug)]
struct Rollback {
    up: Box<Upgrade>,
    reason: String,
    thaw_until: Timestamp,
    /// The freeze's state transfer, still collected: if the old client dies before it
    /// thaws, a whole state is what a restart needs.
    assembling: Option<(u16, Assembler)>,
}

/// Starting another client, after the one that should serve died: from a saved state,
/// or (after a crash) from none.
#[derive(Debug)]
struct Restart {
    reason: String,
    /// `None`: a crash restart; the successor takes over with empty tables.
    snapshot: Option<Arc<Snapshot>>,
    /// The client whose binary, spec and session are reused.
    base: ClientInfo,
    attempts: u32,
    last_failure: Option<String>,
    step: RestartStep,
    /// The upgrade still to be answered, if any.
    report: Option<Box<Upgrade>>,
    /// When the client that should serve died: the pause of a crash starts there.
    since: Timestamp,
    /// A `baton upgrade` that came during the restarts (its binary is `base.binary`).
    requested: Option<Requested>,
}

/// A `baton upgrade` accepted while restarting, answered when a client of its binary
/// serves.
#[derive(Debug)]
struct Requested {
    started: Timestamp,
    /// The client that died (the "old" side of the report).
    old: ClientInfo,
    /// What the restarts ran before the request: they go back to it if the requested
    /// binary cannot serve either.
    previous: ClientInfo,
}

#[derive(Debug)]
enum RestartStep {
    /// Until `until`, and until client `waiting` (a killed attempt) has exited.
    Backoff {
        until: Timestamp,
        waiting: Option<Generation>,
    },
    Preparing {
        attempt_gen: Generation,
        deadline: Timestamp,
    },
    Importing {
        info: ClientInfo,
        deadline: Timestamp,
    },
    Confirming {
        info: ClientInfo,
        serve_at: Timestamp,
        until: Timestamp,
    },
}

impl RestartStep {
    fn attempt(&self) -> Option<Generation> {
        match self {
            RestartStep::Backoff { .. } => None,
            RestartStep::Preparing { attempt_gen, .. } => Some(*attempt_gen),
            RestartStep::Importing { info, .. } | RestartStep::Confirming { info, .. } => {
                Some(info.generation)
            }
        }
    }
}

#[derive(Debug)]
enum Phase {
    Idle,
    Upgrading(Box<Upgrade>),
    RollingBack(Box<Rollback>),
    Restarting(Box<Restart>),
    Ended,
}

/// Everything but a request, which can be refused.
#[derive(Debug)]
enum Input {
    Message(Generation, ToSupervisor),
    Exit(Generation, ExitInfo),
    SpawnFailed(Generation, String),
    SendFailed(Generation, String),
    Timeout,
    Cancel(String),
}

/// The supervisor's decisions about its client processes, for one mount.
#[derive(Debug)]
pub struct Machine {
    timings: Timings,
    init_request: Vec<u8>,
    init_reply: Vec<u8>,
    init_unique: u64,
    /// The kernel offered FUSE_HAS_RESEND.
    kernel_resend: bool,
    /// The mount was made with `--no-resend` (its request log says so).
    resend_disabled: bool,
    /// The supervisor holds a request log: clients that can use it are sent it.
    request_log: bool,
    /// A client that read /dev/fuse without reading into the request log died since the
    /// last `Serve`: what it had read is only re-delivered by RESEND.
    unlogged_reader_died: bool,
    /// The client last told to serve (the first one was, at the first mount).
    serving: ClientInfo,
    next_gen: Generation,
    phase: Phase,
    /// Client processes started and not yet seen exiting.
    alive: BTreeSet<Generation>,
    /// Alive clients that were told to serve: they may read /dev/fuse.
    readers: BTreeSet<Generation>,
    /// Clients on their way out, with the time they get killed (`None`: killed).
    retiring: BTreeMap<Generation, Option<Timestamp>>,
    probation: Option<Probation>,
    stats: Stats,
    actions: VecDeque<Action>,
}

/// Whether a client announcing `hello` reads into the supervisor's request log (it is
/// sent the log after `Prepared`; an adopted client whose log the supervisor could not get
/// is recorded without the capability).
fn reads_request_log(hello: &handover_proto::message::Hello) -> bool {
    hello
        .capabilities
        .iter()
        .any(|c| c == capability::REQUEST_LOG)
}

fn short(msg: &ToSupervisor) -> String {
    let s = format!("{msg:?}");
    let end = s.find([' ', '(', '{']).unwrap_or(s.len());
    s[..end].to_string()
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Machine {
    /// A machine for a mount whose client `serving` serves a connection initialized with
    /// `init_request` / `init_reply` (the bytes the kernel and the first client exchanged).
    pub fn new(
        serving: ClientInfo,
        init_request: Vec<u8>,
        init_reply: Vec<u8>,
        timings: Timings,
    ) -> Machine {
        let parsed = InitRequest::parse(&init_request).ok();
        let next_gen = Generation(serving.generation.0 + 1);
        let mut alive = BTreeSet::new();
        alive.insert(serving.generation);
        Machine {
            timings,
            init_unique: parsed.map_or(0, |r| r.unique),
            kernel_resend: parsed.is_some_and(|r| r.has_resend()),
            resend_disabled: false,
            request_log: false,
            unlogged_reader_died: false,
            init_request,
            init_reply,
            readers: alive.clone(),
            alive,
            serving,
            next_gen,
            phase: Phase::Idle,
            retiring: BTreeMap::new(),
            probation: None,
            stats: Stats::default(),
            actions: VecDeque::new(),
        }
    }

    // --- outputs --------------------------------------------------------------------

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let phase = match &self.phase {
            Phase::Idle => self.probation.as_ref().map(|p| p.until),
            Phase::Ended => None,
            Phase::Upgrading(up) => match up.step {
                Step::Committing => None,
                Step::Confirming { until, .. } => Some(until),
                _ => Some(up.deadline),
            },
            Phase::RollingBack(rb) => Some(rb.thaw_until),
            Phase::Restarting(r) => match &r.step {
                RestartStep::Backoff { until, .. } => Some(*until),
                RestartStep::Preparing { deadline, .. }
                | RestartStep::Importing { deadline, .. } => Some(*deadline),
                RestartStep::Confirming { until, .. } => Some(*until),
            },
        };
        self.retiring.values().flatten().copied().chain(phase).min()
    }

    /// The client that serves (or served last).
    pub fn serving(&self) -> &ClientInfo {
        &self.serving
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The supervisor holds the mount's request log (`handover_proto::reqlog`), made
    /// with `--no-resend` if `resend_disabled`: every client that announces the
    /// request-log capability is sent it right after its `Prepared`, and without resend
    /// an upgrade whose two clients can use it freezes in DrainLog mode.
    pub fn with_request_log(mut self, resend_disabled: bool) -> Machine {
        self.request_log = true;
        self.resend_disabled = resend_disabled;
        self
    }

    /// Whether the kernel offered FUSE_NOTIFY_RESEND.
    pub fn kernel_resend(&self) -> bool {
        self.kernel_resend
    }

    /// Whether the mount was made with `--no-resend`.
    pub fn resend_disabled(&self) -> bool {
        self.resend_disabled
    }

    /// Whether the supervisor holds a request log for its clients.
    pub fn has_request_log(&self) -> bool {
        self.request_log
    }

    /// Whether FUSE_NOTIFY_RESEND is used: the kernel offered it and the mount was not
    /// made with `--no-resend`. Else upgrades drain and a successor answers from the
    /// request log what a dead client had read.
    pub fn resend(&self) -> bool {
        self.kernel_resend && !self.resend_disabled
    }

    pub fn phase(&self) -> PhaseKind {
        match self.phase {
            Phase::Idle => PhaseKind::Idle,
            Phase::Upgrading(_) => PhaseKind::Upgrading,
            Phase::RollingBack(_) => PhaseKind::RollingBack,
            Phase::Restarting(_) => PhaseKind::Restarting,
            Phase::Ended => PhaseKind::Ended,
        }
    }

    // --- inputs ---------------------------------------------------------------------

    /// `baton upgrade`: starts the new client, or refuses.
    pub fn handle_request(
        &mut self,
        now: Timestamp,
        req: UpgradeRequest,
    ) -> Result<(), RequestRefused> {
        match &self.phase {
            Phase::Idle => {}
            Phase::Upgrading(_) | Phase::RollingBack(_) => return Err(RequestRefused::InProgress),
            Phase::Restarting(_) => return self.request_while_restarting(now, req),
            Phase::Ended => return Err(RequestRefused::Ended),
        }
        // A new handover makes a new state; the one kept for the last is dropped.
        self.probation = None;
        let old = self.serving.clone();
        let new_binary = req.binary.unwrap_or_else(|| old.binary.clone());
        let new_spec = req.options.apply(&old.spec);
        let new_gen = self.spawn(&new_binary, &new_spec, old.session);
        tracing::info!(
            old = %old.generation, new = %new_gen, binary = %new_binary.display(),
            timeout = ?req.timeout, force_drain = req.force_drain,
            "upgrade: starting the new client"
        );
        self.phase = Phase::Upgrading(Box::new(Upgrade {
            started: now,
            deadline: now + req.timeout,
            timeout: req.timeout,
            force_drain: req.force_drain,
            old,
            old_alive: true,
            new_gen,
            new_binary,
            new_spec,
            new: None,
            new_alive: true,
            new_fate: None,
            mode: None,
            freeze_at: None,
            handed_over: 0,
            snapshot: None,
            base: None,
            step: Step::Preparing,
        }));
        Ok(())
    }

    /// A message from client `from`.
    pub fn handle_message(&mut self, now: Timestamp, from: Generation, msg: ToSupervisor) {
        if let ToSupervisor::Prepared { hello, .. } = &msg {
            // Before anything the step sends it: a client uses the log only once it
            // serves, and needs it by then.
            if self.request_log
                && hello
                    .capabilities
                    .iter()
                    .any(|c| c == capability::REQUEST_LOG)
            {
                self.send(from, ToClient::RequestLog);
            }
        }
        self.step(now, Input::Message(from, msg));
    }

    /// Client `generation` exited (and was reaped). Its messages were all handled before.
    pub fn handle_exit(&mut self, now: Timestamp, generation: Generation, exit: ExitInfo) {
        if self.readers.contains(&generation)
            && self.serving.generation == generation
            && !(self.request_log && reads_request_log(&self.serving.hello))
        {
            self.unlogged_reader_died = true;
        }
        self.alive.remove(&generation);
        self.readers.remove(&generation);
        self.retiring.remove(&generation);
        self.step(now, Input::Exit(generation, exit));
    }

    /// [`Action::Spawn`] failed: client `generation` never ran.
    pub fn handle_spawn_failed(&mut self, now: Timestamp, generation: Generation, error: String) {
        self.alive.remove(&generation);
        self.readers.remove(&generation);
        self.retiring.remove(&generation);
        self.step(now, Input::SpawnFailed(generation, error));
    }

    /// [`Action::Send`] failed: client `generation` cannot be talked to.
    pub fn handle_send_failed(&mut self, now: Timestamp, generation: Generation, error: String) {
        self.step(now, Input::SendFailed(generation, error));
    }

    /// Time passed (at or after [`Machine::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let due: Vec<Generation> = self
            .retiring
            .iter()
            .filter(|(_, t)| t.is_some_and(|t| t <= now))
            .map(|(g, _)| *g)
            .collect();
        for generation in due {
            tracing::warn!(%generation, "client did not exit in time; killing it");
            self.kill(generation);
        }
        self.step(now, Input::Timeout);
    }

    /// The supervisor is stopping: roll an upgrade back if it has not committed. After the
    /// commit it runs to its end (the old client is gone).
    pub fn handle_cancel(&mut self, now: Timestamp, reason: String) {
        self.step(now, Input::Cancel(reason));
    }

    // --- emitting -------------------------------------------------------------------

    fn spawn(&mut self, binary: &std::path::Path, spec: &MountSpec, session: u64) -> Generation {
        let generation = self.next_gen;
        self.next_gen = Generation(generation.0 + 1);
        self.alive.insert(generation);
        self.actions.push_back(Action::Spawn {
            generation,
            binary: binary.to_path_buf(),
            start: ToClient::Start {
                generation,
                spec: spec.clone(),
                resume_session: Some(session),
            },
        });
        generation
    }

    fn send(&mut self, to: Generation, msg: ToClient) {
        self.actions.push_back(Action::Send {
            to,
            msg,
            with_fuse_fd: false,
        });
    }

    fn send_state_and_init(&mut self, to: Generation, snapshot: &Snapshot) {
        match snapshot.whole() {
            Ok(bytes) => {
                for chunk in state::split(&bytes) {
                    self.send(to, ToClient::State(chunk));
                }
            }
            // Both came from the old client and were accepted by the new one: this does
            // not happen. Restarting without a state is what a crash does.
            Err(e) => {
                tracing::error!(error = %e, "cannot merge the kept base state with the changes since: restarting without a state");
            }
        }
        self.send_init(to);
    }

    fn send_init(&mut self, to: Generation) {
        self.actions.push_back(Action::Send {
            to,
            msg: ToClient::Init {
                request: self.init_request.clone(),
            },
            with_fuse_fd: true,
        });
    }

    /// RESEND, then `Serve` to `info`: only when no client reads. On a `--no-resend`
    /// mount whose kernel can resend, RESEND is written all the same when the request log
    /// cannot carry what dead clients had read: one of them did not read into it, or
    /// `info` cannot answer from it (a build without the request log).
    fn resend_and_serve(&mut self, info: &ClientInfo, resend: bool) {
        debug_assert!(
            self.readers.is_empty(),
            "serve while {:?} read",
            self.readers
        );
        let fallback = self.kernel_resend
            && self.resend_disabled
            && (self.unlogged_reader_died || !reads_request_log(&info.hello));
        self.unlogged_reader_died = false;
        if resend || fallback {
            if fallback && !resend {
                tracing::warn!(generation = %info.generation, "the request log cannot carry what the dead client had read: FUSE_NOTIFY_RESEND is written despite --no-resend");
            }
            self.actions.push_back(Action::WriteResend {
                generation: info.generation,
            });
        }
        self.readers.insert(info.generation);
        self.serving = info.clone();
        self.send(info.generation, ToClient::Serve);
    }

    fn kill(&mut self, generation: Generation) {
        if self.alive.contains(&generation) {
            self.actions.push_back(Action::Kill { generation });
            self.retiring.insert(generation, None);
        }
    }

    /// `Shutdown` to a client that never served, killed if it does not exit in time.
    fn shut_down(&mut self, now: Timestamp, generation: Generation) {
        if self.alive.contains(&generation) && !self.retiring.contains_key(&generation) {
            self.send(generation, ToClient::Shutdown);
            self.retiring
                .insert(generation, Some(now + self.timings.shutdown_grace));
        }
    }

    fn report(&mut self, outcome: Outcome) {
        self.actions.push_back(Action::Report(outcome));
    }

    fn upgrade_report(
        up: &Upgrade,
        now: Timestamp,
        serving: &ClientInfo,
        pause_end: Timestamp,
        reason: Option<String>,
    ) -> UpgradeReport {
        UpgradeReport {
            old_generation: up.old.generation,
            old_version: up.old.version.clone(),
            new_generation: serving.generation,
            new_version: serving.version.clone(),
            // DrainLog is a drain: reported as one, so that every CLI reads the report.
            mode: up.mode.map(|m| match m {
                FreezeMode::DrainLog => FreezeMode::Drain,
                m => m,
            }),
            pause_us: up
                .freeze_at
                .map_or(0, |f| micros(pause_end.saturating_since(f))),
            handed_over_requests: up.handed_over,
            total_us: micros(now.saturating_since(up.started)),
            reason,
        }
    }

    /// The connection ended (unmounted from outside); `pending`: an upgrade awaits its
    /// answer.
    fn ended(&mut self, error: Option<String>, pending: bool) -> Phase {
        tracing::info!("the FUSE connection ended");
        if pending {
            self.report(Outcome::Failed {
                message: "the mount was removed during the upgrade".into(),
            });
        }
        self.actions.push_back(Action::MountGone { error });
        Phase::Ended
    }

    // --- transitions ----------------------------------------------------------------

    fn step(&mut self, now: Timestamp, input: Input) {
        let phase = std::mem::replace(&mut self.phase, Phase::Ended);
        self.phase = match (phase, input) {
            (Phase::Idle, input) => self.on_idle(now, input),
            (Phase::Upgrading(up), input) => self.on_upgrading(now, up, input),
            (Phase::RollingBack(rb), input) => self.on_rolling_back(now, rb, input),
            (Phase::Restarting(r), input) => self.on_restarting(now, r, input),
            (p @ Phase::Ended, _) => p,
        };
    }

    fn on_idle(&mut self, now: Timestamp, input: Input) -> Phase {
        let serving = self.serving.generation;
        match input {
            Input::Message(g, msg) if g == serving => match msg {
                ToSupervisor::SessionEnded { error } => self.ended(error, false),
                ToSupervisor::Failed { reason } => {
                    tracing::error!(%reason, "the serving client reports a failure");
                    Phase::Idle
                }
                ToSupervisor::Prepared { .. }
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
                | ToSupervisor::BaseStaged { .. } => {
                    tracing::debug!(message = %short(&msg), "ignoring a message from the serving client");
                    Phase::Idle
                }
            },
            Input::Message(g, msg) => {
                tracing::debug!(generation = %g, message = %short(&msg), "ignoring a message from a retiring client");
                Phase::Idle
            }
            Input::Exit(g, exit) if g == serving => match self.probation.take() {
                Some(p) => {
                    let reason = format!(
                        "the client (generation {g}) exited ({exit}) within {:?} of taking over",
                        self.timings.probation
                    );
                    self.stats.last_crash = Some(reason.clone());
                    self.restart_on_probation(now, p, reason)
                }
                None => self.crash_restart(
                    now,
                    format!("the client (generation {g}) exited unexpectedly ({exit})"),
                ),
            },
            Input::Timeout => {
                if self.probation.as_ref().is_some_and(|p| now >= p.until) {
                    tracing::debug!("probation over: dropping the handed-over state");
                    self.probation = None;
                }
                Phase::Idle
            }
            Input::SendFailed(g, error) if g == serving => {
                tracing::warn!(%error, "cannot talk to the serving client");
                Phase::Idle
            }
            Input::Exit(..) | Input::SpawnFailed(..) | Input::SendFailed(..) | Input::Cancel(_) => {
                Phase::Idle
            }
        }
    }
}
