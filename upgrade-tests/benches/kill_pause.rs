//! Pause after a kill -9 of the client: what an application notices when the serving
//! `baton-fs` is SIGKILLed at a random moment and the supervisor replaces it.
//!
//! Mounts an embedded volume whose metadata, objects and cache live under `--dir`
//! (default `/dev/shm`, a tmpfs, so that the storage's own latency is not measured), runs
//! the chaos of `baton-chaos` on it — the verifying workload, one SIGKILL of the serving
//! client about every `--every` (jittered) — and prints the chaos summary and a
//! markdown row for docs/benchmarks.md: kills survived, application errors, lost
//! records, the pause p50/p99/max (the longest application operation overlapping each
//! kill, from the signal until the application completed operations again), the time
//! until `baton status` named the new client, and the longest operation away from any
//! kill (what the application sees anyway).
//!
//! Run (as root; release binaries):
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p upgrade-tests --bench kill_pause
//! ```
//!
//! Options after `--`: `--kills N` (default 30), `--every DURATION` (default `2s`),
//! `--jitter J` (each gap is every × [1 − J, 1 + J], default 0.5), `--threads N`
//! (default 4), `--workload mixed|training`, `--dir DIR`, `--seed N`, `--no-resend`
//! (mount with `baton mount --no-resend`: what a dead client had read is answered from the
//! request log, as on kernels before 6.9).
//! The same figure on any mount, with the CLI:
//! `baton-chaos MOUNTPOINT --kill-every 2s --kills 30 --duration 10m --json`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use testkit::mount::{MountOptions, TestMount, baton_bin};
use upgrade_tests::chaos::{self, Observe, Target, parse_duration};
use upgrade_tests::workload::{self, Profile};

struct Opts {
    kills: usize,
    every: Duration,
    threads: usize,
    profile: Profile,
    dir: PathBuf,
    seed: u64,
    jitter: f64,
    no_resend: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        kills: 30,
        every: Duration::from_secs(2),
        threads: 4,
        profile: Profile::Mixed,
        dir: PathBuf::from("/dev/shm"),
        seed: 1,
        jitter: 0.5,
        no_resend: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--kills" => o.kills = val.parse().unwrap(),
            "--every" => o.every = parse_duration(&val).unwrap(),
            "--threads" => o.threads = val.parse().unwrap(),
            "--workload" => o.profile = val.parse().unwrap(),
            "--dir" => o.dir = PathBuf::from(&val),
            "--seed" => o.seed = val.parse().unwrap(),
            "--jitter" => o.jitter = val.parse().unwrap(),
            "--no-resend" => {
                o.no_resend = true;
                i += 1;
                continue;
            }
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn main() {
    let o = opts();
    let base = tempfile::Builder::new()
        .prefix("baton-kill-bench-")
        .tempdir_in(&o.dir)
        .unwrap();
    let m = TestMount::at(
        &base.path().join("home"),
        &base.path().join("mnt"),
        &MountOptions {
            meta: None,
            args: if o.no_resend {
                vec!["--no-resend".into()]
            } else {
                Vec::new()
            },
        },
    )
    .unwrap();
    let target = Target {
        baton: baton_bin(),
        home: m.home.clone(),
        mountpoint: m.mountpoint.clone(),
    };
    // Long enough for every kill even at the slowest recovery the run tolerates (the run
    // ends once the last kill is done).
    let per_kill = o.every.mul_f64(1.0 + o.jitter) + Duration::from_secs(40);
    let duration = per_kill * (o.kills as u32 + 1);
    let mut cfg = chaos::Config::new(target, duration);
    cfg.kill_every = Some(o.every);
    cfg.max_kills = Some(o.kills);
    cfg.seed = o.seed;
    cfg.jitter = o.jitter;
    cfg.observe = Observe::Workload(workload::Config {
        threads: o.threads,
        profile: o.profile,
        dir: "baton-chaos".into(),
        slow_cap: 2_000_000,
        ..workload::Config::small(o.seed)
    });
    let r = chaos::run(&cfg, &mut |line| eprintln!("{line}")).unwrap();
    print!("{}", r.summary());
    let k = r.faults_by_kind.get("kill").cloned().unwrap_or_default();
    println!();
    println!(
        "resend: {}",
        if o.no_resend {
            "disabled (--no-resend): answered from the request log"
        } else {
            "the kernel's"
        }
    );
    println!(
        "| kills (ok / injected) | app errors | records lost / acknowledged | pause p50 / p99 / max (ms) | new client after p50 / max (ms) | longest op away from kills (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} / {} | {} | {} / {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {} |",
        k.ok,
        k.count,
        r.errors,
        r.records_lost + r.records_corrupted + r.records_duplicated + r.records_out_of_order,
        r.records_acknowledged,
        k.pause_p50_ms,
        k.pause_p99_ms,
        k.pause_max_ms,
        k.recovery_p50_ms,
        k.recovery_max_ms,
        r.longest_away_from_faults_ms
            .map_or("-".into(), |l| format!("{l:.1}")),
    );
    let clean = r.is_clean();
    if clean {
        m.umount().unwrap();
    }
    assert!(clean, "the application noticed the kills:\n{}", r.summary());
}
