//! The client process runtime (`baton-fs`): talk to the supervisor over the inherited
//! handover socket, open the filesystem, run the INIT relay, serve, shut down.
//!
//! The sequence is drawn in `handover_proto::message`. The client never mounts or
//! unmounts: it is handed a connection. It opens everything that can fail (metadata
//! engine, object storage, session) *before* the supervisor mounts, so that a bad volume
//! never leaves a dead mount behind, and reports failures to the supervisor as
//! `Failed { reason }` with the whole error chain.
//!
//! After `Serve`, fuser's reader threads serve the kernel while the main thread waits for
//! either the supervisor's `Shutdown` or the end of the FUSE connection (unmounted by
//! somebody else). Either way the volume is flushed and closed exactly once.

use std::error::Error as StdError;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use fuser::Filesystem;
use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::message::{MountSpec, ToClient, ToSupervisor};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};

use crate::fuse::adapter::BatonFs;
use crate::fuse::relay::{self, RelayError};
use crate::vfs::{Vfs, VfsConfig};

/// The environment variable that names the inherited handover socket descriptor.
pub use handover_proto::message::CHANNEL_FD_ENV;

/// An error of the filesystem being served, from outside this module.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The version the client reports to the supervisor.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Workers of the tokio runtime the data path runs on.
const IO_WORKERS: usize = 4;
/// How long a blocking shutdown of the runtime may take at exit.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

/// What a client serves: opened once from the mount spec, before anything is mounted.
pub trait Volume: Send + Sync + 'static {
    /// The fuser filesystem that serves this volume.
    type Fs: Filesystem + Send + 'static;
    /// A filesystem for the FUSE session (called once per session).
    fn filesystem(&self) -> Self::Fs;
    /// Flushes everything written and closes the volume's session. Called exactly once.
    fn shutdown(&self) -> Result<(), BoxError>;
}

/// A Baton volume: the [`Vfs`] served by the [`BatonFs`] adapter.
#[derive(Debug)]
pub struct BatonVolume(Arc<Vfs>);

impl Volume for BatonVolume {
    type Fs = BatonFs;

    fn filesystem(&self) -> BatonFs {
        BatonFs::new(self.0.clone())
    }

    fn shutdown(&self) -> Result<(), BoxError> {
        self.0.shutdown().map_err(Into::into)
    }
}

