//! A simulated mount for the machine: a virtual clock, scripted fake clients that speak
//! the handover protocol (and ack, crash, hang, fail or lie on cue), and a driver that
//! carries out the machine's actions on them — checking on every step what must hold.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use handover_proto::message::{
    FreezeMode, Generation, Hello, MountSpec, ToClient, ToSupervisor, capability,
};
use handover_proto::state;

use crate::upgrade::{
    Action, ClientInfo, ExitInfo, Machine, Outcome, PhaseKind, Timestamp, Timings, UpgradeRequest,
};

pub const OLD_BINARY: &str = "/opt/baton/old/baton-fs";
pub const NEW_BINARY: &str = "/opt/baton/new/baton-fs";
pub const MISSING_BINARY: &str = "/nonexistent/baton-fs";
pub const SESSION: u64 = 77;
const UNIQUE: u64 = 2;

/// A protocol step at which a fake client misbehaves: when it receives that message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Start,
    /// `PreFlush`, or `PreExport`.
    PreFlush,
    /// The new client, at the last base chunk (instead of staging it).
    BaseState,
    Freeze,
    /// After the first state chunk was sent.
    MidState,
    /// After `Frozen` was sent.
    Frozen,
    StateChunk,
    Init,
    Commit,
    Serve,
    Thaw,
}

/// What a fake client does wrong at its [`Point`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Dies (SIGSEGV) without a word.
    Crash,
    /// Stops answering anything (but can be killed).
    Hang,
    /// Sends `Failed` (or `FreezeFailed` at `Freeze`) and exits 1.
    Fail,
}

/// How one fake client behaves.
#[derive(Clone, Debug)]
pub struct Script {
    pub version: String,
    pub hello: Hello,
    /// Session it claims in `Prepared` (`None`: the one it was asked to resume).
    pub session: Option<u64>,
    pub fault: Option<(Point, Fault)>,
    /// Its INIT reply (`None`: the same as the first client's).
    pub init_reply: Option<Vec<u8>>,
    /// Bytes of state it exports when frozen.
    pub state_len: usize,
    /// Sends `FirstServed` this long after `Serve` (`None`: no request comes).
    pub first_request_after: Option<Duration>,
}

/// [`hello_all`] and the delta handover.
pub fn hello_delta() -> Hello {
    let mut h = hello_all();
    h.capabilities.push(capability::STATE_DELTA.into());
    h
}

pub fn hello_all() -> Hello {
    Hello {
        state_versions: vec![1],
        capabilities: [
            capability::PARK_RESEND,
            capability::DRAIN,
            capability::TAKEOVER,
            capability::REQUEST_LOG,
        ]
        .iter()
        .map(|c| c.to_string())
        .collect(),
    }
}

impl Script {
    pub fn ack(version: &str) -> Script {
        Script {
            version: version.into(),
            hello: hello_all(),
            session: None,
            fault: None,
            init_reply: None,
            state_len: 1000,
            first_request_after: Some(Duration::from_micros(700)),
        }
    }

    pub fn with_fault(mut self, point: Point, fault: Fault) -> Script {
        self.fault = Some((point, fault));
        self
    }
}

#[derive(Debug)]
pub struct Fake {
    pub script: Script,
    pub binary: PathBuf,
    pub alive: bool,
    /// Exited, not yet reported to the machine.
    pub exit: Option<ExitInfo>,
    /// Told to serve (or the first client), and alive.
    pub reading: bool,
    pub frozen: bool,
    pub hung: bool,
    /// Was killed by the test (a crash), not by the machine or by exiting on cue.
    pub crashed: bool,
    pub exported_all: bool,
    pub got_state: Vec<u8>,
    /// Base chunks received (a delta handover's successor).
    pub got_base: Vec<u8>,
    /// The base it exported on `PreExport`, while it is out.
    pub base_out: Option<Vec<u8>>,
    pub got_init: bool,
    /// Answered `Start` with `Prepared`.
    pub prepared: bool,
    pub got_request_log: bool,
    pub inbox: VecDeque<ToClient>,
    pub outbox: VecDeque<ToSupervisor>,
    pub generation: Generation,
}

impl Fake {
    fn new(generation: Generation, binary: PathBuf, script: Script) -> Fake {
        Fake {
            script,
            binary,
            alive: true,
            exit: None,
            reading: false,
            frozen: false,
            hung: false,
            crashed: false,
            exported_all: false,
            got_state: Vec::new(),
            got_base: Vec::new(),
            base_out: None,
            got_init: false,
            prepared: false,
            got_request_log: false,
            inbox: VecDeque::new(),
            outbox: VecDeque::new(),
            generation,
        }
    }

