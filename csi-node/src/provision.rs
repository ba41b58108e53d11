//! Dynamic provisioning, without gRPC: a CSI volume is a directory inside a Baton volume,
//! with its capacity and deletion policy recorded next to it. Inside the Baton volume:
//!
//! ```text
//! /volumes/<id>/                 the CSI volume's data (what pods see)
//! /.baton-csi/volumes/<id>.json  {name, capacity, onDelete}: what CreateVolume was asked
//! /.baton-csi/trash/<id>-<unix>/ volumes deleted with onDelete=archive
//! ```
//!
//! The controller mounts the Baton volume for the duration of one call (a detached
//! `baton` supervisor under its own state directory) and unmounts it after.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::baton::Baton;
use crate::error::CsiError;
use crate::layout::{hex, read_record, remove_record, write_record};
use crate::locks::{InFlight, KeyedLock};
use crate::mounter::process::unmount_backend;
use crate::mountinfo::MountTable;
use crate::proto::{
    CreateVolumeRequest, ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse,
    Volume, validate_volume_capabilities_response,
};
use crate::sys;
use crate::volume::{
    BackendSpec, CONTEXT_SUBDIR, MountOptions, VolumeSecrets, check_capability, mount_part,
    normalize_subdir, parse_mount_flags,
};

/// Directory of the provisioned volumes inside a Baton volume.
pub const VOLUMES_DIR: &str = "volumes";
/// Directory of baton-csi's records inside a Baton volume.
pub const META_DIR: &str = ".baton-csi";
/// StorageClass parameter: what DeleteVolume does with the data.
pub const PARAM_ON_DELETE: &str = "onDelete";

/// What DeleteVolume does with a volume's directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove it and everything in it.
    #[default]
    Delete,
    /// Move it to `/.baton-csi/trash/<id>-<unix time>`.
    Archive,
}

/// What CreateVolume was asked, kept next to the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub volume_id: String,
    pub capacity_bytes: i64,
    pub on_delete: OnDelete,
    pub created_unix: u64,
}

/// The controller side of the driver.
#[derive(Debug, Clone)]
pub struct Provisioner {
    /// Where the controller mounts Baton volumes (`<state>/ctl/<backend>`).
    ctl_dir: PathBuf,
    baton: Baton,
    mount_timeout: Duration,
    ops: InFlight,
    backends: KeyedLock,
}

/// A valid volume id: what [`volume_id_for`] makes.
fn valid_volume_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The volume id (and directory name) of a CreateVolume name: the name itself when it is
/// a safe file name, else a hash of it.
pub fn volume_id_for(name: &str) -> String {
    if valid_volume_id(name) {
        name.to_string()
    } else {
        format!("h-{}", hex(&Sha256::digest(name.as_bytes())[..16]))
    }
}

fn io_internal(step: &str, e: std::io::Error) -> CsiError {
    CsiError::internal(step, &e)
}

