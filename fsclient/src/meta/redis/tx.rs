//! One Redis transaction: reads WATCHed before they are made (in a write transaction),
//! writes queued for MULTI/EXEC and mirrored in an overlay so that point reads see them,
//! and the [`Tx`] operations over the key layout drawn in `meta/redis.rs`.
//!
//! It must never send a write outside the queue, except the id counters (`alloc`), which
//! must advance even when the transaction is rerun or aborted; and it never commits: the
//! loop in `meta/redis.rs` does.

use std::collections::{HashMap, HashSet};

use ::redis::{Cmd, Connection, FromRedisValue, Pipeline, RedisError, Script};

use super::{Failure, backend_err, failure_of};
use crate::meta::*;

/// What a list (a chunk) holds as far as this transaction knows.
#[derive(Default)]
struct ListState {
    /// The whole list, if it was read or replaced in this transaction.
    base: Option<Vec<Vec<u8>>>,
    /// Elements appended to a list whose content is not known yet.
    appended: Vec<Vec<u8>>,
}

/// A hash field: `(key, field)`.
type FieldKey = (Vec<u8>, Vec<u8>);

/// Values as the transaction will leave them (its writes) or found them (its reads); a
/// watched key cannot change without failing EXEC, so a value read once is reused.
#[derive(Default)]
struct Overlay {
    /// String keys; `None` = absent.
    strings: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Hash fields `(key, field)`; `None` = absent.
    fields: HashMap<FieldKey, Option<Vec<u8>>>,
    /// Hashes deleted as a whole; fields set afterwards are in `fields`.
    cleared: HashSet<Vec<u8>>,
    lists: HashMap<Vec<u8>, ListState>,
}

pub(super) struct RedisTx<'c> {
    con: &'c mut Connection,
    write: bool,
    dir_page: &'c Script,
    watched: HashSet<Vec<u8>>,
    /// Writes, applied by MULTI/EXEC at commit.
    queued: Pipeline,
    overlay: Overlay,
    /// Usage added by this transaction (bytes, inodes).
    usage_delta: (i64, i64),
    failure: Option<Failure>,
}

fn key(tag: &str, n: u64) -> Vec<u8> {
    format!("{tag}{n}").into_bytes()
}

fn chunk_key(ino: Ino, index: u32) -> Vec<u8> {
    format!("c{}_{index}", ino.0).into_bytes()
}

const SETTING: &[u8] = b"setting";
const USED_SPACE: &[u8] = b"usedSpace";
const USED_INODES: &[u8] = b"usedInodes";
const SESSIONS: &[u8] = b"sessions";
const DEAD_SLICES: &[u8] = b"deadSlices";
const DEAD_SLICE_INFO: &[u8] = b"deadSliceInfo";

/// Deletes a session's request records below a unique: KEYS[1] the session's index
/// (`reqs{sid}`), ARGV[1] the record key prefix (`req{sid}_`), ARGV[2] the exclusive upper
/// bound as a score (`(N`). Runs inside MULTI like any queued write. Scores are doubles,
/// exact below 2^53: kernel uniques stay far below that.
const DEL_REQUESTS_LUA: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[1] .. id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
return #ids
";

fn request_key(sid: SessionId, unique: u64) -> Vec<u8> {
    format!("req{}_{unique}", sid.0).into_bytes()
}

/// The sorted-set score of a dead slice: its time in whole milliseconds, which a double
/// holds exactly for every i64 nanosecond value.
fn dead_score(t: Timestamp) -> i64 {
    t.0.div_euclid(1_000_000)
}

fn encode_dead_info(d: &DeadSlice) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&d.since.0.to_le_bytes());
    v.extend_from_slice(&d.size.to_le_bytes());
    v
}

fn decode_dead_info(b: &[u8]) -> Result<(Timestamp, u32), Corrupt> {
    const C: Corrupt = Corrupt { what: "dead slice" };
    let (since, size) = b.split_first_chunk::<8>().ok_or(C)?;
    let size: [u8; 4] = size.try_into().map_err(|_| C)?;
    Ok((
        Timestamp(i64::from_le_bytes(*since)),
        u32::from_le_bytes(size),
    ))
}

