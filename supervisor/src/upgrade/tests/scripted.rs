//! One upgrade at a time against scripted fake clients: the happy paths (resend, drain,
//! forced drain), every rollback cause, a crash of either side at every step, hangs, and
//! the restart of a successor that dies after the commit.

use std::time::Duration;

use handover_proto::control::UpgradeReport;
use handover_proto::message::{FreezeMode, Generation, capability};

use super::sim::{
    Fault, MISSING_BINARY, NEW_BINARY, OLD_BINARY, Point, Script, Seen, Sim, hello_all,
    hello_delta, init_reply,
};
use crate::upgrade::{Outcome, PhaseKind, Timings};

const LONG: Duration = Duration::from_secs(600);

fn upgraded(sim: &Sim) -> UpgradeReport {
    match sim.reports().as_slice() {
        [Outcome::Upgraded(r)] => r.clone(),
        other => panic!("expected one Upgraded report, got {other:?}"),
    }
}

fn rolled_back(sim: &Sim) -> UpgradeReport {
    match sim.reports().as_slice() {
        [Outcome::RolledBack(r)] => r.clone(),
        other => panic!("expected one RolledBack report, got {other:?}"),
    }
}

/// Runs one upgrade to `new` (scripted by `new_script`) from an acknowledging old client.
fn upgrade_with(new_script: Script, resend: bool, force_drain: bool) -> Sim {
    let mut sim = Sim::new(Script::ack("1.0"), resend);
    sim.scripts.push_back(new_script);
    sim.request(Some(NEW_BINARY), force_drain).expect("request");
    sim.run(LONG);
    sim
}

#[test]
fn upgrade_in_resend_mode_follows_the_protocol_order() {
    let sim = upgrade_with(Script::ack("2.0"), true, false);
    let r = upgraded(&sim);
    assert_eq!(r.old_generation, Generation(1));
    assert_eq!(r.new_generation, Generation(2));
    assert_eq!(
        (r.old_version.as_str(), r.new_version.as_str()),
        ("1.0", "2.0")
    );
    assert_eq!(r.mode, Some(FreezeMode::Resend));
    assert_eq!(r.handed_over_requests, 3);
    // Freeze at t0, FirstServed 700 µs after Serve, no virtual time in between.
    assert_eq!(r.pause_us, 700);
    assert_eq!(r.reason, None);
    let sent = sim.sent();
    let order: Vec<(u64, &str)> = sent.into_iter().filter(|(_, n)| *n != "State").collect();
    assert_eq!(
        order,
        vec![
            // Right after the new client's Prepared: the log it will read into.
            (2, "RequestLog"),
            (1, "PreFlush"),
            (1, "Freeze(resend)"),
            (2, "Init"),
            (1, "Commit"),
            (2, "Serve"),
        ]
    );
    // RESEND after the old client's exit was handled and before Serve.
    let resend = sim
        .seen
        .iter()
        .position(|s| *s == Seen::Resend)
        .expect("resend");
    let serve = sim
        .seen
        .iter()
        .position(|s| *s == Seen::Sent(Generation(2), "Serve"))
        .expect("serve");
    assert!(resend < serve);
    assert!(!sim.fake(1).alive);
    assert_eq!(sim.fake(2).got_state, sim.fake(1).export());
    assert_eq!(sim.m.serving().generation, Generation(2));
    assert_eq!(sim.m.serving().binary.to_str(), Some(NEW_BINARY));
    assert_eq!(sim.m.stats().upgrades, 1);
    assert_eq!(sim.m.stats().last_pause, Some(Duration::from_micros(700)));
    assert_eq!(sim.phase(), PhaseKind::Idle);
}

#[test]
fn a_state_of_several_chunks_is_forwarded_whole() {
    let mut sim = Sim::new(
        Script {
            state_len: 3 * handover_proto::state::CHUNK_BYTES + 17,
            ..Script::ack("1.0")
        },
        true,
    );
    sim.request(None, false).expect("request");
    sim.run(LONG);
    upgraded(&sim);
    assert_eq!(
        sim.sent()
            .iter()
            .filter(|(g, n)| *g == 2 && *n == "State")
            .count(),
        4
    );
    assert_eq!(sim.fake(2).got_state, sim.fake(1).export());
    // Same binary by default.
    assert_eq!(sim.m.serving().binary.to_str(), Some(OLD_BINARY));
}

