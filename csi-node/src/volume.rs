//! What a CSI request asks for, validated: the Baton volume (from the secrets), the mount
//! options (from the capability's mount flags), the subdirectory (from the volume
//! context), and the backend they make.
//!
//! A *backend* is one Baton mount on a node: every CSI volume with the same metadata URL
//! and the same mount options shares it (each publish is a bind mount of a subdirectory).
//! Its id is a hash, so the metadata URL, which may hold a password, never appears in a
//! path, a pod name or a log.

use std::collections::HashMap;
use std::fmt;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layout::hex;
use crate::proto::{VolumeCapability, volume_capability};

/// Secret key: the volume's metadata URL (required).
pub const SECRET_META_URL: &str = "metaurl";
/// Secret key: the volume name, to format the volume on first use (with `storage`).
pub const SECRET_NAME: &str = "name";
/// Secret key: the object storage URL, to format the volume on first use.
pub const SECRET_STORAGE: &str = "storage";
/// Volume context key: the directory of the Baton volume to publish.
pub const CONTEXT_SUBDIR: &str = "subdir";

/// Identifies a backend: 20 hex digits of a hash of the metadata URL and mount options.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendId(String);

impl BackendId {
    const LEN: usize = 20;

    pub fn from_hex(s: &str) -> Option<BackendId> {
        (s.len() == Self::LEN
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| BackendId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for BackendId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        BackendId::from_hex(&s).ok_or_else(|| format!("invalid backend id {s:?}"))
    }
}

impl From<BackendId> for String {
    fn from(b: BackendId) -> String {
        b.0
    }
}

/// The credentials of a Baton volume, from CSI secrets. Debug shows no value.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeSecrets {
    pub meta_url: String,
    /// `(name, storage URL)`: format the volume if it is not formatted yet.
    pub format: Option<(String, String)>,
    /// Environment for `baton` (e.g. `AWS_ACCESS_KEY_ID`), from upper-case secret keys.
    pub env: Vec<(String, String)>,
}

impl fmt::Debug for VolumeSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VolumeSecrets")
            .field("meta_url", &"<redacted>")
            .field("format", &self.format.as_ref().map(|(n, _)| n))
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

/// Whether `k` is usable as an environment variable for `baton` (`AWS_REGION`, ...).
fn is_env_key(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_uppercase())
        && b.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

impl VolumeSecrets {
    /// Reads the secrets of a request. Errors name keys, never values.
    pub fn parse(secrets: &HashMap<String, String>) -> Result<VolumeSecrets, String> {
        let meta_url = secrets
            .get(SECRET_META_URL)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "the secret key {SECRET_META_URL:?} (the volume's metadata URL) is required"
                )
            })?
            .trim()
            .to_string();
        if !(meta_url.starts_with("redis://")
            || meta_url.starts_with("rediss://")
            || meta_url.starts_with("redb://"))
        {
            return Err(format!(
                "the secret {SECRET_META_URL:?} is not a redis:// or redb:// URL"
            ));
        }
        let format = match (secrets.get(SECRET_NAME), secrets.get(SECRET_STORAGE)) {
            (Some(n), Some(s)) if !n.is_empty() && !s.is_empty() => Some((n.clone(), s.clone())),
            (None, None) => None,
            (Some(n), None) if !n.is_empty() => None,
            _ => {
                return Err(format!(
                    "the secret keys {SECRET_NAME:?} and {SECRET_STORAGE:?} (format on first use) go together"
                ));
            }
        };
        let mut env: Vec<(String, String)> = secrets
            .iter()
            .filter(|(k, _)| is_env_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.sort();
        Ok(VolumeSecrets {
            meta_url,
            format,
            env,
        })
    }
}

/// Options of `baton mount` that a PV or StorageClass may set through `mountOptions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `(flag, value)` pairs in a fixed order, e.g. `("--attr-cache", "2")`.
    args: Vec<(&'static str, String)>,
    /// `--no-resend`.
    no_resend: bool,
}

