//! The client's side of the mount's request log (layout and protocol:
//! `handover_proto::reqlog`): mapping it, reading requests into its slots, marking them
//! answered or applied, and finding what a dead predecessor left unanswered.
//!
//! 1. When the log arrives (before the freeze of a live upgrade: the predecessor may still
//!    serve), [`RequestLog::reserve`] takes free slots for this process's reader threads
//!    (the unique in the area first, then the marks, then the whole area). A free slot's area holds no unique (see [`RequestLog::release`]),
//!    so a slot is never, at any instruction, taken with a request in it that could be
//!    mistaken for one to answer.
//! 2. After `Serve` (the predecessor is gone), [`RequestLog::take_over`] looks at every
//!    slot of another process. With resend in use the kernel re-delivers what the dead
//!    client had read, so every such slot is freed. Without it, a slot that holds a
//!    request not marked answered is claimed (state recovering, owner this process) and
//!    returned, to be answered by `super::recover`; the others are freed.
//! 3. [`RequestLog::read_into`] arms the allocator (`super::buffers`) with the reserved
//!    slots: fuser's reader threads, started right after, read every request into them.
//! 4. While serving, [`answered`] (when a handler's pass is dropped, after its reply) and
//!    [`applied`] (just before the reply of a request whose answer is a bare result)
//!    keep the slot's marks current.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use handover_proto::reqlog::{self, Geometry, Header, SlotWords, Verdict, slot, state};

use super::buffers;
use crate::shm::Mapping;

/// The log this process reads requests into, once [`RequestLog::read_into`] armed it.
static ACTIVE: OnceLock<RequestLog> = OnceLock::new();

/// How long reader threads may take to pick up their slots once the session starts.
const PICKUP: Duration = Duration::from_secs(2);
/// Where `fuse_in_header.unique` is in an area.
const UNIQUE_AT: u64 = 8;

/// Opening or using the request log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReqLogError {
    #[error("the request log is unusable")]
    Header(#[source] reqlog::LogError),
    #[error("the request log's areas hold {area} bytes; this build needs {needed}")]
    AreaTooSmall { area: u32, needed: u32 },
    #[error("cannot map the request log")]
    Map(#[source] std::io::Error),
    #[error("this process reads into a request log already")]
    AlreadyActive,
}

/// A request a dead predecessor read and nobody answered, claimed by this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub slot: u32,
    pub verdict: Verdict,
}

/// What [`RequestLog::take_over`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Requests to answer, claimed by this process.
    pub pending: Vec<Pending>,
    /// Slots of dead processes freed (nothing in them waited for an answer, or resend
    /// re-delivers it).
    pub freed: u32,
    /// Slots whose content made no sense (freed; never expected).
    pub garbage: u32,
}

/// The mount's request log, mapped.
pub struct RequestLog {
    fd: OwnedFd,
    map: Mapping,
    header: Header,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLog")
            .field("fd", &self.fd)
            .field("header", &self.header)
            .finish()
    }
}

impl RequestLog {
    /// Maps the log in `fd` (the supervisor's `ToClient::RequestLog`). Reads the header
    /// only.
    pub fn open(fd: OwnedFd) -> Result<RequestLog, ReqLogError> {
        let header = reqlog::read_header(fd.as_fd()).map_err(ReqLogError::Header)?;
        let needed = super::adapter::MAX_WRITE + (64 << 10);
        if header.geometry.area < needed {
            return Err(ReqLogError::AreaTooSmall {
                area: header.geometry.area,
                needed,
            });
        }
        let map = Mapping::new(fd.as_fd(), header.geometry.total()).map_err(ReqLogError::Map)?;
        Ok(RequestLog { fd, map, header })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// The generation before whose `Serve` the supervisor wrote FUSE_NOTIFY_RESEND last
    /// (`handover_proto::reqlog::mark_resent`; 0: never).
    pub fn resent_generation(&self) -> u64 {
        self.map.u64_at(reqlog::hdr::RESENT).load(Ordering::Acquire)
    }

    pub fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    /// The log's descriptor (for a supervisor that adopts this client).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn word(&self, i: u32, field: u64) -> &AtomicU64 {
        self.map.u64_at(self.geometry().slot_offset(i) + field)
    }

