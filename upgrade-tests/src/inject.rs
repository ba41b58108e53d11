//! The alternative client build (`baton-fs-alt`): what it announces, and the faults it
//! injects. Faults go through a proxy between the supervisor's handover socket and the
//! real client code in the same process, which can change the client's INIT reply, crash
//! the process or hang it when a given message passes. The client code itself is not
//! touched; the supervisor sees exactly what a faulty or different build would send.
//!
//! Configured by environment variables (a test points `baton upgrade --binary` at a small
//! wrapper script that sets them and `exec`s `baton-fs-alt`):
//!
//! | variable | effect |
//! |---|---|
//! | `BATON_ALT_VERSION` | version of the build (default: `<version>-alt`) |
//! | `BATON_ALT_CAPABILITIES` | comma-separated capabilities of the build (`none`: no capability; default: `baton-fs`'s and `x-alt-only`) |
//! | `BATON_ALT_STATE_VERSIONS` | comma-separated state versions of the build (`none`: none; default: `baton-fs`'s) |
//! | `BATON_ALT_CRASH_ON` | `MESSAGE[:N]`: SIGKILL itself when the N-th such message arrives, before passing it on |
//! | `BATON_ALT_HANG_ON` | `MESSAGE[:N]`: stop passing messages on, for good (the process stays) |
//! | `BATON_ALT_INIT_MISMATCH` | `1`: announce half the negotiated `max_write` in the INIT reply |
//! | `BATON_ALT_CORRUPT_STATE` | `1`: cut the last chunk of the predecessor's state in half before the client imports it |
//!
//! `MESSAGE` is a variant name of `ToClient` or `ToSupervisor` (`Start`, `State`, `Init`,
//! `InitReply`, `Serve`, `Freeze`, ...), optionally qualified as `ToClient::State` or
//! `ToSupervisor::State` (the only name both have).

use std::collections::HashMap;
use std::fmt::Debug;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use handover_proto::channel::{self, WireMessage};
use handover_proto::fuse_init::OUT_HEADER_LEN;
use handover_proto::message::{ToClient, ToSupervisor};
use nix::sys::socket::{AddressFamily, Shutdown, SockFlag, SockType, shutdown, socketpair};

pub const ENV_VERSION: &str = "BATON_ALT_VERSION";
pub const ENV_CAPABILITIES: &str = "BATON_ALT_CAPABILITIES";
pub const ENV_STATE_VERSIONS: &str = "BATON_ALT_STATE_VERSIONS";
pub const ENV_CRASH_ON: &str = "BATON_ALT_CRASH_ON";
pub const ENV_HANG_ON: &str = "BATON_ALT_HANG_ON";
pub const ENV_INIT_MISMATCH: &str = "BATON_ALT_INIT_MISMATCH";
pub const ENV_CORRUPT_STATE: &str = "BATON_ALT_CORRUPT_STATE";

/// Offset of `max_write` in an INIT reply (`fuse_out_header` + 20).
const MAX_WRITE_AT: usize = OUT_HEADER_LEN + 20;

/// A message selector: a variant name, maybe qualified with its direction, and which
/// occurrence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trigger {
    pub direction: Option<Direction>,
    pub name: String,
    pub nth: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ToClient,
    ToSupervisor,
}

impl std::str::FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Trigger, String> {
        let (sel, nth) = match s.rsplit_once(':') {
            Some((a, n)) if !a.ends_with(':') => (
                a,
                n.parse().map_err(|_| format!("bad occurrence in {s:?}"))?,
            ),
            _ => (s, 1),
        };
        let (direction, name) = match sel.split_once("::") {
            Some(("ToClient", n)) => (Some(Direction::ToClient), n),
            Some(("ToSupervisor", n)) => (Some(Direction::ToSupervisor), n),
            Some(_) => return Err(format!("bad message selector {s:?}")),
            None => (None, sel),
        };
        if name.is_empty() || nth == 0 {
            return Err(format!("bad message selector {s:?}"));
        }
        Ok(Trigger {
            direction,
            name: name.to_string(),
            nth,
        })
    }
}

/// A capability only the alternative build announces: the supervisor must ignore what
/// the other side does not share.
pub const ALT_ONLY_CAPABILITY: &str = "x-alt-only";

