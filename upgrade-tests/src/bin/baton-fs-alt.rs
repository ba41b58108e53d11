//! `baton-fs-alt`: the Baton client built as another release — version `<version>-alt`
//! and a capability set of its own (`baton-fs`'s plus one the supervisor does not know) —
//! for testing upgrades between two different builds in both directions. With
//! `BATON_ALT_*` variables it announces other capabilities or state versions, or injects
//! faults (crash, hang, a different INIT reply) when given handover messages pass: see
//! `upgrade_tests::inject`. Started by the supervisor like `baton-fs`.

use std::process::ExitCode;

use fsclient::client::{self, BuildInfo};
use fsclient::fuse::buffers::RequestBufferAlloc;
use upgrade_tests::inject::{self, ALT_ONLY_CAPABILITY};

/// Like `baton-fs`: fuser's request buffers are in the request log (`fsclient::fuse::buffers`).
#[global_allocator]
static ALLOC: RequestBufferAlloc = RequestBufferAlloc;

fn main() -> ExitCode {
    let (alt, faults) = match inject::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton-fs-alt: {e}");
            return ExitCode::from(2);
        }
    };
    let mut build = BuildInfo::default();
    build.version = alt
        .version
        .unwrap_or_else(|| format!("{}-alt", build.version));
    build.capabilities = alt.capabilities.unwrap_or_else(|| {
        let mut c = build.capabilities.clone();
        c.push(ALT_ONLY_CAPABILITY.to_string());
        c
    });
    if let Some(v) = alt.state_versions {
        build.state_versions = v;
    }
    if faults.is_empty() {
        return client::client_main(build);
    }

    // Faults: the same as client_main, with the proxy on the handover socket.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::info!(?faults, "baton-fs-alt with injected faults");
    let result = client::channel_from_env()
        .map_err(|e| client::error_chain(&e))
        .and_then(|channel| {
            inject::interpose(channel, faults)
                .map_err(|e| format!("cannot start the fault proxy: {e}"))
        })
        .and_then(|channel| client::run(channel, &build).map_err(|e| client::error_chain(&e)));
    match result {
        // Exit now: fuser's reader threads cannot be stopped otherwise.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(error = %e, "baton-fs-alt failed");
            std::process::exit(1)
        }
    }
}
