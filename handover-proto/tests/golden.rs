//! Golden files: today's code must read every released format.
//!
//! `tests/fixtures/v1/` holds one frame per message variant of frame format 1.0 and one
//! client state of schema v1, written once by the first release of those formats. This
//! test builds the value each file must decode to and checks that it does — and that
//! today's encoder still writes the same body bytes, so that a reader of the released
//! format reads what this build sends.
//!
//! The files are never regenerated: a missing file is written only when
//! `BATON_WRITE_FIXTURES=1` is set (for a variant added by a new minor version), an
//! existing file is never overwritten, and a file that no longer decodes to its value is
//! a broken compatibility promise, not a fixture to update. See
//! `tests/fixtures/README.md`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use handover_proto::WireMessage;
use handover_proto::channel::{decode_frame, encode_frame};
use handover_proto::control::{
    ClientHealth, ControlRequest, ControlResponse, FuseMode, MountDescription, MountStatus,
    UpgradeReport,
};
use handover_proto::frame::{self, HEADER_LEN};
use handover_proto::keeper::{FromKeeper, ToKeeper};
use handover_proto::message::{
    Adoption, FreezeMode, Generation, Hello, MountSpec, StateChunk, ToClient, ToSupervisor,
    capability,
};
use handover_proto::state::v1::{ClientStateV1, DirHandleV1, FileHandleV1};
use handover_proto::state::{self, ClientState, StateDelta, StateDeltaV1};

/// Set to `1` to write fixtures that are missing (never to rewrite one).
const WRITE_ENV: &str = "BATON_WRITE_FIXTURES";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

// --- the values ------------------------------------------------------------------------

const SESSION: u64 = 0x5e55_1011;

fn spec() -> MountSpec {
    MountSpec {
        volume: "datasets".into(),
        meta_url: "redb:///var/lib/baton/volumes/datasets/meta.redb".into(),
        mountpoint: PathBuf::from("/mnt/datasets"),
        home: PathBuf::from("/var/lib/baton"),
        threads: 4,
        attr_ttl_ms: 1000,
        entry_ttl_ms: 1000,
        cache_dir: Some(PathBuf::from("/var/cache/baton")),
        cache_bytes: 1 << 30,
    }
}

