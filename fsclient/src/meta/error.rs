//! Errors of metadata operations.

use super::types::Corrupt;

/// An error of a metadata operation. The POSIX outcomes map to one errno each
/// (see `vfs::errno`); the rest are failures of the engine itself (EIO).
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("too many links")]
    TooManyLinks,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("a conflicting lock is held")]
    WouldBlock,
    #[error("volume is full (capacity or inode limit)")]
    NoSpace,
    #[error("file too large")]
    FileTooBig,
    #[error("operation not supported")]
    NotSupported,
    #[error("volume is not formatted (run `baton format`)")]
    NotFormatted,
    #[error("volume is already formatted (name {name:?})")]
    AlreadyFormatted { name: String },
    #[error("bad metadata URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot open metadata engine at {target}")]
    Open {
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("metadata engine {backend} failed")]
    Backend {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("metadata engine holds a corrupt record")]
    Corrupt(#[from] Corrupt),
    #[error("transaction kept conflicting after {0} attempts")]
    Conflict(u32),
    #[error("write attempted in a read-only transaction")]
    ReadOnly,
}

impl MetaError {
    /// Whether this error is a POSIX outcome of the request (as opposed to a failure of
    /// the engine, which is logged).
    pub fn is_posix(&self) -> bool {
        matches!(
            self,
            MetaError::NotFound
                | MetaError::Exists
                | MetaError::NotDir
                | MetaError::IsDir
                | MetaError::NotEmpty
                | MetaError::Invalid
                | MetaError::NameTooLong
                | MetaError::NoXattr
                | MetaError::TooManyLinks
                | MetaError::NotPermitted
                | MetaError::WouldBlock
                | MetaError::NoSpace
                | MetaError::FileTooBig
                | MetaError::NotSupported
        )
    }
}