    fn die(&mut self, exit: ExitInfo) {
        if self.alive {
            self.alive = false;
            self.reading = false;
            self.exit = Some(exit);
        }
    }

    /// The state this client exports: distinct per generation, so that a mix-up shows.
    /// A client that can hand over changes exports a real state (the supervisor merges
    /// its base and changes for a restart): this one is its base.
    pub fn export(&self) -> Vec<u8> {
        if !self.delta() {
            return (0..self.script.state_len)
                .map(|i| (i as u64 ^ self.generation.0.wrapping_mul(31)) as u8)
                .collect();
        }
        let g = self.generation.0;
        let s = state::ClientStateV1 {
            generation: g,
            session: SESSION,
            volume_uuid: "sim".into(),
            spec: spec(),
            init_request: Vec::new(),
            init_reply: Vec::new(),
            lookups: (1..=(self.script.state_len / 8) as u64)
                .map(|i| (i, 1 + (i ^ g) % 5))
                .collect(),
            files: Vec::new(),
            dirs: Vec::new(),
            orphans: vec![g],
            next_handle: 1,
        };
        state::encode(&state::ClientState::V1(s)).expect("encode")
    }

    /// The changes since [`Fake::export`]: inode 1 forgotten, one more looked up.
    pub fn export_delta(&self) -> Vec<u8> {
        let g = self.generation.0;
        let d = state::StateDeltaV1 {
            generation: g,
            session: SESSION,
            lookups: vec![(1, 0), (u64::MAX - g, 2)],
            orphans: vec![],
            next_handle: 7,
            ..Default::default()
        };
        state::encode_delta(&state::StateDelta::V1(d)).expect("encode")
    }

    fn delta(&self) -> bool {
        self.script
            .hello
            .capabilities
            .iter()
            .any(|c| c == capability::STATE_DELTA)
    }

    /// The whole state it was handed: the base with the changes, or the state.
    pub fn handed(&self) -> Vec<u8> {
        if self.got_base.is_empty() {
            return self.got_state.clone();
        }
        state::merge(1, &self.got_base, &self.got_state).expect("base and changes merge")
    }
}

pub fn spec() -> MountSpec {
    MountSpec {
        volume: "vol".into(),
        meta_url: "redb:///tmp/meta.redb".into(),
        mountpoint: "/mnt/test".into(),
        home: "/var/lib/baton".into(),
        threads: 4,
        attr_ttl_ms: 1000,
        entry_ttl_ms: 1000,
        cache_dir: None,
        cache_bytes: 1 << 30,
    }
}

pub fn init_request(resend: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&104u32.to_le_bytes());
    b.extend_from_slice(&26u32.to_le_bytes());
    b.extend_from_slice(&UNIQUE.to_le_bytes());
    b.extend_from_slice(&[0u8; 24]);
    b.extend_from_slice(&7u32.to_le_bytes());
    b.extend_from_slice(&45u32.to_le_bytes());
    b.extend_from_slice(&(128u32 << 10).to_le_bytes());
    b.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
    let flags2: u32 = if resend { 0xff } else { 0x7f };
    b.extend_from_slice(&flags2.to_le_bytes());
    b.extend_from_slice(&[0u8; 44]);
    assert_eq!(b.len(), 104);
    b
}

pub fn init_reply(max_write: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&80u32.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&UNIQUE.to_le_bytes());
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
    assert_eq!(b.len(), 80);
    b
}

/// Something the machine did, as the sim saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Spawned(Generation),
    SpawnFailed(Generation),
    Sent(Generation, &'static str),
    Killed(Generation),
    Resend,
    Report(Outcome),
    MountGone,
}

pub struct Sim {
    pub now: Timestamp,
    pub m: Machine,
    pub fakes: BTreeMap<Generation, Fake>,
    /// Scripts of the clients spawned next, in order (then: acknowledging ones).
    pub scripts: VecDeque<Script>,
    pub seen: Vec<Seen>,
    pub requests: usize,
    max_spawned: Generation,
    /// The state of the last client that exported all of it.
    pub last_export: Option<Vec<u8>>,
}

