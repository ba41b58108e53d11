//! A serving client without a supervisor: it keeps serving, and waits on its mount's adopt
//! socket (`$BATON_HOME/run/<mount name>.adopt`, 0600 in the 0700 run directory) for a new
//! supervisor to take it over.
//!
//! ```text
//! supervisor gone (channel closed) or Detach     -> bind the adopt socket, keep serving
//! a new supervisor connects (peer must be root)
//!   Adopt { supervisor_pid }           --->
//!                                      <---  Adopted(Adoption) + /dev/fuse fd [+ journal]
//! that connection is the handover channel from now on; the socket file is removed
//! ```
//!
//! Nothing on this path touches the FUSE connection or the session: a peer that fails the
//! credential check, sends something else or goes away is dropped and the next one is
//! awaited. The client never dies of a bad peer.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::message::{Adoption, ToClient, ToSupervisor};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, connect, getsockopt,
    listen, socket, sockopt,
};

/// How long a connected supervisor may take to send `Adopt`.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The adopt socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot create the directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adopt socket path {0} is too long")]
    PathTooLong(PathBuf, #[source] Errno),
    #[error("another client already waits on {0}")]
    Taken(PathBuf),
    #[error("cannot create the adopt socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot restrict the adopt socket {path} to root")]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the adopt thread")]
    Thread(#[source] std::io::Error),
}

/// One adoption attempt failed (the next peer is awaited).
#[derive(Debug, thiserror::Error)]
enum AdoptError {
    #[error("accept failed")]
    Accept(#[source] Errno),
    #[error("cannot read the peer's credentials")]
    PeerCred(#[source] Errno),
    #[error("refused uid {uid} (pid {pid}): only root may adopt a client")]
    Forbidden { uid: u32, pid: i32 },
    #[error("no Adopt from the peer")]
    Recv(#[source] RecvError),
    #[error("the peer sent {0} instead of Adopt")]
    Unexpected(String),
    #[error("cannot answer Adopted")]
    Send(#[source] SendError),
}

/// What a new supervisor gets: the description, the connection and the journal.
pub struct Offer {
    pub adoption: Adoption,
    pub fuse: Arc<OwnedFd>,
    pub journal: Option<Arc<OwnedFd>>,
}

fn socket_err(path: &Path) -> impl Fn(Errno) -> ListenError + '_ {
    move |source| ListenError::Socket {
        path: path.to_path_buf(),
        source,
    }
}

/// Binds the adopt socket of the mount in `offer` and, on a thread, waits for a supervisor
/// to adopt this client; `adopted` gets the new handover channel. Returns at once.
pub fn wait_for_supervisor(
    offer: Offer,
    adopted: impl FnOnce(OwnedFd) + Send + 'static,
) -> Result<(), ListenError> {
    let path = handover_proto::rendezvous::adopt_socket_path(
        &offer.adoption.spec.home,
        &offer.adoption.spec.mountpoint,
    );
    let listener = bind_socket(&path)?;
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("adopt".into())
        .spawn(move || {
            let _entered = span.enter();
            tracing::info!(path = %path.display(), "waiting for a new supervisor");
            loop {
                match adopt_one(&listener, &offer) {
                    Ok((conn, supervisor)) => {
                        let _ = std::fs::remove_file(&path);
                        tracing::info!(supervisor, "adopted by a new supervisor");
                        adopted(conn);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %crate::client::error_chain(&e),
                            "adoption attempt refused; still waiting"
                        );
                        if matches!(e, AdoptError::Accept(_)) {
                            // E.g. out of descriptors: do not spin.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            }
        })
        .map_err(ListenError::Thread)?;
    Ok(())
}

fn bind_socket(path: &Path) -> Result<OwnedFd, ListenError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ListenError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    let addr = UnixAddr::new(path).map_err(|e| ListenError::PathTooLong(path.to_path_buf(), e))?;
    let new = || {
        socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(socket_err(path))
    };
    if path.exists() {
        let probe = new()?;
        match connect(probe.as_raw_fd(), &addr) {
            Ok(()) => return Err(ListenError::Taken(path.to_path_buf())),
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let listener = new()?;
    bind(listener.as_raw_fd(), &addr).map_err(socket_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ListenError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN)).map_err(socket_err(path))?;
    Ok(listener)
}

/// Accepts one peer and runs the exchange; returns the channel and the supervisor's pid.
fn adopt_one(listener: &OwnedFd, offer: &Offer) -> Result<(OwnedFd, u32), AdoptError> {
    let raw = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(AdoptError::Accept)?;
    // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
    let cred = getsockopt(&conn, sockopt::PeerCredentials).map_err(AdoptError::PeerCred)?;
    if cred.uid() != 0 {
        return Err(AdoptError::Forbidden {
            uid: cred.uid(),
            pid: cred.pid(),
        });
    }
    let (msg, _) =
        channel::recv::<ToClient>(conn.as_fd(), Some(ADOPT_TIMEOUT)).map_err(AdoptError::Recv)?;
    let supervisor = match msg {
        ToClient::Adopt { supervisor_pid } => supervisor_pid,
        other => {
            let got: String = format!("{other:?}").chars().take(80).collect();
            return Err(AdoptError::Unexpected(got));
        }
    };
    let mut fds: Vec<BorrowedFd<'_>> = vec![offer.fuse.as_fd()];
    if let Some(j) = &offer.journal {
        fds.push(j.as_fd());
    }
    let mut adoption = Box::new(offer.adoption.clone());
    adoption.journal = offer.journal.is_some();
    channel::send(conn.as_fd(), &ToSupervisor::Adopted(adoption), &fds)
        .map_err(AdoptError::Send)?;
    Ok((conn, supervisor))
}
