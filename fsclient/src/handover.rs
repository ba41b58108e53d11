//! A client's state for a live upgrade: exported by the old client once it is frozen,
//! imported by its successor before it serves.
//!
//! The state ([`ClientStateV1`]) is what lives only in this process: the kernel's lookup
//! references, open file and directory handles (with the lock owners that took locks
//! through them), inodes unlinked while open, the handle counter, and the FUSE INIT
//! exchange the successor must repeat. Everything else is in the metadata engine under
//! the mount's session, which the successor resumes, or is a cache. Written data is not
//! part of it: [`export`] flushes first and fails if it cannot.
//!
//! The old client's side runs on a [`Freezer`] thread: wait for the gate to freeze, flush,
//! export, send the state to the supervisor.
//!
//! Between clients that announce `state-delta`, the bulk moves before the freeze: the old
//! client exports a base while it serves ([`export_base`]) and inside the freeze only the
//! changes since ([`export_frozen`]); the successor stages the base meanwhile
//! ([`Staged`]) and applies the changes to it. The pause then depends on what changed
//! during the upgrade, not on the size of the tables.
//!
//! What this module must never do: export from a client that may still execute requests
//! (the gate is frozen first), or import a state of another volume or session.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use handover_proto::channel;
use handover_proto::message::{FreezeMode, MountSpec, StateChunk, ToSupervisor};
use handover_proto::state::v1::{DirHandleV1, FileHandleV1};
use handover_proto::state::{
    self, ClientState, ClientStateV1, StateDelta, StateDeltaV1, StateError,
};

use crate::client::error_chain;
use crate::data::DataError;
use crate::fuse::adapter::DRAIN_NUDGE_PREFIX;
use crate::fuse::park::{FreezeError, FreezeTicket, Gate, Nudge};
use crate::meta::Ino;
use crate::vfs::handle::{Fh, HandleFlags};
use crate::vfs::{Tables, Vfs};

/// What the client runtime knows about its connection that the filesystem does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Generation of this client.
    pub generation: u64,
    pub spec: MountSpec,
    /// The kernel's FUSE_INIT request, as received from the supervisor.
    pub init_request: Vec<u8>,
    /// This client's reply to it (the one the kernel has).
    pub init_reply: Vec<u8>,
}