#[test]
fn drain_mode_without_kernel_resend_and_when_forced() {
    for (resend, force) in [(false, false), (true, true)] {
        let sim = upgrade_with(Script::ack("2.0"), resend, force);
        let r = upgraded(&sim);
        assert_eq!(
            r.mode,
            Some(FreezeMode::Drain),
            "resend {resend} force {force}"
        );
        assert!(!sim.seen.contains(&Seen::Resend), "no RESEND in drain mode");
        // Without resend both clients read into the supervisor's request log: a lock wait
        // is handed over through it. A drain forced on a resend kernel is a plain one.
        let freeze = if resend {
            "Freeze(drain)"
        } else {
            "Freeze(drain-log)"
        };
        assert!(sim.sent().contains(&(1, freeze)), "{:?}", sim.sent());
    }
    // A successor that cannot use the log: a plain drain.
    let mut old_build = Script::ack("2.0");
    old_build
        .hello
        .capabilities
        .retain(|c| c != capability::REQUEST_LOG);
    let sim = upgrade_with(old_build, false, false);
    assert_eq!(upgraded(&sim).mode, Some(FreezeMode::Drain));
    assert!(sim.sent().contains(&(1, "Freeze(drain)")));
    assert!(!sim.sent().contains(&(2, "RequestLog")));
}

#[test]
fn pause_is_until_serve_when_no_request_comes() {
    let sim = upgrade_with(
        Script {
            first_request_after: None,
            ..Script::ack("2.0")
        },
        true,
        false,
    );
    let r = upgraded(&sim);
    assert_eq!(
        r.pause_us, 0,
        "no virtual time passed between the freeze and Serve"
    );
    // The report waits for the confirmation window.
    assert_eq!(
        r.total_us,
        Timings::default().confirm_window.as_micros() as u64
    );
}

#[test]
fn missing_binary_rolls_back_before_anything_is_paused() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.request(Some(MISSING_BINARY), false).expect("request");
    sim.run(LONG);
    let r = rolled_back(&sim);
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains(MISSING_BINARY) && reason.contains("No such file"),
        "{reason}"
    );
    assert_eq!(r.pause_us, 0);
    assert_eq!(r.new_generation, Generation(1));
    assert!(
        !sim.sent().iter().any(|(g, _)| *g == 1),
        "the old client was never touched"
    );
    assert_eq!(sim.m.stats().rollbacks, 1);
    assert_eq!(
        sim.m.stats().last_rollback.as_deref(),
        Some(reason.as_str())
    );
    // The next upgrade uses a new generation number.
    sim.request(Some(NEW_BINARY), false)
        .expect("second request");
    sim.run(LONG);
    assert_eq!(sim.reports().len(), 2);
    assert!(matches!(sim.reports()[1], Outcome::Upgraded(r) if r.new_generation == Generation(3)));
}

/// The old client serves on: it is alive, reads, is not frozen, and is the one serving.
fn assert_old_serves(sim: &Sim) {
    let old = sim.fake(1);
    assert!(old.alive && old.reading && !old.frozen, "{old:?}");
    assert_eq!(sim.m.serving().generation, Generation(1));
    assert_eq!(sim.phase(), PhaseKind::Idle);
    for (g, f) in &sim.fakes {
        if *g != Generation(1) {
            assert!(!f.alive, "generation {g} still runs");
        }
    }
}

fn rollback_reason(new_script: Script) -> String {
    let sim = upgrade_with(new_script, true, false);
    let r = rolled_back(&sim);
    assert_old_serves(&sim);
    r.reason.unwrap_or_default()
}

#[test]
fn every_rollback_cause_leaves_the_old_client_serving() {
    let ack = || Script::ack("2.0");
    let cases: Vec<(&str, Script, &str)> = vec![
        (
            "exits at start",
            ack().with_fault(Point::Start, Fault::Crash),
            "exited",
        ),
        (
            "fails at start",
            ack().with_fault(Point::Start, Fault::Fail),
            "fake failure",
        ),
        (
            "wrong state version",
            Script {
                hello: handover_proto::message::Hello {
                    state_versions: vec![2],
                    ..hello_all()
                },
                ..ack()
            },
            "state version mismatch",
        ),
        (
            "no takeover",
            Script {
                hello: handover_proto::message::Hello {
                    state_versions: vec![1],
                    capabilities: vec![capability::DRAIN.into()],
                },
                ..ack()
            },
            "capability mismatch",
        ),
        (
            "other session",
            Script {
                session: Some(5),
                ..ack()
            },
            "session 5",
        ),
        (
            "bad INIT reply",
            Script {
                init_reply: Some(init_reply(1 << 24)),
                ..ack()
            },
            "INIT parameters mismatch: max_write 16777216 instead of 1048576",
        ),
        (
            "state import fails",
            ack().with_fault(Point::Init, Fault::Fail),
            "fake failure at Some(Init)",
        ),
        (
            "crashes on a chunk",
            ack().with_fault(Point::StateChunk, Fault::Crash),
            "exited",
        ),
        (
            "crashes at Init",
            ack().with_fault(Point::Init, Fault::Crash),
            "before it was ready",
        ),
        (
            "hangs at start",
            ack().with_fault(Point::Start, Fault::Hang),
            "timed out after 30s waiting for Prepared",
        ),
        (
            "hangs at Init",
            ack().with_fault(Point::Init, Fault::Hang),
            "waiting for InitReply",
        ),
    ];
    for (what, script, needle) in cases {
        let reason = rollback_reason(script);
        assert!(
            reason.contains(needle),
            "{what}: {reason:?} lacks {needle:?}"
        );
    }
}

