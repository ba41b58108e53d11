//! Shared by the integration tests: proptest strategies that produce every variant of
//! every message and state type, and exhaustive variant names that make a new variant a
//! compile error here until a strategy (and a golden fixture) covers it.

#![allow(dead_code)] // Each test file uses its own part of this module.

use std::path::PathBuf;

use handover_proto::control::{
    ClientHealth, ControlRequest, ControlResponse, FuseMode, MountDescription, MountStatus,
    UpgradeReport,
};
use handover_proto::keeper::{FromKeeper, ToKeeper};
use handover_proto::message::{
    Adoption, FreezeMode, Generation, Hello, MountSpec, StateChunk, ToClient, ToSupervisor,
    capability,
};
use handover_proto::state::v1::{ClientStateV1, DirHandleV1, FileHandleV1};
use handover_proto::state::{ClientState, StateDelta, StateDeltaV1};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

// ---------------------------------------------------------------------------------------
// Variant names. Each match is exhaustive on purpose: adding a variant breaks the build
// here, and the list beside the match is what the coverage tests compare against.

pub const TO_CLIENT: &[&str] = &[
    "Start",
    "Init",
    "Serve",
    "Shutdown",
    "PreFlush",
    "Freeze",
    "Thaw",
    "Commit",
    "State",
    "Adopt",
    "Detach",
    "RequestLog",
    "SendRequestLog",
    "PreExport",
    "BaseState",
];

pub fn to_client_name(m: &ToClient) -> &'static str {
    match m {
        ToClient::Start { .. } => "Start",
        ToClient::Init { .. } => "Init",
        ToClient::Serve => "Serve",
        ToClient::Shutdown => "Shutdown",
        ToClient::PreFlush => "PreFlush",
        ToClient::Freeze { .. } => "Freeze",
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

pub const TO_SUPERVISOR: &[&str] = &[
    "Prepared",
    "Failed",
    "InitReply",
    "ShutdownDone",
    "SessionEnded",
    "PreFlushed",
    "State",
    "Frozen",
    "FreezeFailed",
    "Thawed",
    "FirstServed",
    "Adopted",
    "RequestLog",
    "BaseStaged",
];

pub fn to_supervisor_name(m: &ToSupervisor) -> &'static str {
    match m {
        ToSupervisor::Prepared { .. } => "Prepared",
        ToSupervisor::Failed { .. } => "Failed",
        ToSupervisor::InitReply { .. } => "InitReply",
        ToSupervisor::ShutdownDone { .. } => "ShutdownDone",
        ToSupervisor::SessionEnded { .. } => "SessionEnded",
        ToSupervisor::PreFlushed { .. } => "PreFlushed",
        ToSupervisor::State(_) => "State",
        ToSupervisor::Frozen { .. } => "Frozen",
        ToSupervisor::FreezeFailed { .. } => "FreezeFailed",
        ToSupervisor::Thawed => "Thawed",
        ToSupervisor::FirstServed { .. } => "FirstServed",
        ToSupervisor::Adopted(_) => "Adopted",
        ToSupervisor::RequestLog { .. } => "RequestLog",
        ToSupervisor::BaseStaged { .. } => "BaseStaged",
    }
}

pub const CONTROL_REQUEST: &[&str] = &[
    "Umount",
    "Status",
    "Upgrade",
    "Health",
    "UpgradeSupervisor",
    "HandOver",
    "TookOver",
    "Describe",
];

pub fn control_request_name(m: &ControlRequest) -> &'static str {
    match m {
        ControlRequest::Umount { .. } => "Umount",
        ControlRequest::Status => "Status",
        ControlRequest::Upgrade { .. } => "Upgrade",
        ControlRequest::Health => "Health",
        ControlRequest::UpgradeSupervisor { .. } => "UpgradeSupervisor",
        ControlRequest::HandOver { .. } => "HandOver",
        ControlRequest::TookOver => "TookOver",
        ControlRequest::Describe => "Describe",
    }
}

