//! The Redis engine: one volume in one Redis database, shared by every client that mounts
//! it, on any node.
//!
//! A write transaction is optimistic: every key the operation reads is WATCHed before it is
//! read, the writes are queued in the transaction (and mirrored in an overlay so that point
//! reads see them), and they are applied with MULTI/EXEC. When EXEC reports that a watched
//! key changed, the whole operation is run again after a short jittered pause. A read
//! transaction issues plain reads: it is not a snapshot, which the metadata logic allows
//! for (see [`Tx`]). This file holds the connection pool and the transaction loop;
//! `redis/tx.rs` holds one transaction (WATCH, queued writes, overlay) and the key layout.
//!
//! Key layout (numbers in decimal; names, values and xattrs are arbitrary bytes, stored as
//! binary-safe hash fields and values; records use the encodings of `types.rs`):
//!
//! ```text
//! i{ino}            string  attr
//! d{ino}            hash    name -> dentry                   (directory by name)
//! o{ino}            zset    member name, score cookie        (directory in cookie order)
//! l{ino}            string  symlink target
//! x{ino}            hash    xattr name -> value
//! c{ino}_{index}    list    one slice record per element, oldest first
//! setting           string  format
//! next_inode  next_slice  next_session
//!                   string  counter: the last id handed out (INCRBY)
//! usedSpace  usedInodes
//!                   string  usage counters (INCRBY)
//! sessions          set     session ids
//! session{sid}      string  session info
//! sustained{sid}    set     inodes kept open-but-unlinked by the session
//! lock{ino}         string  the inode's byte-range locks
//! locked{sid}       set     inodes on which the session may hold locks
//! deadSlices        zset    member slice id, score `since` in milliseconds
//! deadSliceInfo     hash    slice id -> since (i64 ns, LE) ++ size (u32, LE)
//! req{sid}_{unique} string  outcome of a request (exactly-once, `meta/once.rs`)
//! reqs{sid}         zset    member and score: the uniques recorded for the session
//! ```
//!
//! Why these shapes:
//! - A session is its own key (not a field of one shared hash) so that the heartbeats of
//!   thousands of clients never conflict with each other.
//! - Sorted-set scores are doubles, exact only below 2^53. Cookies stay far below that.
//!   Timestamps in nanoseconds do not, so the dead-slice score is in milliseconds (exact for
//!   every i64 nanosecond value) and the exact `since` is in `deadSliceInfo`; order within a
//!   millisecond is restored from it.
//! - The usage counters are read without WATCH: they are read only for quota checks, and
//!   watching them would make every create in the volume conflict with every other.
//! - A request record is its own key, so that a resent request WATCHes only its own
//!   record, never a key every other request of the session writes; `reqs{sid}` is only
//!   written in MULTI (never watched) and lets the records be dropped by range.
//! - Keys carry no volume prefix: one volume per database (the `/db` of the URL). Redis
//!   Cluster is not supported, since one transaction touches keys in many hash slots.
//!
//! This engine must never log or return the password of the URL, never panic on anything
//! read from Redis (bad records are [`MetaError::Corrupt`]), and never return a pooled
//! connection that may still hold WATCHed keys or a half-read reply.

mod tx;

use std::time::Duration;

use ::redis::{Client, Connection, RedisError, Script};
use parking_lot::Mutex;

use self::tx::RedisTx;
use super::*;

const BACKEND: &str = "redis";
/// Time allowed to establish a connection (TCP, AUTH, SELECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for one reply; a server that stops answering is an error, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of one write transaction before giving up with [`MetaError::Conflict`].
const MAX_ATTEMPTS: u32 = 50;
/// Idle connections kept; more are opened on demand and closed when returned.
const MAX_IDLE: usize = 16;

/// One page of a directory in cookie order, with each entry's dentry, read atomically so
/// that a concurrent rename or unlink cannot leave a name without its record.
const DIR_PAGE_LUA: &str = r"
local names = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local out = {}
for i, name in ipairs(names) do
  out[2 * i - 1] = name
  out[2 * i] = redis.call('HGET', KEYS[2], name)
end
return out
";

/// The Redis backend.
pub struct RedisBackend {
    client: Client,
    /// The URL without its password, for messages.
    target: String,
    /// Idle connections, none of them in a WATCH.
    pool: Mutex<Vec<Connection>>,
    dir_page: Script,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.target)
            .field("idle", &self.pool.lock().len())
            .finish()
    }
}

pub(super) fn backend_err(e: RedisError) -> MetaError {
    MetaError::Backend {
        backend: BACKEND,
        source: Box::new(e),
    }
}

/// `url` with its password replaced, safe to log.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Unparseable: drop whatever could be credentials.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
            _ => url.to_string(),
        },
    }
}