#[test]
fn a_rollback_after_the_freeze_thaws_and_measures_the_frozen_time() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.scripts
        .push_back(Script::ack("2.0").with_fault(Point::Init, Fault::Hang));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    let r = rolled_back(&sim);
    // Frozen at t0 (after Prepared and PreFlushed, no time passed), thawed at the
    // 30 s deadline.
    assert_eq!(r.pause_us, 30_000_000);
    assert!(sim.sent().contains(&(1, "Thaw")));
    assert!(sim.sent().contains(&(2, "Shutdown")));
    // The hung new client ignored Shutdown and was killed after the grace period.
    assert!(sim.seen.contains(&Seen::Killed(Generation(2))));
    assert_old_serves(&sim);
}

#[test]
fn old_client_faults_before_the_freeze_roll_back() {
    for (point, fault, needle) in [
        (Point::PreFlush, Fault::Fail, "the old client failed"),
        (Point::Freeze, Fault::Fail, "could not freeze"),
        (Point::PreFlush, Fault::Hang, "waiting for PreFlushed"),
    ] {
        let mut sim = Sim::new(Script::ack("1.0").with_fault(point, fault.clone()), true);
        sim.request(Some(NEW_BINARY), false).expect("request");
        sim.run(LONG);
        match sim.reports().as_slice() {
            [Outcome::RolledBack(r)] => {
                let reason = r.reason.clone().unwrap_or_default();
                assert!(reason.contains(needle), "{point:?} {fault:?}: {reason}");
            }
            other => panic!("{point:?} {fault:?}: {other:?}"),
        }
        assert!(!sim.fake(2).alive, "the new client is stopped");
        assert_eq!(sim.phase(), PhaseKind::Idle);
    }
}

#[test]
fn old_client_failing_and_exiting_before_the_freeze_is_restarted_without_a_state() {
    let mut sim = Sim::new(
        Script::ack("1.0").with_fault(Point::PreFlush, Fault::Fail),
        true,
    );
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    assert!(
        matches!(sim.reports().as_slice(), [Outcome::RolledBack(_)]),
        "{:?}",
        sim.reports()
    );
    assert!(!sim.fake(2).alive, "the new client is stopped");
    assert_eq!(sim.phase(), PhaseKind::Idle);
    let serving = sim.m.serving().generation;
    assert_eq!(sim.fakes[&serving].binary.to_str(), Some(OLD_BINARY));
    assert!(sim.fakes[&serving].got_state.is_empty());
}

#[test]
fn old_client_dying_before_its_state_is_whole_is_restarted_without_a_state() {
    for point in [Point::PreFlush, Point::Freeze, Point::MidState] {
        let old = Script {
            state_len: 2 * handover_proto::state::CHUNK_BYTES,
            ..Script::ack("1.0")
        };
        let mut sim = Sim::new(old.with_fault(point, Fault::Crash), true);
        sim.request(Some(NEW_BINARY), false).expect("request");
        sim.run(LONG);
        assert_eq!(sim.phase(), PhaseKind::Idle, "{point:?}");
        match sim.reports().as_slice() {
            [Outcome::RolledBack(r)] => {
                let reason = r.reason.clone().unwrap_or_default();
                assert!(
                    reason.contains("exited unexpectedly"),
                    "{point:?}: {reason}"
                );
                assert!(reason.contains("without a state"), "{point:?}: {reason}");
            }
            other => panic!("{point:?}: {other:?}"),
        }
        assert!(!sim.fake(2).alive);
        // Generation 3, of the old binary, took over with empty tables.
        let serving = sim.m.serving().generation;
        assert_eq!(serving, Generation(3), "{point:?}");
        assert_eq!(sim.fakes[&serving].binary.to_str(), Some(OLD_BINARY));
        assert!(sim.fakes[&serving].got_state.is_empty());
        assert!(sim.seen.contains(&Seen::Resend));
    }
}

