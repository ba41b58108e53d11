//! `baton mount` in the foreground: check, start the client, mount, relay INIT, supervise,
//! unmount.
//!
//! ```text
//! pre-checks (root, mountpoint, volume)       nothing mounted, nothing started
//! control socket, signals blocked -> signalfd
//! spawn baton-fs, Start ---------> Prepared   client failure: reported, nothing mounted
//! open /dev/fuse, mount(2), read INIT
//! Init + fd ---------------------> InitReply  failure: INIT answered with EIO, unmounted
//! check reply, write it to /dev/fuse, Serve   the mount serves; readiness is signalled
//! upgrade::driver::Driver::run                 the event loop, upgrades and restarts:
//!       SIGTERM/SIGINT/SIGHUP   -> (an upgrade rolls back first) lazy umount, Shutdown
//!       SIGTERM, keeper holds it -> serve on until a take-over or an umount, for at most
//!                                  BATON_SIGTERM_WAIT seconds; then as above
//!       `baton umount` (control) -> umount (busy: answer Busy, keep serving), Shutdown...
//!       `baton upgrade`          -> live upgrade (upgrade::machine)
//!       client's SessionEnded   -> (unmounted from outside) Shutdown, reap, exit 0
//!       serving client exits    -> a successor is started at once on the same session
//!                                  (from the handed-over state right after an upgrade,
//!                                  else without a state), RESEND, serve; crash loops back
//!                                  off and the mount stays (`baton status` says why)
//! ```
//!
//! The supervisor keeps its /dev/fuse descriptor until it exits: the connection lives as
//! long as it does, whatever happens to the client.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use fsclient::data::redact;
use fsclient::meta::{self, MetaError};
use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::control::{ControlRequest, ControlResponse};
use handover_proto::fuse_init::{InitError, InitReply};
use handover_proto::message::{
    Adoption, Generation, Hello, MountSpec, ToClient, ToSupervisor, capability,
};
use handover_proto::reqlog;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::adopt::{self, AdoptError, Adopted};
use crate::control::{BindError, CONTROL_FD_ENV, ControlClient, ControlServer, RequestError};
use crate::format::{self, FormatError, FormatOptions};
use crate::home::{DEFAULT_VOLUME, Home};
use crate::keeper::{Keeper, Withdrawn};
use crate::metrics::{MetricsError, MetricsServer};
use crate::mount::{self, MountError, ReadInitError, UmountError};
use crate::spawn::{self, ClientProcess, SpawnError};
use crate::upgrade::driver::{Driver, DriverParts, MountFacts};
use crate::upgrade::{ClientInfo, ClientOptions, Timings, UpgradeRequest};

/// How long the client may take to open the volume (object storage may be remote).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the kernel may take to send INIT after mount(2).
const KERNEL_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client may take to answer INIT through the relay.
const INIT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to close its volume when a mount is abandoned during
/// start-up.
const ABORT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client that answered may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Log output format, for the supervisor and the clients it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// What `baton mount` was asked to do.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// Metadata URL; `None`: the embedded `default` volume, formatted on first use.
    pub meta: Option<String>,
    /// Client binary; `None`: `baton-fs` next to this executable.
    pub client: Option<PathBuf>,
    pub threads: u32,
    pub attr_cache: Duration,
    pub entry_cache: Duration,
    pub cache_dir: Option<PathBuf>,
    pub cache_bytes: u64,
    pub log_format: LogFormat,
    /// Serve Prometheus metrics over HTTP on this address.
    pub metrics: Option<SocketAddr>,
    /// Take a live mount over from its supervisor (a new mount pod replacing the old
    /// one) and move its client to this build's client binary.
    pub take_over: bool,
    /// Behave as on a kernel without FUSE_HAS_RESEND: never write the notification,
    /// drain on upgrade, recover through the request log after a crash. Kept by the mount
    /// (its request log says so): a supervisor that adopts it keeps it too.
    pub no_resend: bool,
}