pub const CONTROL_RESPONSE: &[&str] = &[
    "Umounted",
    "Busy",
    "Status",
    "Upgraded",
    "RolledBack",
    "Error",
    "Health",
    "SupervisorUpgraded",
    "HandingOver",
    "HandedOver",
    "Description",
];

pub fn control_response_name(m: &ControlResponse) -> &'static str {
    match m {
        ControlResponse::Umounted { .. } => "Umounted",
        ControlResponse::Busy => "Busy",
        ControlResponse::Status(_) => "Status",
        ControlResponse::Upgraded(_) => "Upgraded",
        ControlResponse::RolledBack(_) => "RolledBack",
        ControlResponse::Error { .. } => "Error",
        ControlResponse::Health { .. } => "Health",
        ControlResponse::SupervisorUpgraded { .. } => "SupervisorUpgraded",
        ControlResponse::HandingOver { .. } => "HandingOver",
        ControlResponse::HandedOver => "HandedOver",
        ControlResponse::Description(_) => "Description",
    }
}

pub const TO_KEEPER: &[&str] = &[
    "Deposit",
    "Withdraw",
    "DepositRequestLog",
    "WithdrawRequestLog",
];

pub fn to_keeper_name(m: &ToKeeper) -> &'static str {
    match m {
        ToKeeper::Deposit(_) => "Deposit",
        ToKeeper::Withdraw { .. } => "Withdraw",
        ToKeeper::DepositRequestLog { .. } => "DepositRequestLog",
        ToKeeper::WithdrawRequestLog { .. } => "WithdrawRequestLog",
    }
}

pub const FROM_KEEPER: &[&str] = &["Kept", "Refused", "Deposited", "Nothing", "RequestLog"];

pub fn from_keeper_name(m: &FromKeeper) -> &'static str {
    match m {
        FromKeeper::Kept => "Kept",
        FromKeeper::Refused { .. } => "Refused",
        FromKeeper::Deposited(_) => "Deposited",
        FromKeeper::Nothing => "Nothing",
        FromKeeper::RequestLog => "RequestLog",
    }
}

pub const CLIENT_STATE: &[&str] = &["V1"];

pub const STATE_DELTA: &[&str] = &["V1"];

pub fn state_delta_name(d: &StateDelta) -> &'static str {
    match d {
        StateDelta::V1(_) => "V1",
    }
}

pub fn client_state_name(s: &ClientState) -> &'static str {
    match s {
        ClientState::V1(_) => "V1",
    }
}

// ---------------------------------------------------------------------------------------
// Strategies.

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{max}}}")).expect("valid regex")
}

fn path() -> impl Strategy<Value = PathBuf> {
    "/[a-z0-9/._-]{0,40}".prop_map(PathBuf::from)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

pub fn generation() -> impl Strategy<Value = Generation> {
    any::<u64>().prop_map(Generation)
}

pub fn spec() -> impl Strategy<Value = MountSpec> {
    (
        (text(20), text(40), path(), path()),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(path()),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (volume, meta_url, mountpoint, home),
                (threads, attr_ttl_ms, entry_ttl_ms, cache_dir, cache_bytes),
            )| MountSpec {
                volume,
                meta_url,
                mountpoint,
                home,
                threads,
                attr_ttl_ms,
                entry_ttl_ms,
                cache_dir,
                cache_bytes,
            },
        )
}

pub fn hello() -> impl Strategy<Value = Hello> {
    let known = prop_oneof![
        Just(capability::PARK_RESEND.to_string()),
        Just(capability::DRAIN.to_string()),
        Just(capability::TAKEOVER.to_string()),
        text(16),
    ];
    (
        proptest::collection::vec(any::<u16>(), 0..4),
        proptest::collection::vec(known, 0..5),
    )
        .prop_map(|(state_versions, capabilities)| Hello {
            state_versions,
            capabilities,
        })
}

