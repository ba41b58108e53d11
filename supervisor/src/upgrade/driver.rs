//! The supervisor's event loop once the mount serves, and the only code that acts on the
//! upgrade machine's decisions: it spawns clients, passes the /dev/fuse descriptor, sends
//! and receives handover messages, watches client exits, and writes FUSE_NOTIFY_RESEND.
//!
//! ```text
//! poll: signalfd | control socket | per client: channel (in; out while queued) + pidfd
//!   channel readable  -> every message -> machine.handle_message
//!   pidfd readable    -> the channel's last messages first, then reap -> handle_exit
//!   control request   -> Status | Upgrade (-> handle_request; answered by Report)
//!                        | Umount (refused during an upgrade)
//!   signal            -> cancel the upgrade (rolls back before the commit), then stop;
//!                        SIGTERM while the descriptor keeper holds the mount and
//!                        BATON_SIGTERM_WAIT is set: serve on for a successor, that long
//!   deadline          -> handle_timeout
//!   after each: every machine action, in order:
//!     Spawn -> start the binary, send Start      Send -> queue (fd attached for Init)
//!     Kill -> SIGKILL                            WriteResend -> 16 bytes to /dev/fuse
//!     Report -> answer `baton upgrade`           MountGone -> stop
//! ```
//!
//! Channels are non-blocking with a queue per client: a client that stops reading its
//! socket can only stall its own queue, never the loop (and the machine's deadline rolls
//! the upgrade back). Times are CLOCK_MONOTONIC, the clock clients stamp `FirstServed`
//! with. The supervisor's /dev/fuse descriptor lives in this struct until the loop ends.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::control::{
    ClientHealth, ControlRequest, ControlResponse, FuseMode, MountDescription, MountStatus,
};
use handover_proto::fdpass;
use handover_proto::message::{Adoption, Generation, ToClient, ToSupervisor};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;

use super::{
    Action, ClientInfo, ClientOptions, ExitInfo, Machine, Outcome, PhaseKind, Timestamp, Timings,
    UpgradeRequest,
};
use crate::control::{ControlConn, ControlServer};
use crate::keeper::Keeper;
use crate::metrics::{self, MetricsServer};
use crate::mount::{self, UmountError};
use crate::spawn::ClientProcess;
use crate::supervise::SuperviseError;

/// How long the serving client may take to flush and close after `Shutdown`.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a client that answered `Shutdown` may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits for an upgrade to roll back or finish.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Now on CLOCK_MONOTONIC.
pub fn monotonic_now() -> Timestamp {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return Timestamp(0);
    }
    let ns = u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0);
    Timestamp(ns)
}

fn exit_info(status: std::io::Result<std::process::ExitStatus>) -> ExitInfo {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitInfo::Code(c),
            (None, Some(sig)) => ExitInfo::Signal(sig),
            (None, None) => ExitInfo::Unknown(s.to_string()),
        },
        Err(e) => ExitInfo::Unknown(e.to_string()),
    }
}

fn would_block_recv(e: &RecvError) -> bool {
    matches!(
        e,
        RecvError::Transport(fdpass::RecvError::Recvmsg(Errno::EAGAIN))
    )
}

fn would_block_send(e: &SendError) -> bool {
    matches!(
        e,
        SendError::Transport(fdpass::SendError::Sendmsg {
            source: Errno::EAGAIN,
            ..
        })
    )
}

fn peer_gone(e: &SendError) -> bool {
    matches!(
        e,
        SendError::Transport(fdpass::SendError::Sendmsg {
            source: Errno::EPIPE | Errno::ECONNRESET | Errno::ECONNREFUSED,
            ..
        })
    )
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    fsclient::client::error_chain(e)
}

/// What does not change for the life of the mount, for status.
#[derive(Clone, Debug)]
pub struct MountFacts {
    pub mountpoint: PathBuf,
    pub volume: String,
    pub meta_url: String,
    pub fuse_minor: u32,
    pub max_write: u32,
    pub started: Instant,
}

/// Everything the start-up hands over to the loop.
#[derive(Debug)]
pub struct DriverParts {
    pub facts: MountFacts,
    pub control: ControlServer,
    pub signals: SignalFd,
    /// The supervisor's descriptor of the FUSE connection.
    pub fuse: OwnedFd,
    /// The serving client; `None` when the mount is re-seeded from the descriptor keeper
    /// (every process of the mount died): `first_info` then describes the dead client,
    /// and the loop starts by restarting it, as after a crash.
    pub first: Option<ClientProcess>,
    pub first_info: ClientInfo,
    pub init_request: Vec<u8>,
    pub init_reply: Vec<u8>,
    /// Arguments every client is started with.
    pub client_args: Vec<String>,
    pub metrics: Option<MetricsServer>,
    pub timings: Timings,
    /// The mount's write journal, sent with every `Start`.
    pub journal: OwnedFd,
    /// The mount's request log (`handover_proto::reqlog`), sent after `Prepared` to every
    /// client that can use it.
    pub request_log: OwnedFd,
}

#[derive(Debug)]
struct Client {
    process: ClientProcess,
    /// False once the peer closed its end.
    open: bool,
    /// Messages not sent yet (the socket was full); `true`: attach the fd.
    queue: VecDeque<(ToClient, bool)>,
}

