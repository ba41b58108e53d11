//! The client process runtime (`baton-fs`): talk to the supervisor over the inherited
//! handover socket, open the filesystem, run the INIT relay, serve, hand over, shut down.
//!
//! The sequences are drawn in `handover_proto::message`. The client never mounts or
//! unmounts: it is handed a connection. It opens everything that can fail (metadata
//! engine, object storage, session) *before* the supervisor mounts or freezes the old
//! client, so that a bad volume never leaves a dead mount or a paused one behind, and
//! reports failures to the supervisor as `Failed { reason }` with the whole error chain.
//!
//! A client is either the first of its mount (`Start { resume_session: None }`: it opens
//! a new metadata session) or a successor (`Some(session)`: it resumes its predecessor's
//! session, receives its state — or none, when the predecessor crashed: then handles are
//! rebuilt from their numbers and the session's locks and open-but-unlinked files are read
//! from the metadata engine — and takes over the connection without FUSE_INIT). Until
//! it serves, a successor never closes the session and never touches the connection: if
//! it gives up or is told to, its predecessor serves on with the same session.
//!
//! After `Serve`, fuser's reader threads serve the kernel while the main thread handles
//! the supervisor's messages (pre-flush, freeze, thaw, commit, shutdown) and the end of
//! the FUSE connection. A freeze runs on its own thread so that a `Thaw` can cancel it.

use std::error::Error as StdError;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::message::{
    FreezeMode, Generation, Hello, MountSpec, ToClient, ToSupervisor, capability,
};
use handover_proto::state::Assembler;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};

use crate::fuse::adapter::BatonFs;
use crate::fuse::park::{Gate, Phase};
use crate::fuse::probe::KernelInodes;
use crate::fuse::recover;
use crate::fuse::relay::{self, RelayError};
use crate::fuse::reqlog::RequestLog;
use crate::handover::{self, Connection, Freezer, ImportError};
use crate::meta::SessionId;
use crate::vfs::{OpenError, Vfs, VfsConfig};

mod adopt;

/// The environment variable that names the inherited handover socket descriptor.
pub use handover_proto::message::CHANNEL_FD_ENV;

/// An error of the filesystem being served, from outside this module.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The version of this crate, reported by the default build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Workers of the tokio runtime the data path runs on.
const IO_WORKERS: usize = 4;
/// How long a blocking shutdown of the runtime may take at exit.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

/// What a client binary is: the version it reports and what it can do in a handover.
/// `baton-fs` runs [`BuildInfo::default`]; a test binary may announce another version
/// or fewer capabilities to exercise upgrades between different builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    /// Capability names (`handover_proto::message::capability`).
    pub capabilities: Vec<String>,
    /// Client state schema versions it exports and imports.
    pub state_versions: Vec<u16>,
}

impl Default for BuildInfo {
    fn default() -> Self {
        BuildInfo {
            version: VERSION.to_string(),
            capabilities: [
                capability::PARK_RESEND,
                capability::DRAIN,
                capability::TAKEOVER,
                capability::REQUEST_LOG,
                capability::STATE_DELTA,
            ]
            .map(String::from)
            .to_vec(),
            state_versions: handover_proto::state::SUPPORTED_VERSIONS.to_vec(),
        }
    }
}

impl BuildInfo {
    fn hello(&self) -> Hello {
        Hello {
            state_versions: self.state_versions.clone(),
            capabilities: self.capabilities.clone(),
        }
    }

    fn can(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }
}

/// Opens the volume `spec` names: metadata engine, volume settings, object storage,
/// session — a new one, or `resume` ([`Vfs::open`]).
pub fn open_volume(
    spec: &MountSpec,
    build: &BuildInfo,
    resume: Option<SessionId>,
    rt: tokio::runtime::Handle,
) -> Result<Arc<Vfs>, OpenError> {
    let mut config = VfsConfig::new(
        spec.meta_url.clone(),
        spec.mountpoint.display().to_string(),
        spec.home.clone(),
    );
    config.attr_ttl = Duration::from_millis(spec.attr_ttl_ms);
    config.entry_ttl = Duration::from_millis(spec.entry_ttl_ms);
    config.cache_dir = spec.cache_dir.clone();
    config.cache_bytes = spec.cache_bytes;
    config.version = build.version.clone();
    config.resume_session = resume;
    Vfs::open(config, rt)
}