#[test]
fn old_client_dying_after_its_state_is_whole_is_as_good_as_a_commit() {
    for point in [Point::Frozen, Point::Commit] {
        let mut sim = Sim::new(Script::ack("1.0").with_fault(point, Fault::Crash), true);
        sim.request(Some(NEW_BINARY), false).expect("request");
        sim.run(LONG);
        let r = upgraded(&sim);
        assert_eq!(r.new_generation, Generation(2), "{point:?}");
        assert!(sim.seen.contains(&Seen::Resend));
        if point == Point::Frozen {
            assert!(
                !sim.sent().contains(&(1, "Commit")),
                "no Commit to a dead client"
            );
        }
    }
}

#[test]
fn old_client_that_does_not_exit_after_commit_is_killed_then_the_new_one_serves() {
    let mut sim = Sim::new(
        Script::ack("1.0").with_fault(Point::Commit, Fault::Hang),
        true,
    );
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    let r = upgraded(&sim);
    assert_eq!(r.new_generation, Generation(2));
    let kill = sim
        .seen
        .iter()
        .position(|s| *s == Seen::Killed(Generation(1)))
        .expect("killed");
    let resend = sim
        .seen
        .iter()
        .position(|s| *s == Seen::Resend)
        .expect("resend");
    assert!(kill < resend);
    // Frozen for the 5 s exit grace, then 700 µs to the first request.
    assert_eq!(r.pause_us, 5_000_700);
}

#[test]
fn new_client_dying_after_the_commit_is_replaced_by_the_old_binary_from_the_same_state() {
    for point in [Point::Commit, Point::Serve] {
        // Commit: the old client lingers after Commit (killed after the grace period)
        // and the new one is crashed meanwhile, before Serve. Serve: the new one dies
        // as it is told to serve.
        let old = Script::ack("1.0");
        let (old, new) = if point == Point::Commit {
            (
                old.with_fault(Point::Commit, Fault::Hang),
                Script::ack("2.0"),
            )
        } else {
            (
                old,
                Script::ack("2.0").with_fault(Point::Serve, Fault::Crash),
            )
        };
        let mut sim = Sim::new(old, true);
        sim.scripts.push_back(new);
        sim.request(Some(NEW_BINARY), false).expect("request");
        sim.settle();
        if point == Point::Commit {
            assert!(sim.sent().contains(&(1, "Commit")));
            assert!(!sim.sent().contains(&(2, "Serve")));
            sim.crash(Generation(2));
        }
        sim.run(LONG);
        let r = rolled_back(&sim);
        assert_eq!(r.new_generation, Generation(3), "{point:?}");
        assert_eq!(r.new_version, "1.0");
        let reason = r.reason.unwrap_or_default();
        assert!(
            reason.contains("generation 3 of the previous binary"),
            "{reason}"
        );
        assert_eq!(sim.fake(3).binary.to_str(), Some(OLD_BINARY));
        assert_eq!(sim.fake(3).got_state, sim.fake(1).export());
        assert!(sim.fake(3).reading);
        assert_eq!(sim.m.serving().generation, Generation(3));
        assert_eq!(sim.m.stats().restarts, 1);
        // One RESEND per client that took over.
        let resends = sim.seen.iter().filter(|s| **s == Seen::Resend).count();
        assert_eq!(resends, if point == Point::Serve { 2 } else { 1 });
    }
}

#[test]
fn failing_restarts_back_off_keep_the_mount_and_answer_the_upgrade() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.scripts
        .push_back(Script::ack("2.0").with_fault(Point::Serve, Fault::Crash));
    for _ in 0..4 {
        sim.scripts
            .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Crash));
    }
    sim.request(Some(NEW_BINARY), false).expect("request");
    // Attempts fail at +0, +100 ms, +300 ms (the upgrade is answered), +700 ms.
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.phase(), PhaseKind::Restarting);
    assert!(
        matches!(sim.reports().as_slice(), [Outcome::Failed { message }] if message.contains("restarts go on"))
    );
    // Backoff: 100, 200, 400, 800 ms between attempts 1..5; the fifth one works.
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert_eq!(sim.m.serving().generation, Generation(7));
    assert_eq!(sim.m.stats().restarts, 5);
    assert_eq!(sim.reports().len(), 1, "the upgrade was answered once");
}

