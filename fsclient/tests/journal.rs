//! Acknowledged writes survive a `kill -9` of the process that acknowledged them.
//!
//! A child process (this test binary again, running the ignored `journal_writer_child`)
//! writes through a `DataStore` with the mount's write journal (a memfd this process
//! created, as the supervisor does) and reports when every write has returned; some files
//! are flushed, most are not. It is then killed with SIGKILL: no destructor, no flush. A
//! new `DataStore` on the same metadata, object storage and memfd takes the journal over,
//! replays it, and every file must read back exactly the bytes the child wrote; files the
//! child deleted stay deleted. One scenario also checks that a successor defers the
//! takeover while the owner lives (a live upgrade), the other that a journal much smaller
//! than the data written makes the writer flush instead of losing records. A third test
//! (in one process, the first client "dies" by `mem::forget`) checks that a flush that
//! failed keeps its records for the next client.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fsclient::data::journal::{self, HEADER_BYTES, MIN_CAPACITY};
use fsclient::data::{DataConfig, DataStore, JournalStart, ReadState};
use fsclient::meta::{
    self, Caller, FileKind, Format, Ino, MetaEngine, MetaError, NewNode, SessionInfo, Timestamp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Tells the child which scenario to run in which directory: `SCENARIO:DIR`.
const CHILD_ENV: &str = "BATON_JOURNAL_TEST_CHILD";
/// The descriptor number the child finds the journal memfd at.
const CHILD_JOURNAL_FD: i32 = 100;
const READY: &str = "journal-child: every write returned";
const FILES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Sequential 1 MiB writes, random 4 KiB writes, an overwrite of flushed data, a
    /// discarded file and a file unlinked without its buffers dropped, in a 64 MiB journal.
    Mixed,
    /// Far more data than the journal holds (a 256 KiB ring): writers must flush.
    SmallRing,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Mixed => "mixed",
            Scenario::SmallRing => "small-ring",
        }
    }

    fn parse(s: &str) -> Scenario {
        match s {
            "mixed" => Scenario::Mixed,
            "small-ring" => Scenario::SmallRing,
            other => panic!("unknown scenario {other}"),
        }
    }

    fn ring(self) -> u64 {
        match self {
            Scenario::Mixed => 64 << 20,
            Scenario::SmallRing => MIN_CAPACITY,
        }
    }
}

