//! The two pure decisions of a handover: what the old and the new client have in common
//! (EdenFS-style intersection of their `Hello`s), and whether the successor's INIT reply
//! is the one the kernel already has.

use std::fmt::Write as _;

use handover_proto::fuse_init::InitReply;
use handover_proto::message::{FreezeMode, Hello, capability};

/// The old and the new client cannot hand over to each other.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "capability mismatch: the new client cannot take over a live connection (it announces {new:?})"
    )]
    NoTakeover { new: Vec<String> },
    #[error(
        "state version mismatch: no common state schema version (old client supports {old:?}, new client {new:?})"
    )]
    NoCommonStateVersion { old: Vec<u16>, new: Vec<u16> },
    #[error(
        "capability mismatch: no common freeze mode (old client announces {old:?}, new client {new:?}; {why})"
    )]
    NoCommonMode {
        old: Vec<String>,
        new: Vec<String>,
        why: &'static str,
    },
}

/// What a handover from `old` to `new` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    pub mode: FreezeMode,
    /// The newest state schema version both support.
    pub state_version: u16,
    /// Both announce [`capability::STATE_DELTA`]: the old client exports its state before
    /// the freeze (`PreExport`) and only the changes since inside it.
    pub delta: bool,
}

fn has(h: &Hello, cap: &str) -> bool {
    h.capabilities.iter().any(|c| c == cap)
}

/// Intersects the two clients' hellos: the newest common state version, and resend mode
/// when resend is in use (`resend`: the kernel offered FUSE_HAS_RESEND and the mount was
/// not made with `--no-resend`), both can park, and drain was not forced; drain mode when
/// both can drain — DrainLog when resend is not in use, the supervisor holds a request log
/// (`request_log`) and both can use it (a successor answers from the log only when nothing
/// is resent, so a drain forced where resend is in use stays a plain drain); otherwise no
/// handover.
pub fn negotiate(
    old: &Hello,
    new: &Hello,
    resend: bool,
    force_drain: bool,
    request_log: bool,
) -> Result<Agreement, Mismatch> {
    if !has(new, capability::TAKEOVER) {
        return Err(Mismatch::NoTakeover {
            new: new.capabilities.clone(),
        });
    }
    let state_version = old
        .state_versions
        .iter()
        .filter(|v| new.state_versions.contains(v))
        .max()
        .copied()
        .ok_or_else(|| Mismatch::NoCommonStateVersion {
            old: old.state_versions.clone(),
            new: new.state_versions.clone(),
        })?;
    let both = |cap| has(old, cap) && has(new, cap);
    let mode = if resend && !force_drain && both(capability::PARK_RESEND) {
        FreezeMode::Resend
    } else if both(capability::DRAIN) {
        if !resend && request_log && both(capability::REQUEST_LOG) {
            FreezeMode::DrainLog
        } else {
            FreezeMode::Drain
        }
    } else {
        let why = if force_drain {
            "drain was forced"
        } else if !resend {
            "resend is not in use (the kernel does not offer it, or --no-resend)"
        } else {
            "neither park-resend nor drain on both sides"
        };
        return Err(Mismatch::NoCommonMode {
            old: old.capabilities.clone(),
            new: new.capabilities.clone(),
            why,
        });
    };
    Ok(Agreement {
        mode,
        state_version,
        delta: both(capability::STATE_DELTA),
    })
}