fn capabilities_ok(caps: &[crate::proto::VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    for cap in caps {
        check_capability(cap)?;
        parse_mount_flags(&mount_part(cap).1)?;
    }
    Ok(())
}

impl Provisioner {
    pub fn new(state_dir: &Path, baton: Baton, mount_timeout: Duration) -> Provisioner {
        Provisioner {
            ctl_dir: state_dir.join("ctl"),
            baton,
            mount_timeout,
            ops: InFlight::default(),
            backends: KeyedLock::default(),
        }
    }

    /// Mounts the Baton volume, runs `f` on its root, unmounts.
    fn with_volume_root<T>(
        &self,
        secrets: &VolumeSecrets,
        f: impl FnOnce(&Path) -> Result<T, CsiError>,
    ) -> Result<T, CsiError> {
        let spec = BackendSpec::new(secrets.clone(), MountOptions::default());
        let _backend = self.backends.lock(spec.id.as_str());
        let mp = self.ctl_dir.join(spec.id.as_str());
        let table = MountTable::read().map_err(|e| io_internal("reading mountinfo", e))?;
        let mounted = table.at(&mp).is_some_and(|e| e.is_baton());
        if mounted && !sys::is_alive(&mp) {
            let _ = sys::detach(&mp);
        }
        if !mounted || !sys::is_alive(&mp) {
            std::fs::create_dir_all(&mp).map_err(|e| io_internal("creating the mountpoint", e))?;
            self.baton
                .format_if_missing(secrets, self.mount_timeout)
                .map_err(|e| CsiError::internal("formatting the Baton volume", &e))?;
            self.baton
                .mount_background(&mp, secrets, &spec.options, self.mount_timeout)
                .map_err(|e| CsiError::internal("mounting the Baton volume", &e))?;
        }
        let result = f(&mp);
        if let Err(e) = unmount_backend(&self.baton, &spec.id, &mp) {
            tracing::warn!(error = %crate::error::chain(&e), "cannot unmount the Baton volume after a controller call");
        }
        let _ = std::fs::remove_dir(&mp);
        result
    }

    /// CreateVolume.
    pub fn create(&self, req: &CreateVolumeRequest) -> Result<Volume, CsiError> {
        let ia = CsiError::InvalidArgument;
        if req.name.is_empty() {
            return Err(ia("name is required".into()));
        }
        capabilities_ok(&req.volume_capabilities).map_err(ia)?;
        if req.volume_content_source.is_some() {
            return Err(ia(
                "volume content sources (snapshots, clones) are not supported".into(),
            ));
        }
        let (required, limit) = req
            .capacity_range
            .as_ref()
            .map(|r| (r.required_bytes, r.limit_bytes))
            .unwrap_or((0, 0));
        if required < 0 || limit < 0 {
            return Err(ia("capacity_range must not be negative".into()));
        }
        if limit > 0 && required > limit {
            return Err(CsiError::OutOfRange(format!(
                "required_bytes {required} is larger than limit_bytes {limit}"
            )));
        }
        let capacity = if required > 0 { required } else { limit };
        let mut on_delete = OnDelete::default();
        for (k, v) in &req.parameters {
            if k.starts_with("csi.storage.k8s.io/") {
                continue;
            }
            match (k.as_str(), v.as_str()) {
                (PARAM_ON_DELETE, "delete") => on_delete = OnDelete::Delete,
                (PARAM_ON_DELETE, "archive") => on_delete = OnDelete::Archive,
                (PARAM_ON_DELETE, other) => {
                    return Err(ia(format!(
                        "parameter onDelete must be delete or archive, not {other:?}"
                    )));
                }
                _ => return Err(ia(format!("unknown parameter {k:?} (known: onDelete)"))),
            }
        }
        let secrets = VolumeSecrets::parse(&req.secrets).map_err(ia)?;
        let _op = self.ops.try_begin(&req.name)?;
        let id = volume_id_for(&req.name);
        let span = tracing::info_span!("create", name = %req.name, volume = %id);
        let _enter = span.enter();
        self.with_volume_root(&secrets, |root| {
            let meta = root.join(META_DIR).join("volumes");
            let record_path = meta.join(format!("{id}.json"));
            let data = root.join(VOLUMES_DIR).join(&id);
            let existing = read_record::<VolumeRecord>(&record_path)
                .map_err(|e| CsiError::internal("reading the volume record", &e))?;
            if let Some(rec) = existing {
                let fits = (required == 0 || rec.capacity_bytes >= required)
                    && (limit == 0 || rec.capacity_bytes <= limit);
                if rec.name != req.name || !fits || rec.on_delete != on_delete {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {:?} already exists with capacity {} bytes and onDelete {:?}",
                        rec.name, rec.capacity_bytes, rec.on_delete
                    )));
                }
                std::fs::create_dir_all(&data)
                    .map_err(|e| io_internal("creating the volume directory", e))?;
                info!("volume exists already");
                return Ok(rec.capacity_bytes);
            }
            std::fs::create_dir_all(&meta)
                .map_err(|e| io_internal("creating the record directory", e))?;
            std::fs::set_permissions(root.join(META_DIR), std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io_internal("securing the record directory", e))?;
            std::fs::create_dir_all(&data)
                .map_err(|e| io_internal("creating the volume directory", e))?;
            // Any pod user may write to a new volume, as with any freshly made PV.
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| io_internal("setting the volume directory's mode", e))?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let rec = VolumeRecord {
                name: req.name.clone(),
                volume_id: id.clone(),
                capacity_bytes: capacity,
                on_delete,
                created_unix: now,
            };
            write_record(&record_path, &rec)
                .map_err(|e| CsiError::internal("writing the volume record", &e))?;
            info!(capacity, ?on_delete, "volume created");
            Ok(capacity)
        })
        .map(|capacity_bytes| Volume {
            capacity_bytes,
            volume_id: id.clone(),
            volume_context: HashMap::from([(
                CONTEXT_SUBDIR.to_string(),
                format!("{VOLUMES_DIR}/{id}"),
            )]),
            content_source: None,
            accessible_topology: Vec::new(),
        })
    }

    /// DeleteVolume.
    pub fn delete(
        &self,
        volume_id: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<(), CsiError> {
        if volume_id.is_empty() {
            return Err(CsiError::InvalidArgument("volume_id is required".into()));
        }
        if !valid_volume_id(volume_id) {
            // Not an id this driver makes: nothing of it can exist.
            return Ok(());
        }
        let secrets = VolumeSecrets::parse(secrets).map_err(CsiError::InvalidArgument)?;
        let _op = self.ops.try_begin(volume_id)?;
        let span = tracing::info_span!("delete", volume = %volume_id);
        let _enter = span.enter();
        self.with_volume_root(&secrets, |root| {
            let record_path = root
                .join(META_DIR)
                .join("volumes")
                .join(format!("{volume_id}.json"));
            let data = root.join(VOLUMES_DIR).join(volume_id);
            let policy = read_record::<VolumeRecord>(&record_path)
                .map_err(|e| CsiError::internal("reading the volume record", &e))?
                .map(|r| r.on_delete)
                .unwrap_or_default();
            match policy {
                OnDelete::Delete => match std::fs::remove_dir_all(&data) {
                    Ok(()) => info!("volume directory removed"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_internal("removing the volume directory", e)),
                },
                OnDelete::Archive if data.exists() => {
                    let trash = root.join(META_DIR).join("trash");
                    std::fs::create_dir_all(&trash)
                        .map_err(|e| io_internal("creating the trash", e))?;
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let dest = trash.join(format!("{volume_id}-{now}"));
                    std::fs::rename(&data, &dest)
                        .map_err(|e| io_internal("archiving the volume directory", e))?;
                    info!(to = %dest.display(), "volume directory archived");
                }
                OnDelete::Archive => {}
            }
            remove_record(&record_path)
                .map_err(|e| CsiError::internal("removing the volume record", &e))
        })
    }

    /// ValidateVolumeCapabilities.
    pub fn validate(
        &self,
        req: &ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, CsiError> {
        let ia = CsiError::InvalidArgument;
        if req.volume_id.is_empty() {
            return Err(ia("volume_id is required".into()));
        }
        if req.volume_capabilities.is_empty() {
            return Err(ia("volume_capabilities is required".into()));
        }
        let secrets = VolumeSecrets::parse(&req.secrets).map_err(ia)?;
        let subdir = match req.volume_context.get(CONTEXT_SUBDIR) {
            Some(s) => normalize_subdir(s).map_err(ia)?,
            None if valid_volume_id(&req.volume_id) => format!("{VOLUMES_DIR}/{}", req.volume_id),
            None => {
                return Err(CsiError::NotFound(format!(
                    "volume {} does not exist",
                    req.volume_id
                )));
            }
        };
        let _op = self.ops.try_begin(&req.volume_id)?;
        let exists = self.with_volume_root(&secrets, |root| Ok(root.join(&subdir).is_dir()))?;
        if !exists {
            return Err(CsiError::NotFound(format!(
                "volume {} does not exist",
                req.volume_id
            )));
        }
        if let Err(message) = capabilities_ok(&req.volume_capabilities) {
            return Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            });
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context.clone(),
                volume_capabilities: req.volume_capabilities.clone(),
                parameters: req.parameters.clone(),
            }),
            message: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        assert_eq!(volume_id_for("pvc-1234"), "pvc-1234");
        let h = volume_id_for("a name/with slash");
        assert!(h.starts_with("h-") && valid_volume_id(&h));
        assert_eq!(h, volume_id_for("a name/with slash"));
        assert!(!valid_volume_id("../x") && !valid_volume_id(".hidden") && !valid_volume_id(""));
    }
}
