//! `baton format`: write a volume's settings into its metadata engine.

use std::path::PathBuf;

use fsclient::data::redact;
use fsclient::meta::{self, Format, MetaError, Timestamp};

use crate::home::Home;

/// What to format.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub name: String,
    /// Metadata URL; `None`: `redb://$BATON_HOME/NAME/meta.redb`.
    pub meta: Option<String>,
    /// Storage URL; `None`: `fs://$BATON_HOME/NAME/data`.
    pub storage: Option<String>,
    pub block_size: u64,
    /// Bytes reported by statfs; 0 = unlimited.
    pub capacity: u64,
    /// Inode limit; 0 = unlimited.
    pub inodes: u64,
    /// Update the settings of an existing volume (its data is kept).
    pub force: bool,
}

/// `baton format` failed.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "invalid volume name {0:?}: use 1-63 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    #[error(
        "invalid block size {0}: a power of two from {min} to {max}",
        min = Format::MIN_BLOCK_SIZE,
        max = Format::MAX_BLOCK_SIZE
    )]
    BadBlockSize(u64),
    #[error("invalid storage URL {url:?}")]
    BadStorageUrl {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("cannot create the storage directory {path}")]
    StorageDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the metadata engine at {url}")]
    OpenMeta {
        url: String,
        #[source]
        source: MetaError,
    },
    #[error(
        "volume {existing:?} is already formatted at {url} (use --force to update its settings)"
    )]
    AlreadyFormatted { url: String, existing: String },
    #[error("cannot write the volume settings")]
    Write(#[source] MetaError),
}

/// Whether `name` is usable as a volume name (and as a directory name under the home).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Parses a size: bytes, or with a binary suffix `K`, `M`, `G`, `T` (also `KiB`, `MB`...:
/// all binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(format!("invalid size unit in {s:?} (use K, M, G, T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A new random UUID (version 4) for a volume.
fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Formats a volume; returns the settings written.
pub fn format(home: &Home, opts: &FormatOptions) -> Result<Format, FormatError> {
    if !valid_name(&opts.name) {
        return Err(FormatError::BadName(opts.name.clone()));
    }
    let block_size = u32::try_from(opts.block_size)
        .ok()
        .filter(|b| {
            b.is_power_of_two() && (Format::MIN_BLOCK_SIZE..=Format::MAX_BLOCK_SIZE).contains(b)
        })
        .ok_or(FormatError::BadBlockSize(opts.block_size))?;
    let meta_url = opts
        .meta
        .clone()
        .unwrap_or_else(|| home.default_meta_url(&opts.name));
    let storage = opts
        .storage
        .clone()
        .unwrap_or_else(|| home.default_storage_url(&opts.name));
    let parsed = url::Url::parse(&storage).map_err(|source| FormatError::BadStorageUrl {
        url: redact(&storage),
        source,
    })?;
    if parsed.scheme() == "fs" && !parsed.path().is_empty() {
        let path = PathBuf::from(parsed.path());
        std::fs::create_dir_all(&path)
            .map_err(|source| FormatError::StorageDir { path, source })?;
    }

    let engine = meta::open(&meta_url).map_err(|source| FormatError::OpenMeta {
        url: redact(&meta_url),
        source,
    })?;
    let format = Format {
        name: opts.name.clone(),
        uuid: new_uuid(),
        storage,
        block_size,
        capacity: opts.capacity,
        inodes: opts.inodes,
        created: Timestamp::now(),
    };
    // A forced format keeps the volume's identity.
    let format = match (opts.force, engine.load_format()) {
        (true, Ok(old)) => Format {
            uuid: old.uuid,
            created: old.created,
            ..format
        },
        _ => format,
    };
    match engine.format(&format, opts.force) {
        Ok(()) => {}
        Err(MetaError::AlreadyFormatted { name }) => {
            return Err(FormatError::AlreadyFormatted {
                url: redact(&meta_url),
                existing: name,
            });
        }
        Err(e) => return Err(FormatError::Write(e)),
    }
    tracing::info!(name = %format.name, uuid = %format.uuid, meta = %redact(&meta_url), storage = %redact(&format.storage), "volume formatted");
    Ok(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("default"));
        assert!(valid_name("vol-1.a_b"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(64)));
    }

    #[test]
    fn formats_an_embedded_volume_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path().to_path_buf());
        let opts = FormatOptions {
            name: "v1".into(),
            meta: None,
            storage: None,
            block_size: 4 << 20,
            capacity: 0,
            inodes: 0,
            force: false,
        };
        let f = format(&home, &opts).expect("format");
        assert_eq!(f.block_size, 4 << 20);
        assert!(dir.path().join("v1/data").is_dir());
        assert!(dir.path().join("v1/meta.redb").is_file());
        assert!(matches!(
            format(&home, &opts),
            Err(FormatError::AlreadyFormatted { .. })
        ));
        let again = format(
            &home,
            &FormatOptions {
                force: true,
                capacity: 1 << 30,
                ..opts.clone()
            },
        )
        .expect("forced format");
        assert_eq!(again.uuid, f.uuid);
        assert_eq!(again.capacity, 1 << 30);
        assert!(matches!(
            format(
                &home,
                &FormatOptions {
                    block_size: 3000,
                    ..opts
                }
            ),
            Err(FormatError::BadBlockSize(3000))
        ));
    }
}
