//! Exactly-once execution of the mutations the kernel may deliver twice.
//!
//! When a client process dies, the supervisor starts a successor on the same FUSE
//! connection and metadata session and writes FUSE_NOTIFY_RESEND: the kernel delivers again
//! every request the dead process had read and not answered, with bit 63 of `unique` set
//! ([`RESEND_BIT`]). The dead process may have committed such a request just before it died;
//! applying it again would answer `mkdir` with EEXIST, `unlink` with ENOENT, or link a file
//! twice.
//!
//! So a mutation that carries a [`RequestId`] stores, in the same transaction as its changes,
//! a small record of its outcome under (session, unique without bit 63). A resent request
//! first looks for its record: if it is there, the recorded outcome is returned and nothing
//! is applied (inode attributes in the answer are read again, so they are current). A request
//! without bit 63 never looks: it only adds its record. Only successful operations are
//! recorded: a failed one commits nothing, so running it again is running it once.
//!
//! Records are dropped with their session, and by [`super::MetaEngine::forget_requests`],
//! which the client calls for uniques that can no longer be resent (see `vfs::requests`).
//!
//! Record layout (little-endian), version 1:
//!
//! ```text
//! u8 version (1) | u8 kind | payload
//!   kind 0  done                    (setxattr, removexattr)
//!   kind 1  entry    u64 ino, attr  (mknod, link, setattr, fallocate: attr as types.rs)
//!   kind 2  removed  u64 ino, u8 kept
//!   kind 3  renamed, nothing replaced
//!   kind 4  renamed  u64 ino, u8 kept (the replaced target)
//! ```

use super::types::{Attr, Corrupt, Ino, SessionId};
use super::{Removed, Result, Tx};

/// Bit 63 of a FUSE `unique`: the kernel set it on a request it delivers again after
/// FUSE_NOTIFY_RESEND (`FUSE_UNIQUE_RESEND`).
pub const RESEND_BIT: u64 = 1 << 63;

/// A kernel request, as far as exactly-once execution needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// The metadata session of the mount (one FUSE connection has one session for its
    /// whole life, across client processes).
    pub sid: SessionId,
    /// The FUSE `unique` without [`RESEND_BIT`]: unique per connection.
    pub unique: u64,
    /// The kernel delivered it again: a process that died may have applied it.
    pub resent: bool,
}

impl RequestId {
    /// The id of a FUSE request of session `sid`, from its `unique` as the kernel sent it.
    pub fn from_fuse(sid: SessionId, unique: u64) -> Self {
        RequestId {
            sid,
            unique: unique & !RESEND_BIT,
            resent: unique & RESEND_BIT != 0,
        }
    }
}

const RECORD_V1: u8 = 1;
const KIND_DONE: u8 = 0;
const KIND_ENTRY: u8 = 1;
const KIND_REMOVED: u8 = 2;
const KIND_RENAMED_NONE: u8 = 3;
const KIND_RENAMED: u8 = 4;

const CORRUPT: Corrupt = Corrupt {
    what: "request record",
};

/// The outcome of a mutation, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Done,
    Entry(Ino, Attr),
    Removed(Removed),
    Renamed(Option<Removed>),
}

impl Outcome {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = vec![RECORD_V1];
        match self {
            Outcome::Done => b.push(KIND_DONE),
            Outcome::Entry(ino, attr) => {
                b.push(KIND_ENTRY);
                b.extend_from_slice(&ino.0.to_le_bytes());
                b.extend_from_slice(&attr.encode());
            }
            Outcome::Removed(r) => {
                b.push(KIND_REMOVED);
                put_removed(&mut b, r);
            }
            Outcome::Renamed(None) => b.push(KIND_RENAMED_NONE),
            Outcome::Renamed(Some(r)) => {
                b.push(KIND_RENAMED);
                put_removed(&mut b, r);
            }
        }
        b
    }

    pub(super) fn decode(b: &[u8]) -> Result<Self, Corrupt> {
        let [RECORD_V1, kind, rest @ ..] = b else {
            return Err(CORRUPT);
        };
        match (*kind, rest) {
            (KIND_DONE, []) => Ok(Outcome::Done),
            (KIND_ENTRY, rest) => {
                let (ino, attr) = rest.split_first_chunk::<8>().ok_or(CORRUPT)?;
                Ok(Outcome::Entry(
                    Ino(u64::from_le_bytes(*ino)),
                    Attr::decode(attr)?,
                ))
            }
            (KIND_REMOVED, rest) => Ok(Outcome::Removed(get_removed(rest)?)),
            (KIND_RENAMED_NONE, []) => Ok(Outcome::Renamed(None)),
            (KIND_RENAMED, rest) => Ok(Outcome::Renamed(Some(get_removed(rest)?))),
            _ => Err(CORRUPT),
        }
    }
}

