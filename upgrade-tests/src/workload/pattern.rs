//! File contents that can be checked without keeping a copy: every byte is a function of
//! a per-file seed and its offset, so any range read at any offset can be verified, and a
//! byte that came from another file, another offset or a stale version is caught.

/// A small, fast, deterministic pseudo-random generator (splitmix64). Used for content
/// and for the workload's choices, so that a run can be replayed from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// splitmix64's finalizer: a bijective 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 8 content bytes of the aligned word `word` (offset `word * 8`) of file `seed`.
fn word(seed: u64, word: u64) -> [u8; 8] {
    mix(seed ^ word.wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes()
}

/// Fills `buf` with the content of file `seed` at `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let w = word(seed, off / 8);
        let start = (off % 8) as usize;
        let n = (8 - start).min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&w[start..start + n]);
        pos += n;
    }
}

/// The content of file `seed` from `offset`, `len` bytes.
pub fn bytes(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, offset, &mut v);
    v
}

/// The first offset (relative to `buf`) where `buf` differs from the content of file
/// `seed` at `offset`, if any.
pub fn first_mismatch(seed: u64, offset: u64, buf: &[u8]) -> Option<usize> {
    let mut pos = 0usize;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let w = word(seed, off / 8);
        let start = (off % 8) as usize;
        let n = (8 - start).min(buf.len() - pos);
        if buf[pos..pos + n] != w[start..start + n] {
            let i = (0..n).find(|&i| buf[pos + i] != w[start + i]).unwrap_or(0);
            return Some(pos + i);
        }
        pos += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_range_matches_the_whole() {
        let whole = bytes(7, 0, 1000);
        for (off, len) in [(0, 1), (3, 17), (8, 8), (13, 500), (999, 1)] {
            let part = bytes(7, off as u64, len);
            assert_eq!(part, whole[off..off + len]);
            assert_eq!(first_mismatch(7, off as u64, &part), None);
        }
    }

    #[test]
    fn mismatches_are_found_where_they_are() {
        let mut b = bytes(1, 5, 100);
        b[42] ^= 1;
        assert_eq!(first_mismatch(1, 5, &b), Some(42));
        // Another file's content or another offset is not accepted.
        assert!(first_mismatch(2, 5, &bytes(1, 5, 64)).is_some());
        assert!(first_mismatch(1, 6, &bytes(1, 5, 64)).is_some());
    }

    #[test]
    fn rng_ranges() {
        let mut r = Rng::new(3);
        for _ in 0..1000 {
            let v = r.range(5, 9);
            assert!((5..=9).contains(&v));
        }
    }
}
