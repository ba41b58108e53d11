//! Crashes of the client on real mounts: `kill -9` of the serving client (its pid from
//! `baton status --json`) under the verifying workload, open descriptors of every kind
//! kept across a kill, and a crash loop that an operator ends with `baton upgrade
//! --binary`. The application must see nothing but a pause. The kills run both with the
//! kernel's FUSE_NOTIFY_RESEND and without it (`--no-resend`, as on kernels before 6.9:
//! the successor answers from the request log what the dead client had read).
#![allow(clippy::unwrap_used)]

mod common;

use common::{PATIENCE, kill9, wait_replaced};

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Resend;
use testkit::mount::{MountOptions, TestMount};
use upgrade_tests::baton_cli::Upgrade;

const KILLS: usize = 20;
/// `KILLS` kills of the serving client while the verifying workload runs: every kill is
/// followed by a new client, and the application sees no error and loses no record.
#[test]
fn twenty_kills_under_the_workload() {
    kills_under_the_workload(Resend::Kernel);
}

/// The same without FUSE_NOTIFY_RESEND: what each dead client had read is answered from
/// the request log.
#[test]
fn twenty_kills_under_the_workload_without_resend() {
    kills_under_the_workload(Resend::Disabled);
}

fn kills_under_the_workload(mode: Resend) {
    let m = TestMount::new(&mode.mount(MountOptions::default())).unwrap();
    let first = common::status(&m);
    assert!(
        first.json["kernel_resend"] == true,
        "the kernel did not offer FUSE_HAS_RESEND: {}",
        first.json
    );
    common::assert_resend_mode(&m, mode);
    let run = common::start_workload(&m, 201);
    let mut prev = first.clone();
    let mut failure = None;
    let mut windows = Vec::new();
    for i in 0..KILLS {
        let from = run.now_ms();
        kill9(prev.client_pid);
        let s = wait_replaced(&m, &prev);
        let to = run.now_ms();
        windows.push((from, to));
        if s.generation <= prev.generation {
            failure = Some(format!("kill {i}: the generation did not grow: {}", s.json));
            break;
        }
        prev = s;
        if !run.wait_ops(100, Duration::from_secs(30)) {
            failure = Some(format!(
                "the workload stopped making progress after kill {i}"
            ));
            break;
        }
    }
    let report = run.stop();
    println!("{}", report.summary());
    for (i, (from, to)) in windows.iter().enumerate() {
        let worst = report.longest_between(*from, *to);
        println!(
            "kill {i:2}: replaced in {:6.1} ms, longest overlapping operation {}",
            to - from,
            worst.map_or("< 1 ms".into(), |o| format!(
                "{} {:.1} ms",
                o.op, o.duration_ms
            ))
        );
    }
    if let Some(f) = failure {
        panic!("{f}\n{}", report.summary());
    }
    assert!(
        report.is_clean(),
        "the application saw errors across {KILLS} kills:\n{}",
        report.summary()
    );
    let last = common::status(&m);
    assert_eq!(
        last.restarts,
        first.restarts + KILLS as u64,
        "{}",
        last.json
    );
    assert!(
        last.json["last_crash"]
            .as_str()
            .is_some_and(|c| c.contains("SIGKILL")),
        "{}",
        last.json
    );
    assert!(
        last.json["last_crash_pause_us"].as_u64().is_some(),
        "{}",
        last.json
    );
    common::assert_resend_mode(&m, mode);
    if mode == Resend::Disabled {
        common::wait_answered_from_log(&m, 0);
    }
    let (times, requests) = common::answered_from_log(&m);
    println!("{times} successors answered {requests} requests from the request log");
    match mode {
        Resend::Kernel => assert_eq!(times, 0, "the kernel resends: nothing from the log"),
        // Four application threads always have requests in flight: a kill that found
        // none in twenty would mean the log is not where requests are read.
        Resend::Disabled => assert!(times > 0, "no kill left a request in the log"),
    }
    m.umount().unwrap();
}

/// A POSIX lock as `F_OFD_GETLK` from another open file description sees it.
fn lock_seen(file: &File, start: i64, len: i64) -> libc::c_short {
    // SAFETY: flock is plain data; zeroed is a valid value that is filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type
}

fn set_posix_lock(file: &File, start: i64, len: i64) {
    // SAFETY: as above.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: F_SETLK reads the flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) };
    assert_eq!(rc, 0, "F_SETLK: {}", std::io::Error::last_os_error());
}

