//! Live handover between two real `baton-fs` processes on a real FUSE mount, driven by a
//! minimal supervisor written here from the message sequences in
//! `handover_proto::message` (the real one lives in `supervisor/`): first mount, then
//! upgrades in resend and drain mode and a rollback, while this process uses the mount
//! like an application — a file read through a descriptor opened before the upgrade, an
//! O_APPEND writer through another, and a request made while the old client is frozen.
//! Every one of them must succeed.
//!
//! Needs root and /dev/fuse; skipped (with a message) otherwise.

#![allow(clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use fsclient::meta::{self, Format, Timestamp};
use handover_proto::channel;
use handover_proto::fuse_init::{self, InitRequest};
use handover_proto::message::{
    CHANNEL_FD_ENV, FreezeMode, Generation, MountSpec, StateChunk, ToClient, ToSupervisor,
};
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::sys::stat::Mode;

const TIMEOUT: Duration = Duration::from_secs(20);

fn can_mount() -> bool {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return false;
    }
    true
}

/// One client process and the supervisor's end of its handover socket.
struct Client {
    child: Child,
    chan: OwnedFd,
    log: PathBuf,
}

impl Client {
    fn spawn(dir: &Path, generation: u64) -> anyhow::Result<Client> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let log = dir.join(format!("client-{generation}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton-fs"));
        cmd.env(CHANNEL_FD_ENV, theirs.as_raw_fd().to_string())
            .env("RUST_LOG", "info,fsclient=debug")
            .stdin(Stdio::null())
            .stderr(File::create(&log)?);
        let fd = theirs.as_raw_fd();
        // SAFETY: runs in the forked child before exec and only calls fcntl(2), which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        Ok(Client {
            child,
            chan: ours,
            log,
        })
    }

    fn send(&self, msg: &ToClient, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
        channel::send(self.chan.as_fd(), msg, fds).with_context(|| format!("sending {msg:?}"))
    }

    fn recv(&self) -> anyhow::Result<ToSupervisor> {
        let (m, _) =
            channel::recv::<ToSupervisor>(self.chan.as_fd(), Some(TIMEOUT)).with_context(|| {
                format!(
                    "waiting for client {}; its log:\n{}",
                    self.child.id(),
                    self.log_text()
                )
            })?;
        Ok(m)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code.
    fn reap(&mut self) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s.code());
            }
            ensure!(
                Instant::now() < deadline,
                "client {} did not exit",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mount and the minimal supervisor of its clients.
struct Mount {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    fuse: OwnedFd,
    /// The write journal every client gets with `Start`.
    journal: OwnedFd,
    spec: MountSpec,
    init: Vec<u8>,
    /// The INIT reply the kernel got.
    reply: Vec<u8>,
    session: u64,
    client: Option<Client>,
    generation: u64,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mnt, MntFlags::MNT_DETACH);
    }
}

fn expect_prepared(c: &Client) -> anyhow::Result<u64> {
    match c.recv()? {
        ToSupervisor::Prepared { session, hello, .. } => {
            ensure!(
                hello.capabilities.iter().any(|c| c == "takeover"),
                "capabilities: {hello:?}"
            );
            ensure!(hello.state_versions.contains(&1));
            Ok(session)
        }
        other => bail!("expected Prepared, got {other:?}"),
    }
}

