//! Garbage collection: deleting the objects of slices no file references any more.
//!
//! The metadata engine records a slice as dead when a truncate or a freed inode drops the
//! last reference to it, with the time it happened. Only slices dead for longer than a
//! grace period are collected, so a reader that resolved the old layout just before can
//! still fetch its blocks.
//!
//! What it must never do: forget a dead slice whose objects were not all deleted (they
//! would leak forever), or delete an object of a slice that is not dead.

use std::sync::Arc;
use std::time::Duration;

use crate::meta::Timestamp;

use super::Ctx;
use super::error::DataError;
use super::layout::{block_count, block_key, block_len};

/// Dead slices handled per round.
const BATCH: usize = 256;

/// Collects slices dead for longer than `grace`; returns how many were collected.
pub(crate) fn collect(ctx: &Arc<Ctx>, grace: Duration) -> Result<usize, DataError> {
    let grace = i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX);
    let before = Timestamp(Timestamp::now().0.saturating_sub(grace));
    let mut total = 0;
    loop {
        let dead = ctx
            .meta
            .dead_slices(before, BATCH)
            .map_err(DataError::meta("dead_slices"))?;
        if dead.is_empty() {
            return Ok(total);
        }
        let bs = ctx.block_size;
        let deletions = dead.iter().map(|d| {
            let keys: Vec<String> = (0..block_count(d.size, bs))
                .map(|i| block_key(d.id, i, block_len(d.size, bs, i)))
                .collect();
            let (store, cache, id) = (ctx.store.clone(), ctx.cache.clone(), d.id);
            ctx.rt.spawn(async move {
                for key in keys {
                    cache.remove(&key);
                    store
                        .delete(&key)
                        .await
                        .map_err(|source| DataError::Delete { key, source })?;
                }
                Ok::<u64, DataError>(id)
            })
        });
        let handles: Vec<_> = deletions.collect();
        let results = ctx.rt.block_on(async {
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(h.await);
            }
            out
        });
        let mut done = Vec::new();
        let mut failure = None;
        for r in results {
            match r.map_err(DataError::Task).and_then(|r| r) {
                Ok(id) => done.push(id),
                Err(e) => {
                    tracing::warn!(error = %e, "deleting a dead slice failed; kept for the next round");
                    failure.get_or_insert(e);
                }
            }
        }
        ctx.meta
            .forget_dead_slices(&done)
            .map_err(DataError::meta("forget_dead_slices"))?;
        total += done.len();
        if let Some(e) = failure {
            return Err(e);
        }
        if dead.len() < BATCH {
            return Ok(total);
        }
    }
}