/// The state could not be exported; the client must thaw and serve on.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("flushing written data failed")]
    Flush(#[source] DataError),
    #[error("cannot encode the state")]
    Encode(#[source] StateError),
}

/// A predecessor's state was refused; nothing was imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the state is of volume {got}, this client serves volume {expected}")]
    OtherVolume { expected: String, got: String },
    #[error("the state is of metadata session {got}, this client resumed session {expected}")]
    OtherSession { expected: u64, got: u64 },
    #[error("handle {fh:#x} does not belong to inode {ino} as a {kind} handle")]
    BadHandle {
        fh: u64,
        ino: u64,
        kind: &'static str,
    },
    #[error("cannot decode the state")]
    Decode(#[source] StateError),
    #[error("the changes since the base do not apply to it")]
    Delta(#[source] StateError),
}

/// Open flags that give back `f` through [`HandleFlags::from_open_flags`].
fn open_flags(f: HandleFlags) -> i32 {
    let acc = match (f.read, f.write) {
        (_, false) => libc::O_RDONLY,
        (false, true) => libc::O_WRONLY,
        (true, true) => libc::O_RDWR,
    };
    acc | if f.append { libc::O_APPEND } else { 0 }
}

/// Flushes every written byte of `vfs` and returns its state. The caller has frozen the
/// FUSE gate: no request executes while (and after) the tables are read.
pub fn export(vfs: &Vfs, conn: &Connection) -> Result<ClientStateV1, ExportError> {
    vfs.data().flush_all().map_err(ExportError::Flush)?;
    Ok(state_of(vfs, conn, vfs.export_tables()))
}

/// Flushes and returns the state while `vfs` serves (`ToClient::PreExport`): the base of
/// a delta handover. From now on `vfs` records what changes, for [`export_delta`].
pub fn export_base(vfs: &Vfs, conn: &Connection) -> Result<ClientStateV1, ExportError> {
    vfs.data().flush_all().map_err(ExportError::Flush)?;
    Ok(state_of(vfs, conn, vfs.export_base()))
}

/// What a freeze exports: the changes since the base when one is out (the supervisor
/// sent `PreExport` for this handover), else the whole state.
#[derive(Debug)]
pub enum Export {
    Whole(ClientStateV1),
    Delta(StateDeltaV1),
}

/// Flushes every written byte and exports the changes since [`export_base`], or the
/// whole state if no base is out. The caller has frozen the FUSE gate.
pub fn export_frozen(vfs: &Vfs, conn: &Connection) -> Result<Export, ExportError> {
    vfs.data().flush_all().map_err(ExportError::Flush)?;
    let Some(c) = vfs.export_changes() else {
        return Ok(Export::Whole(state_of(vfs, conn, vfs.export_tables())));
    };
    let owners = owners_of(&c.lockers);
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut seen = HashSet::new();
    for fh in c.opened.iter().chain(&c.relocked) {
        if seen.insert(*fh) {
            push_handle(*fh, &owners, &mut files, &mut dirs);
        }
    }
    Ok(Export::Delta(StateDeltaV1 {
        generation: conn.generation,
        session: vfs.session().0,
        lookups: c.lookups.iter().map(|(i, n)| (i.0, *n)).collect(),
        files,
        dirs,
        closed: c.closed.iter().map(|fh| fh.0).collect(),
        orphans: c.orphans.iter().map(|i| i.0).collect(),
        next_handle: c.next_handle,
    }))
}

fn owners_of(lockers: &[(Ino, u64)]) -> HashMap<Ino, Vec<u64>> {
    let mut owners: HashMap<Ino, Vec<u64>> = HashMap::new();
    for (ino, owner) in lockers {
        owners.entry(*ino).or_default().push(*owner);
    }
    owners
}

/// Adds the entry of handle `fh` to `files` or `dirs`.
fn push_handle(
    fh: Fh,
    owners: &HashMap<Ino, Vec<u64>>,
    files: &mut Vec<FileHandleV1>,
    dirs: &mut Vec<DirHandleV1>,
) {
    let flags = fh.flags();
    if flags.dir {
        // Readdir offsets are stable cookies the kernel passes back: no cursor to keep.
        dirs.push(DirHandleV1 {
            fh: fh.0,
            ino: fh.ino().0,
            cursor: 0,
        });
    } else {
        // Locks belong to (inode, owner): every handle of the inode carries them, and
        // the importer takes the union.
        files.push(FileHandleV1 {
            fh: fh.0,
            ino: fh.ino().0,
            flags: open_flags(flags),
            lock_owners: owners.get(&fh.ino()).cloned().unwrap_or_default(),
        });
    }
}

/// The state of `vfs` with tables `t`.
fn state_of(vfs: &Vfs, conn: &Connection, t: Tables) -> ClientStateV1 {
    let owners = owners_of(&t.lockers);
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for fh in &t.handles {
        push_handle(*fh, &owners, &mut files, &mut dirs);
    }
    let open: HashSet<u64> = files.iter().map(|f| f.ino).collect();
    let unattached = t
        .lockers
        .iter()
        .filter(|(ino, _)| !open.contains(&ino.0))
        .count();
    if unattached > 0 {
        // A lock whose every descriptor is closed was released at that close; one still
        // recorded here is released by the session's end instead.
        tracing::warn!(
            unattached,
            "lock owners without an open handle are not handed over"
        );
    }
    ClientStateV1 {
        generation: conn.generation,
        session: vfs.session().0,
        volume_uuid: vfs.format().uuid.clone(),
        spec: conn.spec.clone(),
        init_request: conn.init_request.clone(),
        init_reply: conn.init_reply.clone(),
        lookups: t.lookups.iter().map(|(i, n)| (i.0, *n)).collect(),
        files,
        dirs,
        orphans: t.orphans.iter().map(|i| i.0).collect(),
        next_handle: t.next_handle,
    }
}

/// Encodes `latest` in schema `version` and cuts it into chunks for the supervisor.
pub fn encode_chunks(latest: ClientStateV1, version: u16) -> Result<Vec<StateChunk>, ExportError> {
    let versioned = ClientState::export_as(latest, version).map_err(ExportError::Encode)?;
    let bytes = state::encode(&versioned).map_err(ExportError::Encode)?;
    Ok(state::split(&bytes))
}

/// Encodes the changes since a base in schema `version` and cuts them into chunks.
pub fn encode_delta_chunks(
    latest: StateDeltaV1,
    version: u16,
) -> Result<Vec<StateChunk>, ExportError> {
    let versioned = StateDelta::export_as(latest, version).map_err(ExportError::Encode)?;
    let bytes = state::encode_delta(&versioned).map_err(ExportError::Encode)?;
    Ok(state::split(&bytes))
}

/// Decodes a reassembled state, in any schema this code reads (the caller checks that
/// its build announced that version, then migrates it with `into_latest`).
pub fn decode(bytes: &[u8]) -> Result<ClientState, ImportError> {
    state::decode(bytes).map_err(ImportError::Decode)
}

/// How much a successor took over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Imported {
    pub files: usize,
    pub dirs: usize,
    pub lookups: usize,
    pub orphans: usize,
}

/// A predecessor's base state, checked and built into tables while the predecessor still
/// serves; the changes exported inside its freeze are applied to it, then it is imported.
#[derive(Debug)]
pub struct Staged {
    /// The base, without its lookups (they are in `lookups`).
    base: ClientStateV1,
    lookups: HashMap<Ino, u64>,
}

impl Staged {
    /// Checks the base against `vfs` (volume, session) and builds its lookup table.
    pub fn new(vfs: &Vfs, mut base: ClientStateV1) -> Result<Staged, ImportError> {
        check_owner(vfs, &base)?;
        let mut lookups: HashMap<Ino, u64> = HashMap::with_capacity(base.lookups.len());
        for (ino, n) in base.lookups.drain(..) {
            *lookups.entry(Ino(ino)).or_insert(0) += n;
        }
        Ok(Staged { base, lookups })
    }

    /// How many lookups the base holds.
    pub fn lookups(&self) -> usize {
        self.lookups.len()
    }

    /// Applies the changes the predecessor exported inside its freeze.
    pub fn apply(&mut self, delta: StateDeltaV1) -> Result<(), ImportError> {
        let StateDeltaV1 { lookups, .. } = &delta;
        delta.check_base(&self.base).map_err(ImportError::Delta)?;
        for &(ino, n) in lookups {
            if n == 0 {
                self.lookups.remove(&Ino(ino));
            } else {
                self.lookups.insert(Ino(ino), n);
            }
        }
        let rest = StateDeltaV1 {
            lookups: Vec::new(),
            ..delta
        };
        rest.apply(&mut self.base).map_err(ImportError::Delta)
    }

    /// Takes the staged state over into `vfs` (not serving yet).
    pub fn import(self, vfs: &Vfs) -> Result<Imported, ImportError> {
        let mut imported = import_tables(vfs, &self.base)?;
        imported.lookups = self.lookups.len();
        vfs.import_lookups(self.lookups);
        log_imported(&self.base, imported);
        Ok(imported)
    }
}

fn check_owner(vfs: &Vfs, s: &ClientStateV1) -> Result<(), ImportError> {
    let uuid = &vfs.format().uuid;
    if &s.volume_uuid != uuid {
        return Err(ImportError::OtherVolume {
            expected: uuid.clone(),
            got: s.volume_uuid.clone(),
        });
    }
    if s.session != vfs.session().0 {
        return Err(ImportError::OtherSession {
            expected: vfs.session().0,
            got: s.session,
        });
    }
    Ok(())
}

/// Takes over a predecessor's state into `vfs` (opened on the predecessor's volume and
/// session, and not serving yet). Checks everything before changing anything.
pub fn import(vfs: &Vfs, s: &ClientStateV1) -> Result<Imported, ImportError> {
    let imported = import_tables(vfs, s)?;
    log_imported(s, imported);
    Ok(imported)
}

fn log_imported(s: &ClientStateV1, imported: Imported) {
    tracing::info!(
        from_generation = s.generation,
        ?imported,
        "predecessor's state imported"
    );
}

/// [`import`], without the log line.
fn import_tables(vfs: &Vfs, s: &ClientStateV1) -> Result<Imported, ImportError> {
    check_owner(vfs, s)?;
    let mut handles = Vec::with_capacity(s.files.len() + s.dirs.len());
    let mut lockers = Vec::new();
    for f in &s.files {
        let fh = Fh(f.fh);
        if fh.ino().0 != f.ino || fh.flags().dir {
            return Err(ImportError::BadHandle {
                fh: f.fh,
                ino: f.ino,
                kind: "file",
            });
        }
        handles.push(fh);
        lockers.extend(f.lock_owners.iter().map(|o| (fh.ino(), *o)));
    }
    for d in &s.dirs {
        let fh = Fh(d.fh);
        if fh.ino().0 != d.ino || !fh.flags().dir {
            return Err(ImportError::BadHandle {
                fh: d.fh,
                ino: d.ino,
                kind: "directory",
            });
        }
        handles.push(fh);
    }
    lockers.sort_unstable();
    lockers.dedup();
    let tables = Tables {
        lookups: s.lookups.iter().map(|(i, n)| (Ino(*i), *n)).collect(),
        handles,
        lockers,
        orphans: s.orphans.iter().map(|i| Ino(*i)).collect(),
        next_handle: s.next_handle,
    };
    vfs.import_tables(&tables);
    let imported = Imported {
        files: s.files.len(),
        dirs: s.dirs.len(),
        lookups: s.lookups.len(),
        orphans: s.orphans.len(),
    };
    Ok(imported)
}

// --- The old client's side: freeze, export, hand the state to the supervisor ---

/// A freeze on its own thread (so that a `Thaw` can cancel it): waits for the gate,
/// flushes, exports, and sends `State` chunks then `Frozen` to the supervisor, or thaws
/// and sends `FreezeFailed`. A freeze cancelled by a thaw sends nothing.
#[derive(Debug)]
pub struct Freezer {
    thread: JoinHandle<()>,
}

impl Freezer {
    /// Starts the freezer thread for a gate frozen with `ticket` (`Gate::begin_freeze`);
    /// it reports on `channel` (the handover socket).
    pub fn start(
        gate: &Arc<Gate>,
        ticket: FreezeTicket,
        state_version: u16,
        vfs: &Arc<Vfs>,
        conn: &Arc<Connection>,
        channel: &Arc<OwnedFd>,
    ) -> std::io::Result<Freezer> {
        let drains = matches!(ticket.mode, FreezeMode::Drain | FreezeMode::DrainLog);
        let nudge = drains.then(|| drain_nudge(&conn.spec.mountpoint));
        let job = FreezeJob {
            gate: gate.clone(),
            ticket,
            nudge,
            vfs: vfs.clone(),
            conn: conn.clone(),
            state_version,
            channel: channel.clone(),
            span: tracing::Span::current(),
        };
        let thread = std::thread::Builder::new()
            .name("freezer".into())
            .spawn(move || job.run())?;
        Ok(Freezer { thread })
    }

    /// Still waiting, flushing, exporting or sending.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Waits until the thread has sent all it will send.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("the freezer thread panicked");
        }
    }
}

