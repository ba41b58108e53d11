//! Property tests: random interleavings of client steps, message deliveries, crashes,
//! time, upgrade requests and cancellations, with randomly misbehaving clients. The sim
//! checks on every step that at most one client may read, that RESEND and `Serve` happen
//! only when none does, that generations only grow, that `Serve` goes to a client holding
//! the last exported state, and that the mount is given up only when a client died with
//! no complete state to restart from. At the end, with time passing and well-behaved
//! clients, every upgrade got exactly one answer and exactly the serving client reads.

use std::time::Duration;

use handover_proto::message::{Generation, Hello, capability};
use proptest::prelude::*;

use super::sim::{
    Fault, MISSING_BINARY, NEW_BINARY, Point, Script, Seen, Sim, hello_all, hello_delta, init_reply,
};
use crate::upgrade::{Outcome, PhaseKind};

#[derive(Clone, Debug)]
enum Op {
    RunClient(usize),
    Deliver(usize),
    Crash(usize),
    Advance(u64),
    Timeout,
    Request { binary: u8, drain: bool },
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        24 => any::<usize>().prop_map(Op::RunClient),
        24 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Crash),
        2 => (0u64..2_000).prop_map(Op::Advance),
        1 => Just(Op::Timeout),
        3 => (0u8..7, any::<bool>()).prop_map(|(binary, drain)| Op::Request { binary, drain }),
        1 => Just(Op::Cancel),
    ]
}

