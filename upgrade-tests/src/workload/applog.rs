//! The append log: self-describing records written through one long-lived `O_APPEND`
//! descriptor, and the check that every acknowledged record is in the file, once, in
//! order and intact.
//!
//! A record is `magic u32 | seq u64 | len u32 | payload | crc32c u32` (little endian);
//! the CRC covers everything before it, the payload is the [`pattern`] content of seed
//! `seq`, and `len` is a function of `seq`, so a record that is intact but belongs
//! elsewhere (an append applied twice, a stale block) is still caught.

use std::collections::BTreeSet;

use serde::Serialize;

use super::pattern;

const MAGIC: u32 = 0x5245_4344; // "DCER" little endian: "RECD" on disk.
const HEADER: usize = 4 + 8 + 4;
const TRAILER: usize = 4;
/// Largest payload; keeps a corrupt length from making the parser skip the file.
pub const MAX_PAYLOAD: usize = 8192;

/// The payload length of record `seq`: 16 B to [`MAX_PAYLOAD`], mostly small.
pub fn payload_len(seq: u64) -> usize {
    let r = pattern::mix(seq ^ 0xA5A5);
    if r % 8 == 0 {
        16 + (r >> 8) as usize % (MAX_PAYLOAD - 15)
    } else {
        16 + (r >> 8) as usize % 496
    }
}

fn payload_seed(seq: u64) -> u64 {
    seq ^ 0x4C4F_4720_0000_0000
}

/// The bytes of record `seq`.
pub fn encode(seq: u64) -> Vec<u8> {
    let len = payload_len(seq);
    let mut v = Vec::with_capacity(HEADER + len + TRAILER);
    v.extend_from_slice(&MAGIC.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(&pattern::bytes(payload_seed(seq), 0, len));
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// What the writer knows when the run ends.
#[derive(Clone, Debug, Default)]
pub struct Written {
    /// Records whose `write` returned the whole length: they must be in the file.
    pub acknowledged: BTreeSet<u64>,
    /// Records whose `write` failed or was short: they may or may not be in the file.
    pub uncertain: BTreeSet<u64>,
    /// Records covered by a successful `fsync`.
    pub fsynced: u64,
    /// The next sequence number the writer would have used.
    pub next_seq: u64,
}

/// The outcome of reading the log back.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AppendReport {
    pub acknowledged: u64,
    pub uncertain: u64,
    pub fsynced: u64,
    pub bytes: u64,
    /// Intact records found.
    pub found: u64,
    /// Acknowledged records not found.
    pub lost: u64,
    pub lost_examples: Vec<u64>,
    /// Damaged regions (bad magic, length, CRC or payload) and records that were never
    /// written.
    pub corrupted: u64,
    pub corrupted_examples: Vec<String>,
    /// Records found more than once (an append applied twice).
    pub duplicates: u64,
    /// Records found after a record with a higher sequence number.
    pub out_of_order: u64,
    /// The log could not be read back at all.
    pub read_error: Option<String>,
}

impl AppendReport {
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.corrupted == 0
            && self.duplicates == 0
            && self.out_of_order == 0
            && self.read_error.is_none()
    }
}

const EXAMPLES: usize = 10;

fn parse_at(data: &[u8], pos: usize) -> Result<(u64, usize), String> {
    let rest = &data[pos..];
    if rest.len() < HEADER + TRAILER {
        return Err(format!(
            "truncated record at offset {pos} ({} bytes left)",
            rest.len()
        ));
    }
    let word = |r: std::ops::Range<usize>| rest[r].to_vec();
    let magic = u32::from_le_bytes(word(0..4).try_into().unwrap_or_default());
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#x} at offset {pos}"));
    }
    let seq = u64::from_le_bytes(word(4..12).try_into().unwrap_or_default());
    let len = u32::from_le_bytes(word(12..16).try_into().unwrap_or_default()) as usize;
    if len > MAX_PAYLOAD || rest.len() < HEADER + len + TRAILER {
        return Err(format!("bad length {len} at offset {pos} (seq {seq})"));
    }
    let body = &rest[..HEADER + len];
    let crc = u32::from_le_bytes(
        word(HEADER + len..HEADER + len + 4)
            .try_into()
            .unwrap_or_default(),
    );
    if crc32c::crc32c(body) != crc {
        return Err(format!("bad CRC at offset {pos} (seq {seq}, len {len})"));
    }
    if len != payload_len(seq) {
        return Err(format!(
            "record {seq} at offset {pos} has length {len}, expected {}",
            payload_len(seq)
        ));
    }
    if let Some(i) = pattern::first_mismatch(payload_seed(seq), 0, &body[HEADER..]) {
        return Err(format!(
            "record {seq} at offset {pos}: payload differs at byte {i}"
        ));
    }
    Ok((seq, HEADER + len + TRAILER))
}