fn name(msg: &ToClient) -> &'static str {
    match msg {
        ToClient::Start { .. } => "Start",
        ToClient::Init { .. } => "Init",
        ToClient::Serve => "Serve",
        ToClient::Shutdown => "Shutdown",
        ToClient::PreFlush => "PreFlush",
        ToClient::Freeze {
            mode: FreezeMode::Resend,
            ..
        } => "Freeze(resend)",
        ToClient::Freeze {
            mode: FreezeMode::Drain,
            ..
        } => "Freeze(drain)",
        ToClient::Freeze {
            mode: FreezeMode::DrainLog,
            ..
        } => "Freeze(drain-log)",
        ToClient::Thaw => "Thaw",
        ToClient::Commit => "Commit",
        ToClient::State(_) => "State",
        ToClient::Adopt { .. } => "Adopt",
        ToClient::Detach => "Detach",
        ToClient::RequestLog => "RequestLog",
        ToClient::SendRequestLog => "SendRequestLog",
        ToClient::PreExport { .. } => "PreExport",
        ToClient::BaseState(_) => "BaseState",
    }
}

impl Sim {
    /// A mount served by generation 1 running `first`, on a kernel with or without resend.
    pub fn new(first: Script, resend: bool) -> Sim {
        Self::with_timings(first, resend, Timings::default())
    }

    /// A mount made with `--no-resend` on a kernel that offers resend.
    pub fn resend_disabled(first: Script) -> Sim {
        Self::build(first, true, true, Timings::default())
    }

    pub fn with_timings(first: Script, resend: bool, timings: Timings) -> Sim {
        Self::build(first, resend, false, timings)
    }

    fn build(first: Script, resend: bool, disabled: bool, timings: Timings) -> Sim {
        let info = ClientInfo {
            generation: Generation(1),
            binary: OLD_BINARY.into(),
            version: first.version.clone(),
            hello: first.hello.clone(),
            session: SESSION,
            spec: spec(),
        };
        let now = Timestamp(1_000_000_000);
        let m = Machine::new(info, init_request(resend), init_reply(1 << 20), timings)
            .with_request_log(disabled);
        let mut fake = Fake::new(Generation(1), OLD_BINARY.into(), first);
        fake.reading = true;
        fake.got_init = true;
        let mut fakes = BTreeMap::new();
        fakes.insert(Generation(1), fake);
        Sim {
            now,
            m,
            fakes,
            scripts: VecDeque::new(),
            seen: Vec::new(),
            requests: 0,
            max_spawned: Generation(1),
            last_export: None,
        }
    }

    pub fn fake(&self, g: u64) -> &Fake {
        &self.fakes[&Generation(g)]
    }

    pub fn request(&mut self, binary: Option<&str>, force_drain: bool) -> Result<(), String> {
        let req = UpgradeRequest {
            binary: binary.map(PathBuf::from),
            timeout: Duration::from_secs(30),
            force_drain,
            options: Default::default(),
        };
        let r = self
            .m
            .handle_request(self.now, req)
            .map_err(|e| e.to_string());
        if r.is_ok() {
            self.requests += 1;
        }
        self.drain_actions();
        r
    }

