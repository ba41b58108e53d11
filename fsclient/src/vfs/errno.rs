//! Filesystem errors and the one place they become errno values.

use crate::data::DataError;
use crate::meta::MetaError;

/// An error of a filesystem operation.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("metadata operation failed")]
    Meta(#[from] MetaError),
    #[error("data operation failed")]
    Data(#[from] DataError),
    /// A POSIX outcome decided by the filesystem layer itself (ERANGE for a short xattr
    /// buffer, EBADF for a write on a read-only handle...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Posix(i32),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Meta(e) => meta_errno(e),
            FsError::Data(e) => data_errno(e),
            FsError::Posix(n) => *n,
        }
    }

    /// Whether this is an expected POSIX outcome rather than a failure worth logging.
    pub fn is_posix(&self) -> bool {
        match self {
            FsError::Meta(e) => e.is_posix(),
            FsError::Data(e) => data_errno(e) != libc::EIO,
            FsError::Posix(_) => true,
        }
    }
}

pub fn meta_errno(e: &MetaError) -> i32 {
    match e {
        MetaError::NotFound => libc::ENOENT,
        MetaError::Exists => libc::EEXIST,
        MetaError::NotDir => libc::ENOTDIR,
        MetaError::IsDir => libc::EISDIR,
        MetaError::NotEmpty => libc::ENOTEMPTY,
        MetaError::Invalid => libc::EINVAL,
        MetaError::NameTooLong => libc::ENAMETOOLONG,
        MetaError::NoXattr => libc::ENODATA,
        MetaError::TooManyLinks => libc::EMLINK,
        MetaError::NotPermitted => libc::EPERM,
        MetaError::WouldBlock => libc::EAGAIN,
        MetaError::NoSpace => libc::ENOSPC,
        MetaError::FileTooBig => libc::EFBIG,
        MetaError::NotSupported => libc::EOPNOTSUPP,
        MetaError::NotFormatted
        | MetaError::AlreadyFormatted { .. }
        | MetaError::BadUrl { .. }
        | MetaError::Open { .. }
        | MetaError::Backend { .. }
        | MetaError::Corrupt(_)
        | MetaError::Conflict(_)
        | MetaError::ReadOnly => libc::EIO,
    }
}

fn data_errno(e: &DataError) -> i32 {
    // A metadata error inside the data path (e.g. the capacity quota while committing a
    // slice) keeps its own errno.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(m) = s.downcast_ref::<MetaError>() {
            return meta_errno(m);
        }
        source = s.source();
    }
    libc::EIO
}
