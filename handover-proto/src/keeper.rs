//! The descriptor keeper: a process outside the mount's process tree (in Kubernetes,
//! `baton-csi` on the node) that holds a duplicate of every mount's FUSE connection and
//! write journal, so that a mount whose supervisor and client both died (a mount pod
//! OOM-killed or evicted) is not aborted by the kernel, and a new supervisor re-seeds it:
//! it withdraws the descriptors and starts a client from them as after a client crash.
//!
//! ```text
//! supervisor (mount serving)            keeper ($BATON_KEEPER, SOCK_SEQPACKET, root only)
//!   Deposit(Adoption) + /dev/fuse [+ journal] --->
//!                                       <---  Kept | Refused { reason }
//! ... the mount pod dies; the kernel keeps the connection (the keeper holds a descriptor)
//! new supervisor
//!   Withdraw { mountpoint }              --->
//!                                       <---  Deposited(Adoption) + /dev/fuse [+ journal]
//!                                             | Nothing
//! ```
//!
//! One request and one answer per connection. A deposit replaces an earlier one for the
//! same mountpoint; a withdrawal leaves the deposit in place (the keeper keeps its copy
//! until the mount is gone), so a re-seeded mount stays protected.

use std::path::PathBuf;

use crate::channel::WireMessage;
use crate::codec::{Decode, Encode};
use crate::message::Adoption;

/// Names the keeper's socket for a supervisor (set by whoever runs the keeper).
pub const KEEPER_ENV: &str = "BATON_KEEPER";

/// Seconds a supervisor whose mount the keeper holds serves on after SIGTERM, waiting for
/// another supervisor to take the mount over, before it unmounts as usual (set by whoever
/// starts a successor when a supervisor is stopped: baton-csi in mount pods). Unset or
/// 0: SIGTERM unmounts at once.
pub const SIGTERM_WAIT_ENV: &str = "BATON_SIGTERM_WAIT";

/// Supervisor -> keeper.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ToKeeper {
    /// Keep the mount's descriptors: the FUSE connection, then the write journal if
    /// `journal` is set. `pid` is the serving client's (a withdrawer adopts it if it lives).
    Deposit(Box<Adoption>),
    /// Give back what was kept for this mountpoint.
    Withdraw { mountpoint: PathBuf },
    /// Keep the mount's request log (`crate::reqlog`) beside its deposit (one
    /// descriptor); sent on its own connection after `Deposit` was kept. Answered by
    /// `Kept` or `Refused`.
    DepositRequestLog { mountpoint: PathBuf },
    /// Give back the request log kept for this mountpoint. Answered by `RequestLog` or
    /// `Nothing`.
    WithdrawRequestLog { mountpoint: PathBuf },
}

/// Keeper -> supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum FromKeeper {
    /// The deposit is kept.
    Kept,
    /// The deposit was not kept, and why.
    Refused { reason: String },
    /// What was kept for the mountpoint, with its descriptors.
    Deposited(Box<Adoption>),
    /// Nothing is kept for the mountpoint.
    Nothing,
    /// The request log kept for the mountpoint (one descriptor).
    RequestLog,
}

fn descriptors(a: &Adoption) -> usize {
    1 + usize::from(a.journal)
}

impl WireMessage for ToKeeper {
    fn fd_count(&self) -> usize {
        match self {
            ToKeeper::Deposit(a) => descriptors(a),
            ToKeeper::DepositRequestLog { .. } => 1,
            ToKeeper::Withdraw { .. } | ToKeeper::WithdrawRequestLog { .. } => 0,
        }
    }
}

impl WireMessage for FromKeeper {
    fn fd_count(&self) -> usize {
        match self {
            FromKeeper::Deposited(a) => descriptors(a),
            FromKeeper::RequestLog => 1,
            FromKeeper::Kept | FromKeeper::Refused { .. } | FromKeeper::Nothing => 0,
        }
    }
}

/// Whether process `pid` runs: it exists and is not a zombie. A deposited client killed
/// together with its supervisor stays a zombie until whoever inherited it reaps it (in a
/// container, maybe never): it does not run, and its mount must be re-seeded.
pub fn process_runs(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm may hold anything, the state follows its last ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    matches!(state, Some(c) if !matches!(c, 'Z' | 'X' | 'x'))
}

#[cfg(test)]
mod tests {
    use super::process_runs;

    #[test]
    fn a_zombie_does_not_run() {
        assert!(process_runs(std::process::id()));
        assert!(!process_runs(0));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        // Not reaped yet: a zombie once it exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_runs(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            !process_runs(pid),
            "the exited child still counts as running"
        );
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "reaped too early"
        );
        child.wait().expect("wait");
        assert!(!process_runs(pid));
    }
}
