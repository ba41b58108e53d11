//! Kernel requests in this process, for exactly-once execution of mutations.
//!
//! Every mutation commits a record of its outcome under (session, unique) so that the kernel
//! may deliver it again after this process dies (`meta/once.rs`). Those records must be
//! dropped once their request can no longer come back, and never before. This module
//! decides when, without any I/O and with the time passed in (tested with a virtual clock).
//!
//! The kernel hands out uniques in increasing order per connection and a client reads
//! them in that order, resent requests first. So when this process has seen unique `U` at
//! time `t`, every request with a smaller unique had already been read by then, by this
//! process or by a predecessor (which the kernel resends to this one, before anything new).
//! A request still unanswered [`RETENTION`] after that is one whose handler has been
//! running that long: it is in flight here, and the watermark never passes a request in
//! flight. The rule, at every [`Requests::sweep`]:
//!
//! ```text
//! below = min( the highest unique seen at the last sweep at least RETENTION ago,
//!              the lowest unique in flight at any sweep since then, and now )
//! ```
//!
//! A process that just started has no sweep that old: it drops nothing, whatever its
//! predecessors recorded, until it has served for [`RETENTION`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long after a unique was seen its record (and those of older uniques) is kept.
pub const RETENTION: Duration = Duration::from_secs(60);

/// The uniques (without the resend bit) this process has seen and is executing.
#[derive(Debug, Default)]
pub struct Requests {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Uniques whose handler runs, with how many times (a unique is normally once).
    in_flight: BTreeMap<u64, u32>,
    max_seen: u64,
    samples: VecDeque<Sample>,
    /// Records below this were dropped.
    dropped_below: u64,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    max_seen: u64,
    /// Lowest unique in flight at that moment (`u64::MAX`: none).
    min_in_flight: u64,
}

/// A request being executed; ends when dropped.
#[derive(Debug)]
pub struct InFlight<'a> {
    requests: &'a Requests,
    unique: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.requests.state.lock();
        if let Some(n) = s.in_flight.get_mut(&self.unique) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.unique);
            }
        }
    }
}

impl State {
    fn min_in_flight(&self) -> u64 {
        self.in_flight.keys().next().copied().unwrap_or(u64::MAX)
    }
}

impl Requests {
    /// Request `unique` (without the resend bit) starts executing.
    pub fn begin(&self, unique: u64) -> InFlight<'_> {
        let mut s = self.state.lock();
        s.max_seen = s.max_seen.max(unique);
        *s.in_flight.entry(unique).or_insert(0) += 1;
        InFlight {
            requests: self,
            unique,
        }
    }

    /// Takes a sample at `now`; returns the unique below which records may be dropped, if
    /// it moved past what was dropped before. Confirm with [`Requests::dropped`].
    pub fn sweep(&self, now: Instant, retention: Duration) -> Option<u64> {
        let mut s = self.state.lock();
        let sample = Sample {
            at: now,
            max_seen: s.max_seen,
            min_in_flight: s.min_in_flight(),
        };
        s.samples.push_back(sample);
        // The last sample old enough; older ones are no longer needed.
        let old_enough = s
            .samples
            .iter()
            .rposition(|x| now.saturating_duration_since(x.at) >= retention)?;
        s.samples.drain(..old_enough);
        let basis = s.samples.front()?.max_seen;
        let in_flight = s
            .samples
            .iter()
            .map(|x| x.min_in_flight)
            .min()
            .unwrap_or(u64::MAX);
        let below = basis.min(in_flight).min(s.min_in_flight());
        (below > s.dropped_below).then_some(below)
    }

    /// Records below `below` were dropped.
    pub fn dropped(&self, below: u64) {
        let mut s = self.state.lock();
        s.dropped_below = s.dropped_below.max(below);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Duration = Duration::from_secs(60);
    const TICK: Duration = Duration::from_secs(10);

    #[test]
    fn nothing_is_dropped_before_a_full_retention() {
        let r = Requests::default();
        let t0 = Instant::now();
        drop(r.begin(100));
        for i in 0..6 {
            assert_eq!(r.sweep(t0 + TICK * i, R), None, "tick {i}");
        }
        // 60 s after the first sample: what was seen then may go.
        assert_eq!(r.sweep(t0 + TICK * 6, R), Some(100));
        r.dropped(100);
        assert_eq!(r.sweep(t0 + TICK * 7, R), None);
    }

    #[test]
    fn the_watermark_follows_what_was_seen_a_retention_ago() {
        let r = Requests::default();
        let t0 = Instant::now();
        for i in 0..20u32 {
            drop(r.begin(u64::from(i) * 10 + 2));
            let got = r.sweep(t0 + TICK * i, R);
            if let Some(b) = got {
                // Sample i-6 saw unique (i-6)*10+2.
                assert_eq!(b, u64::from(i - 6) * 10 + 2);
                r.dropped(b);
            } else {
                assert!(i < 6);
            }
        }
    }

    #[test]
    fn a_request_in_flight_holds_the_watermark() {
        let r = Requests::default();
        let t0 = Instant::now();
        let slow = r.begin(50);
        drop(r.begin(60));
        for i in 0..6 {
            assert_eq!(r.sweep(t0 + TICK * i, R), None);
        }
        // Seen up to 60 a retention ago, but 50 still runs.
        assert_eq!(r.sweep(t0 + TICK * 6, R), Some(50));
        r.dropped(50);
        drop(r.begin(90));
        assert_eq!(r.sweep(t0 + TICK * 7, R), None);
        drop(slow);
        // 50 ended, yet it was in flight at samples still in the window (up to tick 7): it
        // holds on until those samples age out.
        for i in 8..14 {
            assert_eq!(r.sweep(t0 + TICK * i, R), None, "tick {i}");
        }
        assert_eq!(r.sweep(t0 + TICK * 14, R), Some(90));
    }
}