/// Checks that a successor's INIT reply is byte-identical to the reply the kernel got at
/// the first mount; the error names what differs, for the operator.
pub fn compare_init_reply(saved: &[u8], got: &[u8], unique: u64) -> Result<(), String> {
    if saved == got {
        return Ok(());
    }
    let (a, b) = match (
        InitReply::parse(saved, unique),
        InitReply::parse(got, unique),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (_, Err(e)) => return Err(format!("the new client's INIT reply is unusable: {e}")),
        (Err(e), _) => return Err(format!("the saved INIT reply is unusable: {e}")),
    };
    let mut diff = String::new();
    let mut field = |name: &str, x: u64, y: u64| {
        if x != y {
            let sep = if diff.is_empty() { "" } else { ", " };
            let _ = write!(diff, "{sep}{name} {y} instead of {x}");
        }
    };
    field("minor", a.minor.into(), b.minor.into());
    field(
        "max_readahead",
        a.max_readahead.into(),
        b.max_readahead.into(),
    );
    field(
        "max_background",
        a.max_background.into(),
        b.max_background.into(),
    );
    field(
        "congestion_threshold",
        a.congestion_threshold.into(),
        b.congestion_threshold.into(),
    );
    field("max_write", a.max_write.into(), b.max_write.into());
    field("time_gran", a.time_gran.into(), b.time_gran.into());
    field("max_pages", a.max_pages.into(), b.max_pages.into());
    if a.flags != b.flags {
        let sep = if diff.is_empty() { "" } else { ", " };
        let _ = write!(diff, "{sep}flags {:#x} instead of {:#x}", b.flags, a.flags);
    }
    if diff.is_empty() {
        diff = format!(
            "{} bytes differ from the saved {}-byte reply",
            got.len(),
            saved.len()
        );
    }
    Err(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(versions: &[u16], caps: &[&str]) -> Hello {
        Hello {
            state_versions: versions.to_vec(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
        }
    }

    const ALL: &[&str] = &[
        capability::PARK_RESEND,
        capability::DRAIN,
        capability::TAKEOVER,
    ];

    #[test]
    fn newest_common_version_and_resend_when_possible() {
        let a = negotiate(
            &hello(&[1, 2, 3], ALL),
            &hello(&[2, 3, 4], ALL),
            true,
            false,
            true,
        );
        assert_eq!(
            a,
            Ok(Agreement {
                mode: FreezeMode::Resend,
                state_version: 3,
                delta: false,
            })
        );
    }

    #[test]
    fn drain_without_kernel_resend_or_when_forced_or_when_one_cannot_park() {
        let drain = Ok(Agreement {
            mode: FreezeMode::Drain,
            state_version: 1,
            delta: false,
        });
        assert_eq!(
            negotiate(&hello(&[1], ALL), &hello(&[1], ALL), false, false, false),
            drain
        );
        assert_eq!(
            negotiate(&hello(&[1], ALL), &hello(&[1], ALL), true, true, false),
            drain
        );
        let no_park = hello(&[1], &[capability::DRAIN, capability::TAKEOVER]);
        assert_eq!(
            negotiate(&no_park, &hello(&[1], ALL), true, false, false),
            drain
        );
    }

    #[test]
    fn changes_only_inside_the_freeze_when_both_can() {
        let delta: Vec<&str> = ALL
            .iter()
            .copied()
            .chain([capability::STATE_DELTA])
            .collect();
        let both = negotiate(
            &hello(&[1], &delta),
            &hello(&[1], &delta),
            true,
            false,
            true,
        );
        assert_eq!(both.map(|a| a.delta), Ok(true));
        let old_only = negotiate(&hello(&[1], &delta), &hello(&[1], ALL), true, false, true);
        assert_eq!(old_only.map(|a| a.delta), Ok(false));
        let new_only = negotiate(&hello(&[1], ALL), &hello(&[1], &delta), true, false, true);
        assert_eq!(new_only.map(|a| a.delta), Ok(false));
    }

    #[test]
    fn drain_hands_lock_waits_over_through_the_request_log_when_both_can() {
        let logged: Vec<&str> = ALL
            .iter()
            .copied()
            .chain([capability::REQUEST_LOG])
            .collect();
        let a = negotiate(
            &hello(&[1], &logged),
            &hello(&[1], &logged),
            false,
            false,
            true,
        );
        assert_eq!(a.map(|a| a.mode), Ok(FreezeMode::DrainLog));
        // Not without the supervisor's log, nor when one side cannot use it.
        let a = negotiate(
            &hello(&[1], &logged),
            &hello(&[1], &logged),
            false,
            false,
            false,
        );
        assert_eq!(a.map(|a| a.mode), Ok(FreezeMode::Drain));
        let a = negotiate(&hello(&[1], ALL), &hello(&[1], &logged), false, false, true);
        assert_eq!(a.map(|a| a.mode), Ok(FreezeMode::Drain));
        // Resend stays resend; a drain forced where resend is in use is a plain drain (the
        // successor does not look in the log then).
        let both_logged = |force| {
            negotiate(
                &hello(&[1], &logged),
                &hello(&[1], &logged),
                true,
                force,
                true,
            )
            .map(|a| a.mode)
        };
        assert_eq!(both_logged(false), Ok(FreezeMode::Resend));
        assert_eq!(both_logged(true), Ok(FreezeMode::Drain));
    }

    #[test]
    fn mismatches() {
        assert!(matches!(
            negotiate(
                &hello(&[1], ALL),
                &hello(&[1], &[capability::DRAIN]),
                true,
                false,
                false
            ),
            Err(Mismatch::NoTakeover { .. })
        ));
        let e = negotiate(&hello(&[1], ALL), &hello(&[2], ALL), true, false, false).unwrap_err();
        assert!(e.to_string().contains("state version mismatch"), "{e}");
        // Resend only on one side and no drain: nothing in common without kernel resend.
        let park_only = hello(&[1], &[capability::PARK_RESEND, capability::TAKEOVER]);
        let e = negotiate(&park_only, &park_only, false, false, false).unwrap_err();
        assert!(e.to_string().contains("does not offer it"), "{e}");
        let e = negotiate(&park_only, &park_only, true, true, false).unwrap_err();
        assert!(e.to_string().contains("drain was forced"), "{e}");
    }

    fn reply(unique: u64, max_write: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&80u32.to_le_bytes());
        b.extend_from_slice(&0i32.to_le_bytes());
        b.extend_from_slice(&unique.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&45u32.to_le_bytes());
        b.extend_from_slice(&(128u32 << 10).to_le_bytes());
        b.extend_from_slice(&0x40u32.to_le_bytes());
        b.extend_from_slice(&64u16.to_le_bytes());
        b.extend_from_slice(&48u16.to_le_bytes());
        b.extend_from_slice(&max_write.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&256u16.to_le_bytes());
        b.extend_from_slice(&[0u8; 34]);
        b
    }

    #[test]
    fn init_reply_must_be_identical() {
        assert_eq!(
            compare_init_reply(&reply(2, 1 << 20), &reply(2, 1 << 20), 2),
            Ok(())
        );
        let e = compare_init_reply(&reply(2, 1 << 20), &reply(2, 1 << 24), 2).unwrap_err();
        assert_eq!(e, "max_write 16777216 instead of 1048576");
        let e = compare_init_reply(&reply(2, 1 << 20), &[16, 0, 0, 0], 2).unwrap_err();
        assert!(e.contains("unusable"), "{e}");
    }
}
