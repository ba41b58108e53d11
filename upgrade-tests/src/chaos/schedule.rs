//! When faults happen: durations as people write them (`10m`, `30s`, `400ms`), and
//! intervals with jitter, so that faults land at random moments of the application's
//! requests rather than in step with them.

use std::time::Duration;

use crate::workload::Rng;

/// A duration could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad duration {text:?}: a number with a unit (ms, s, m, h), e.g. 400ms, 30s, 10m, 1.5h")]
pub struct BadDuration {
    pub text: String,
}

/// Reads `400ms`, `30s`, `1.5s`, `10m`, `2h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    let bad = || BadDuration {
        text: text.to_string(),
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "ms" => 1e-3,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = n * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `1m30s`-style rendering for summaries: the largest sensible unit.
pub fn show_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0}ms", s * 1e3)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else if s < 7200.0 {
        format!("{:.1}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

/// The next moments of one kind of fault: every `interval`, each gap drawn uniformly from
/// `interval × [1 − jitter, 1 + jitter]`.
#[derive(Debug)]
pub struct Every {
    interval: Duration,
    jitter: f64,
    rng: Rng,
    /// Offset from the start of the run of the next fault.
    next: Duration,
}

impl Every {
    /// The first fault comes after one (jittered) interval.
    pub fn new(interval: Duration, jitter: f64, seed: u64) -> Every {
        let mut e = Every {
            interval,
            jitter: jitter.clamp(0.0, 1.0),
            rng: Rng::new(seed),
            next: Duration::ZERO,
        };
        e.next = e.gap();
        e
    }

    fn gap(&mut self) -> Duration {
        // A uniform fraction in [0, 1) with 53 bits.
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let f = 1.0 - self.jitter + 2.0 * self.jitter * u;
        self.interval.mul_f64(f.max(0.0))
    }

    /// When the next fault is due (offset from the start of the run).
    pub fn due(&self) -> Duration {
        self.next
    }

    /// The fault due was injected at `at`: the next one comes one gap after it (never
    /// sooner, however long the fault and its recovery took).
    pub fn done(&mut self, at: Duration) {
        let g = self.gap();
        self.next = at.max(self.next) + g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("400ms"), Ok(Duration::from_millis(400)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        for bad in ["", "s", "10x", "-1s", "1.2.3s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn gaps_stay_within_the_jitter_and_average_the_interval() {
        let interval = Duration::from_millis(1000);
        let mut e = Every::new(interval, 0.5, 7);
        let mut at = Duration::ZERO;
        let mut gaps = Vec::new();
        for _ in 0..1000 {
            let due = e.due();
            gaps.push((due - at).as_secs_f64());
            at = due;
            e.done(due);
        }
        assert!(gaps.iter().all(|g| (0.5..=1.5).contains(g)), "{gaps:?}");
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!((0.95..1.05).contains(&mean), "mean gap {mean}");
        // Not all the same: the moments are random.
        assert!(gaps.iter().any(|g| (g - gaps[0]).abs() > 0.1));
    }

    #[test]
    fn a_slow_fault_pushes_the_next_one_back() {
        let mut e = Every::new(Duration::from_secs(1), 0.0, 1);
        assert_eq!(e.due(), Duration::from_secs(1));
        e.done(Duration::from_secs(5));
        assert_eq!(e.due(), Duration::from_secs(6));
    }
}