fn point() -> impl Strategy<Value = Point> {
    prop_oneof![
        Just(Point::Start),
        Just(Point::PreFlush),
        Just(Point::BaseState),
        Just(Point::Freeze),
        Just(Point::MidState),
        Just(Point::Frozen),
        Just(Point::StateChunk),
        Just(Point::Init),
        Just(Point::Commit),
        Just(Point::Serve),
        Just(Point::Thaw),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![Just(Fault::Crash), Just(Fault::Hang), Just(Fault::Fail)]
}

fn script() -> impl Strategy<Value = Script> {
    let hello = prop_oneof![
        6 => Just(hello_all()),
        4 => Just(hello_delta()),
        1 => Just(Hello { state_versions: vec![2], ..hello_all() }),
        1 => Just(Hello { state_versions: vec![1], capabilities: vec![capability::DRAIN.into()] }),
        // A build that predates the request log.
        1 => Just(Hello {
            capabilities: hello_all()
                .capabilities
                .into_iter()
                .filter(|c| c != capability::REQUEST_LOG)
                .collect(),
            ..hello_all()
        }),
        1 => Just(Hello {
            state_versions: vec![1, 2],
            capabilities: vec![capability::PARK_RESEND.into(), capability::TAKEOVER.into()],
        }),
    ];
    (
        hello,
        proptest::option::weighted(0.5, (point(), fault())),
        proptest::bool::weighted(0.1),
        proptest::option::weighted(0.7, 0u64..2_000),
        0usize..1_200_000,
    )
        .prop_map(|(hello, fault, bad_init, first, state_len)| Script {
            version: "x".into(),
            hello,
            session: None,
            fault,
            init_reply: bad_init.then(|| init_reply(4096)),
            state_len,
            first_request_after: first.map(Duration::from_micros),
        })
}

/// The `i`-th (modulo) client for which `f` holds.
fn pick(sim: &Sim, i: usize, f: impl Fn(&super::sim::Fake) -> bool) -> Option<Generation> {
    let gens: Vec<Generation> = sim
        .fakes
        .values()
        .filter(|x| f(x))
        .map(|x| x.generation)
        .collect();
    (!gens.is_empty()).then(|| gens[i % gens.len()])
}

/// `resend`: the kernel offers it; `disabled`: the mount was made with `--no-resend`.
fn play(first: Script, resend: bool, disabled: bool, scripts: Vec<Script>, ops: Vec<Op>) {
    let mut sim = if disabled {
        Sim::resend_disabled(first)
    } else {
        Sim::new(first, resend)
    };
    sim.scripts.extend(scripts);
    for op in ops {
        match op {
            Op::RunClient(i) => {
                if let Some(g) = pick(&sim, i, |f| f.alive && !f.hung && !f.inbox.is_empty()) {
                    sim.run_fake(g);
                }
            }
            Op::Deliver(i) => {
                if let Some(g) = pick(&sim, i, |f| !f.outbox.is_empty() || f.exit.is_some()) {
                    sim.deliver(g);
                }
            }
            Op::Crash(i) => {
                if let Some(g) = pick(&sim, i, |f| f.alive) {
                    sim.crash(g);
                }
            }
            Op::Advance(ms) => sim.advance(Duration::from_millis(ms)),
            Op::Timeout => {
                sim.advance_to_timeout();
            }
            Op::Request { binary, drain } => {
                let b = match binary {
                    0 | 1 => None,
                    6 => Some(MISSING_BINARY),
                    _ => Some(NEW_BINARY),
                };
                let _ = sim.request(b, drain);
            }
            Op::Cancel => {
                sim.m.handle_cancel(sim.now, "cancelled".into());
                sim.drain_actions();
            }
        }
    }
    // From now on: well-behaved newcomers, time passes.
    sim.scripts.clear();
    sim.run(Duration::from_secs(3600));

    let phase = sim.phase();
    assert!(
        matches!(phase, PhaseKind::Idle),
        "ended in {phase:?} after {:#?}",
        sim.seen
    );
    assert_eq!(
        sim.reports().len(),
        sim.requests,
        "every upgrade is answered exactly once: {:?}",
        sim.reports()
    );
    for o in sim.reports() {
        if let Outcome::Upgraded(r) | Outcome::RolledBack(r) = o {
            let serve = Seen::Sent(r.new_generation, "Serve");
            assert!(
                r.new_generation == Generation(1) || sim.seen.contains(&serve),
                "reported generation {} never served",
                r.new_generation
            );
        }
    }
    if phase == PhaseKind::Idle {
        let readers: Vec<Generation> = sim
            .fakes
            .values()
            .filter(|f| f.alive && f.reading)
            .map(|f| f.generation)
            .collect();
        assert_eq!(readers, vec![sim.m.serving().generation]);
        let serving = &sim.fakes[&sim.m.serving().generation];
        assert!(
            !serving.frozen || serving.hung,
            "the serving client is frozen"
        );
        assert!(
            sim.fakes.values().filter(|f| f.alive).count() == 1,
            "only the serving client runs: {:?}",
            sim.fakes
                .values()
                .filter(|f| f.alive)
                .map(|f| f.generation)
                .collect::<Vec<_>>()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_guarantees(
        first in script(),
        resend in any::<bool>(),
        disabled in any::<bool>(),
        scripts in proptest::collection::vec(script(), 0..6),
        ops in proptest::collection::vec(op(), 0..160),
    ) {
        // The first client is the one that serves: it has the full vocabulary; faults
        // still apply to its handover steps.
        let first = Script { hello: hello_all(), init_reply: None, ..first };
        play(first, resend, disabled, scripts, ops);
    }

    /// One kill -9 of the old or the new client at any moment of an upgrade, in any
    /// interleaving: the upgrade is answered once, and a client serves again (restarted
    /// without a state if the old one died before its whole state reached the
    /// supervisor).
    #[test]
    fn one_crash_at_any_moment_of_an_upgrade(
        resend in any::<bool>(),
        drain in any::<bool>(),
        victim_is_old in any::<bool>(),
        crash_after in 0usize..40,
        picks in proptest::collection::vec(any::<usize>(), 40),
        state_len in prop_oneof![Just(10usize), Just(1_100_000usize)],
    ) {
        let mut sim = Sim::new(Script { state_len, ..Script::ack("1.0") }, resend);
        sim.request(Some(NEW_BINARY), drain).expect("request");
        let mut steps = 0;
        for i in picks {
            if steps == crash_after {
                break;
            }
            let movable = |f: &super::sim::Fake| {
                (f.alive && !f.hung && !f.inbox.is_empty()) || !f.outbox.is_empty() || f.exit.is_some()
            };
            let Some(g) = pick(&sim, i, movable) else {
                // Let deadlines pass while the upgrade runs, not past its answer (the
                // probation after it ends; a death then is a plain crash).
                if !sim.reports().is_empty() || !sim.advance_to_timeout() {
                    break;
                }
                continue;
            };
            if !sim.run_fake(g) {
                sim.deliver(g);
            }
            steps += 1;
        }
        let victim = if victim_is_old { Generation(1) } else { Generation(2) };
        sim.crash(victim);
        sim.run(Duration::from_secs(3600));
        prop_assert_eq!(sim.reports().len(), 1);
        // Whoever died, a client serves again: with the last state or, when none was
        // whole, without one (a crash restart).
        prop_assert_eq!(sim.phase(), PhaseKind::Idle);
        let serving = sim.m.serving().generation;
        prop_assert!(sim.fakes[&serving].alive && sim.fakes[&serving].reading);
        prop_assert!(serving != victim, "the crashed client serves");
    }

    #[test]
    fn upgrades_with_well_behaved_clients_always_succeed(
        resend in any::<bool>(),
        drain in any::<bool>(),
        n in 1usize..5,
    ) {
        let mut sim = Sim::new(Script::ack("1.0"), resend);
        for i in 0..n {
            sim.request(Some(NEW_BINARY), drain).expect("request");
            sim.run(Duration::from_secs(60));
            prop_assert!(matches!(sim.reports()[i], Outcome::Upgraded(_)));
        }
        prop_assert_eq!(sim.m.serving().generation, Generation(1 + n as u64));
        prop_assert_eq!(sim.m.stats().upgrades, n as u64);
    }
}

/// Found by `random_interleavings_keep_the_guarantees` (2026-11-27): the serving client
/// (announcing state versions 1 and 2) dies right after it exported a version-2 state to
/// a successor; the clients restarted from that state announce only version 1. They
/// used to be refused on every attempt, forever; now they restart without a state.
#[test]
fn restarts_that_cannot_take_the_state_over_restart_without_it() {
    let plain = || Script {
        version: "x".into(),
        hello: hello_all(),
        session: None,
        fault: None,
        init_reply: None,
        state_len: 0,
        first_request_after: None,
    };
    let v12 = || Script {
        hello: Hello {
            state_versions: vec![1, 2],
            capabilities: vec![capability::PARK_RESEND.into(), capability::TAKEOVER.into()],
        },
        ..plain()
    };
    let scripts = vec![
        plain(),
        Script {
            fault: Some((Point::Frozen, Fault::Crash)),
            ..v12()
        },
        v12(),
    ];
    use Op::*;
    let ops = vec![
        Crash(0),
        Request {
            binary: 0,
            drain: false,
        },
        Deliver(0),
        RunClient(633107002328447491),
        Deliver(0),
        Timeout,
        RunClient(0),
        Deliver(3335467043521835473),
        RunClient(0),
        Advance(200),
        Request {
            binary: 0,
            drain: false,
        },
        RunClient(0),
        Deliver(0),
        Deliver(0),
        RunClient(0),
        Deliver(0),
        RunClient(0),
        Crash(0),
        RunClient(0),
        RunClient(0),
        RunClient(0),
        RunClient(0),
    ];
    play(plain(), true, false, scripts, ops);
}