    /// The control words of slot `i`, loaded with acquire ordering.
    pub fn words(&self, i: u32) -> SlotWords {
        let w = |f| self.word(i, f).load(Ordering::Acquire);
        SlotWords {
            owner: w(slot::OWNER),
            done: w(slot::DONE),
            applied: w(slot::APPLIED),
            result: w(slot::RESULT),
            answer: w(slot::ANSWER),
            answer_at: w(slot::ANSWER_AT),
        }
    }

    fn area_offset(&self, i: u32) -> u64 {
        self.geometry().area_offset(i)
    }

    /// A copy of `len` bytes at `at` in slot `i`'s area.
    ///
    /// # Safety
    /// Nobody writes that part of the area meanwhile (it is this process's slot, or a dead
    /// process's that this process claimed).
    pub unsafe fn area_bytes(&self, i: u32, at: u32, len: u32) -> Vec<u8> {
        // SAFETY: bounds are checked by the mapping; the caller vouches for the writers.
        unsafe {
            self.map
                .read(self.area_offset(i) + u64::from(at), len as usize)
        }
    }

    /// Frees slot `i`: first the unique in its area is cleared, so that a free slot never
    /// holds a request (a process that takes it and dies at once leaves nothing to
    /// answer), then the owner word.
    pub fn release(&self, i: u32) {
        self.map
            .u64_at(self.area_offset(i) + UNIQUE_AT)
            .store(0, Ordering::Release);
        // The pages go back to the kernel (the slot's next taker zeroes, and so faults in,
        // what it uses): a mount holds about its reader threads' areas, not every slot
        // some generation once used. Best effort; the area reads as zeros either way.
        let g = self.geometry();
        if let Ok(off) = libc::off_t::try_from(g.area_offset(i)) {
            let _ = nix::fcntl::fallocate(
                &self.fd,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                off,
                libc::off_t::from(g.area),
            );
        }
        self.word(i, slot::OWNER)
            .store(reqlog::owner_word(state::FREE, 0), Ordering::Release);
    }

    /// Stores `reply` after the request in claimed slot `i` as the answer to `unique`,
    /// before it is written to the kernel; `false` if it does not fit (a crash then makes
    /// the next successor execute the request again).
    pub fn store_answer(&self, i: u32, request_len: u32, unique: u64, reply: &[u8]) -> bool {
        let area = self.geometry().area;
        let at = u64::from(request_len).div_ceil(64) * 64;
        let Ok(len) = u32::try_from(reply.len()) else {
            return false;
        };
        if at + u64::from(len) > u64::from(area) {
            return false;
        }
        // SAFETY: slot `i` is claimed by this process, and only this thread writes its area
        // after the request (the request itself is left as it is).
        unsafe { self.map.write(self.area_offset(i) + at, reply) };
        self.word(i, slot::ANSWER_AT)
            .store(reqlog::answer_at_word(at as u32, len), Ordering::Release);
        self.word(i, slot::ANSWER).store(unique, Ordering::Release);
        true
    }

    /// Looks at every slot another process left (all such processes are dead: this runs
    /// at `Serve`). `recover`: claim the requests nobody answered (no resend); else free
    /// everything (the kernel re-delivers them).
    pub fn take_over(&self, me: u32, recover: bool) -> Found {
        let mut found = Found::default();
        let area = self.geometry().area;
        for i in 0..self.geometry().slots {
            let words = self.words(i);
            let (st, pid) = reqlog::owner_parts(words.owner);
            if st == state::FREE || pid == me {
                continue;
            }
            if !recover {
                self.release(i);
                found.freed += 1;
                continue;
            }
            // The request header, and for a stored answer enough to see it is there: the
            // verdict only reads the header from the area.
            // SAFETY: the owner is dead; nobody writes the area.
            let head = unsafe { self.area_bytes(i, 0, 64) };
            match reqlog::classify(&words, &head, area) {
                Verdict::Idle | Verdict::NoReply(_) => {
                    self.release(i);
                    found.freed += 1;
                }
                Verdict::Garbage(why) => {
                    tracing::warn!(
                        slot = i,
                        why,
                        "a request log slot holds no usable request; freed"
                    );
                    self.release(i);
                    found.garbage += 1;
                }
                verdict => {
                    self.word(i, slot::OWNER)
                        .store(reqlog::owner_word(state::RECOVERING, me), Ordering::Release);
                    found.pending.push(Pending { slot: i, verdict });
                }
            }
        }
        found
    }