/// Why the loop ends.
enum End {
    /// A control `Umount` unmounted: the client stops; the result goes to the caller.
    Unmounted(ControlConn),
    /// Detach and stop (signal).
    Signal(Signal),
    /// The connection ended from outside.
    Gone,
    /// A new supervisor supervises the mount (`baton upgrade --supervisor`): answer and
    /// exit, leaving the client, the control socket and the mount to it.
    Replaced(ControlConn, Box<ControlResponse>),
    /// A supervisor in another process tree (a new mount pod) supervises the mount
    /// (`ControlRequest::HandOver`): stop serving the control socket and exit once the
    /// client of this generation, still this process's child, has exited.
    HandedOver(Generation),
}

/// What the descriptor keeper holds of this mount.
#[derive(Debug)]
struct Kept {
    keeper: Keeper,
    /// The generation last deposited (whether the keeper took it or not).
    deposited: Option<Generation>,
    /// The keeper's socket (device, inode) when it last took a deposit: a restarted
    /// keeper (a new socket) starts empty and is given the mount again.
    holder: Option<(u64, u64)>,
    /// When the keeper's socket was last looked at.
    checked: Instant,
}

/// After SIGTERM, how long a supervisor whose mount the keeper holds waits for another
/// supervisor to take the mount over (`BATON_SIGTERM_WAIT`; baton-csi's replacement mount
/// pod comes within a second or two) before it flushes and unmounts as without a keeper:
/// the node may be shutting down, and data still buffered in the client must reach the
/// object storage before the kill. `None`: SIGTERM unmounts at once.
fn sigterm_wait() -> Option<Duration> {
    let v = std::env::var(handover_proto::keeper::SIGTERM_WAIT_ENV).ok()?;
    match v.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => {
            tracing::warn!(
                value = %v,
                "{} is not a number of seconds: SIGTERM unmounts at once",
                handover_proto::keeper::SIGTERM_WAIT_ENV
            );
            None
        }
    }
}

/// How often the supervisor checks that the keeper holding its mount is still the same.
const KEEPER_CHECK: Duration = Duration::from_secs(10);

/// The running mount.
#[derive(Debug)]
pub struct Driver {
    facts: MountFacts,
    control: ControlServer,
    signals: SignalFd,
    fuse: OwnedFd,
    journal: OwnedFd,
    request_log: OwnedFd,
    machine: Machine,
    clients: BTreeMap<Generation, Client>,
    client_args: Vec<String>,
    /// The `baton upgrade` waiting for its answer.
    pending: Option<ControlConn>,
    upgrade_span: Option<tracing::Span>,
    /// A signal arrived during an upgrade: stop once it has ended (or at the deadline).
    stopping: Option<(Signal, Instant)>,
    metrics: Option<MetricsServer>,
    /// The descriptor keeper (`BATON_KEEPER`) and what it holds of this mount.
    keeper: Option<Kept>,
    /// SIGTERM arrived while the keeper holds the mount: serving on until another
    /// supervisor takes the mount over, it is unmounted, or this deadline; then it stops
    /// as on any SIGTERM.
    terminating: Option<Instant>,
    /// [`sigterm_wait`], read once.
    sigterm_wait: Option<Duration>,
    init_request: Vec<u8>,
    init_reply: Vec<u8>,
}

impl Driver {
    pub fn new(parts: DriverParts) -> Driver {
        let DriverParts {
            facts,
            control,
            signals,
            fuse,
            first,
            first_info,
            init_request,
            init_reply,
            client_args,
            metrics,
            timings,
            journal,
            request_log,
        } = parts;
        let generation = first_info.generation;
        let resend_disabled = match handover_proto::reqlog::read_header(request_log.as_fd()) {
            Ok(h) => h.resend_disabled(),
            Err(e) => {
                tracing::error!(error = %chain(&e), "the request log is unusable: resend stays as the kernel offers it");
                false
            }
        };
        let mut machine = Machine::new(
            first_info,
            init_request.clone(),
            init_reply.clone(),
            timings,
        )
        .with_request_log(resend_disabled);
        tracing::info!(
            kernel_resend = machine.kernel_resend(),
            resend_disabled,
            "{}",
            if machine.resend() {
                "FUSE_NOTIFY_RESEND in use"
            } else {
                "no FUSE_NOTIFY_RESEND: upgrades drain, crashes recover through the request log"
            }
        );
        let mut clients = BTreeMap::new();
        match first {
            Some(first) => {
                if let Err(e) = nix::fcntl::fcntl(
                    first.channel(),
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                ) {
                    tracing::warn!(error = %e, "cannot make the client channel non-blocking");
                }
                clients.insert(
                    generation,
                    Client {
                        process: first,
                        open: true,
                        queue: VecDeque::new(),
                    },
                );
            }
            None => machine.handle_exit(
                monotonic_now(),
                generation,
                ExitInfo::Unknown(
                    "every process of the mount died; re-seeded from the descriptor keeper".into(),
                ),
            ),
        }
        Driver {
            facts,
            control,
            signals,
            fuse,
            journal,
            request_log,
            machine,
            clients,
            client_args,
            pending: None,
            upgrade_span: None,
            stopping: None,
            metrics,
            keeper: Keeper::from_env().map(|keeper| Kept {
                keeper,
                deposited: None,
                holder: None,
                checked: Instant::now(),
            }),
            terminating: None,
            sigterm_wait: sigterm_wait(),
            init_request,
            init_reply,
        }
    }