#[test]
fn a_second_request_during_an_upgrade_is_refused() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.request(Some(NEW_BINARY), false).expect("first");
    assert!(
        sim.request(Some(NEW_BINARY), false)
            .unwrap_err()
            .contains("in progress")
    );
    sim.run(LONG);
    upgraded(&sim);
    assert_eq!(sim.requests, 1);
}

#[test]
fn cancel_rolls_back_before_the_commit_only() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.scripts
        .push_back(Script::ack("2.0").with_fault(Point::Init, Fault::Hang));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.settle();
    sim.m.handle_cancel(sim.now, "stopped by SIGTERM".into());
    sim.drain_actions();
    sim.run(LONG);
    let r = rolled_back(&sim);
    assert_eq!(r.reason.as_deref(), Some("stopped by SIGTERM"));
}

#[test]
fn session_end_during_an_upgrade_answers_and_stops() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.m.handle_message(
        sim.now,
        Generation(1),
        handover_proto::message::ToSupervisor::SessionEnded { error: None },
    );
    sim.drain_actions();
    assert_eq!(sim.phase(), PhaseKind::Ended);
    assert!(sim.seen.contains(&Seen::MountGone));
    assert!(matches!(sim.reports().as_slice(), [Outcome::Failed { .. }]));
}

#[test]
fn serving_client_crash_outside_an_upgrade_restarts_it_at_once_without_a_state() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.crash(Generation(1));
    let t0 = sim.now;
    sim.settle();
    assert_eq!(sim.phase(), PhaseKind::Idle);
    // No backoff before the first attempt (FirstServed came 700 µs after Serve).
    assert!(sim.now <= t0 + Duration::from_millis(1), "{:?}", sim.now);
    assert_eq!(sim.m.serving().generation, Generation(2));
    assert_eq!(sim.fake(2).binary.to_str(), Some(OLD_BINARY));
    assert!(sim.fake(2).got_state.is_empty());
    // Start (same session, checked by the sim), Init with the fd, RESEND, Serve.
    let to_2: Vec<&str> = sim
        .seen
        .iter()
        .filter_map(|s| match s {
            Seen::Sent(g, n) if *g == Generation(2) => Some(*n),
            Seen::Resend => Some("RESEND"),
            _ => None,
        })
        .collect();
    assert_eq!(to_2, vec!["RequestLog", "Init", "RESEND", "Serve"]);
    assert!(sim.reports().is_empty());
    let stats = sim.m.stats();
    assert_eq!(stats.restarts, 1);
    assert!(
        stats
            .last_crash
            .as_deref()
            .is_some_and(|c| c.contains("SIGKILL")),
        "{stats:?}"
    );
    // FirstServed came 700 µs after Serve.
    assert_eq!(stats.last_crash_pause, Some(Duration::from_micros(700)));
}

#[test]
fn without_resend_a_crash_restart_serves_without_writing_it() {
    let mut sim = Sim::new(Script::ack("1.0"), false);
    sim.crash(Generation(1));
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(2));
    assert!(!sim.seen.contains(&Seen::Resend));
}

#[test]
fn with_resend_disabled_nothing_is_resent_and_upgrades_hand_over_through_the_log() {
    let mut sim = Sim::resend_disabled(Script::ack("1.0"));
    assert!(sim.m.kernel_resend() && sim.m.resend_disabled() && !sim.m.resend());
    sim.crash(Generation(1));
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(2));
    assert!(!sim.seen.contains(&Seen::Resend), "a crash: no RESEND");
    sim.scripts.push_back(Script::ack("2.0"));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    assert_eq!(upgraded(&sim).mode, Some(FreezeMode::Drain));
    assert!(
        sim.sent().contains(&(2, "Freeze(drain-log)")),
        "{:?}",
        sim.sent()
    );
    assert!(!sim.seen.contains(&Seen::Resend), "an upgrade: no RESEND");
}

#[test]
fn with_resend_disabled_a_client_outside_the_log_is_still_resent() {
    // The serving client does not read into the supervisor's log (an adopted one whose
    // log could not be had, or an older build): its requests only come back by RESEND.
    let mut old_build = Script::ack("1.0");
    old_build
        .hello
        .capabilities
        .retain(|c| c != capability::REQUEST_LOG);
    let mut sim = Sim::resend_disabled(old_build);
    sim.crash(Generation(1));
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(2));
    assert!(sim.seen.contains(&Seen::Resend), "{:?}", sim.seen);
    // Generation 2 reads into the log: its crash is answered from there, no RESEND.
    let resends = sim.seen.iter().filter(|s| **s == Seen::Resend).count();
    sim.crash(Generation(2));
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(3));
    assert_eq!(
        sim.seen.iter().filter(|s| **s == Seen::Resend).count(),
        resends
    );
}

