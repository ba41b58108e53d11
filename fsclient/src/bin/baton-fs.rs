//! `baton-fs`: the filesystem client. Started by `baton mount` (never by hand) with the
//! handover socket named by `BATON_HANDOVER_FD`; everything else is
//! [`fsclient::client::client_main`].

use std::process::ExitCode;

use fsclient::client::{BuildInfo, client_main};
use fsclient::fuse::buffers::RequestBufferAlloc;

/// Puts fuser's request buffers in the mount's request log, resident: a successor finds
/// every request this process read, and a kill -9 cannot fail a request the kernel is
/// copying (see `fsclient::fuse::buffers`).
#[global_allocator]
static ALLOC: RequestBufferAlloc = RequestBufferAlloc;

fn main() -> ExitCode {
    client_main(BuildInfo::default())
}
