//! Export → import of a client's state between two real `Vfs` instances of one redb
//! volume (as the old and the new client process of a live upgrade): open handles keep
//! working in the successor, an unlinked-while-open file stays readable and is freed at
//! its last close there, locks stay held under the resumed session and are released by
//! the successor, lookup counts carry over; a state of another volume or session is
//! refused; a successor that gives up leaves the session to its predecessor.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{ME, Volume};
use fsclient::handover::{self, Connection, ImportError};
use fsclient::meta::{Ino, MetaError, SessionId};
use fsclient::vfs::{FsError, Sleep, Vfs};
use handover_proto::message::MountSpec;
use handover_proto::state::{self, ClientState};

impl Volume {
    /// A client's filesystem: a new session, or `resume`'s.
    fn open(&self, resume: Option<SessionId>) -> Result<Arc<Vfs>, fsclient::vfs::OpenError> {
        Vfs::open(self.config(resume), self.rt.handle().clone())
    }

    fn connection(&self) -> Connection {
        Connection {
            generation: 1,
            spec: MountSpec {
                volume: "vol".into(),
                meta_url: self.url(),
                mountpoint: PathBuf::from("/mnt/test"),
                home: self.dir.path().join("home"),
                threads: 4,
                attr_ttl_ms: 1000,
                entry_ttl_ms: 1000,
                cache_dir: None,
                cache_bytes: 1 << 20,
            },
            init_request: vec![1, 2, 3],
            init_reply: vec![4, 5, 6],
        }
    }
}

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    r.unwrap_err().errno()
}

/// Through the encoded form, as it travels between the processes.
fn transfer(state: handover_proto::state::ClientStateV1) -> handover_proto::state::ClientStateV1 {
    let chunks = handover::encode_chunks(state, 1).unwrap();
    let mut asm = state::Assembler::default();
    let mut bytes = None;
    for c in chunks {
        bytes = asm.push(c).unwrap();
    }
    match handover::decode(&bytes.unwrap()).unwrap() {
        ClientState::V1(s) => s,
    }
}

#[test]
fn handles_orphans_locks_and_lookups_survive_a_handover() {
    let vol = Volume::new("5f0c-handover-test");
    let old = vol.open(None).unwrap();
    let sid = old.session();

    // An open file with unflushed data, unlinked while open.
    let (orphan, _, orphan_fh) = old
        .create(None, ME, Ino::ROOT, b"scratch", 0o644, 0, libc::O_RDWR)
        .unwrap();
    old.write(orphan, orphan_fh, 0, b"still here after the unlink")
        .unwrap();
    old.unlink(None, Ino::ROOT, b"scratch").unwrap();
    // A file open for appending, locked by owner 42.
    let (log, _, log_fh) = old
        .create(
            None,
            ME,
            Ino::ROOT,
            b"log",
            0o644,
            0,
            libc::O_WRONLY | libc::O_APPEND,
        )
        .unwrap();
    old.write(log, log_fh, 0, b"first\n").unwrap();
    old.setlk(log, 42, libc::F_WRLCK, 0, u64::MAX, 7, None)
        .unwrap();
    // An open directory and a few more lookups.
    let dir_fh = old.opendir(Ino::ROOT).unwrap();
    old.lookup(Ino::ROOT, b"log").unwrap();
    let mut lookups_before = old.lookup_counts();
    lookups_before.sort_unstable();

    let state = handover::export(&old, &vol.connection()).unwrap();
    assert_eq!(state.session, sid.0);
    assert_eq!(state.volume_uuid, "5f0c-handover-test");
    assert_eq!(state.files.len(), 2);
    assert_eq!(state.dirs.len(), 1);
    assert_eq!(state.orphans, vec![orphan.0]);
    assert_eq!(state.init_request, vec![1, 2, 3]);
    let log_state = state.files.iter().find(|f| f.fh == log_fh).unwrap();
    assert_eq!(log_state.lock_owners, vec![42]);
    assert_eq!(log_state.flags, libc::O_WRONLY | libc::O_APPEND);
    let state = transfer(state);
    // The old process exits without closing the session.
    drop(old);

    let new = vol.open(Some(sid)).unwrap();
    assert_eq!(new.session(), sid);
    let imported = handover::import(&new, &state).unwrap();
    assert_eq!((imported.files, imported.dirs, imported.orphans), (2, 1, 1));
    let mut lookups_after = new.lookup_counts();
    lookups_after.sort_unstable();
    assert_eq!(lookups_after, lookups_before);

    // The unlinked file reads back through the predecessor's handle (its data was flushed
    // by the export).
    let data = new.read(orphan, orphan_fh, 0, 100).unwrap();
    assert_eq!(data, b"still here after the unlink");
    // The appender goes on through its handle.
    new.write(log, log_fh, 6, b"second\n").unwrap();
    new.fsync(log, log_fh).unwrap();
    // A directory handle reads on.
    let names: Vec<Vec<u8>> = new
        .readdir(Ino::ROOT, dir_fh, 0, 100, false)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"log".to_vec()));

    // The lock is still held under the resumed session: another client cannot take it.
    let other = vol.open(None).unwrap();
    assert_eq!(
        errno(other.setlk(log, 1, libc::F_WRLCK, 0, 10, 9, None)),
        libc::EAGAIN
    );
    // The successor releases it at the owner's close (it knows the owner from the state).
    new.flush(log, log_fh, 42).unwrap();
    other
        .setlk(log, 1, libc::F_WRLCK, 0, 10, 9, Some(&Sleep))
        .unwrap();
    new.release(log, log_fh, None).unwrap();

    // The last close of the orphan in the successor frees it.
    new.release(orphan, orphan_fh, None).unwrap();
    assert_eq!(errno(new.getattr(orphan)), libc::ENOENT);
    new.releasedir(dir_fh);

    // New handles do not reuse the predecessor's numbers.
    let again = new.open_file(log, libc::O_RDONLY).unwrap();
    assert!(again != log_fh && again != orphan_fh);
    let log_data = new.read(log, again, 0, 100).unwrap();
    assert_eq!(log_data, b"first\nsecond\n");
    new.release(log, again, None).unwrap();

    new.shutdown().unwrap();
    other.shutdown().unwrap();
}

