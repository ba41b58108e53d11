//! The gate every FUSE request passes before it touches the filesystem: how a client
//! freezes for a live upgrade, and thaws when the upgrade rolls back.
//!
//! fuser's worker threads each read one request, run its handler, and read again. A
//! handler calls [`Gate::enter`] first and holds the returned [`Pass`] until it has
//! replied. The gate is in one of three phases:
//!
//! - **Serving**: passes are handed out at once.
//! - **Frozen(Resend)** (kernels with FUSE_HAS_RESEND): a handler that enters *parks*: it
//!   blocks, holding its fuser reply object, neither executing nor answering, until
//!   [`Gate::thaw`] (then it executes) or until the process exits (the supervisor then has
//!   the kernel resend the request to the successor — safe only because it never ran).
//!   Dropping a fuser reply would answer EIO: a parked handler must never return.
//!   [`Gate::freeze`] returns once no handler is executing.
//! - **Frozen(Drain)** (kernels without resend): handlers execute normally, and after a
//!   handler has replied its thread parks, so it reads nothing more. [`Gate::freeze`]
//!   returns once every worker thread is parked; a thread blocked in read(/dev/fuse) is
//!   brought through a handler by the nudger the caller gives (the client stats magic
//!   names in the mount root, which the adapter answers ENOENT).
//! - **Frozen(DrainLog)**: a drain in which a request that is in the request log may also
//!   give way like in a resend freeze (below): it stays unanswered in the log, and the
//!   successor answers it from there (`super::reqlog`).
//!
//! A blocking lock wait is the one long operation that can give way: between two attempts
//! it calls [`Pass::wait`] (as a [`LockWait`]), which in a resend freeze parks the request
//! — it holds no lock and changed nothing, so the successor can run it again — and in a
//! DrainLog freeze does the same if the request is in the log. In a plain drain freeze it
//! keeps waiting; a drain that cannot finish times out at the supervisor, which thaws.
//!
//! Passes are of two kinds: a [`Worker`](PassKind::Worker)'s, held by one of fuser's
//! reader threads of /dev/fuse (the drain waits until every one of those is parked), and
//! a [`Recovery`](PassKind::Recovery) pass, held by a thread that answers a request a dead
//! predecessor left in the request log: it reads nothing from /dev/fuse, so it does not
//! park after its reply and is not counted among the workers.
//!
//! Every thaw starts a new *epoch*; a parked thread leaves when the epoch changes (and
//! parks again if a new freeze began meanwhile).

use std::sync::Arc;
use std::time::Duration;

use handover_proto::message::FreezeMode;
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::vfs::LockWait;

/// How long the nudger waits for a nudge to take effect before it nudges again.
const NUDGE_SETTLE: Duration = Duration::from_millis(2);

/// Who holds a pass (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    /// One of fuser's reader threads of /dev/fuse.
    Worker,
    /// A thread answering a request a predecessor left in the request log.
    Recovery,
}

/// Where the gate is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Frozen(FreezeMode),
}

/// What a completed freeze reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FreezeStats {
    /// Requests held unexecuted (resend mode).
    pub parked: u32,
    /// Requests finished since the freeze began (drain mode).
    pub drained: u32,
}

/// One freeze, from [`Gate::begin_freeze`] until the next thaw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreezeTicket {
    pub mode: FreezeMode,
    epoch: u64,
}

/// A freeze did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("the freeze was cancelled by a thaw")]
    Thawed,
    #[error("the gate is already frozen in {0:?} mode")]
    OtherMode(FreezeMode),
    #[error("cannot start the drain nudger thread")]
    Nudger(#[source] std::io::Error),
}

/// Brings a worker thread blocked in read(/dev/fuse) through a handler: one call makes
/// (at most) one request and may block until it is answered.
pub type Nudge = Arc<dyn Fn() + Send + Sync>;