    /// Takes free slots for `n` reader threads of process `me` (at most
    /// [`buffers::MAX_GRANTS`]): owner set, marks cleared, areas zeroed (and so resident).
    /// Safe while another process serves from its own slots (a live upgrade's old client:
    /// it takes no free slot while it serves). Slots of dead processes that hold nothing
    /// to answer (those of successors that never served: upgrades that rolled back) are
    /// taken too when free ones run out.
    pub fn reserve(&self, n: usize, me: u32) -> Vec<u32> {
        let n = n.min(buffers::MAX_GRANTS);
        let mut out = Vec::with_capacity(n);
        let area = u64::from(self.geometry().area);
        let reading = reqlog::owner_word(state::READING, me);
        let take = |i: u32, reclaim: bool| {
            let owner = self.word(i, slot::OWNER);
            let was = owner.load(Ordering::Acquire);
            let (st, pid) = reqlog::owner_parts(was);
            let takeable = if reclaim {
                st != state::FREE && pid != me && !handover_proto::keeper::process_runs(pid) && {
                    // SAFETY: its owner is dead: nobody writes the area.
                    let head = unsafe { self.area_bytes(i, 0, 64) };
                    reqlog::classify(&self.words(i), &head, self.geometry().area) == Verdict::Idle
                }
            } else {
                st == state::FREE
            };
            takeable
                && owner
                    .compare_exchange(was, reading, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
        };
        for reclaim in [false, true] {
            for i in 0..self.geometry().slots {
                if out.len() == n {
                    break;
                }
                if !take(i, reclaim) {
                    continue;
                }
                // The unique first: a reclaimed slot's area still holds an answered request,
                // and cleared marks beside it would make it look unanswered.
                self.map
                    .u64_at(self.area_offset(i) + UNIQUE_AT)
                    .store(0, Ordering::Release);
                for f in [
                    slot::DONE,
                    slot::APPLIED,
                    slot::RESULT,
                    slot::ANSWER,
                    slot::ANSWER_AT,
                ] {
                    self.word(i, f).store(0, Ordering::Release);
                }
                let p = self.map.ptr(self.area_offset(i), area);
                // SAFETY: this process just took the slot; nobody else reads or writes its area
                // (no reader thread has it yet); in bounds (checked by `ptr`).
                unsafe { std::ptr::write_bytes(p, 0, area as usize) };
                out.push(i);
            }
        }
        if out.len() < n {
            tracing::warn!(
                threads = n,
                slots = out.len(),
                "the request log has fewer free slots than reader threads: requests read by the others are lost if this client dies"
            );
        }
        out
    }

    /// Makes the next request buffers this process allocates (fuser's reader threads,
    /// started by `start`) the slots `slots` ([`RequestLog::reserve`]), runs `start`, and
    /// waits until the threads took them. Returns how many threads read into the log; the
    /// others read into ordinary memory (their requests are not in the log). The log stays
    /// mapped for the life of the process.
    pub fn read_into<T>(
        self,
        slots: Vec<u32>,
        start: impl FnOnce() -> T,
    ) -> Result<(&'static RequestLog, usize, T), (ReqLogError, T)> {
        if ACTIVE.set(self).is_err() {
            return Err((ReqLogError::AlreadyActive, start()));
        }
        let Some(log) = ACTIVE.get() else {
            return Err((ReqLogError::AlreadyActive, start()));
        };
        let g = log.geometry();
        let armed = buffers::arm(
            log.fd.as_raw_fd(),
            g.areas_offset(),
            u64::from(g.area),
            &slots,
        );
        let fallbacks = buffers::fallbacks();
        let t = start();
        let started = Instant::now();
        while buffers::granted() < armed && started.elapsed() < PICKUP {
            std::thread::sleep(Duration::from_millis(1));
        }
        let unused = buffers::disarm();
        for s in slots[armed..].iter().chain(&unused) {
            log.release(*s);
        }
        if !unused.is_empty() {
            tracing::warn!(
                unused = unused.len(),
                "reader threads did not take their request log slots (is the client's allocator installed?)"
            );
        }
        let failed = buffers::fallbacks() - fallbacks;
        if failed > 0 {
            tracing::warn!(
                failed,
                "request log slots could not be mapped: those reader threads read into ordinary memory"
            );
        }
        let reading = (armed - unused.len()).saturating_sub(failed);
        Ok((log, reading, t))
    }
}

/// The log this process reads into, if any.
pub fn active() -> Option<&'static RequestLog> {
    ACTIVE.get()
}