/// What the child does, in order, to files `0..FILES` (created before it starts).
#[derive(Clone, Debug)]
enum Op {
    Write {
        file: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Flush {
        file: usize,
    },
    /// The file is deleted: its name removed, and its buffers dropped (as the vfs does).
    Delete {
        file: usize,
    },
    /// The file's name is removed but the process dies before it drops the buffers.
    UnlinkOnly {
        file: usize,
    },
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

fn workload(scenario: Scenario) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut rng = StdRng::seed_from_u64(7);
    let mut seed = 0;
    let mut write = |ops: &mut Vec<Op>, file, offset, len| {
        seed += 1;
        ops.push(Op::Write {
            file,
            offset,
            data: pattern(seed, len),
        });
    };
    match scenario {
        Scenario::Mixed => {
            for k in 0..12u64 {
                write(&mut ops, 0, k << 20, 1 << 20);
                if k == 3 {
                    ops.push(Op::Flush { file: 0 });
                }
            }
            for _ in 0..300 {
                let offset = rng.random_range(0..2048u64) * 4096;
                write(&mut ops, 1, offset, 4096);
            }
            for k in 0..3u64 {
                write(&mut ops, 2, k << 20, 1 << 20);
            }
            ops.push(Op::Delete { file: 2 });
            write(&mut ops, 3, 0, 256 << 10);
            write(&mut ops, 3, 256 << 10, 256 << 10);
            ops.push(Op::UnlinkOnly { file: 3 });
            // Newer unflushed bytes over flushed ones: the replay must not bring the old
            // ones back, nor lose the new ones.
            write(&mut ops, 4, 0, 1 << 20);
            ops.push(Op::Flush { file: 4 });
            write(&mut ops, 4, 4096, 64 << 10);
            write(&mut ops, 4, 8192, 100);
        }
        Scenario::SmallRing => {
            for k in 0..48u64 {
                write(&mut ops, 0, k * (128 << 10), 128 << 10);
            }
            for _ in 0..400 {
                let offset = rng.random_range(0..512u64) * 4096;
                write(&mut ops, 1, offset, 4096);
            }
            for k in 0..8u64 {
                write(&mut ops, 4, 3 + k * 70_000, 70_000);
            }
        }
    }
    ops
}

/// The bytes each file must hold after the workload, and whether it must still exist.
fn expected(ops: &[Op]) -> Vec<Option<Vec<u8>>> {
    let mut files: Vec<Option<Vec<u8>>> = vec![Some(Vec::new()); FILES];
    for op in ops {
        match op {
            Op::Write { file, offset, data } => {
                let f = files[*file].as_mut().unwrap();
                let end = *offset as usize + data.len();
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[*offset as usize..end].copy_from_slice(data);
            }
            Op::Flush { .. } => {}
            Op::Delete { file } | Op::UnlinkOnly { file } => files[*file] = None,
        }
    }
    files
}

fn name(file: usize) -> Vec<u8> {
    format!("file-{file}").into_bytes()
}

fn meta_url(dir: &Path) -> String {
    format!("redb://{}/meta.redb", dir.display())
}

fn storage(dir: &Path) -> String {
    format!("fs://{}", dir.join("objects").display())
}

/// Formats a volume in `dir` and creates the test's files; returns their inodes.
fn format_volume(dir: &Path) -> Vec<Ino> {
    let meta = meta::open(&meta_url(dir)).unwrap();
    let format = Format {
        name: "vol".into(),
        uuid: "journal-test-volume".into(),
        storage: storage(dir),
        block_size: 1 << 20,
        capacity: 0,
        inodes: 0,
        created: Timestamp::now(),
    };
    meta.format(&format, false).unwrap();
    let node = NewNode {
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
        target: vec![],
    };
    (0..FILES)
        .map(|f| {
            meta.mknod(None, Ino::ROOT, &name(f), &node, Caller::ROOT)
                .unwrap()
                .0
        })
        .collect()
}

struct Store {
    meta: Arc<dyn MetaEngine>,
    data: Arc<DataStore>,
    /// Dropped last: the store's tasks run on it.
    _rt: tokio::runtime::Runtime,
}

/// A client's data path on the volume in `dir`, with its own block cache (so reads come
/// from object storage, not from what the writer cached).
fn open_store(dir: &Path, cache: &str) -> Store {
    let meta = meta::open(&meta_url(dir)).unwrap();
    let format = meta.load_format().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = DataConfig {
        cache_dir: Some(dir.join(cache)),
        ..DataConfig::default()
    };
    let data = DataStore::open(
        &storage(dir),
        &format,
        config,
        meta.clone(),
        rt.handle().clone(),
    )
    .unwrap();
    Store {
        meta,
        data,
        _rt: rt,
    }
}

/// The writer process: runs the scenario's workload with the journal taken over, says
/// so, and waits to be killed. Only run by the tests below (see [`CHILD_ENV`]).
#[test]
#[ignore = "the writer process of the crash tests, started by them"]
fn journal_writer_child() {
    let spec = std::env::var(CHILD_ENV).expect("started by a crash test");
    let (scenario, dir) = spec.split_once(':').unwrap();
    let (scenario, dir) = (Scenario::parse(scenario), Path::new(dir));
    let store = open_store(dir, "cache-child");
    // SAFETY: the parent placed the journal memfd at this number for this process, and
    // nothing else here uses it.
    let fd = unsafe { OwnedFd::from_raw_fd(CHILD_JOURNAL_FD) };
    let started = store.data.attach_journal(fd).unwrap();
    assert!(
        matches!(&started, JournalStart::TakenOver(r) if r.initialized == Some("new journal")),
        "{started:?}"
    );
    let inodes: Vec<Ino> = (0..FILES)
        .map(|f| store.meta.lookup(Ino::ROOT, &name(f)).unwrap().0)
        .collect();
    let info = SessionInfo {
        host: "test".into(),
        mountpoint: "/test".into(),
        pid: std::process::id(),
        version: "test".into(),
        heartbeat: Timestamp::now(),
    };
    let sid = store.meta.new_session(&info).unwrap();
    for op in workload(scenario) {
        match op {
            Op::Write { file, offset, data } => {
                store.data.write(inodes[file], offset, &data).unwrap()
            }
            Op::Flush { file } => store.data.flush(inodes[file]).unwrap(),
            Op::Delete { file } => {
                store
                    .meta
                    .unlink(None, sid, Ino::ROOT, &name(file), &|_| false)
                    .unwrap();
                store.data.discard(inodes[file]);
            }
            Op::UnlinkOnly { file } => {
                store
                    .meta
                    .unlink(None, sid, Ino::ROOT, &name(file), &|_| false)
                    .unwrap();
            }
        }
    }
    // Straight to the pipe: the test harness may capture `println!`.
    let mut out = std::io::stdout();
    writeln!(out, "{READY}").unwrap();
    out.flush().unwrap();
    // Wait for the SIGKILL; if the test died instead, stdin ends: leave without a flush.
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    std::process::exit(3);
}

/// Starts the writer process on the volume in `dir` with `journal`, and waits until it
/// says every write returned.
fn start_writer(scenario: Scenario, dir: &Path, journal: &OwnedFd) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "journal_writer_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, format!("{}:{}", scenario.name(), dir.display()))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped());
    let raw = journal.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, CHILD_JOURNAL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        // (After the harness's "test journal_writer_child ... ".)
        if line.unwrap().ends_with(READY) {
            return child;
        }
    }
    let status = child.wait().unwrap();
    panic!("the writer process ended before its writes returned: {status}");
}