type Hook = Box<dyn FnOnce() + Send>;

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Bumped by every thaw.
    epoch: u64,
    /// Handlers running now (not parked).
    executing: usize,
    /// Threads parked now (resend: each holds a request; drain: idle after a reply).
    parked: usize,
    /// Since the current freeze began: requests parked (resend), requests finished (drain).
    parked_requests: u32,
    drained: u32,
    /// Requests answered since the gate was made.
    answered: u64,
    /// Requests of a dead predecessor being answered from the request log and not
    /// answered yet (`super::recover`): a plain drain waits for them.
    recovering: usize,
}

/// The gate of one FUSE session. Share it as `Arc<Gate>` between the adapter and the
/// client runtime.
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
    /// fuser worker threads (a drain is complete when all of them are parked).
    workers: usize,
    /// Called once, after the next request is answered (a successor's FirstServed).
    on_answer: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("state", &*self.state.lock())
            .field("workers", &self.workers)
            .finish()
    }
}

impl Gate {
    /// A serving gate for a session with `workers` reader threads.
    pub fn new(workers: usize) -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(State {
                phase: Phase::Serving,
                epoch: 0,
                executing: 0,
                parked: 0,
                parked_requests: 0,
                drained: 0,
                answered: 0,
                recovering: 0,
            }),
            changed: Condvar::new(),
            workers: workers.max(1),
            on_answer: Mutex::new(None),
        })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    /// Requests answered through the gate so far.
    pub fn answered(&self) -> u64 {
        self.state.lock().answered
    }

    /// Threads parked now.
    pub fn parked(&self) -> usize {
        self.state.lock().parked
    }

    /// `n` requests of a dead predecessor are being answered from the request log.
    pub fn recovery_started(&self, n: usize) {
        self.state.lock().recovering += n;
    }

    /// One of them was answered (its reply reached the kernel), or given up.
    pub fn recovery_answered(&self) {
        let mut s = self.state.lock();
        s.recovering = s.recovering.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Calls `hook` once, right after the next request is answered.
    pub fn on_next_answer(&self, hook: impl FnOnce() + Send + 'static) {
        *self.on_answer.lock() = Some(Box::new(hook));
    }

    /// Blocks in a freeze until the epoch changes; a worker counts itself parked.
    fn park_until_thaw(&self, s: &mut MutexGuard<'_, State>, worker: bool) {
        let epoch = s.epoch;
        if worker {
            s.parked += 1;
        }
        self.changed.notify_all();
        while s.epoch == epoch {
            self.changed.wait(s);
        }
        if worker {
            s.parked -= 1;
        }
    }

    /// Entered by a worker's handler before it touches the filesystem (no request log
    /// marks: tests and internal requests). See [`Gate::enter_request`].
    pub fn enter(&self) -> Pass<'_> {
        self.enter_as(None, PassKind::Worker, false)
    }

    /// Entered by every handler of kernel request `unique` before it touches the
    /// filesystem. In a resend freeze, blocks until a thaw (or forever: the process exits
    /// with the request parked). When the pass is dropped, after the reply, the request
    /// is marked answered in the request log.
    pub fn enter_request(&self, unique: u64, kind: PassKind) -> Pass<'_> {
        let logged = match kind {
            PassKind::Worker => super::reqlog::logged(),
            // Its request is in a slot this process claimed.
            PassKind::Recovery => true,
        };
        self.enter_as(Some(unique), kind, logged)
    }

    fn enter_as(&self, unique: Option<u64>, kind: PassKind, logged: bool) -> Pass<'_> {
        let worker = kind == PassKind::Worker;
        // A recovered request does not start during a DrainLog freeze either: it stays in
        // the log, for the successor.
        let parks = |phase: Phase| match phase {
            Phase::Frozen(FreezeMode::Resend) => true,
            Phase::Frozen(FreezeMode::DrainLog) => !worker,
            Phase::Frozen(FreezeMode::Drain) | Phase::Serving => false,
        };
        let mut s = self.state.lock();
        let mut counted = false;
        while parks(s.phase) {
            if !counted {
                s.parked_requests += 1;
                counted = true;
            }
            self.park_until_thaw(&mut s, worker);
        }
        s.executing += 1;
        Pass {
            gate: self,
            counted: true,
            replies: true,
            unique,
            worker,
            logged,
        }
    }

    fn leave(&self, counted: bool, replied: bool, worker: bool) {
        let mut s = self.state.lock();
        s.executing -= 1;
        self.changed.notify_all();
        let mut hook = None;
        if replied {
            s.answered += 1;
            hook = self.on_answer.lock().take();
        }
        if let Some(hook) = hook {
            // Not under the lock: the hook may send to the supervisor.
            drop(s);
            hook();
            s = self.state.lock();
        }
        if let Phase::Frozen(FreezeMode::Drain | FreezeMode::DrainLog) = s.phase {
            if counted {
                s.drained += 1;
            }
            if !worker {
                // Reads nothing from /dev/fuse: nothing to stop.
                return;
            }
            // The reply is out; this thread reads nothing more until a thaw.
            let epoch = s.epoch;
            s.parked += 1;
            self.changed.notify_all();
            while s.epoch == epoch {
                self.changed.wait(&mut s);
            }
            s.parked -= 1;
        }
    }

    /// Between two attempts of a blocking lock request: waits `delay`, or parks the
    /// request for the rest of a freeze that lets it give way (which may be forever): a
    /// resend freeze, or a DrainLog freeze when the request is in the request log.
    fn lock_wait(&self, delay: Duration, worker: bool, logged: bool) {
        let gives_way = |phase: Phase| match phase {
            Phase::Frozen(FreezeMode::Resend) => true,
            Phase::Frozen(FreezeMode::DrainLog) => logged,
            Phase::Frozen(FreezeMode::Drain) | Phase::Serving => false,
        };
        let mut s = self.state.lock();
        if !gives_way(s.phase) {
            // Such a freeze wakes the waiter early so that the freeze does not wait.
            let epoch = s.epoch;
            let _ = self.changed.wait_while_for(
                &mut s,
                |s| s.epoch == epoch && !gives_way(s.phase),
                delay,
            );
        }
        if gives_way(s.phase) {
            s.executing -= 1;
            s.parked_requests += 1;
            self.park_until_thaw(&mut s, worker);
            // Parked again if another such freeze began before this thread woke.
            while gives_way(s.phase) {
                self.park_until_thaw(&mut s, worker);
            }
            s.executing += 1;
        }
    }

    /// Freezes in `mode` and waits until the freeze is complete ([`Gate::begin_freeze`]
    /// then [`Gate::wait_frozen`]).
    pub fn freeze(
        self: &Arc<Self>,
        mode: FreezeMode,
        nudge: Option<Nudge>,
    ) -> Result<FreezeStats, FreezeError> {
        let ticket = self.begin_freeze(mode)?;
        self.wait_frozen(ticket, nudge)
    }

    /// Freezes in `mode` from now on (handlers park or drain) without waiting. Freezing
    /// again in the same mode joins the freeze in place.
    pub fn begin_freeze(&self, mode: FreezeMode) -> Result<FreezeTicket, FreezeError> {
        let mut s = self.state.lock();
        match s.phase {
            Phase::Frozen(m) if m != mode => return Err(FreezeError::OtherMode(m)),
            Phase::Frozen(_) => {}
            Phase::Serving => {
                s.phase = Phase::Frozen(mode);
                s.parked_requests = 0;
                s.drained = 0;
                self.changed.notify_all();
            }
        }
        Ok(FreezeTicket {
            mode,
            epoch: s.epoch,
        })
    }

    /// Waits until the freeze of `ticket` is complete: no handler executing (resend), or
    /// every worker parked (drain; `nudge` brings idle workers through a handler).
    /// Returns [`FreezeError::Thawed`] if [`Gate::thaw`] was called since `begin_freeze`.
    pub fn wait_frozen(
        self: &Arc<Self>,
        ticket: FreezeTicket,
        nudge: Option<Nudge>,
    ) -> Result<FreezeStats, FreezeError> {
        let mut s = self.state.lock();
        if s.epoch != ticket.epoch {
            return Err(FreezeError::Thawed);
        }
        if matches!(ticket.mode, FreezeMode::Drain | FreezeMode::DrainLog) {
            if let Some(nudge) = nudge {
                if s.parked < self.workers {
                    self.spawn_nudger(ticket.epoch, nudge)
                        .map_err(FreezeError::Nudger)?;
                }
            }
        }
        let workers = self.workers;
        let done = |s: &State| match ticket.mode {
            FreezeMode::Resend => s.executing == 0,
            // A plain drain also finishes what is being answered from the request log
            // (the successor might not look there); DrainLog leaves it in the log.
            FreezeMode::Drain => s.executing == 0 && s.parked >= workers && s.recovering == 0,
            FreezeMode::DrainLog => s.executing == 0 && s.parked >= workers,
        };
        while s.epoch == ticket.epoch && !done(&s) {
            self.changed.wait(&mut s);
        }
        if s.epoch != ticket.epoch {
            return Err(FreezeError::Thawed);
        }
        Ok(FreezeStats {
            parked: s.parked_requests,
            drained: s.drained,
        })
    }

    /// Whether the freeze of `ticket` still holds (no thaw since), and its counts now.
    pub fn still_frozen(&self, ticket: FreezeTicket) -> Option<FreezeStats> {
        let s = self.state.lock();
        (s.epoch == ticket.epoch && s.phase == Phase::Frozen(ticket.mode)).then_some(FreezeStats {
            parked: s.parked_requests,
            drained: s.drained,
        })
    }

    /// Brings idle worker threads through a handler until all are parked or the freeze
    /// ends. The thread is detached: its last nudge may block until the successor (or the
    /// thawed client) answers it, or until the process exits.
    fn spawn_nudger(self: &Arc<Self>, epoch: u64, nudge: Nudge) -> std::io::Result<()> {
        let gate = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("drain-nudger".into())
            .spawn(move || {
                loop {
                    let Some(g) = gate.upgrade() else { return };
                    {
                        let s = g.state.lock();
                        let draining = matches!(
                            s.phase,
                            Phase::Frozen(FreezeMode::Drain | FreezeMode::DrainLog)
                        );
                        if s.epoch != epoch || !draining || s.parked >= g.workers {
                            return;
                        }
                    }
                    nudge();
                    // Give the worker that answered a moment to park before looking again.
                    let mut s = g.state.lock();
                    let parked = s.parked;
                    let _ = g.changed.wait_while_for(
                        &mut s,
                        |s| s.parked == parked && s.epoch == epoch,
                        NUDGE_SETTLE,
                    );
                }
            })?;
        Ok(())
    }

    /// Serves again: parked requests (resend) execute, parked threads (drain) read again,
    /// a freeze in progress returns [`FreezeError::Thawed`]. Harmless when serving.
    pub fn thaw(&self) {
        let mut s = self.state.lock();
        s.phase = Phase::Serving;
        s.epoch += 1;
        self.changed.notify_all();
    }
}

