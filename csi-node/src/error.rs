//! The one place where failures become CSI (gRPC) status codes.
//!
//! Every message here may reach the CO's logs and events: it names volumes, paths and
//! steps, never a secret (metadata URLs and credentials stay out of every message).

use tonic::{Code, Status};

/// A CSI call failed; the variant is the gRPC code the spec asks for.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a value is malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or its directory) does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Published/created already, with incompatible arguments (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// Another operation on the same volume is in progress (ABORTED).
    #[error("{0}")]
    Aborted(String),
    /// The requested capacity cannot be honoured (OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
    /// The node is not in a state to do it (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The mount did not come up in time (DEADLINE_EXCEEDED); the CO retries.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Everything else (INTERNAL): the message says which step failed and why.
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    /// An INTERNAL error for `step`, with the chain of causes of `err`.
    pub fn internal(step: &str, err: &(dyn std::error::Error + 'static)) -> CsiError {
        CsiError::Internal(format!("{step}: {}", chain(err)))
    }

    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CsiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// `err` and its sources, joined with ": ".
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