fn parse_u64(b: &[u8], what: &'static str) -> Result<u64, Corrupt> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Corrupt { what })
}

fn decode_slice(b: &[u8]) -> Result<Slice, Corrupt> {
    if b.len() != SLICE_LEN {
        return Err(Corrupt { what: "slice" });
    }
    Slice::decode(b)
}

impl<'c> RedisTx<'c> {
    pub(super) fn new(con: &'c mut Connection, write: bool, dir_page: &'c Script) -> Self {
        RedisTx {
            con,
            write,
            dir_page,
            watched: HashSet::new(),
            queued: Pipeline::new(),
            overlay: Overlay::default(),
            usage_delta: (0, 0),
            failure: None,
        }
    }

    /// The queued writes, whether any key is WATCHed, and how the connection failed.
    pub(super) fn finish(self) -> (Pipeline, bool, Option<Failure>) {
        (self.queued, !self.watched.is_empty(), self.failure)
    }

    fn fail(&mut self, e: RedisError) -> MetaError {
        self.failure.get_or_insert(failure_of(&e));
        backend_err(e)
    }

    fn writable(&self) -> Result<()> {
        if self.write {
            Ok(())
        } else {
            Err(MetaError::ReadOnly)
        }
    }

    /// Runs `cmd`, first WATCHing `keys` (in the same round trip) in a write transaction.
    fn fetch<T: FromRedisValue>(&mut self, keys: &[&[u8]], cmd: Cmd) -> Result<T> {
        let new: Vec<&[u8]> = if self.write {
            keys.iter()
                .copied()
                .filter(|k| !self.watched.contains(*k))
                .collect()
        } else {
            Vec::new()
        };
        let res = if new.is_empty() {
            cmd.query::<T>(self.con)
        } else {
            let mut p = Pipeline::new();
            p.cmd("WATCH").arg(&new).ignore().add_command(cmd);
            p.query::<(T,)>(self.con).map(|(v,)| v)
        };
        match res {
            Ok(v) => {
                for k in new {
                    self.watched.insert(k.to_vec());
                }
                Ok(v)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn queue(&mut self, cmd: Cmd) -> Result<()> {
        self.writable()?;
        self.queued.add_command(cmd).ignore();
        Ok(())
    }

    fn get(&mut self, k: Vec<u8>) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.strings.get(&k) {
            return Ok(v.clone());
        }
        let v: Option<Vec<u8>> = self.fetch(&[&k], Cmd::get(&k))?;
        self.overlay.strings.insert(k, v.clone());
        Ok(v)
    }

    fn set(&mut self, k: Vec<u8>, v: Vec<u8>) -> Result<()> {
        self.queue(Cmd::set(&k, &v))?;
        self.overlay.strings.insert(k, Some(v));
        Ok(())
    }

    fn del(&mut self, k: Vec<u8>) -> Result<()> {
        self.queue(Cmd::del(&k))?;
        self.overlay.strings.insert(k, None);
        Ok(())
    }

    fn hget(&mut self, k: Vec<u8>, field: &[u8]) -> Result<Option<Vec<u8>>> {
        let fk = (k, field.to_vec());
        if let Some(v) = self.overlay.fields.get(&fk) {
            return Ok(v.clone());
        }
        if self.overlay.cleared.contains(&fk.0) {
            return Ok(None);
        }
        let v: Option<Vec<u8>> = self.fetch(&[&fk.0], Cmd::hget(&fk.0, field))?;
        self.overlay.fields.insert(fk, v.clone());
        Ok(v)
    }

    fn hset(&mut self, k: Vec<u8>, field: &[u8], v: Vec<u8>) -> Result<()> {
        self.queue(Cmd::hset(&k, field, &v))?;
        self.overlay.fields.insert((k, field.to_vec()), Some(v));
        Ok(())
    }

    fn hdel(&mut self, k: Vec<u8>, field: &[u8]) -> Result<()> {
        self.queue(Cmd::hdel(&k, field))?;
        self.overlay.fields.insert((k, field.to_vec()), None);
        Ok(())
    }

    /// The members of a set, as committed.
    fn members(&mut self, k: Vec<u8>, what: &'static str) -> Result<Vec<u64>> {
        let raw: Vec<Vec<u8>> = self.fetch(&[&k], Cmd::smembers(&k))?;
        let mut out = raw
            .iter()
            .map(|m| parse_u64(m, what))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_unstable();
        Ok(out)
    }
}

impl Tx for RedisTx<'_> {
    fn attr(&mut self, ino: Ino) -> Result<Option<Attr>> {
        Ok(self
            .get(key("i", ino.0))?
            .map(|v| Attr::decode(&v))
            .transpose()?)
    }

    fn set_attr(&mut self, ino: Ino, attr: &Attr) -> Result<()> {
        self.set(key("i", ino.0), attr.encode())
    }

    fn del_attr(&mut self, ino: Ino) -> Result<()> {
        self.del(key("i", ino.0))
    }

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Dentry>> {
        Ok(self
            .hget(key("d", parent.0), name)?
            .map(|v| Dentry::decode(&v))
            .transpose()?)
    }

    fn set_dentry(&mut self, parent: Ino, name: &[u8], dentry: &Dentry) -> Result<()> {
        self.hset(key("d", parent.0), name, dentry.encode())?;
        self.queue(Cmd::zadd(key("o", parent.0), name, dentry.cookie))
    }

    fn del_dentry(&mut self, parent: Ino, name: &[u8], _cookie: u64) -> Result<()> {
        // The cookie index is keyed by name (a name is unique in its directory).
        self.hdel(key("d", parent.0), name)?;
        self.queue(Cmd::zrem(key("o", parent.0), name))
    }

    fn dir_entries(
        &mut self,
        parent: Ino,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Dentry)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (order, by_name) = (key("o", parent.0), key("d", parent.0));
        let new: Vec<&[u8]> = if self.write {
            [order.as_slice(), by_name.as_slice()]
                .into_iter()
                .filter(|k| !self.watched.contains(*k))
                .collect()
        } else {
            Vec::new()
        };
        if !new.is_empty() {
            let res = ::redis::cmd("WATCH").arg(&new).exec(self.con);
            res.map_err(|e| self.fail(e))?;
            for k in new {
                self.watched.insert(k.to_vec());
            }
        }
        let count = i64::try_from(limit).unwrap_or(-1);
        let res = self
            .dir_page
            .key(&order)
            .key(&by_name)
            .arg(format!("({after}"))
            .arg(count)
            .invoke::<Vec<Option<Vec<u8>>>>(self.con);
        let flat = res.map_err(|e| self.fail(e))?;
        const C: Corrupt = Corrupt {
            what: "directory index",
        };
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks(2) {
            match pair {
                [Some(name), Some(d)] => out.push((name.clone(), Dentry::decode(d)?)),
                _ => return Err(MetaError::Corrupt(C)),
            }
        }
        Ok(out)
    }

