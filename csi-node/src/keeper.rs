//! The descriptor keeper ([`handover_proto::keeper`]): baton-csi holds a duplicate of every
//! backend's FUSE connection, write journal and request log, deposited by the backend's
//! supervisor.
//! While baton-csi holds them, the kernel does not abort a mount whose supervisor and
//! client both died (a mount pod OOM-killed): applications wait instead of getting
//! ENOTCONN, and the next `baton mount` of that backend (the restarted mount pod, or a
//! new one) withdraws them and restarts a client on the same connection, with the
//! journal's acknowledged writes, as after a client crash — and, on kernels without
//! FUSE_NOTIFY_RESEND, answers from the request log what the dead client had read.
//!
//! The socket is `<state>/run/keeper.sock` (0600 in a 0700 directory, `SOCK_SEQPACKET`,
//! peers must be root), named to supervisors by `BATON_KEEPER`. A deposit is refused
//! unless it names a Baton mount of this node and carries a `/dev/fuse` descriptor.
//! Deposits of mounts that are gone from the mount table are dropped, and so are deposits
//! whose client has been dead for 90 s with no supervisor re-seeding the mount (its pod
//! was deleted, not restarted): that mount then fails with ENOTCONN as it would without
//! a keeper, instead of hanging. The deposits live
//! in memory only: a restarted baton-csi starts empty, and each supervisor deposits
//! again when its serving generation changes (a mount whose processes die while
//! baton-csi is down is not protected).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use handover_proto::channel::{self, RecvError};
use handover_proto::keeper::{FromKeeper, ToKeeper};
use handover_proto::message::Adoption;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, getsockopt, listen,
    socket, sockopt,
};

use crate::mountinfo::MountTable;

/// How long a connected peer may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often deposits of mounts that are gone are dropped.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// By default, how long a deposit is kept after its client died with nobody re-seeding
/// the mount (a restarted or replacement mount pod withdraws it within this; if none
/// does, the mount must fail with ENOTCONN rather than hang).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(90);
/// `/dev/fuse`: character device 10:229.
const FUSE_DEV: (u32, u32) = (10, 229);

/// The keeper could not start.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot create the keeper directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keeper socket path {0} is too long")]
    PathTooLong(PathBuf, #[source] Errno),
    #[error("cannot create the keeper socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot restrict the keeper socket {path} to root")]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the keeper thread")]
    Thread(#[source] std::io::Error),
}

/// What is kept for one mount.
#[derive(Debug)]
struct Deposit {
    adoption: Adoption,
    fuse: OwnedFd,
    journal: Option<OwnedFd>,
    /// The mount's request log (`ToKeeper::DepositRequestLog`): the same memfd for the
    /// life of the mount, so a later deposit of the mount keeps it.
    request_log: Option<OwnedFd>,
    /// Since when its client (`adoption.pid`) is known dead.
    orphaned: Option<std::time::Instant>,
}

/// The running keeper; the deposits, by mountpoint.
#[derive(Debug, Clone)]
pub struct Keeper {
    path: PathBuf,
    deposits: Arc<Mutex<BTreeMap<PathBuf, Deposit>>>,
    /// [`ORPHAN_GRACE`] unless configured.
    orphan_grace: Duration,
}

/// Where the keeper's socket is, for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("run").join("keeper.sock")
}

fn is_fuse_device(fd: BorrowedFd<'_>) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| {
        let kind =
            nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT;
        kind == nix::sys::stat::SFlag::S_IFCHR
            && (
                nix::sys::stat::major(st.st_rdev) as u32,
                nix::sys::stat::minor(st.st_rdev) as u32,
            ) == FUSE_DEV
    })
}

fn is_baton_mount(path: &Path) -> bool {
    MountTable::read().is_ok_and(|t| t.at(path).is_some_and(|e| e.is_baton()))
}

