//! The supervisor <-> client messages: start-up, live handover, shutdown.
//!
//! All of them travel on one `SOCK_SEQPACKET` socketpair per client, whose client end is
//! the only descriptor the client inherits.
//!
//! First mount:
//!
//! ```text
//! supervisor                                   client (baton-fs, generation 1)
//!   Start { generation, spec, None }     --->
//!                                        <---  Prepared { pid, version, hello, session }
//!                                              | Failed { reason }
//!   (mount(2), read the kernel's INIT)
//!   Init { request } + /dev/fuse fd      --->
//!                                              INIT relay through fuser
//!                                        <---  InitReply { reply } | Failed { reason }
//!   (check it, write it to /dev/fuse)
//!   Serve                                --->
//!                                              serves FUSE requests
//!   Shutdown                             --->
//!                                        <---  ShutdownDone { error }
//! ```
//!
//! `Failed` before `Prepared` means nothing was mounted; after `Init` the supervisor
//! answers the kernel's INIT with an error itself and unmounts.
//!
//! Live handover from generation N (old) to N+1 (new):
//!
//! ```text
//! supervisor              old (N, serving)              new (N+1)
//!   spawn, Start { N+1, spec, Some(session) } ------------->
//!                                            <------------- Prepared { hello }
//!   versions/capabilities: hello(old) ∩ hello(new), else roll back (old never paused)
//!   PreFlush ------------> flushes while serving
//!            <------------ PreFlushed
//!   Freeze { mode, v } --> parks (resend) or drains; flushes; exports state v
//!            <------------ State(chunk) ... Frozen
//!   State(chunk) ... , Init { saved request } + fd -------->  imports, INIT relay
//!                                            <------------- InitReply (must equal the
//!                                                            reply the kernel has)
//!   Commit --------------> _exit(0) (no unmount, no session close)
//!   reap old; write FUSE_NOTIFY_RESEND (resend mode)
//!   Serve -------------------------------------------------> dup3, serve
//!                                            <------------- FirstServed { t }
//! ```
//!
//! Any failure before `Commit` rolls back: the new client gets `Shutdown`, the old one
//! `Thaw` (it runs what it parked and serves on).

use std::fmt;
use std::path::PathBuf;

use crate::channel::WireMessage;
use crate::codec::{Decode, Encode};

/// The environment variable that tells `baton-fs` the number of its end of the handover
/// socketpair, the only descriptor it inherits.
pub const CHANNEL_FD_ENV: &str = "BATON_HANDOVER_FD";

/// Generation of a client process for one mount: 1 for the first, +1 for each successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Encode, Decode)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a client is to serve, as decided by the supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MountSpec {
    /// Volume name (from the volume's format).
    pub volume: String,
    /// Metadata engine URL (`redb:///…`, `redis://…`).
    pub meta_url: String,
    /// Absolute mountpoint.
    pub mountpoint: PathBuf,
    /// Baton's data directory (`$BATON_HOME`).
    pub home: PathBuf,
    /// FUSE reader threads.
    pub threads: u32,
    /// Kernel attribute cache lifetime, in milliseconds.
    pub attr_ttl_ms: u64,
    /// Kernel dentry cache lifetime, in milliseconds.
    pub entry_ttl_ms: u64,
    /// Block cache directory; `None` for the default under `home`.
    pub cache_dir: Option<PathBuf>,
    /// Block cache size bound in bytes.
    pub cache_bytes: u64,
}

/// Versions and capabilities a client supports, announced in `Prepared` (EdenFS-style:
/// the supervisor uses the intersection of the old and the new client's).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// Client state schema versions it can export and import ([`crate::state`]).
    pub state_versions: Vec<u16>,
    /// Capability names ([`capability`]).
    pub capabilities: Vec<String>,
}

/// Capability names a client may announce.
pub mod capability {
    /// Can freeze by parking requests (not executing, not answering) for a successor to
    /// receive again through FUSE_NOTIFY_RESEND.
    pub const PARK_RESEND: &str = "park-resend";
    /// Can freeze by draining: finish every request it has read, then stop reading.
    pub const DRAIN: &str = "drain";
    /// Can take over a live connection from a predecessor's state.
    pub const TAKEOVER: &str = "takeover";
    /// Reads requests into the mount's request log (`crate::reqlog`), answers the
    /// requests a dead predecessor left in it, and can freeze in
    /// [`super::FreezeMode::DrainLog`]. Such a client is sent `ToClient::RequestLog`
    /// after its `Prepared`, and answers `ToClient::SendRequestLog`.
    pub const REQUEST_LOG: &str = "request-log";
    /// Old client: answers `ToClient::PreExport` (exports its state while serving, then
    /// only the changes since inside the freeze). New client: stages such a base
    /// (`ToClient::BaseState`) before the freeze and applies the changes after it. Used
    /// when both clients announce it.
    pub const STATE_DELTA: &str = "state-delta";
}

