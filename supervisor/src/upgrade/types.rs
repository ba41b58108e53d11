//! The vocabulary of the upgrade machine: time, requests, inputs it cannot refuse, the
//! actions it asks for, and what it reports. No I/O here either.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use handover_proto::control::UpgradeReport;
use handover_proto::message::{Generation, Hello, MountSpec, ToClient};

/// A point on CLOCK_MONOTONIC, in nanoseconds: the clock the client stamps `FirstServed`
/// with, so that the pause is one subtraction. (`std::time::Instant` is the same clock on
/// Linux but cannot be built from a number, and the machine's tests need a virtual one.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

/// A client process as the machine knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    pub generation: Generation,
    /// The executable it was started from (a restart reuses it).
    pub binary: PathBuf,
    pub version: String,
    pub hello: Hello,
    /// Its metadata session (a successor resumes it).
    pub session: u64,
    /// What it serves with.
    pub spec: MountSpec,
}

/// Client options that may change with an upgrade: none of them is visible to the kernel
/// (the mount options and the INIT parameters are frozen at the first mount).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientOptions {
    pub cache_dir: Option<PathBuf>,
    pub cache_bytes: Option<u64>,
}

impl ClientOptions {
    /// `spec` with these options applied.
    pub fn apply(&self, spec: &MountSpec) -> MountSpec {
        let mut s = spec.clone();
        if let Some(d) = &self.cache_dir {
            s.cache_dir = Some(d.clone());
        }
        if let Some(b) = self.cache_bytes {
            s.cache_bytes = b;
        }
        s
    }
}

/// `baton upgrade`, as the machine takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// `None`: the serving client's binary.
    pub binary: Option<PathBuf>,
    /// Bounds everything before the commit.
    pub timeout: Duration,
    /// Drain even where the kernel can resend.
    pub force_drain: bool,
    pub options: ClientOptions,
}

/// An upgrade request that cannot start now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestRefused {
    #[error("an upgrade of this mount is already in progress")]
    InProgress,
    #[error("the client is being restarted ({reason}); try again once it serves")]
    Restarting { reason: String },
    #[error("the mount is shutting down")]
    Ended,
}

/// How a client process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    Unknown(String),
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit status {c}"),
            ExitInfo::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            ExitInfo::Unknown(why) => write!(f, "unknown exit status: {why}"),
        }
    }
}

/// The end of one upgrade, for the `baton upgrade` that asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The new client serves.
    Upgraded(UpgradeReport),
    /// The new client does not serve; an older binary does (`reason` says why).
    RolledBack(UpgradeReport),
    /// Neither: the mount was lost, or restarts keep failing (`baton status` follows).
    Failed { message: String },
}

/// What the machine asks the driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start `binary` as client `generation` and send it `start` (a `ToClient::Start`).
    /// A failure is reported with [`super::Machine::handle_spawn_failed`].
    Spawn {
        generation: Generation,
        binary: PathBuf,
        start: ToClient,
    },
    /// Send `msg` to client `to`; `with_fuse_fd`: attach a copy of the supervisor's
    /// /dev/fuse descriptor (the supervisor keeps its own). A failure is reported with
    /// [`super::Machine::handle_send_failed`].
    Send {
        to: Generation,
        msg: ToClient,
        with_fuse_fd: bool,
    },
    /// SIGKILL client `generation` (its exit is reported as usual).
    Kill { generation: Generation },
    /// Write FUSE_NOTIFY_RESEND to /dev/fuse. Emitted only when no client reads, right
    /// before `Serve` to `generation` (which the request log is told: it then does not
    /// answer from the log what is re-delivered).
    WriteResend { generation: Generation },
    /// Answer the `baton upgrade` that is waiting.
    Report(Outcome),
    /// The FUSE connection ended (unmounted from outside): stop.
    MountGone { error: Option<String> },
}

/// Timings of the machine; the defaults are the production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long after `Serve` a successor's first request is awaited for the pause
    /// measurement (the pause is "until Serve" when no request comes). Requests that
    /// waited through the handover are queued in the kernel and served first, within
    /// milliseconds; a request that comes later did not wait for the upgrade. Short, so
    /// that `baton upgrade` of an idle mount answers quickly.
    pub confirm_window: Duration,
    /// How long an old client may take to exit after `Commit` before it is killed.
    pub exit_grace: Duration,
    /// How long a client may take to exit after `Shutdown` before it is killed.
    pub shutdown_grace: Duration,
    /// How long an old client may take to answer `Thaw`.
    pub thaw_timeout: Duration,
    /// Bound on one restart attempt, from spawn to its INIT reply.
    pub restart_timeout: Duration,
    /// Wait before the restart attempt that follows a failed one (the first attempt after
    /// a crash starts at once); doubles up to the max.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Failed restart attempts after which a waiting `baton upgrade` gets its answer
    /// (restarts go on).
    pub report_after_attempts: u32,
    /// How long after taking over a client is on probation: if it dies, its
    /// predecessor's binary is restarted from the state handed over (kept until then);
    /// after a crash restart, its death within the probation counts towards the crash
    /// loop's backoff unless it had answered a request.
    pub probation: Duration,
}

impl Default for Timings {
    fn default() -> Timings {
        Timings {
            confirm_window: Duration::from_millis(200),
            exit_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            thaw_timeout: Duration::from_secs(10),
            restart_timeout: Duration::from_secs(120),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            report_after_attempts: 3,
            probation: Duration::from_secs(30),
        }
    }
}

/// Counters for `baton status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub upgrades: u64,
    pub rollbacks: u64,
    /// Client processes started to replace one that died.
    pub restarts: u64,
    /// Pause of the last upgrade (0 when it rolled back before the freeze).
    pub last_pause: Option<Duration>,
    pub last_rollback: Option<String>,
    /// Why the last client that served died without being asked to.
    pub last_crash: Option<String>,
    /// From the death of the last crashed client to the first request its successor
    /// answered (or to `Serve` if none came).
    pub last_crash_pause: Option<Duration>,
}

/// A restart in progress, for status: why, how far, and when the next attempt starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartView {
    /// Why a client is being started (the death that caused it).
    pub reason: String,
    /// Attempts started so far (the current one included).
    pub attempts: u32,
    /// Why the last attempt failed, if one did.
    pub last_failure: Option<String>,
    /// When the next attempt starts (`None`: one is under way).
    pub next_attempt: Option<Timestamp>,
    /// The binary the next (or current) attempt runs.
    pub binary: PathBuf,
    /// Whether the restart has the state a predecessor handed over (else handles and
    /// lookups are rebuilt lazily).
    pub with_state: bool,
}

/// What the machine is doing, for status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseKind {
    Idle,
    Upgrading,
    RollingBack,
    Restarting,
    Ended,
}

impl PhaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseKind::Idle => "serving",
            PhaseKind::Upgrading => "upgrading",
            PhaseKind::RollingBack => "rolling back",
            PhaseKind::Restarting => "restarting",
            PhaseKind::Ended => "ended",
        }
    }
}
