//! The node's work, without gRPC: publish a volume at a target path (one Baton mount per
//! backend on the node, bind-mounted to each target), unpublish it (unmounting the backend
//! after its last user), report usage, and reconcile after a restart.
//!
//! What must hold:
//! - the users of a backend are counted from /proc/self/mountinfo (every bind of the FUSE
//!   connection has its device number), so a restarted plugin counts exactly;
//! - a backend is mounted, and unmounted, only under its backend lock, and a publish holds
//!   that lock from the mount to the bind, so a mount is never torn down under a publish;
//! - a second call for a volume that has one in progress is ABORTED.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::baton::Baton;
use crate::error::{CsiError, chain};
use crate::layout::{
    BackendRecord, Layout, TargetRecord, list_records, read_record, remove_record, write_record,
};
use crate::locks::{InFlight, KeyedLock};
use crate::mounter::Mounter;
use crate::mountinfo::{MountEntry, MountTable};
use crate::proto::{
    NodeGetVolumeStatsResponse, NodePublishVolumeRequest, VolumeCondition, VolumeUsage,
    volume_usage,
};
use crate::sys;
use crate::volume::{
    BackendId, BackendSpec, CONTEXT_SUBDIR, VolumeSecrets, check_capability, mount_part,
    normalize_subdir, parse_mount_flags,
};

/// What [`Publisher::ensure_served`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// Not a mounted backend of this node in use: nothing to serve.
    NotOurs,
    /// Something serves it and will go on doing so.
    Already,
    /// A new mount pod (`namespace/name`) serves it now.
    Replaced(String),
}

/// The node side of the driver.
#[derive(Debug, Clone)]
pub struct Publisher {
    layout: Layout,
    mounter: Arc<dyn Mounter>,
    baton: Baton,
    format_timeout: Duration,
    volumes: InFlight,
    backends: KeyedLock,
}

fn io_internal(step: &str, e: std::io::Error) -> CsiError {
    CsiError::internal(step, &e)
}