fn kill_9(mut child: std::process::Child) {
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

/// Reads a whole file through `store` in 1 MiB reads, as the kernel would.
fn read_all(store: &Store, ino: Ino) -> Vec<u8> {
    let size = store.meta.getattr(ino).unwrap().size;
    let mut state = ReadState::default();
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let got = store
            .data
            .read(ino, out.len() as u64, 1 << 20, size, &mut state)
            .unwrap();
        assert!(!got.is_empty(), "short read at {} of {size}", out.len());
        out.extend_from_slice(&got);
    }
    out
}

/// Every surviving file holds exactly the written bytes; deleted ones are gone.
fn check_files(store: &Store, inodes: &[Ino], want: &[Option<Vec<u8>>]) {
    for (file, (ino, want)) in inodes.iter().zip(want).enumerate() {
        match want {
            Some(bytes) => {
                let got = read_all(store, *ino);
                assert_eq!(got.len(), bytes.len(), "file {file}: size");
                let first_diff = got.iter().zip(bytes).position(|(a, b)| a != b);
                assert_eq!(first_diff, None, "file {file}: first differing byte");
            }
            None => assert!(
                matches!(store.meta.getattr(*ino), Err(MetaError::NotFound)),
                "file {file} was deleted"
            ),
        }
    }
}

