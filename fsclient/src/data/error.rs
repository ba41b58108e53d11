//! Errors of the data path: one enum for opening it, one for its I/O.
//!
//! The filesystem layer maps these to errno in one place; the variants only have to be
//! distinguishable (a quota's ENOSPC stays a [`MetaError`] inside [`DataError::Meta`]).
//! Never put a credential in a message: the storage URLs held here are redacted.

use std::path::PathBuf;
use std::sync::Arc;

use crate::meta::{Ino, MetaError};

use super::store::{CheckError, StoreOpenError};

/// Why [`super::DataStore::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid object storage URL")]
    StorageUrl(#[source] Box<StoreOpenError>),
    #[error("object storage {url} failed the startup check")]
    StorageCheck {
        url: String,
        #[source]
        source: Box<CheckError>,
    },
    #[error("cannot open the block cache directory {dir}")]
    CacheDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the volume's block size {0} is not a power of two between 64 KiB and 16 MiB")]
    BlockSize(u32),
}

/// A failure of a data operation (write, flush, read, garbage collection).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("write past the largest file size")]
    FileTooBig,
    #[error("uploading block {key} of inode {ino} failed")]
    Upload {
        ino: Ino,
        key: String,
        #[source]
        source: Arc<opendal::Error>,
    },
    #[error("the write buffer is full and flushing inode {ino} to make room failed")]
    BufferFull {
        ino: Ino,
        #[source]
        source: Box<DataError>,
    },
    #[error("the write journal is full and flushing inode {ino} to make room failed")]
    JournalFull {
        ino: Ino,
        #[source]
        source: Box<DataError>,
    },
    #[error("downloading block {key} failed")]
    Download {
        key: String,
        #[source]
        source: Arc<opendal::Error>,
    },
    #[error("block {key} holds {got} bytes, expected {expected}")]
    CorruptBlock {
        key: String,
        expected: usize,
        got: usize,
    },
    #[error("deleting block {key} failed")]
    Delete {
        key: String,
        #[source]
        source: opendal::Error,
    },
    #[error("metadata operation {op} failed")]
    Meta {
        op: &'static str,
        #[source]
        source: MetaError,
    },
    #[error("a background data task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl DataError {
    pub(crate) fn meta(op: &'static str) -> impl FnOnce(MetaError) -> DataError {
        move |source| DataError::Meta { op, source }
    }
}
