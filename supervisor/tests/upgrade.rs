//! `baton upgrade` and `baton status --json` / `--metrics` end to end, as root with real
//! mounts:
//!
//! - with the real client (`baton-fs`): upgrades (resend and `--drain`) under a small
//!   reading and appending loop with zero errors and every record read back; rollbacks
//!   (missing binary, a script that exits 1) under the same loop; the status counters;
//! - with fake clients (this test binary, started through wrapper scripts, speaking the
//!   handover protocol and misbehaving on cue): the state and the /dev/fuse descriptor
//!   reach the successor, every rollback cause reaches the CLI with its reason and exit
//!   status 3, a successor dying after the commit is replaced by the previous binary, a
//!   second upgrade during one is refused, and the metrics endpoint. A fake never reads
//!   /dev/fuse, so these tests never touch the mounted directory.
//!
//! The big verifying workload and the many-upgrade runs live in `upgrade-tests/`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use handover_proto::channel;
use handover_proto::message::{
    CHANNEL_FD_ENV, Hello, StateChunk, ToClient, ToSupervisor, capability,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const TIMEOUT: Duration = Duration::from_secs(60);
const FAKE_ENV: &str = "BATON_TEST_FAKE";

fn root() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

fn real_client() -> PathBuf {
    let client = Path::new(BATON).with_file_name("baton-fs");
    assert!(
        client.exists(),
        "{} is missing: run `cargo test --workspace`",
        client.display()
    );
    client
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A temp home and mountpoint, and the foreground supervisor we started; on drop:
/// SIGTERM (then SIGKILL) to it, and the mountpoint detached.
struct Fixture {
    dir: tempfile::TempDir,
    supervisor: Option<Child>,
    log: std::fs::File,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("baton-upgrade-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("mnt")).expect("mkdir");
        Fixture {
            dir,
            supervisor: None,
            log: tempfile::tempfile().expect("log"),
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn mnt_str(&self) -> String {
        self.mnt().display().to_string()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BATON);
        c.args(args)
            .env("BATON_HOME", self.home())
            .env_remove(CHANNEL_FD_ENV)
            .env_remove(FAKE_ENV)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run baton")
    }

    /// `baton mount MNT extra...` in the foreground, until its supervisor answers.
    fn mount(&mut self, extra: &[&str]) {
        let mnt = self.mnt_str();
        let mut args = vec!["mount", mnt.as_str()];
        args.extend_from_slice(extra);
        let child = self
            .cmd(&args)
            .stdout(self.log.try_clone().expect("dup"))
            .stderr(self.log.try_clone().expect("dup"))
            .spawn()
            .expect("spawn baton mount");
        self.supervisor = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.supervisor.as_mut().map(Child::try_wait) {
                panic!("baton mount exited early ({status}): {}", self.log_text());
            }
            if is_mounted(&self.mnt()) && self.try_status().is_some() {
                return;
            }
            assert!(Instant::now() < deadline, "mount: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        let mut f = self.log.try_clone().expect("dup");
        let mut s = String::new();
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let out = self.run(&["status", &self.mnt_str(), "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("no status: {}", self.log_text()))
    }

    fn upgrade(&self, extra: &[&str]) -> Output {
        let mnt = self.mnt_str();
        let mut args = vec!["upgrade", mnt.as_str()];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// A wrapper script that runs this test binary as a fake client in `mode`.
    fn fake(&self, name: &str, mode: &str) -> String {
        let exe = std::env::current_exe().expect("current exe");
        let script = self.dir.path().join(format!("{name}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n{FAKE_ENV}='{mode}' exec '{}' --exact fake_client --nocapture --test-threads=1\n",
                exe.display()
            ),
        )
        .expect("write script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        script.display().to_string()
    }

    /// `baton umount` works and the supervisor exits cleanly.
    fn umount(&mut self) {
        let out = self.run(&["umount", &self.mnt_str()]);
        assert!(out.status.success(), "umount: {}", text(&out));
        let mut child = self.supervisor.take().expect("supervisor");
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "supervisor did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "supervisor: {}", self.log_text());
        assert!(!is_mounted(&self.mnt()));
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        while is_mounted(&self.mnt()) {
            if nix::mount::umount2(&self.mnt(), nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

// --- a small verifying loop -----------------------------------------------------------

/// Reads a patterned file through one long-lived descriptor, appends numbered records
/// through another (fsync now and then), stats and lists, until stopped; counts every
/// failed call.
struct Io {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<u64>>,
    dir: PathBuf,
}

const PATTERN_LEN: usize = 3 << 20;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

impl Io {
    fn start(dir: &Path) -> Io {
        std::fs::write(dir.join("pattern"), pattern(PATTERN_LEN)).expect("write pattern");
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let ops = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();

        let (s, e, o, d) = (stop.clone(), errors.clone(), ops.clone(), dir.to_path_buf());
        threads.push(std::thread::spawn(move || {
            let expect = pattern(PATTERN_LEN);
            let f = std::fs::File::open(d.join("pattern")).expect("open pattern");
            let mut buf = vec![0u8; 64 << 10];
            let mut off = 0usize;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                use std::os::unix::fs::FileExt;
                match f.read_exact_at(&mut buf, off as u64) {
                    Ok(()) if buf[..] == expect[off..off + buf.len()] => {}
                    Ok(()) => {
                        eprintln!("pattern mismatch at {off}");
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        eprintln!("pread at {off}: {err}");
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
                off = (off + 77_777) % (PATTERN_LEN - buf.len());
                n += 1;
                o.fetch_add(1, Ordering::Relaxed);
            }
            n
        }));

        let (s, e, o, d) = (stop.clone(), errors.clone(), ops.clone(), dir.to_path_buf());
        threads.push(std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o644)
                .open(d.join("log"))
                .expect("open log");
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let record = format!("record {n:08}\n");
                match f.write_all(record.as_bytes()) {
                    Ok(()) => n += 1,
                    Err(err) => {
                        eprintln!("append {n}: {err}");
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if n % 50 == 0 {
                    if let Err(err) = f.sync_all() {
                        eprintln!("fsync: {err}");
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Err(err) = std::fs::metadata(d.join("pattern")) {
                    eprintln!("stat: {err}");
                    e.fetch_add(1, Ordering::Relaxed);
                }
                if n % 20 == 0 {
                    if let Err(err) = std::fs::read_dir(&d).map(|r| r.count()) {
                        eprintln!("readdir: {err}");
                        e.fetch_add(1, Ordering::Relaxed);
                    }
                }
                o.fetch_add(1, Ordering::Relaxed);
            }
            n
        }));
        Io {
            stop,
            errors,
            ops,
            threads,
            dir: dir.to_path_buf(),
        }
    }

    /// Waits until the loop made `n` more operations (it is alive and not stuck).
    fn progress(&self, n: u64) {
        let start = self.ops.load(Ordering::Relaxed);
        let deadline = Instant::now() + TIMEOUT;
        while self.ops.load(Ordering::Relaxed) < start + n {
            assert!(Instant::now() < deadline, "the I/O loop is stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the loop and checks every appended record is there, in order.
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut counts = Vec::new();
        for t in self.threads {
            counts.push(t.join().expect("io thread"));
        }
        let records = counts[1];
        let log = std::fs::read_to_string(self.dir.join("log")).expect("read log");
        let expected: String = (0..records).map(|n| format!("record {n:08}\n")).collect();
        if log != expected {
            let got: Vec<&str> = log.lines().collect();
            let first_bad = (0..records as usize)
                .find(|&i| got.get(i).copied() != Some(format!("record {i:08}").as_str()));
            panic!(
                "appended records lost or damaged: {} bytes, {} expected; first difference at record {first_bad:?}: {:?}",
                log.len(),
                expected.len(),
                first_bad.and_then(|i| got.get(i.saturating_sub(1)..(i + 3).min(got.len())))
            );
        }
        (self.errors.load(Ordering::Relaxed), records)
    }
}

// --- the real client ------------------------------------------------------------------

#[test]
fn upgrades_under_io_have_zero_errors_in_both_modes() {
    if !root() {
        return;
    }
    real_client();
    let mut f = Fixture::new();
    f.mount(&[]);
    let io = Io::start(&f.mnt());
    io.progress(200);
    let mut pauses = Vec::new();
    for extra in [&[][..], &[][..], &["--drain"][..], &[][..]] {
        let out = f.upgrade(extra);
        assert!(out.status.success(), "upgrade {extra:?}: {}", text(&out));
        let t = text(&out);
        let mode = if extra.is_empty() {
            "resend mode"
        } else {
            "drain mode"
        };
        assert!(t.starts_with("upgraded ") && t.contains(mode), "{t}");
        pauses.push(t.lines().nth(1).unwrap_or_default().trim().to_string());
        io.progress(200);
    }
    let (errors, records) = io.finish();
    assert_eq!(
        errors,
        0,
        "application errors during upgrades: {}",
        f.log_text()
    );
    assert!(records > 0);
    let s = f.status();
    assert_eq!(num(&s, "generation"), 5, "{s}");
    assert_eq!(num(&s, "upgrades"), 4, "{s}");
    assert_eq!(num(&s, "rollbacks"), 0, "{s}");
    assert!(s["last_pause_us"].is_u64(), "{s}");
    eprintln!("pauses: {pauses:?}");
    f.umount();
}

#[test]
fn rollbacks_keep_the_real_client_serving_without_errors() {
    if !root() {
        return;
    }
    real_client();
    let mut f = Fixture::new();
    f.mount(&[]);
    let before = f.status();
    let io = Io::start(&f.mnt());
    io.progress(100);

    let exits_1 = f.dir.path().join("exits-1.sh");
    std::fs::write(&exits_1, "#!/bin/sh\nexit 1\n").expect("script");
    std::fs::set_permissions(&exits_1, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cases = [
        ("/nonexistent/baton-fs".to_string(), "does not exist"),
        (exits_1.display().to_string(), "exited (exit status 1)"),
    ];
    for (binary, why) in &cases {
        let out = f.upgrade(&["--binary", binary]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(3), "{t}");
        assert!(
            t.starts_with("rolled back ") && t.contains("serves on"),
            "{t}"
        );
        assert!(
            t.contains(why) && t.contains("the upgrade rolled back"),
            "{t}"
        );
        io.progress(100);
    }
    let (errors, _) = io.finish();
    assert_eq!(errors, 0);
    let s = f.status();
    assert_eq!(s["generation"], before["generation"], "{s}");
    assert_eq!(s["client_pid"], before["client_pid"], "{s}");
    assert_eq!(num(&s, "rollbacks"), 2, "{s}");
    assert_eq!(num(&s, "upgrades"), 0, "{s}");
    assert!(
        s["last_rollback"]
            .as_str()
            .is_some_and(|r| r.contains("exit status 1")),
        "{s}"
    );
    f.umount();
}

// --- fake clients ---------------------------------------------------------------------

const STATE_LEN: usize = 1_300_000;

fn state_byte(i: usize) -> u8 {
    (i.wrapping_mul(7) + 3) as u8
}

/// An INIT reply computed from the request only, so that every fake gives the same one.
fn init_reply(request: &[u8], max_write: u32) -> Vec<u8> {
    let u32_at = |o: usize| u32::from_le_bytes(request[o..o + 4].try_into().expect("4 bytes"));
    let unique = u64::from_le_bytes(request[8..16].try_into().expect("8 bytes"));
    let mut b = Vec::new();
    b.extend_from_slice(&80u32.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&unique.to_le_bytes());
    b.extend_from_slice(&7u32.to_le_bytes());
    b.extend_from_slice(&u32_at(44).to_le_bytes());
    b.extend_from_slice(&u32_at(48).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    b.extend_from_slice(&16u16.to_le_bytes()); // max_background
    b.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
    b.extend_from_slice(&max_write.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // time_gran
    b.extend_from_slice(&32u16.to_le_bytes()); // max_pages
    b.extend_from_slice(&[0u8; 34]);
    b
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Not a test of its own: when started by `baton` through a wrapper script, acts as a
/// client as `BATON_TEST_FAKE` says (comma-separated: `version=V`, `versions=2`,
/// `caps=drain`, `bad-init`, `die-at=start|serve`, `hang-at=start`, `fail-at=init`).
/// A no-op otherwise.
#[test]
fn fake_client() {
    let (Ok(fd), Ok(mode)) = (std::env::var(CHANNEL_FD_ENV), std::env::var(FAKE_ENV)) else {
        return;
    };
    let opt = |k: &str| {
        mode.split(',')
            .find_map(|t| t.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let flag = |k: &str| mode.split(',').any(|t| t == k);
    let fd: i32 = fd.parse().expect("fd number");
    // SAFETY: the supervisor passed us this descriptor; nothing else here owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock: BorrowedFd<'_> = sock.as_fd();
    let send = |m: ToSupervisor| channel::send(sock, &m, &[]).expect("send");
    let recv = || channel::recv::<ToClient>(sock, None).expect("recv");

    let (ToClient::Start { resume_session, .. }, _) = recv() else {
        panic!("expected Start");
    };
    if opt("die-at").as_deref() == Some("start") {
        std::process::exit(7);
    }
    if opt("hang-at").as_deref() == Some("start") {
        std::thread::sleep(Duration::from_secs(3600));
    }
    let caps: Vec<String> = match opt("caps") {
        Some(c) => c.split('+').map(String::from).collect(),
        None => [
            capability::PARK_RESEND,
            capability::DRAIN,
            capability::TAKEOVER,
        ]
        .map(String::from)
        .to_vec(),
    };
    let versions = opt("versions").map_or(vec![1], |v| vec![v.parse().expect("version")]);
    send(ToSupervisor::Prepared {
        pid: std::process::id(),
        version: opt("version").unwrap_or_else(|| "fake".into()),
        hello: Hello {
            state_versions: versions,
            capabilities: caps,
        },
        session: resume_session.unwrap_or(4242),
    });

    // The INIT relay; a successor gets the state first.
    let mut state = Vec::new();
    let (request, fuse) = loop {
        match recv() {
            (ToClient::State(StateChunk { data, .. }), _) => state.extend_from_slice(&data),
            (ToClient::Init { request }, mut fds) => break (request, fds.pop().expect("fd")),
            (ToClient::Shutdown, _) => {
                send(ToSupervisor::ShutdownDone { error: None });
                std::process::exit(0);
            }
            (other, _) => panic!("unexpected {other:?}"),
        }
    };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fuse.as_raw_fd())).expect("readlink");
    if link != Path::new("/dev/fuse") {
        send(ToSupervisor::Failed {
            reason: format!("Init came with {}, not /dev/fuse", link.display()),
        });
        std::process::exit(1);
    }
    if resume_session.is_some() {
        let ok =
            state.len() == STATE_LEN && state.iter().enumerate().all(|(i, b)| *b == state_byte(i));
        if !ok || opt("fail-at").as_deref() == Some("init") {
            send(ToSupervisor::Failed {
                reason: format!("fake: cannot import a state of {} bytes", state.len()),
            });
            std::process::exit(1);
        }
    }
    let max_write = if flag("bad-init") { 65536 } else { 131072 };
    send(ToSupervisor::InitReply {
        reply: init_reply(&request, max_write),
    });

    loop {
        match recv().0 {
            ToClient::Serve => {
                if opt("die-at").as_deref() == Some("serve") {
                    std::process::abort();
                }
                if resume_session.is_some() {
                    send(ToSupervisor::FirstServed {
                        monotonic_ns: monotonic_ns(),
                    });
                }
            }
            ToClient::PreFlush => send(ToSupervisor::PreFlushed { error: None }),
            ToClient::Freeze { .. } => {
                let bytes: Vec<u8> = (0..STATE_LEN).map(state_byte).collect();
                for chunk in handover_proto::state::split(&bytes) {
                    send(ToSupervisor::State(chunk));
                }
                send(ToSupervisor::Frozen {
                    parked: 0,
                    drained: 0,
                });
            }
            ToClient::Thaw => send(ToSupervisor::Thawed),
            ToClient::Commit => std::process::exit(0),
            ToClient::Shutdown => {
                send(ToSupervisor::ShutdownDone { error: None });
                std::process::exit(0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A mount served by a fake generation 1.
fn fake_mount(extra: &[&str]) -> Fixture {
    let mut f = Fixture::new();
    let first = f.fake("first", "version=fake-1");
    let mut args = vec!["--client", first.as_str()];
    args.extend_from_slice(extra);
    f.mount(&args);
    f
}

#[test]
fn fake_upgrade_hands_over_state_and_descriptor_and_counts() {
    if !root() {
        return;
    }
    let mut f = fake_mount(&[]);
    let old_pid = num(&f.status(), "client_pid");
    let next = f.fake("next", "version=fake-2");
    let out = f.upgrade(&["--binary", &next]);
    let t = text(&out);
    assert!(out.status.success(), "{t}\n{}", f.log_text());
    assert!(
        t.starts_with(&format!(
            "upgraded {}: generation 1 (fake-1) -> 2 (fake-2), resend mode\n  pause ",
            f.mnt_str()
        )),
        "{t}"
    );
    assert!(t.contains(" ms (0 requests handed over), total "), "{t}");
    let s = f.status();
    assert_eq!(num(&s, "generation"), 2);
    assert_eq!(s["client_version"], "fake-2");
    assert_eq!(num(&s, "upgrades"), 1);
    assert!(s["resend"].as_bool().expect("resend"));
    assert!(s["last_pause_us"].is_u64());
    assert!(
        kill(Pid::from_raw(old_pid as i32), None).is_err(),
        "the old client exited"
    );
    // The log shows RESEND between the old client's exit and Serve.
    let log = f.log_text();
    assert!(log.contains("FUSE_NOTIFY_RESEND written"), "{log}");

    let out = f.upgrade(&["--binary", &next, "--drain", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["outcome"], "upgraded");
    assert_eq!(j["mode"], "drain");
    assert_eq!(j["new_generation"], 3);
    f.umount();
}

#[test]
fn fake_rollbacks_report_each_cause() {
    if !root() {
        return;
    }
    let mut f = fake_mount(&[]);
    let cases = [
        (
            "exits",
            "die-at=start",
            "exited (exit status 7) before it was ready",
        ),
        ("fails", "fail-at=init", "fake: cannot import"),
        ("v2", "versions=2", "state version mismatch"),
        ("notake", "caps=drain", "capability mismatch"),
        (
            "badinit",
            "bad-init",
            "INIT parameters mismatch: max_write 65536 instead of 131072",
        ),
    ];
    for (name, mode, why) in cases {
        let bin = f.fake(name, mode);
        let out = f.upgrade(&["--binary", &bin]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(3), "{name}: {t}");
        assert!(t.contains(why), "{name}: {t}");
        assert!(t.contains("generation 1 (fake-1) serves on"), "{name}: {t}");
    }
    let hang = f.fake("hang", "hang-at=start");
    let started = Instant::now();
    let out = f.upgrade(&["--binary", &hang, "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("timed out after 1s waiting for Prepared"));
    assert!(started.elapsed() < Duration::from_secs(15));
    let s = f.status();
    assert_eq!(num(&s, "generation"), 1);
    assert_eq!(num(&s, "rollbacks"), 6);
    assert_eq!(num(&s, "upgrades"), 0);
    f.umount();
}

#[test]
fn fake_successor_dying_after_the_commit_is_replaced_by_the_previous_binary() {
    if !root() {
        return;
    }
    let mut f = fake_mount(&[]);
    let dies = f.fake("dies", "version=fake-2,die-at=serve");
    let out = f.upgrade(&["--binary", &dies]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}\n{}", f.log_text());
    assert!(
        t.contains("generation 3 (fake-1) serves in place of 1 (fake-1)"),
        "{t}"
    );
    assert!(
        t.contains("after it was told to serve") || t.contains("exited"),
        "{t}"
    );
    let s = f.status();
    assert_eq!(num(&s, "generation"), 3);
    assert_eq!(s["client_version"], "fake-1");
    assert_eq!(num(&s, "restarts"), 1);
    // Two clients took over, each after a RESEND.
    assert_eq!(
        f.log_text().matches("FUSE_NOTIFY_RESEND written").count(),
        2
    );
    f.umount();
}

#[test]
fn a_second_upgrade_during_one_is_refused() {
    if !root() {
        return;
    }
    let mut f = fake_mount(&[]);
    let hang = f.fake("hang", "hang-at=start");
    let mut first = f
        .cmd(&["upgrade", &f.mnt_str(), "--binary", &hang, "--timeout", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("first upgrade");
    // Once the supervisor started the first one's client...
    let deadline = Instant::now() + TIMEOUT;
    while !f.log_text().contains("hang.sh") {
        assert!(Instant::now() < deadline, "{}", f.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... another one is refused, whatever it asks for.
    let second = f.upgrade(&["--binary", "/nonexistent/baton-fs"]);
    assert!(
        text(&second).contains("an upgrade of this mount is already in progress"),
        "{}",
        text(&second)
    );
    assert_eq!(second.status.code(), Some(1));
    assert_eq!(first.wait().expect("wait").code(), Some(3));
    f.umount();
}

#[test]
fn metrics_are_served_over_http() {
    if !root() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut f = fake_mount(&["--metrics", &addr]);
    let next = f.fake("next", "version=fake-2");
    assert!(f.upgrade(&["--binary", &next]).status.success());
    let get = || {
        let mut c = std::net::TcpStream::connect(&addr).expect("connect");
        write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut s = String::new();
        c.read_to_string(&mut s).expect("read");
        s
    };
    let labels = format!("mountpoint=\"{}\",volume=\"default\"", f.mnt_str());
    let upgraded = format!("baton_upgrades_total{{{labels}}} 1");
    // The endpoint serves what the supervisor published last: wait for the upgrade.
    let deadline = Instant::now() + TIMEOUT;
    let body = loop {
        let b = get();
        if b.lines().any(|l| l == upgraded) {
            break b;
        }
        assert!(Instant::now() < deadline, "{b}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for line in [
        format!("baton_client_generation{{{labels}}} 2"),
        format!("baton_upgrades_total{{{labels}}} 1"),
        format!("baton_upgrade_rollbacks_total{{{labels}}} 0"),
        format!("baton_fuse_resend_available{{{labels}}} 1"),
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line} in {body}");
    }
    assert!(body.contains("baton_last_upgrade_pause_seconds{"), "{body}");
    f.umount();
}

#[test]
fn umount_is_refused_and_sigterm_rolls_back_during_an_upgrade() {
    if !root() {
        return;
    }
    let mut f = fake_mount(&[]);
    let hang = f.fake("hang", "hang-at=start");
    let upgrade = f
        .cmd(&[
            "upgrade",
            &f.mnt_str(),
            "--binary",
            &hang,
            "--timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("upgrade");
    let deadline = Instant::now() + TIMEOUT;
    while !f.log_text().contains("hang.sh") {
        assert!(Instant::now() < deadline, "{}", f.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = f.run(&["umount", &f.mnt_str()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("while the client is upgrading"),
        "{}",
        text(&out)
    );
    assert!(is_mounted(&f.mnt()));

    let mut sup = f.supervisor.take().expect("supervisor");
    kill(Pid::from_raw(sup.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let out = upgrade.wait_with_output().expect("upgrade output");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("the supervisor was stopped by SIGTERM"),
        "{}",
        text(&out)
    );
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = sup.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "supervisor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", f.log_text());
    assert!(!is_mounted(&f.mnt()));
}