/// Opens the volume `spec` names: metadata engine, volume settings, object storage,
/// session ([`Vfs::open`]).
pub fn open_volume(spec: &MountSpec, rt: tokio::runtime::Handle) -> Result<BatonVolume, BoxError> {
    let mut config = VfsConfig::new(
        spec.meta_url.clone(),
        spec.mountpoint.display().to_string(),
        spec.home.clone(),
    );
    config.attr_ttl = Duration::from_millis(spec.attr_ttl_ms);
    config.entry_ttl = Duration::from_millis(spec.entry_ttl_ms);
    config.cache_dir = spec.cache_dir.clone();
    config.cache_bytes = spec.cache_bytes;
    config.version = VERSION.to_string();
    Ok(BatonVolume(Vfs::open(config, rt)?))
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
    Open(#[source] BoxError),
    #[error("the INIT relay failed")]
    Relay(#[source] RelayError),
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

fn send(sock: BorrowedFd<'_>, msg: &ToSupervisor) -> Result<(), ClientError> {
    channel::send(sock, msg, &[]).map_err(ClientError::Send)
}

/// Tells the supervisor why this client gives up, then returns `err` (which the caller
/// logs).
fn fail(sock: BorrowedFd<'_>, err: ClientError) -> ClientError {
    let reason = error_chain(&err);
    if let Err(e) = send(sock, &ToSupervisor::Failed { reason }) {
        tracing::warn!(error = %error_chain(&e), "cannot report the failure to the supervisor");
    }
    err
}

fn unexpected(expected: &'static str, got: &ToClient) -> ClientError {
    let got = format!("{got:?}");
    let got = got.chars().take(80).collect();
    ClientError::Unexpected { expected, got }
}

/// Shuts the volume down once; later calls return the first result.
struct Closer<V: Volume> {
    volume: Arc<V>,
    result: Option<Option<String>>,
}

impl<V: Volume> Closer<V> {
    fn close(&mut self) -> Option<String> {
        if let Some(r) = &self.result {
            return r.clone();
        }
        let r = match self.volume.shutdown() {
            Ok(()) => {
                tracing::info!("volume flushed and closed");
                None
            }
            Err(e) => {
                let msg = error_chain(e.as_ref());
                tracing::error!(error = %msg, "flushing or closing the volume failed");
                Some(msg)
            }
        };
        self.result = Some(r.clone());
        r
    }
}

/// Answers a `Shutdown` before serving: close the volume and report.
fn shutdown_early<V: Volume>(
    sock: BorrowedFd<'_>,
    closer: &mut Closer<V>,
) -> Result<(), ClientError> {
    tracing::info!("supervisor asked to shut down before serving");
    let error = closer.close();
    send(
        sock,
        &ToSupervisor::ShutdownDone {
            error: error.clone(),
        },
    )?;
    match error {
        None => Ok(()),
        Some(e) => Err(ClientError::Shutdown(e.into())),
    }
}

enum Event {
    FromSupervisor(ToClient),
    SupervisorGone(Option<RecvError>),
    SessionEnded(std::io::Result<()>),
}

/// Runs a client on the handover socket `channel`: `open` makes the volume from the
/// supervisor's mount spec, on a tokio runtime this function creates. Returns when the
/// volume is closed; the caller should then exit the process (fuser's reader threads
/// cannot be stopped otherwise).
pub fn run<V, O>(channel: OwnedFd, open: O) -> Result<(), ClientError>
where
    V: Volume,
    O: FnOnce(&MountSpec, tokio::runtime::Handle) -> Result<V, BoxError>,
{
    let channel = Arc::new(channel);
    let sock = channel.as_fd();

    let (msg, _) = channel::recv::<ToClient>(sock, None).map_err(ClientError::Recv)?;
    let (generation, spec) = match msg {
        ToClient::Start { generation, spec } => (generation, spec),
        ToClient::Shutdown => return Ok(()),
        other => return Err(fail(sock, unexpected("Start", &other))),
    };
    let span = tracing::info_span!("client", %generation, mountpoint = %spec.mountpoint.display());
    let _entered = span.enter();
    tracing::info!(volume = %spec.volume, meta = %spec.meta_url, version = VERSION, "starting");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(IO_WORKERS)
        .thread_name("baton-io")
        .enable_all()
        .build()
        .map_err(|e| fail(sock, ClientError::Runtime(e)))?;

    let result = serve(&channel, &spec, open, rt.handle().clone());
    rt.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

fn serve<V, O>(
    channel: &Arc<OwnedFd>,
    spec: &MountSpec,
    open: O,
    rt: tokio::runtime::Handle,
) -> Result<(), ClientError>
where
    V: Volume,
    O: FnOnce(&MountSpec, tokio::runtime::Handle) -> Result<V, BoxError>,
{
    let sock = channel.as_fd();
    let volume = Arc::new(open(spec, rt).map_err(|e| fail(sock, ClientError::Open(e)))?);
    let mut closer = Closer {
        volume: volume.clone(),
        result: None,
    };
    let result = serve_volume(channel, spec, &volume, &mut closer);
    if result.is_err() {
        // Whatever went wrong, the volume's session is closed, not left to go stale.
        closer.close();
    }
    result
}

/// Everything after the volume is open: the INIT relay, serving, shutting down.
fn serve_volume<V: Volume>(
    channel: &Arc<OwnedFd>,
    spec: &MountSpec,
    volume: &Arc<V>,
    closer: &mut Closer<V>,
) -> Result<(), ClientError> {
    let sock = channel.as_fd();
    send(
        sock,
        &ToSupervisor::Prepared {
            pid: std::process::id(),
            version: VERSION.to_string(),
        },
    )?;
    tracing::info!("volume open; waiting for the kernel's INIT");

    let (msg, mut fds) = channel::recv::<ToClient>(sock, None).map_err(ClientError::Recv)?;
    let (request, fuse) = match msg {
        ToClient::Init { request } => match fds.pop() {
            Some(fd) => (request, fd),
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
        ToClient::Shutdown => return shutdown_early(sock, closer),
        other => return Err(fail(sock, unexpected("Init", &other))),
    };

    let handshaken = match relay::handshake(volume.filesystem(), &request, spec.threads as usize) {
        Ok(h) => h,
        Err(e) => return Err(fail(sock, ClientError::Relay(e))),
    };
    send(
        sock,
        &ToSupervisor::InitReply {
            reply: handshaken.reply().to_vec(),
        },
    )?;

    let (msg, _) = channel::recv::<ToClient>(sock, None).map_err(ClientError::Recv)?;
    match msg {
        ToClient::Serve => {}
        ToClient::Shutdown => return shutdown_early(sock, closer),
        other => return Err(unexpected("Serve", &other)),
    }
    let session = handshaken
        .attach(fuse.as_fd())
        .map_err(|e| fail(sock, ClientError::Relay(e)))?;
    drop(fuse);

    let (tx, rx) = mpsc::channel::<Event>();
    let session_tx = tx.clone();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let _entered = span.enter();
            let r = session.run();
            let _ = session_tx.send(Event::SessionEnded(r));
        })
        .map_err(ClientError::Spawn)?;
    let reader_channel = channel.clone();
    std::thread::Builder::new()
        .name("supervisor-rx".into())
        .spawn(move || {
            loop {
                match channel::recv::<ToClient>(reader_channel.as_fd(), None) {
                    Ok((msg, _)) => {
                        if tx.send(Event::FromSupervisor(msg)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let gone = if e.is_closed() { None } else { Some(e) };
                        let _ = tx.send(Event::SupervisorGone(gone));
                        return;
                    }
                }
            }
        })
        .map_err(ClientError::Spawn)?;
    tracing::info!(threads = spec.threads, fd = channel.as_raw_fd(), "serving");

    let mut supervisor_alive = true;
    let mut session_alive = true;
    while let Ok(event) = rx.recv() {
        match event {
            Event::FromSupervisor(ToClient::Shutdown) => {
                tracing::info!("shutting down on the supervisor's request");
                let error = closer.close();
                send(
                    sock,
                    &ToSupervisor::ShutdownDone {
                        error: error.clone(),
                    },
                )?;
                return match error {
                    None => Ok(()),
                    Some(e) => Err(ClientError::Shutdown(e.into())),
                };
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
                if !session_alive {
                    break;
                }
            }
            Event::SessionEnded(r) => {
                session_alive = false;
                match r {
                    Ok(()) => tracing::info!("the FUSE connection ended"),
                    Err(e) => tracing::error!(error = %e, "the FUSE session failed"),
                }
                // Flush now, tell the supervisor, and wait for its Shutdown.
                let error = closer.close();
                if !supervisor_alive {
                    break;
                }
                if let Err(e) = send(sock, &ToSupervisor::SessionEnded { error }) {
                    tracing::warn!(error = %error_chain(&e), "cannot tell the supervisor that the session ended");
                    break;
                }
            }
        }
    }
    match closer.close() {
        None => Ok(()),
        Some(e) => Err(ClientError::Shutdown(e.into())),
    }
}
