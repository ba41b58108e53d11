//! The changes to a client's state since a base it exported while serving.
//!
//! A live upgrade between two clients that announce `state-delta` moves the bulk of the
//! state before the freeze: the old client exports a whole state (the *base*) in answer
//! to `PreExport` while it serves, and from then on records which inodes and handles
//! change. Inside the freeze it exports only those changes, a [`StateDelta`], which the
//! successor applies to the base it staged meanwhile. The pause then depends on what
//! changed during the upgrade, not on how many inodes the kernel caches.
//!
//! A delta is versioned with the state schema: `StateDelta::V1` goes with
//! `ClientState::V1`. Like the state, a released version never changes.

use std::collections::{HashMap, HashSet};

use super::{ClientStateV1, StateError};
use crate::codec::{Decode, Encode};
use crate::state::v1::{DirHandleV1, FileHandleV1};

/// What changed since the base, schema v1. Each table is replaced by key; the small
/// sets are whole.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct StateDeltaV1 {
    /// Generation of the client that exported the base and this delta.
    pub generation: u64,
    /// The mount's metadata session (the base's).
    pub session: u64,
    /// Inodes whose lookup count changed since the base: (inode, count now); 0 means the
    /// kernel holds no reference any more.
    pub lookups: Vec<(u64, u64)>,
    /// Files opened since the base, or whose lock owners changed: each replaces the
    /// base's entry with the same `fh`, or is added.
    pub files: Vec<FileHandleV1>,
    /// Directories opened since the base.
    pub dirs: Vec<DirHandleV1>,
    /// Handles closed since the base (a number the base does not have is ignored: the
    /// handle was opened and closed in between).
    pub closed: Vec<u64>,
    /// Inodes unlinked while open here, whole.
    pub orphans: Vec<u64>,
    /// Next value of the handle counter.
    pub next_handle: u32,
}

/// Changes since a base, in one of the state schema versions.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum StateDelta {
    V1(StateDeltaV1),
}

impl StateDelta {
    /// The state schema version this delta applies to.
    pub fn version(&self) -> u16 {
        match self {
            StateDelta::V1(_) => 1,
        }
    }

    /// The delta in the newest schema this build knows.
    pub fn into_latest(self) -> StateDeltaV1 {
        match self {
            StateDelta::V1(d) => d,
        }
    }

    /// The delta in schema `version`, for a successor that reads only that one.
    pub fn export_as(latest: StateDeltaV1, version: u16) -> Result<StateDelta, StateError> {
        match version {
            1 => Ok(StateDelta::V1(latest)),
            v => Err(StateError::UnsupportedVersion(v)),
        }
    }
}

impl StateDeltaV1 {
    /// Checks that this delta belongs to `base` (same exporter, same session).
    pub fn check_base(&self, base: &ClientStateV1) -> Result<(), StateError> {
        if self.generation != base.generation || self.session != base.session {
            return Err(StateError::OtherBase {
                base: (base.generation, base.session),
                delta: (self.generation, self.session),
            });
        }
        Ok(())
    }

    /// Makes `base` the whole state: the base with these changes (what a restart from a
    /// kept state needs). Lookups and handles come out sorted, as an export writes them.
    /// Nothing changes if the delta is of another base.
    pub fn apply(&self, base: &mut ClientStateV1) -> Result<(), StateError> {
        self.check_base(base)?;
        let mut lookups: HashMap<u64, u64> = base.lookups.drain(..).collect();
        for &(ino, n) in &self.lookups {
            if n == 0 {
                lookups.remove(&ino);
            } else {
                lookups.insert(ino, n);
            }
        }
        base.lookups = lookups.into_iter().collect();
        base.lookups.sort_unstable();

        let closed: HashSet<u64> = self.closed.iter().copied().collect();
        let replaced: HashSet<u64> = self.files.iter().map(|f| f.fh).collect();
        base.files
            .retain(|f| !closed.contains(&f.fh) && !replaced.contains(&f.fh));
        base.files.extend(self.files.iter().cloned());
        base.files.sort_unstable_by_key(|f| f.fh);
        let replaced: HashSet<u64> = self.dirs.iter().map(|d| d.fh).collect();
        base.dirs
            .retain(|d| !closed.contains(&d.fh) && !replaced.contains(&d.fh));
        base.dirs.extend(self.dirs.iter().cloned());
        base.dirs.sort_unstable_by_key(|d| d.fh);

        base.orphans = self.orphans.clone();
        base.next_handle = self.next_handle;
        Ok(())
    }
}