#[test]
fn a_crash_loop_backs_off_and_says_why() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    for _ in 0..4 {
        sim.scripts
            .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Crash));
    }
    sim.crash(Generation(1));
    sim.settle();
    // Attempt 1 failed at once; attempt 2 waits 100 ms.
    let view = sim.m.restart_view().expect("restarting");
    assert_eq!(view.attempts, 1);
    assert!(!view.with_state);
    assert!(view.reason.contains("killed by SIGKILL"), "{view:?}");
    assert!(
        view.last_failure
            .as_deref()
            .is_some_and(|f| f.contains("killed by SIGSEGV")),
        "{view:?}"
    );
    assert_eq!(
        view.next_attempt,
        Some(sim.now + Duration::from_millis(100))
    );
    // 100, 200, 400, 800 ms: the fifth attempt serves.
    let t0 = sim.now;
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert!(sim.m.restart_view().is_none());
    assert_eq!(sim.m.serving().generation, Generation(6));
    assert_eq!(sim.m.stats().restarts, 5);
    assert!(sim.now >= t0 + Duration::from_millis(1500));
    assert!(sim.reports().is_empty());
}

#[test]
fn the_backoff_is_capped_and_requests_wait_without_end() {
    let timings = Timings::default();
    let mut sim = Sim::new(Script::ack("1.0"), true);
    for _ in 0..12 {
        sim.scripts
            .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Crash));
    }
    sim.crash(Generation(1));
    sim.run(Duration::from_secs(20));
    let view = sim.m.restart_view().expect("still restarting");
    let wait = view
        .next_attempt
        .expect("waiting")
        .saturating_since(sim.now);
    assert!(wait <= timings.backoff_max, "{wait:?}");
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert_eq!(sim.m.stats().restarts, 13);
}

#[test]
fn a_client_dying_soon_after_a_crash_restart_waits_longer() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    // Generation 2 serves no request before it dies: a crash loop.
    sim.scripts.push_back(Script {
        first_request_after: None,
        ..Script::ack("1.0")
    });
    sim.crash(Generation(1));
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.m.serving().generation, Generation(2));
    sim.advance(Duration::from_secs(2));
    sim.crash(Generation(2));
    sim.settle();
    let view = sim.m.restart_view().expect("restarting");
    assert_eq!(
        view.next_attempt,
        Some(sim.now + Duration::from_millis(100)),
        "a quick failure"
    );
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(3));
    // Long after the probation, a crash restarts at once again.
    sim.run(Duration::from_secs(120));
    sim.crash(Generation(3));
    let t = sim.now;
    sim.settle();
    assert_eq!(sim.m.serving().generation, Generation(4));
    assert!(sim.now <= t + Duration::from_millis(1), "no backoff");
}

#[test]
fn a_restarted_client_that_served_and_is_killed_again_is_replaced_at_once() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    for k in 1..=20u64 {
        sim.crash(Generation(k));
        let t = sim.now;
        sim.settle();
        assert_eq!(sim.m.serving().generation, Generation(k + 1));
        assert!(
            sim.now <= t + Duration::from_millis(1),
            "kill {k}: a backoff"
        );
        sim.advance(Duration::from_millis(50));
    }
    assert_eq!(sim.m.stats().restarts, 20);
}

#[test]
fn an_upgrade_during_a_crash_loop_runs_the_next_attempt_with_its_binary() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    for _ in 0..3 {
        sim.scripts
            .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Crash));
    }
    sim.crash(Generation(1));
    sim.settle();
    sim.run(Duration::from_millis(350));
    let view = sim.m.restart_view().expect("restarting");
    assert_eq!(view.attempts, 3);
    assert!(view.next_attempt.is_some());
    // The next attempt runs the new binary at once.
    let t = sim.now;
    sim.request(Some(NEW_BINARY), false)
        .expect("accepted while restarting");
    assert_eq!(
        sim.m.restart_view().map(|v| v.binary),
        Some(NEW_BINARY.into())
    );
    sim.settle();
    assert!(sim.now <= t + Duration::from_millis(1), "no backoff");
    assert_eq!(sim.phase(), PhaseKind::Idle);
    let serving = sim.m.serving().clone();
    assert_eq!(serving.binary.to_str(), Some(NEW_BINARY));
    let r = upgraded(&sim);
    assert_eq!(r.old_generation, Generation(1));
    assert_eq!(r.new_generation, serving.generation);
    assert_eq!(r.new_version, "2.0");
    assert_eq!(sim.m.stats().upgrades, 1);
    // A later crash restarts the new binary.
    sim.run(Duration::from_secs(60));
    sim.crash(serving.generation);
    sim.run(LONG);
    assert_eq!(sim.m.serving().binary.to_str(), Some(NEW_BINARY));
}