/// Thaws the gate: a freeze in progress is cancelled (and its thread joined, so whatever
/// it sends is sent before the caller answers `Thawed`), parked requests run.
pub fn thaw(gate: &Gate, freezer: &mut Option<Freezer>) {
    gate.thaw();
    if let Some(f) = freezer.take() {
        f.join();
    }
}

/// A drain nudge for the mount at `mountpoint`: looks up a fresh magic name in the mount
/// root, which a reader thread of this process answers ENOENT.
fn drain_nudge(mountpoint: &Path) -> Nudge {
    let root = mountpoint.to_path_buf();
    let pid = std::process::id();
    let prefix = String::from_utf8_lossy(DRAIN_NUDGE_PREFIX).into_owned();
    let n = AtomicU64::new(0);
    Arc::new(move || {
        let name = root.join(format!(
            "{prefix}{pid}-{}",
            n.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::symlink_metadata(&name) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::debug!(error = %e, path = %name.display(), "drain nudge"),
            Ok(_) => tracing::warn!(path = %name.display(), "a drain nudge name exists"),
        }
    })
}

/// Sends `msg`, logging a failure (the supervisor is gone; there is nobody to tell).
fn send_or_log(sock: BorrowedFd<'_>, msg: &ToSupervisor) {
    if let Err(e) = channel::send(sock, msg, &[]) {
        tracing::warn!(error = %error_chain(&e), "cannot send to the supervisor");
    }
}

/// The freezer thread's work.
struct FreezeJob {
    gate: Arc<Gate>,
    ticket: FreezeTicket,
    nudge: Option<Nudge>,
    vfs: Arc<Vfs>,
    conn: Arc<Connection>,
    state_version: u16,
    channel: Arc<OwnedFd>,
    span: tracing::Span,
}

impl FreezeJob {
    /// Waits for the freeze, flushes, exports, sends `State`s then `Frozen`; on failure
    /// thaws and sends `FreezeFailed`. Sends nothing if a thaw cancelled it.
    fn run(self) {
        let _entered = self.span.enter();
        let sock = self.channel.as_fd();
        let started = Instant::now();
        let stats = match self.gate.wait_frozen(self.ticket, self.nudge.clone()) {
            Ok(s) => s,
            Err(FreezeError::Thawed) => {
                tracing::info!("freeze cancelled by a thaw");
                return;
            }
            Err(e) => {
                self.gate.thaw();
                send_or_log(
                    sock,
                    &ToSupervisor::FreezeFailed {
                        reason: error_chain(&e),
                    },
                );
                return;
            }
        };
        let quiesced = started.elapsed();
        let mut delta = false;
        let chunks = export_frozen(&self.vfs, &self.conn).and_then(|e| match e {
            Export::Whole(s) => encode_chunks(s, self.state_version),
            Export::Delta(d) => {
                delta = true;
                encode_delta_chunks(d, self.state_version)
            }
        });
        let chunks = match chunks {
            Ok(c) => c,
            Err(e) => {
                let reason = error_chain(&e);
                tracing::error!(%reason, "cannot export the state: thawing");
                self.gate.thaw();
                send_or_log(sock, &ToSupervisor::FreezeFailed { reason });
                return;
            }
        };
        // A thaw during the export: the supervisor rolled back and waits for Thawed.
        let Some(now) = self.gate.still_frozen(self.ticket) else {
            tracing::info!("thawed during the export");
            return;
        };
        let n = chunks.len();
        for chunk in chunks {
            if let Err(e) = channel::send(sock, &ToSupervisor::State(chunk), &[]) {
                tracing::error!(error = %error_chain(&e), "cannot send the state: thawing");
                self.gate.thaw();
                return;
            }
        }
        let frozen = match self.ticket.mode {
            FreezeMode::Resend => ToSupervisor::Frozen {
                parked: now.parked,
                drained: 0,
            },
            FreezeMode::Drain => ToSupervisor::Frozen {
                parked: 0,
                drained: now.drained.max(stats.drained),
            },
            // Lock waits handed over through the request log count as parked.
            FreezeMode::DrainLog => ToSupervisor::Frozen {
                parked: now.parked,
                drained: now.drained.max(stats.drained),
            },
        };
        tracing::info!(mode = ?self.ticket.mode, ?quiesced, total = ?started.elapsed(), chunks = n, delta, ?frozen, "frozen; state sent");
        if let Err(e) = channel::send(sock, &frozen, &[]) {
            tracing::error!(error = %error_chain(&e), "cannot report the freeze: thawing");
            self.gate.thaw();
        }
    }
}