fn read_table() -> Result<MountTable, CsiError> {
    MountTable::read().map_err(|e| io_internal("reading /proc/self/mountinfo", e))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `path` with its parent directory resolved (symlinks, `..`), as the mount table shows
/// it; the last component is kept as is, since it may be a FUSE mount whose server is gone.
fn resolve_parent(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// What differs between a publish and the one already at the target.
fn differences(have: &TargetRecord, want: &TargetRecord) -> Vec<&'static str> {
    let mut d = Vec::new();
    if have.volume_id != want.volume_id {
        d.push("volume_id");
    }
    if have.backend != want.backend {
        d.push("volume (metadata URL or mount options)");
    }
    if have.subdir != want.subdir {
        d.push("subdir");
    }
    if have.readonly != want.readonly {
        d.push("readonly");
    }
    if have.access_mode != want.access_mode {
        d.push("access mode");
    }
    if have.fs_type != want.fs_type || have.mount_flags != want.mount_flags {
        d.push("mount flags");
    }
    d
}

impl Publisher {
    pub fn new(layout: Layout, mounter: Arc<dyn Mounter>, baton: Baton) -> Publisher {
        Publisher {
            layout,
            mounter,
            baton,
            format_timeout: Duration::from_secs(60),
            volumes: InFlight::default(),
            backends: KeyedLock::default(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// NodePublishVolume.
    pub fn publish(&self, req: &NodePublishVolumeRequest) -> Result<(), CsiError> {
        let ia = CsiError::InvalidArgument;
        if req.volume_id.is_empty() {
            return Err(ia("volume_id is required".into()));
        }
        if req.target_path.is_empty() {
            return Err(ia("target_path is required".into()));
        }
        if !Path::new(&req.target_path).is_absolute() {
            return Err(ia(format!(
                "target_path {:?} is not absolute",
                req.target_path
            )));
        }
        let target = resolve_parent(Path::new(&req.target_path));
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| ia("volume_capability is required".into()))?;
        let (access_mode, mode_readonly) = check_capability(cap).map_err(ia)?;
        let (fs_type, mount_flags) = mount_part(cap);
        let flags = parse_mount_flags(&mount_flags).map_err(ia)?;
        let subdir = normalize_subdir(
            req.volume_context
                .get(CONTEXT_SUBDIR)
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(ia)?;
        let secrets = VolumeSecrets::parse(&req.secrets).map_err(ia)?;
        let spec = BackendSpec::new(secrets, flags.options);
        let want = TargetRecord {
            volume_id: req.volume_id.clone(),
            target: target.clone(),
            backend: spec.id.clone(),
            subdir,
            readonly: req.readonly || mode_readonly || flags.readonly,
            access_mode,
            fs_type,
            mount_flags,
        };

        let _op = self.volumes.try_begin(&req.volume_id)?;
        let span = tracing::info_span!("publish", volume = %req.volume_id, backend = %spec.id);
        let _enter = span.enter();

        let table = read_table()?;
        if let Some(existing) = table.at(&target) {
            return self.check_published(&want, existing, &table);
        }

        let _backend = self.backends.lock(spec.id.as_str());
        let result = self.ensure_backend(&spec).and_then(|_| self.bind(&want));
        if result.is_err() {
            // A backend mounted for this publish alone must not stay behind.
            if let Err(e) = self.release_locked(&spec.id) {
                warn!(error = %e, "cannot release the backend after a failed publish");
            }
        }
        result
    }

    /// The target is already mounted: OK if it is this very publish, else ALREADY_EXISTS.
    fn check_published(
        &self,
        want: &TargetRecord,
        existing: &MountEntry,
        table: &MountTable,
    ) -> Result<(), CsiError> {
        let record_path = self.layout.target_record(&want.target);
        let record = read_record::<TargetRecord>(&record_path)
            .map_err(|e| CsiError::internal("reading the target record", &e))?;
        let backend_dev = table
            .at(&self.layout.backend_mountpoint(&want.backend))
            .filter(|b| b.is_baton())
            .map(|b| b.dev);
        match record {
            Some(have) => {
                let diff = differences(&have, want);
                if diff.is_empty() && backend_dev == Some(existing.dev) {
                    info!("already published with the same arguments");
                    return Ok(());
                }
                if diff.is_empty() {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is mounted, but not from volume {}'s Baton mount",
                        want.target.display(),
                        want.volume_id
                    )));
                }
                Err(CsiError::AlreadyExists(format!(
                    "volume {} is already published at {} with a different {}",
                    have.volume_id,
                    want.target.display(),
                    diff.join(", ")
                )))
            }
            None => {
                // Mounted, but the record is missing (a crash between the bind and the
                // record): the mount table decides.
                let root = Path::new("/").join(&want.subdir);
                if existing.is_baton()
                    && backend_dev == Some(existing.dev)
                    && existing.root == root
                    && existing.is_readonly() == want.readonly
                {
                    write_record(&record_path, want)
                        .map_err(|e| CsiError::internal("writing the target record", &e))?;
                    return Ok(());
                }
                Err(CsiError::AlreadyExists(format!(
                    "{} already has a mount ({}) that is not this volume's",
                    want.target.display(),
                    existing.fstype
                )))
            }
        }
    }

    /// Makes sure the backend is mounted and serving. Caller holds the backend lock.
    fn ensure_backend(&self, spec: &BackendSpec) -> Result<MountEntry, CsiError> {
        let mp = self.layout.backend_mountpoint(&spec.id);
        let table = read_table()?;
        if let Some(e) = table.at(&mp) {
            if !e.is_baton() {
                return Err(CsiError::Internal(format!(
                    "{} has a {} mount that baton-csi did not make",
                    mp.display(),
                    e.fstype
                )));
            }
            if sys::is_alive(&mp) {
                return Ok(e.clone());
            }
            let users = table.users_of(e.dev, &mp, &self.layout.mnt_dir()).count();
            warn!(
                users,
                "the backend's FUSE server is gone; mounting it again"
            );
            let record = read_record::<BackendRecord>(&self.layout.backend_record(&spec.id))
                .ok()
                .flatten();
            self.mounter
                .unmount(&spec.id, record.as_ref(), &mp)
                .map_err(|e| e.into_csi("removing the dead backend mount"))?;
        }
        std::fs::create_dir_all(&mp)
            .map_err(|e| io_internal("creating the backend mountpoint", e))?;
        self.baton
            .format_if_missing(&spec.secrets, self.format_timeout)
            .map_err(|e| CsiError::internal("formatting the Baton volume", &e))?;
        info!(mode = ?self.mounter.mode(), "mounting the backend");
        let pod = self
            .mounter
            .mount(spec, &mp)
            .map_err(|e| e.into_csi("mounting the Baton volume"))?;
        let record = BackendRecord {
            id: spec.id.clone(),
            mode: self.mounter.mode(),
            pod,
            options: spec.options.args(),
            created_unix: now_unix(),
            image: None,
        };
        write_record(&self.layout.backend_record(&spec.id), &record)
            .map_err(|e| CsiError::internal("writing the backend record", &e))?;
        let table = read_table()?;
        table
            .at(&mp)
            .filter(|e| e.is_baton())
            .cloned()
            .ok_or_else(|| {
                CsiError::Internal(format!(
                    "the backend reported ready but {} is not mounted",
                    mp.display()
                ))
            })
    }

    /// Binds the volume's directory to the target and records it.
    fn bind(&self, want: &TargetRecord) -> Result<(), CsiError> {
        let source = self
            .layout
            .backend_mountpoint(&want.backend)
            .join(&want.subdir);
        match std::fs::metadata(&source) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(CsiError::InvalidArgument(format!(
                    "subdir {:?} of volume {} is not a directory",
                    want.subdir, want.volume_id
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CsiError::NotFound(format!(
                    "volume {}: directory {:?} does not exist in the Baton volume",
                    want.volume_id,
                    format!("/{}", want.subdir)
                )));
            }
            Err(e) => return Err(io_internal("looking up the volume's directory", e)),
        }
        std::fs::create_dir_all(&want.target)
            .map_err(|e| io_internal("creating the target directory", e))?;
        sys::bind(&source, &want.target, want.readonly)
            .map_err(|e| CsiError::internal("bind-mounting the volume at the target", &e))?;
        if let Err(e) = write_record(&self.layout.target_record(&want.target), want) {
            let _ = sys::unmount(&want.target);
            return Err(CsiError::internal("writing the target record", &e));
        }
        info!(target = %want.target.display(), subdir = %want.subdir, readonly = want.readonly, "published");
        Ok(())
    }

    /// NodeUnpublishVolume.
    pub fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        if target_path.is_empty() {
            return Err(CsiError::InvalidArgument("target_path is required".into()));
        }
        let target = resolve_parent(Path::new(target_path));
        let _op = self.volumes.try_begin(volume_id)?;
        let span = tracing::info_span!("unpublish", volume = %volume_id);
        let _enter = span.enter();

        let record_path = self.layout.target_record(&target);
        let record = read_record::<TargetRecord>(&record_path)
            .map_err(|e| CsiError::internal("reading the target record", &e))?;
        if let Some(other) = record.as_ref().filter(|r| r.volume_id != volume_id) {
            return Err(CsiError::NotFound(format!(
                "volume {volume_id} is not published at {target_path} (volume {} is)",
                other.volume_id
            )));
        }
        let table = read_table()?;
        let mut backend = record.as_ref().map(|r| r.backend.clone());
        if let Some(e) = table.at(&target) {
            if !e.is_baton() && record.is_none() {
                return Err(CsiError::NotFound(format!(
                    "volume {volume_id} is not published at {target_path} (a {} mount is)",
                    e.fstype
                )));
            }
            if backend.is_none() {
                backend = self.backend_of(&table, e.dev);
            }
            // Unmount every layer (a crashed publish may have stacked two binds).
            for _ in 0..8 {
                match sys::unmount(&target) {
                    Ok(sys::Unmounted::NotMounted) => break,
                    Ok(how) => {
                        if how == sys::Unmounted::Detached {
                            warn!("target busy; detached it");
                        }
                        if read_table()?.at(&target).is_none() {
                            break;
                        }
                    }
                    Err(e) => return Err(CsiError::internal("unmounting the target", &e)),
                }
            }
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, "cannot remove the target directory"),
        }
        remove_record(&record_path)
            .map_err(|e| CsiError::internal("removing the target record", &e))?;
        info!(target = %target.display(), "unpublished");
        if let Some(b) = backend {
            if let Err(e) = self.release_if_unused(&b) {
                // The target is gone, which is what the CO asked; the periodic reconcile
                // retries the backend.
                warn!(backend = %b, error = %e, "cannot release the backend");
            }
        }
        Ok(())
    }

    /// The backend whose mount has device `dev`.
    fn backend_of(&self, table: &MountTable, dev: (u32, u32)) -> Option<BackendId> {
        let mnt = self.layout.mnt_dir();
        table
            .0
            .iter()
            .filter(|e| e.dev == dev && e.mountpoint.parent() == Some(mnt.as_path()))
            .find_map(|e| BackendId::from_hex(&e.mountpoint.file_name()?.to_string_lossy()))
    }

    /// Makes sure the mounted backend `id` stays served when what serves it goes away (its
    /// mount pod is being deleted: [`Mounter::ensure_served`]). Nothing to do for a
    /// backend that is not mounted, not recorded, or has no user (it is released instead).
    pub fn ensure_served(&self, id: &BackendId) -> Result<Served, CsiError> {
        let _backend = self.backends.lock(id.as_str());
        let record_path = self.layout.backend_record(id);
        let Some(mut record) = read_record::<BackendRecord>(&record_path).ok().flatten() else {
            return Ok(Served::NotOurs);
        };
        // A backend mounted in another mode (the node was switched to mount pods) keeps
        // its server.
        if record.mode != self.mounter.mode() {
            return Ok(Served::NotOurs);
        }
        let mp = self.layout.backend_mountpoint(id);
        let table = read_table()?;
        let Some(e) = table.at(&mp).filter(|e| e.is_baton()) else {
            return Ok(Served::NotOurs);
        };
        if table.users_of(e.dev, &mp, &self.layout.mnt_dir()).count() == 0 {
            return Ok(Served::NotOurs);
        }
        match self
            .mounter
            .ensure_served(id, &record, &mp)
            .map_err(|e| e.into_csi("replacing the mount pod"))?
        {
            None => Ok(Served::Already),
            Some(pod) => {
                record.pod = Some(pod.clone());
                write_record(&record_path, &record)
                    .map_err(|e| CsiError::internal("writing the backend record", &e))?;
                Ok(Served::Replaced(pod))
            }
        }
    }

    /// Unmounts a backend that has no user left; returns how many users it has.
    pub fn release_if_unused(&self, id: &BackendId) -> Result<usize, CsiError> {
        let _backend = self.backends.lock(id.as_str());
        self.release_locked(id)
    }

    fn release_locked(&self, id: &BackendId) -> Result<usize, CsiError> {
        let mp = self.layout.backend_mountpoint(id);
        let table = read_table()?;
        if let Some(e) = table.at(&mp) {
            let users = table.users_of(e.dev, &mp, &self.layout.mnt_dir()).count();
            if users > 0 {
                return Ok(users);
            }
            info!(backend = %id, "no user left: unmounting the backend");
        }
        let record_path = self.layout.backend_record(id);
        let record = read_record::<BackendRecord>(&record_path).ok().flatten();
        self.mounter
            .unmount(id, record.as_ref(), &mp)
            .map_err(|e| e.into_csi("unmounting the backend"))?;
        remove_record(&record_path)
            .map_err(|e| CsiError::internal("removing the backend record", &e))?;
        let _ = std::fs::remove_dir(&mp);
        Ok(0)
    }

    /// NodeGetVolumeStats.
    pub fn stats(
        &self,
        volume_id: &str,
        volume_path: &str,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        if volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        if volume_path.is_empty() {
            return Err(CsiError::InvalidArgument("volume_path is required".into()));
        }
        let path = &resolve_parent(Path::new(volume_path));
        let not_found = || {
            CsiError::NotFound(format!(
                "volume {volume_id} is not published at {volume_path}"
            ))
        };
        let table = read_table()?;
        if table.at(path).filter(|e| e.is_baton()).is_none() {
            return Err(not_found());
        }
        let record = read_record::<TargetRecord>(&self.layout.target_record(path))
            .ok()
            .flatten();
        if record.is_some_and(|r| r.volume_id != volume_id) {
            return Err(not_found());
        }
        match sys::usage(path) {
            Ok(u) => {
                let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                Ok(NodeGetVolumeStatsResponse {
                    usage: vec![
                        VolumeUsage {
                            available: i(u.available_bytes),
                            total: i(u.total_bytes),
                            used: i(u.used_bytes),
                            unit: volume_usage::Unit::Bytes as i32,
                        },
                        VolumeUsage {
                            available: i(u.free_inodes),
                            total: i(u.total_inodes),
                            used: i(u.total_inodes.saturating_sub(u.free_inodes)),
                            unit: volume_usage::Unit::Inodes as i32,
                        },
                    ],
                    volume_condition: Some(VolumeCondition { abnormal: false, message: "serving".into() }),
                })
            }
            Err(nix::errno::Errno::ENOTCONN | nix::errno::Errno::ECONNABORTED) => {
                Ok(NodeGetVolumeStatsResponse {
                    usage: Vec::new(),
                    volume_condition: Some(VolumeCondition {
                        abnormal: true,
                        message: "the Baton mount's FUSE server is gone (transport endpoint is not connected)".into(),
                    }),
                })
            }
            Err(e) => Err(CsiError::internal("statvfs", &e)),
        }
    }

    /// Rediscovers the node's state from the host: drops records of targets that are no
    /// longer mounted, and unmounts backends (stops mount pods) that have no user left.
    /// With `ask_api_server` (at start-up), also looks for this node's mount pods whose
    /// mount is gone; the periodic pass does not, to cost the API server nothing.
    /// Returns the backends in use and their number of users.
    pub fn reconcile(&self, ask_api_server: bool) -> Result<Vec<(BackendId, usize)>, CsiError> {
        for (path, r) in list_records::<TargetRecord>(&self.layout.targets_dir()) {
            // Skip volumes with a call in progress: their record may be ahead of the table.
            let Ok(_op) = self.volumes.try_begin(&r.volume_id) else {
                continue;
            };
            if read_table()?.at(&r.target).is_none() {
                info!(volume = %r.volume_id, target = %r.target.display(), "forgetting a target that is no longer mounted");
                let _ = remove_record(&path);
            }
        }
        let table = read_table()?;
        let mut ids: BTreeSet<BackendId> =
            list_records::<BackendRecord>(&self.layout.backends_dir())
                .into_iter()
                .map(|(_, r)| r.id)
                .collect();
        let mnt = self.layout.mnt_dir();
        ids.extend(
            table
                .0
                .iter()
                .filter(|e| e.mountpoint.parent() == Some(mnt.as_path()))
                .filter_map(|e| BackendId::from_hex(&e.mountpoint.file_name()?.to_string_lossy())),
        );
        if ask_api_server {
            match self.mounter.instances() {
                Ok(found) => ids.extend(found),
                Err(e) => warn!(error = %chain(&e), "cannot list this node's mount pods"),
            }
        }
        let mut in_use = Vec::new();
        for id in ids {
            match self.release_if_unused(&id) {
                Ok(0) => {}
                Ok(users) => in_use.push((id, users)),
                Err(e) => {
                    warn!(backend = %id, error = %e, "cannot release an unused backend");
                }
            }
        }
        Ok(in_use)
    }
}