#[test]
fn an_upgrade_during_a_restart_attempt_kills_it_and_starts_the_requested_binary() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.scripts
        .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Hang));
    sim.crash(Generation(1));
    sim.settle();
    assert_eq!(sim.m.restart_view().map(|v| v.next_attempt), Some(None));
    sim.request(Some(NEW_BINARY), false).expect("accepted");
    assert!(sim.seen.contains(&Seen::Killed(Generation(2))));
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(3));
    assert_eq!(sim.m.serving().binary.to_str(), Some(NEW_BINARY));
    upgraded(&sim);
}

#[test]
fn an_upgrade_to_a_binary_that_fails_too_is_answered_and_restarts_go_on() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    for _ in 0..8 {
        sim.scripts
            .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Crash));
    }
    sim.crash(Generation(1));
    sim.settle();
    sim.request(Some(NEW_BINARY), false).expect("accepted");
    sim.run(Duration::from_secs(2));
    assert!(
        matches!(sim.reports().as_slice(), [Outcome::Failed { message }] if message.contains("restarts go on")),
        "{:?}",
        sim.reports()
    );
    assert_eq!(sim.phase(), PhaseKind::Restarting);
    // Restarts go back to the binary they ran before the request.
    assert_eq!(
        sim.m.restart_view().map(|v| v.binary),
        Some(OLD_BINARY.into())
    );
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert_eq!(sim.m.serving().binary.to_str(), Some(OLD_BINARY));
}

#[test]
fn an_upgrade_to_a_missing_binary_during_restarts_is_answered_at_once() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.scripts
        .push_back(Script::ack("1.0").with_fault(Point::Start, Fault::Crash));
    sim.crash(Generation(1));
    sim.settle();
    sim.request(Some(MISSING_BINARY), false).expect("accepted");
    assert!(
        matches!(sim.reports().as_slice(), [Outcome::Failed { message }] if message.contains("cannot start")),
        "{:?}",
        sim.reports()
    );
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert_eq!(sim.m.serving().binary.to_str(), Some(OLD_BINARY));
}

#[test]
fn client_options_change_with_an_upgrade_and_kernel_options_do_not() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    let req = crate::upgrade::UpgradeRequest {
        binary: None,
        timeout: Duration::from_secs(5),
        force_drain: false,
        options: crate::upgrade::ClientOptions {
            cache_dir: Some("/fast/cache".into()),
            cache_bytes: Some(42),
        },
    };
    sim.m.handle_request(sim.now, req).expect("request");
    sim.requests += 1;
    sim.drain_actions();
    sim.run(LONG);
    upgraded(&sim);
    let spec = &sim.m.serving().spec;
    assert_eq!(spec.cache_bytes, 42);
    assert_eq!(
        spec.cache_dir.as_deref(),
        Some(std::path::Path::new("/fast/cache"))
    );
    assert_eq!(spec.threads, super::sim::spec().threads);
}

#[test]
fn timings_are_honoured() {
    let timings = Timings {
        confirm_window: Duration::from_millis(10),
        ..Timings::default()
    };
    let mut sim = Sim::with_timings(Script::ack("1.0"), true, timings);
    sim.scripts.push_back(Script {
        first_request_after: None,
        ..Script::ack("2.0")
    });
    sim.request(None, false).expect("request");
    sim.run(LONG);
    assert_eq!(upgraded(&sim).total_us, 10_000);
}

#[test]
fn a_successor_dying_on_probation_gives_way_to_the_previous_binary_and_later_not() {
    let mut sim = Sim::new(Script::ack("1.0"), true);
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(Duration::from_secs(1));
    upgraded(&sim);
    // Within the probation: restarted from the handed-over state, old binary.
    sim.advance(Duration::from_secs(5));
    sim.crash(Generation(2));
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert_eq!(sim.m.serving().generation, Generation(3));
    assert_eq!(sim.fake(3).binary.to_str(), Some(OLD_BINARY));
    assert_eq!(sim.fake(3).got_state, sim.fake(1).export());
    assert_eq!(sim.m.stats().restarts, 1);
    assert_eq!(sim.reports().len(), 1, "nobody waits for an answer");
    // The restarted client is on probation too; after it, a death is a crash: the
    // serving binary restarts without a state.
    sim.run(Duration::from_secs(60));
    assert_eq!(sim.m.poll_timeout(), None, "the state was dropped");
    sim.crash(Generation(3));
    sim.run(LONG);
    assert_eq!(sim.phase(), PhaseKind::Idle);
    assert_eq!(sim.m.serving().generation, Generation(4));
    assert_eq!(sim.fake(4).binary.to_str(), Some(OLD_BINARY));
    assert!(sim.fake(4).got_state.is_empty());
}