#[test]
fn acknowledged_writes_survive_a_kill_9_and_a_live_owner_defers_the_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let inodes = format_volume(dir.path());
    let scenario = Scenario::Mixed;
    let memfd = journal::create_memfd(HEADER_BYTES + scenario.ring()).unwrap();
    let child = start_writer(scenario, dir.path(), &memfd);

    // A successor started while the writer lives (a live upgrade) must not touch it.
    let successor = open_store(dir.path(), "cache-successor");
    let started = successor
        .data
        .attach_journal(memfd.try_clone().unwrap())
        .unwrap();
    assert_eq!(started, JournalStart::Deferred);
    assert_eq!(
        successor.data.stats().journal,
        None,
        "not taken over while owned"
    );

    kill_9(child);
    let replayed = successor
        .data
        .take_over_journal(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    let ops = workload(scenario);
    let want = expected(&ops);
    // Files 0 (8 of 12 writes unflushed), 1, 3 (deleted meanwhile) and 4 (2 writes).
    assert_eq!(replayed.records, 8 + 300 + 2 + 2, "{replayed:?}");
    assert_eq!(
        replayed.deleted, 2,
        "the unlinked file's two writes: {replayed:?}"
    );
    assert_eq!((replayed.torn, replayed.corrupt), (0, 0), "{replayed:?}");
    assert!(replayed.unflushed.is_empty(), "{replayed:?}");
    check_files(&successor, &inodes, &want);
    let usage = successor.data.stats().journal.unwrap();
    assert_eq!(
        usage.used, 0,
        "every replayed record was committed: {usage:?}"
    );

    // The next client after another crash finds nothing left to replay, and the files
    // are unchanged.
    drop(successor);
    let next = open_store(dir.path(), "cache-next");
    match next
        .data
        .attach_journal(memfd.try_clone().unwrap())
        .unwrap()
    {
        JournalStart::TakenOver(r) => assert_eq!((r.records, r.initialized), (0, None), "{r:?}"),
        other => panic!("{other:?}"),
    }
    check_files(&next, &inodes, &want);
}

#[test]
fn a_journal_smaller_than_the_unflushed_data_makes_writers_flush_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let inodes = format_volume(dir.path());
    let scenario = Scenario::SmallRing;
    let memfd = journal::create_memfd(HEADER_BYTES + scenario.ring()).unwrap();
    let child = start_writer(scenario, dir.path(), &memfd);
    kill_9(child);

    let successor = open_store(dir.path(), "cache-successor");
    let replayed = match successor
        .data
        .attach_journal(memfd.try_clone().unwrap())
        .unwrap()
    {
        JournalStart::TakenOver(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(replayed.records > 0, "{replayed:?}");
    assert!(replayed.bytes <= scenario.ring(), "{replayed:?}");
    assert!(replayed.unflushed.is_empty(), "{replayed:?}");
    check_files(&successor, &inodes, &expected(&workload(scenario)));
}

#[test]
fn a_failed_flush_keeps_its_records_for_the_next_client() {
    let dir = tempfile::tempdir().unwrap();
    let inodes = format_volume(dir.path());
    let memfd = journal::create_memfd(HEADER_BYTES + (64 << 20)).unwrap();
    let first = open_store(dir.path(), "cache-first");
    let started = first
        .data
        .attach_journal(memfd.try_clone().unwrap())
        .unwrap();
    assert!(matches!(started, JournalStart::TakenOver(_)), "{started:?}");
    // A file where the objects' directory should be: every upload fails (even as root).
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    std::fs::write(objects.join("chunks"), b"in the way").unwrap();
    let mut want = Vec::new();
    for k in 0..3u64 {
        let bytes = pattern(100 + k, (1 << 20) + 17);
        first
            .data
            .write(inodes[0], want.len() as u64, &bytes)
            .unwrap();
        want.extend_from_slice(&bytes);
    }
    assert!(
        first.data.flush(inodes[0]).is_err(),
        "uploads cannot succeed"
    );
    // The process dies now: nothing of it runs again (no destructor, no flush).
    std::mem::forget(first);

    std::fs::remove_file(objects.join("chunks")).unwrap();
    let next = open_store(dir.path(), "cache-next");
    let replayed = match next
        .data
        .attach_journal(memfd.try_clone().unwrap())
        .unwrap()
    {
        JournalStart::TakenOver(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        replayed.records, 3,
        "the failed flush kept every record: {replayed:?}"
    );
    assert!(replayed.unflushed.is_empty(), "{replayed:?}");
    let mut files = vec![Some(Vec::new()); FILES];
    files[0] = Some(want);
    check_files(&next, &inodes, &files);
}
