//! `baton-fs`: the filesystem client. Started by `baton mount` (never by hand) with the
//! handover socket named by `BATON_HANDOVER_FD`; parses its options, sets up logging,
//! runs [`fsclient::client`], and exits.

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use fsclient::client;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Baton's filesystem client (started by `baton mount`).
#[derive(Debug, Parser)]
#[command(name = "baton-fs", version)]
struct Args {
    /// Log output format (logs go to stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result =
        client::channel_from_env().and_then(|channel| client::run(channel, client::open_volume));
    match result {
        // Exit now: fuser's reader threads cannot be stopped otherwise.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            tracing::error!(error = %client::error_chain(&e), "baton-fs failed");
            ExitCode::FAILURE
        }
    }
}