/// How an old client stops serving for a handover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub enum FreezeMode {
    /// Park requests read after the freeze; the supervisor has the kernel resend them to
    /// the successor (kernels with FUSE_HAS_RESEND, >= 6.9).
    Resend,
    /// Finish every request read, then stop reading (kernels without resend).
    Drain,
    /// Drain, except that a blocking lock wait gives way as in a resend freeze: it stays
    /// unanswered in the request log, and the successor answers it from there (both
    /// clients announce [`capability::REQUEST_LOG`]). Reported as `Drain`.
    DrainLog,
}

/// One piece of an encoded client state (states can exceed one frame).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StateChunk {
    /// 0-based position of this chunk.
    pub index: u32,
    /// How many chunks the state has.
    pub total: u32,
    pub data: Vec<u8>,
}

/// Supervisor -> client.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ToClient {
    /// Open the filesystem (metadata, data store, session); do not touch FUSE yet.
    /// `resume_session`: the metadata session of the mount, which a successor keeps
    /// (its locks and open-but-unlinked files stay valid); `None` opens a new one.
    /// Carries one descriptor: the mount's write journal, a memfd the supervisor created
    /// at mount time and keeps for the life of the mount, so that writes a client
    /// acknowledged but had not committed survive its crash (the next client replays
    /// them before it serves).
    Start {
        generation: Generation,
        spec: MountSpec,
        resume_session: Option<u64>,
    },
    /// The kernel's FUSE_INIT request, as read from /dev/fuse. Carries one descriptor: the
    /// /dev/fuse connection. To a successor, after its state chunks.
    Init { request: Vec<u8> },
    /// The INIT reply reached the kernel (first mount), or the predecessor is gone and
    /// its unanswered requests were resent (successor): start serving.
    Serve,
    /// The mount is gone or going: flush, close the session, answer, exit.
    Shutdown,
    /// Old client: flush written data while still serving (so the freeze only flushes
    /// what is written after this). Answered by `PreFlushed`.
    PreFlush,
    /// Old client: stop executing requests in `mode`, let executing ones finish, flush,
    /// export the state in schema `state_version` (after a `PreExport`: only the changes
    /// since its base, a `state::StateDelta`). Answered by `StateChunk`s then `Frozen`,
    /// or `FreezeFailed` (and the client serves on).
    Freeze {
        mode: FreezeMode,
        state_version: u16,
    },
    /// Old client: the handover failed; serve again (parked requests run now). Answered by
    /// `Thawed`. Harmless when not frozen.
    Thaw,
    /// Old client: the successor is ready; exit now without unmounting, closing the
    /// session or answering anything. Not answered: the supervisor reaps the process.
    Commit,
    /// Successor: a piece of the predecessor's state, before `Init`.
    State(StateChunk),
    /// A new supervisor, on the adopt socket of a serving client whose supervisor is gone
    /// (or asked it to listen with `Detach`): take me as your supervisor. Answered by
    /// `Adopted`; from then on that connection is the client's handover channel.
    Adopt { supervisor_pid: u32 },
    /// Serving client: the supervisor is being replaced (`baton upgrade --supervisor`);
    /// listen on the adopt socket for its successor, and keep serving. Not answered.
    Detach,
    /// The mount's request log (`crate::reqlog`), a memfd the supervisor keeps for the
    /// life of the mount. Carries one descriptor. Sent right after `Prepared` to a client
    /// that announces [`capability::REQUEST_LOG`]; the client touches the log only once
    /// told to `Serve`. Not answered.
    RequestLog,
    /// From a supervisor that adopted this client: send me your request log. Sent only to
    /// a client whose `Adoption` announces [`capability::REQUEST_LOG`]. Answered by
    /// `ToSupervisor::RequestLog`.
    SendRequestLog,
    /// Old client (both announce [`capability::STATE_DELTA`]), instead of `PreFlush`:
    /// flush written data and export the state in schema `state_version` while still
    /// serving, as `StateChunk`s, then answer `PreFlushed`. From then on it records what
    /// changes, and the next `Freeze` exports only that (a `state::StateDelta`). A
    /// `PreFlush` or `Thaw` drops the base. Since format 1.1.
    PreExport { state_version: u16 },
    /// Successor: a piece of the predecessor's state exported before the freeze (the
    /// base), before any `State`. With the last piece it decodes, checks and stages it,
    /// and answers `BaseStaged`; the `State` chunks that follow are then the changes since
    /// the base. Since format 1.1.
    BaseState(StateChunk),
}