    fn dir_is_empty(&mut self, parent: Ino) -> Result<bool> {
        let k = key("d", parent.0);
        let n: i64 = self.fetch(&[&k], Cmd::exists(&k))?;
        Ok(n == 0)
    }

    fn symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>> {
        self.get(key("l", ino.0))
    }

    fn set_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()> {
        self.set(key("l", ino.0), target.to_vec())
    }

    fn del_symlink(&mut self, ino: Ino) -> Result<()> {
        self.del(key("l", ino.0))
    }

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.hget(key("x", ino.0), name)
    }

    fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        self.hset(key("x", ino.0), name, value.to_vec())
    }

    fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<()> {
        self.hdel(key("x", ino.0), name)
    }

    fn xattr_names(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let k = key("x", ino.0);
        let mut names: Vec<Vec<u8>> = if self.overlay.cleared.contains(&k) {
            Vec::new()
        } else {
            self.fetch(&[&k], Cmd::hkeys(&k))?
        };
        for ((hk, field), v) in &self.overlay.fields {
            if *hk == k {
                names.retain(|n| n != field);
                if v.is_some() {
                    names.push(field.clone());
                }
            }
        }
        // Name order, as the embedded engine lists them.
        names.sort_unstable();
        Ok(names)
    }

    fn del_xattrs(&mut self, ino: Ino) -> Result<()> {
        let k = key("x", ino.0);
        self.queue(Cmd::del(&k))?;
        self.overlay.fields.retain(|(hk, _), _| *hk != k);
        self.overlay.cleared.insert(k);
        Ok(())
    }

    fn chunk(&mut self, ino: Ino, index: u32) -> Result<Vec<Slice>> {
        let k = chunk_key(ino, index);
        let known = self.overlay.lists.get(&k).and_then(|s| s.base.clone());
        let records = match known {
            Some(base) => base,
            None => {
                let mut base: Vec<Vec<u8>> = self.fetch(&[&k], Cmd::lrange(&k, 0, -1))?;
                let state = self.overlay.lists.entry(k).or_default();
                base.append(&mut state.appended);
                state.base = Some(base.clone());
                base
            }
        };
        Ok(records
            .iter()
            .map(|r| decode_slice(r))
            .collect::<Result<_, _>>()?)
    }

    fn append_slice(&mut self, ino: Ino, index: u32, slice: &Slice) -> Result<()> {
        let k = chunk_key(ino, index);
        let rec = slice.encode();
        self.queue(Cmd::rpush(&k, &rec))?;
        let state = self.overlay.lists.entry(k).or_default();
        match &mut state.base {
            Some(base) => base.push(rec),
            None => state.appended.push(rec),
        }
        Ok(())
    }

    fn set_chunk(&mut self, ino: Ino, index: u32, slices: &[Slice]) -> Result<()> {
        let k = chunk_key(ino, index);
        let recs: Vec<Vec<u8>> = slices.iter().map(Slice::encode).collect();
        self.queue(Cmd::del(&k))?;
        if !recs.is_empty() {
            self.queue(Cmd::rpush(&k, &recs))?;
        }
        self.overlay.lists.insert(
            k,
            ListState {
                base: Some(recs),
                appended: Vec::new(),
            },
        );
        Ok(())
    }

    fn format(&mut self) -> Result<Option<Format>> {
        Ok(self
            .get(SETTING.to_vec())?
            .map(|v| Format::decode(&v))
            .transpose()?)
    }

    fn set_format(&mut self, format: &Format) -> Result<()> {
        self.set(SETTING.to_vec(), format.encode())
    }

    fn alloc(&mut self, counter: Counter, n: u64) -> Result<u64> {
        self.writable()?;
        let step = i64::try_from(n).map_err(|_| MetaError::Invalid)?;
        // Outside MULTI on purpose: ids must never be handed out twice, even when this
        // transaction is rerun or aborted.
        let res = Cmd::incr(counter.key(), step).query::<i64>(self.con);
        let last = res.map_err(|e| self.fail(e))?;
        let last = u64::try_from(last).map_err(|_| Corrupt { what: "counter" })?;
        if last < n {
            return Err(MetaError::Corrupt(Corrupt { what: "counter" }));
        }
        Ok(last - n + 1)
    }

    fn add_usage(&mut self, bytes: i64, inodes: i64) -> Result<()> {
        self.writable()?;
        if bytes != 0 {
            self.queue(Cmd::incr(USED_SPACE, bytes))?;
        }
        if inodes != 0 {
            self.queue(Cmd::incr(USED_INODES, inodes))?;
        }
        self.usage_delta.0 = self.usage_delta.0.saturating_add(bytes);
        self.usage_delta.1 = self.usage_delta.1.saturating_add(inodes);
        Ok(())
    }

    fn usage(&mut self) -> Result<Usage> {
        // Not watched (see the module doc).
        let mut q = ::redis::cmd("MGET");
        q.arg(USED_SPACE).arg(USED_INODES);
        let res = q.query::<(Option<i64>, Option<i64>)>(self.con);
        let (bytes, inodes) = res.map_err(|e| self.fail(e))?;
        let total =
            |v: Option<i64>, d: i64| u64::try_from(v.unwrap_or(0).saturating_add(d)).unwrap_or(0);
        Ok(Usage {
            used_bytes: total(bytes, self.usage_delta.0),
            used_inodes: total(inodes, self.usage_delta.1),
        })
    }

    fn session(&mut self, sid: SessionId) -> Result<Option<SessionInfo>> {
        Ok(self
            .get(key("session", sid.0))?
            .map(|v| SessionInfo::decode(&v))
            .transpose()?)
    }

    fn set_session(&mut self, sid: SessionId, info: &SessionInfo) -> Result<()> {
        self.set(key("session", sid.0), info.encode())?;
        self.queue(Cmd::sadd(SESSIONS, sid.0))
    }

    fn del_session(&mut self, sid: SessionId) -> Result<()> {
        self.del(key("session", sid.0))?;
        self.queue(Cmd::srem(SESSIONS, sid.0))
    }

    fn sessions(&mut self) -> Result<Vec<(SessionId, SessionInfo)>> {
        let sids = self.members(SESSIONS.to_vec(), "session id")?;
        if sids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Vec<u8>> = sids.iter().map(|&s| key("session", s)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let mut q = ::redis::cmd("MGET");
        q.arg(&refs);
        let infos: Vec<Option<Vec<u8>>> = self.fetch(&refs, q)?;
        let mut out = Vec::with_capacity(sids.len());
        for (sid, info) in sids.into_iter().zip(infos) {
            // A session closed between the two reads (a read transaction is no snapshot).
            if let Some(info) = info {
                out.push((SessionId(sid), SessionInfo::decode(&info)?));
            }
        }
        Ok(out)
    }

    fn sustained(&mut self, sid: SessionId) -> Result<Vec<Ino>> {
        Ok(self
            .members(key("sustained", sid.0), "sustained inode")?
            .into_iter()
            .map(Ino)
            .collect())
    }

    fn add_sustained(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.queue(Cmd::sadd(key("sustained", sid.0), ino.0))
    }

    fn del_sustained(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.queue(Cmd::srem(key("sustained", sid.0), ino.0))
    }

    fn locks(&mut self, ino: Ino) -> Result<Vec<RangeLock>> {
        match self.get(key("lock", ino.0))? {
            Some(v) => Ok(RangeLock::decode_list(&v)?),
            None => Ok(Vec::new()),
        }
    }

    fn set_locks(&mut self, ino: Ino, locks: &[RangeLock]) -> Result<()> {
        if locks.is_empty() {
            self.del(key("lock", ino.0))
        } else {
            self.set(key("lock", ino.0), RangeLock::encode_list(locks))
        }
    }

    fn session_locked(&mut self, sid: SessionId) -> Result<Vec<Ino>> {
        Ok(self
            .members(key("locked", sid.0), "locked inode")?
            .into_iter()
            .map(Ino)
            .collect())
    }

    fn add_session_locked(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.queue(Cmd::sadd(key("locked", sid.0), ino.0))
    }

    fn del_session_locked(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.queue(Cmd::srem(key("locked", sid.0), ino.0))
    }

    fn add_dead_slice(&mut self, dead: &DeadSlice) -> Result<()> {
        self.queue(Cmd::zadd(DEAD_SLICES, dead.id, dead_score(dead.since)))?;
        self.queue(Cmd::hset(DEAD_SLICE_INFO, dead.id, encode_dead_info(dead)))
    }

    fn dead_slices(&mut self, before: Timestamp, limit: usize) -> Result<Vec<DeadSlice>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let max = dead_score(before);
        let mut q = ::redis::cmd("ZRANGEBYSCORE");
        q.arg(DEAD_SLICES).arg("-inf").arg(max);
        if let Ok(count) = i64::try_from(limit) {
            q.arg("LIMIT").arg(0).arg(count);
        }
        let mut ids: Vec<Vec<u8>> = self.fetch(&[DEAD_SLICES], q)?;
        let found = self.dead_infos(&ids)?;
        if ids.len() >= limit {
            // The set orders one millisecond by member, not by time: take all of the last
            // millisecond so that the exact order below cuts at the right place.
            if let Some(last) = found.iter().map(|d| dead_score(d.since)).max() {
                let tail: Vec<Vec<u8>> =
                    self.fetch(&[DEAD_SLICES], Cmd::zrangebyscore(DEAD_SLICES, last, last))?;
                ids = tail.into_iter().filter(|t| !ids.contains(t)).collect();
            } else {
                ids.clear();
            }
        } else {
            ids.clear();
        }
        let mut all = found;
        all.extend(self.dead_infos(&ids)?);
        all.retain(|d| d.since < before);
        all.sort_unstable_by_key(|d| (d.since, d.id));
        all.truncate(limit);
        Ok(all)
    }

    fn del_dead_slice(&mut self, id: u64) -> Result<()> {
        self.queue(Cmd::zrem(DEAD_SLICES, id))?;
        self.queue(Cmd::hdel(DEAD_SLICE_INFO, id))
    }

    fn request(&mut self, sid: SessionId, unique: u64) -> Result<Option<Vec<u8>>> {
        // Its own key, WATCHed like any read: no conflict with the session's other
        // requests, which only add keys of their own.
        self.get(request_key(sid, unique))
    }

    fn set_request(&mut self, sid: SessionId, unique: u64, outcome: &[u8]) -> Result<()> {
        self.set(request_key(sid, unique), outcome.to_vec())?;
        self.queue(Cmd::zadd(key("reqs", sid.0), unique, unique))
    }

    fn del_requests(&mut self, sid: SessionId, below: u64) -> Result<()> {
        let mut eval = ::redis::cmd("EVAL");
        eval.arg(DEL_REQUESTS_LUA)
            .arg(1)
            .arg(key("reqs", sid.0))
            .arg(format!("req{}_", sid.0))
            .arg(format!("({below}"));
        self.queue(eval)
    }
}