pub fn freeze_mode() -> impl Strategy<Value = FreezeMode> {
    prop_oneof![
        Just(FreezeMode::Resend),
        Just(FreezeMode::Drain),
        Just(FreezeMode::DrainLog)
    ]
}

pub fn state_chunk() -> impl Strategy<Value = StateChunk> {
    (any::<u32>(), any::<u32>(), bytes(300)).prop_map(|(index, total, data)| StateChunk {
        index,
        total,
        data,
    })
}

pub fn to_client() -> impl Strategy<Value = ToClient> {
    prop_oneof![
        (generation(), spec(), proptest::option::of(any::<u64>())).prop_map(
            |(generation, spec, resume_session)| ToClient::Start {
                generation,
                spec,
                resume_session,
            }
        ),
        bytes(300).prop_map(|request| ToClient::Init { request }),
        Just(ToClient::Serve),
        Just(ToClient::Shutdown),
        Just(ToClient::PreFlush),
        (freeze_mode(), any::<u16>()).prop_map(|(mode, state_version)| ToClient::Freeze {
            mode,
            state_version
        }),
        Just(ToClient::Thaw),
        Just(ToClient::Commit),
        state_chunk().prop_map(ToClient::State),
        any::<u32>().prop_map(|supervisor_pid| ToClient::Adopt { supervisor_pid }),
        Just(ToClient::Detach),
        Just(ToClient::RequestLog),
        Just(ToClient::SendRequestLog),
        any::<u16>().prop_map(|state_version| ToClient::PreExport { state_version }),
        state_chunk().prop_map(ToClient::BaseState),
    ]
}

pub fn to_supervisor() -> impl Strategy<Value = ToSupervisor> {
    prop_oneof![
        (any::<u32>(), text(20), hello(), any::<u64>()).prop_map(
            |(pid, version, hello, session)| ToSupervisor::Prepared {
                pid,
                version,
                hello,
                session,
            }
        ),
        text(200).prop_map(|reason| ToSupervisor::Failed { reason }),
        bytes(300).prop_map(|reply| ToSupervisor::InitReply { reply }),
        proptest::option::of(text(50)).prop_map(|error| ToSupervisor::ShutdownDone { error }),
        proptest::option::of(text(50)).prop_map(|error| ToSupervisor::SessionEnded { error }),
        proptest::option::of(text(50)).prop_map(|error| ToSupervisor::PreFlushed { error }),
        state_chunk().prop_map(ToSupervisor::State),
        (any::<u32>(), any::<u32>())
            .prop_map(|(parked, drained)| ToSupervisor::Frozen { parked, drained }),
        text(100).prop_map(|reason| ToSupervisor::FreezeFailed { reason }),
        Just(ToSupervisor::Thawed),
        any::<u64>().prop_map(|monotonic_ns| ToSupervisor::FirstServed { monotonic_ns }),
        adoption().prop_map(|a| ToSupervisor::Adopted(Box::new(a))),
        any::<bool>().prop_map(|held| ToSupervisor::RequestLog { held }),
        proptest::option::of(text(50)).prop_map(|error| ToSupervisor::BaseStaged { error }),
    ]
}

pub fn adoption() -> impl Strategy<Value = Adoption> {
    (
        (any::<u32>(), text(20), hello(), any::<u64>(), generation()),
        (spec(), bytes(120), bytes(90), any::<bool>()),
    )
        .prop_map(
            |(
                (pid, version, hello, session, generation),
                (spec, init_request, init_reply, journal),
            )| {
                Adoption {
                    pid,
                    version,
                    hello,
                    session,
                    generation,
                    spec,
                    init_request,
                    init_reply,
                    journal,
                }
            },
        )
}

pub fn to_keeper() -> impl Strategy<Value = ToKeeper> {
    prop_oneof![
        adoption().prop_map(|a| ToKeeper::Deposit(Box::new(a))),
        path().prop_map(|mountpoint| ToKeeper::Withdraw { mountpoint }),
        path().prop_map(|mountpoint| ToKeeper::DepositRequestLog { mountpoint }),
        path().prop_map(|mountpoint| ToKeeper::WithdrawRequestLog { mountpoint }),
    ]
}

