//! The control socket of one mount: `$BATON_HOME/run/<mount name>.sock`.
//!
//! A `SOCK_SEQPACKET` Unix socket, mode 0600 in a 0700 directory, named after the
//! mountpoint ([`crate::home::mount_name`]). Each connection carries one
//! [`ControlRequest`] and one [`ControlResponse`] — except a take-over
//! (`ControlRequest::HandOver`, then `TookOver`, on one connection). The peer's
//! credentials (SO_PEERCRED) are checked: only root or the supervisor's own user may talk
//! to it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::control::{ControlRequest, ControlResponse};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, connect, getsockopt,
    listen, socket, sockopt,
};

use crate::home::{DirError, Home, mount_name, private_dir};

/// How long a connected peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create the control socket directory")]
    Dir(#[source] DirError),
    #[error("control socket path {0} is too long")]
    PathTooLong(PathBuf, #[source] Errno),
    #[error("another supervisor already answers on {0}")]
    AlreadyRunning(PathBuf),
    #[error("cannot remove the stale control socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the control socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot restrict the control socket {path} to its owner")]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A control connection could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("accept on the control socket failed")]
    Accept(#[source] Errno),
    #[error("cannot read the peer's credentials")]
    PeerCred(#[source] Errno),
    #[error("refused a control connection from uid {uid} (pid {pid}): only root or uid {own} may")]
    Forbidden { uid: u32, pid: i32, own: u32 },
}

/// A request to a supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no supervisor answers for {0}")]
    NoSupervisor(PathBuf),
    #[error("cannot connect to the control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot send the request")]
    Send(#[source] SendError),
    #[error("no answer from the supervisor")]
    Recv(#[source] RecvError),
}

/// Where the control socket of `mountpoint` is.
pub fn socket_path(home: &Home, mountpoint: &Path) -> PathBuf {
    home.run_dir()
        .join(format!("{}.sock", mount_name(mountpoint)))
}

fn address(path: &Path) -> Result<UnixAddr, BindError> {
    UnixAddr::new(path).map_err(|e| BindError::PathTooLong(path.to_path_buf(), e))
}

fn new_socket(extra: SockFlag) -> Result<OwnedFd, Errno> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | extra,
        None,
    )
}

/// Names the listening control socket a supervisor hands to its successor
/// (`baton upgrade --supervisor`), so that the socket never stops answering.
pub const CONTROL_FD_ENV: &str = "BATON_CONTROL_FD";

/// The listening control socket of one mount; removed when dropped (unless handed to a
/// successor supervisor).
#[derive(Debug)]
pub struct ControlServer {
    listener: OwnedFd,
    path: PathBuf,
    /// A successor supervisor serves it: leave the file when dropped.
    keep: bool,
}

/// One accepted, authorized control connection.
#[derive(Debug)]
pub struct ControlConn {
    fd: OwnedFd,
    pub uid: u32,
    pub pid: i32,
}

impl ControlServer {
    /// Creates the control socket for `mountpoint`, replacing a stale one.
    pub fn bind(home: &Home, mountpoint: &Path) -> Result<ControlServer, BindError> {
        private_dir(&home.run_dir(), 0o700).map_err(BindError::Dir)?;
        let path = socket_path(home, mountpoint);
        let addr = address(&path)?;
        let sock_err = |source| BindError::Socket {
            path: path.clone(),
            source,
        };
        if path.exists() {
            let probe = new_socket(SockFlag::empty()).map_err(sock_err)?;
            match connect(probe.as_raw_fd(), &addr) {
                Ok(()) => return Err(BindError::AlreadyRunning(path)),
                Err(_) => std::fs::remove_file(&path).map_err(|source| BindError::RemoveStale {
                    path: path.clone(),
                    source,
                })?,
            }
        }
        let listener = new_socket(SockFlag::SOCK_NONBLOCK).map_err(sock_err)?;
        bind(listener.as_raw_fd(), &addr).map_err(sock_err)?;
        let server = ControlServer {
            listener,
            path,
            keep: false,
        };
        std::fs::set_permissions(&server.path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| BindError::Chmod {
                path: server.path.clone(),
                source,
            },
        )?;
        listen(
            &server.listener,
            Backlog::new(16).unwrap_or(Backlog::MAXCONN),
        )
        .map_err(|source| BindError::Socket {
            path: server.path.clone(),
            source,
        })?;
        tracing::debug!(path = %server.path.display(), "control socket ready");
        Ok(server)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The control socket of `mountpoint` that a predecessor supervisor handed to this
    /// process ([`CONTROL_FD_ENV`]), made close-on-exec; `None` if there is none.
    pub fn from_env(home: &Home, mountpoint: &Path) -> Option<ControlServer> {
        let fd: std::os::fd::RawFd = std::env::var(CONTROL_FD_ENV).ok()?.parse().ok()?;
        if fd <= 2 {
            return None;
        }
        // SAFETY: only checks the descriptor number; the borrow ends with this statement.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let is_socket = nix::sys::stat::fstat(borrowed).is_ok_and(|st| {
            nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
                == nix::sys::stat::SFlag::S_IFSOCK
        });
        if !is_socket {
            return None;
        }
        // SAFETY: the predecessor left exactly this descriptor open for us; nothing else in
        // this process refers to it, and the variable is removed below so it is taken once.
        let listener = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: called before the supervisor starts any thread.
        unsafe { std::env::remove_var(CONTROL_FD_ENV) };
        Some(ControlServer::from_listener(listener, home, mountpoint))
    }

    /// The control socket of `mountpoint` from a listening descriptor another supervisor
    /// passed (its own, during a take-over), made close-on-exec and non-blocking.
    pub fn from_listener(listener: OwnedFd, home: &Home, mountpoint: &Path) -> ControlServer {
        let _ = nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let _ = nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        ControlServer {
            listener,
            path: socket_path(home, mountpoint),
            keep: false,
        }
    }

    /// Leaves the socket file in place when this is dropped: a successor serves it.
    pub fn keep_file(&mut self) {
        self.keep = true;
    }

    /// The listening descriptor, to poll for connections.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Accepts one pending connection (`None` if there is none) and checks its peer.
    pub fn accept(&self) -> Result<Option<ControlConn>, AcceptError> {
        let raw = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => return Ok(None),
            Err(e) => return Err(AcceptError::Accept(e)),
        };
        // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let cred = getsockopt(&fd, sockopt::PeerCredentials).map_err(AcceptError::PeerCred)?;
        let own = nix::unistd::geteuid().as_raw();
        if cred.uid() != 0 && cred.uid() != own {
            return Err(AcceptError::Forbidden {
                uid: cred.uid(),
                pid: cred.pid(),
                own,
            });
        }
        Ok(Some(ControlConn {
            fd,
            uid: cred.uid(),
            pid: cred.pid(),
        }))
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlConn {
    pub fn recv_request(&self) -> Result<ControlRequest, RecvError> {
        self.recv_request_within(REQUEST_TIMEOUT)
    }

    /// The next request on this connection (the second message of a take-over).
    pub fn recv_request_within(&self, timeout: Duration) -> Result<ControlRequest, RecvError> {
        channel::recv::<ControlRequest>(self.fd.as_fd(), Some(timeout)).map(|(r, _)| r)
    }

    pub fn respond(&self, response: &ControlResponse) -> Result<(), SendError> {
        self.respond_with(response, &[])
    }

    /// Answers with descriptors (the count is checked against the message).
    pub fn respond_with(
        &self,
        response: &ControlResponse,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SendError> {
        channel::send(self.fd.as_fd(), response, fds)
    }
}

/// An open connection to the supervisor of a mount, for an exchange of several messages.
#[derive(Debug)]
pub struct ControlClient {
    sock: OwnedFd,
}

impl ControlClient {
    /// Connects to the control socket of `mountpoint`.
    pub fn connect(home: &Home, mountpoint: &Path) -> Result<ControlClient, RequestError> {
        let path = socket_path(home, mountpoint);
        let connect_err = |source| RequestError::Connect {
            path: path.clone(),
            source,
        };
        let addr = UnixAddr::new(&path).map_err(connect_err)?;
        let sock = new_socket(SockFlag::empty()).map_err(connect_err)?;
        match connect(sock.as_raw_fd(), &addr) {
            Ok(()) => Ok(ControlClient { sock }),
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => {
                Err(RequestError::NoSupervisor(mountpoint.to_path_buf()))
            }
            Err(e) => Err(connect_err(e)),
        }
    }

    /// Sends `request` and waits up to `timeout` for the answer and its descriptors.
    pub fn exchange(
        &self,
        request: &ControlRequest,
        timeout: Duration,
    ) -> Result<(ControlResponse, Vec<OwnedFd>), RequestError> {
        channel::send(self.sock.as_fd(), request, &[]).map_err(RequestError::Send)?;
        channel::recv::<ControlResponse>(self.sock.as_fd(), Some(timeout))
            .map_err(RequestError::Recv)
    }
}

/// Sends `request` to the supervisor of `mountpoint` and waits up to `timeout` for the
/// answer.
pub fn request(
    home: &Home,
    mountpoint: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, RequestError> {
    let (response, _) = ControlClient::connect(home, mountpoint)?.exchange(request, timeout)?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn request_and_response_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let mp = Path::new("/mnt/test");
        let server = ControlServer::bind(&home, mp).expect("bind");
        let meta = std::fs::metadata(server.path()).expect("socket exists");
        assert_eq!(meta.mode() & 0o777, 0o600);
        let run = std::fs::metadata(home.run_dir()).expect("run dir");
        assert_eq!(run.mode() & 0o777, 0o700);
        assert!(matches!(
            ControlServer::bind(&home, mp),
            Err(BindError::AlreadyRunning(_))
        ));

        let served = std::thread::spawn(move || {
            loop {
                if let Some(conn) = server.accept().expect("accept") {
                    // The AlreadyRunning probe above connected and left: skip it.
                    match conn.recv_request() {
                        Ok(req) => assert_eq!(req, ControlRequest::Status),
                        Err(e) if e.is_closed() => continue,
                        Err(e) => panic!("bad request: {e}"),
                    }
                    conn.respond(&ControlResponse::Busy).expect("respond");
                    return server;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let r =
            request(&home, mp, &ControlRequest::Status, Duration::from_secs(5)).expect("request");
        assert_eq!(r, ControlResponse::Busy);
        let server = served.join().expect("server thread");
        let path = server.path().to_path_buf();
        drop(server);
        assert!(!path.exists());
        assert!(matches!(
            request(&home, mp, &ControlRequest::Status, Duration::from_secs(1)),
            Err(RequestError::NoSupervisor(_))
        ));
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let mp = Path::new("/mnt/stale");
        // A socket file nobody listens on, like a killed supervisor leaves behind.
        private_dir(&home.run_dir(), 0o700).expect("run dir");
        let path = socket_path(&home, mp);
        let stale = new_socket(SockFlag::empty()).expect("socket");
        bind(stale.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        drop(stale);
        assert!(path.exists());
        let _second = ControlServer::bind(&home, mp).expect("rebind over a stale socket");
    }
}