fn put_removed(b: &mut Vec<u8>, r: &Removed) {
    b.extend_from_slice(&r.ino.0.to_le_bytes());
    b.push(u8::from(r.kept));
}

fn get_removed(b: &[u8]) -> Result<Removed, Corrupt> {
    let (ino, kept) = b.split_first_chunk::<8>().ok_or(CORRUPT)?;
    let kept = match kept {
        [0] => false,
        [1] => true,
        _ => return Err(CORRUPT),
    };
    Ok(Removed {
        ino: Ino(u64::from_le_bytes(*ino)),
        kept,
    })
}

/// What a mutation returns, convertible to and from its record.
pub(super) trait Recorded: Sized {
    fn outcome(&self) -> Outcome;
    /// The answer to a resent request from its record; `tx` reads what must be current.
    fn replay(outcome: Outcome, tx: &mut dyn Tx) -> Result<Self>;
}

impl Recorded for () {
    fn outcome(&self) -> Outcome {
        Outcome::Done
    }
    fn replay(outcome: Outcome, _tx: &mut dyn Tx) -> Result<Self> {
        match outcome {
            Outcome::Done => Ok(()),
            _ => Err(CORRUPT.into()),
        }
    }
}

impl Recorded for (Ino, Attr) {
    fn outcome(&self) -> Outcome {
        Outcome::Entry(self.0, self.1.clone())
    }
    /// The inode's current attributes; the recorded ones if it was removed since (the
    /// request did take effect, and something later undid it).
    fn replay(outcome: Outcome, tx: &mut dyn Tx) -> Result<Self> {
        match outcome {
            Outcome::Entry(ino, attr) => Ok((ino, tx.attr(ino)?.unwrap_or(attr))),
            _ => Err(CORRUPT.into()),
        }
    }
}

impl Recorded for Removed {
    fn outcome(&self) -> Outcome {
        Outcome::Removed(*self)
    }
    fn replay(outcome: Outcome, _tx: &mut dyn Tx) -> Result<Self> {
        match outcome {
            Outcome::Removed(r) => Ok(r),
            _ => Err(CORRUPT.into()),
        }
    }
}

impl Recorded for Option<Removed> {
    fn outcome(&self) -> Outcome {
        Outcome::Renamed(*self)
    }
    fn replay(outcome: Outcome, _tx: &mut dyn Tx) -> Result<Self> {
        match outcome {
            Outcome::Renamed(r) => Ok(r),
            _ => Err(CORRUPT.into()),
        }
    }
}

/// Runs mutation `f` inside transaction `tx` at most once for `req`: the recorded outcome
/// of a resent request that was applied, else `f`'s, recorded. Called first in the
/// transaction (the lookup is a point read, before any scan or write of `f`).
pub(super) fn apply<T: Recorded>(
    tx: &mut dyn Tx,
    req: Option<RequestId>,
    f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>,
) -> Result<T> {
    let Some(req) = req else { return f(tx) };
    if req.resent {
        if let Some(rec) = tx.request(req.sid, req.unique)? {
            tracing::debug!(session = %req.sid, unique = req.unique, "resent request was applied before: answered from its record");
            return T::replay(Outcome::decode(&rec)?, tx);
        }
    }
    let out = f(tx)?;
    tx.set_request(req.sid, req.unique, &out.outcome().encode())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{FileKind, Timestamp};

    #[test]
    fn resend_bit_is_split_off() {
        let r = RequestId::from_fuse(SessionId(3), RESEND_BIT | 42);
        assert_eq!(
            r,
            RequestId {
                sid: SessionId(3),
                unique: 42,
                resent: true
            }
        );
        let r = RequestId::from_fuse(SessionId(3), 42);
        assert_eq!(
            r,
            RequestId {
                sid: SessionId(3),
                unique: 42,
                resent: false
            }
        );
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_corrupt() {
        let attr = Attr::new(FileKind::Dir, 0o755, 1, 2, Timestamp(7));
        let all = [
            Outcome::Done,
            Outcome::Entry(Ino(9), attr),
            Outcome::Removed(Removed {
                ino: Ino(5),
                kept: true,
            }),
            Outcome::Renamed(None),
            Outcome::Renamed(Some(Removed {
                ino: Ino(6),
                kept: false,
            })),
        ];
        for o in all {
            let b = o.encode();
            assert_eq!(Outcome::decode(&b), Ok(o.clone()));
            // A cut record is refused, never misread.
            for n in 0..b.len() {
                assert!(Outcome::decode(&b[..n]).is_err(), "{o:?} cut at {n}");
            }
        }
        assert!(Outcome::decode(&[]).is_err());
        assert!(Outcome::decode(&[2, 0]).is_err());
        assert!(Outcome::decode(&[1, 9]).is_err());
        assert!(Outcome::decode(&[1, KIND_REMOVED, 1, 0, 0, 0, 0, 0, 0, 0, 2]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let _ = Outcome::decode(&b);
        }
    }
}