/// After a handler's reply: the calling thread's slot holds no unanswered request.
pub fn answered(unique: u64) {
    if let (Some(log), Some(s)) = (ACTIVE.get(), buffers::current_slot()) {
        log.word(s, slot::DONE).store(unique, Ordering::Release);
    }
}

/// Just before the reply of a request whose answer is `errno` (0: success) and, for a
/// WRITE, `written` bytes: its effect is complete, and a successor answers it with that
/// instead of executing it again.
pub fn applied(unique: u64, errno: i32, written: u32) {
    if let (Some(log), Some(s)) = (ACTIVE.get(), buffers::current_slot()) {
        log.word(s, slot::RESULT)
            .store(reqlog::result_word(errno, written), Ordering::Release);
        log.word(s, slot::APPLIED).store(unique, Ordering::Release);
    }
}

/// Whether the calling thread reads into the request log (its unanswered request would be
/// found by a successor).
pub fn logged() -> bool {
    ACTIVE.get().is_some() && buffers::current_slot().is_some()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use handover_proto::reqlog::{RequestHeader, owner_word};

    fn log(slots: u32) -> RequestLog {
        RequestLog::open(reqlog::create(slots, 0).unwrap()).unwrap()
    }

    /// Writes a request into slot `i` as the kernel would, owned by `pid`.
    fn put(log: &RequestLog, i: u32, pid: u32, op: u32, unique: u64, len: u32) {
        let mut b = vec![0u8; len as usize];
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b[4..8].copy_from_slice(&op.to_le_bytes());
        b[8..16].copy_from_slice(&unique.to_le_bytes());
        // SAFETY: test-owned slot.
        unsafe { log.map.write(log.area_offset(i), &b) };
        log.word(i, slot::OWNER)
            .store(owner_word(state::READING, pid), Ordering::Release);
    }

    #[test]
    fn take_over_claims_only_unanswered_requests() {
        let l = log(8);
        let dead = 999_999;
        put(&l, 0, dead, 1, 100, 48); // unanswered LOOKUP
        put(&l, 1, dead, 1, 102, 48); // answered
        l.word(1, slot::DONE).store(102, Ordering::Release);
        put(&l, 2, dead, reqlog::opcode::WRITE, 104, 4096); // applied WRITE
        l.word(2, slot::RESULT)
            .store(reqlog::result_word(0, 4016), Ordering::Release);
        l.word(2, slot::APPLIED).store(104, Ordering::Release);
        put(&l, 3, dead, reqlog::opcode::FORGET, 106, 48); // no reply expected
        put(&l, 4, dead, 1, 0, 48); // nothing read yet (zeroed header)

        let me = std::process::id();
        let f = l.take_over(me, true);
        assert_eq!(f.freed, 3);
        assert_eq!(f.garbage, 0);
        assert_eq!(f.pending.len(), 2);
        assert!(matches!(
            f.pending[0],
            Pending {
                slot: 0,
                verdict: Verdict::Execute(RequestHeader { unique: 100, .. })
            }
        ));
        assert!(matches!(
            f.pending[1].verdict,
            Verdict::AnswerResult { written: 4016, .. }
        ));
        for p in &f.pending {
            assert_eq!(
                reqlog::owner_parts(l.words(p.slot).owner),
                (state::RECOVERING, me)
            );
        }
        for i in [1, 3, 4] {
            assert_eq!(reqlog::owner_parts(l.words(i).owner).0, state::FREE);
        }
        // A second look (a successor of this process, had it died) finds the same
        // requests, still claimed, now as recovering slots of a dead owner.
        let again = l.take_over(me + 1, true);
        assert_eq!(again.pending.len(), 2);
    }

    #[test]
    fn with_resend_every_foreign_slot_is_freed() {
        let l = log(4);
        put(&l, 0, 4242, 1, 100, 48);
        put(&l, 1, 4242, 1, 102, 48);
        let f = l.take_over(std::process::id(), false);
        assert_eq!((f.freed, f.pending.len()), (2, 0));
    }

    #[test]
    fn a_stored_answer_survives_for_the_next_successor() {
        let l = log(2);
        put(&l, 0, 7, 1, 100, 48);
        let f = l.take_over(8, true);
        assert_eq!(f.pending.len(), 1);
        let reply = [0x55u8; 144];
        assert!(l.store_answer(0, 48, 100, &reply));
        // Process 8 dies before it frees the slot: process 9 finds the stored answer.
        let f = l.take_over(9, true);
        let Verdict::AnswerStored { offset, len, .. } = f.pending[0].verdict else {
            panic!("{:?}", f.pending)
        };
        // SAFETY: claimed by "process 9", this test.
        assert_eq!(unsafe { l.area_bytes(0, offset, len) }, reply.to_vec());
        // A reply that does not fit is not stored.
        assert!(!l.store_answer(0, 48, 100, &vec![0u8; l.geometry().area as usize]));
    }

    #[test]
    fn a_released_slot_holds_no_request() {
        let l = log(1);
        put(&l, 0, 7, 1, 100, 48);
        let f = l.take_over(8, true);
        assert_eq!(f.pending.len(), 1);
        l.release(0);
        // Taken again, by a process that dies before it zeroed anything: nothing to answer.
        l.word(0, slot::OWNER)
            .store(owner_word(state::READING, 9), Ordering::Release);
        assert_eq!(l.take_over(10, true).pending.len(), 0);
    }

    #[test]
    fn reserved_slots_are_zeroed_and_owned() {
        let live = std::process::id();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let l = log(3);
        // Slot 0: free, with what an earlier request left; slot 1: a live reader's request.
        put(&l, 0, dead, 1, 100, 48);
        l.word(0, slot::OWNER)
            .store(owner_word(state::FREE, 0), Ordering::Release);
        put(&l, 1, live, 1, 102, 48);
        let got = l.reserve(2, live);
        assert_eq!(got, vec![0, 2]);
        // SAFETY: test-owned slot.
        assert!(unsafe { l.area_bytes(0, 0, 64) }.iter().all(|b| *b == 0));
        assert_eq!(
            reqlog::owner_parts(l.words(0).owner),
            (state::READING, live)
        );
        assert_eq!(l.words(0).done, 0);
        // Nothing is free, and the live reader's slots are never taken.
        assert_eq!(l.reserve(5, live + 1), Vec::<u32>::new());
        // A dead process's slots: taken when they hold nothing to answer.
        l.word(2, slot::OWNER)
            .store(owner_word(state::READING, dead), Ordering::Release);
        put(&l, 1, dead, 1, 102, 48);
        assert_eq!(l.reserve(5, live), vec![2], "slot 1 waits for an answer");
        l.word(1, slot::DONE).store(102, Ordering::Release);
        assert_eq!(l.reserve(5, live), vec![1], "answered: nothing to keep");
    }
}
