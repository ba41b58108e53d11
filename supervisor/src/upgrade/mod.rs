//! Live upgrade of the filesystem client under a live mount, its rollback, and the restart
//! of a successor that dies after the commit.
//!
//! [`machine`] decides, without any I/O (its inputs carry `now`; its outputs are
//! [`Action`]s and a deadline); [`driver`] is the only code that spawns clients, passes the
//! /dev/fuse descriptor, sends, waits for exits and writes FUSE_NOTIFY_RESEND.

pub mod command;
pub mod driver;
pub mod machine;
pub mod negotiate;
mod types;

#[cfg(test)]
mod tests;

pub use machine::Machine;
pub use types::{
    Action, ClientInfo, ClientOptions, ExitInfo, Outcome, PhaseKind, RequestRefused, RestartView,
    Stats, Timestamp, Timings, UpgradeRequest,
};
