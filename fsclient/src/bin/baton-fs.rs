//! `baton-fs`: the filesystem client. Started by `baton mount` (never by hand) with the
//! handover socket named by `BATON_HANDOVER_FD`; everything else is
//! [`fsclient::client::client_main`].

use std::process::ExitCode;

use fsclient::client::{BuildInfo, client_main};

fn main() -> ExitCode {
    client_main(BuildInfo::default())
}
