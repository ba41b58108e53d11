//! The supervisor's side of the descriptor keeper ([`handover_proto::keeper`]): when
//! `BATON_KEEPER` names a keeper's socket (baton-csi sets it in mount pods), the
//! supervisor deposits the mount's FUSE connection and write journal there once a client
//! serves (again after each new serving generation), then its request log (on a second
//! connection: a keeper that predates it refuses that request, and keeps the rest), and
//! a `baton mount` that finds a Baton mount with no supervisor and no client left
//! withdraws them to re-seed it.
//!
//! The keeper must be root (SO_PEERCRED); a keeper that is absent, slow or refuses never
//! stops a mount: a deposit that fails is logged and the mount serves on unprotected.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use handover_proto::channel::{self, RecvError, SendError};
use handover_proto::keeper::{FromKeeper, KEEPER_ENV, ToKeeper};
use handover_proto::message::Adoption;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket, sockopt,
};

/// How long the keeper may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A keeper request failed.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("keeper socket path {0} is too long")]
    PathTooLong(PathBuf, #[source] Errno),
    #[error("cannot connect to the descriptor keeper at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot read the credentials of the keeper at {0}")]
    PeerCred(PathBuf, #[source] Errno),
    #[error("the process on {path} is uid {uid}, not root: not a keeper")]
    NotRoot { path: PathBuf, uid: u32 },
    #[error("cannot send to the keeper")]
    Send(#[source] SendError),
    #[error("no answer from the keeper")]
    Recv(#[source] RecvError),
    #[error("the keeper refused: {0}")]
    Refused(String),
    #[error("the keeper answered {0}")]
    Unexpected(String),
}

/// What a withdrawal gives back.
#[derive(Debug)]
pub struct Withdrawn {
    pub adoption: Adoption,
    pub fuse: OwnedFd,
    pub journal: Option<OwnedFd>,
    /// The request log the dead clients read into (what they left unanswered is there).
    pub request_log: Option<OwnedFd>,
}

/// The keeper named by `BATON_KEEPER`.
#[derive(Clone, Debug)]
pub struct Keeper {
    path: PathBuf,
}

impl Keeper {
    pub fn from_env() -> Option<Keeper> {
        let path = std::env::var_os(KEEPER_ENV)?;
        (!path.is_empty()).then(|| Keeper {
            path: PathBuf::from(path),
        })
    }

    pub fn at(path: PathBuf) -> Keeper {
        Keeper { path }
    }

    /// The keeper socket's (device, inode), if it exists: a restarted keeper binds a new
    /// socket, and holds nothing.
    pub fn socket_identity(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    fn exchange(
        &self,
        msg: &ToKeeper,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(FromKeeper, Vec<OwnedFd>), KeeperError> {
        let addr = UnixAddr::new(&self.path)
            .map_err(|e| KeeperError::PathTooLong(self.path.clone(), e))?;
        let connect_err = |source| KeeperError::Connect {
            path: self.path.clone(),
            source,
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(connect_err)?;
        connect(sock.as_raw_fd(), &addr).map_err(connect_err)?;
        let cred = getsockopt(&sock, sockopt::PeerCredentials)
            .map_err(|e| KeeperError::PeerCred(self.path.clone(), e))?;
        if cred.uid() != 0 {
            return Err(KeeperError::NotRoot {
                path: self.path.clone(),
                uid: cred.uid(),
            });
        }
        channel::send(sock.as_fd(), msg, fds).map_err(KeeperError::Send)?;
        channel::recv::<FromKeeper>(sock.as_fd(), Some(ANSWER_TIMEOUT)).map_err(KeeperError::Recv)
    }

    /// Deposits the mount described by `adoption` (its `journal` flag is set from
    /// `journal`), then its request log. A keeper that does not keep the log (one that
    /// predates it) keeps the rest: that is logged, not an error.
    pub fn deposit(
        &self,
        adoption: Adoption,
        fuse: BorrowedFd<'_>,
        journal: Option<BorrowedFd<'_>>,
        request_log: Option<BorrowedFd<'_>>,
    ) -> Result<(), KeeperError> {
        let mut adoption = adoption;
        adoption.journal = journal.is_some();
        let mountpoint = adoption.spec.mountpoint.clone();
        let mut fds = vec![fuse];
        fds.extend(journal);
        match self
            .exchange(&ToKeeper::Deposit(Box::new(adoption)), &fds)?
            .0
        {
            FromKeeper::Kept => {}
            FromKeeper::Refused { reason } => return Err(KeeperError::Refused(reason)),
            other => return Err(KeeperError::Unexpected(short(&other))),
        }
        let Some(log) = request_log else {
            return Ok(());
        };
        let msg = ToKeeper::DepositRequestLog { mountpoint };
        match self.exchange(&msg, &[log]) {
            Ok((FromKeeper::Kept, _)) => {}
            Ok((other, _)) => {
                tracing::warn!(answer = %short(&other), "the descriptor keeper does not keep the request log: a mount it re-seeds cannot answer what its dead client had read")
            }
            Err(e) => {
                tracing::warn!(error = %fsclient::client::error_chain(&e), "the descriptor keeper does not keep the request log: a mount it re-seeds cannot answer what its dead client had read")
            }
        }
        Ok(())
    }

    /// The request log kept for `mountpoint` (`None`: none, or a keeper that predates
    /// request logs).
    fn withdraw_request_log(&self, mountpoint: &Path) -> Option<OwnedFd> {
        let msg = ToKeeper::WithdrawRequestLog {
            mountpoint: mountpoint.to_path_buf(),
        };
        match self.exchange(&msg, &[]) {
            Ok((FromKeeper::RequestLog, mut fds)) => fds.pop(),
            Ok((FromKeeper::Nothing, _)) => None,
            Ok((other, _)) => {
                tracing::warn!(answer = %short(&other), "the descriptor keeper gives back no request log");
                None
            }
            Err(e) => {
                tracing::warn!(error = %fsclient::client::error_chain(&e), "the descriptor keeper gives back no request log");
                None
            }
        }
    }

    /// What the keeper holds for `mountpoint` (`None`: nothing).
    pub fn withdraw(&self, mountpoint: &Path) -> Result<Option<Withdrawn>, KeeperError> {
        let msg = ToKeeper::Withdraw {
            mountpoint: mountpoint.to_path_buf(),
        };
        let (answer, mut fds) = self.exchange(&msg, &[])?;
        match answer {
            FromKeeper::Deposited(adoption) => {
                // The channel checked the count: the FUSE descriptor, then the journal.
                let journal = if adoption.journal { fds.pop() } else { None };
                let Some(fuse) = fds.pop() else {
                    return Err(KeeperError::Unexpected(
                        "Deposited without a descriptor".into(),
                    ));
                };
                if adoption.spec.mountpoint != mountpoint {
                    return Err(KeeperError::Unexpected(format!(
                        "a deposit for {} instead of {}",
                        adoption.spec.mountpoint.display(),
                        mountpoint.display()
                    )));
                }
                let request_log = crate::supervise::offers_request_log(&adoption.hello)
                    .then(|| self.withdraw_request_log(mountpoint))
                    .flatten();
                Ok(Some(Withdrawn {
                    adoption: *adoption,
                    fuse,
                    journal,
                    request_log,
                }))
            }
            FromKeeper::Nothing => Ok(None),
            FromKeeper::Refused { reason } => Err(KeeperError::Refused(reason)),
            other => Err(KeeperError::Unexpected(short(&other))),
        }
    }
}

fn short(m: &FromKeeper) -> String {
    format!("{m:?}").chars().take(80).collect()
}
