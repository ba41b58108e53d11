//! Taking over a live client that this process did not start: after the supervisor of a
//! mount died (a restarted `baton mount`), or when a supervisor is replaced by a new
//! build (`baton upgrade --supervisor`, where the old supervisor also uses this to take
//! its client back if the new one fails).
//!
//! ```text
//! client (serving, supervisor gone or Detach)   listens on run/<mount name>.adopt
//! supervisor: connect; the peer must be root and the pid it names
//!   Adopt { supervisor_pid }          --->
//!                                     <---  Adopted(Adoption) + /dev/fuse [+ journal]
//! the connection is the client's handover channel from now on; if it announces
//! the request-log capability:
//!   SendRequestLog                    --->
//!                                     <---  RequestLog { held } [+ request log]
//! pidfd_open(pid): exits are seen on the pidfd (a non-child cannot be waited for)
//! ```

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::message::{Adoption, ToClient, ToSupervisor};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket, sockopt,
};

use crate::home::Home;
use crate::spawn::{ClientProcess, pidfd_open};

/// How long the client may take to answer `Adopt`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two connection attempts while a client is expected to start listening.
const RETRY: Duration = Duration::from_millis(20);

/// A live client could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("adopt socket path {0} is too long")]
    PathTooLong(PathBuf, #[source] Errno),
    #[error("cannot connect to the client's adopt socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot read the credentials of the process on {0}")]
    PeerCred(PathBuf, #[source] Errno),
    #[error("the process on {path} is uid {uid}, not root: refusing it")]
    NotRoot { path: PathBuf, uid: u32 },
    #[error("cannot send Adopt to the client")]
    Send(#[source] SendError),
    #[error("no answer from the client")]
    Recv(#[source] RecvError),
    #[error("the client answered {0} instead of Adopted")]
    Unexpected(String),
    #[error("the client says it is pid {said}, but pid {peer} answered")]
    PidMismatch { said: u32, peer: i32 },
    #[error("the client serves {theirs}, not {ours}")]
    OtherMountpoint { theirs: PathBuf, ours: PathBuf },
    #[error("cannot watch the client process (pidfd_open)")]
    Pidfd(#[source] std::io::Error),
}

impl AdoptError {
    /// The connection was closed or reset before the exchange completed.
    fn peer_went_away(&self) -> bool {
        match self {
            AdoptError::Recv(e) => e.is_closed(),
            AdoptError::Send(e) => e.is_closed(),
            _ => false,
        }
    }
}

/// A client adopted by this process.
#[derive(Debug)]
pub struct Adopted {
    pub client: ClientProcess,
    pub adoption: Adoption,
    /// The client's descriptor of the FUSE connection (a dup: the same connection).
    pub fuse: OwnedFd,
    pub journal: Option<OwnedFd>,
    /// The request log the client reads requests into, if it has one.
    pub request_log: Option<OwnedFd>,
}

/// Adopts the client waiting on the adopt socket of `mountpoint`. `Ok(None)`: no client
/// waits there (no socket, or nobody listens on it), after trying for `wait`.
pub fn adopt(
    home: &Home,
    mountpoint: &Path,
    wait: Duration,
) -> Result<Option<Adopted>, AdoptError> {
    let path = handover_proto::rendezvous::adopt_socket_path(home.path(), mountpoint);
    let addr = UnixAddr::new(&path).map_err(|e| AdoptError::PathTooLong(path.clone(), e))?;
    let deadline = Instant::now() + wait;
    // A listener that goes away with our connection still in its backlog (the client
    // was just adopted by someone else and is about to listen again) resets it: try
    // again until the deadline.
    let (sock, cred, msg, mut fds) = loop {
        let Some(sock) = connect_adopt_socket(&path, &addr, deadline)? else {
            return Ok(None);
        };
        let cred = getsockopt(&sock, sockopt::PeerCredentials)
            .map_err(|e| AdoptError::PeerCred(path.clone(), e))?;
        if cred.uid() != 0 {
            return Err(AdoptError::NotRoot {
                path,
                uid: cred.uid(),
            });
        }
        let sent = channel::send(
            sock.as_fd(),
            &ToClient::Adopt {
                supervisor_pid: std::process::id(),
            },
            &[],
        );
        let answer = match sent {
            Ok(()) => channel::recv::<ToSupervisor>(sock.as_fd(), Some(ANSWER_TIMEOUT))
                .map_err(AdoptError::Recv),
            Err(e) => Err(AdoptError::Send(e)),
        };
        match answer {
            Ok((msg, fds)) => break (sock, cred, msg, fds),
            Err(e) if e.peer_went_away() && Instant::now() < deadline => {
                tracing::debug!(error = %e, "the adopt socket's listener went away; retrying");
                std::thread::sleep(RETRY);
            }
            Err(e) => return Err(e),
        }
    };
    let adoption = match msg {
        ToSupervisor::Adopted(a) => *a,
        other => {
            let got: String = format!("{other:?}").chars().take(80).collect();
            return Err(AdoptError::Unexpected(got));
        }
    };
    // The channel checked the descriptor count: the FUSE one, then the journal if any.
    let journal = if adoption.journal { fds.pop() } else { None };
    let Some(fuse) = fds.pop() else {
        return Err(AdoptError::Unexpected(
            "Adopted without a descriptor".into(),
        ));
    };
    if i64::from(adoption.pid) != i64::from(cred.pid()) {
        return Err(AdoptError::PidMismatch {
            said: adoption.pid,
            peer: cred.pid(),
        });
    }
    if adoption.spec.mountpoint != mountpoint {
        return Err(AdoptError::OtherMountpoint {
            theirs: adoption.spec.mountpoint.clone(),
            ours: mountpoint.to_path_buf(),
        });
    }
    let pidfd = pidfd_open(adoption.pid).map_err(AdoptError::Pidfd)?;
    let request_log = if crate::supervise::offers_request_log(&adoption.hello) {
        ask_request_log(&sock)
    } else {
        None
    };
    tracing::info!(
        pid = adoption.pid,
        generation = %adoption.generation,
        version = %adoption.version,
        request_log = request_log.is_some(),
        "adopted the serving client"
    );
    Ok(Some(Adopted {
        client: ClientProcess::adopted(adoption.pid, sock, pidfd),
        adoption,
        fuse,
        journal,
        request_log,
    }))
}

/// Asks an adopted client for the request log it reads into (it announced that it can).
/// Without it, a crash of that client could not be answered from the log: logged.
fn ask_request_log(sock: &OwnedFd) -> Option<OwnedFd> {
    let answer = channel::send(sock.as_fd(), &ToClient::SendRequestLog, &[])
        .map_err(AdoptError::Send)
        .and_then(|()| {
            channel::recv::<ToSupervisor>(sock.as_fd(), Some(ANSWER_TIMEOUT))
                .map_err(AdoptError::Recv)
        });
    match answer {
        Ok((ToSupervisor::RequestLog { held: true }, mut fds)) => fds.pop(),
        Ok((ToSupervisor::RequestLog { held: false }, _)) => {
            tracing::info!("the adopted client reads into no request log");
            None
        }
        Ok((other, _)) => {
            tracing::warn!(answer = ?other, "unexpected answer to SendRequestLog: supervising without the client's request log");
            None
        }
        Err(e) => {
            tracing::warn!(error = %fsclient::client::error_chain(&e), "cannot get the adopted client's request log: if it dies, what it had read is not answered from the log");
            None
        }
    }
}

/// Connects to the adopt socket at `path`, retrying while nobody listens there until
/// `deadline`. `Ok(None)`: still nobody at the deadline.
fn connect_adopt_socket(
    path: &Path,
    addr: &UnixAddr,
    deadline: Instant,
) -> Result<Option<OwnedFd>, AdoptError> {
    loop {
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|source| AdoptError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        match connect(sock.as_raw_fd(), addr) {
            Ok(()) => return Ok(Some(sock)),
            Err(Errno::ENOENT | Errno::ECONNREFUSED) if Instant::now() < deadline => {
                std::thread::sleep(RETRY);
            }
            Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
            Err(source) => {
                return Err(AdoptError::Connect {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// The client's binary as the kernel knows it (`/proc/PID/exe`), for restarts; `None` if
/// it was replaced or removed since the client started.
pub fn client_binary(pid: u32) -> Option<PathBuf> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let shown = exe.to_string_lossy();
    if shown.ends_with(" (deleted)") || !exe.exists() {
        return None;
    }
    Some(exe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handover_proto::message::{Generation, Hello, MountSpec};
    use nix::sys::socket::{Backlog, accept4, bind, listen};
    use std::os::fd::FromRawFd;

    fn adoption(pid: u32, mountpoint: &Path) -> Adoption {
        Adoption {
            pid,
            version: "0.1.0".into(),
            hello: Hello {
                state_versions: vec![1],
                capabilities: Vec::new(),
            },
            session: 7,
            generation: Generation(3),
            spec: MountSpec {
                volume: "v".into(),
                meta_url: "redb:///x".into(),
                mountpoint: mountpoint.to_path_buf(),
                home: PathBuf::from("/h"),
                threads: 1,
                attr_ttl_ms: 0,
                entry_ttl_ms: 0,
                cache_dir: None,
                cache_bytes: 0,
            },
            init_request: Vec::new(),
            init_reply: Vec::new(),
            journal: false,
        }
    }

    /// A fake client on the adopt socket of `mp` under `home` that answers one `Adopt`
    /// with `answer` (and a descriptor of /dev/null where the message wants one).
    fn fake_client(home: &Home, mp: &Path, answer: ToSupervisor) -> std::thread::JoinHandle<()> {
        let path = handover_proto::rendezvous::adopt_socket_path(home.path(), mp);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("run dir");
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
        listen(&listener, Backlog::new(1).expect("backlog")).expect("listen");
        std::thread::spawn(move || {
            let raw = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).expect("accept");
            // SAFETY: accept4 just returned this descriptor; nothing else owns it.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let (msg, _) = channel::recv::<ToClient>(conn.as_fd(), Some(Duration::from_secs(5)))
                .expect("Adopt");
            assert!(matches!(msg, ToClient::Adopt { .. }), "{msg:?}");
            let null = std::fs::File::open("/dev/null").expect("/dev/null");
            let fds: Vec<std::os::fd::BorrowedFd<'_>> = match &answer {
                ToSupervisor::Adopted(a) => {
                    let n = 1 + usize::from(a.journal);
                    (0..n).map(|_| null.as_fd()).collect()
                }
                _ => Vec::new(),
            };
            channel::send(conn.as_fd(), &answer, &fds).expect("answer");
            // Wait for the supervisor to hang up.
            let _ = channel::recv::<ToClient>(conn.as_fd(), Some(Duration::from_secs(5)));
        })
    }

    #[test]
    fn no_waiting_client_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let got = adopt(&home, Path::new("/mnt/nothing"), Duration::ZERO).expect("adopt");
        assert!(got.is_none());
    }

    #[test]
    fn a_client_that_lies_about_its_pid_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let mp = Path::new("/mnt/liar");
        let other_pid = std::process::id() + 1;
        let t = fake_client(
            &home,
            mp,
            ToSupervisor::Adopted(Box::new(adoption(other_pid, mp))),
        );
        let err = adopt(&home, mp, Duration::from_secs(5)).expect_err("must refuse");
        assert!(
            matches!(err, AdoptError::PidMismatch { said, .. } if said == other_pid),
            "{err:?}"
        );
        t.join().expect("fake client");
    }

    #[test]
    fn a_client_of_another_mountpoint_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let mp = Path::new("/mnt/ours");
        let t = fake_client(
            &home,
            mp,
            ToSupervisor::Adopted(Box::new(adoption(
                std::process::id(),
                Path::new("/mnt/theirs"),
            ))),
        );
        let err = adopt(&home, mp, Duration::from_secs(5)).expect_err("must refuse");
        assert!(matches!(err, AdoptError::OtherMountpoint { .. }), "{err:?}");
        t.join().expect("fake client");
    }

    #[test]
    fn another_answer_than_adopted_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let mp = Path::new("/mnt/confused");
        let t = fake_client(&home, mp, ToSupervisor::Thawed);
        let err = adopt(&home, mp, Duration::from_secs(5)).expect_err("must refuse");
        assert!(matches!(err, AdoptError::Unexpected(_)), "{err:?}");
        t.join().expect("fake client");
    }

    #[test]
    fn a_live_client_of_this_mountpoint_is_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let mp = Path::new("/mnt/fine");
        let mut a = adoption(std::process::id(), mp);
        a.journal = true;
        let t = fake_client(&home, mp, ToSupervisor::Adopted(Box::new(a)));
        let got = adopt(&home, mp, Duration::from_secs(5))
            .expect("adopt")
            .expect("a client waits");
        // This test process is the "client": released before any assertion so that a
        // failing one never kills it.
        let (adopted, pid) = (got.client.is_adopted(), got.client.pid());
        got.client.release();
        assert!(adopted);
        assert_eq!(pid, std::process::id());
        assert_eq!(got.adoption.generation, Generation(3));
        assert_eq!(got.adoption.session, 7);
        assert!(got.journal.is_some());
        t.join().expect("fake client");
    }
}