#[test]
fn a_state_of_another_volume_or_session_is_refused() {
    let vol = Volume::new("5f0c-handover-test");
    let old = vol.open(None).unwrap();
    let (ino, _, fh) = old
        .create(None, ME, Ino::ROOT, b"f", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let state = handover::export(&old, &vol.connection()).unwrap();

    let successor = vol.open(Some(old.session())).unwrap();
    let mut other_volume = state.clone();
    other_volume.volume_uuid = "another-volume".into();
    assert!(matches!(
        handover::import(&successor, &other_volume),
        Err(ImportError::OtherVolume { .. })
    ));
    let mut other_session = state.clone();
    other_session.session += 1;
    assert!(matches!(
        handover::import(&successor, &other_session),
        Err(ImportError::OtherSession { .. })
    ));
    let mut bad_handle = state.clone();
    bad_handle.files[0].ino += 1;
    assert!(matches!(
        handover::import(&successor, &bad_handle),
        Err(ImportError::BadHandle { .. })
    ));
    // Nothing was imported by the refusals: the inode is not open in the successor, so
    // unlinking it frees it at once.
    successor.unlink(None, Ino::ROOT, b"f").unwrap();
    assert_eq!(errno(successor.getattr(ino)), libc::ENOENT);
    let _ = fh;
    successor.abandon();
    old.shutdown().unwrap();
}

#[test]
fn a_successor_that_gives_up_leaves_the_session_to_its_predecessor() {
    let vol = Volume::new("5f0c-handover-test");
    let old = vol.open(None).unwrap();
    let (ino, _, fh) = old
        .create(None, ME, Ino::ROOT, b"locked", 0o644, 0, libc::O_RDWR)
        .unwrap();
    old.setlk(ino, 5, libc::F_WRLCK, 0, u64::MAX, 7, None)
        .unwrap();

    // Prepared, then rolled back (Shutdown before Serve): abandon, never close.
    let successor = vol.open(Some(old.session())).unwrap();
    successor.abandon();
    drop(successor);

    // The predecessor's session and lock are intact.
    let m = old.meta();
    let sessions: Vec<SessionId> = m
        .list_sessions()
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert!(sessions.contains(&old.session()));
    let other = vol.open(None).unwrap();
    assert_eq!(
        errno(other.setlk(ino, 1, libc::F_WRLCK, 0, 10, 9, None)),
        libc::EAGAIN
    );
    old.flush(ino, fh, 5).unwrap();
    other.setlk(ino, 1, libc::F_WRLCK, 0, 10, 9, None).unwrap();

    // A session that is gone cannot be resumed.
    old.shutdown().unwrap();
    let err = vol.open(Some(old.session())).unwrap_err();
    assert!(
        matches!(
            err,
            fsclient::vfs::OpenError::ResumeSession {
                source: MetaError::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    other.shutdown().unwrap();
}

/// Base and changes through their encoded forms, as they travel.
fn transfer_delta(
    base: handover_proto::state::ClientStateV1,
    delta: handover_proto::state::StateDeltaV1,
) -> (
    handover_proto::state::ClientStateV1,
    handover_proto::state::StateDeltaV1,
) {
    let base = transfer(base);
    let chunks = handover::encode_delta_chunks(delta, 1).unwrap();
    let mut asm = state::Assembler::default();
    let mut bytes = None;
    for c in chunks {
        bytes = asm.push(c).unwrap();
    }
    let delta = state::decode_delta(&bytes.unwrap()).unwrap().into_latest();
    (base, delta)
}

/// Lookups, handle numbers, lockers and orphans, sorted.
type Sorted = (Vec<(Ino, u64)>, Vec<u64>, Vec<(Ino, u64)>, Vec<Ino>);

fn sorted_tables(vfs: &Vfs) -> Sorted {
    let t = vfs.export_tables();
    let mut handles: Vec<u64> = t.handles.iter().map(|fh| fh.0).collect();
    handles.sort_unstable();
    (t.lookups, handles, t.lockers, t.orphans)
}

#[test]
fn a_base_exported_while_serving_and_the_changes_since_give_the_whole_state() {
    let vol = Volume::new("5f0c-handover-test");
    let old = vol.open(None).unwrap();
    let sid = old.session();
    let conn = vol.connection();

    // Before the base: a kept file, one closed during the upgrade, one unlinked after.
    let (kept, _, kept_fh) = old
        .create(None, ME, Ino::ROOT, b"kept", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let (closed, _, closed_fh) = old
        .create(None, ME, Ino::ROOT, b"closed", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let (doomed, _, doomed_fh) = old
        .create(None, ME, Ino::ROOT, b"doomed", 0o644, 0, libc::O_RDWR)
        .unwrap();
    let dir_fh = old.opendir(Ino::ROOT).unwrap();
    let base = handover::export_base(&old, &conn).unwrap();
    assert_eq!(base.files.len(), 3);

    // While the base travels, the old client serves on: every kind of change.
    old.write(kept, kept_fh, 0, b"written after the base")
        .unwrap();
    old.release(closed, closed_fh, None).unwrap();
    old.releasedir(dir_fh);
    old.forget(closed, 1);
    let (fresh, _, fresh_fh) = old
        .create(None, ME, Ino::ROOT, b"fresh", 0o644, 0, libc::O_WRONLY)
        .unwrap();
    // A lock on a file of the base: its handle is sent again with the owner.
    old.setlk(kept, 42, libc::F_WRLCK, 0, u64::MAX, 7, None)
        .unwrap();
    old.unlink(None, Ino::ROOT, b"doomed").unwrap();
    old.lookup(Ino::ROOT, b"kept").unwrap();
    let expected = sorted_tables(&old);

    // Inside the freeze: only the changes.
    let delta = match handover::export_frozen(&old, &conn).unwrap() {
        handover::Export::Delta(d) => d,
        other => panic!("expected the changes since the base, got {other:?}"),
    };
    let fhs: Vec<u64> = delta.files.iter().map(|f| f.fh).collect();
    assert!(fhs.contains(&fresh_fh) && fhs.contains(&kept_fh), "{fhs:?}");
    assert!(!fhs.contains(&doomed_fh));
    assert!(delta.closed.contains(&closed_fh) && delta.closed.contains(&dir_fh));
    assert_eq!(delta.orphans, vec![doomed.0]);
    assert!(
        delta.lookups.contains(&(closed.0, 0)),
        "{:?}",
        delta.lookups
    );
    // The base is done with: the next freeze exports a whole state.
    assert!(matches!(
        handover::export_frozen(&old, &conn).unwrap(),
        handover::Export::Whole(_)
    ));
    let (base, delta) = transfer_delta(base, delta);
    drop(old);

    let new = vol.open(Some(sid)).unwrap();
    let mut staged = handover::Staged::new(&new, base.clone()).unwrap();
    staged.apply(delta.clone()).unwrap();
    staged.import(&new).unwrap();
    assert_eq!(sorted_tables(&new), expected);

    // The written data was flushed by the freeze's export; the lock is the successor's
    // to release; the unlinked file reads on through the base's handle.
    assert_eq!(
        new.read(kept, kept_fh, 0, 100).unwrap(),
        b"written after the base"
    );
    let other = vol.open(None).unwrap();
    assert_eq!(
        errno(other.setlk(kept, 1, libc::F_WRLCK, 0, 10, 9, None)),
        libc::EAGAIN
    );
    new.flush(kept, kept_fh, 42).unwrap();
    other
        .setlk(kept, 1, libc::F_WRLCK, 0, 10, 9, Some(&Sleep))
        .unwrap();
    new.release(doomed, doomed_fh, None).unwrap();
    assert_eq!(errno(new.getattr(doomed)), libc::ENOENT);
    new.release(fresh, fresh_fh, None).unwrap();
    new.release(kept, kept_fh, None).unwrap();

    // Changes of another exporter do not apply.
    let mut wrong = delta;
    wrong.generation += 1;
    let mut staged = handover::Staged::new(&new, base).unwrap();
    assert!(matches!(staged.apply(wrong), Err(ImportError::Delta(_))));

    new.shutdown().unwrap();
    other.shutdown().unwrap();
}

#[test]
fn a_dropped_base_makes_the_freeze_export_the_whole_state() {
    let vol = Volume::new("5f0c-handover-test");
    let old = vol.open(None).unwrap();
    let conn = vol.connection();
    let (_, _, fh) = old
        .create(None, ME, Ino::ROOT, b"f", 0o644, 0, libc::O_RDWR)
        .unwrap();
    handover::export_base(&old, &conn).unwrap();
    // A pre-flush, a thaw or the supervisor's death drops the base.
    old.drop_base();
    match handover::export_frozen(&old, &conn).unwrap() {
        handover::Export::Whole(s) => assert_eq!(s.files[0].fh, fh),
        other => panic!("expected a whole state, got {other:?}"),
    }
    old.shutdown().unwrap();
}
