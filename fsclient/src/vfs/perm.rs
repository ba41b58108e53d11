//! POSIX permission rules as small pure functions.
//!
//! The mount uses `default_permissions`, so the kernel checks permissions before it sends
//! most requests. These rules serve `access(2)` when the kernel asks, and the checks the
//! kernel cannot do for a FUSE filesystem.

use crate::meta::{Attr, Caller};

/// Requested access bits, as in access(2).
pub const R_OK: u32 = 4;
pub const W_OK: u32 = 2;
pub const X_OK: u32 = 1;

/// Whether `caller` (with supplementary groups `groups`) may access `attr` with `mask`
/// (a combination of R_OK, W_OK, X_OK; 0 checks existence only).
pub fn may_access(attr: &Attr, caller: Caller, groups: &[u32], mask: u32) -> bool {
    let mask = mask & 7;
    if mask == 0 {
        return true;
    }
    let perm = u32::from(attr.perm);
    if caller.uid == 0 {
        // Root may do anything, except execute a file no one may execute.
        return mask & X_OK == 0 || attr.kind == crate::meta::FileKind::Dir || perm & 0o111 != 0;
    }
    let bits = if caller.uid == attr.uid {
        (perm >> 6) & 7
    } else if caller.gid == attr.gid || groups.contains(&attr.gid) {
        (perm >> 3) & 7
    } else {
        perm & 7
    };
    bits & mask == mask
}

/// The supplementary groups of a process, from /proc (empty if it is gone).
pub fn process_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{FileKind, Timestamp};

    fn attr(kind: FileKind, perm: u16, uid: u32, gid: u32) -> Attr {
        Attr::new(kind, perm, uid, gid, Timestamp(0))
    }

    fn who(uid: u32, gid: u32) -> Caller {
        Caller { uid, gid, pid: 1 }
    }

    #[test]
    fn owner_group_other() {
        let a = attr(FileKind::File, 0o640, 10, 20);
        assert!(may_access(&a, who(10, 99), &[], R_OK | W_OK));
        assert!(!may_access(&a, who(10, 99), &[], X_OK));
        assert!(may_access(&a, who(11, 20), &[], R_OK));
        assert!(!may_access(&a, who(11, 20), &[], W_OK));
        assert!(may_access(&a, who(11, 5), &[20], R_OK));
        assert!(!may_access(&a, who(11, 5), &[], R_OK));
        assert!(may_access(&a, who(11, 5), &[], 0));
        // The owner class decides even when "other" would allow more.
        let b = attr(FileKind::File, 0o007, 10, 20);
        assert!(!may_access(&b, who(10, 20), &[], R_OK));
    }

    #[test]
    fn root() {
        let a = attr(FileKind::File, 0o000, 10, 20);
        assert!(may_access(&a, Caller::ROOT, &[], R_OK | W_OK));
        assert!(!may_access(&a, Caller::ROOT, &[], X_OK));
        let d = attr(FileKind::Dir, 0o000, 10, 20);
        assert!(may_access(&d, Caller::ROOT, &[], X_OK));
    }
}
