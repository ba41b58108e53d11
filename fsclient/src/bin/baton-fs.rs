//! `baton-fs`: the filesystem client. Started by `baton mount` (never by hand) with the
//! handover socket named by `BATON_HANDOVER_FD`; everything else is
//! [`fsclient::client::client_main`].

use std::process::ExitCode;

use fsclient::client::{BuildInfo, client_main};
use fsclient::fuse::prefault::PrefaultingAlloc;

/// Keeps fuser's request buffers resident: a kill -9 must not fail a request the kernel
/// is copying into one (see `fsclient::fuse::prefault`).
#[global_allocator]
static ALLOC: PrefaultingAlloc = PrefaultingAlloc;

fn main() -> ExitCode {
    client_main(BuildInfo::default())
}