impl Keeper {
    /// Binds the socket (replacing a stale one) and serves it on a thread; deposits whose
    /// client is dead go after `orphan_grace`.
    pub fn start(path: PathBuf, orphan_grace: Duration) -> Result<Keeper, KeeperError> {
        let listener = bind_socket(&path)?;
        let keeper = Keeper {
            path,
            deposits: Arc::default(),
            orphan_grace,
        };
        let k = keeper.clone();
        std::thread::Builder::new()
            .name("fd-keeper".into())
            .spawn(move || k.serve(&listener))
            .map_err(KeeperError::Thread)?;
        tracing::info!(path = %keeper.path.display(), "descriptor keeper serving");
        Ok(keeper)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`PRUNE_INTERVAL`], or less with a short orphan grace.
    fn prune_interval(&self) -> Duration {
        PRUNE_INTERVAL.min((self.orphan_grace / 2).max(Duration::from_secs(1)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Deposit>> {
        self.deposits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn prune(&self) {
        let Ok(table) = MountTable::read() else {
            return;
        };
        let now = std::time::Instant::now();
        self.lock().retain(|mp, d| {
            let live = table.at(mp).is_some_and(|e| e.is_baton());
            if !live {
                tracing::info!(mountpoint = %mp.display(), "descriptor keeper: the mount is gone; deposit dropped");
                return false;
            }
            if handover_proto::keeper::process_runs(d.adoption.pid) {
                d.orphaned = None;
                return true;
            }
            let since = *d.orphaned.get_or_insert(now);
            if now.duration_since(since) < self.orphan_grace {
                return true;
            }
            tracing::warn!(
                mountpoint = %mp.display(),
                grace = ?self.orphan_grace,
                "descriptor keeper: no supervisor re-seeded the mount in time; deposit dropped (the mount fails with ENOTCONN)"
            );
            false
        });
    }

    fn serve(&self, listener: &OwnedFd) {
        let mut pruned = std::time::Instant::now();
        loop {
            let ready = {
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let timeout =
                    PollTimeout::try_from(self.prune_interval()).unwrap_or(PollTimeout::MAX);
                matches!(nix::poll::poll(&mut fds, timeout), Ok(n) if n > 0)
            };
            if pruned.elapsed() >= self.prune_interval() {
                pruned = std::time::Instant::now();
                self.prune();
            }
            if !ready {
                continue;
            }
            let raw = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(error = %e, "descriptor keeper: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            if let Err(why) = self.answer(&conn) {
                tracing::warn!(%why, "descriptor keeper: request refused");
            }
        }
    }

    /// Answers one connection. `Err`: why nothing was done (logged).
    fn answer(&self, conn: &OwnedFd) -> Result<(), String> {
        let cred = getsockopt(conn, sockopt::PeerCredentials)
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        if cred.uid() != 0 {
            return Err(format!(
                "uid {} (pid {}) is not root",
                cred.uid(),
                cred.pid()
            ));
        }
        let (request, mut fds) = channel::recv::<ToKeeper>(conn.as_fd(), Some(REQUEST_TIMEOUT))
            .map_err(|e: RecvError| format!("bad request: {}", crate::error::chain(&e)))?;
        let reply = |msg: &FromKeeper, fds: &[BorrowedFd<'_>]| {
            channel::send(conn.as_fd(), msg, fds)
                .map_err(|e| format!("cannot answer: {}", crate::error::chain(&e)))
        };
        match request {
            ToKeeper::Deposit(adoption) => {
                // The channel checked the count: FUSE, then the journal if announced.
                let journal = if adoption.journal { fds.pop() } else { None };
                let fuse = fds.pop();
                let mountpoint = adoption.spec.mountpoint.clone();
                let refusal = match &fuse {
                    None => Some("no FUSE descriptor".to_string()),
                    Some(f) if !is_fuse_device(f.as_fd()) => {
                        Some("the descriptor is not /dev/fuse".to_string())
                    }
                    Some(_) if !is_baton_mount(&mountpoint) => Some(format!(
                        "{} is not a Baton mount on this node",
                        mountpoint.display()
                    )),
                    Some(_) => None,
                };
                match (refusal, fuse) {
                    (None, Some(fuse)) => {
                        tracing::info!(
                            mountpoint = %mountpoint.display(),
                            generation = %adoption.generation,
                            supervisor = cred.pid(),
                            "descriptor keeper: deposit kept"
                        );
                        let mut deposits = self.lock();
                        // The same mount (its session and connection) keeps its log; a
                        // new mount at the same path gets its own.
                        let request_log = deposits
                            .remove(&mountpoint)
                            .filter(|d| {
                                d.adoption.session == adoption.session
                                    && d.adoption.init_request == adoption.init_request
                            })
                            .and_then(|d| d.request_log);
                        deposits.insert(
                            mountpoint,
                            Deposit {
                                adoption: *adoption,
                                fuse,
                                journal,
                                request_log,
                                orphaned: None,
                            },
                        );
                        drop(deposits);
                        reply(&FromKeeper::Kept, &[])
                    }
                    (reason, _) => {
                        let reason = reason.unwrap_or_else(|| "no FUSE descriptor".into());
                        reply(
                            &FromKeeper::Refused {
                                reason: reason.clone(),
                            },
                            &[],
                        )?;
                        Err(reason)
                    }
                }
            }
            ToKeeper::Withdraw { mountpoint } => {
                let deposits = self.lock();
                match deposits.get(&mountpoint) {
                    Some(d) => {
                        let mut fds = vec![d.fuse.as_fd()];
                        fds.extend(d.journal.as_ref().map(AsFd::as_fd));
                        let mut adoption = d.adoption.clone();
                        adoption.journal = d.journal.is_some();
                        tracing::info!(
                            mountpoint = %mountpoint.display(),
                            supervisor = cred.pid(),
                            "descriptor keeper: a new supervisor withdraws the mount"
                        );
                        reply(&FromKeeper::Deposited(Box::new(adoption)), &fds)
                    }
                    None => reply(&FromKeeper::Nothing, &[]),
                }
            }
            ToKeeper::DepositRequestLog { mountpoint } => {
                let refusal = match fds.pop() {
                    None => Err("no request log descriptor".to_string()),
                    Some(log) => match handover_proto::reqlog::read_header(log.as_fd()) {
                        Err(e) => Err(format!(
                            "the descriptor holds no request log: {}",
                            crate::error::chain(&e)
                        )),
                        Ok(_) => match self.lock().get_mut(&mountpoint) {
                            Some(d) => {
                                d.request_log = Some(log);
                                Ok(())
                            }
                            None => Err(format!("nothing is kept for {}", mountpoint.display())),
                        },
                    },
                };
                match refusal {
                    Ok(()) => {
                        tracing::info!(mountpoint = %mountpoint.display(), "descriptor keeper: request log kept");
                        reply(&FromKeeper::Kept, &[])
                    }
                    Err(reason) => {
                        reply(
                            &FromKeeper::Refused {
                                reason: reason.clone(),
                            },
                            &[],
                        )?;
                        Err(reason)
                    }
                }
            }
            ToKeeper::WithdrawRequestLog { mountpoint } => {
                let deposits = self.lock();
                match deposits
                    .get(&mountpoint)
                    .and_then(|d| d.request_log.as_ref())
                {
                    Some(log) => reply(&FromKeeper::RequestLog, &[log.as_fd()]),
                    None => reply(&FromKeeper::Nothing, &[]),
                }
            }
        }
    }
}

fn bind_socket(path: &Path) -> Result<OwnedFd, KeeperError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeeperError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        KeeperError::Dir {
            path: dir.to_path_buf(),
            source,
        }
    })?;
    let addr = UnixAddr::new(path).map_err(|e| KeeperError::PathTooLong(path.to_path_buf(), e))?;
    let socket_err = |source| KeeperError::Socket {
        path: path.to_path_buf(),
        source,
    };
    // One keeper per state directory: a socket file left by a previous baton-csi is stale.
    let _ = std::fs::remove_file(path);
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(socket_err)?;
    bind(listener.as_raw_fd(), &addr).map_err(socket_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        KeeperError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    listen(&listener, Backlog::new(16).unwrap_or(Backlog::MAXCONN)).map_err(socket_err)?;
    Ok(listener)
}