pub fn from_keeper() -> impl Strategy<Value = FromKeeper> {
    prop_oneof![
        Just(FromKeeper::Kept),
        Just(FromKeeper::Nothing),
        text(80).prop_map(|reason| FromKeeper::Refused { reason }),
        adoption().prop_map(|a| FromKeeper::Deposited(Box::new(a))),
        Just(FromKeeper::RequestLog),
    ]
}

pub fn control_request() -> impl Strategy<Value = ControlRequest> {
    prop_oneof![
        any::<bool>().prop_map(|lazy| ControlRequest::Umount { lazy }),
        Just(ControlRequest::Status),
        Just(ControlRequest::Health),
        any::<u64>().prop_map(|timeout_ms| ControlRequest::HandOver { timeout_ms }),
        Just(ControlRequest::TookOver),
        Just(ControlRequest::Describe),
        (path(), any::<u64>()).prop_map(|(binary, timeout_ms)| {
            ControlRequest::UpgradeSupervisor { binary, timeout_ms }
        }),
        (
            proptest::option::of(path()),
            any::<u64>(),
            any::<bool>(),
            proptest::option::of(path()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(binary, timeout_ms, force_drain, cache_dir, cache_bytes)| {
                    ControlRequest::Upgrade {
                        binary,
                        timeout_ms,
                        force_drain,
                        cache_dir,
                        cache_bytes,
                    }
                }
            ),
    ]
}

pub fn mount_status() -> impl Strategy<Value = MountStatus> {
    (
        (
            path(),
            text(20),
            text(40),
            any::<u32>(),
            generation(),
            any::<u32>(),
        ),
        (
            text(20),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(text(60)),
        ),
    )
        .prop_map(
            |(
                (mountpoint, volume, meta_url, supervisor_pid, generation, client_pid),
                (client_version, uptime_ms, fuse_minor, max_write, resend),
                (upgrades, rollbacks, restarts, last_pause_us, last_rollback),
            )| MountStatus {
                mountpoint,
                volume,
                meta_url,
                supervisor_pid,
                generation,
                client_pid,
                client_version,
                uptime_ms,
                fuse_minor,
                max_write,
                resend,
                upgrades,
                rollbacks,
                restarts,
                last_pause_us,
                last_rollback,
            },
        )
}

pub fn client_health() -> impl Strategy<Value = ClientHealth> {
    (
        text(20),
        proptest::option::of(text(80)),
        any::<u32>(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(text(60)),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                state,
                reason,
                restart_attempts,
                next_attempt_ms,
                last_crash,
                last_crash_pause_us,
            )| ClientHealth {
                state,
                reason,
                restart_attempts,
                next_attempt_ms,
                last_crash,
                last_crash_pause_us,
            },
        )
}

pub fn upgrade_report() -> impl Strategy<Value = UpgradeReport> {
    (
        (generation(), text(20), generation(), text(20)),
        (
            proptest::option::of(freeze_mode()),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            proptest::option::of(text(60)),
        ),
    )
        .prop_map(
            |(
                (old_generation, old_version, new_generation, new_version),
                (mode, pause_us, handed_over_requests, total_us, reason),
            )| UpgradeReport {
                old_generation,
                old_version,
                new_generation,
                new_version,
                mode,
                pause_us,
                handed_over_requests,
                total_us,
                reason,
            },
        )
}

pub fn fuse_mode() -> impl Strategy<Value = FuseMode> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(kernel_resend, resend_disabled, request_log)| FuseMode {
            kernel_resend,
            resend_disabled,
            request_log,
        },
    )
}