impl MountOptions {
    /// The `baton mount` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .args
            .iter()
            .flat_map(|(k, v)| [k.to_string(), v.clone()])
            .collect();
        if self.no_resend {
            out.push("--no-resend".into());
        }
        out
    }
}

/// What the mount flags of a capability ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    pub options: MountOptions,
    /// `ro` was among the flags.
    pub readonly: bool,
}

/// Parses `mountOptions`: `ro`, `rw`, `attr-cache=SECS`, `entry-cache=SECS`,
/// `cache-size=MIB`, `threads=N`, `no-resend` (behave as on a kernel without
/// FUSE_NOTIFY_RESEND: `baton mount --no-resend`).
pub fn parse_mount_flags(flags: &[String]) -> Result<MountFlags, String> {
    const KNOWN: [(&str, &str, bool); 4] = [
        ("attr-cache", "--attr-cache", true),
        ("entry-cache", "--entry-cache", true),
        ("cache-size", "--cache-size", false),
        ("threads", "--threads", false),
    ];
    let mut out = MountFlags::default();
    let mut values: Vec<Option<String>> = vec![None; KNOWN.len()];
    for flag in flags
        .iter()
        .flat_map(|f| f.split(','))
        .map(str::trim)
        .filter(|f| !f.is_empty())
    {
        match flag {
            "ro" => out.readonly = true,
            "rw" | "defaults" => {}
            "no-resend" => out.options.no_resend = true,
            _ => {
                let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
                let Some(i) = KNOWN.iter().position(|(name, _, _)| *name == k) else {
                    return Err(format!(
                        "unknown mount option {k:?} (known: ro, attr-cache=SECS, entry-cache=SECS, cache-size=MIB, threads=N, no-resend)"
                    ));
                };
                let ok = if KNOWN[i].2 {
                    v.parse::<f64>().is_ok_and(|x| x.is_finite() && x >= 0.0)
                } else {
                    v.parse::<u64>().is_ok_and(|x| x > 0)
                };
                if !ok {
                    return Err(format!("invalid value {v:?} for mount option {k:?}"));
                }
                values[i] = Some(v.to_string());
            }
        }
    }
    for (i, v) in values.into_iter().enumerate() {
        if let Some(v) = v {
            out.options.args.push((KNOWN[i].1, v));
        }
    }
    Ok(out)
}

/// A backend to mount: the volume and how.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    pub id: BackendId,
    pub secrets: VolumeSecrets,
    pub options: MountOptions,
}

impl BackendSpec {
    pub fn new(secrets: VolumeSecrets, options: MountOptions) -> BackendSpec {
        let mut h = Sha256::new();
        h.update(b"baton-csi backend v1\0");
        h.update(secrets.meta_url.as_bytes());
        for a in options.args() {
            h.update(b"\0");
            h.update(a.as_bytes());
        }
        let id = BackendId(hex(&h.finalize()[..BackendId::LEN / 2]));
        BackendSpec {
            id,
            secrets,
            options,
        }
    }
}

/// Normalizes a subdirectory of the volume: relative, no `.`/`..`, no empty components.
/// `""` or `"/"` is the whole volume.
pub fn normalize_subdir(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("the subdirectory contains a NUL byte".into());
    }
    let mut parts = Vec::new();
    for c in Path::new(s).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("the subdirectory {s:?} must not contain '..'"));
            }
        }
    }
    Ok(parts.join("/"))
}