/// The client could not run or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{CHANNEL_FD_ENV} is not set to a descriptor number (baton-fs is started by `baton mount`)"
    )]
    NoChannel,
    #[error("{CHANNEL_FD_ENV}={fd} is not an open socket")]
    BadChannel {
        fd: RawFd,
        #[source]
        source: Errno,
    },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot receive from the supervisor")]
    Recv(#[source] RecvError),
    #[error("cannot send to the supervisor")]
    Send(#[source] SendError),
    #[error("the supervisor sent {got} while waiting for {expected}")]
    Unexpected { expected: &'static str, got: String },
    #[error("cannot open the filesystem")]
    Open(#[source] OpenError),
    #[error("the predecessor's state is incomplete or invalid")]
    State(#[source] handover_proto::state::StateError),
    #[error("the predecessor's state is in schema version {0}, which this build does not announce")]
    StateVersion(u16),
    #[error("the predecessor's base state came without the changes since it")]
    NoDelta,
    #[error("cannot take over the predecessor's state")]
    Import(#[source] ImportError),
    #[error("cannot read what the crashed predecessor's session holds")]
    CrashTakeover(#[source] crate::meta::MetaError),
    #[error("the INIT relay failed")]
    Relay(#[source] RelayError),
    #[error("cannot take the write journal over")]
    Journal(#[source] crate::data::JournalError),
    #[error("cannot start the FUSE session thread")]
    Spawn(#[source] std::io::Error),
    #[error("flushing and closing the filesystem failed")]
    Shutdown(#[source] BoxError),
}

/// Takes ownership of the handover socket named by [`CHANNEL_FD_ENV`] and makes it
/// close-on-exec (nothing this process starts may inherit it).
pub fn channel_from_env() -> Result<OwnedFd, ClientError> {
    let fd: RawFd = std::env::var(CHANNEL_FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or(ClientError::NoChannel)?;
    // SAFETY: only checks the descriptor number; the borrow ends with this statement.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let st = fstat(borrowed).map_err(|source| ClientError::BadChannel { fd, source })?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(ClientError::BadChannel {
            fd,
            source: Errno::ENOTSOCK,
        });
    }
    // SAFETY: the supervisor left exactly this descriptor open for us and nothing else in
    // this process refers to it (it is not a standard stream, and it is taken once: the
    // variable is removed below).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: no other thread reads the environment while the client starts.
    unsafe { std::env::remove_var(CHANNEL_FD_ENV) };
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|source| ClientError::BadChannel { fd, source })?;
    Ok(owned)
}

/// The error and its causes on one line, for the operator.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

const USAGE: &str = "\
Baton's filesystem client (started by `baton mount`, never by hand).

Usage: baton-fs [--log-format text|json]

Options:
      --log-format <FORMAT>  Log output format, on stderr [default: text]
  -h, --help                 Print help
  -V, --version              Print version
";

/// The process entry point of a client binary: parses the command line, sets up logging,
/// runs the client on the inherited handover socket, and exits. Ends the process itself
/// when the client is done (fuser's reader threads cannot be stopped otherwise).
pub fn client_main(build: BuildInfo) -> ExitCode {
    let mut format = LogFormat::Text;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = match a.split_once('=') {
            Some(("--log-format", v)) => Some(v.to_string()),
            _ if a == "--log-format" => args.next(),
            _ => None,
        };
        match (a.as_str(), value.as_deref()) {
            (_, Some("text")) => format = LogFormat::Text,
            (_, Some("json")) => format = LogFormat::Json,
            ("-h" | "--help", _) => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            ("-V" | "--version", _) => {
                println!("baton-fs {}", build.version);
                return ExitCode::SUCCESS;
            }
            _ => {
                eprint!("baton-fs: invalid argument {a:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match channel_from_env().and_then(|channel| run(channel, &build)) {
        // Exit now: fuser's reader threads cannot be stopped otherwise.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "baton-fs failed");
            std::process::exit(1)
        }
    }
}

fn send(sock: BorrowedFd<'_>, msg: &ToSupervisor) -> Result<(), ClientError> {
    channel::send(sock, msg, &[]).map_err(ClientError::Send)
}

/// Sends `msg`, logging a failure (the supervisor is gone; there is nobody to tell).
fn send_or_log(sock: BorrowedFd<'_>, msg: &ToSupervisor) {
    if let Err(e) = send(sock, msg) {
        tracing::warn!(error = %error_chain(&e), "cannot send to the supervisor");
    }
}

/// Tells the supervisor why this client gives up, then returns `err` (which the caller
/// logs).
fn fail(sock: BorrowedFd<'_>, err: ClientError) -> ClientError {
    send_or_log(
        sock,
        &ToSupervisor::Failed {
            reason: error_chain(&err),
        },
    );
    err
}

fn unexpected(expected: &'static str, got: &ToClient) -> ClientError {
    let got = format!("{got:?}");
    let got = got.chars().take(80).collect();
    ClientError::Unexpected { expected, got }
}

/// CLOCK_MONOTONIC now, in nanoseconds (the supervisor reads the same clock).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Runs a client on the handover socket `channel` until its volume is closed (or it
/// hands over: then the process exits inside). The caller should then exit the process.
pub fn run(channel: OwnedFd, build: &BuildInfo) -> Result<(), ClientError> {
    let channel = Arc::new(channel);
    let sock = channel.as_fd();

    let (msg, mut fds) = channel::recv::<ToClient>(sock, None).map_err(ClientError::Recv)?;
    let (generation, spec, resume) = match msg {
        ToClient::Start {
            generation,
            spec,
            resume_session,
        } => (generation, spec, resume_session.map(SessionId)),
        ToClient::Shutdown => return Ok(()),
        other => return Err(fail(sock, unexpected("Start", &other))),
    };
    // The mount's write journal (the channel checked that Start carries one fd). The
    // data path keeps acknowledged, uncommitted writes in it.
    let journal = fds.pop();
    // Kept for a supervisor that adopts this client (see `adopt`). Never closed while the
    // process lives: closing any descriptor of the journal would drop its record lock.
    let journal_keep = journal
        .as_ref()
        .and_then(|fd| fd.try_clone().ok())
        .map(Arc::new);
    let span = tracing::info_span!("client", %generation, mountpoint = %spec.mountpoint.display());
    let _entered = span.enter();
    tracing::info!(volume = %spec.volume, meta = %crate::meta::redis::redact(&spec.meta_url), version = %build.version, successor = resume.is_some(), "starting");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(IO_WORKERS)
        .thread_name("baton-io")
        .enable_all()
        .build()
        .map_err(|e| fail(sock, ClientError::Runtime(e)))?;

    let vfs = open_volume(&spec, build, resume, rt.handle().clone())
        .map_err(|e| fail(sock, ClientError::Open(e)))?;
    // Handle numbers of this generation never repeat one a crashed predecessor gave out.
    vfs.set_handle_epoch(generation.0);
    let journaled = attach_journal(&vfs, journal);
    let mut client = Client {
        channel: channel.clone(),
        build: build.clone(),
        generation,
        spec,
        vfs,
        resumed: resume.is_some(),
        served: false,
        closed: None,
        fuse: None,
        journal: journal_keep,
        request_log: None,
    };
    let result = journaled
        .map_err(|e| fail(sock, e))
        .and_then(|()| client.serve());
    if result.is_err() && !client.served {
        if client.resumed {
            // The predecessor serves on with this session (or the supervisor starts
            // another successor on it): leave it alone.
            client.vfs.abandon();
        } else {
            // Nothing was served: the session is closed, not left to go stale.
            client.close();
        }
    }
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

enum Event {
    FromSupervisor(ToClient),
    SupervisorGone(Option<RecvError>),
    SessionEnded(std::io::Result<()>),
    /// A new supervisor adopted this client: its handover channel.
    Adopted(OwnedFd),
}

/// One client process and its volume.
struct Client {
    channel: Arc<OwnedFd>,
    build: BuildInfo,
    generation: Generation,
    spec: MountSpec,
    vfs: Arc<Vfs>,
    /// Took over a predecessor's session.
    resumed: bool,
    /// Got `Serve` and started serving: the session is this client's now.
    served: bool,
    /// The outcome of the one flush-and-close of the volume.
    closed: Option<Option<String>>,
    /// This client's descriptors of the FUSE connection (once serving) and of the write
    /// journal, for a supervisor that adopts it.
    fuse: Option<Arc<OwnedFd>>,
    journal: Option<Arc<OwnedFd>>,
    /// The mount's request log (`ToClient::RequestLog`), and a descriptor of it kept for a
    /// supervisor that adopts this client.
    request_log: Option<HeldLog>,
}

/// The mount's request log as a client holds it.
struct HeldLog {
    /// For a supervisor that adopts this client.
    fd: Arc<OwnedFd>,
    /// Mapped, with the slots reserved for the reader threads, until `Serve` uses it
    /// (`None` after that, or if the log is unusable).
    unused: Option<(RequestLog, Vec<u32>)>,
}

impl Client {
    fn sock(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Flushes and closes the volume once; later calls return the first outcome.
    fn close(&mut self) -> Option<String> {
        if let Some(r) = &self.closed {
            return r.clone();
        }
        let r = match self.vfs.shutdown() {
            Ok(()) => {
                tracing::info!("volume flushed and closed");
                None
            }
            Err(e) => {
                let msg = error_chain(&e);
                tracing::error!(error = %msg, "flushing or closing the volume failed");
                Some(msg)
            }
        };
        self.closed = Some(r.clone());
        r
    }

    /// Answers a `Shutdown` before serving. A successor leaves the session to its
    /// predecessor and never touched FUSE; a first client closes the session.
    fn shutdown_early(&mut self) -> Result<(), ClientError> {
        tracing::info!(
            successor = self.resumed,
            "supervisor asked to shut down before serving"
        );
        let error = if self.resumed {
            self.vfs.abandon();
            None
        } else {
            self.close()
        };
        send(
            self.sock(),
            &ToSupervisor::ShutdownDone {
                error: error.clone(),
            },
        )?;
        match error {
            None => Ok(()),
            Some(e) => Err(ClientError::Shutdown(e.into())),
        }
    }

    /// Everything after the volume is open: state, INIT relay, serving, handing over.
    fn serve(&mut self) -> Result<(), ClientError> {
        let sock = self.channel.clone();
        let sock = sock.as_fd();
        send(
            sock,
            &ToSupervisor::Prepared {
                pid: std::process::id(),
                version: self.build.version.clone(),
                hello: self.build.hello(),
                session: self.vfs.session().0,
            },
        )?;
        tracing::info!(session = %self.vfs.session(), "volume open; waiting for the {}", if self.resumed { "state and the INIT" } else { "kernel's INIT" });

        // A successor receives its predecessor's state before the INIT: whole, or a base
        // (staged while the predecessor serves on) and then the changes since.
        let mut assembler = Assembler::default();
        let mut state_bytes = None;
        let mut base = Assembler::default();
        let mut staged: Option<handover::Staged> = None;
        let (request, fuse) = loop {
            let (msg, mut fds) =
                channel::recv::<ToClient>(sock, None).map_err(ClientError::Recv)?;
            match msg {
                ToClient::BaseState(chunk)
                    if self.resumed && staged.is_none() && state_bytes.is_none() =>
                {
                    let done = match base.push(chunk) {
                        Ok(done) => done,
                        Err(e) => return Err(self.base_refused(ClientError::State(e))),
                    };
                    if let Some(bytes) = done {
                        let started = Instant::now();
                        match self.stage(&bytes) {
                            Ok(st) => {
                                tracing::info!(lookups = st.lookups(), elapsed = ?started.elapsed(), "predecessor's base state staged");
                                staged = Some(st);
                                send(sock, &ToSupervisor::BaseStaged { error: None })?;
                            }
                            Err(e) => return Err(self.base_refused(e)),
                        }
                    }
                }
                ToClient::State(chunk) if self.resumed && state_bytes.is_none() => {
                    match assembler.push(chunk) {
                        Ok(done) => state_bytes = done,
                        Err(e) => return Err(fail(sock, ClientError::State(e))),
                    }
                }
                ToClient::Init { request } => match fds.pop() {
                    Some(fd) => break (request, fd),
                    None => {
                        return Err(fail(
                            sock,
                            unexpected(
                                "Init with the /dev/fuse descriptor",
                                &ToClient::Init { request },
                            ),
                        ));
                    }
                },
                ToClient::RequestLog if self.request_log.is_none() => match fds.pop() {
                    Some(fd) => self.attach_request_log(fd),
                    None => tracing::warn!("RequestLog came without its descriptor"),
                },
                ToClient::Shutdown => return self.shutdown_early(),
                other => {
                    return Err(fail(
                        sock,
                        unexpected(
                            if self.resumed {
                                "State or Init"
                            } else {
                                "Init"
                            },
                            &other,
                        ),
                    ));
                }
            }
        };
        if self.resumed {
            match (state_bytes, staged) {
                (Some(bytes), Some(staged)) => self
                    .import_delta(staged, &bytes)
                    .map_err(|e| fail(sock, e))?,
                (None, Some(_)) => {
                    return Err(fail(sock, ClientError::NoDelta));
                }
                (Some(bytes), None) => self.import(&bytes).map_err(|e| fail(sock, e))?,
                (None, None) => {
                    if let Err(e) = std::mem::take(&mut assembler).finish() {
                        if !matches!(
                            e,
                            handover_proto::state::StateError::Incomplete { got: 0, .. }
                        ) {
                            return Err(fail(sock, ClientError::State(e)));
                        }
                    }
                    // No state (the predecessor crashed): handles are rebuilt from their
                    // numbers as requests use them; the session's locks and
                    // open-but-unlinked files are read from the metadata engine.
                    tracing::warn!("no state from a predecessor: starting with empty tables");
                    self.vfs
                        .take_over_after_crash()
                        .map_err(|e| fail(sock, ClientError::CrashTakeover(e)))?;
                }
            }
        }

        let gate = Gate::new(self.spec.threads.max(1) as usize);
        let fs = BatonFs::new(self.vfs.clone(), gate.clone());
        let recovery_fs = fs.for_recovery();
        let handshaken = relay::handshake(fs, &request, self.spec.threads as usize)
            .map_err(|e| fail(sock, ClientError::Relay(e)))?;
        let conn = Connection {
            generation: self.generation.0,
            spec: self.spec.clone(),
            init_request: request,
            init_reply: handshaken.reply().to_vec(),
        };
        send(
            sock,
            &ToSupervisor::InitReply {
                reply: conn.init_reply.clone(),
            },
        )?;

        let (msg, _) = channel::recv::<ToClient>(sock, None).map_err(ClientError::Recv)?;
        match msg {
            ToClient::Serve => take_over_journal(&self.vfs),
            ToClient::Shutdown => return self.shutdown_early(),
            other => return Err(fail(sock, unexpected("Serve", &other))),
        }
        if self.resumed {
            // The pause of an upgrade ends when the successor's first reply is out.
            let channel = self.channel.clone();
            gate.on_next_answer(move || {
                send_or_log(
                    channel.as_fd(),
                    &ToSupervisor::FirstServed {
                        monotonic_ns: monotonic_ns(),
                    },
                );
            });
        }
        let session = handshaken
            .attach(fuse.as_fd())
            .map_err(|e| fail(sock, ClientError::Relay(e)))?;
        let fuse = Arc::new(fuse);
        // After a crash: free the inherited unlinked files the kernel no longer has.
        let probe = self
            .vfs
            .has_unknown_handles()
            .then(|| KernelInodes::new(fuse.as_fd()));
        self.fuse = Some(fuse.clone());
        self.served = true;
        match probe {
            Some(Ok(probe)) => {
                let vfs = self.vfs.clone();
                let span = tracing::Span::current();
                std::thread::Builder::new()
                    .name("orphan-sweep".into())
                    .spawn(move || {
                        let _entered = span.enter();
                        let freed = vfs.sweep_orphans(&|ino| probe.holds(ino));
                        tracing::info!(freed, "unlinked files the kernel no longer has were freed");
                    })
                    .map_err(ClientError::Spawn)?;
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot keep a descriptor to probe the kernel's inodes: unlinked files are freed when the kernel forgets them");
            }
            None => {}
        }

        let (tx, rx) = mpsc::channel::<Event>();
        let session_tx = tx.clone();
        let span = tracing::Span::current();
        let run_session = move || {
            std::thread::Builder::new()
                .name("fuse-session".into())
                .spawn(move || {
                    let _entered = span.enter();
                    let r = session.run();
                    let _ = session_tx.send(Event::SessionEnded(r));
                })
                .map(|_| ())
        };
        match self.request_log.as_mut().and_then(|h| h.unused.take()) {
            Some((log, slots)) => {
                // What a dead predecessor left unanswered is found before this process
                // reads anything; its reader threads then read into the log.
                // Not if the kernel re-delivers it: resend in use, or written for this
                // generation anyway (a dead client that did not read into this log).
                let recover = !resend_in_use(&conn.init_request, &log)
                    && log.resent_generation() != self.generation.0;
                let found = log.take_over(std::process::id(), recover);
                match log.read_into(slots, run_session) {
                    Ok((log, reading, spawned)) => {
                        spawned.map_err(ClientError::Spawn)?;
                        tracing::info!(
                            reading,
                            recover,
                            pending = found.pending.len(),
                            freed = found.freed,
                            garbage = found.garbage,
                            "request log taken over"
                        );
                        if !found.pending.is_empty() {
                            match recover::start(
                                log,
                                found.pending,
                                recovery_fs,
                                &conn.init_request,
                                fuse.clone(),
                            ) {
                                Ok(s) => tracing::info!(
                                    answered = s.answered,
                                    running = s.running,
                                    "answering the requests the predecessor read and left unanswered"
                                ),
                                Err(e) => {
                                    tracing::error!(error = %error_chain(&e), "cannot answer the requests the predecessor left unanswered: their callers wait")
                                }
                            }
                        }
                    }
                    Err((e, spawned)) => {
                        spawned.map_err(ClientError::Spawn)?;
                        tracing::error!(error = %error_chain(&e), "cannot read into the request log: requests are lost if this client dies");
                    }
                }
            }
            None => run_session().map_err(ClientError::Spawn)?,
        }
        let epoch = Arc::new(AtomicU64::new(0));
        spawn_reader(self.channel.clone(), tx.clone(), epoch.clone())
            .map_err(ClientError::Spawn)?;
        tracing::info!(
            threads = self.spec.threads,
            fd = self.channel.as_raw_fd(),
            "serving"
        );
        self.serve_loop(rx, &gate, Arc::new(conn), (tx, epoch))
    }

    /// The supervisor is gone or being replaced: wait for a new one on the adopt socket
    /// (serving on meanwhile). Returns whether this client now waits there.
    fn wait_for_supervisor(&self, conn: &Connection, events: &mpsc::Sender<Event>) -> bool {
        let Some(fuse) = self.fuse.clone() else {
            return false;
        };
        let offer = adopt::Offer {
            adoption: handover_proto::message::Adoption {
                pid: std::process::id(),
                version: self.build.version.clone(),
                hello: self.build.hello(),
                session: self.vfs.session().0,
                generation: self.generation,
                spec: self.spec.clone(),
                init_request: conn.init_request.clone(),
                init_reply: conn.init_reply.clone(),
                journal: self.journal.is_some(),
            },
            fuse,
            journal: self.journal.clone(),
        };
        let events = events.clone();
        match adopt::wait_for_supervisor(offer, move |fd| {
            let _ = events.send(Event::Adopted(fd));
        }) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "cannot wait for a new supervisor; serving on without one");
                false
            }
        }
    }

    /// Keeps the mount's request log for `Serve` (a log this build cannot use is logged
    /// and ignored: the client then serves without one).
    fn attach_request_log(&mut self, fd: OwnedFd) {
        let keep = match fd.try_clone() {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep a descriptor of the request log: serving without it");
                return;
            }
        };
        match RequestLog::open(fd) {
            Ok(log) => {
                // Now, not at Serve: zeroing the slots is not part of any pause.
                let slots = log.reserve(self.spec.threads.max(1) as usize, std::process::id());
                tracing::debug!(header = ?log.header(), slots = slots.len(), "request log received");
                self.request_log = Some(HeldLog {
                    fd: keep,
                    unused: Some((log, slots)),
                });
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "the request log is unusable: requests are lost if this client dies without resend");
                self.request_log = Some(HeldLog {
                    fd: keep,
                    unused: None,
                });
            }
        }
    }

    /// Decodes and checks a predecessor's base state, and builds its tables.
    fn stage(&self, bytes: &[u8]) -> Result<handover::Staged, ClientError> {
        let state = handover::decode(bytes).map_err(ClientError::Import)?;
        if !self.build.state_versions.contains(&state.version()) {
            return Err(ClientError::StateVersion(state.version()));
        }
        handover::Staged::new(&self.vfs, state.into_latest()).map_err(ClientError::Import)
    }

    /// Tells the supervisor that the base cannot be used (it rolls the upgrade back).
    fn base_refused(&self, err: ClientError) -> ClientError {
        let error = Some(error_chain(&err));
        send_or_log(self.sock(), &ToSupervisor::BaseStaged { error });
        err
    }

    /// Decodes the changes since the staged base, applies them and imports the whole.
    fn import_delta(
        &mut self,
        mut staged: handover::Staged,
        bytes: &[u8],
    ) -> Result<(), ClientError> {
        let delta = handover_proto::state::decode_delta(bytes)
            .map_err(|e| ClientError::Import(ImportError::Decode(e)))?;
        if !self.build.state_versions.contains(&delta.version()) {
            return Err(ClientError::StateVersion(delta.version()));
        }
        staged
            .apply(delta.into_latest())
            .map_err(ClientError::Import)?;
        staged.import(&self.vfs).map_err(ClientError::Import)?;
        Ok(())
    }

    /// Flushes, exports the state while serving and sends it (`PreExport`); `Err` is the
    /// reason for `PreFlushed { error }`.
    fn pre_export(&self, conn: &Connection, state_version: u16) -> Result<usize, String> {
        if !self.build.can(capability::STATE_DELTA) {
            return Err(format!(
                "this build ({}) cannot export a base state",
                self.build.version
            ));
        }
        if !self.build.state_versions.contains(&state_version) {
            return Err(format!(
                "this build ({}) cannot export state schema version {state_version}",
                self.build.version
            ));
        }
        let chunks = handover::export_base(&self.vfs, conn)
            .and_then(|s| handover::encode_chunks(s, state_version))
            .map_err(|e| {
                self.vfs.drop_base();
                error_chain(&e)
            })?;
        let n = chunks.len();
        for chunk in chunks {
            if let Err(e) = channel::send(self.sock(), &ToSupervisor::State(chunk), &[]) {
                self.vfs.drop_base();
                return Err(format!("cannot send the base state: {}", error_chain(&e)));
            }
        }
        Ok(n)
    }

    /// Decodes, checks and imports the predecessor's state.
    fn import(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let state = handover::decode(bytes).map_err(ClientError::Import)?;
        if !self.build.state_versions.contains(&state.version()) {
            return Err(ClientError::StateVersion(state.version()));
        }
        let state = state.into_latest();
        if state.spec.mountpoint != self.spec.mountpoint {
            tracing::warn!(theirs = %state.spec.mountpoint.display(), "the predecessor's state names another mountpoint");
        }
        handover::import(&self.vfs, &state).map_err(ClientError::Import)?;
        Ok(())
    }

    fn serve_loop(
        &mut self,
        rx: mpsc::Receiver<Event>,
        gate: &Arc<Gate>,
        conn: Arc<Connection>,
        (events, epoch): (mpsc::Sender<Event>, Arc<AtomicU64>),
    ) -> Result<(), ClientError> {
        let mut freezer: Option<Freezer> = None;
        let mut supervisor_alive = true;
        // Listening on the adopt socket (after `Detach` or the supervisor's death).
        let mut adoptable = false;
        let mut session_alive = true;
        while let Ok(event) = rx.recv() {
            match event {
                Event::FromSupervisor(ToClient::Shutdown) => {
                    tracing::info!("shutting down on the supervisor's request");
                    handover::thaw(gate, &mut freezer);
                    let error = self.close();
                    send(
                        self.sock(),
                        &ToSupervisor::ShutdownDone {
                            error: error.clone(),
                        },
                    )?;
                    return match error {
                        None => Ok(()),
                        Some(e) => Err(ClientError::Shutdown(e.into())),
                    };
                }
                Event::FromSupervisor(ToClient::PreExport { state_version }) => {
                    let started = Instant::now();
                    let error = self.pre_export(&conn, state_version).err();
                    tracing::info!(elapsed = ?started.elapsed(), ?error, "pre-exported for a handover");
                    send_or_log(self.sock(), &ToSupervisor::PreFlushed { error });
                }
                Event::FromSupervisor(ToClient::PreFlush) => {
                    // A base of an earlier handover that rolled back is done with.
                    self.vfs.drop_base();
                    let started = Instant::now();
                    let error = self.vfs.data().flush_all().err().map(|e| error_chain(&e));
                    tracing::info!(elapsed = ?started.elapsed(), ?error, "pre-flushed for a handover");
                    // A supervisor that died meanwhile is not a reason to stop serving.
                    send_or_log(self.sock(), &ToSupervisor::PreFlushed { error });
                }
                Event::FromSupervisor(ToClient::Freeze {
                    mode,
                    state_version,
                }) => {
                    if freezer.as_ref().is_some_and(Freezer::is_running) {
                        send_or_log(
                            self.sock(),
                            &ToSupervisor::FreezeFailed {
                                reason: "a freeze is already in progress".into(),
                            },
                        );
                        continue;
                    }
                    if let Some(f) = freezer.take() {
                        f.join();
                    }
                    match self.start_freeze(gate, &conn, mode, state_version) {
                        Ok(f) => freezer = Some(f),
                        Err(reason) => {
                            tracing::warn!(%reason, "cannot freeze");
                            send_or_log(self.sock(), &ToSupervisor::FreezeFailed { reason });
                        }
                    }
                }
                Event::FromSupervisor(ToClient::Thaw) => {
                    handover::thaw(gate, &mut freezer);
                    self.vfs.drop_base();
                    tracing::info!("thawed: serving again");
                    send_or_log(self.sock(), &ToSupervisor::Thawed);
                }
                Event::FromSupervisor(ToClient::Commit) => {
                    if let Some(f) = freezer.take() {
                        f.join();
                    }
                    if let Phase::Frozen(mode) = gate.phase() {
                        tracing::info!(
                            ?mode,
                            parked = gate.parked(),
                            "handed over: exiting without unmounting"
                        );
                        commit_exit();
                    }
                    tracing::error!("Commit while not frozen: ignored, serving on");
                }
                Event::FromSupervisor(ToClient::SendRequestLog) => {
                    let log = self.request_log.as_ref().map(|h| h.fd.clone());
                    let fds: Vec<BorrowedFd<'_>> = log.iter().map(|fd| fd.as_fd()).collect();
                    let msg = ToSupervisor::RequestLog {
                        held: !fds.is_empty(),
                    };
                    if let Err(e) = channel::send(self.sock(), &msg, &fds) {
                        tracing::warn!(error = %error_chain(&e), "cannot send the request log to the supervisor");
                    }
                }
                Event::FromSupervisor(ToClient::Detach) => {
                    tracing::info!("the supervisor is being replaced");
                    adoptable = adoptable || self.wait_for_supervisor(&conn, &events);
                }
                Event::Adopted(fd) => {
                    // The previous channel's reader stops reporting; a detached
                    // supervisor sees its channel close.
                    epoch.fetch_add(1, Ordering::AcqRel);
                    let _ = nix::sys::socket::shutdown(
                        self.channel.as_raw_fd(),
                        nix::sys::socket::Shutdown::Both,
                    );
                    self.channel = Arc::new(fd);
                    adoptable = false;
                    spawn_reader(self.channel.clone(), events.clone(), epoch.clone())
                        .map_err(ClientError::Spawn)?;
                    supervisor_alive = true;
                    tracing::info!("serving under a new supervisor");
                }
                Event::FromSupervisor(other) => {
                    tracing::warn!(message = ?other, "ignoring an unexpected message from the supervisor");
                }
                Event::SupervisorGone(err) => {
                    supervisor_alive = false;
                    match err {
                        None => {
                            tracing::warn!("the supervisor went away; serving until the mount ends")
                        }
                        Some(e) => {
                            tracing::error!(error = %error_chain(&e), "lost the supervisor; serving until the mount ends")
                        }
                    }
                    self.vfs.drop_base();
                    if gate.phase() != Phase::Serving {
                        // Nobody will commit this handover: serve on.
                        handover::thaw(gate, &mut freezer);
                        tracing::warn!(
                            "thawed: the handover cannot complete without the supervisor"
                        );
                    }
                    if !session_alive {
                        break;
                    }
                    adoptable = adoptable || self.wait_for_supervisor(&conn, &events);
                }
                Event::SessionEnded(r) => {
                    session_alive = false;
                    match r {
                        Ok(()) => tracing::info!("the FUSE connection ended"),
                        Err(e) => tracing::error!(error = %e, "the FUSE session failed"),
                    }
                    // Flush now, tell the supervisor, and wait for its Shutdown.
                    let error = self.close();
                    if !supervisor_alive {
                        break;
                    }
                    if let Err(e) = send(self.sock(), &ToSupervisor::SessionEnded { error }) {
                        tracing::warn!(error = %error_chain(&e), "cannot tell the supervisor that the session ended");
                        break;
                    }
                }
            }
        }
        match self.close() {
            None => Ok(()),
            Some(e) => Err(ClientError::Shutdown(e.into())),
        }
    }

    /// Checks a `Freeze`, closes the gate, and leaves the waiting, flushing and exporting
    /// to a thread. `Err` is the reason for `FreezeFailed` (nothing was frozen).
    fn start_freeze(
        &self,
        gate: &Arc<Gate>,
        conn: &Arc<Connection>,
        mode: FreezeMode,
        state_version: u16,
    ) -> Result<Freezer, String> {
        let needed = match mode {
            FreezeMode::Resend => capability::PARK_RESEND,
            FreezeMode::Drain => capability::DRAIN,
            FreezeMode::DrainLog => capability::REQUEST_LOG,
        };
        if !self.build.can(needed) {
            return Err(format!(
                "this build ({}) cannot freeze in {mode:?} mode",
                self.build.version
            ));
        }
        if !self.build.state_versions.contains(&state_version) {
            return Err(format!(
                "this build ({}) cannot export state schema version {state_version}",
                self.build.version
            ));
        }
        if let Phase::Frozen(other) = gate.phase() {
            if other != mode {
                tracing::info!(from = ?other, to = ?mode, "frozen in another mode: thawing first");
                gate.thaw();
            }
        }
        let ticket = gate.begin_freeze(mode).map_err(|e| error_chain(&e))?;
        tracing::info!(?mode, state_version, "freezing for a handover");
        Freezer::start(gate, ticket, state_version, &self.vfs, conn, &self.channel).map_err(|e| {
            gate.thaw();
            format!("cannot start the freezer thread: {e}")
        })
    }
}

/// Reads the supervisor's messages on `channel` into `tx`, until the channel closes or a
/// new channel replaces it (`epoch` moves on).
fn spawn_reader(
    channel: Arc<OwnedFd>,
    tx: mpsc::Sender<Event>,
    epoch: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mine = epoch.load(Ordering::Acquire);
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("supervisor-rx".into())
        .spawn(move || {
            let _entered = span.enter();
            loop {
                let r = channel::recv::<ToClient>(channel.as_fd(), None);
                if epoch.load(Ordering::Acquire) != mine {
                    return;
                }
                let event = match r {
                    Ok((msg, _)) => Event::FromSupervisor(msg),
                    Err(e) => Event::SupervisorGone(if e.is_closed() { None } else { Some(e) }),
                };
                let last = matches!(event, Event::SupervisorGone(_));
                if tx.send(event).is_err() || last {
                    return;
                }
            }
        })
        .map(|_| ())
}

/// Whether the supervisor has the kernel resend what a dead client read (else this client
/// answers it from the request log): the kernel offered FUSE_HAS_RESEND and the mount was
/// not made with `--no-resend`. The supervisor decides the same from the same facts.
fn resend_in_use(init_request: &[u8], log: &RequestLog) -> bool {
    let offered =
        handover_proto::fuse_init::InitRequest::parse(init_request).is_ok_and(|r| r.has_resend());
    offered && !log.header().resend_disabled()
}

/// Ends the process at once for a committed handover: no unmount, no session close, no
/// destructor, no reply to parked requests (the successor gets them again).
fn commit_exit() -> ! {
    // SAFETY: _exit(2) ends the process immediately; it touches no memory of this
    // process. Skipping destructors is the point: a dropped fuser reply would answer EIO.
    unsafe { libc::_exit(0) }
}

/// How long a successor waits at `Serve` for its predecessor's hold on the write journal
/// to end (the predecessor has exited by then; this only covers the kernel's cleanup).
const JOURNAL_WAIT: Duration = Duration::from_secs(5);

/// Attaches the write journal before anything is served: takes it over and replays what a
/// dead predecessor left in it, or, while a live predecessor owns it (a live upgrade),
/// leaves it for [`take_over_journal`] at `Serve`.
fn attach_journal(vfs: &Vfs, journal: Option<OwnedFd>) -> Result<(), ClientError> {
    let Some(fd) = journal else {
        tracing::warn!("no write journal: acknowledged writes are lost if this client dies");
        return Ok(());
    };
    vfs.data()
        .attach_journal(fd)
        .map(|_| ())
        .map_err(ClientError::Journal)
}

/// At `Serve`: takes over the journal a live predecessor held (it flushed and exited).
/// Serving is not refused if that fails: the connection is this client's now.
fn take_over_journal(vfs: &Vfs) {
    if let Err(e) = vfs.data().take_over_journal(JOURNAL_WAIT) {
        tracing::error!(error = %error_chain(&e), "cannot take the write journal over: writes are not journaled");
    }
}