    /// Deposits the mount with the descriptor keeper once a new generation serves, and
    /// again when the keeper restarted (a failure is logged: the mount serves on,
    /// unprotected against the death of all its processes).
    fn deposit(&mut self) {
        let Some(kept) = &mut self.keeper else {
            return;
        };
        let serving = self.machine.serving();
        if self.machine.phase() != PhaseKind::Idle
            || !self.clients.contains_key(&serving.generation)
        {
            return;
        }
        let again = kept.deposited == Some(serving.generation);
        if again {
            if kept.checked.elapsed() < KEEPER_CHECK {
                return;
            }
            kept.checked = Instant::now();
            let now = kept.keeper.socket_identity();
            if now.is_none() || now == kept.holder {
                return;
            }
            if kept.holder.is_some() {
                tracing::info!("the descriptor keeper restarted: depositing the mount again");
            }
        }
        kept.deposited = Some(serving.generation);
        kept.checked = Instant::now();
        let client_pid = self
            .clients
            .get(&serving.generation)
            .map_or(0, |c| c.process.pid());
        // `pid` is the serving client's: a supervisor that withdraws the deposit adopts
        // that client if it still lives rather than start a second one.
        let adoption = Adoption {
            pid: client_pid,
            version: serving.version.clone(),
            hello: serving.hello.clone(),
            session: serving.session,
            generation: serving.generation,
            spec: serving.spec.clone(),
            init_request: self.init_request.clone(),
            init_reply: self.init_reply.clone(),
            journal: true,
        };
        let identity = kept.keeper.socket_identity();
        match kept.keeper.deposit(
            adoption,
            self.fuse.as_fd(),
            Some(self.journal.as_fd()),
            Some(self.request_log.as_fd()),
        ) {
            Ok(()) => {
                kept.holder = identity;
                tracing::info!(generation = %serving.generation, "deposited with the descriptor keeper")
            }
            // A retry of a deposit that failed already is only worth a debug line.
            Err(e) if again && kept.holder.is_none() => {
                tracing::debug!(error = %chain(&e), "the descriptor keeper still does not take the mount")
            }
            Err(e) => {
                kept.holder = None;
                tracing::warn!(error = %chain(&e), "the descriptor keeper did not take the mount")
            }
        }
    }