/// The access mode of a capability, checked: a filesystem (mount) capability with a known
/// mode. Returns the mode and whether it only allows reading.
pub fn check_capability(cap: &VolumeCapability) -> Result<(i32, bool), String> {
    use crate::proto::volume_capability::access_mode::Mode;
    match &cap.access_type {
        Some(volume_capability::AccessType::Mount(_)) => {}
        Some(volume_capability::AccessType::Block(_)) => {
            return Err("block access is not supported: Baton volumes are filesystems".into());
        }
        None => return Err("the volume capability has no access type (mount or block)".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or("the volume capability has no access mode")?
        .mode;
    let readonly = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly) => true,
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter,
        ) => false,
        Ok(Mode::Unknown) | Err(_) => return Err(format!("unsupported access mode {mode}")),
    };
    Ok((mode, readonly))
}

/// The mount part of a capability (fs type, flags); empty for others.
pub fn mount_part(cap: &VolumeCapability) -> (String, Vec<String>) {
    match &cap.access_type {
        Some(volume_capability::AccessType::Mount(m)) => (m.fs_type.clone(), m.mount_flags.clone()),
        _ => (String::new(), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn secrets_need_a_meta_url_and_never_show_it() {
        assert!(VolumeSecrets::parse(&secrets(&[])).is_err());
        let err = VolumeSecrets::parse(&secrets(&[("metaurl", "http://pw@x")])).unwrap_err();
        assert!(!err.contains("pw@x"));
        let s = VolumeSecrets::parse(&secrets(&[
            ("metaurl", "redis://:pw@h:6379/1"),
            ("AWS_SECRET_ACCESS_KEY", "k"),
            ("lowercase", "ignored"),
        ]))
        .expect("valid");
        assert_eq!(
            s.env,
            vec![("AWS_SECRET_ACCESS_KEY".to_string(), "k".to_string())]
        );
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("pw") && !dbg.contains("\"k\""), "{dbg}");
        assert!(
            VolumeSecrets::parse(&secrets(&[
                ("metaurl", "redb:///x"),
                ("storage", "fs:///d")
            ]))
            .is_err()
        );
    }

    #[test]
    fn mount_flags() {
        let f = parse_mount_flags(&["ro,attr-cache=2".into(), "threads=8".into()]).expect("valid");
        assert!(f.readonly);
        assert_eq!(f.options.args(), ["--attr-cache", "2", "--threads", "8"]);
        let nr = parse_mount_flags(&["no-resend,threads=2".into()]).expect("valid");
        assert_eq!(nr.options.args(), ["--threads", "2", "--no-resend"]);
        assert!(parse_mount_flags(&["exec".into()]).is_err());
        assert!(parse_mount_flags(&["threads=-1".into()]).is_err());
        assert!(parse_mount_flags(&["attr-cache=x".into()]).is_err());
        // The order of the flags does not change the backend.
        let a = parse_mount_flags(&["threads=8".into(), "attr-cache=2".into()]).expect("valid");
        assert_eq!(a.options, f.options);
    }

    #[test]
    fn backend_ids_depend_on_url_and_options_only() {
        let s1 = VolumeSecrets::parse(&secrets(&[("metaurl", "redis://h/1")])).expect("valid");
        let s2 = VolumeSecrets::parse(&secrets(&[("metaurl", "redis://h/2")])).expect("valid");
        let o = parse_mount_flags(&["threads=4".into()])
            .expect("valid")
            .options;
        let a = BackendSpec::new(s1.clone(), MountOptions::default());
        assert_eq!(
            a.id,
            BackendSpec::new(s1.clone(), MountOptions::default()).id
        );
        assert_ne!(a.id, BackendSpec::new(s2, MountOptions::default()).id);
        assert_ne!(a.id, BackendSpec::new(s1, o).id);
        assert!(BackendId::from_hex(a.id.as_str()).is_some());
        assert!(!a.id.as_str().contains("redis"));
    }

    #[test]
    fn subdirs() {
        assert_eq!(normalize_subdir("").as_deref(), Ok(""));
        assert_eq!(normalize_subdir("/").as_deref(), Ok(""));
        assert_eq!(normalize_subdir("/a//b/./c/").as_deref(), Ok("a/b/c"));
        assert!(normalize_subdir("a/../b").is_err());
    }
}
