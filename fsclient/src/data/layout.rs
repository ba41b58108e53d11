//! Pure layout arithmetic of the data path: which bytes of which objects make up a range
//! of a chunk.
//!
//! A chunk's slices are stored oldest first and later ones win where they overlap;
//! [`resolve`] turns such a list into non-overlapping [`Segment`]s that cover a requested
//! range exactly, gaps and holes (slice id 0) included. [`block_ranges`] maps the part of
//! a slice a segment reads onto the block objects that hold it, and [`block_key`] names
//! those objects.
//!
//! This module does no I/O and must never depend on the store, the cache or the metadata
//! engine: everything here is checked against a naive byte-array model by property tests.

use crate::meta::Slice;

/// Where the bytes of a [`Segment`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Never written, or a hole: reads as zeros.
    Zero,
    /// Bytes `off..off + len` of slice object `id` (whose total size is `size`).
    Slice { id: u64, size: u32, off: u32 },
}

/// `len` bytes at chunk offset `pos`, all from one [`Source`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub pos: u32,
    pub len: u32,
    pub source: Source,
}

/// Resolves `slices` (oldest first) over chunk bytes `start..end` into segments sorted by
/// position, without overlaps or gaps: their lengths add up to `end - start`.
///
/// Walks the slices newest first and keeps only the still uncovered intervals, so a read
/// of a small range stops as soon as it is covered, however long the history is.
pub fn resolve(slices: &[Slice], start: u32, end: u32) -> Vec<Segment> {
    let mut out = Vec::new();
    if start >= end {
        return out;
    }
    let mut uncovered: Vec<(u32, u32)> = vec![(start, end)];
    let mut next: Vec<(u32, u32)> = Vec::new();
    for s in slices.iter().rev() {
        if uncovered.is_empty() {
            break;
        }
        let s_start = s.pos;
        let s_end = s.pos.saturating_add(s.len);
        if s_start >= s_end {
            continue;
        }
        next.clear();
        for &(a, b) in &uncovered {
            let lo = a.max(s_start);
            let hi = b.min(s_end);
            if lo >= hi {
                next.push((a, b));
                continue;
            }
            let source = if s.id == 0 {
                Source::Zero
            } else {
                Source::Slice {
                    id: s.id,
                    size: s.size,
                    off: s.off + (lo - s_start),
                }
            };
            out.push(Segment {
                pos: lo,
                len: hi - lo,
                source,
            });
            if a < lo {
                next.push((a, lo));
            }
            if hi < b {
                next.push((hi, b));
            }
        }
        std::mem::swap(&mut uncovered, &mut next);
    }
    out.extend(uncovered.into_iter().map(|(a, b)| Segment {
        pos: a,
        len: b - a,
        source: Source::Zero,
    }));
    out.sort_unstable_by_key(|s| s.pos);
    merge_zeros(out)
}

/// Merges adjacent zero segments (a hole next to a gap reads the same).
fn merge_zeros(segments: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
    for s in segments {
        if let Some(last) = out.last_mut()
            && last.source == Source::Zero
            && s.source == Source::Zero
            && last.pos + last.len == s.pos
        {
            last.len += s.len;
            continue;
        }
        out.push(s);
    }
    out
}

/// The object key of block `index` (holding `len` bytes) of slice `id`. The layout is part
/// of the volume format: never change it.
pub fn block_key(id: u64, index: u32, len: u32) -> String {
    format!(
        "chunks/{}/{}/{}_{}_{}",
        id / 1_000_000,
        id / 1000,
        id,
        index,
        len
    )
}

/// Number of blocks a slice object of `size` bytes is cut into.
pub fn block_count(size: u32, block_size: u32) -> u32 {
    size.div_ceil(block_size)
}

/// Length of block `index` of a slice object of `size` bytes.
pub fn block_len(size: u32, block_size: u32, index: u32) -> u32 {
    let start = u64::from(index) * u64::from(block_size);
    (u64::from(size).saturating_sub(start)).min(u64::from(block_size)) as u32
}

/// A byte range inside one block object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub id: u64,
    pub index: u32,
    /// Total length of the block object.
    pub block_len: u32,
    /// Offset of the wanted bytes inside the block.
    pub start: u32,
    pub len: u32,
}

impl BlockRange {
    pub fn key(&self) -> String {
        block_key(self.id, self.index, self.block_len)
    }
}