fn delta(version: &str) -> Script {
    Script {
        hello: hello_delta(),
        state_len: 3 * handover_proto::state::CHUNK_BYTES,
        ..Script::ack(version)
    }
}

#[test]
fn a_delta_handover_moves_the_base_before_the_freeze_and_the_changes_inside_it() {
    let mut sim = Sim::new(delta("1.0"), true);
    sim.scripts.push_back(delta("2.0"));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    upgraded(&sim);
    let sent = sim.sent();
    let at = |g: u64, n: &str| sent.iter().position(|s| *s == (g, n)).expect(n);
    assert!(!sent.contains(&(1, "PreFlush")));
    // The whole base reached the new client before the old one was frozen.
    let last_base = sent
        .iter()
        .rposition(|s| *s == (2, "BaseState"))
        .expect("base");
    assert!(at(1, "PreExport") < at(2, "BaseState"));
    assert!(last_base < at(1, "Freeze(resend)"));
    assert!(at(1, "Freeze(resend)") < at(2, "State"));
    assert_eq!(sim.fake(2).got_base, sim.fake(1).export());
    assert_eq!(sim.fake(2).got_state, sim.fake(1).export_delta());
    // The changes are small: one chunk inside the freeze.
    assert_eq!(sent.iter().filter(|s| **s == (2, "State")).count(), 1);
    assert_eq!(sim.m.serving().generation, Generation(2));
}

#[test]
fn a_whole_state_when_only_one_side_can_hand_over_changes() {
    for (old, new) in [
        (delta("1.0"), Script::ack("2.0")),
        (Script::ack("1.0"), delta("2.0")),
    ] {
        let mut sim = Sim::new(old, true);
        sim.scripts.push_back(new);
        sim.request(Some(NEW_BINARY), false).expect("request");
        sim.run(LONG);
        upgraded(&sim);
        let sent = sim.sent();
        assert!(sent.contains(&(1, "PreFlush")));
        assert!(!sent.contains(&(1, "PreExport")) && !sent.contains(&(2, "BaseState")));
        assert_eq!(sim.fake(2).got_state, sim.fake(1).export());
    }
}

#[test]
fn a_base_the_new_client_refuses_rolls_back_and_thaws_the_old_one() {
    let mut sim = Sim::new(delta("1.0"), true);
    sim.scripts
        .push_back(delta("2.0").with_fault(Point::BaseState, Fault::Fail));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    let r = rolled_back(&sim);
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("cannot take over the base state"),
        "{reason}"
    );
    let sent = sim.sent();
    assert!(!sent.iter().any(|(_, n)| n.starts_with("Freeze")));
    // The old client drops the base it recorded changes for.
    assert!(sent.contains(&(1, "Thaw")));
    assert!(sim.fake(1).base_out.is_none());
    assert_eq!(sim.m.serving().generation, Generation(1));
    // The next upgrade starts over from a new base.
    sim.scripts.push_back(delta("2.0"));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    assert_eq!(sim.m.serving().generation, Generation(3));
    assert_eq!(sim.fake(3).got_base, sim.fake(1).export());
    let whole = handover_proto::state::merge(1, &sim.fake(1).export(), &sim.fake(1).export_delta())
        .expect("merge");
    assert_eq!(sim.fake(3).handed(), whole);
}

#[test]
fn a_successor_dying_after_a_delta_commit_restarts_from_the_merged_state() {
    let mut sim = Sim::new(delta("1.0"), true);
    sim.scripts
        .push_back(delta("2.0").with_fault(Point::Serve, Fault::Crash));
    sim.request(Some(NEW_BINARY), false).expect("request");
    sim.run(LONG);
    rolled_back(&sim);
    // The restarted client (the old binary) gets the whole state in State chunks.
    let restarted = sim.fake(3);
    assert_eq!(restarted.binary.to_str(), Some(OLD_BINARY));
    assert!(restarted.got_base.is_empty());
    let whole = handover_proto::state::merge(1, &sim.fake(1).export(), &sim.fake(1).export_delta())
        .expect("merge");
    assert_eq!(restarted.got_state, whole);
    assert!(restarted.reading);
}