impl RedisTx<'_> {
    /// The dead slices named by `ids` (members of `deadSlices`), skipping those forgotten
    /// meanwhile.
    fn dead_infos(&mut self, ids: &[Vec<u8>]) -> Result<Vec<DeadSlice>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = ::redis::cmd("HMGET");
        q.arg(DEAD_SLICE_INFO).arg(ids);
        let infos: Vec<Option<Vec<u8>>> = self.fetch(&[DEAD_SLICE_INFO], q)?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, info) in ids.iter().zip(infos) {
            if let Some(info) = info {
                let (since, size) = decode_dead_info(&info)?;
                out.push(DeadSlice {
                    id: parse_u64(id, "dead slice")?,
                    size,
                    since,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_score_is_exact_and_ordered() {
        for t in [i64::MIN, -1, 0, 1, 999_999, 1_000_000, i64::MAX] {
            let s = dead_score(Timestamp(t));
            assert_eq!(s as f64 as i64, s);
        }
        assert!(dead_score(Timestamp(-1)) < dead_score(Timestamp(0)));
    }

    #[test]
    fn dead_info_roundtrip() {
        let d = DeadSlice {
            id: 9,
            size: 77,
            since: Timestamp(-5),
        };
        assert_eq!(
            decode_dead_info(&encode_dead_info(&d)),
            Ok((d.since, d.size))
        );
        assert!(decode_dead_info(&[1, 2, 3]).is_err());
    }
}