fn flock(file: &File, how: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn used_inodes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.files() - st.files_free()
}

fn names_of(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Descriptors opened before a kill keep working after it: a writer, an `O_APPEND`
/// writer, a directory stream half read, descriptors holding a POSIX lock and a flock
/// (still held, and released by their close), and an open-but-unlinked file (readable,
/// and freed at its last close).
#[test]
fn open_descriptors_of_every_kind_survive_a_kill() {
    for mode in Resend::BOTH {
        let m = TestMount::new(&mode.mount(MountOptions::default())).unwrap();
        descriptors_survive_kills(&m);
        m.umount().unwrap();
    }
}

/// The same on a volume whose metadata (locks, open-but-unlinked files) is in Redis.
#[test]
fn open_descriptors_survive_a_kill_on_a_redis_volume() {
    for mode in Resend::BOTH {
        let (_redis, _dir, m) = common::redis_mount("crash", mode.args());
        descriptors_survive_kills(&m);
        m.umount().unwrap();
    }
}

fn descriptors_survive_kills(m: &TestMount) {
    let root = m.path("handles");
    std::fs::create_dir(&root).unwrap();

    // A writer and an O_APPEND writer, with what they wrote synced.
    let mut writer = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(root.join("written"))
        .unwrap();
    writer.write_all(b"before the kill|").unwrap();
    writer.sync_all().unwrap();
    let mut appender = OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("log"))
        .unwrap();
    appender.write_all(b"record 1\n").unwrap();
    appender.sync_all().unwrap();

    // A directory of 300 entries, its stream read to the middle.
    let dir = root.join("dir");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..300 {
        File::create(dir.join(format!("entry-{i:03}"))).unwrap();
    }
    let expected = names_of(&dir);
    let dir_c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; the stream is closed below.
    let stream = unsafe { libc::opendir(dir_c.as_ptr()) };
    assert!(
        !stream.is_null(),
        "opendir: {}",
        std::io::Error::last_os_error()
    );
    let mut seen = Vec::new();
    let read_entry = || -> Option<String> {
        // SAFETY: `stream` is an open directory stream; the entry is copied at once.
        let e = unsafe { libc::readdir(stream) };
        if e.is_null() {
            return None;
        }
        // SAFETY: d_name is NUL-terminated inside the entry readdir returned.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        Some(name.to_string_lossy().into_owned())
    };
    while seen.len() < 150 {
        let n = read_entry().expect("the stream ended early");
        if n != "." && n != ".." {
            seen.push(n);
        }
    }

    // A descriptor holding a POSIX lock on bytes 0..100.
    let locked = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(root.join("locked"))
        .unwrap();
    set_posix_lock(&locked, 0, 100);
    let observer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("locked"))
        .unwrap();
    assert_eq!(lock_seen(&observer, 0, 100), libc::F_WRLCK as libc::c_short);

    // A descriptor holding a flock.
    let flocked = File::create(root.join("flocked")).unwrap();
    flock(&flocked, libc::LOCK_EX | libc::LOCK_NB).unwrap();

    // An open-but-unlinked file.
    let mut unlinked = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(root.join("unlinked"))
        .unwrap();
    unlinked.write_all(&vec![7u8; 100_000]).unwrap();
    unlinked.sync_all().unwrap();
    std::fs::remove_file(root.join("unlinked")).unwrap();

    // kill -9, twice (the second successor inherits a session the first took over).
    for _ in 0..2 {
        let before = common::status(m);
        kill9(before.client_pid);
        wait_replaced(m, &before);
    }

    // The writers write where they should.
    writer.write_all(b"after the kill").unwrap();
    writer.sync_all().unwrap();
    appender.write_all(b"record 2\n").unwrap();
    appender.sync_all().unwrap();
    assert_eq!(
        std::fs::read(root.join("written")).unwrap(),
        b"before the kill|after the kill"
    );
    assert_eq!(
        std::fs::read(root.join("log")).unwrap(),
        b"record 1\nrecord 2\n"
    );
    writer.write_all_at(b"BEFORE", 0).unwrap();
    drop(writer);
    assert!(
        std::fs::read(root.join("written"))
            .unwrap()
            .starts_with(b"BEFORE the kill|")
    );

    // The directory stream goes on from where it was: every entry exactly once.
    while let Some(n) = read_entry() {
        if n != "." && n != ".." {
            seen.push(n);
        }
    }
    // SAFETY: the stream is open and not used after this.
    unsafe { libc::closedir(stream) };
    seen.sort();
    assert_eq!(
        seen, expected,
        "the directory stream lost or repeated entries"
    );

    // The lock is still held, and its descriptor's close releases it.
    assert_eq!(
        lock_seen(&observer, 0, 100),
        libc::F_WRLCK as libc::c_short,
        "the lock was lost in the kill"
    );
    drop(locked);
    assert_eq!(
        lock_seen(&observer, 0, 100),
        libc::F_UNLCK as libc::c_short,
        "the close of its descriptor did not release the lock"
    );

    // The flock is still held, and the close of its descriptor releases it (the kernel
    // sends RELEASE shortly after the close returns).
    let contender = File::open(root.join("flocked")).unwrap();
    let err = flock(&contender, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EWOULDBLOCK),
        "the flock was lost"
    );
    drop(flocked);
    let deadline = Instant::now() + PATIENCE;
    while let Err(e) = flock(&contender, libc::LOCK_EX | libc::LOCK_NB) {
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "{e}");
        assert!(
            Instant::now() < deadline,
            "the close of its descriptor did not release the flock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(contender);

    // The unlinked file still reads back, and is freed once closed.
    let mut back = Vec::new();
    unlinked.seek(SeekFrom::Start(0)).unwrap();
    unlinked.read_to_end(&mut back).unwrap();
    assert_eq!(back, vec![7u8; 100_000]);
    let with_it = used_inodes(&m.mountpoint);
    drop(unlinked);
    let deadline = Instant::now() + PATIENCE;
    while used_inodes(&m.mountpoint) >= with_it {
        assert!(
            Instant::now() < deadline,
            "the open-but-unlinked file was not freed after its last close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(observer);
    drop(appender);

    // Each successor asked the kernel about the unlinked files it inherited, and the
    // kernel understood the question.
    let log = logs(m);
    assert!(
        log.contains("unlinked files the kernel no longer has were freed"),
        "no orphan sweep in the log:\n{log}"
    );
    assert!(
        !log.contains("cannot ask the kernel about an inode"),
        "the kernel refused the probe:\n{log}"
    );
}

use common::logs;

/// A client binary that dies at start while `flag` exists: a wrapper around `baton-fs`
/// that SIGKILLs itself.
fn crashing_client(dir: &Path, flag: &Path) -> std::path::PathBuf {
    common::script(
        dir,
        "client-crashing-at-start",
        &format!(
            "if [ -e '{}' ]; then kill -KILL $$; fi\nexec {} \"$@\"",
            flag.display(),
            common::client_bin().display()
        ),
    )
}

/// Every restart dies at start: the mount stays, an application call waits, `baton
/// status` says why; `baton upgrade --binary` to a working build ends the loop, and the
/// waiting call completes with the right bytes.
#[test]
fn a_crash_loop_waits_and_an_upgrade_to_a_good_binary_ends_it() {
    common::require_upgrade();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("crash-now");
    let client = crashing_client(dir.path(), &flag);
    let m = TestMount::new(&MountOptions {
        args: vec!["--client".into(), client.display().to_string()],
        ..MountOptions::default()
    })
    .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(m.path("kept"), &data).unwrap();
    let s0 = common::status(&m);

    std::fs::write(&flag, b"").unwrap();
    kill9(s0.client_pid);
    // The loop: attempts die at start, the backoff grows; status says so.
    let deadline = Instant::now() + PATIENCE;
    let looping = loop {
        let s = common::status(&m);
        let attempts = s.json["restart_attempts"].as_u64().unwrap_or(0);
        if s.json["state"] == "restarting" && attempts >= 3 {
            break s;
        }
        assert!(Instant::now() < deadline, "no crash loop: {}", s.json);
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("status during the loop: {}", looping.json);
    let reason = looping.json["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("killed by SIGKILL"), "{reason}");
    assert!(reason.contains("attempt"), "{reason}");
    assert_eq!(looping.client_pid, 0, "nothing serves: {}", looping.json);
    // Past the kernel's attribute cache of the mountpoint (1 s): a stat of it would now
    // wait for a client, so `baton status` and `baton upgrade` must not make one (path
    // resolution is fine: it does not ask the filesystem about its own root).
    std::thread::sleep(Duration::from_millis(1500));
    let text =
        testkit::mount::baton(&m.home, &["status", &m.mountpoint.display().to_string()]).unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("restarting: "), "{text}");

    // An application reads the file: it waits in the kernel.
    let path = m.path("kept");
    let reader = std::thread::spawn(move || std::fs::read(path));
    // Nothing can answer its OPEN while no client serves (whatever the time given).
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !reader.is_finished(),
        "a call completed while no client served"
    );
    assert_eq!(common::status(&m).json["state"], "restarting");

    let out = common::upgrade(
        &m,
        &Upgrade {
            binary: Some(common::client_bin()),
            ..Upgrade::default()
        },
    );
    println!("baton upgrade ({:?}): {}", out.code, out.output().trim());
    assert!(out.success, "{}", out.output());
    let got = reader.join().unwrap().expect("the waiting read failed");
    assert_eq!(got, data, "the waiting read returned other bytes");

    let s = common::status(&m);
    assert_eq!(s.json["state"], "serving", "{}", s.json);
    assert!(
        s.client_pid != 0 && s.generation > s0.generation,
        "{}",
        s.json
    );
    assert!(s.restarts >= 4, "{}", s.json);
    assert!(
        s.json["last_crash"]
            .as_str()
            .is_some_and(|c| c.contains("SIGKILL")),
        "{}",
        s.json
    );
    // The good binary serves from now on, also after another kill.
    kill9(s.client_pid);
    wait_replaced(&m, &s);
    assert_eq!(std::fs::read(m.path("kept")).unwrap(), data);
    m.umount().unwrap();
}

/// Bytes of a file that no two offsets share by accident (a cheap xorshift stream).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes that returned success, never fsynced or closed, survive a kill -9 of the client:
/// a sequential file whose tail is still in the dead client's write buffer, random 4 KiB
/// overwrites of it, a second file written at an offset past its end; read back through new
/// descriptors with the kernel's page cache dropped, so the bytes come from the successor.
/// The writer's descriptor keeps working after the kill.
///
/// No process may be started while the files are open and before the kill: a fork
/// duplicates the descriptors and the exec closes them, and every close sends the kernel's
/// FLUSH, which commits the data (so the client pid is read first).
#[test]
fn unsynced_writes_survive_a_kill() {
    let m = TestMount::new(&MountOptions::default()).unwrap();
    unsynced_writes_survive(&m);
    m.umount().unwrap();
}

/// The same without FUSE_NOTIFY_RESEND, on the embedded engine and on Redis.
#[test]
fn unsynced_writes_survive_a_kill_without_resend() {
    let m = TestMount::new(&Resend::Disabled.mount(MountOptions::default())).unwrap();
    unsynced_writes_survive(&m);
    m.umount().unwrap();
    let (_redis, _dir, m) = common::redis_mount("crash", Resend::Disabled.args());
    unsynced_writes_survive(&m);
    m.umount().unwrap();
}

fn unsynced_writes_survive(m: &TestMount) {
    let before = common::status(m);
    const LEN: usize = 9 << 20; // two full 4 MiB blocks and a partial one
    let mut expected = pattern(7, LEN);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.path("unsynced"))
        .unwrap();
    for piece in expected.chunks(1 << 20) {
        f.write_all(piece).unwrap();
    }
    let over = pattern(11, 64 * 4096);
    for (i, page) in over.chunks(4096).enumerate() {
        let off = (i * 7919 % (LEN / 4096)) * 4096;
        f.write_all_at(page, off as u64).unwrap();
        expected[off..off + 4096].copy_from_slice(page);
    }
    let sparse_tail = pattern(13, 100_000);
    let g = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.path("sparse"))
        .unwrap();
    g.write_all_at(&sparse_tail, 5_000_000).unwrap();

    kill9(before.client_pid);
    wait_replaced(m, &before);

    // The writer goes on through its descriptor.
    f.write_all_at(b"after the kill", 0).unwrap();
    expected[..14].copy_from_slice(b"after the kill");
    drop(f);
    drop(g);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();

    let got = std::fs::read(m.path("unsynced")).unwrap();
    assert_eq!(got.len(), LEN, "size of the unsynced file");
    let first_bad = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_bad, None,
        "unsynced file differs at the first offset shown"
    );
    let got = std::fs::read(m.path("sparse")).unwrap();
    assert_eq!(got.len(), 5_000_000 + sparse_tail.len());
    assert!(got[..5_000_000].iter().all(|&b| b == 0), "hole not zero");
    assert!(
        got[5_000_000..] == sparse_tail[..],
        "sparse file tail differs"
    );
    let log = logs(m);
    assert!(
        log.contains("replayed acknowledged writes a previous client left in the write journal"),
        "the successor replayed nothing: the test did not reach the journal\n{log}"
    );
}