fn connect(client: &Client) -> Result<Connection, RedisError> {
    let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

impl RedisBackend {
    /// Connects to `redis://[user:password@]host[:port][/db]` and checks that the server
    /// answers. `rediss://` (TLS) is refused: this build has no TLS support.
    pub fn open(url: &str) -> Result<Self> {
        let target = redact(url);
        let bad = |reason: String| MetaError::BadUrl {
            url: target.clone(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        match parsed.scheme() {
            "redis" => {}
            "rediss" => {
                return Err(bad(
                    "rediss:// (TLS) is not supported by this build; use redis:// on a trusted network"
                        .into(),
                ));
            }
            other => return Err(bad(format!("not a Redis URL (scheme {other:?})"))),
        }
        let client = Client::open(url).map_err(|e| bad(e.to_string()))?;
        let open_err = |e: RedisError| MetaError::Open {
            target: target.clone(),
            source: Box::new(e),
        };
        let mut con = connect(&client).map_err(open_err)?;
        ::redis::cmd("PING")
            .query::<String>(&mut con)
            .map_err(open_err)?;
        tracing::debug!(redis = %target, "connected to Redis");
        Ok(RedisBackend {
            client,
            target,
            pool: Mutex::new(vec![con]),
            dir_page: Script::new(DIR_PAGE_LUA),
        })
    }

    fn take(&self) -> Result<Connection> {
        if let Some(con) = self.pool.lock().pop() {
            return Ok(con);
        }
        connect(&self.client).map_err(backend_err)
    }

    fn give_back(&self, con: Connection) {
        let mut pool = self.pool.lock();
        if pool.len() < MAX_IDLE {
            pool.push(con);
        }
    }
}

/// How a transaction's connection failed, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// The connection was lost before anything was committed: safe to run again on a new
    /// connection.
    Dropped,
    /// Anything else: the connection's state is unknown.
    Other,
}

pub(super) fn failure_of(e: &RedisError) -> Failure {
    if e.is_connection_dropped() {
        Failure::Dropped
    } else {
        Failure::Other
    }
}

/// Pause before rerunning a conflicting transaction: random, growing with the attempts, so
/// that clients that collided do not collide again in lockstep.
fn backoff(attempt: u32) {
    let cap_us = (500u64 << attempt.min(6)).min(20_000);
    std::thread::sleep(Duration::from_micros(rand::random_range(0..=cap_us)));
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    /// Runs `f` until its EXEC goes through. A connection lost before EXEC is replaced
    /// once and `f` is run again; a connection lost during EXEC is an error, because the
    /// writes may or may not have been applied.
    fn write<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut con = self.take()?;
        let mut reconnected = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = RedisTx::new(&mut con, true, &self.dir_page);
            let out = f(&mut tx);
            let (mut queued, watched_any, failure) = tx.finish();
            match (failure, out) {
                (Some(Failure::Dropped), _) if !reconnected => {
                    // Nothing was sent with EXEC: run the operation again on a new connection.
                    reconnected = true;
                    attempt -= 1;
                    con = connect(&self.client).map_err(backend_err)?;
                }
                (Some(_), Err(e)) => return Err(e),
                (Some(_), Ok(_)) => {
                    return Err(MetaError::Backend {
                        backend: BACKEND,
                        source: "a Redis command failed inside the transaction".into(),
                    });
                }
                (None, Err(e)) => {
                    if watched_any {
                        ::redis::cmd("UNWATCH")
                            .exec(&mut con)
                            .map_err(backend_err)?;
                    }
                    self.give_back(con);
                    return Err(e);
                }
                (None, Ok(v)) => {
                    if queued.is_empty() && !watched_any {
                        self.give_back(con);
                        return Ok(v);
                    }
                    // Even without writes, EXEC checks that what was read still holds.
                    let done: Option<()> = queued.atomic().query(&mut con).map_err(backend_err)?;
                    if done.is_some() {
                        self.give_back(con);
                        return Ok(v);
                    }
                    if attempt >= MAX_ATTEMPTS {
                        self.give_back(con);
                        return Err(MetaError::Conflict(attempt));
                    }
                    tracing::trace!(attempt, "Redis transaction conflicted; running it again");
                    backoff(attempt);
                }
            }
        }
    }

    fn read<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut con = self.take()?;
        let mut reconnected = false;
        loop {
            let mut tx = RedisTx::new(&mut con, false, &self.dir_page);
            let out = f(&mut tx);
            match (tx.finish().2, out) {
                (None, out) => {
                    self.give_back(con);
                    return out;
                }
                (Some(Failure::Dropped), _) if !reconnected => {
                    reconnected = true;
                    con = connect(&self.client).map_err(backend_err)?;
                }
                (Some(_), Err(e)) => return Err(e),
                (Some(_), Ok(_)) => {
                    return Err(MetaError::Backend {
                        backend: BACKEND,
                        source: "a Redis command failed inside the transaction".into(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_password() {
        assert_eq!(redact("redis://:hunter2@h:6379/1"), "redis://:***@h:6379/1");
        assert_eq!(redact("redis://u:hunter2@h/1"), "redis://u:***@h/1");
        assert_eq!(redact("redis://h:6379/1"), "redis://h:6379/1");
        assert!(!redact("redis://u:hun ter2@h:bad/1").contains("hun"));
    }
}