/// The INIT request of a Linux 6.18 kernel (ABI 7.45, FUSE_HAS_RESEND offered).
fn init_request() -> Vec<u8> {
    let mut b = Vec::with_capacity(104);
    b.extend_from_slice(&104u32.to_le_bytes());
    b.extend_from_slice(&26u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    for v in [7u32, 45, 128 << 10, 0x73ff_fffb, 0x5fd] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.resize(104, 0);
    b
}

/// A successful INIT reply to it (80 bytes): max_write 1 MiB, max_pages 256.
fn init_reply() -> Vec<u8> {
    let mut b = Vec::with_capacity(80);
    b.extend_from_slice(&80u32.to_le_bytes());
    b.extend_from_slice(&0i32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    for v in [7u32, 45, 128 << 10, 0x4000_8079] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(&12u16.to_le_bytes());
    b.extend_from_slice(&(1u32 << 20).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&256u16.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&0x0000_0080u32.to_le_bytes());
    b.resize(80, 0);
    b
}

fn report(rolled_back: bool) -> UpgradeReport {
    UpgradeReport {
        old_generation: Generation(2),
        old_version: "0.1.0".into(),
        new_generation: Generation(if rolled_back { 2 } else { 3 }),
        new_version: if rolled_back { "0.1.0" } else { "0.2.0" }.into(),
        mode: Some(if rolled_back {
            FreezeMode::Drain
        } else {
            FreezeMode::Resend
        }),
        pause_us: if rolled_back { 0 } else { 2_150 },
        handed_over_requests: if rolled_back { 0 } else { 3 },
        total_us: 184_000,
        reason: rolled_back.then(|| "successor exited with status 127 before Prepared".into()),
    }
}

fn to_client(name: &str) -> ToClient {
    match name {
        "Start" => ToClient::Start {
            generation: Generation(3),
            spec: spec(),
            resume_session: Some(SESSION),
        },
        "Init" => ToClient::Init {
            request: init_request(),
        },
        "Serve" => ToClient::Serve,
        "Shutdown" => ToClient::Shutdown,
        "PreFlush" => ToClient::PreFlush,
        "Freeze" => ToClient::Freeze {
            mode: FreezeMode::Resend,
            state_version: 1,
        },
        "Thaw" => ToClient::Thaw,
        "Commit" => ToClient::Commit,
        "State" => ToClient::State(StateChunk {
            index: 1,
            total: 3,
            data: (0..=255).collect(),
        }),
        "Adopt" => ToClient::Adopt {
            supervisor_pid: 1300,
        },
        "Detach" => ToClient::Detach,
        "RequestLog" => ToClient::RequestLog,
        "SendRequestLog" => ToClient::SendRequestLog,
        "PreExport" => ToClient::PreExport { state_version: 1 },
        "BaseState" => ToClient::BaseState(StateChunk {
            index: 2,
            total: 3,
            data: (0..=255).rev().collect(),
        }),
        other => panic!("no fixture value for ToClient::{other}"),
    }
}

fn to_supervisor(name: &str) -> ToSupervisor {
    match name {
        "Prepared" => ToSupervisor::Prepared {
            pid: 4242,
            version: "0.2.0".into(),
            hello: Hello {
                state_versions: vec![1],
                capabilities: vec![
                    capability::PARK_RESEND.into(),
                    capability::DRAIN.into(),
                    capability::TAKEOVER.into(),
                ],
            },
            session: SESSION,
        },
        "Failed" => ToSupervisor::Failed {
            reason: "cannot open the metadata engine: permission denied (os error 13)".into(),
        },
        "InitReply" => ToSupervisor::InitReply {
            reply: init_reply(),
        },
        "ShutdownDone" => ToSupervisor::ShutdownDone { error: None },
        "SessionEnded" => ToSupervisor::SessionEnded {
            error: Some("flushing inode 1234: object storage unreachable".into()),
        },
        "PreFlushed" => ToSupervisor::PreFlushed { error: None },
        "State" => ToSupervisor::State(StateChunk {
            index: 0,
            total: 3,
            data: vec![0xab; 40],
        }),
        "Frozen" => ToSupervisor::Frozen {
            parked: 3,
            drained: 0,
        },
        "FreezeFailed" => ToSupervisor::FreezeFailed {
            reason: "flushing inode 1234 timed out".into(),
        },
        "Thawed" => ToSupervisor::Thawed,
        "FirstServed" => ToSupervisor::FirstServed {
            monotonic_ns: 123_456_789_012,
        },
        "Adopted" => ToSupervisor::Adopted(Box::new(Adoption {
            pid: 4242,
            version: "0.2.0".into(),
            hello: Hello {
                state_versions: vec![1],
                capabilities: vec![
                    capability::PARK_RESEND.into(),
                    capability::DRAIN.into(),
                    capability::TAKEOVER.into(),
                ],
            },
            session: SESSION,
            generation: Generation(3),
            spec: spec(),
            init_request: init_request(),
            init_reply: init_reply(),
            journal: true,
        })),
        "RequestLog" => ToSupervisor::RequestLog { held: true },
        "BaseStaged" => ToSupervisor::BaseStaged {
            error: Some("the base is of volume 0b7c, this client serves volume 9e2f".into()),
        },
        other => panic!("no fixture value for ToSupervisor::{other}"),
    }
}

fn control_request(name: &str) -> ControlRequest {
    match name {
        "Umount" => ControlRequest::Umount { lazy: false },
        "Status" => ControlRequest::Status,
        "Upgrade" => ControlRequest::Upgrade {
            binary: Some(PathBuf::from("/usr/local/bin/baton-fs-0.2.0")),
            timeout_ms: 30_000,
            force_drain: false,
            cache_dir: None,
            cache_bytes: Some(2 << 30),
        },
        "Health" => ControlRequest::Health,
        "UpgradeSupervisor" => ControlRequest::UpgradeSupervisor {
            binary: PathBuf::from("/usr/local/bin/baton-0.2.0"),
            timeout_ms: 60_000,
        },
        "HandOver" => ControlRequest::HandOver { timeout_ms: 30_000 },
        "TookOver" => ControlRequest::TookOver,
        "Describe" => ControlRequest::Describe,
        other => panic!("no fixture value for ControlRequest::{other}"),
    }
}

fn adoption() -> Adoption {
    Adoption {
        pid: 1200,
        version: "0.2.0".into(),
        hello: Hello {
            state_versions: vec![1],
            capabilities: vec![capability::PARK_RESEND.into(), capability::DRAIN.into()],
        },
        session: SESSION,
        generation: Generation(4),
        spec: spec(),
        init_request: init_request(),
        init_reply: init_reply(),
        journal: true,
    }
}

fn to_keeper(name: &str) -> ToKeeper {
    match name {
        "Deposit" => ToKeeper::Deposit(Box::new(adoption())),
        "Withdraw" => ToKeeper::Withdraw {
            mountpoint: PathBuf::from("/var/lib/baton-csi/mnt/3cc9d6b76dd55a344d84"),
        },
        "DepositRequestLog" => ToKeeper::DepositRequestLog {
            mountpoint: PathBuf::from("/var/lib/baton-csi/mnt/3cc9d6b76dd55a344d84"),
        },
        "WithdrawRequestLog" => ToKeeper::WithdrawRequestLog {
            mountpoint: PathBuf::from("/var/lib/baton-csi/mnt/3cc9d6b76dd55a344d84"),
        },
        other => panic!("no fixture value for ToKeeper::{other}"),
    }
}

fn from_keeper(name: &str) -> FromKeeper {
    match name {
        "Kept" => FromKeeper::Kept,
        "Refused" => FromKeeper::Refused {
            reason: "the deposit names /mnt/x, which is not a Baton mount".into(),
        },
        "Deposited" => FromKeeper::Deposited(Box::new(adoption())),
        "Nothing" => FromKeeper::Nothing,
        "RequestLog" => FromKeeper::RequestLog,
        other => panic!("no fixture value for FromKeeper::{other}"),
    }
}

fn mount_status() -> MountStatus {
    MountStatus {
        mountpoint: PathBuf::from("/mnt/datasets"),
        volume: "datasets".into(),
        meta_url: "redb:///var/lib/baton/volumes/datasets/meta.redb".into(),
        supervisor_pid: 1200,
        generation: Generation(3),
        client_pid: 4242,
        client_version: "0.2.0".into(),
        uptime_ms: 86_400_000,
        fuse_minor: 45,
        max_write: 1 << 20,
        resend: true,
        upgrades: 2,
        rollbacks: 1,
        restarts: 0,
        last_pause_us: Some(2_150),
        last_rollback: Some("timeout after 30 s waiting for Prepared".into()),
    }
}

fn control_response(name: &str) -> ControlResponse {
    match name {
        "Health" => ControlResponse::Health {
            status: MountStatus {
                restarts: 4,
                ..mount_status()
            },
            health: ClientHealth {
                state: "restarting".into(),
                reason: Some(
                    "the client (generation 3) exited unexpectedly (killed by SIGKILL); attempt 4 failed: the client exited (killed by SIGKILL)".into(),
                ),
                restart_attempts: 4,
                next_attempt_ms: Some(800),
                last_crash: Some(
                    "the client (generation 3) exited unexpectedly (killed by SIGKILL)".into(),
                ),
                last_crash_pause_us: Some(41_000),
            },
        },
        "Umounted" => ControlResponse::Umounted { flush_error: None },
        "Busy" => ControlResponse::Busy,
        "Status" => ControlResponse::Status(MountStatus {
            mountpoint: PathBuf::from("/mnt/datasets"),
            volume: "datasets".into(),
            meta_url: "redb:///var/lib/baton/volumes/datasets/meta.redb".into(),
            supervisor_pid: 1200,
            generation: Generation(3),
            client_pid: 4242,
            client_version: "0.2.0".into(),
            uptime_ms: 86_400_000,
            fuse_minor: 45,
            max_write: 1 << 20,
            resend: true,
            upgrades: 2,
            rollbacks: 1,
            restarts: 0,
            last_pause_us: Some(2_150),
            last_rollback: Some("timeout after 30 s waiting for Prepared".into()),
        }),
        "Upgraded" => ControlResponse::Upgraded(report(false)),
        "RolledBack" => ControlResponse::RolledBack(report(true)),
        "Error" => ControlResponse::Error {
            message: "another upgrade is in progress".into(),
        },
        "SupervisorUpgraded" => ControlResponse::SupervisorUpgraded {
            old_pid: 1200,
            new_pid: 1300,
            new_version: "0.2.0".into(),
        },
        "HandingOver" => ControlResponse::HandingOver {
            supervisor_pid: 1200,
        },
        "HandedOver" => ControlResponse::HandedOver,
        "Description" => ControlResponse::Description(Box::new(MountDescription {
            status: MountStatus {
                fuse_minor: 37,
                resend: false,
                ..mount_status()
            },
            health: ClientHealth {
                state: "serving".into(),
                reason: None,
                restart_attempts: 0,
                next_attempt_ms: None,
                last_crash: Some(
                    "the client (generation 2) exited unexpectedly (killed by SIGKILL)".into(),
                ),
                last_crash_pause_us: Some(38_000),
            },
            fuse: FuseMode {
                kernel_resend: false,
                resend_disabled: false,
                request_log: true,
            },
        })),
        other => panic!("no fixture value for ControlResponse::{other}"),
    }
}

fn client_state(name: &str) -> ClientState {
    match name {
        "V1" => ClientState::V1(ClientStateV1 {
            generation: 2,
            session: SESSION,
            volume_uuid: "0b7c5d1e-9a3f-4c2b-8e6d-5f4a3b2c1d0e".into(),
            spec: spec(),
            init_request: init_request(),
            init_reply: init_reply(),
            lookups: vec![
                (1, 1),
                (2, 3),
                (1_000_003, 1),
                (1_000_004, 2),
                (u64::MAX, 1),
            ],
            files: vec![
                FileHandleV1 {
                    fh: 0x8000_0000_0000_0101,
                    ino: 1_000_003,
                    flags: libc::O_RDONLY,
                    lock_owners: vec![],
                },
                FileHandleV1 {
                    fh: 0x8000_0000_0000_0202,
                    ino: 1_000_004,
                    flags: libc::O_WRONLY | libc::O_APPEND,
                    lock_owners: vec![0xdead_beef],
                },
                FileHandleV1 {
                    fh: 0x8000_0000_0000_0303,
                    ino: 2,
                    flags: libc::O_RDWR | libc::O_CREAT,
                    lock_owners: vec![7, 8],
                },
            ],
            dirs: vec![
                DirHandleV1 {
                    fh: 0x4000_0000_0000_0404,
                    ino: 1,
                    cursor: 0,
                },
                DirHandleV1 {
                    fh: 0x4000_0000_0000_0505,
                    ino: 2,
                    cursor: 17,
                },
            ],
            orphans: vec![1_000_004, 1_000_005],
            next_handle: 6,
        }),
        other => panic!("no fixture value for ClientState::{other}"),
    }
}

fn state_delta(name: &str) -> StateDelta {
    match name {
        "V1" => StateDelta::V1(StateDeltaV1 {
            generation: 2,
            session: SESSION,
            lookups: vec![(2, 0), (1_000_006, 1)],
            files: vec![FileHandleV1 {
                fh: 0x8000_0000_0000_0606,
                ino: 1_000_006,
                flags: libc::O_RDWR,
                lock_owners: vec![9],
            }],
            dirs: vec![],
            closed: vec![0x8000_0000_0000_0303, 0x4000_0000_0000_0505],
            orphans: vec![1_000_004],
            next_handle: 7,
        }),
        other => panic!("no fixture value for StateDelta::{other}"),
    }
}

/// The frame format minor version that added a message fixture's variant.
fn minor_of(file: &str) -> u16 {
    const SINCE_1_1: &[&str] = &[
        "to_client.pre_export.bin",
        "to_client.base_state.bin",
        "to_supervisor.base_staged.bin",
    ];
    u16::from(SINCE_1_1.contains(&file))
}

// --- the check -------------------------------------------------------------------------

/// `PreFlush` -> `pre_flush`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Decodes a fixture file with today's code and compares it with the expected value.
type Check = Box<dyn Fn(&[u8]) -> Result<(), String>>;

/// What one fixture file must hold.
struct Fixture {
    file: String,
    /// The encoding by today's code.
    bytes: Vec<u8>,
    /// Decodes the file with today's code and compares it with the expected value.
    check: Check,
    /// Whether `bytes` is a frame (else a bare state encoding).
    framed: bool,
}

fn message_fixtures<M: WireMessage + PartialEq + 'static>(
    prefix: &str,
    names: &[&'static str],
    value: fn(&str) -> M,
    name_of: fn(&M) -> &'static str,
) -> Vec<Fixture> {
    names
        .iter()
        .map(|&name| {
            let expected = value(name);
            assert_eq!(
                name_of(&expected),
                name,
                "fixture value of the wrong variant"
            );
            Fixture {
                file: format!("{prefix}.{}.bin", snake(name)),
                bytes: encode_frame(&expected).expect("encode"),
                check: Box::new(move |bytes| match decode_frame::<M>(bytes) {
                    Ok(got) if got == expected => Ok(()),
                    Ok(got) => Err(format!("decodes to {got:?}, expected {expected:?}")),
                    Err(e) => Err(format!("does not decode: {e:?}")),
                }),
                framed: true,
            }
        })
        .collect()
}

fn all_fixtures() -> Vec<Fixture> {
    let mut all = Vec::new();
    all.extend(message_fixtures(
        "to_client",
        TO_CLIENT,
        to_client,
        to_client_name,
    ));
    all.extend(message_fixtures(
        "to_supervisor",
        TO_SUPERVISOR,
        to_supervisor,
        to_supervisor_name,
    ));
    all.extend(message_fixtures(
        "control_request",
        CONTROL_REQUEST,
        control_request,
        control_request_name,
    ));
    all.extend(message_fixtures(
        "control_response",
        CONTROL_RESPONSE,
        control_response,
        control_response_name,
    ));
    all.extend(message_fixtures(
        "to_keeper",
        TO_KEEPER,
        to_keeper,
        to_keeper_name,
    ));
    all.extend(message_fixtures(
        "from_keeper",
        FROM_KEEPER,
        from_keeper,
        from_keeper_name,
    ));
    for &name in CLIENT_STATE {
        let expected = client_state(name);
        assert_eq!(client_state_name(&expected), name);
        all.push(Fixture {
            file: format!("state.{}.bin", snake(name)),
            bytes: state::encode(&expected).expect("encode"),
            check: Box::new(move |bytes| match state::decode(bytes) {
                Ok(got) if got == expected => Ok(()),
                Ok(got) => Err(format!("decodes to {got:?}, expected {expected:?}")),
                Err(e) => Err(format!("does not decode: {e:?}")),
            }),
            framed: false,
        });
    }
    for &name in STATE_DELTA {
        let expected = state_delta(name);
        assert_eq!(state_delta_name(&expected), name);
        all.push(Fixture {
            file: format!("state_delta.{}.bin", snake(name)),
            bytes: state::encode_delta(&expected).expect("encode"),
            check: Box::new(move |bytes| match state::decode_delta(bytes) {
                Ok(got) if got == expected => Ok(()),
                Ok(got) => Err(format!("decodes to {got:?}, expected {expected:?}")),
                Err(e) => Err(format!("does not decode: {e:?}")),
            }),
            framed: false,
        });
    }
    all
}

/// Writes `bytes` to `path` unless the file exists (never overwrites).
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[test]
fn todays_code_reads_every_released_fixture() {
    let dir = dir();
    let write = std::env::var(WRITE_ENV).is_ok_and(|v| v == "1");
    let fixtures = all_fixtures();
    let mut problems = Vec::new();
    let mut written = Vec::new();

    for f in &fixtures {
        let path = dir.join(&f.file);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && write => {
                fs::create_dir_all(&dir).expect("create the fixtures directory");
                write_new(&path, &f.bytes).expect("write the fixture");
                written.push(f.file.clone());
                continue;
            }
            Err(e) => {
                problems.push(format!(
                    "{}: {e} (a fixture for a variant added since the last release is written once with {WRITE_ENV}=1)",
                    f.file
                ));
                continue;
            }
        };
        if let Err(e) = (f.check)(&bytes) {
            problems.push(format!("{}: {e}", f.file));
            continue;
        }
        // The body today's encoder writes for the same value is byte for byte the
        // released one (the header may differ in its minor version only).
        if f.framed {
            let (h, body) = frame::decode(&bytes).expect("checked above");
            assert_eq!(&bytes[..4], b"BTON");
            assert_eq!(
                (h.major, h.minor),
                (1, minor_of(&f.file)),
                "{}: a v1 fixture of the format that added it",
                f.file
            );
            if body != &f.bytes[HEADER_LEN..] {
                problems.push(format!(
                    "{}: today's encoder writes another body for the same value",
                    f.file
                ));
            }
        } else if bytes != f.bytes {
            problems.push(format!(
                "{}: today's encoder writes other bytes for the same state",
                f.file
            ));
        }
    }

    // Nothing in the directory that the test does not know: a fixture whose variant was
    // removed is a removed variant, which a released format does not allow.
    let known: BTreeSet<&str> = fixtures.iter().map(|f| f.file.as_str()).collect();
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries {
            let name = e.expect("read the fixtures directory").file_name();
            let name = name.to_string_lossy();
            if !known.contains(name.as_ref()) {
                problems.push(format!("{name}: a fixture no variant claims"));
            }
        }
    }

    if !written.is_empty() {
        eprintln!("wrote {} new fixtures: {written:?}", written.len());
    }
    assert!(
        problems.is_empty(),
        "golden fixtures in {}:\n  {}",
        dir.display(),
        problems.join("\n  ")
    );
}