    /// The mount as `baton status` shows it.
    pub fn status(&self) -> MountStatus {
        let serving = self.machine.serving();
        let stats = self.machine.stats();
        MountStatus {
            mountpoint: self.facts.mountpoint.clone(),
            volume: self.facts.volume.clone(),
            meta_url: fsclient::data::redact(&self.facts.meta_url),
            supervisor_pid: std::process::id(),
            generation: serving.generation,
            client_pid: self
                .clients
                .get(&serving.generation)
                .map_or(0, |c| c.process.pid()),
            client_version: serving.version.clone(),
            uptime_ms: u64::try_from(self.facts.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            fuse_minor: self.facts.fuse_minor,
            max_write: self.facts.max_write,
            resend: self.machine.resend(),
            upgrades: stats.upgrades,
            rollbacks: stats.rollbacks,
            restarts: stats.restarts,
            last_pause_us: stats
                .last_pause
                .map(|p| u64::try_from(p.as_micros()).unwrap_or(u64::MAX)),
            last_rollback: stats.last_rollback.clone(),
        }
    }

    /// How the connection survives a client that dies or is replaced.
    pub fn fuse_mode(&self) -> FuseMode {
        FuseMode {
            kernel_resend: self.machine.kernel_resend(),
            resend_disabled: self.machine.resend_disabled(),
            request_log: self.machine.has_request_log(),
        }
    }

    /// What the client is doing beyond the counters: a restart in progress, the last
    /// crash.
    pub fn health(&self) -> ClientHealth {
        let now = monotonic_now();
        let stats = self.machine.stats();
        let phase = self.machine.phase();
        let restart = self.machine.restart_view();
        let reason = restart.as_ref().map(|r| {
            let mut s = r.reason.clone();
            if let Some(f) = &r.last_failure {
                s.push_str(&format!("; attempt {} failed: {f}", r.attempts));
            }
            match r.next_attempt {
                Some(t) => s.push_str(&format!(
                    "; attempt {} of {} in {:.1}s",
                    r.attempts + 1,
                    r.binary.display(),
                    t.saturating_since(now).as_secs_f64()
                )),
                None => s.push_str(&format!(
                    "; attempt {} of {} under way",
                    r.attempts,
                    r.binary.display()
                )),
            }
            s
        });
        ClientHealth {
            state: phase.as_str().to_string(),
            reason,
            restart_attempts: restart.as_ref().map_or(0, |r| r.attempts),
            next_attempt_ms: restart
                .as_ref()
                .and_then(|r| r.next_attempt)
                .map(|t| u64::try_from(t.saturating_since(now).as_millis()).unwrap_or(u64::MAX)),
            last_crash: stats.last_crash.clone(),
            last_crash_pause_us: stats
                .last_crash_pause
                .map(|p| u64::try_from(p.as_micros()).unwrap_or(u64::MAX)),
        }
    }

    fn publish(&self) {
        if let Some(m) = &self.metrics {
            m.publish(metrics::Snapshot {
                status: self.status(),
                state: self.machine.phase().as_str(),
                health: self.health(),
            });
        }
    }

    /// Runs until the mount ends.
    pub fn run(self) -> Result<(), SuperviseError> {
        self.run_with(None)
    }

    /// Runs the loop, starting with the upgrade `first` if given (a take-over moves the
    /// adopted client into this supervisor's binary); nobody waits for its answer, it
    /// shows in `baton status`.
    pub fn run_with(mut self, first: Option<UpgradeRequest>) -> Result<(), SuperviseError> {
        // A re-seeded mount starts with a restart already asked for.
        if let Some(end) = self.execute() {
            return self.end(end);
        }
        if let Some(req) = first {
            let old = self.machine.serving().generation;
            match self.machine.handle_request(monotonic_now(), req) {
                Ok(()) => {
                    self.upgrade_span = Some(tracing::info_span!("upgrade", from = %old));
                    if let Some(end) = self.execute() {
                        return self.end(end);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot start the take-over upgrade"),
            }
        }
        let end = loop {
            self.publish();
            self.deposit();
            if self.terminating.is_some_and(|d| Instant::now() >= d) && self.stopping.is_none() {
                tracing::warn!(
                    wait = ?self.sigterm_wait,
                    "no supervisor took the mount over after SIGTERM: stopping as without a keeper"
                );
                if let Some(end) = self.stop_on(Signal::SIGTERM) {
                    break end;
                }
            }
            if let Some((sig, deadline)) = self.stopping {
                let idle = matches!(self.machine.phase(), PhaseKind::Idle | PhaseKind::Ended);
                if idle || Instant::now() >= deadline {
                    break End::Signal(sig);
                }
            }
            let span = self.upgrade_span.clone();
            let _entered = span.as_ref().map(|s| s.enter());
            match self.turn() {
                Ok(None) => {}
                Ok(Some(end)) => break end,
                Err(e) => {
                    self.kill_all();
                    return Err(e);
                }
            }
        };
        self.end(end)
    }

    /// One wait and everything it woke.
    fn turn(&mut self) -> Result<Option<End>, SuperviseError> {
        let now = monotonic_now();
        let mut deadline = self.machine.poll_timeout().map(|t| t.saturating_since(now));
        if let Some((_, d)) = self.stopping {
            let left = d.saturating_duration_since(Instant::now());
            deadline = Some(deadline.map_or(left, |x| x.min(left)));
        }
        if self.keeper.is_some() {
            deadline = Some(deadline.map_or(KEEPER_CHECK, |x| x.min(KEEPER_CHECK)));
        }
        if let Some(d) = self.terminating
            && self.stopping.is_none()
        {
            let left = d.saturating_duration_since(Instant::now());
            deadline = Some(deadline.map_or(left, |x| x.min(left)));
        }
        // Round up: waking before the deadline would only spin.
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000);
                PollTimeout::try_from(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
                    .unwrap_or(PollTimeout::MAX)
            }
        };

        let gens: Vec<Generation> = self.clients.keys().copied().collect();
        let (signal, control, ready) = {
            let mut fds = vec![
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.control.fd(), PollFlags::POLLIN),
            ];
            // Per client: its pidfd, then its channel while open (a closed channel would
            // report POLLHUP forever).
            let mut slots = Vec::with_capacity(gens.len());
            for g in &gens {
                let c = &self.clients[g];
                fds.push(PollFd::new(c.process.pidfd().as_fd(), PollFlags::POLLIN));
                let pid = fds.len() - 1;
                let channel = c.open.then(|| {
                    let mut ev = PollFlags::POLLIN;
                    if !c.queue.is_empty() {
                        ev |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.process.channel().as_fd(), ev));
                    fds.len() - 1
                });
                slots.push((pid, channel));
            }
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => return Ok(None),
                Err(e) => return Err(SuperviseError::Poll(e)),
            }
            let any = |f: &PollFd<'_>| f.any().unwrap_or(false);
            let out = |f: &PollFd<'_>| f.revents().is_some_and(|r| r.contains(PollFlags::POLLOUT));
            // Per client: readable (or hung up), writable, exited.
            let ready: Vec<(Generation, bool, bool, bool)> = gens
                .iter()
                .zip(slots)
                .map(|(g, (pid, channel))| {
                    let (readable, writable) =
                        channel.map_or((false, false), |i| (in_or_hup(&fds[i]), out(&fds[i])));
                    (*g, readable, writable, any(&fds[pid]))
                })
                .collect();
            (any(&fds[0]), any(&fds[1]), ready)
        };

        if signal {
            if let Some(sig) = read_signal(&self.signals) {
                if let Some(end) = self.on_signal(sig) {
                    return Ok(Some(end));
                }
            }
        }
        for (g, readable, writable, exited) in ready {
            if writable {
                self.flush(g);
            }
            if readable || exited {
                self.receive(g);
            }
            if exited {
                self.reap(g);
            }
            if let Some(end) = self.execute() {
                return Ok(Some(end));
            }
        }
        if control {
            if let Some(end) = self.on_control() {
                return Ok(Some(end));
            }
        }
        if self
            .machine
            .poll_timeout()
            .is_some_and(|t| t <= monotonic_now())
        {
            self.machine.handle_timeout(monotonic_now());
        }
        Ok(self.execute())
    }

    /// Whether the descriptor keeper holds the mount now: while a client serves, it is
    /// given the mount again (a keeper that died since the last deposit does not count).
    fn keeper_holds(&mut self) -> bool {
        let Some(kept) = &mut self.keeper else {
            return false;
        };
        if kept.holder.is_none() {
            return false;
        }
        if self.machine.phase() == PhaseKind::Idle {
            kept.deposited = None;
            self.deposit();
        }
        self.keeper.as_ref().is_some_and(|k| k.holder.is_some())
    }

    fn on_signal(&mut self, sig: Signal) -> Option<End> {
        if let Some(wait) = self.sigterm_wait
            && sig == Signal::SIGTERM
            && self.stopping.is_none()
            && (self.terminating.is_some() || self.keeper_holds())
        {
            // A mount pod being deleted (evicted, or deleted by hand): unmounting would
            // fail every application using the mount. Serve on; baton-csi starts another
            // mount pod, whose supervisor takes the mount over; if this process is killed
            // first, the keeper holds the connection and that supervisor re-seeds it.
            if self.terminating.is_none() {
                self.terminating = Some(Instant::now() + wait);
                tracing::info!(
                    ?wait,
                    "SIGTERM: the mount stays, serving until another supervisor takes it over (or the descriptor keeper keeps it)"
                );
            }
            return None;
        }
        self.stop_on(sig)
    }

    /// Stops on `sig`: at once, or once the upgrade in progress has rolled back.
    fn stop_on(&mut self, sig: Signal) -> Option<End> {
        if self.stopping.is_some() {
            tracing::warn!(signal = %sig, "already stopping");
            return None;
        }
        // Nothing serves during restarts: there is nothing to wait for.
        if matches!(
            self.machine.phase(),
            PhaseKind::Idle | PhaseKind::Restarting
        ) {
            return Some(End::Signal(sig));
        }
        tracing::info!(signal = %sig, "stopping once the upgrade in progress has ended");
        self.machine.handle_cancel(
            monotonic_now(),
            format!("the supervisor was stopped by {sig}"),
        );
        self.stopping = Some((sig, Instant::now() + STOP_GRACE));
        self.execute()
    }

    /// Reads every message the client `g` has sent.
    fn receive(&mut self, g: Generation) {
        loop {
            let Some(c) = self.clients.get_mut(&g) else {
                return;
            };
            if !c.open {
                return;
            }
            match channel::recv::<ToSupervisor>(c.process.channel().as_fd(), None) {
                Ok((msg, _)) => {
                    tracing::debug!(generation = %g, message = ?short(&msg), "from client");
                    self.machine.handle_message(monotonic_now(), g, msg);
                }
                Err(e) if would_block_recv(&e) => return,
                Err(e) if e.is_closed() => {
                    c.open = false;
                    return;
                }
                Err(
                    e @ (RecvError::Frame(_) | RecvError::Decode(_) | RecvError::FdCount { .. }),
                ) => {
                    tracing::error!(generation = %g, error = %chain(&e), "dropping an invalid message from the client");
                }
                Err(e) => {
                    tracing::error!(generation = %g, error = %chain(&e), "the client channel broke");
                    c.open = false;
                    return;
                }
            }
        }
    }

    /// Client `g`'s pidfd is readable: it exited.
    fn reap(&mut self, g: Generation) {
        let Some(c) = self.clients.get_mut(&g) else {
            return;
        };
        match c.process.try_reap() {
            Ok(None) => {}
            status => {
                let exit = exit_info(status.map(|s| s.unwrap_or_default()));
                tracing::info!(generation = %g, %exit, "client exited");
                self.clients.remove(&g);
                self.machine.handle_exit(monotonic_now(), g, exit);
            }
        }
    }

    /// Sends what client `g` has queued, as far as its socket takes it.
    fn flush(&mut self, g: Generation) {
        let Some(c) = self.clients.get_mut(&g) else {
            return;
        };
        while let Some((msg, with_fd)) = c.queue.front() {
            let fuse = self.fuse.as_fd();
            let journal = self.journal.as_fd();
            let request_log = self.request_log.as_fd();
            let fds: &[BorrowedFd<'_>] = match msg {
                ToClient::Start { .. } => &[journal],
                ToClient::RequestLog => &[request_log],
                _ if *with_fd => &[fuse],
                _ => &[],
            };
            match channel::send(c.process.channel().as_fd(), msg, fds) {
                Ok(()) => {
                    c.queue.pop_front();
                }
                Err(e) if would_block_send(&e) => return,
                Err(e) if peer_gone(&e) => {
                    // The client closed its end: it exited (its exit follows on the
                    // pidfd, with the status that says why) or it will be timed out.
                    tracing::debug!(generation = %g, "not sent: the client closed its channel");
                    c.queue.clear();
                    c.open = false;
                    return;
                }
                Err(e) => {
                    let error = chain(&e);
                    tracing::warn!(generation = %g, %error, "cannot send to the client");
                    c.queue.clear();
                    self.machine.handle_send_failed(monotonic_now(), g, error);
                    return;
                }
            }
        }
    }

    /// Carries out the machine's actions; `Some` ends the loop.
    fn execute(&mut self) -> Option<End> {
        let mut end = None;
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Spawn {
                    generation,
                    binary,
                    start,
                } => self.spawn(generation, binary, start),
                Action::Send {
                    to,
                    msg,
                    with_fuse_fd,
                } => match self.clients.get_mut(&to) {
                    Some(c) => {
                        c.queue.push_back((msg, with_fuse_fd));
                        self.flush(to);
                    }
                    None => tracing::debug!(generation = %to, "not sent: the client is gone"),
                },
                Action::Kill { generation } => {
                    if let Some(c) = self.clients.get_mut(&generation) {
                        tracing::warn!(%generation, pid = c.process.pid(), "killing the client");
                        c.process.kill();
                    }
                }
                Action::WriteResend { generation } => {
                    // The request log is told first: the successor then frees what the
                    // dead clients left in it instead of answering it a second time.
                    if let Err(e) =
                        handover_proto::reqlog::mark_resent(self.request_log.as_fd(), generation.0)
                    {
                        tracing::error!(error = %chain(&e), "cannot record the resend in the request log");
                    }
                    self.write_resend()
                }
                Action::Report(outcome) => self.answer(outcome),
                Action::MountGone { error } => {
                    if let Some(e) = error {
                        tracing::warn!(error = %e, "the client reported a flush error");
                    }
                    tracing::info!(
                        "the FUSE connection ended: the mount was removed outside baton"
                    );
                    end = end.or(Some(End::Gone));
                }
            }
        }
        end
    }

    fn write_resend(&self) {
        match mount::notify_resend(self.fuse.as_fd()) {
            Ok(()) => tracing::info!("FUSE_NOTIFY_RESEND written"),
            Err(e) => {
                tracing::error!(error = %e, "cannot write FUSE_NOTIFY_RESEND: requests the old client read may wait forever")
            }
        }
    }

    fn spawn(&mut self, generation: Generation, binary: PathBuf, start: ToClient) {
        let process = match ClientProcess::spawn(&binary, &self.client_args) {
            Ok(p) => p,
            Err(e) => {
                let error = chain(&e);
                tracing::warn!(%generation, %error, "cannot start a client");
                self.machine
                    .handle_spawn_failed(monotonic_now(), generation, error);
                return;
            }
        };
        if let Err(e) = nix::fcntl::fcntl(
            process.channel(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        ) {
            tracing::warn!(error = %e, "cannot make the client channel non-blocking");
        }
        tracing::info!(%generation, pid = process.pid(), binary = %binary.display(), "client started");
        let mut queue = VecDeque::new();
        queue.push_back((start, false));
        self.clients.insert(
            generation,
            Client {
                process,
                open: true,
                queue,
            },
        );
        self.flush(generation);
    }

    fn answer(&mut self, outcome: Outcome) {
        let response = match outcome {
            Outcome::Upgraded(r) => ControlResponse::Upgraded(r),
            Outcome::RolledBack(r) => ControlResponse::RolledBack(r),
            Outcome::Failed { message } => ControlResponse::Error { message },
        };
        self.upgrade_span = None;
        match self.pending.take() {
            Some(conn) => {
                if let Err(e) = conn.respond(&response) {
                    tracing::warn!(error = %chain(&e), "cannot answer `baton upgrade` (it went away?)");
                }
            }
            None => tracing::info!(?response, "upgrade ended; nobody waits for the answer"),
        }
    }

    /// Accepts and answers one control connection.
    fn on_control(&mut self) -> Option<End> {
        let conn = match self.control.accept() {
            Ok(Some(c)) => c,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "control connection refused");
                return None;
            }
        };
        let request = match conn.recv_request() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "bad control request");
                return None;
            }
        };
        tracing::info!(?request, uid = conn.uid, pid = conn.pid, "control request");
        let response = match request {
            ControlRequest::Status => ControlResponse::Status(self.status()),
            ControlRequest::Health => ControlResponse::Health {
                status: self.status(),
                health: self.health(),
            },
            ControlRequest::Describe => ControlResponse::Description(Box::new(MountDescription {
                status: self.status(),
                health: self.health(),
                fuse: self.fuse_mode(),
            })),
            ControlRequest::Upgrade {
                binary,
                timeout_ms,
                force_drain,
                cache_dir,
                cache_bytes,
            } => {
                if self.stopping.is_some() {
                    ControlResponse::Error {
                        message: "the supervisor is stopping".into(),
                    }
                } else {
                    let req = UpgradeRequest {
                        binary,
                        timeout: Duration::from_millis(timeout_ms.max(1)),
                        force_drain,
                        options: ClientOptions {
                            cache_dir,
                            cache_bytes,
                        },
                    };
                    let old = self.machine.serving().generation;
                    match self.machine.handle_request(monotonic_now(), req) {
                        Ok(()) => {
                            self.upgrade_span = Some(tracing::info_span!("upgrade", from = %old));
                            self.pending = Some(conn);
                            return self.execute();
                        }
                        Err(e) => ControlResponse::Error {
                            message: e.to_string(),
                        },
                    }
                }
            }
            ControlRequest::UpgradeSupervisor { binary, timeout_ms } => {
                match self.replace_supervisor(&binary, Duration::from_millis(timeout_ms.max(1))) {
                    Ok(response) => return Some(End::Replaced(conn, Box::new(response))),
                    Err(message) => ControlResponse::Error { message },
                }
            }
            ControlRequest::HandOver { timeout_ms } => {
                match self.hand_over(&conn, Duration::from_millis(timeout_ms.max(1))) {
                    Ok(serving) => return Some(End::HandedOver(serving)),
                    Err(message) => ControlResponse::Error { message },
                }
            }
            ControlRequest::TookOver => ControlResponse::Error {
                message: "TookOver without HandOver on the same connection".into(),
            },
            ControlRequest::Umount { lazy } => {
                // During restarts the mount may go: the attempt under way is stopped.
                if !matches!(
                    self.machine.phase(),
                    PhaseKind::Idle | PhaseKind::Restarting
                ) {
                    ControlResponse::Error {
                        message: format!(
                            "cannot unmount while the client is {}; try again when it has finished",
                            self.machine.phase().as_str()
                        ),
                    }
                } else {
                    match mount::umount(&self.facts.mountpoint, lazy) {
                        Err(UmountError::Busy(_)) => {
                            tracing::info!("umount refused: the mount is busy; still serving");
                            ControlResponse::Busy
                        }
                        Err(e @ UmountError::Failed { .. }) => {
                            ControlResponse::Error { message: chain(&e) }
                        }
                        Ok(()) | Err(UmountError::NotMounted(_)) => {
                            tracing::info!(lazy, "unmounted on request");
                            return Some(End::Unmounted(conn));
                        }
                    }
                }
            }
        };
        if let Err(e) = conn.respond(&response) {
            tracing::warn!(error = %chain(&e), "cannot answer the control request");
        }
        None
    }

    /// `baton upgrade --supervisor`: hands the mount to a new supervisor process
    /// ([`crate::replace`]). `Ok`: it supervises the mount, this one must exit. `Err`: why
    /// not; this supervisor serves on (with its client adopted back if it had let go).
    fn replace_supervisor(
        &mut self,
        binary: &std::path::Path,
        timeout: Duration,
    ) -> Result<ControlResponse, String> {
        let serving = self.can_let_go()?;
        let new_version = crate::replace::probe_version(binary).map_err(|e| chain(&e))?;
        let span = tracing::info_span!("replace-supervisor", binary = %binary.display());
        let _entered = span.enter();
        self.detach_client(serving)?;
        match crate::replace::start_successor(binary, self.control.fd(), timeout) {
            Ok(new_pid) => {
                tracing::info!(new_pid, %new_version, "the new supervisor supervises the mount; exiting");
                Ok(ControlResponse::SupervisorUpgraded {
                    old_pid: std::process::id(),
                    new_pid,
                    new_version,
                })
            }
            Err(e) => {
                let reason = chain(&e);
                tracing::warn!(%reason, "the new supervisor failed: taking the client back");
                Err(format!("{reason}; {}", self.adopt_back(serving)))
            }
        }
    }

    /// Checks that the supervisor can let its client go now; the serving generation.
    fn can_let_go(&self) -> Result<Generation, String> {
        if self.stopping.is_some() {
            return Err("the supervisor is stopping".into());
        }
        if self.machine.phase() != PhaseKind::Idle {
            return Err(format!(
                "cannot hand the mount over while the client is {}; try again when it has finished",
                self.machine.phase().as_str()
            ));
        }
        let serving = self.machine.serving().generation;
        if !self.clients.contains_key(&serving) {
            return Err("no client serves".into());
        }
        Ok(serving)
    }

    /// Asks the serving client to wait for a new supervisor (it keeps serving).
    fn detach_client(&self, serving: Generation) -> Result<(), String> {
        let Some(client) = self.clients.get(&serving) else {
            return Err("no client serves".into());
        };
        channel::send(client.process.channel().as_fd(), &ToClient::Detach, &[]).map_err(|e| {
            format!(
                "cannot ask the client to wait for a new supervisor: {}",
                chain(&e)
            )
        })
    }

    /// `ControlRequest::HandOver` from a supervisor in another process tree (a new mount
    /// pod): the client waits for it on its adopt socket, the asker gets the control
    /// socket, adopts the client and confirms with `TookOver`. `Ok`: the asker supervises
    /// the mount. `Err`: why not; this supervisor serves on (its client adopted back).
    fn hand_over(&mut self, conn: &ControlConn, timeout: Duration) -> Result<Generation, String> {
        if conn.uid != 0 {
            return Err(format!(
                "only root may take a mount over (uid {} asked)",
                conn.uid
            ));
        }
        let serving = self.can_let_go()?;
        let span = tracing::info_span!("hand-over", to_pid = conn.pid);
        let _entered = span.enter();
        self.detach_client(serving)?;
        let answer = ControlResponse::HandingOver {
            supervisor_pid: std::process::id(),
        };
        if let Err(e) = conn.respond_with(&answer, &[self.control.fd()]) {
            let reason = chain(&e);
            return Err(format!("{reason}; {}", self.adopt_back(serving)));
        }
        tracing::info!("the client waits for the new supervisor");
        match conn.recv_request_within(timeout) {
            Ok(ControlRequest::TookOver) => {
                if let Err(e) = conn.respond(&ControlResponse::HandedOver) {
                    tracing::warn!(error = %chain(&e), "cannot confirm the hand-over (the new supervisor supervises anyway)");
                }
                tracing::info!(
                    "the new supervisor supervises the mount; exiting when the client has"
                );
                Ok(serving)
            }
            Ok(other) => {
                let reason = format!("the new supervisor sent {other:?} instead of TookOver");
                tracing::warn!(%reason, "taking the client back");
                Err(format!("{reason}; {}", self.adopt_back(serving)))
            }
            Err(e) => {
                let reason = format!("the new supervisor did not take over: {}", chain(&e));
                tracing::warn!(%reason, "taking the client back");
                Err(format!("{reason}; {}", self.adopt_back(serving)))
            }
        }
    }

    /// After a hand-over: the client this process started serves under another
    /// supervisor, but still belongs to this process (and, in a pod, to this container):
    /// wait until it exits (its successor committed, or it died), or a signal.
    fn wait_handed_over(&mut self, serving: Generation) {
        let Some(mut client) = self.clients.remove(&serving) else {
            return;
        };
        for (_, c) in std::mem::take(&mut self.clients) {
            c.process.release();
        }
        loop {
            let (exited, signal) = {
                let mut fds = [
                    PollFd::new(client.process.pidfd().as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                ];
                match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot wait for the handed-over client");
                        break;
                    }
                }
                (fds[0].any().unwrap_or(false), fds[1].any().unwrap_or(false))
            };
            if exited {
                let status = exit_info(client.process.reap(EXIT_TIMEOUT));
                tracing::info!(%status, "the handed-over client exited");
                return;
            }
            if signal {
                if let Some(sig) = read_signal(&self.signals) {
                    // Leaving kills the client with this pod; its supervisor restarts
                    // it from the write journal (a crash, not an error).
                    tracing::warn!(signal = %sig, "stopping while the handed-over client serves");
                    client.process.release();
                    return;
                }
            }
        }
    }

    /// After a failed supervisor replacement: adopts the serving client back (it waits on
    /// its adopt socket). Returns what happened, for the operator.
    fn adopt_back(&mut self, serving: Generation) -> String {
        let home = crate::home::Home::new(self.machine.serving().spec.home.clone());
        match crate::adopt::adopt(&home, &self.facts.mountpoint, Duration::from_secs(10)) {
            Ok(Some(adopted)) => {
                let channel = adopted.client.channel().try_clone();
                let pid = adopted.client.pid();
                adopted.client.release();
                match (channel, self.clients.get_mut(&serving)) {
                    (Ok(ch), Some(c)) if c.process.pid() == pid => {
                        if let Err(e) = nix::fcntl::fcntl(
                            &ch,
                            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                        ) {
                            tracing::warn!(error = %e, "cannot make the client channel non-blocking");
                        }
                        c.process.replace_channel(ch);
                        c.open = true;
                        c.queue.clear();
                        tracing::info!("the client is supervised by this supervisor again");
                        "this supervisor serves on".into()
                    }
                    (Err(e), _) => format!("cannot keep the client's channel ({e}): the client serves without a supervisor; run `baton mount` again"),
                    _ => "another client answered on the adopt socket: run `baton mount` again".into(),
                }
            }
            Ok(None) => "the client does not answer on its adopt socket; it serves without a supervisor until `baton mount` runs again".into(),
            Err(e) => format!(
                "cannot adopt the client back ({}); it serves without a supervisor until `baton mount` runs again",
                chain(&e)
            ),
        }
    }

    /// Ends the mount: every client but the serving one is killed; the serving one
    /// flushes and exits; the descriptor is closed last.
    fn end(mut self, end: End) -> Result<(), SuperviseError> {
        if let Some(conn) = self.pending.take() {
            let _ = conn.respond(&ControlResponse::Error {
                message: "the supervisor stopped during the upgrade".into(),
            });
        }
        let result = match end {
            End::Replaced(conn, response) => {
                self.control.keep_file();
                for (_, c) in std::mem::take(&mut self.clients) {
                    c.process.release();
                }
                if let Err(e) = conn.respond(&response) {
                    tracing::warn!(error = %chain(&e), "cannot answer `baton upgrade --supervisor`");
                }
                return Ok(());
            }
            End::HandedOver(serving) => {
                self.control.keep_file();
                self.wait_handed_over(serving);
                return Ok(());
            }
            End::Signal(sig) => {
                tracing::info!(signal = %sig, "stopping: detaching the mount");
                match mount::umount(&self.facts.mountpoint, true) {
                    Ok(()) | Err(UmountError::NotMounted(_)) => {}
                    Err(e) => tracing::warn!(error = %chain(&e), "cannot detach the mount"),
                }
                self.stop_clients()
            }
            End::Gone => self.stop_clients(),
            End::Unmounted(conn) => {
                let flush_error = self.stop_clients();
                let _ = conn.respond(&ControlResponse::Umounted {
                    flush_error: flush_error.clone(),
                });
                flush_error
            }
        };
        match result {
            None => {
                tracing::info!("stopped cleanly");
                Ok(())
            }
            Some(e) => Err(SuperviseError::Flush(e)),
        }
    }

    fn kill_all(&mut self) {
        for c in self.clients.values_mut() {
            c.process.kill();
            let _ = c.process.reap(EXIT_TIMEOUT);
        }
        self.clients.clear();
    }

    /// Kills the clients that do not serve; tells the serving one to shut down, waits for
    /// its answer, reaps it. Returns what it could not flush.
    fn stop_clients(&mut self) -> Option<String> {
        let serving = self.machine.serving().generation;
        let Some(mut client) = self.clients.remove(&serving) else {
            self.kill_all();
            return None;
        };
        self.kill_all();
        let sock = client.process.channel().as_fd();
        if let Err(e) = channel::send(sock, &ToClient::Shutdown, &[]) {
            tracing::warn!(error = %chain(&e), "cannot send Shutdown to the client");
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match channel::recv::<ToSupervisor>(sock, Some(left)) {
                Ok((ToSupervisor::ShutdownDone { error }, _)) => break error,
                Ok((other, _)) => {
                    tracing::debug!(message = %short(&other), "ignoring a message while the client shuts down");
                }
                Err(e) if would_block_recv(&e) => {}
                Err(e) if e.is_closed() => {
                    break Some("the client exited without answering Shutdown".into());
                }
                Err(e) => break Some(chain(&e)),
            }
        };
        let status = exit_info(client.process.reap(EXIT_TIMEOUT));
        tracing::info!(%status, "client exited");
        result
    }
}

/// Readable, or the peer hung up (a closed channel reads as end of file).
fn in_or_hup(f: &PollFd<'_>) -> bool {
    f.revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR))
}

fn read_signal(signals: &SignalFd) -> Option<Signal> {
    match signals.read_signal() {
        Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
        _ => None,
    }
}

fn short(msg: &ToSupervisor) -> String {
    format!("{msg:?}").chars().take(80).collect()
}