/// Checks the log's bytes against what the writer knows.
pub fn verify(data: &[u8], written: &Written) -> AppendReport {
    let mut r = AppendReport {
        acknowledged: written.acknowledged.len() as u64,
        uncertain: written.uncertain.len() as u64,
        fsynced: written.fsynced,
        bytes: data.len() as u64,
        ..AppendReport::default()
    };
    let mut seen = BTreeSet::new();
    let mut highest: Option<u64> = None;
    let mut pos = 0usize;
    let corrupt = |r: &mut AppendReport, what: String| {
        r.corrupted += 1;
        if r.corrupted_examples.len() < EXAMPLES {
            r.corrupted_examples.push(what);
        }
    };
    while pos < data.len() {
        match parse_at(data, pos) {
            Ok((seq, size)) => {
                pos += size;
                if !written.acknowledged.contains(&seq) && !written.uncertain.contains(&seq) {
                    corrupt(
                        &mut r,
                        format!("record {seq} was never written (offset {})", pos - size),
                    );
                    continue;
                }
                r.found += 1;
                if !seen.insert(seq) {
                    r.duplicates += 1;
                    if r.corrupted_examples.len() < EXAMPLES {
                        r.corrupted_examples.push(format!(
                            "record {seq} appears again at offset {}",
                            pos - size
                        ));
                    }
                    continue;
                }
                if highest.is_some_and(|h| seq < h) {
                    r.out_of_order += 1;
                }
                highest = highest.max(Some(seq));
            }
            Err(what) => {
                corrupt(&mut r, what);
                // Resynchronise on the next magic number.
                let magic = MAGIC.to_le_bytes();
                pos = data[pos + 1..]
                    .windows(4)
                    .position(|w| w == magic)
                    .map_or(data.len(), |i| pos + 1 + i);
            }
        }
    }
    for seq in written.acknowledged.difference(&seen) {
        r.lost += 1;
        if r.lost_examples.len() < EXAMPLES {
            r.lost_examples.push(*seq);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(seqs: &[u64]) -> Vec<u8> {
        seqs.iter().flat_map(|s| encode(*s)).collect()
    }

    fn acked(n: u64) -> Written {
        Written {
            acknowledged: (0..n).collect(),
            next_seq: n,
            ..Written::default()
        }
    }

    #[test]
    fn an_intact_log_is_clean() {
        let r = verify(&log(&[0, 1, 2, 3, 4]), &acked(5));
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.found, 5);
    }

    #[test]
    fn lost_duplicated_reordered_and_damaged_records_are_reported() {
        let r = verify(&log(&[0, 2, 3]), &acked(4));
        assert_eq!((r.lost, r.lost_examples.clone()), (1, vec![1]));

        let r = verify(&log(&[0, 1, 1, 2]), &acked(3));
        assert_eq!(r.duplicates, 1);

        let r = verify(&log(&[0, 2, 1]), &acked(3));
        assert_eq!(r.out_of_order, 1);

        let mut data = log(&[0, 1, 2]);
        let at = encode(0).len() + 20;
        data[at] ^= 0xff;
        let r = verify(&data, &acked(3));
        assert_eq!((r.corrupted, r.lost, r.found), (1, 1, 2), "{r:?}");

        let mut data = log(&[0, 1]);
        data.truncate(data.len() - 3);
        let r = verify(&data, &acked(2));
        assert_eq!((r.corrupted, r.lost), (1, 1));
    }

    #[test]
    fn uncertain_records_may_be_missing_or_present() {
        let w = Written {
            uncertain: [2].into(),
            ..acked(2)
        };
        assert!(verify(&log(&[0, 1]), &w).is_clean());
        assert!(verify(&log(&[0, 1, 2]), &w).is_clean());
        // ... but a record nobody wrote is corruption.
        assert_eq!(verify(&log(&[0, 1, 7]), &w).corrupted, 1);
    }
}
