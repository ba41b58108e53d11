//! The command line of `baton` (binary only: the library never sees clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use supervisor::format::parse_size;
use supervisor::supervise::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Baton: a FUSE filesystem whose client can be upgraded or restarted under a live mount"
)]
pub struct Cli {
    /// Log output format (logs go to stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> LogFormat {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a volume (write its settings into its metadata engine).
    Format(FormatArgs),
    /// Mount a volume and serve it until unmounted.
    Mount(MountArgs),
    /// Unmount a volume mounted with `baton mount`.
    Umount(UmountArgs),
    /// Show the state of Baton mounts.
    Status(StatusArgs),
    /// Replace a mount's client by a new process (another build, or the same one) without
    /// unmounting; while the client is being restarted after crashes, the next attempt
    /// runs the new binary. Exit status: 0 upgraded, 3 rolled back (the old client serves
    /// on), 1 error. With --supervisor, replaces the supervisor instead (0 replaced, 1
    /// not: the old supervisor serves on).
    Upgrade(UpgradeArgs),
    /// Roll a client upgrade across a Kubernetes cluster: runs `baton-csi rollout` with
    /// these arguments (the CSI driver's binary carries the Kubernetes client; it is found
    /// in $BATON_CSI, next to `baton`, or on PATH). `baton rollout --help` shows its
    /// options (--to, --selector, --max-parallel, --status, --pause, --resume).
    #[command(disable_help_flag = true)]
    Rollout(RolloutArgs),
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// Arguments of `baton-csi rollout`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Volume name.
    pub name: String,
    /// Metadata URL (redb:///path/meta.redb, redis://host:port/db) [default:
    /// redb://$BATON_HOME/NAME/meta.redb].
    #[arg(long)]
    pub meta: Option<String>,
    /// Object storage URL (fs:///path, s3://bucket?...) [default: fs://$BATON_HOME/NAME/data].
    #[arg(long)]
    pub storage: Option<String>,
    /// Block size (e.g. 4M, 1M, 64K).
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub block_size: u64,
    /// Capacity reported by df (e.g. 100G); 0 = unlimited.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub capacity: u64,
    /// Maximum number of inodes; 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    pub inodes: u64,
    /// Update the settings of an existing volume (its data is kept).
    #[arg(long)]
    pub force: bool,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("invalid number of seconds {s:?}"))?;
    Duration::try_from_secs_f64(v).map_err(|_| format!("invalid number of seconds {s:?}"))
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Where to mount (an existing, empty directory).
    pub mountpoint: PathBuf,
    /// Metadata URL of the volume [default: the embedded volume `default` under
    /// $BATON_HOME, formatted on first use].
    #[arg(long)]
    pub meta: Option<String>,
    /// Return once the mount serves; the supervisor keeps running detached, logging to
    /// $BATON_HOME/log/.
    #[arg(long)]
    pub background: bool,
    /// Client binary [default: baton-fs next to baton].
    #[arg(long)]
    pub client: Option<PathBuf>,
    /// FUSE worker threads (a blocking lock wait or a slow object read holds one).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// Kernel attribute cache lifetime, in seconds.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    pub attr_cache: Duration,
    /// Kernel entry (name) cache lifetime, in seconds.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    pub entry_cache: Duration,
    /// Block cache directory [default: $BATON_HOME/cache/VOLUME-UUID].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Block cache size bound, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub cache_size: u64,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9567).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Take the live mount at MOUNTPOINT over from its supervisor and move its client to
    /// this build's client binary, without unmounting (how a new mount pod replaces the
    /// old one). The old supervisor exits once its client has.
    #[arg(long)]
    pub take_over: bool,
    /// Behave as on a kernel without FUSE_NOTIFY_RESEND (Linux < 6.9), even where the
    /// kernel has it: upgrades drain, and after a crash the new client answers what the
    /// dead one had read from the mount's request log. Kept for the life of the mount.
    #[arg(long)]
    pub no_resend: bool,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    /// Detach the mount even if it is busy (MNT_DETACH).
    #[arg(long)]
    pub lazy: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The mount to report on [default: every Baton mount].
    pub mountpoint: Option<PathBuf>,
    /// Print JSON: one object for a mountpoint, an array without one.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    pub mountpoint: PathBuf,
    /// The new client binary [default: the serving client's binary].
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Replace the supervisor instead of the client: a new supervisor process of this
    /// `baton` binary takes over the mount, its control socket and the serving client;
    /// the old one exits (or, on failure, serves on).
    #[arg(long, conflicts_with_all = ["binary", "drain", "cache_dir", "cache_size"])]
    pub supervisor: Option<PathBuf>,
    /// Bound on everything before the commit, in seconds; past it the upgrade rolls back.
    #[arg(long, default_value = "30", value_parser = parse_positive_secs)]
    pub timeout: Duration,
    /// Drain (the old client finishes every request it read) even where the kernel could
    /// resend parked requests.
    #[arg(long)]
    pub drain: bool,
    /// Block cache directory of the new client [default: unchanged].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Block cache size bound of the new client, in MiB [default: unchanged].
    #[arg(long)]
    pub cache_size: Option<u64>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_positive_secs(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err("the timeout must be more than 0 seconds".into());
    }
    Ok(d)
}