/// One fixture per variant of every type: the variant lists are exhaustive matches in
/// `common`, so a new variant cannot be added without a fixture value here.
#[test]
fn every_variant_has_a_fixture() {
    let files: BTreeSet<String> = all_fixtures().into_iter().map(|f| f.file).collect();
    let expected = TO_CLIENT.len()
        + TO_SUPERVISOR.len()
        + CONTROL_REQUEST.len()
        + CONTROL_RESPONSE.len()
        + TO_KEEPER.len()
        + FROM_KEEPER.len()
        + CLIENT_STATE.len()
        + STATE_DELTA.len();
    assert_eq!(files.len(), expected);
    assert!(files.contains("to_client.pre_flush.bin"));
    assert!(files.contains("state.v1.bin"));
}

/// The fixture values are realistic: the INIT bytes in them parse, and the state in
/// `state.v1.bin` survives the chunked transfer.
#[test]
fn fixture_values_are_consistent() {
    use handover_proto::fuse_init::{InitReply, InitRequest};
    let r = InitRequest::parse(&init_request()).expect("request");
    assert!(r.has_resend());
    let p = InitReply::parse(&init_reply(), r.unique).expect("reply");
    assert_eq!((p.max_write, p.max_pages), (1 << 20, 256));

    let bytes = state::encode(&client_state("V1")).expect("encode");
    let mut a = state::Assembler::default();
    let mut out = None;
    for c in state::split(&bytes) {
        out = a.push(c).expect("in order");
    }
    assert_eq!(out.as_deref(), Some(&bytes[..]));

    // The delta fixture applies to the state fixture: lookup of inode 2 gone, inode
    // 1_000_006 added, handles 0x..0303 and 0x..0505 closed, one file opened.
    let ClientState::V1(base) = client_state("V1");
    let StateDelta::V1(delta) = state_delta("V1");
    let mut whole = base.clone();
    delta.apply(&mut whole).expect("same base");
    assert_eq!(
        whole.lookups,
        vec![
            (1, 1),
            (1_000_003, 1),
            (1_000_004, 2),
            (1_000_006, 1),
            (u64::MAX, 1)
        ]
    );
    let fhs: Vec<u64> = whole.files.iter().map(|f| f.fh).collect();
    assert_eq!(
        fhs,
        vec![
            0x8000_0000_0000_0101,
            0x8000_0000_0000_0202,
            0x8000_0000_0000_0606
        ]
    );
    assert_eq!(whole.dirs.len(), 1);
    assert_eq!(
        (whole.orphans.clone(), whole.next_handle),
        (vec![1_000_004], 7)
    );
    let merged = state::merge(
        1,
        &state::encode(&client_state("V1")).expect("encode"),
        &state::encode_delta(&state_delta("V1")).expect("encode"),
    )
    .expect("merge");
    assert_eq!(
        state::decode(&merged).expect("decode"),
        ClientState::V1(whole)
    );
    // A delta of another exporter does not apply.
    let mut other = delta;
    other.generation += 1;
    let mut untouched = base.clone();
    assert!(matches!(
        other.apply(&mut untouched),
        Err(state::StateError::OtherBase { .. })
    ));
    assert_eq!(untouched, base);
}