impl Mount {
    /// Formats a volume, mounts it, and starts generation 1 on it.
    fn new() -> anyhow::Result<Mount> {
        let dir = tempfile::Builder::new()
            .prefix("baton-takeover-")
            .tempdir()?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let meta_url = format!("redb://{}/meta.redb", dir.path().display());
        meta::open(&meta_url)?.format(
            &Format {
                name: "vol".into(),
                uuid: "takeover-test".into(),
                storage: format!("fs://{}", dir.path().join("objects").display()),
                block_size: Format::MIN_BLOCK_SIZE,
                capacity: 0,
                inodes: 0,
                created: Timestamp::now(),
            },
            false,
        )?;
        let spec = MountSpec {
            volume: "vol".into(),
            meta_url,
            mountpoint: mnt.clone(),
            home: dir.path().join("home"),
            threads: 3,
            // Every stat reaches the client (so that one can be parked).
            attr_ttl_ms: 0,
            entry_ttl_ms: 0,
            cache_dir: Some(dir.path().join("cache")),
            cache_bytes: 64 << 20,
        };
        let fuse = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
        let journal = nix::sys::memfd::memfd_create(
            c"baton-journal",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        nix::unistd::ftruncate(&journal, 64 << 20)?;

        let c = Client::spawn(dir.path(), 1)?;
        c.send(
            &ToClient::Start {
                generation: Generation(1),
                spec: spec.clone(),
                resume_session: None,
            },
            &[journal.as_fd()],
        )?;
        let session = expect_prepared(&c)?;

        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
            fuse.as_raw_fd()
        );
        nix::mount::mount(
            Some("baton:vol"),
            &mnt,
            Some("fuse.baton"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )?;
        let mut m = Mount {
            dir,
            mnt,
            fuse,
            journal,
            spec,
            init: Vec::new(),
            reply: Vec::new(),
            session,
            client: None,
            generation: 1,
        };
        let mut buf = vec![0u8; 1 << 21];
        let n = nix::unistd::read(&m.fuse, &mut buf)?;
        buf.truncate(n);
        InitRequest::parse(&buf)?;
        m.init = buf;

        c.send(
            &ToClient::Init {
                request: m.init.clone(),
            },
            &[m.fuse.as_fd()],
        )?;
        m.reply = match c.recv()? {
            ToSupervisor::InitReply { reply } => reply,
            other => bail!("expected InitReply, got {other:?}"),
        };
        nix::unistd::write(&m.fuse, &m.reply)?;
        c.send(&ToClient::Serve, &[])?;
        m.client = Some(c);
        Ok(m)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn old(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Starts the next generation up to Prepared (the old client serves on).
    fn prestart(&mut self) -> anyhow::Result<Client> {
        self.generation += 1;
        let c = Client::spawn(self.dir.path(), self.generation)?;
        c.send(
            &ToClient::Start {
                generation: Generation(self.generation),
                spec: self.spec.clone(),
                resume_session: Some(self.session),
            },
            &[self.journal.as_fd()],
        )?;
        let session = expect_prepared(&c)?;
        ensure!(
            session == self.session,
            "the successor must resume session {}, not {session}",
            self.session
        );
        Ok(c)
    }

    /// Pre-flush and freeze of the old client; returns the state and the counts.
    fn freeze(&self, mode: FreezeMode) -> anyhow::Result<(Vec<StateChunk>, u32, u32)> {
        let old = self.old();
        old.send(&ToClient::PreFlush, &[])?;
        match old.recv()? {
            ToSupervisor::PreFlushed { error: None } => {}
            other => bail!("expected PreFlushed, got {other:?}"),
        }
        old.send(
            &ToClient::Freeze {
                mode,
                state_version: 1,
            },
            &[],
        )?;
        let mut chunks = Vec::new();
        loop {
            match old.recv()? {
                ToSupervisor::State(c) => chunks.push(c),
                ToSupervisor::Frozen { parked, drained } => return Ok((chunks, parked, drained)),
                other => bail!("expected State or Frozen, got {other:?}"),
            }
        }
    }

    /// Hands the state and the connection to `new`, which must answer INIT as the kernel
    /// was answered.
    fn transfer(&self, new: &Client, chunks: Vec<StateChunk>) -> anyhow::Result<()> {
        for c in chunks {
            new.send(&ToClient::State(c), &[])?;
        }
        new.send(
            &ToClient::Init {
                request: self.init.clone(),
            },
            &[self.fuse.as_fd()],
        )?;
        match new.recv()? {
            ToSupervisor::InitReply { reply } => {
                ensure!(reply == self.reply, "the successor's INIT reply differs")
            }
            other => bail!("expected InitReply, got {other:?}"),
        }
        Ok(())
    }

    /// Commit: the old client exits (status 0), is reaped, resend (if asked), the new
    /// one serves.
    fn commit(&mut self, new: Client, resend: bool) -> anyhow::Result<u64> {
        let mut old = self.client.take().unwrap();
        old.send(&ToClient::Commit, &[])?;
        let code = old.reap()?;
        ensure!(
            code == Some(0),
            "the old client exited with {code:?}; log:\n{}",
            old.log_text()
        );
        if std::env::var_os("BATON_TEST_SHOW_LOGS").is_some() {
            eprintln!(
                "--- log of the old client {} ---\n{}",
                old.child.id(),
                old.log_text()
            );
        }
        if resend {
            nix::unistd::write(&self.fuse, &fuse_init::notify_resend())?;
        }
        let t = monotonic_ns();
        new.send(&ToClient::Serve, &[])?;
        self.client = Some(new);
        Ok(t)
    }

    /// The first answer of the new client, after `served_at`.
    fn first_served(&self, served_at: u64) -> anyhow::Result<u64> {
        match self.old().recv()? {
            ToSupervisor::FirstServed { monotonic_ns } => {
                ensure!(
                    monotonic_ns >= served_at,
                    "FirstServed {monotonic_ns} before Serve {served_at}"
                );
                Ok(monotonic_ns - served_at)
            }
            other => bail!("expected FirstServed, got {other:?}"),
        }
    }

    fn shutdown(mut self) -> anyhow::Result<()> {
        let mut c = self.client.take().unwrap();
        c.send(&ToClient::Shutdown, &[])?;
        match c.recv()? {
            ToSupervisor::ShutdownDone { error: None } => {}
            other => bail!("expected ShutdownDone, got {other:?}"),
        }
        ensure!(c.reap()? == Some(0));
        nix::mount::umount2(&self.mnt, MntFlags::MNT_DETACH)?;
        Ok(())
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What an application keeps open across upgrades.
struct App {
    reader: File,
    appender: File,
    records: usize,
}

const PATTERN_LEN: usize = 256 << 10;

fn pattern() -> Vec<u8> {
    (0..PATTERN_LEN).map(|i| (i * 7 % 251) as u8).collect()
}

impl App {
    fn new(m: &Mount) -> anyhow::Result<App> {
        std::fs::write(m.path("data"), pattern())?;
        let reader = File::open(m.path("data"))?;
        let appender = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(m.path("log"))?;
        let mut app = App {
            reader,
            appender,
            records: 0,
        };
        app.step()?;
        Ok(app)
    }

    /// One round: pread a range and check it, append a record.
    fn step(&mut self) -> anyhow::Result<()> {
        let off = (self.records * 4099) % (PATTERN_LEN - 4096);
        let mut buf = vec![0u8; 4096];
        self.reader
            .read_exact_at(&mut buf, off as u64)
            .context("pread")?;
        ensure!(
            buf[..] == pattern()[off..off + 4096],
            "pread at {off} returned other bytes"
        );
        writeln!(self.appender, "record {:06}", self.records).context("append")?;
        self.records += 1;
        if self.records % 3 == 0 {
            self.appender.sync_all().context("fsync")?;
        }
        Ok(())
    }

    fn verify(&self, m: &Mount) -> anyhow::Result<()> {
        let mut text = String::new();
        File::open(m.path("log"))?.read_to_string(&mut text)?;
        let expected: String = (0..self.records)
            .map(|i| format!("record {i:06}\n"))
            .collect();
        ensure!(text == expected, "the log lost or damaged records");
        Ok(())
    }
}

/// A stat made while the old client is frozen: it must wait, then succeed.
fn stat_in_background(path: PathBuf) -> std::thread::JoinHandle<std::io::Result<u64>> {
    std::thread::spawn(move || std::fs::metadata(path).map(|m| m.len()))
}

fn upgrade(m: &mut Mount, app: &mut App, mode: FreezeMode) -> anyhow::Result<()> {
    let new = m.prestart()?;
    app.step()?;
    let (chunks, parked, drained) = m.freeze(mode)?;
    // Frozen: a request now is parked (resend) or left in the kernel's queue (drain).
    let waiting = stat_in_background(m.path("data"));
    std::thread::sleep(Duration::from_millis(50));
    ensure!(
        !waiting.is_finished(),
        "a request was answered by a frozen client"
    );
    let n_chunks = chunks.len();
    m.transfer(&new, chunks)?;
    let served_at = m.commit(new, mode == FreezeMode::Resend)?;
    let len = waiting
        .join()
        .unwrap()
        .context("the request made during the freeze failed")?;
    ensure!(len == PATTERN_LEN as u64);
    let pause = m.first_served(served_at)?;
    eprintln!(
        "{mode:?} upgrade to generation {}: {} state chunks, parked {parked}, drained {drained}, first request answered {pause} ns after Serve",
        m.generation, n_chunks
    );
    app.step()?;
    Ok(())
}

#[test]
fn upgrades_in_resend_and_drain_mode_keep_every_application_call_working() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let mut m = Mount::new()?;
    let mut app = App::new(&m)?;
    for mode in [
        FreezeMode::Resend,
        FreezeMode::Drain,
        FreezeMode::Resend,
        FreezeMode::Drain,
    ] {
        upgrade(&mut m, &mut app, mode).with_context(|| format!("{mode:?} upgrade"))?;
        app.step()?;
    }
    app.verify(&m)?;
    // Descriptors opened by generation 1 close cleanly in generation 5.
    drop(app);
    std::fs::remove_file(m.path("data"))?;
    m.shutdown()
}

#[test]
fn a_rolled_back_upgrade_thaws_the_old_client_which_serves_on() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let mut m = Mount::new()?;
    let mut app = App::new(&m)?;
    for mode in [FreezeMode::Resend, FreezeMode::Drain] {
        let mut new = m.prestart()?;
        let (chunks, _, _) = m.freeze(mode)?;
        let waiting = stat_in_background(m.path("data"));
        std::thread::sleep(Duration::from_millis(50));
        ensure!(
            !waiting.is_finished(),
            "a request was answered by a frozen client"
        );
        // The successor got its state, then the upgrade fails: it is told to shut down
        // before it served, and must leave the session alone.
        for c in chunks {
            new.send(&ToClient::State(c), &[])?;
        }
        new.send(&ToClient::Shutdown, &[])?;
        match new.recv()? {
            ToSupervisor::ShutdownDone { error: None } => {}
            other => bail!("expected ShutdownDone, got {other:?}"),
        }
        ensure!(new.reap()? == Some(0));
        m.old().send(&ToClient::Thaw, &[])?;
        match m.old().recv()? {
            ToSupervisor::Thawed => {}
            other => bail!("expected Thawed, got {other:?}"),
        }
        let len = waiting
            .join()
            .unwrap()
            .context("the request made during the freeze failed")?;
        ensure!(len == PATTERN_LEN as u64);
        app.step()?;
    }
    // The session survived the successors: the old client's session still works, and a
    // real upgrade after the rollbacks succeeds.
    upgrade(&mut m, &mut app, FreezeMode::Resend)?;
    app.verify(&m)?;
    drop(app);
    m.shutdown()
}

#[test]
fn a_freeze_in_a_mode_the_build_lacks_or_a_thaw_while_serving_is_harmless() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let m = Mount::new()?;
    let mut app = App::new(&m)?;
    m.old().send(
        &ToClient::Freeze {
            mode: FreezeMode::Resend,
            state_version: 99,
        },
        &[],
    )?;
    match m.old().recv()? {
        ToSupervisor::FreezeFailed { reason } => ensure!(reason.contains("99"), "{reason}"),
        other => bail!("expected FreezeFailed, got {other:?}"),
    }
    m.old().send(&ToClient::Thaw, &[])?;
    match m.old().recv()? {
        ToSupervisor::Thawed => {}
        other => bail!("expected Thawed, got {other:?}"),
    }
    app.step()?;
    app.verify(&m)?;
    drop(app);
    m.shutdown()
}

/// flock(2) on `f`.
fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor `f` keeps open for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn a_blocked_lock_waiter_moves_to_the_successor_and_holds_off_a_drain() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let mut m = Mount::new()?;
    let mut app = App::new(&m)?;
    let holder = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(m.path("lock"))?;
    flock(&holder, libc::LOCK_EX)?;
    let path = m.path("lock");
    let waiter = std::thread::spawn(move || -> std::io::Result<File> {
        let f = File::open(path)?;
        flock(&f, libc::LOCK_EX)?;
        Ok(f)
    });
    std::thread::sleep(Duration::from_millis(100));
    ensure!(!waiter.is_finished(), "the second flock must wait");

    // Drain: the waiter keeps its thread, so the drain cannot finish; the supervisor
    // gives up and thaws.
    let mut new = m.prestart()?;
    m.old().send(
        &ToClient::Freeze {
            mode: FreezeMode::Drain,
            state_version: 1,
        },
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        if let Ok((msg, _)) =
            channel::recv::<ToSupervisor>(m.old().chan.as_fd(), Some(Duration::from_millis(10)))
        {
            bail!("a drain with a lock waiter must not finish, got {msg:?}");
        }
    }
    m.old().send(&ToClient::Thaw, &[])?;
    match m.old().recv()? {
        ToSupervisor::Thawed => {}
        other => bail!("expected Thawed, got {other:?}"),
    }
    new.send(&ToClient::Shutdown, &[])?;
    ensure!(matches!(
        new.recv()?,
        ToSupervisor::ShutdownDone { error: None }
    ));
    ensure!(new.reap()? == Some(0));
    drop(new);
    app.step()?;
    ensure!(!waiter.is_finished(), "the waiter still waits");

    // Resend: the waiter gives way at once, is resent to the successor and waits there.
    let new = m.prestart()?;
    let started = Instant::now();
    let (chunks, parked, _) = m.freeze(FreezeMode::Resend)?;
    ensure!(
        parked >= 1,
        "the lock waiter must be parked, parked = {parked}"
    );
    eprintln!(
        "resend freeze with a lock waiter took {:?}",
        started.elapsed()
    );
    m.transfer(&new, chunks)?;
    let served_at = m.commit(new, true)?;
    // Some request is answered by the successor (not the lock: it still waits).
    m.first_served(served_at)?;
    std::thread::sleep(Duration::from_millis(100));
    ensure!(
        !waiter.is_finished(),
        "the waiter still waits, in the successor"
    );
    // The successor knows the holder's lock (from the state) and releases it at close.
    drop(holder);
    let got = waiter
        .join()
        .unwrap()
        .context("the flock that waited across the upgrade")?;
    drop(got);
    app.step()?;
    app.verify(&m)?;
    drop(app);
    m.shutdown()
}