/// Held by a handler from [`Gate::enter`] until it has replied (drop it after the reply).
#[must_use = "a pass must be held until the request is answered"]
pub struct Pass<'g> {
    gate: &'g Gate,
    /// Whether the request counts as drained (the drain's own nudges do not).
    counted: bool,
    /// Whether the request is answered (FORGET is not): only answers fire the hook.
    replies: bool,
    /// The kernel request's unique, marked answered in the request log on drop.
    unique: Option<u64>,
    /// Held by one of fuser's reader threads (else a recovery thread).
    worker: bool,
    /// The request is in the request log (a successor would find it).
    logged: bool,
}

impl std::fmt::Debug for Pass<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pass")
            .field("counted", &self.counted)
            .field("replies", &self.replies)
            .finish()
    }
}

impl Pass<'_> {
    /// This request is the client's own (a drain nudge): not counted as drained.
    pub fn internal(&mut self) {
        self.counted = false;
    }

    /// This request has no reply (FORGET): it does not count as answered.
    pub fn no_reply(&mut self) {
        self.replies = false;
    }
}

impl LockWait for Pass<'_> {
    fn wait(&self, delay: Duration) {
        self.gate.lock_wait(delay, self.worker, self.logged);
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        // The reply is out (or there is none): nothing in this thread's request log slot
        // waits for an answer any more. Before leaving: a drain parks the thread there.
        if let (Some(unique), true) = (self.unique, self.worker) {
            super::reqlog::answered(unique);
        }
        self.gate.leave(self.counted, self.replies, self.worker);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    const SOON: Duration = Duration::from_millis(100);

    /// Waits until `cond` holds (polling), failing after 5 s.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A "request": enters, records that it executed, replies (sends on `done`).
    fn request(
        gate: &Arc<Gate>,
        executed: &Arc<AtomicUsize>,
        done: mpsc::Sender<()>,
    ) -> std::thread::JoinHandle<()> {
        let gate = gate.clone();
        let executed = executed.clone();
        std::thread::spawn(move || {
            let _pass = gate.enter();
            executed.fetch_add(1, Ordering::SeqCst);
            let _ = done.send(());
        })
    }

    #[test]
    fn resend_freeze_waits_for_executing_and_parks_new_requests_until_thaw() {
        let gate = Gate::new(4);
        // One handler is executing when the freeze begins.
        let (release, released) = mpsc::channel::<()>();
        let g = gate.clone();
        let slow = std::thread::spawn(move || {
            let _pass = g.enter();
            released.recv().unwrap();
        });
        eventually("the slow handler to execute", || {
            gate.state.lock().executing == 1
        });

        let g = gate.clone();
        let freezer = std::thread::spawn(move || g.freeze(FreezeMode::Resend, None));
        eventually("the freeze to begin", || {
            gate.phase() == Phase::Frozen(FreezeMode::Resend)
        });
        std::thread::sleep(SOON);
        assert!(
            !freezer.is_finished(),
            "freeze must wait for the executing handler"
        );

        // New requests park: neither executed nor answered.
        let executed = Arc::new(AtomicUsize::new(0));
        let (done_tx, done) = mpsc::channel();
        let parked: Vec<_> = (0..3)
            .map(|_| request(&gate, &executed, done_tx.clone()))
            .collect();
        eventually("three parked requests", || gate.parked() == 3);

        release.send(()).unwrap();
        slow.join().unwrap();
        let stats = freezer.join().unwrap().unwrap();
        assert_eq!(
            stats,
            FreezeStats {
                parked: 3,
                drained: 0
            }
        );
        std::thread::sleep(SOON);
        assert_eq!(
            executed.load(Ordering::SeqCst),
            0,
            "parked requests must not execute"
        );
        assert!(
            done.try_recv().is_err(),
            "parked requests must not be answered"
        );

        // Thaw: every parked request executes, once.
        gate.thaw();
        for t in parked {
            t.join().unwrap();
        }
        assert_eq!(executed.load(Ordering::SeqCst), 3);
        assert_eq!(gate.parked(), 0);
        assert_eq!(gate.phase(), Phase::Serving);
        assert_eq!(gate.answered(), 4);
    }

    #[test]
    fn thaw_cancels_a_freeze_in_progress() {
        let gate = Gate::new(1);
        let (release, released) = mpsc::channel::<()>();
        let g = gate.clone();
        let slow = std::thread::spawn(move || {
            let _pass = g.enter();
            released.recv().unwrap();
        });
        eventually("the handler to execute", || {
            gate.state.lock().executing == 1
        });
        let g = gate.clone();
        let freezer = std::thread::spawn(move || g.freeze(FreezeMode::Resend, None));
        eventually("the freeze to begin", || gate.phase() != Phase::Serving);
        gate.thaw();
        assert!(matches!(freezer.join().unwrap(), Err(FreezeError::Thawed)));
        release.send(()).unwrap();
        slow.join().unwrap();
        // Serving again: a request passes at once.
        drop(gate.enter());
    }

    #[test]
    fn drain_parks_each_worker_after_its_reply_and_nudges_idle_ones() {
        const WORKERS: usize = 3;
        let gate = Gate::new(WORKERS);
        // Worker threads that loop "read a request, handle it": requests come from a queue
        // (the kernel), nudges add requests to it.
        let (kernel, queue) = mpsc::channel::<&'static str>();
        let queue = Arc::new(Mutex::new(queue));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (gate, queue, answered, stop) =
                    (gate.clone(), queue.clone(), answered.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(req) = queue.lock().recv_timeout(Duration::from_millis(5)) else {
                            continue;
                        };
                        let mut pass = gate.enter();
                        if req == "nudge" {
                            pass.internal();
                        }
                        answered.lock().push(req);
                    }
                })
            })
            .collect();

        // A request that is executing when the freeze begins finishes (drained).
        let (release, released) = mpsc::channel::<()>();
        let g = gate.clone();
        let slow = std::thread::spawn(move || {
            let _pass = g.enter();
            released.recv().unwrap();
        });
        eventually("the slow request to execute", || {
            gate.state.lock().executing == 1
        });

        let nudger_kernel = Mutex::new(kernel.clone());
        let nudge: Nudge = Arc::new(move || {
            let _ = nudger_kernel.lock().send("nudge");
        });
        let g = gate.clone();
        let freezer = std::thread::spawn(move || g.freeze(FreezeMode::Drain, Some(nudge)));
        // The nudges park every worker; the freeze still waits for the slow request.
        eventually("all workers parked", || gate.parked() == WORKERS);
        std::thread::sleep(SOON);
        assert!(
            !freezer.is_finished(),
            "drain must wait for the executing request"
        );
        // The slow request's thread is not a worker here, so count it: it parks too.
        release.send(()).unwrap();
        let stats = freezer.join().unwrap().unwrap();
        assert_eq!(stats.parked, 0);
        assert_eq!(stats.drained, 1, "the slow request, not the nudges");

        // Nobody reads now: a request stays queued.
        kernel.send("app").unwrap();
        std::thread::sleep(SOON);
        assert!(!answered.lock().contains(&"app"));

        gate.thaw();
        slow.join().unwrap();
        eventually("the queued request to be answered after the thaw", || {
            answered.lock().contains(&"app")
        });
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn lock_waiters_park_on_resend_freeze_and_wait_on_through_drain() {
        let gate = Gate::new(2);
        let locked = Arc::new(AtomicBool::new(true));
        let attempts = Arc::new(AtomicUsize::new(0));
        let spawn_waiter = |gate: &Arc<Gate>| {
            let (gate, locked, attempts) = (gate.clone(), locked.clone(), attempts.clone());
            std::thread::spawn(move || {
                let pass = gate.enter();
                loop {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    if !locked.load(Ordering::SeqCst) {
                        return;
                    }
                    pass.wait(Duration::from_millis(50));
                }
            })
        };

        // Resend: the waiter gives way at once (the freeze does not wait for the lock).
        let waiter = spawn_waiter(&gate);
        eventually("a first attempt", || attempts.load(Ordering::SeqCst) >= 1);
        let started = Instant::now();
        let stats = gate.freeze(FreezeMode::Resend, None).unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(40),
            "the waiter must not delay the freeze"
        );
        assert_eq!(stats.parked, 1);
        let before = attempts.load(Ordering::SeqCst);
        locked.store(false, Ordering::SeqCst);
        std::thread::sleep(SOON);
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            before,
            "a parked waiter makes no attempt"
        );
        gate.thaw();
        waiter.join().unwrap();
        assert!(
            attempts.load(Ordering::SeqCst) > before,
            "after the thaw it tries again and gets the lock"
        );

        // Drain: the waiter keeps waiting, so the drain cannot finish until the lock is free.
        locked.store(true, Ordering::SeqCst);
        let waiter = spawn_waiter(&gate);
        eventually("the waiter to execute", || gate.state.lock().executing == 1);
        let g = gate.clone();
        let freezer = std::thread::spawn(move || g.freeze(FreezeMode::Drain, None));
        // The other worker is idle: the test parks it by hand (no nudger).
        eventually("the drain to begin", || {
            gate.phase() == Phase::Frozen(FreezeMode::Drain)
        });
        let g = gate.clone();
        let idle = std::thread::spawn(move || drop(g.enter()));
        std::thread::sleep(SOON);
        assert!(
            !freezer.is_finished(),
            "the drain waits for the lock waiter"
        );
        let before = attempts.load(Ordering::SeqCst);
        eventually("the waiter to go on trying", || {
            attempts.load(Ordering::SeqCst) > before
        });
        locked.store(false, Ordering::SeqCst);
        let stats = freezer.join().unwrap().unwrap();
        assert_eq!(stats.drained, 2);
        gate.thaw();
        waiter.join().unwrap();
        idle.join().unwrap();
    }

    #[test]
    fn a_plain_drain_waits_for_recovered_requests_and_drain_log_leaves_them() {
        // Plain drain: the recovered request's answer must reach the kernel first.
        let gate = Gate::new(1);
        gate.recovery_started(1);
        let g = gate.clone();
        let freezer = std::thread::spawn(move || g.freeze(FreezeMode::Drain, None));
        eventually("the drain to begin", || gate.phase() != Phase::Serving);
        let g = gate.clone();
        let idle = std::thread::spawn(move || drop(g.enter()));
        eventually("the worker to park", || gate.parked() == 1);
        std::thread::sleep(SOON);
        assert!(
            !freezer.is_finished(),
            "the drain must wait for the recovery"
        );
        gate.recovery_answered();
        freezer.join().unwrap().unwrap();
        gate.thaw();
        idle.join().unwrap();

        // DrainLog: a recovered request that has not started stays unexecuted (in the
        // log, for the successor), and the freeze does not wait for it.
        let gate = Gate::new(1);
        gate.recovery_started(1);
        let g = gate.clone();
        let freezer = std::thread::spawn(move || g.freeze(FreezeMode::DrainLog, None));
        eventually("the drain to begin", || gate.phase() != Phase::Serving);
        let g = gate.clone();
        let idle = std::thread::spawn(move || drop(g.enter()));
        eventually("the worker to park", || gate.parked() == 1);
        let stats = freezer.join().unwrap().unwrap();
        assert_eq!(stats.drained, 1);
        let executed = Arc::new(AtomicBool::new(false));
        let (g, e) = (gate.clone(), executed.clone());
        let recovered = std::thread::spawn(move || {
            let _pass = g.enter_request(42, PassKind::Recovery);
            e.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(SOON);
        assert!(
            !executed.load(Ordering::SeqCst),
            "a recovered request ran in DrainLog"
        );
        assert_eq!(gate.parked(), 1, "a recovery thread is not a parked worker");
        gate.thaw();
        recovered.join().unwrap();
        assert!(executed.load(Ordering::SeqCst));
        idle.join().unwrap();
    }

    #[test]
    fn first_answer_hook_fires_once_after_the_reply() {
        let gate = Gate::new(1);
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        gate.on_next_answer(move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        {
            let _pass = gate.enter();
            assert_eq!(fired.load(Ordering::SeqCst), 0, "not before the reply");
        }
        drop(gate.enter());
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        // A request without a reply (FORGET) is not an answer.
        let f = fired.clone();
        gate.on_next_answer(move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        let mut forget = gate.enter();
        forget.no_reply();
        drop(forget);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        drop(gate.enter());
        assert_eq!(fired.load(Ordering::SeqCst), 2);
    }
}
