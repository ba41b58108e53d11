//! The control API: requests from the CLI (and later the CSI node plugin) to the
//! supervisor of one mount, over that mount's control socket (`SOCK_SEQPACKET`, one
//! request and one response per connection).

use std::path::PathBuf;

use crate::channel::WireMessage;
use crate::codec::{Decode, Encode};
use crate::message::Generation;

/// CLI -> supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ControlRequest {
    /// Unmount and stop. Without `lazy`, a busy mount is left serving and the answer is
    /// [`ControlResponse::Busy`]; with it, the mount is detached (MNT_DETACH).
    Umount { lazy: bool },
    /// Report on the mount.
    Status,
    /// Replace the client by a new process of `binary` (`None`: the current client's
    /// binary) without unmounting. `timeout_ms` bounds everything before the commit;
    /// `force_drain` uses drain mode even where the kernel can resend. `cache_dir` and
    /// `cache_bytes` change the new client's block cache (client options may change with
    /// an upgrade; what the kernel saw at mount time may not).
    Upgrade {
        binary: Option<PathBuf>,
        timeout_ms: u64,
        force_drain: bool,
        cache_dir: Option<PathBuf>,
        cache_bytes: Option<u64>,
    },
    /// Report on the mount and on its client's health (a restart in progress, the last
    /// crash). Added after the first release of format 1.0: a supervisor that predates it
    /// cannot decode it and closes the connection.
    Health,
    /// Replace the supervisor by a process of `binary` (`baton upgrade --supervisor`)
    /// keeping the mount, its /dev/fuse connection, the control socket and the serving
    /// client. Answered by [`ControlResponse::SupervisorUpgraded`] or `Error` (the old
    /// supervisor then serves on). `timeout_ms` bounds the new supervisor's start.
    UpgradeSupervisor { binary: PathBuf, timeout_ms: u64 },
    /// From a new supervisor in another process tree (a new mount pod): take the mount
    /// over. The supervisor asks its client to wait for a new supervisor and answers
    /// [`ControlResponse::HandingOver`] with its control socket; the asker adopts the
    /// client and confirms with [`ControlRequest::TookOver`] on the same connection
    /// within `timeout_ms`, or the supervisor adopts its client back and serves on.
    HandOver { timeout_ms: u64 },
    /// The second message of a [`ControlRequest::HandOver`] exchange: the asker
    /// supervises the client now. Answered by [`ControlResponse::HandedOver`]; the old
    /// supervisor stops serving the control socket and exits when its client has.
    TookOver,
    /// Report on the mount, its client's health and how it survives a crash
    /// ([`FuseMode`]). Answered by [`ControlResponse::Description`]; a supervisor that
    /// predates it closes the connection (ask [`ControlRequest::Health`] then).
    Describe,
}

/// Supervisor -> CLI.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ControlResponse {
    /// Unmounted; the client flushed and exited.
    Umounted {
        /// What the client could not flush or close, if anything.
        flush_error: Option<String>,
    },
    /// The mount is in use; nothing was changed.
    Busy,
    Status(MountStatus),
    /// The new client serves.
    Upgraded(UpgradeReport),
    /// The upgrade failed and the old client serves on; `report.reason` says why.
    RolledBack(UpgradeReport),
    /// The request failed; the mount is unchanged unless the message says otherwise.
    Error {
        message: String,
    },
    /// The answer to [`ControlRequest::Health`].
    Health {
        status: MountStatus,
        health: ClientHealth,
    },
    /// The new supervisor (`new_pid`) supervises the mount; the old one exits.
    SupervisorUpgraded {
        old_pid: u32,
        new_pid: u32,
        new_version: String,
    },
    /// The first answer to [`ControlRequest::HandOver`]: the client waits on its adopt
    /// socket; carries the control socket's listening descriptor.
    HandingOver {
        supervisor_pid: u32,
    },
    /// The answer to [`ControlRequest::TookOver`].
    HandedOver,
    /// The answer to [`ControlRequest::Describe`].
    Description(Box<MountDescription>),
}