    pub fn reports(&self) -> Vec<&Outcome> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Report(o) => Some(o),
                _ => None,
            })
            .collect()
    }

    pub fn sent(&self) -> Vec<(u64, &'static str)> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Sent(g, n) => Some((g.0, *n)),
                _ => None,
            })
            .collect()
    }

    fn readers(&self) -> Vec<Generation> {
        self.fakes
            .values()
            .filter(|f| f.alive && f.reading)
            .map(|f| f.generation)
            .collect()
    }

    /// Carries out every pending action of the machine, checking each.
    pub fn drain_actions(&mut self) {
        while let Some(a) = self.m.poll_action() {
            self.act(a);
        }
        self.check();
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::Spawn {
                generation,
                binary,
                start,
            } => {
                assert!(
                    generation > self.max_spawned,
                    "generation {generation} spawned after {}",
                    self.max_spawned
                );
                self.max_spawned = generation;
                assert!(
                    matches!(start, ToClient::Start { generation: g, resume_session: Some(SESSION), .. } if g == generation)
                );
                if binary == std::path::Path::new(MISSING_BINARY) {
                    self.seen.push(Seen::SpawnFailed(generation));
                    self.m.handle_spawn_failed(
                        self.now,
                        generation,
                        "No such file or directory (os error 2)".into(),
                    );
                    return;
                }
                let script = self.scripts.pop_front().unwrap_or_else(|| {
                    Script::ack(if binary == std::path::Path::new(NEW_BINARY) {
                        "2.0"
                    } else {
                        "1.0"
                    })
                });
                let mut fake = Fake::new(generation, binary, script);
                fake.inbox.push_back(start);
                self.fakes.insert(generation, fake);
                self.seen.push(Seen::Spawned(generation));
            }
            Action::Send {
                to,
                msg,
                with_fuse_fd,
            } => {
                assert_eq!(
                    with_fuse_fd,
                    matches!(msg, ToClient::Init { .. }),
                    "the fd travels with Init and nothing else"
                );
                if matches!(msg, ToClient::RequestLog) {
                    let f = &self.fakes[&to];
                    assert!(
                        f.prepared && !f.got_init && f.got_state.is_empty(),
                        "RequestLog to {to} must come after its Prepared and before its state and Init"
                    );
                    assert!(!f.got_request_log, "RequestLog to {to} twice");
                    assert!(
                        f.script
                            .hello
                            .capabilities
                            .iter()
                            .any(|c| c == capability::REQUEST_LOG),
                        "RequestLog to {to}, which does not announce the capability"
                    );
                }
                if let ToClient::Freeze {
                    mode: FreezeMode::DrainLog,
                    ..
                } = &msg
                {
                    let announce = |g: &Generation| {
                        self.fakes.get(g).is_some_and(|f| {
                            f.script
                                .hello
                                .capabilities
                                .iter()
                                .any(|c| c == capability::REQUEST_LOG)
                        })
                    };
                    assert!(
                        announce(&to),
                        "DrainLog freeze of {to}, which cannot use the log"
                    );
                }
                if matches!(msg, ToClient::Serve) {
                    let readers = self.readers();
                    assert!(
                        readers.is_empty(),
                        "Serve to {to} while {readers:?} may read"
                    );
                    let f = &self.fakes[&to];
                    assert!(f.got_init, "Serve to {to} before Init");
                    // A client restarted after a crash has no state at all; any
                    // other successor has the last one exported.
                    if let (Some(export), false) = (&self.last_export, f.got_state.is_empty()) {
                        assert!(
                            f.handed() == *export,
                            "generation {to} serves with a state that is not the last export"
                        );
                    }
                }
                self.seen.push(Seen::Sent(to, name(&msg)));
                let Some(f) = self.fakes.get_mut(&to) else {
                    panic!("message to a client never spawned: {to}");
                };
                if f.alive {
                    if matches!(msg, ToClient::Serve) {
                        f.reading = true;
                    }
                    f.inbox.push_back(msg);
                } else if f.exit.is_some() {
                    // Dead, exit not yet seen: the socket says EPIPE.
                    self.m
                        .handle_send_failed(self.now, to, "Broken pipe".into());
                }
            }
            Action::Kill { generation } => {
                self.seen.push(Seen::Killed(generation));
                if let Some(f) = self.fakes.get_mut(&generation) {
                    f.die(ExitInfo::Signal(9));
                }
            }
            Action::WriteResend { generation } => {
                let readers = self.readers();
                assert!(readers.is_empty(), "RESEND while {readers:?} may read");
                // Without resend in use, only when the request log cannot carry what the
                // dead clients read: one of them, or the successor, does not use it.
                let lacking = |f: &Fake| {
                    !f.script
                        .hello
                        .capabilities
                        .iter()
                        .any(|c| c == capability::REQUEST_LOG)
                };
                let needed = self.fakes.get(&generation).is_some_and(lacking)
                    || self
                        .fakes
                        .values()
                        .any(|f| f.got_init && !f.alive && lacking(f));
                assert!(
                    self.m.resend() || (self.m.kernel_resend() && needed),
                    "RESEND on a mount that does not use it (kernel {}, disabled {})",
                    self.m.kernel_resend(),
                    self.m.resend_disabled()
                );
                self.seen.push(Seen::Resend);
            }
            Action::Report(o) => {
                // The machine keeps a state only until the upgrade is answered.
                for f in self.fakes.values_mut() {
                    f.exported_all = false;
                }
                self.seen.push(Seen::Report(o));
            }
            Action::MountGone { .. } => self.seen.push(Seen::MountGone),
        }
    }

    /// Invariants that hold between any two steps.
    fn check(&self) {
        let readers = self.readers();
        assert!(readers.len() <= 1, "several clients may read: {readers:?}");
        let reports = self.reports().len();
        assert!(
            reports <= self.requests,
            "{reports} reports for {} upgrades",
            self.requests
        );
    }

    /// One step of fake client `g`: handles one message of its inbox.
    pub fn run_fake(&mut self, g: Generation) -> bool {
        let now = self.now;
        let Some(f) = self.fakes.get_mut(&g) else {
            return false;
        };
        if !f.alive || f.hung {
            return false;
        }
        let Some(msg) = f.inbox.pop_front() else {
            return false;
        };
        let point = match &msg {
            ToClient::Start { .. } => Some(Point::Start),
            ToClient::PreFlush | ToClient::PreExport { .. } => Some(Point::PreFlush),
            ToClient::BaseState(c) if c.index + 1 == c.total => Some(Point::BaseState),
            ToClient::Freeze { .. } => Some(Point::Freeze),
            ToClient::State(_) => Some(Point::StateChunk),
            ToClient::Init { .. } => Some(Point::Init),
            ToClient::Commit => Some(Point::Commit),
            ToClient::Serve => Some(Point::Serve),
            ToClient::Thaw => Some(Point::Thaw),
            ToClient::Shutdown
            | ToClient::Adopt { .. }
            | ToClient::Detach
            | ToClient::RequestLog
            | ToClient::SendRequestLog
            | ToClient::BaseState(_) => None,
        };
        let fault = f
            .script
            .fault
            .clone()
            .filter(|(p, _)| Some(*p) == point)
            .map(|(_, x)| x);
        match fault {
            Some(Fault::Crash) => {
                f.crashed = true;
                f.die(ExitInfo::Signal(11));
                return true;
            }
            Some(Fault::Hang) => {
                f.hung = true;
                return true;
            }
            Some(Fault::Fail) => {
                let reason = format!("fake failure at {point:?}");
                let m = if matches!(msg, ToClient::Freeze { .. }) {
                    ToSupervisor::FreezeFailed { reason }
                } else if matches!(msg, ToClient::BaseState(_)) {
                    ToSupervisor::BaseStaged {
                        error: Some(reason),
                    }
                } else {
                    ToSupervisor::Failed { reason }
                };
                f.outbox.push_back(m);
                if !matches!(msg, ToClient::Freeze { .. }) {
                    f.crashed = true;
                    f.die(ExitInfo::Code(1));
                }
                return true;
            }
            None => {}
        }
        match msg {
            ToClient::Start { resume_session, .. } => {
                f.prepared = true;
                f.outbox.push_back(ToSupervisor::Prepared {
                    pid: 1000 + g.0 as u32,
                    version: f.script.version.clone(),
                    hello: f.script.hello.clone(),
                    session: f.script.session.or(resume_session).unwrap_or(SESSION),
                });
            }
            ToClient::PreFlush => {
                f.base_out = None;
                f.outbox.push_back(ToSupervisor::PreFlushed { error: None });
            }
            ToClient::PreExport { .. } => {
                assert!(
                    f.delta(),
                    "PreExport to {g}, which does not announce the capability"
                );
                let base = f.export();
                for c in state::split(&base) {
                    f.outbox.push_back(ToSupervisor::State(c));
                }
                f.base_out = Some(base);
                f.outbox.push_back(ToSupervisor::PreFlushed { error: None });
            }
            ToClient::BaseState(chunk) => {
                assert!(
                    f.delta(),
                    "BaseState to {g}, which does not announce the capability"
                );
                assert!(
                    f.got_state.is_empty() && !f.got_init,
                    "BaseState to {g} after its State or Init"
                );
                let last = chunk.index + 1 == chunk.total;
                f.got_base.extend_from_slice(&chunk.data);
                if last {
                    f.outbox.push_back(ToSupervisor::BaseStaged { error: None });
                }
            }
            ToClient::Freeze { .. } => {
                f.frozen = true;
                // With a base out, only the changes since; the whole is what a successor
                // must end up with.
                let (bytes, whole) = match &f.base_out {
                    Some(base) => {
                        let d = f.export_delta();
                        let whole = state::merge(1, base, &d).expect("merge");
                        (d, whole)
                    }
                    None => (f.export(), f.export()),
                };
                let chunks = state::split(&bytes);
                let total = chunks.len();
                let mid = matches!(f.script.fault, Some((Point::MidState, _)));
                for (i, c) in chunks.into_iter().enumerate() {
                    f.outbox.push_back(ToSupervisor::State(c));
                    if mid && i == 0 {
                        f.crashed = true;
                        f.die(ExitInfo::Signal(11));
                        if total == 1 {
                            f.exported_all = true;
                            self.last_export = Some(whole);
                        }
                        return true;
                    }
                }
                f.exported_all = true;
                self.last_export = Some(whole);
                let f = self.fakes.get_mut(&g).expect("fake");
                f.outbox.push_back(ToSupervisor::Frozen {
                    parked: 3,
                    drained: 0,
                });
                if matches!(f.script.fault, Some((Point::Frozen, Fault::Crash))) {
                    f.crashed = true;
                    f.die(ExitInfo::Signal(11));
                }
            }
            ToClient::State(chunk) => f.got_state.extend_from_slice(&chunk.data),
            ToClient::Init { .. } => {
                f.got_init = true;
                let reply = f
                    .script
                    .init_reply
                    .clone()
                    .unwrap_or_else(|| init_reply(1 << 20));
                f.outbox.push_back(ToSupervisor::InitReply { reply });
            }
            ToClient::Commit => f.die(ExitInfo::Code(0)),
            ToClient::Serve => {
                if let Some(d) = f.script.first_request_after {
                    f.outbox.push_back(ToSupervisor::FirstServed {
                        monotonic_ns: (now + d).0,
                    });
                }
            }
            ToClient::Thaw => {
                f.frozen = false;
                f.exported_all = false;
                f.base_out = None;
                f.outbox.push_back(ToSupervisor::Thawed);
            }
            ToClient::Shutdown => {
                f.outbox
                    .push_back(ToSupervisor::ShutdownDone { error: None });
                f.die(ExitInfo::Code(0));
            }
            ToClient::RequestLog => f.got_request_log = true,
            // Never sent by the machine (the driver sends Detach; Adopt and SendRequestLog
            // travel on the adopt socket): a real client would not answer either.
            ToClient::Adopt { .. } | ToClient::Detach | ToClient::SendRequestLog => {}
        }
        true
    }

    /// Delivers client `g`'s next message, or its exit once every message is delivered.
    pub fn deliver(&mut self, g: Generation) -> bool {
        let now = self.now;
        let Some(f) = self.fakes.get_mut(&g) else {
            return false;
        };
        if let Some(msg) = f.outbox.pop_front() {
            // A first request is reported after it was answered: not before its stamp.
            if let ToSupervisor::FirstServed { monotonic_ns } = msg {
                self.now = self.now.max(Timestamp(monotonic_ns));
            }
            let now = self.now;
            self.m.handle_message(now, g, msg);
        } else if let Some(exit) = f.exit.take() {
            self.m.handle_exit(now, g, exit);
        } else {
            return false;
        }
        self.drain_actions();
        true
    }

    /// The test crashes client `g` (kill -9 from outside).
    pub fn crash(&mut self, g: Generation) {
        if let Some(f) = self.fakes.get_mut(&g) {
            if f.alive {
                f.crashed = true;
                f.die(ExitInfo::Signal(9));
            }
        }
    }

    /// Moves the clock to the machine's next deadline (if any) and tells it.
    pub fn advance_to_timeout(&mut self) -> bool {
        let Some(t) = self.m.poll_timeout() else {
            return false;
        };
        self.now = self.now.max(t);
        self.m.handle_timeout(self.now);
        self.drain_actions();
        true
    }

    pub fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
        if self.m.poll_timeout().is_some_and(|t| t <= self.now) {
            self.m.handle_timeout(self.now);
            self.drain_actions();
        }
    }

    /// Runs every client and delivers everything, in generation order, until nothing
    /// moves without time passing.
    pub fn settle(&mut self) {
        loop {
            let gens: Vec<Generation> = self.fakes.keys().copied().collect();
            let mut moved = false;
            for g in gens {
                while self.run_fake(g) {
                    moved = true;
                }
                while self.deliver(g) {
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Settles, then lets time pass deadline by deadline, up to `limit` of virtual time.
    pub fn run(&mut self, limit: Duration) {
        let end = self.now + limit;
        loop {
            self.settle();
            match self.m.poll_timeout() {
                Some(t) if t <= end => {
                    self.advance_to_timeout();
                }
                _ => return,
            }
        }
    }

    pub fn phase(&self) -> PhaseKind {
        self.m.phase()
    }
}