/// The block ranges holding bytes `off..off + len` of slice object `id` of `size` bytes,
/// in order. The range must lie inside the object (`off + len <= size`).
pub fn block_ranges(id: u64, size: u32, off: u32, len: u32, block_size: u32) -> Vec<BlockRange> {
    let mut out = Vec::new();
    let end = off.saturating_add(len).min(size);
    let mut pos = off;
    while pos < end {
        let index = pos / block_size;
        let block_start = index * block_size;
        let block_len = block_len(size, block_size, index);
        let take = (block_start + block_len).min(end) - pos;
        out.push(BlockRange {
            id,
            index,
            block_len,
            start: pos - block_start,
            len: take,
        });
        pos += take;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The naive model: paint every slice over a byte array, oldest first. Each byte holds
    /// (slice id, offset in the slice object) or None for zeros.
    fn paint(slices: &[Slice], chunk_len: u32) -> Vec<Option<(u64, u32)>> {
        let mut model = vec![None; chunk_len as usize];
        for s in slices {
            for i in 0..s.len {
                let p = (s.pos + i) as usize;
                if p < model.len() {
                    model[p] = if s.id == 0 {
                        None
                    } else {
                        Some((s.id, s.off + i))
                    };
                }
            }
        }
        model
    }

    const CHUNK: u32 = 4096;

    fn slice() -> impl Strategy<Value = Slice> {
        (0u32..CHUNK, 1u32..1500, 0u64..6, 0u32..300).prop_map(|(pos, len, id, extra)| {
            let len = len.min(CHUNK - pos).max(1);
            let pos = pos.min(CHUNK - len);
            let off = extra / 2;
            Slice {
                pos,
                id,
                size: if id == 0 { 0 } else { off + len + extra / 2 },
                off: if id == 0 { 0 } else { off },
                len,
            }
        })
    }

    proptest! {
        #[test]
        fn resolve_matches_model(slices in proptest::collection::vec(slice(), 0..24),
                                 a in 0u32..CHUNK, b in 0u32..CHUNK) {
            let (start, end) = (a.min(b), a.max(b));
            let model = paint(&slices, CHUNK);
            let segs = resolve(&slices, start, end);
            let mut pos = start;
            for s in &segs {
                prop_assert_eq!(s.pos, pos, "segments must be contiguous");
                prop_assert!(s.len > 0);
                for i in 0..s.len {
                    let want = model[(s.pos + i) as usize];
                    let got = match s.source {
                        Source::Zero => None,
                        Source::Slice { id, off, size } => {
                            prop_assert!(off + s.len <= size);
                            Some((id, off + i))
                        }
                    };
                    prop_assert_eq!(got, want, "byte {}", s.pos + i);
                }
                pos += s.len;
            }
            prop_assert_eq!(pos, end);
        }

        #[test]
        fn block_ranges_cover_exactly(size in 1u32..50_000, a in 0u32..50_000, b in 0u32..50_000,
                                      shift in 10u32..14) {
            let bs = 1u32 << shift;
            let (off, end) = (a.min(b) % size, a.max(b) % (size + 1));
            let len = end.saturating_sub(off);
            let ranges = block_ranges(9, size, off, len, bs);
            let mut pos = off;
            for r in &ranges {
                prop_assert_eq!(u64::from(r.index) * u64::from(bs) + u64::from(r.start), u64::from(pos));
                prop_assert!(r.start + r.len <= r.block_len);
                prop_assert_eq!(r.block_len, block_len(size, bs, r.index));
                prop_assert!(r.index < block_count(size, bs));
                prop_assert!(r.len > 0);
                pos += r.len;
            }
            prop_assert_eq!(pos, off + len);
        }
    }

    #[test]
    fn later_slices_win_and_gaps_are_zero() {
        let slices = [
            Slice {
                pos: 0,
                id: 1,
                size: 100,
                off: 0,
                len: 100,
            },
            Slice {
                pos: 50,
                id: 2,
                size: 10,
                off: 0,
                len: 10,
            },
            Slice {
                pos: 90,
                id: 0,
                size: 0,
                off: 0,
                len: 20,
            },
        ];
        let segs = resolve(&slices, 0, 200);
        assert_eq!(
            segs,
            vec![
                Segment {
                    pos: 0,
                    len: 50,
                    source: Source::Slice {
                        id: 1,
                        size: 100,
                        off: 0
                    }
                },
                Segment {
                    pos: 50,
                    len: 10,
                    source: Source::Slice {
                        id: 2,
                        size: 10,
                        off: 0
                    }
                },
                Segment {
                    pos: 60,
                    len: 30,
                    source: Source::Slice {
                        id: 1,
                        size: 100,
                        off: 60
                    }
                },
                Segment {
                    pos: 90,
                    len: 110,
                    source: Source::Zero
                },
            ]
        );
    }

    #[test]
    fn keys_follow_the_volume_layout() {
        assert_eq!(
            block_key(1_234_567, 3, 4096),
            "chunks/1/1234/1234567_3_4096"
        );
        assert_eq!(block_len(10_000, 4096, 2), 10_000 - 8192);
        assert_eq!(block_len(8192, 4096, 2), 0);
        assert_eq!(block_count(8193, 4096), 3);
    }
}