pub fn control_response() -> impl Strategy<Value = ControlResponse> {
    prop_oneof![
        proptest::option::of(text(50))
            .prop_map(|flush_error| ControlResponse::Umounted { flush_error }),
        Just(ControlResponse::Busy),
        Just(ControlResponse::HandedOver),
        any::<u32>().prop_map(|supervisor_pid| ControlResponse::HandingOver { supervisor_pid }),
        mount_status().prop_map(ControlResponse::Status),
        upgrade_report().prop_map(ControlResponse::Upgraded),
        upgrade_report().prop_map(ControlResponse::RolledBack),
        text(50).prop_map(|message| ControlResponse::Error { message }),
        (mount_status(), client_health())
            .prop_map(|(status, health)| ControlResponse::Health { status, health }),
        (mount_status(), client_health(), fuse_mode()).prop_map(|(status, health, fuse)| {
            ControlResponse::Description(Box::new(MountDescription {
                status,
                health,
                fuse,
            }))
        }),
        (any::<u32>(), any::<u32>(), text(20)).prop_map(|(old_pid, new_pid, new_version)| {
            ControlResponse::SupervisorUpgraded {
                old_pid,
                new_pid,
                new_version,
            }
        }),
    ]
}

pub fn file_handle() -> impl Strategy<Value = FileHandleV1> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<i32>(),
        proptest::collection::vec(any::<u64>(), 0..3),
    )
        .prop_map(|(fh, ino, flags, lock_owners)| FileHandleV1 {
            fh,
            ino,
            flags,
            lock_owners,
        })
}

pub fn dir_handle() -> impl Strategy<Value = DirHandleV1> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(fh, ino, cursor)| DirHandleV1 {
        fh,
        ino,
        cursor,
    })
}

pub fn client_state_v1() -> impl Strategy<Value = ClientStateV1> {
    (
        (any::<u64>(), any::<u64>(), text(36), spec()),
        (bytes(120), bytes(90)),
        (
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..40),
            proptest::collection::vec(file_handle(), 0..20),
            proptest::collection::vec(dir_handle(), 0..10),
            proptest::collection::vec(any::<u64>(), 0..10),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                (generation, session, volume_uuid, spec),
                (init_request, init_reply),
                (lookups, files, dirs, orphans, next_handle),
            )| ClientStateV1 {
                generation,
                session,
                volume_uuid,
                spec,
                init_request,
                init_reply,
                lookups,
                files,
                dirs,
                orphans,
                next_handle,
            },
        )
}

pub fn state_delta_v1() -> impl Strategy<Value = StateDeltaV1> {
    (
        (any::<u64>(), any::<u64>()),
        (
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..40),
            proptest::collection::vec(file_handle(), 0..20),
            proptest::collection::vec(dir_handle(), 0..10),
            proptest::collection::vec(any::<u64>(), 0..10),
            proptest::collection::vec(any::<u64>(), 0..10),
            any::<u32>(),
        ),
    )
        .prop_map(
            |((generation, session), (lookups, files, dirs, closed, orphans, next_handle))| {
                StateDeltaV1 {
                    generation,
                    session,
                    lookups,
                    files,
                    dirs,
                    closed,
                    orphans,
                    next_handle,
                }
            },
        )
}

pub fn state_delta() -> impl Strategy<Value = StateDelta> {
    prop_oneof![state_delta_v1().prop_map(StateDelta::V1)]
}

pub fn client_state() -> impl Strategy<Value = ClientState> {
    prop_oneof![client_state_v1().prop_map(ClientState::V1)]
}

/// `n` values of `strategy`, the same on every run.
pub fn draw<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>, n: usize) -> Vec<T> {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    (0..n)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("strategy draws a value")
                .current()
        })
        .collect()
}

/// The variant names seen in `n` values of `strategy`.
pub fn names_drawn<T: std::fmt::Debug>(
    strategy: impl Strategy<Value = T>,
    name: fn(&T) -> &'static str,
    n: usize,
) -> std::collections::BTreeSet<&'static str> {
    draw(strategy, n).iter().map(name).collect()
}