/// Everything `baton status` shows of a mount.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MountDescription {
    pub status: MountStatus,
    pub health: ClientHealth,
    pub fuse: FuseMode,
}

/// How the mount's FUSE connection survives a client that dies or is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct FuseMode {
    /// The kernel offered FUSE_HAS_RESEND (Linux >= 6.9).
    pub kernel_resend: bool,
    /// The mount was made with `--no-resend`: it behaves as on a kernel without it.
    pub resend_disabled: bool,
    /// The supervisor holds a request log (`crate::reqlog`) for its clients: without
    /// resend, a successor answers from it what a dead client had read.
    pub request_log: bool,
}

impl FuseMode {
    /// Whether FUSE_NOTIFY_RESEND is used (else upgrades drain and crashes recover
    /// through the request log).
    pub fn resend(&self) -> bool {
        self.kernel_resend && !self.resend_disabled
    }
}

/// What the supervisor knows of its client beyond [`MountStatus`]: whether one serves,
/// and if not, why and when the next attempt starts.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ClientHealth {
    /// `serving`, `upgrading`, `rolling back`, `restarting` or `ended`.
    pub state: String,
    /// Why the state is not `serving`, for a human: e.g. "the client (generation 3)
    /// exited unexpectedly (killed by SIGKILL); attempt 4 failed: ...".
    pub reason: Option<String>,
    /// Restart attempts of the restart in progress (0 when none is).
    pub restart_attempts: u32,
    /// When the next restart attempt starts, in milliseconds from now (`None`: no restart
    /// is waiting).
    pub next_attempt_ms: Option<u64>,
    /// Why the last client that served died without being asked to.
    pub last_crash: Option<String>,
    /// From that death to the first request its successor answered, in microseconds.
    pub last_crash_pause_us: Option<u64>,
}

/// A mount as its supervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MountStatus {
    pub mountpoint: PathBuf,
    pub volume: String,
    pub meta_url: String,
    pub supervisor_pid: u32,
    pub generation: Generation,
    pub client_pid: u32,
    pub client_version: String,
    /// Since the mount was made, in milliseconds.
    pub uptime_ms: u64,
    /// FUSE ABI minor version negotiated at the first mount.
    pub fuse_minor: u32,
    /// Largest write request, negotiated at the first mount.
    pub max_write: u32,
    /// Whether the kernel offered FUSE_HAS_RESEND (else upgrades drain).
    pub resend: bool,
    /// Successful upgrades since the mount was made.
    pub upgrades: u64,
    /// Upgrades that rolled back.
    pub rollbacks: u64,
    /// Client processes restarted after they died.
    pub restarts: u64,
    /// Pause of the last upgrade (freeze to first request served), in microseconds.
    pub last_pause_us: Option<u64>,
    /// Why the last upgrade rolled back, if it did.
    pub last_rollback: Option<String>,
}

/// The outcome of one upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct UpgradeReport {
    pub old_generation: Generation,
    pub old_version: String,
    /// The generation that serves after the upgrade (the old one after a rollback).
    pub new_generation: Generation,
    pub new_version: String,
    /// `Resend` or `Drain`, once chosen.
    pub mode: Option<crate::message::FreezeMode>,
    /// From the freeze to the first request answered by the successor (or to `Serve` if
    /// no request came), in microseconds; for a rollback, how long the old client was
    /// frozen (0 if it never was).
    pub pause_us: u64,
    /// Requests the old client parked (resend) or finished while draining.
    pub handed_over_requests: u32,
    /// Wall time of the whole upgrade, in microseconds.
    pub total_us: u64,
    /// Why it rolled back.
    pub reason: Option<String>,
}

impl WireMessage for ControlRequest {
    fn fd_count(&self) -> usize {
        0
    }
}

impl WireMessage for ControlResponse {
    fn fd_count(&self) -> usize {
        match self {
            ControlResponse::HandingOver { .. } => 1,
            _ => 0,
        }
    }
}