/// What the alternative build announces instead of `baton-fs`'s defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AltBuild {
    pub version: Option<String>,
    pub capabilities: Option<Vec<String>>,
    pub state_versions: Option<Vec<u16>>,
}

/// The faults of one alternative client process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub crash_on: Option<Trigger>,
    pub hang_on: Option<Trigger>,
    pub init_mismatch: bool,
    pub corrupt_state: bool,
}

fn list(v: &str) -> Vec<String> {
    if v == "none" {
        Vec::new()
    } else {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Faults {
    /// Whether there is nothing to inject (then no proxy is needed).
    pub fn is_empty(&self) -> bool {
        self.crash_on.is_none()
            && self.hang_on.is_none()
            && !self.init_mismatch
            && !self.corrupt_state
    }
}

/// Reads the `BATON_ALT_*` variables.
pub fn from_env() -> Result<(AltBuild, Faults), String> {
    let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
    let state_versions = match var(ENV_STATE_VERSIONS) {
        None => None,
        Some(v) => Some(
            list(&v)
                .iter()
                .map(|s| {
                    s.parse()
                        .map_err(|_| format!("{ENV_STATE_VERSIONS}: bad version {s:?}"))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let build = AltBuild {
        version: var(ENV_VERSION),
        capabilities: var(ENV_CAPABILITIES).map(|v| list(&v)),
        state_versions,
    };
    let faults = Faults {
        crash_on: var(ENV_CRASH_ON).map(|v| v.parse()).transpose()?,
        hang_on: var(ENV_HANG_ON).map(|v| v.parse()).transpose()?,
        init_mismatch: var(ENV_INIT_MISMATCH).is_some_and(|v| v == "1"),
        corrupt_state: var(ENV_CORRUPT_STATE).is_some_and(|v| v == "1"),
    };
    Ok((build, faults))
}

/// The variant name of a message (its Debug form up to the first field).
fn variant<M: Debug>(msg: &M) -> String {
    let s = format!("{msg:?}");
    let end = s.find([' ', '(', '{']).unwrap_or(s.len());
    s[..end].to_string()
}

/// Counts messages by (direction, name) and fires the triggers.
#[derive(Debug)]
struct Watch {
    faults: Faults,
    seen: Mutex<HashMap<(Direction, String), u32>>,
}

enum Verdict {
    Pass,
    Crash,
    Hang,
}

impl Watch {
    fn observe(&self, dir: Direction, name: &str) -> Verdict {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let n = seen.entry((dir, name.to_string())).or_insert(0);
        *n += 1;
        // A selector without direction counts both directions together.
        let both: u32 = seen
            .iter()
            .filter(|((_, k), _)| k == name)
            .map(|(_, v)| v)
            .sum();
        let hit = |t: &Option<Trigger>| {
            t.as_ref().is_some_and(|t| {
                t.name == name
                    && match t.direction {
                        Some(d) => {
                            d == dir && *seen.get(&(dir, name.to_string())).unwrap_or(&0) == t.nth
                        }
                        None => both == t.nth,
                    }
            })
        };
        if hit(&self.faults.crash_on) {
            Verdict::Crash
        } else if hit(&self.faults.hang_on) {
            Verdict::Hang
        } else {
            Verdict::Pass
        }
    }
}

fn crash(what: &str) -> ! {
    tracing::warn!(message = what, "injected crash: SIGKILL");
    // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL cannot be caught.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

fn hang(what: &str) -> ! {
    tracing::warn!(message = what, "injected hang");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Changes what the client replies, per the faults.
fn rewrite_up(msg: &mut ToSupervisor, faults: &Faults) {
    if let ToSupervisor::InitReply { reply } = msg
        && faults.init_mismatch
        && reply.len() >= MAX_WRITE_AT + 4
    {
        let mut mw = [0u8; 4];
        mw.copy_from_slice(&reply[MAX_WRITE_AT..MAX_WRITE_AT + 4]);
        let half = (u32::from_le_bytes(mw) / 2).max(4096);
        reply[MAX_WRITE_AT..MAX_WRITE_AT + 4].copy_from_slice(&half.to_le_bytes());
    }
}

/// Changes what the supervisor sends, per the faults.
fn rewrite_down(msg: &mut ToClient, faults: &Faults) {
    if let ToClient::State(chunk) = msg
        && faults.corrupt_state
        && chunk.index + 1 == chunk.total
    {
        let half = chunk.data.len() / 2;
        chunk.data.truncate(half);
    }
}

/// Passes messages from `from` to `to` until either side closes, applying the faults.
fn pump<M: WireMessage>(
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    dir: Direction,
    watch: Arc<Watch>,
    rewrite: impl Fn(&mut M),
) {
    loop {
        let (mut msg, fds) = match channel::recv::<M>(from.as_fd(), None) {
            Ok(m) => m,
            Err(e) => {
                if !e.is_closed() {
                    tracing::error!(error = %e, ?dir, "fault proxy: cannot receive");
                }
                break;
            }
        };
        let name = variant(&msg);
        match watch.observe(dir, &name) {
            Verdict::Pass => {}
            Verdict::Crash => crash(&name),
            Verdict::Hang => hang(&name),
        }
        rewrite(&mut msg);
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        if let Err(e) = channel::send(to.as_fd(), &msg, &borrowed) {
            tracing::error!(error = %e, ?dir, message = %name, "fault proxy: cannot pass a message on");
            break;
        }
    }
    // Whoever closed, the other side must see the end too.
    let _ = shutdown(to.as_raw_fd(), Shutdown::Both);
}

/// Puts the fault proxy between `channel` (the supervisor's handover socket) and the
/// client: returns the socket the client code must use instead.
pub fn interpose(channel: OwnedFd, faults: Faults) -> std::io::Result<OwnedFd> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let supervisor = Arc::new(channel);
    let client = Arc::new(ours);
    let watch = Arc::new(Watch {
        faults,
        seen: Mutex::new(HashMap::new()),
    });
    let (s, c, w) = (supervisor.clone(), client.clone(), watch.clone());
    std::thread::Builder::new()
        .name("fault-proxy-down".into())
        .spawn(move || {
            let faults = w.faults.clone();
            pump::<ToClient>(s, c, Direction::ToClient, w, |m| rewrite_down(m, &faults));
        })?;
    std::thread::Builder::new()
        .name("fault-proxy-up".into())
        .spawn(move || {
            let faults = watch.faults.clone();
            pump::<ToSupervisor>(client, supervisor, Direction::ToSupervisor, watch, |m| {
                rewrite_up(m, &faults)
            });
        })?;
    Ok(theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_parse() {
        assert_eq!(
            "Init".parse(),
            Ok(Trigger {
                direction: None,
                name: "Init".into(),
                nth: 1
            })
        );
        assert_eq!(
            "ToSupervisor::State:3".parse(),
            Ok(Trigger {
                direction: Some(Direction::ToSupervisor),
                name: "State".into(),
                nth: 3
            })
        );
        assert!("Nope::State".parse::<Trigger>().is_err());
        assert!("Init:0".parse::<Trigger>().is_err());
    }

    #[test]
    fn triggers_fire_on_the_nth_message() {
        let w = Watch {
            faults: Faults {
                crash_on: Some("State:2".parse().unwrap()),
                ..Faults::default()
            },
            seen: Mutex::default(),
        };
        assert!(matches!(
            w.observe(Direction::ToClient, "State"),
            Verdict::Pass
        ));
        assert!(matches!(
            w.observe(Direction::ToClient, "Init"),
            Verdict::Pass
        ));
        assert!(matches!(
            w.observe(Direction::ToSupervisor, "State"),
            Verdict::Crash
        ));
    }

    #[test]
    fn the_init_reply_announces_another_max_write() {
        let faults = Faults {
            init_mismatch: true,
            ..Faults::default()
        };
        let mut reply = vec![0u8; 80];
        reply[MAX_WRITE_AT..MAX_WRITE_AT + 4].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let mut m = ToSupervisor::InitReply { reply };
        rewrite_up(&mut m, &faults);
        let ToSupervisor::InitReply { reply } = m else {
            unreachable!()
        };
        assert_eq!(
            &reply[MAX_WRITE_AT..MAX_WRITE_AT + 4],
            &(1u32 << 19).to_le_bytes()
        );
    }
}
