//! Fault points for end-to-end tests of crash recovery.
//!
//! `BATON_FAULT=after-apply:<op>` makes the client abort (`std::process::abort`) right
//! after the first `<op>` it executes has committed its metadata transaction (for `write`:
//! after the data path accepted the bytes), before the reply reaches the kernel: the
//! moment at which exactly-once execution of the resent request matters. `<op>` is one of
//! `mkdir create unlink rmdir rename link symlink mknod setattr setxattr removexattr
//! fallocate write`.
//!
//! The variable is read once, when the volume is opened, and only a client that opened a
//! new metadata session arms it: a successor that resumes the session (after the crash the
//! fault caused) serves normally, so the test sees the recovery and not a crash loop.

use std::fmt;

/// The environment variable.
pub const ENV: &str = "BATON_FAULT";

/// A mutating operation with a fault point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Mkdir,
    Create,
    Unlink,
    Rmdir,
    Rename,
    Link,
    Symlink,
    Mknod,
    Setattr,
    Setxattr,
    Removexattr,
    Fallocate,
    Write,
}

impl Op {
    pub const ALL: [Op; 13] = [
        Op::Mkdir,
        Op::Create,
        Op::Unlink,
        Op::Rmdir,
        Op::Rename,
        Op::Link,
        Op::Symlink,
        Op::Mknod,
        Op::Setattr,
        Op::Setxattr,
        Op::Removexattr,
        Op::Fallocate,
        Op::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Mkdir => "mkdir",
            Op::Create => "create",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Symlink => "symlink",
            Op::Mknod => "mknod",
            Op::Setattr => "setattr",
            Op::Setxattr => "setxattr",
            Op::Removexattr => "removexattr",
            Op::Fallocate => "fallocate",
            Op::Write => "write",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `BATON_FAULT` holds something this build does not understand.
#[derive(Debug, thiserror::Error)]
#[error(
    "bad {ENV} value {value:?}: want after-apply:<op> (op: mkdir, create, unlink, rmdir, rename, link, symlink, mknod, setattr, setxattr, removexattr, fallocate or write)"
)]
pub struct BadFault {
    pub value: String,
}

/// The armed fault points of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    after_apply: Option<Op>,
}

impl Faults {
    /// No fault.
    pub const NONE: Faults = Faults { after_apply: None };

    /// From [`ENV`]; unset or empty is no fault.
    pub fn from_env() -> Result<Faults, BadFault> {
        match std::env::var(ENV) {
            Ok(v) => Faults::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Faults::NONE),
            Err(std::env::VarError::NotUnicode(v)) => Err(BadFault {
                value: v.to_string_lossy().into_owned(),
            }),
        }
    }

    pub fn parse(value: &str) -> Result<Faults, BadFault> {
        if value.is_empty() {
            return Ok(Faults::NONE);
        }
        let bad = || BadFault {
            value: value.to_string(),
        };
        let op = value.strip_prefix("after-apply:").ok_or_else(bad)?;
        let op = Op::ALL
            .into_iter()
            .find(|o| o.name() == op)
            .ok_or_else(bad)?;
        Ok(Faults {
            after_apply: Some(op),
        })
    }

    pub fn after_apply_of(&self) -> Option<Op> {
        self.after_apply
    }

    /// The fault point after `op` was applied: aborts the process if it is armed for `op`.
    pub fn after_apply(&self, op: Op) {
        if self.after_apply == Some(op) {
            tracing::error!(%op, "{ENV}: aborting after the operation was applied, before its reply");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op_and_refuses_the_rest() {
        for op in Op::ALL {
            let f = Faults::parse(&format!("after-apply:{op}")).unwrap();
            assert_eq!(f.after_apply_of(), Some(op));
        }
        assert_eq!(Faults::parse("").unwrap(), Faults::NONE);
        for bad in [
            "after-apply:",
            "after-apply:chmod",
            "before-apply:mkdir",
            "mkdir",
            "after-apply:mkdir ",
        ] {
            let e = Faults::parse(bad).unwrap_err();
            assert_eq!(e.value, bad);
        }
    }
}