/// Client -> supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ToSupervisor {
    /// The filesystem is open and ready for the INIT relay (and, for a successor, for the
    /// state). `session` is the metadata session it uses.
    Prepared {
        pid: u32,
        version: String,
        hello: Hello,
        session: u64,
    },
    /// The client cannot go on; `reason` is meant for the operator.
    Failed { reason: String },
    /// The filesystem's reply to the INIT request, to be written to /dev/fuse (first
    /// mount) or compared with the one the kernel got (successor: it must be identical).
    InitReply { reply: Vec<u8> },
    /// Answer to `Shutdown`: `error` says what could not be flushed or closed.
    ShutdownDone { error: Option<String> },
    /// Unsolicited: the FUSE connection ended (the mount was removed by somebody else);
    /// the client has flushed and waits for `Shutdown`. `error` as in `ShutdownDone`.
    SessionEnded { error: Option<String> },
    /// Answer to `PreFlush`.
    PreFlushed { error: Option<String> },
    /// Old client: a piece of its exported state, after `Freeze`.
    State(StateChunk),
    /// Old client: frozen, every state chunk sent. `parked`: requests read and held
    /// unexecuted (resend mode); `drained`: requests finished after the freeze (drain).
    Frozen { parked: u32, drained: u32 },
    /// Old client: could not freeze (e.g. flushing failed); it serves on.
    FreezeFailed { reason: String },
    /// Answer to `Thaw`: serving again.
    Thawed,
    /// Successor: its first request after `Serve` was answered, at this CLOCK_MONOTONIC
    /// time (nanoseconds; same clock as the supervisor's, same host).
    FirstServed { monotonic_ns: u64 },
    /// Answer to `Adopt`: everything a supervisor that did not start this client needs to
    /// supervise it. Carries the /dev/fuse connection, then the write journal if
    /// `adoption.journal`.
    Adopted(Box<Adoption>),
    /// Answer to `SendRequestLog`: carries the request log's descriptor when `held`.
    RequestLog { held: bool },
    /// Successor: answer to the last `BaseState` chunk; `error` says why the base
    /// cannot be used (the upgrade rolls back). Since format 1.1.
    BaseStaged { error: Option<String> },
}

/// A serving client, as a supervisor that adopts it must know it (`Adopted`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Adoption {
    pub pid: u32,
    pub version: String,
    pub hello: Hello,
    /// The metadata session of the mount.
    pub session: u64,
    pub generation: Generation,
    pub spec: MountSpec,
    /// The kernel's FUSE_INIT request and the reply the kernel got (a successor replays
    /// the one and must reproduce the other).
    pub init_request: Vec<u8>,
    pub init_reply: Vec<u8>,
    /// Whether a write journal descriptor follows the FUSE one.
    pub journal: bool,
}

impl WireMessage for ToClient {
    fn fd_count(&self) -> usize {
        match self {
            ToClient::Init { .. } | ToClient::Start { .. } | ToClient::RequestLog => 1,
            ToClient::Adopt { .. } | ToClient::Detach | ToClient::SendRequestLog => 0,
            ToClient::Serve
            | ToClient::Shutdown
            | ToClient::PreFlush
            | ToClient::Freeze { .. }
            | ToClient::Thaw
            | ToClient::Commit
            | ToClient::State(_)
            | ToClient::PreExport { .. }
            | ToClient::BaseState(_) => 0,
        }
    }
}

impl WireMessage for ToSupervisor {
    fn fd_count(&self) -> usize {
        match self {
            ToSupervisor::Prepared { .. }
            | ToSupervisor::Failed { .. }
            | ToSupervisor::InitReply { .. }
            | ToSupervisor::ShutdownDone { .. }
            | ToSupervisor::SessionEnded { .. }
            | ToSupervisor::PreFlushed { .. }
            | ToSupervisor::State(_)
            | ToSupervisor::Frozen { .. }
            | ToSupervisor::FreezeFailed { .. }
            | ToSupervisor::Thawed
            | ToSupervisor::FirstServed { .. }
            | ToSupervisor::BaseStaged { .. } => 0,
            ToSupervisor::Adopted(a) => 1 + usize::from(a.journal),
            ToSupervisor::RequestLog { held } => usize::from(*held),
        }
    }
}
