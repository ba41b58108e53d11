//! `baton-chaos`: kill and/or upgrade the client of a live Baton mount at random moments
//! while an application works, and report whether the application saw anything but
//! pauses. See `upgrade_tests::chaos`.
//!
//! Exit status: 0 clean; 1 the application saw an error, a record was lost or damaged,
//! an operation hung, or a fault did not end with a serving client; 2 the run could not
//! start.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use upgrade_tests::baton_cli::Upgrade;
use upgrade_tests::chaos::{self, Observe, Target, parse_duration};
use upgrade_tests::workload::{self, Profile};

/// Kill and/or upgrade the client of a live Baton mount under a verifying workload (or
/// under your own job, with --faults-only), then report: operations, errors by errno,
/// lost records, and the pause of every fault.
#[derive(Debug, Parser)]
#[command(name = "baton-chaos", version)]
struct Args {
    /// The Baton mountpoint.
    mountpoint: PathBuf,
    /// How long to run (400ms, 30s, 10m, 2h).
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    duration: Duration,
    /// SIGKILL the serving client about this often.
    #[arg(long, value_parser = parse_duration)]
    kill_every: Option<Duration>,
    /// `baton upgrade` the client about this often.
    #[arg(long, value_parser = parse_duration)]
    upgrade_every: Option<Duration>,
    /// Stop killing after this many kills (the run ends early once every limit is reached).
    #[arg(long)]
    kills: Option<usize>,
    /// Stop upgrading after this many upgrades.
    #[arg(long)]
    upgrades: Option<usize>,
    /// The client binary to upgrade to (`baton upgrade --binary`; default: the same).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Upgrade in drain mode (`baton upgrade --drain`).
    #[arg(long)]
    drain: bool,
    /// `baton upgrade --timeout SECS`.
    #[arg(long)]
    upgrade_timeout: Option<f64>,
    /// The verifying workload's mix.
    #[arg(long, default_value = "mixed")]
    workload: Profile,
    /// Workload threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// A small data set (about 12 MiB, made in a second or two) instead of about 23 MiB.
    #[arg(long)]
    small: bool,
    /// Directory under the mountpoint the workload writes to.
    #[arg(long, default_value = "baton-chaos")]
    dir: String,
    /// Inject faults only, while your own job runs on the mount: no workload, nothing
    /// written; a statfs probe measures the pauses.
    #[arg(long)]
    faults_only: bool,
    /// Each gap between two faults is interval × [1 − J, 1 + J].
    #[arg(long, default_value_t = 0.5)]
    jitter: f64,
    /// Seed of the fault moments and the workload.
    #[arg(long)]
    seed: Option<u64>,
    /// How long a killed client may take to be replaced.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    recover_timeout: Duration,
    /// Print the JSON report on standard output (the summary then goes to standard
    /// error); `--json=FILE` writes it to FILE instead.
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Keep the workload's files after a clean run.
    #[arg(long)]
    keep: bool,
    /// No line per fault while running.
    #[arg(long, short)]
    quiet: bool,
    /// The `baton` executable (default: `$BATON_BIN`, else the one next to this
    /// program, else `baton` on the PATH).
    #[arg(long)]
    baton: Option<PathBuf>,
}

/// `--baton`, `$BATON_BIN`, next to this executable, or `baton` on the PATH.
fn baton_path(arg: Option<PathBuf>) -> PathBuf {
    if let Some(p) = arg {
        return p;
    }
    if let Some(p) = std::env::var_os("BATON_BIN") {
        return PathBuf::from(p);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("baton")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("baton"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let target = Target {
        baton: baton_path(args.baton),
        home: std::env::var_os("BATON_HOME").map_or_else(|| "/var/lib/baton".into(), PathBuf::from),
        mountpoint: args.mountpoint,
    };
    let mut cfg = chaos::Config::new(target, args.duration);
    cfg.kill_every = args.kill_every;
    cfg.upgrade_every = args.upgrade_every;
    cfg.max_kills = args.kills;
    cfg.max_upgrades = args.upgrades;
    cfg.upgrade = Upgrade {
        binary: args.binary,
        timeout_secs: args.upgrade_timeout,
        drain: args.drain,
    };
    cfg.jitter = args.jitter;
    cfg.seed = seed;
    cfg.recovery.timeout = args.recover_timeout;
    cfg.clean_up = !args.keep;
    cfg.observe = if args.faults_only {
        Observe::Probe
    } else {
        let base = if args.small {
            workload::Config::small(seed)
        } else {
            workload::Config {
                seed,
                ..workload::Config::default()
            }
        };
        Observe::Workload(workload::Config {
            threads: args.threads.max(1),
            profile: args.workload,
            dir: args.dir,
            slow_cap: 2_000_000,
            ..base
        })
    };
    let quiet = args.quiet;
    let mut log = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let report = match chaos::run(&cfg, &mut log) {
        Ok(r) => r,
        Err(e) => {
            let mut msg = format!("baton-chaos: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let json = report.to_json();
    match args.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => {
            eprint!("{}", report.summary());
            println!("{json}");
        }
        Some(p) => {
            print!("{}", report.summary());
            if let Err(e) = std::fs::write(p, format!("{json}\n")) {
                eprintln!("baton-chaos: cannot write {}: {e}", p.display());
                return ExitCode::from(2);
            }
            println!("JSON report: {}", p.display());
        }
        None => print!("{}", report.summary()),
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
