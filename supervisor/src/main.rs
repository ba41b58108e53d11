//! `baton`: parse the command line, set up logging, call the library, map the outcome to
//! an exit status.

mod cli;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use supervisor::background::{self, Readiness};
use supervisor::format::{self, FormatOptions};
use supervisor::home::Home;
use supervisor::supervise::{self, LogFormat, MountOptions};
use supervisor::upgrade::command::{self as upgrade_cmd, UpgradeCommand};
use supervisor::{status, umount};

use cli::{Cli, Command};

fn init_tracing(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let readiness = Readiness::from_env();
    if readiness.is_some() {
        // A background supervisor: leave the caller's session and terminal.
        let _ = background::new_session();
    }
    let default_level = if matches!(cli.command, Command::Mount(_)) {
        "info"
    } else {
        "warn"
    };
    init_tracing(cli.log_format.into(), default_level);
    let home = Home::from_env();
    match run(cli, &home, readiness) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Names the `baton-csi` binary `baton rollout` runs.
const BATON_CSI_ENV: &str = "BATON_CSI";

/// The `baton-csi` binary: `$BATON_CSI`, else next to this binary, else on PATH.
fn baton_csi() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os(BATON_CSI_ENV).filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    let beside = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("baton-csi"))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("baton-csi"))
                .find(|p| p.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        anyhow::anyhow!(
            "`baton rollout` runs `baton-csi rollout`, and no baton-csi was found (not in ${BATON_CSI_ENV}, next to baton, or on PATH); install the CSI driver's binary or run it where it is (e.g. kubectl exec into the baton-csi node plugin)"
        )
    })
}

/// `baton rollout ARGS`: replaces this process by `baton-csi rollout ARGS` (its exit
/// status is the command's).
fn rollout(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let bin = baton_csi()?;
    let err = std::process::Command::new(&bin)
        .arg("rollout")
        .args(args)
        .exec();
    Err(anyhow::Error::new(err).context(format!("cannot run {}", bin.display())))
}

fn run(cli: Cli, home: &Home, readiness: Option<Readiness>) -> anyhow::Result<ExitCode> {
    if let Command::Rollout(a) = cli.command {
        return rollout(a.args);
    }
    if let Command::Upgrade(a) = cli.command {
        if let Some(binary) = &a.supervisor {
            let up = upgrade_cmd::upgrade_supervisor(home, &a.mountpoint, binary, a.timeout)?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "outcome": "supervisor-upgraded",
                        "old_pid": up.old_pid,
                        "new_pid": up.new_pid,
                        "new_version": up.new_version,
                    })
                );
            } else {
                println!(
                    "{}: supervisor upgraded: pid {} -> {} ({}); the client and the mount were kept",
                    a.mountpoint.display(),
                    up.old_pid,
                    up.new_pid,
                    up.new_version
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        let cmd = UpgradeCommand {
            mountpoint: a.mountpoint.clone(),
            binary: a.binary,
            timeout: a.timeout,
            force_drain: a.drain,
            cache_dir: a.cache_dir,
            cache_bytes: a.cache_size.map(|mib| mib << 20),
        };
        let answer = upgrade_cmd::upgrade(home, &cmd)?;
        if a.json {
            println!("{}", upgrade_cmd::to_json(&answer));
        } else {
            print!("{}", upgrade_cmd::render(&a.mountpoint, &answer));
        }
        if let upgrade_cmd::UpgradeAnswer::RolledBack(r) = &answer {
            eprintln!(
                "baton: the upgrade rolled back: {}",
                r.reason.as_deref().unwrap_or("unknown reason")
            );
        }
        return Ok(ExitCode::from(answer.exit_code()));
    }
    run_other(cli, home, readiness).map(|()| ExitCode::SUCCESS)
}

fn run_other(cli: Cli, home: &Home, readiness: Option<Readiness>) -> anyhow::Result<()> {
    match cli.command {
        Command::Format(a) => {
            let opts = FormatOptions {
                name: a.name,
                meta: a.meta,
                storage: a.storage,
                block_size: a.block_size,
                capacity: a.capacity,
                inodes: a.inodes,
                force: a.force,
            };
            let f = format::format(home, &opts)?;
            println!(
                "formatted volume {} (uuid {}, storage {}, block size {})",
                f.name, f.uuid, f.storage, f.block_size
            );
            Ok(())
        }
        Command::Mount(a) if a.background => {
            let args: Vec<OsString> = std::env::args_os()
                .skip(1)
                .filter(|a| a.as_os_str() != "--background")
                .collect();
            let log = background::detach(home, &a.mountpoint, &args)?;
            println!(
                "mounted {} (supervisor log: {})",
                a.mountpoint.display(),
                log.display()
            );
            Ok(())
        }
        Command::Mount(a) => {
            let opts = MountOptions {
                mountpoint: a.mountpoint,
                meta: a.meta,
                client: a.client,
                threads: a.threads,
                attr_cache: a.attr_cache,
                entry_cache: a.entry_cache,
                cache_dir: a.cache_dir,
                cache_bytes: a.cache_size.saturating_mul(1 << 20),
                log_format: cli.log_format.into(),
                metrics: a.metrics,
                take_over: a.take_over,
                no_resend: a.no_resend,
            };
            let mut readiness = readiness;
            let result = supervise::run(home, &opts, |_| {
                if let Some(r) = readiness.take() {
                    r.ready();
                }
            });
            if let (Err(e), Some(r)) = (&result, readiness.take()) {
                r.failed(&fsclient::client::error_chain(e));
            }
            Ok(result?)
        }
        Command::Umount(a) => {
            match umount::umount(home, &a.mountpoint, a.lazy)? {
                umount::Umounted::BySupervisor => {}
                umount::Umounted::Directly => {
                    eprintln!(
                        "baton: no supervisor answered for {}; unmounted it directly",
                        a.mountpoint.display()
                    );
                }
            }
            Ok(())
        }
        Command::Status(a) => {
            match a.mountpoint {
                Some(mp) => {
                    let s = status::status(home, &mp)?;
                    if a.json {
                        println!("{}", status::to_json(&s));
                    } else {
                        print!("{}", status::render(&s));
                    }
                }
                None => {
                    let mut all = Vec::new();
                    for s in status::status_all(home)? {
                        match s {
                            Ok(s) if a.json => all.push(status::to_json(&s)),
                            Ok(s) => print!("{}", status::render(&s)),
                            Err(e) => eprintln!("baton: {:#}", anyhow::Error::from(e)),
                        }
                    }
                    if a.json {
                        println!("{}", serde_json::Value::Array(all));
                    }
                }
            }
            Ok(())
        }
        // Answered by `run`, which needs the exit status.
        Command::Upgrade(_) | Command::Rollout(_) => Ok(()),
    }
}