/// `baton mount` failed. Variants before `Mount` leave nothing mounted.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("baton mount must run as root")]
    NotRoot,
    #[error("mountpoint {path} does not exist")]
    MountpointMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mountpoint {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mountpoint {path} is busy: {what} is already mounted there")]
    AlreadyMounted { path: PathBuf, what: String },
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error("invalid metadata URL")]
    BadMetaUrl(#[source] MetaError),
    #[error("cannot reach the metadata engine at {url}")]
    MetaUnreachable {
        url: String,
        #[source]
        source: MetaError,
    },
    #[error("the volume at {url} is not formatted: run `baton format NAME --meta {url}` first")]
    NotFormatted { url: String },
    #[error("cannot format the default volume")]
    FormatDefault(#[source] FormatError),
    #[error("cannot set up the control socket")]
    Control(#[source] BindError),
    #[error("cannot create the write journal")]
    Journal(#[source] mount::JournalError),
    #[error("cannot create or update the request log")]
    RequestLog(#[source] reqlog::LogError),
    #[error("cannot set up signal handling")]
    Signals(#[source] Errno),
    #[error("cannot start the filesystem client")]
    Spawn(#[source] SpawnError),
    #[error("cannot send {what} to the client")]
    Send {
        what: &'static str,
        #[source]
        source: SendError,
    },
    #[error("cannot receive from the client while waiting for {what}")]
    Recv {
        what: &'static str,
        #[source]
        source: RecvError,
    },
    #[error("the client cannot serve the volume: {reason}")]
    ClientFailed { reason: String },
    #[error("the client exited ({status}) while the supervisor waited for {what}")]
    ClientExited { what: &'static str, status: String },
    #[error("the client did not send {what} within {timeout:?}")]
    ClientTimeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("the client sent {got} while the supervisor waited for {what}")]
    Protocol { what: &'static str, got: String },
    #[error("stopped by {0} before the mount was ready")]
    Interrupted(Signal),
    #[error("cannot mount")]
    Mount(#[source] MountError),
    #[error("cannot read the kernel's INIT request")]
    ReadInit(#[source] ReadInitError),
    #[error("the client's INIT reply is unusable")]
    BadInitReply(#[source] InitError),
    #[error("the kernel refused the INIT reply")]
    WriteInitReply(#[source] Errno),
    #[error("cannot serve metrics")]
    Metrics(#[source] MetricsError),
    #[error("cannot unmount")]
    Unmount(#[source] UmountError),
    #[error("unmounted, but the client could not flush or close cleanly: {0}")]
    Flush(String),
    #[error("waiting for events failed")]
    Poll(#[source] Errno),
    #[error("cannot adopt the live client of the mount")]
    Adopt(#[source] AdoptError),
    #[error(
        "the live client of the mount serves {theirs}, not {ours}: run `baton mount` with the options the mount was made with"
    )]
    AdoptedOtherVolume { ours: String, theirs: String },
    #[error("nothing to take over at {0}: it is not a Baton mount")]
    NothingToTakeOver(PathBuf),
    #[error("cannot ask the supervisor of {path} to hand the mount over")]
    TakeOverRequest {
        path: PathBuf,
        #[source]
        source: RequestError,
    },
    #[error("the supervisor of {path} refused to hand the mount over: {reason}")]
    TakeOverRefused { path: PathBuf, reason: String },
}

/// What the pre-checks found.
#[derive(Clone, Debug)]
struct Target {
    mountpoint: PathBuf,
    meta_url: String,
    volume: String,
}

/// Root, the mountpoint, and the volume: every check that needs no mount.
fn precheck(home: &Home, opts: &MountOptions) -> Result<Target, SuperviseError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(SuperviseError::NotRoot);
    }
    let path = &opts.mountpoint;
    let mountpoint = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(SuperviseError::AlreadyMounted {
                path: path.clone(),
                what: "a FUSE filesystem whose server is gone".into(),
            });
        }
        Err(source) => {
            return Err(SuperviseError::MountpointMissing {
                path: path.clone(),
                source,
            });
        }
    };
    if !mountpoint.is_dir() {
        return Err(SuperviseError::NotADirectory(mountpoint));
    }
    if let Some(e) = mount::mount_at(&mountpoint).map_err(SuperviseError::Mountinfo)? {
        return Err(SuperviseError::AlreadyMounted {
            path: mountpoint,
            what: format!("{} ({})", e.source, e.fstype),
        });
    }

    let (meta_url, default) = match &opts.meta {
        Some(url) => (url.clone(), false),
        None => (home.default_meta_url(DEFAULT_VOLUME), true),
    };
    // An embedded database that does not exist is an unformatted volume; do not let the
    // check create an empty one.
    if !default {
        if let Ok(u) = url::Url::parse(&meta_url) {
            if u.scheme() == "redb" && !Path::new(u.path()).exists() {
                return Err(SuperviseError::NotFormatted {
                    url: redact(&meta_url),
                });
            }
        }
    }
    let volume = {
        let engine = meta::open(&meta_url).map_err(|source| match source {
            MetaError::BadUrl { .. } => SuperviseError::BadMetaUrl(source),
            source => SuperviseError::MetaUnreachable {
                url: redact(&meta_url),
                source,
            },
        })?;
        match engine.load_format() {
            Ok(f) => f.name,
            Err(MetaError::NotFormatted) if default => {
                drop(engine);
                let opts = FormatOptions {
                    name: DEFAULT_VOLUME.into(),
                    meta: Some(meta_url.clone()),
                    storage: None,
                    block_size: u64::from(meta::Format::DEFAULT_BLOCK_SIZE),
                    capacity: 0,
                    inodes: 0,
                    force: false,
                };
                tracing::info!(home = %home.path().display(), "formatting the default volume on first use");
                format::format(home, &opts)
                    .map_err(SuperviseError::FormatDefault)?
                    .name
            }
            Err(MetaError::NotFormatted) => {
                return Err(SuperviseError::NotFormatted {
                    url: redact(&meta_url),
                });
            }
            Err(source) => {
                return Err(SuperviseError::MetaUnreachable {
                    url: redact(&meta_url),
                    source,
                });
            }
        }
        // The engine is closed here: an embedded database is opened by one process at a
        // time, and the client opens it next.
    };
    Ok(Target {
        mountpoint,
        meta_url,
        volume,
    })
}

/// A running mount and everything the supervisor holds for it.
struct Supervisor {
    target: Target,
    control: ControlServer,
    signals: SignalFd,
    client: ClientProcess,
    client_version: String,
    client_hello: Hello,
    client_session: u64,
    generation: Generation,
    started: Instant,
    /// The mount's write journal, handed to every client generation in `Start`.
    journal: OwnedFd,
    /// The mount's request log, handed to every client that can use it after `Prepared`.
    request_log: OwnedFd,
}

/// The INIT exchange of the connection, kept for the whole life of the mount.
#[derive(Clone, Debug)]
struct Negotiated {
    /// The kernel's FUSE_INIT request (a successor's relay replays it).
    request: Vec<u8>,
    /// The reply that reached the kernel (a successor's must be identical).
    reply: Vec<u8>,
    params: InitReply,
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown status: {e}"),
    }
}

fn short(msg: &ToSupervisor) -> String {
    format!("{msg:?}").chars().take(80).collect()
}

fn block_signals() -> Result<SignalFd, SuperviseError> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGHUP);
    mask.thread_block().map_err(SuperviseError::Signals)?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(SuperviseError::Signals)
}

fn read_signal(signals: &SignalFd) -> Option<Signal> {
    match signals.read_signal() {
        Ok(Some(info)) => Signal::try_from(info.ssi_signo as i32).ok(),
        _ => None,
    }
}

impl Supervisor {
    /// Waits for the client's next message, a signal, or the timeout.
    fn wait_client(
        &mut self,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(ToSupervisor, Vec<OwnedFd>), SuperviseError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [
                PollFd::new(self.client.channel().as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Err(SuperviseError::ClientTimeout { what, timeout }),
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SuperviseError::Poll(e)),
            }
            if fds[1].any().unwrap_or(false) {
                if let Some(sig) = read_signal(&self.signals) {
                    return Err(SuperviseError::Interrupted(sig));
                }
            }
            if fds[0].any().unwrap_or(false) {
                return match channel::recv::<ToSupervisor>(self.client.channel().as_fd(), None) {
                    Ok(m) => Ok(m),
                    Err(e) if e.is_closed() => {
                        let status = describe(self.client.reap(EXIT_TIMEOUT));
                        Err(SuperviseError::ClientExited { what, status })
                    }
                    Err(source) => Err(SuperviseError::Recv { what, source }),
                };
            }
        }
    }

    fn send(
        &self,
        what: &'static str,
        msg: &ToClient,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), SuperviseError> {
        channel::send(self.client.channel().as_fd(), msg, fds)
            .map_err(|source| SuperviseError::Send { what, source })
    }

    /// Tells the client to flush and exit (waiting up to `timeout`), and reaps it (killing
    /// it if it does not exit). Returns what it could not flush.
    fn stop_client(&mut self, timeout: Duration) -> Option<String> {
        if let Err(e) = self.send("Shutdown", &ToClient::Shutdown, &[]) {
            tracing::warn!(error = %fsclient::client::error_chain(&e), "cannot send Shutdown to the client");
        }
        let result = loop {
            match self.wait_client("ShutdownDone", timeout) {
                Ok((ToSupervisor::ShutdownDone { error }, _)) => break error,
                Ok((ToSupervisor::SessionEnded { .. }, _)) => continue,
                Ok((other, _)) => {
                    tracing::warn!(message = %short(&other), "ignoring a message while the client shuts down");
                }
                Err(SuperviseError::Interrupted(sig)) => {
                    tracing::warn!(signal = %sig, "already shutting down; waiting for the client");
                }
                Err(e) => break Some(fsclient::client::error_chain(&e)),
            }
        };
        let status = describe(self.client.reap(EXIT_TIMEOUT));
        tracing::info!(%status, "client exited");
        result
    }

    /// Undoes a mount whose INIT was not answered by the client: answers the kernel with
    /// an error so that nothing hangs, detaches the mount, stops the client.
    fn abort_init(&mut self, fuse: &OwnedFd, unique: u64) {
        if let Err(e) = mount::fail_init(fuse.as_fd(), unique, libc::EIO) {
            tracing::warn!(error = %e, "cannot fail the kernel's INIT request");
        }
        self.abort_mounted();
    }

    fn abort_mounted(&mut self) {
        if let Err(e) = mount::umount(&self.target.mountpoint, true) {
            tracing::warn!(error = %fsclient::client::error_chain(&e), "cannot detach the failed mount");
        }
        self.stop_client(ABORT_TIMEOUT);
    }

    /// Start, mount, INIT relay, Serve. Returns the supervisor's own descriptor of the
    /// FUSE connection and what the kernel and the first client agreed on (which a
    /// successor must reproduce).
    fn start(&mut self, spec: MountSpec) -> Result<(OwnedFd, Negotiated), SuperviseError> {
        self.send(
            "Start",
            &ToClient::Start {
                generation: self.generation,
                spec,
                resume_session: None,
            },
            &[self.journal.as_fd()],
        )?;
        match self.wait_client("Prepared", START_TIMEOUT) {
            Ok((
                ToSupervisor::Prepared {
                    pid,
                    version,
                    hello,
                    session,
                },
                _,
            )) => {
                tracing::info!(pid, %version, ?hello, session, "client prepared the volume");
                if offers_request_log(&hello) {
                    self.send(
                        "RequestLog",
                        &ToClient::RequestLog,
                        &[self.request_log.as_fd()],
                    )?;
                }
                self.client_version = version;
                self.client_hello = hello;
                self.client_session = session;
            }
            Ok((ToSupervisor::Failed { reason }, _)) => {
                self.client.reap(EXIT_TIMEOUT).ok();
                return Err(SuperviseError::ClientFailed { reason });
            }
            Ok((other, _)) => {
                self.stop_client(ABORT_TIMEOUT);
                return Err(SuperviseError::Protocol {
                    what: "Prepared",
                    got: short(&other),
                });
            }
            Err(e) => {
                // A client that exited is reaped already; one that hangs is killed (drop).
                if matches!(e, SuperviseError::Interrupted(_)) {
                    self.stop_client(ABORT_TIMEOUT);
                }
                return Err(e);
            }
        }

        let fuse = match mount::open_device() {
            Ok(fd) => fd,
            Err(e) => {
                self.stop_client(ABORT_TIMEOUT);
                return Err(SuperviseError::Mount(e));
            }
        };
        if let Err(e) = mount::mount(fuse.as_fd(), &self.target.volume, &self.target.mountpoint) {
            self.stop_client(ABORT_TIMEOUT);
            return Err(SuperviseError::Mount(e));
        }
        tracing::info!("mounted");
        let init = match mount::read_init(fuse.as_fd(), KERNEL_INIT_TIMEOUT) {
            Ok(init) => init,
            Err(e) => {
                self.abort_mounted();
                return Err(SuperviseError::ReadInit(e));
            }
        };
        let unique = init.request.unique;
        tracing::debug!(
            abi = format_args!("{}.{}", init.request.major, init.request.minor),
            len = init.bytes.len(),
            "kernel INIT read"
        );

        let request = ToClient::Init {
            request: init.bytes.clone(),
        };
        if let Err(e) = self.send("Init", &request, &[fuse.as_fd()]) {
            self.abort_init(&fuse, unique);
            return Err(e);
        }
        let reply = match self.wait_client("InitReply", INIT_REPLY_TIMEOUT) {
            Ok((ToSupervisor::InitReply { reply }, _)) => reply,
            Ok((ToSupervisor::Failed { reason }, _)) => {
                self.abort_init(&fuse, unique);
                return Err(SuperviseError::ClientFailed { reason });
            }
            Ok((other, _)) => {
                self.abort_init(&fuse, unique);
                return Err(SuperviseError::Protocol {
                    what: "InitReply",
                    got: short(&other),
                });
            }
            Err(e) => {
                self.abort_init(&fuse, unique);
                return Err(e);
            }
        };
        let negotiated = match InitReply::parse(&reply, unique) {
            Ok(n) => n,
            Err(e) => {
                self.abort_init(&fuse, unique);
                return Err(SuperviseError::BadInitReply(e));
            }
        };
        if let Err(e) = mount::write_reply(fuse.as_fd(), &reply) {
            self.abort_init(&fuse, unique);
            return Err(SuperviseError::WriteInitReply(e));
        }
        tracing::info!(
            abi = format_args!("{}.{}", negotiated.major, negotiated.minor),
            max_write = negotiated.max_write,
            max_pages = negotiated.max_pages,
            flags = format_args!("{:#x}", negotiated.flags),
            "FUSE connection initialized"
        );
        let negotiated = Negotiated {
            request: init.bytes,
            reply,
            params: negotiated,
        };
        if let Err(e) = self.send("Serve", &ToClient::Serve, &[]) {
            // The kernel has its reply; without a client nobody serves: detach.
            self.abort_mounted();
            return Err(e);
        }
        Ok((fuse, negotiated))
    }
}

/// How long a supervisor started by its predecessor (`baton upgrade --supervisor`) waits
/// for the client to listen on its adopt socket.
const HANDED_OVER_WAIT: Duration = Duration::from_secs(10);

/// Runs `baton mount` in the foreground. `on_ready` is called once the mount serves.
///
/// On a live Baton mount whose supervisor is gone (or hands over to this process), the
/// serving client is adopted instead ([`crate::adopt`]): this process supervises it as if
/// it had started it.
pub fn run(
    home: &Home,
    opts: &MountOptions,
    on_ready: impl FnOnce(&Path),
) -> Result<(), SuperviseError> {
    if opts.take_over {
        return run_take_over(home, opts, on_ready);
    }
    if let Some((mountpoint, adopted)) = find_live_client(home, opts)? {
        return run_adopted(home, opts, mountpoint, adopted, None, on_ready);
    }
    if let Some((mountpoint, kept)) = find_kept(home, opts)? {
        return run_adopted(home, opts, mountpoint, kept, None, on_ready);
    }
    let target = precheck(home, opts)?;
    let span = tracing::info_span!("mount", mountpoint = %target.mountpoint.display(), volume = %target.volume);
    let _entered = span.enter();

    let control = ControlServer::bind(home, &target.mountpoint).map_err(SuperviseError::Control)?;
    let signals = block_signals()?;
    let binary = match &opts.client {
        Some(p) => p.clone(),
        None => spawn::default_client().map_err(SuperviseError::Spawn)?,
    };
    let args = vec![
        "--log-format".to_string(),
        opts.log_format.as_str().to_string(),
    ];
    let journal = mount::create_journal(mount::JOURNAL_BYTES).map_err(SuperviseError::Journal)?;
    let request_log = create_request_log(opts)?;
    let client = ClientProcess::spawn(&binary, &args).map_err(SuperviseError::Spawn)?;
    let mut sup = Supervisor {
        target,
        control,
        signals,
        client,
        client_version: String::new(),
        client_hello: Hello {
            state_versions: Vec::new(),
            capabilities: Vec::new(),
        },
        client_session: 0,
        generation: Generation(1),
        started: Instant::now(),
        journal,
        request_log,
    };
    let spec = MountSpec {
        volume: sup.target.volume.clone(),
        meta_url: sup.target.meta_url.clone(),
        mountpoint: sup.target.mountpoint.clone(),
        home: home.path().to_path_buf(),
        threads: opts.threads,
        attr_ttl_ms: u64::try_from(opts.attr_cache.as_millis()).unwrap_or(u64::MAX),
        entry_ttl_ms: u64::try_from(opts.entry_cache.as_millis()).unwrap_or(u64::MAX),
        cache_dir: opts.cache_dir.clone(),
        cache_bytes: opts.cache_bytes,
    };
    let (fuse, negotiated) = sup.start(spec.clone())?;
    tracing::info!(pid = sup.client.pid(), generation = %sup.generation, "serving");
    let metrics = match opts.metrics {
        Some(addr) => match MetricsServer::start(addr, sup.started) {
            Ok(m) => Some(m),
            Err(e) => {
                // The mount serves already: a metrics endpoint is not worth losing it.
                tracing::error!(error = %fsclient::client::error_chain(&e), "metrics are not served");
                None
            }
        },
        None => None,
    };
    on_ready(&sup.target.mountpoint);
    let parts = sup.into_driver(fuse, negotiated, binary, args, spec, metrics);
    Driver::new(parts).run()
}

/// The mountpoint, resolved, if it is a Baton mount and we are root (else the usual
/// checks report what is there). Path resolution does not ask the filesystem about its
/// own root: it does not wait on a connection that no client serves.
fn baton_mount_at(opts: &MountOptions) -> Result<Option<PathBuf>, SuperviseError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let Ok(mountpoint) = std::fs::canonicalize(&opts.mountpoint) else {
        return Ok(None);
    };
    match mount::mount_at(&mountpoint).map_err(SuperviseError::Mountinfo)? {
        Some(e) if e.fstype == mount::FSTYPE => Ok(Some(mountpoint)),
        _ => Ok(None),
    }
}

/// The client of a live Baton mount at the mountpoint that waits for a supervisor, if
/// there is one (else the usual checks report what is mounted there).
fn find_live_client(
    home: &Home,
    opts: &MountOptions,
) -> Result<Option<(PathBuf, Adopted)>, SuperviseError> {
    let Some(mountpoint) = baton_mount_at(opts)? else {
        return Ok(None);
    };
    let wait = if std::env::var_os(CONTROL_FD_ENV).is_some() {
        HANDED_OVER_WAIT
    } else {
        Duration::ZERO
    };
    match adopt::adopt(home, &mountpoint, wait) {
        Ok(Some(a)) => Ok(Some((mountpoint, a))),
        Ok(None) => Ok(None),
        Err(e) => Err(SuperviseError::Adopt(e)),
    }
}

/// Slots of a new mount's request log: the reader threads of the serving client, those
/// of a successor still answering what its predecessor left, and margin.
fn request_log_slots(threads: u32) -> u32 {
    threads
        .saturating_mul(4)
        .saturating_add(32)
        .clamp(64, reqlog::MAX_SLOTS)
}

/// A new mount's request log, with `--no-resend` recorded in it.
fn create_request_log(opts: &MountOptions) -> Result<OwnedFd, SuperviseError> {
    let flags = if opts.no_resend {
        reqlog::flags::RESEND_DISABLED
    } else {
        0
    };
    reqlog::create(request_log_slots(opts.threads), flags).map_err(SuperviseError::RequestLog)
}

/// `hello` without the request-log capability.
fn without_request_log(mut hello: Hello) -> Hello {
    hello.capabilities.retain(|c| c != capability::REQUEST_LOG);
    hello
}

/// Whether a client announcing `hello` is sent the request log.
pub fn offers_request_log(hello: &Hello) -> bool {
    hello
        .capabilities
        .iter()
        .any(|c| c == capability::REQUEST_LOG)
}

/// What a supervisor that did not mount starts from: an adopted live client, or the
/// descriptors of a mount whose processes all died, withdrawn from the keeper (no client).
struct Seed {
    client: Option<ClientProcess>,
    adoption: Adoption,
    fuse: OwnedFd,
    journal: Option<OwnedFd>,
    request_log: Option<OwnedFd>,
}

impl From<Adopted> for Seed {
    fn from(a: Adopted) -> Seed {
        Seed {
            client: Some(a.client),
            adoption: a.adoption,
            fuse: a.fuse,
            journal: a.journal,
            request_log: a.request_log,
        }
    }
}

impl From<Withdrawn> for Seed {
    fn from(w: Withdrawn) -> Seed {
        Seed {
            client: None,
            adoption: w.adoption,
            fuse: w.fuse,
            journal: w.journal,
            request_log: w.request_log,
        }
    }
}

/// The descriptors the keeper (`BATON_KEEPER`) holds for a Baton mount at the
/// mountpoint whose supervisor and client are all gone, if it holds any. Nothing is
/// withdrawn while a supervisor answers on the control socket; if the deposited client
/// still lives, it is adopted instead (it listens on its adopt socket), never doubled.
fn find_kept(home: &Home, opts: &MountOptions) -> Result<Option<(PathBuf, Seed)>, SuperviseError> {
    let Some(keeper) = Keeper::from_env() else {
        return Ok(None);
    };
    let Some(mountpoint) = baton_mount_at(opts)? else {
        return Ok(None);
    };
    if ControlClient::connect(home, &mountpoint).is_ok() {
        return Ok(None);
    }
    match keeper.withdraw(&mountpoint) {
        Ok(Some(w)) if handover_proto::keeper::process_runs(w.adoption.pid) => {
            tracing::info!(
                pid = w.adoption.pid,
                "the deposited client lives: adopting it"
            );
            match adopt::adopt(home, &mountpoint, HANDED_OVER_WAIT)
                .map_err(SuperviseError::Adopt)?
            {
                Some(a) => Ok(Some((mountpoint, a.into()))),
                None => Ok(None),
            }
        }
        Ok(Some(w)) => {
            tracing::info!(
                generation = %w.adoption.generation,
                "re-seeding the mount from the descriptor keeper"
            );
            Ok(Some((mountpoint, w.into())))
        }
        Ok(None) => Ok(None),
        Err(e) => {
            tracing::warn!(error = %fsclient::client::error_chain(&e), "cannot ask the descriptor keeper");
            Ok(None)
        }
    }
}

/// How long the supervisor of the mount waits for `TookOver` after `HandingOver`.
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds the take-over's upgrade of the adopted client to this build's client.
const TAKE_OVER_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// The supervisor that handed the mount over, waiting for `TookOver`.
struct TakeOver {
    conn: ControlClient,
    listener: OwnedFd,
}

/// `baton mount --take-over`: a new supervisor in another process tree (a new mount pod)
/// takes a live mount over from its supervisor (`ControlRequest::HandOver`), adopts the
/// client, then upgrades it to this build's client binary, so the old pod can end.
///
/// ```text
/// new supervisor                      old supervisor               client
///   HandOver ------------------------->
///                                       Detach -------------------> waits on its adopt socket
///   <------ HandingOver + control socket
///   Adopt ----------------------------------------------------------->
///   <----------------------------------------------------- Adopted + fds
///   TookOver ------------------------->
///   <------------------------ HandedOver  (exits once the client has)
///   upgrade the client to ./baton-fs (freeze, state, RESEND as for `baton upgrade`)
/// ```
///
/// A client already waiting without a supervisor (a take-over interrupted after the
/// adoption) is adopted directly. If this process fails before `TookOver`, the old
/// supervisor adopts its client back.
fn run_take_over(
    home: &Home,
    opts: &MountOptions,
    on_ready: impl FnOnce(&Path),
) -> Result<(), SuperviseError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(SuperviseError::NotRoot);
    }
    let mountpoint = std::fs::canonicalize(&opts.mountpoint).map_err(|source| {
        SuperviseError::MountpointMissing {
            path: opts.mountpoint.clone(),
            source,
        }
    })?;
    match mount::mount_at(&mountpoint).map_err(SuperviseError::Mountinfo)? {
        Some(e) if e.fstype == mount::FSTYPE => {}
        _ => return Err(SuperviseError::NothingToTakeOver(mountpoint)),
    }
    if let Some(adopted) =
        adopt::adopt(home, &mountpoint, Duration::ZERO).map_err(SuperviseError::Adopt)?
    {
        tracing::info!("the client waited without a supervisor: adopted it");
        return run_adopted(home, opts, mountpoint, adopted, None, on_ready);
    }
    if let Some((mountpoint, kept)) = find_kept(home, opts)? {
        return run_adopted(home, opts, mountpoint, kept, None, on_ready);
    }
    let request_err = |source| SuperviseError::TakeOverRequest {
        path: mountpoint.clone(),
        source,
    };
    let conn = ControlClient::connect(home, &mountpoint).map_err(request_err)?;
    let timeout_ms = u64::try_from(TAKE_OVER_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
    let (answer, mut fds) = conn
        .exchange(&ControlRequest::HandOver { timeout_ms }, TAKE_OVER_TIMEOUT)
        .map_err(request_err)?;
    let refused = |reason: String| SuperviseError::TakeOverRefused {
        path: mountpoint.clone(),
        reason,
    };
    let old = match answer {
        ControlResponse::HandingOver { supervisor_pid } => supervisor_pid,
        ControlResponse::Error { message } => return Err(refused(message)),
        other => return Err(refused(format!("it answered {other:?}"))),
    };
    let Some(listener) = fds.pop() else {
        return Err(refused(
            "HandingOver came without the control socket".into(),
        ));
    };
    tracing::info!(old_supervisor = old, "the supervisor hands the mount over");
    let Some(adopted) =
        adopt::adopt(home, &mountpoint, HANDED_OVER_WAIT).map_err(SuperviseError::Adopt)?
    else {
        return Err(refused(
            "its client did not wait on the adopt socket".into(),
        ));
    };
    run_adopted(
        home,
        opts,
        mountpoint,
        adopted,
        Some(TakeOver { conn, listener }),
        on_ready,
    )
}

/// Supervises an adopted client: from here on as if this process had started it. With
/// `take_over`, confirms the take-over to the old supervisor once everything is set up;
/// with `opts.take_over`, starts by upgrading the client to this build's client binary.
fn run_adopted(
    home: &Home,
    opts: &MountOptions,
    mountpoint: PathBuf,
    adopted: impl Into<Seed>,
    take_over: Option<TakeOver>,
    on_ready: impl FnOnce(&Path),
) -> Result<(), SuperviseError> {
    let Seed {
        client,
        adoption,
        fuse,
        journal,
        request_log,
    } = adopted.into();
    // On a failure below, a live client is left serving (released, not killed).
    let release = |c: Option<ClientProcess>| {
        if let Some(c) = c {
            c.release();
        }
    };
    let span = tracing::info_span!("mount", mountpoint = %mountpoint.display(), volume = %adoption.spec.volume);
    let _entered = span.enter();
    // On any failure before the loop runs, the client is left serving (not killed): it
    // sees its channel close and waits for the next supervisor.
    let ours = opts
        .meta
        .clone()
        .unwrap_or_else(|| home.default_meta_url(DEFAULT_VOLUME));
    if ours != adoption.spec.meta_url {
        release(client);
        return Err(SuperviseError::AdoptedOtherVolume {
            ours: redact(&ours),
            theirs: redact(&adoption.spec.meta_url),
        });
    }
    let params = match handover_proto::fuse_init::InitRequest::parse(&adoption.init_request)
        .and_then(|r| InitReply::parse(&adoption.init_reply, r.unique))
    {
        Ok(p) => p,
        Err(e) => {
            release(client);
            return Err(SuperviseError::BadInitReply(e));
        }
    };
    let (control, take_over) = match take_over {
        Some(TakeOver { conn, listener }) => (
            Some(ControlServer::from_listener(listener, home, &mountpoint)),
            Some(conn),
        ),
        None => (ControlServer::from_env(home, &mountpoint), None),
    };
    let control = match control {
        Some(c) => c,
        None => match ControlServer::bind(home, &mountpoint) {
            Ok(c) => c,
            Err(e) => {
                release(client);
                return Err(SuperviseError::Control(e));
            }
        },
    };
    let signals = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            release(client);
            return Err(e);
        }
    };
    // A take-over moves the client to this build's binary; else restarts keep the
    // adopted client's binary.
    let adopted_binary = match &client {
        Some(c) if !opts.take_over => adopt::client_binary(c.pid()),
        _ => None,
    };
    let binary = match opts.client.clone().or(adopted_binary) {
        Some(b) => b,
        None => match spawn::default_client() {
            Ok(b) => b,
            Err(e) => {
                release(client);
                return Err(SuperviseError::Spawn(e));
            }
        },
    };
    let binary_for_upgrade = binary.clone();
    let journal = match journal {
        Some(j) => j,
        None => match mount::create_journal(mount::JOURNAL_BYTES) {
            Ok(j) => j,
            Err(e) => {
                release(client);
                return Err(SuperviseError::Journal(e));
            }
        },
    };
    // The mount's request log: the one its clients read into, or (a client started by a
    // supervisor that had none) a new one for the next generations. `--no-resend` is
    // kept by the log: given now, it is added; absent, the mount keeps what it had.
    let inherited_log = request_log.is_some();
    let request_log = match request_log {
        Some(log) if opts.no_resend => {
            match reqlog::add_flags(log.as_fd(), reqlog::flags::RESEND_DISABLED) {
                Ok(_) => log,
                Err(e) => {
                    release(client);
                    return Err(SuperviseError::RequestLog(e));
                }
            }
        }
        Some(log) => log,
        None => match create_request_log(opts) {
            Ok(log) => log,
            Err(e) => {
                release(client);
                return Err(e);
            }
        },
    };
    let client_args = vec![
        "--log-format".to_string(),
        opts.log_format.as_str().to_string(),
    ];
    let started = Instant::now();
    let metrics = match opts.metrics {
        Some(addr) => match MetricsServer::start(addr, started) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(error = %fsclient::client::error_chain(&e), "metrics are not served");
                None
            }
        },
        None => None,
    };
    tracing::info!(
        pid = adoption.pid,
        generation = %adoption.generation,
        binary = %binary.display(),
        "supervising the adopted client"
    );
    let spec = adoption.spec;
    let parts = DriverParts {
        facts: MountFacts {
            mountpoint: mountpoint.clone(),
            volume: spec.volume.clone(),
            meta_url: spec.meta_url.clone(),
            fuse_minor: params.minor,
            max_write: params.max_write,
            started,
        },
        control,
        signals,
        fuse,
        first: client,
        first_info: ClientInfo {
            generation: adoption.generation,
            binary,
            version: adoption.version,
            // A client whose request log did not come with it reads into none this
            // supervisor holds: the machine must not count on the log for it (it falls
            // back to RESEND where the kernel has it, and drains it plainly).
            hello: if inherited_log {
                adoption.hello
            } else {
                without_request_log(adoption.hello)
            },
            session: adoption.session,
            spec,
        },
        init_request: adoption.init_request,
        init_reply: adoption.init_reply,
        client_args,
        metrics,
        timings: Timings::default(),
        journal,
        request_log,
    };
    if let Some(conn) = take_over {
        match conn.exchange(&ControlRequest::TookOver, TAKE_OVER_TIMEOUT) {
            Ok((ControlResponse::HandedOver, _)) => {
                tracing::info!("the old supervisor handed the mount over");
            }
            Ok((other, _)) => {
                tracing::warn!(answer = ?other, "unexpected answer to TookOver; supervising anyway");
            }
            Err(e) => {
                tracing::warn!(error = %fsclient::client::error_chain(&e), "no answer to TookOver; supervising anyway");
            }
        }
    }
    let first_upgrade = opts.take_over.then(|| UpgradeRequest {
        binary: Some(binary_for_upgrade),
        timeout: TAKE_OVER_UPGRADE_TIMEOUT,
        force_drain: false,
        options: ClientOptions::default(),
    });
    on_ready(&mountpoint);
    Driver::new(parts).run_with(first_upgrade)
}

impl Supervisor {
    /// What the event loop takes over once the first client serves.
    fn into_driver(
        self,
        fuse: OwnedFd,
        negotiated: Negotiated,
        binary: PathBuf,
        client_args: Vec<String>,
        spec: MountSpec,
        metrics: Option<MetricsServer>,
    ) -> DriverParts {
        let Supervisor {
            target,
            control,
            signals,
            client,
            client_version,
            client_hello,
            client_session,
            generation,
            started,
            journal,
            request_log,
        } = self;
        DriverParts {
            facts: MountFacts {
                mountpoint: target.mountpoint,
                volume: target.volume,
                meta_url: target.meta_url,
                fuse_minor: negotiated.params.minor,
                max_write: negotiated.params.max_write,
                started,
            },
            control,
            signals,
            fuse,
            first: Some(client),
            first_info: ClientInfo {
                generation,
                binary,
                version: client_version,
                hello: client_hello,
                session: client_session,
                spec,
            },
            init_request: negotiated.request,
            init_reply: negotiated.reply,
            client_args,
            metrics,
            timings: Timings::default(),
            journal,
            request_log,
        }
    }
}
