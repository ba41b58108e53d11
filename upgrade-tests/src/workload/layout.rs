//! Where the workload's files are and what is in them. The data set (`data/`) is made
//! once and reused by later runs on the same mount; each run writes its own `run-*/`.
//!
//! ```text
//! MOUNTPOINT/DIR/data/pattern.dat        read at random offsets (one long-lived fd)
//!                     files/fNNN         stat/open/read/close loop
//!                     small/sNNNNN       training: small samples read at random
//!                     shards/shardN      training: streamed sequentially
//!                run-T-SEED/applog       O_APPEND records (one long-lived fd)
//!                           churn-W/     worker W's create/rename/unlink/readdir
//!                           ckpt-W       worker W's checkpoint (written as ckpt-W.tmp)
//! ```

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::Config;
use super::pattern;

/// Reads and writes of streamed data are this large.
pub const READ_CHUNK: usize = 1 << 20;
pub const PATTERN_SEED: u64 = 0x5041_5454_4552_4E00;

pub fn pattern_path(data: &Path) -> PathBuf {
    data.join("pattern.dat")
}

pub fn file_path(data: &Path, i: usize) -> PathBuf {
    data.join("files").join(format!("f{i:03}"))
}

pub fn file_seed(i: usize) -> u64 {
    pattern::mix(0x1000_0000 + i as u64)
}

/// 1 B to 64 KiB.
pub fn file_len(i: usize) -> usize {
    1 + (pattern::mix(0x1100_0000 + i as u64) % 65_536) as usize
}

pub fn small_path(data: &Path, i: usize) -> PathBuf {
    data.join("small").join(format!("s{i:05}"))
}

pub fn small_seed(i: usize) -> u64 {
    pattern::mix(0x2000_0000 + i as u64)
}

/// 512 B to 16 KiB.
pub fn small_len(i: usize) -> usize {
    512 + (pattern::mix(0x2100_0000 + i as u64) % (16 * 1024 - 511)) as usize
}

pub fn shard_path(data: &Path, i: usize) -> PathBuf {
    data.join("shards").join(format!("shard{i}"))
}

pub fn shard_seed(i: usize) -> u64 {
    pattern::mix(0x3000_0000 + i as u64)
}

pub fn ckpt_seed(worker: usize, generation: u64) -> u64 {
    pattern::mix(0x4000_0000 ^ ((worker as u64) << 40) ^ generation)
}

/// Writes `len` bytes of content `seed` to `path` unless a file of that size is there
/// (through a temporary name, so a half-written file is never taken for a good one).
fn ensure(path: &Path, seed: u64, len: u64) -> io::Result<()> {
    if fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == len) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(READ_CHUNK as u64) as usize;
        f.write_all(&pattern::bytes(seed, off, n))?;
        off += n as u64;
    }
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}

/// Makes the data set under `data` (what is already there with the right size is kept).
pub fn make_data_set(data: &Path, cfg: &Config) -> io::Result<()> {
    for sub in ["files", "small", "shards"] {
        fs::create_dir_all(data.join(sub))?;
    }
    ensure(&pattern_path(data), PATTERN_SEED, cfg.pattern_size)?;
    for i in 0..cfg.files {
        ensure(&file_path(data, i), file_seed(i), file_len(i) as u64)?;
    }
    for i in 0..cfg.small_files {
        ensure(&small_path(data, i), small_seed(i), small_len(i) as u64)?;
    }
    for i in 0..cfg.shards {
        ensure(&shard_path(data, i), shard_seed(i), cfg.shard_size)?;
    }
    Ok(())
}
