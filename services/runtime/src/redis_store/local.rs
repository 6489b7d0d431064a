//! [`WindowStore::apply`] on Redis by optimistic concurrency: the ops run
//! in the correlator, Redis only stores (see the parent module's header).
//!
//! Per scope of a batch (a scope's keys share one hash slot):
//!
//! 1. **State.** The scope's keys the batch needs come from the local cache
//!    (the state this process last read or wrote, with the scope's
//!    *version* at that time) or, on a miss, from one pipelined read:
//!    `GET` of the version key first, then `HGETALL`/`ZRANGE … WITHSCORES`
//!    and `PTTL` of every key and an `MGET` of the batch's dedupe markers.
//! 2. **Ops.** The updates run in order on that state with the memory
//!    store's own interpreter ([`Keyspace`]), so outcomes are the memory
//!    store's by construction; the difference before → after becomes plain
//!    writes (`SET NX PX` of new markers, `HSET`/`HDEL`, `ZADD`/`ZREM`,
//!    `PEXPIRE` with the TTL the ops gave).
//! 3. **Commit.** One script ([`WRITE`]) per run of scopes checks each
//!    scope's version is still the one the state was read at and, if so,
//!    applies its writes and sets a new random version; every writer of a
//!    scope goes through it, so an unchanged version means the state is
//!    exactly what the ops ran on. A marker that already exists (a
//!    re-delivered event the cache could not know about) undoes the scope's
//!    markers and fails it like a version change. A failed scope drops its
//!    cached state and goes round again from a fresh read; scopes are
//!    independent, so the others' results stand.
//!
//! A single correlator (or one owning a customer's partition) thus reads a
//! scope once and afterwards only writes; replicas sharing a scope (range
//! scopes, or partitions moving in a rebalance) are fenced by the version.
//! The version key lives at least as long as every key written with it and
//! is a random token, so an expired-and-recreated version never matches a
//! stale cached one.
//!
//! Known difference: a key that expires in Redis between the read of its
//! state and the commit (only a key untouched for its whole TTL, within
//! milliseconds) keeps only the fields the batch changed.

use std::sync::Mutex;

use redis::{Cmd, Value};
use tollguard_core::StoreError;
use tollguard_core::store::{HashMap, Keyspace, Op, Outcome, Update, Value as Kv};

use super::{LUA_EXACT, protocol};

/// Name of the version key in every scope (`tg:{<tag>}:ver`).
pub(super) const VERSION_KEY: &str = "ver";

/// Commits the writes of scopes whose version is unchanged.
///
/// KEYS: per scope, its version key, then the keys its commands name.
/// ARGV[1]: the number of scopes; per scope: its number of KEYS, the
/// expected version ('' = none), the new version, the least TTL of the
/// version in ms, the number of command arguments that follow, then the
/// commands: code, index of the key among the scope's KEYS, the number of
/// arguments, the arguments. Codes: N = `SET key 1 NX PX <ttl>` (a dedupe
/// marker, always first), H = `HSET`, D = `HDEL`, Z = `ZADD`, R = `ZREM`,
/// E = `PEXPIRE`.
/// Reply: per scope 1 (written), 0 (version changed, nothing written) or 2
/// (a marker existed, nothing written).
pub(super) const WRITE: &str = r#"
-- TollGuard: commit window-store writes under a version check (redis_store/local.rs).
local pos = 1
local function take(n)
  local first = pos + 1
  pos = pos + n
  return unpack(ARGV, first, pos)
end
local names = { H = 'HSET', D = 'HDEL', Z = 'ZADD', R = 'ZREM', E = 'PEXPIRE' }
local out = {}
local kbase = 0
for s = 1, tonumber(ARGV[1]) do
  local nkeys, expect, new, vttl, nargs = take(5)
  local stop = pos + tonumber(nargs)
  local vkey = KEYS[kbase + 1]
  local cur = redis.call('GET', vkey)
  local status = 1
  if (expect == '' and cur) or (expect ~= '' and cur ~= expect) then status = 0 end
  -- Markers first, each SET NX: one that exists is a re-delivery, and then
  -- the markers just set are deleted again and nothing else is written.
  local p = pos
  local set = {}
  while status == 1 and p < stop do
    if ARGV[p + 1] == 'N' then
      local key = KEYS[kbase + tonumber(ARGV[p + 2])]
      if redis.call('SET', key, '1', 'NX', 'PX', ARGV[p + 4]) then
        set[#set + 1] = key
      else
        status = 2
      end
    end
    p = p + 3 + tonumber(ARGV[p + 3])
  end
  if status == 2 then
    for _, key in ipairs(set) do redis.call('DEL', key) end
  end
  if status == 1 and pos < stop then
    while pos < stop do
      local code, ki, n = take(3)
      local key = KEYS[kbase + tonumber(ki)]
      n = tonumber(n)
      if code == 'N' then
        take(1) -- set above
      else
        local cmd = names[code]
        if not cmd then
          return redis.error_reply('ERR tollguard write: unknown command code ' .. tostring(code))
        end
        redis.call(cmd, key, unpack(ARGV, pos + 1, pos + n))
        pos = pos + n
      end
    end
    if status == 1 then
      local t = tonumber(vttl)
      local left = redis.call('PTTL', vkey)
      if left > t then t = left end
      redis.call('SET', vkey, new, 'PX', t)
    end
  end
  pos = stop
  out[s] = status
  kbase = kbase + tonumber(nkeys)
end
return out
"#;

/// Rounds of read → run → commit before a contended batch gives up.
pub(super) const MAX_ROUNDS: usize = 16;

/// A key stays in a scope's cached state while one of the scope's last
/// `KEEP_USES` batches used it.
const KEEP_USES: u64 = 8;

/// Arguments per written command (unpack in Lua is bounded by its C stack).
const ARGS_PER_CMD: usize = 512;

/// Scopes, and updates, run before their writes are sent (the writes of
/// one chunk are in flight while the next chunk runs); a chunk ends at
/// whichever bound it reaches first (a scope is never split).
pub(super) const SCOPES_PER_CHUNK: usize = 128;
pub(super) const UPDATES_PER_CHUNK: usize = 400;

/// How many of `ready`'s scopes form the next chunk (at least one).
pub(super) fn chunk_len(jobs: &[Job], ready: &[(usize, State)]) -> usize {
    let mut updates = 0;
    for (n, (j, _)) in ready.iter().enumerate() {
        updates += jobs[*j].idx.len();
        if n + 1 >= SCOPES_PER_CHUNK || updates >= UPDATES_PER_CHUNK {
            return n + 1;
        }
    }
    ready.len()
}

/// Scopes per `WRITE` call on one node (keeps each call short: Redis runs
/// one script at a time).
pub(super) const SCOPES_PER_CALL: usize = 64;

/// The kind of a scope key, from the ops that touch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Integer hash (`CallMax`, `Add`, `Sum`).
    Hash,
    /// Sorted set (`Mark`, `Distinct`, `Has`).
    ZSet,
    /// Span hash (`Span`, `Overlap`).
    Spans,
}

fn key_of(op: &Op) -> (&str, Kind) {
    match op {
        Op::CallMax { key, .. } | Op::Add { key, .. } | Op::Sum { key, .. } => (key, Kind::Hash),
        Op::Mark { key, .. } | Op::Distinct { key, .. } | Op::Has { key, .. } => (key, Kind::ZSet),
        Op::Span { key, .. } | Op::Overlap { key, .. } => (key, Kind::Spans),
    }
}

/// Refuses integers a Redis score (a double) would round.
pub(super) fn check_ints(u: &Update) -> Result<(), StoreError> {
    let mut v: Vec<i64> = vec![u.ttl_ms, u.dedupe_ttl_ms];
    for op in &u.ops {
        match op {
            Op::CallMax { value, ttl_ms, .. } => v.extend([*value, *ttl_ms]),
            Op::Add { bucket, delta, .. } => {
                v.push(*bucket);
                if let tollguard_core::store::Val::Const(c) = delta {
                    v.push(*c);
                }
            }
            Op::Sum {
                from,
                to,
                prune_before,
                ..
            } => v.extend([*from, *to, *prune_before]),
            Op::Mark { ts, .. } => v.push(*ts),
            Op::Distinct {
                since,
                prune_before,
                ..
            } => v.extend([*since, *prune_before]),
            Op::Has { since, .. } => v.push(*since),
            Op::Span { start, end, .. } => v.extend([*start, *end]),
            Op::Overlap {
                at,
                open_horizon,
                prune_before,
                ..
            } => v.extend([*at, *open_horizon, *prune_before]),
        }
    }
    match v.into_iter().find(|i| i.unsigned_abs() > LUA_EXACT) {
        Some(i) => Err(protocol(format!(
            "integer {i} exceeds 2^53, the exact range of the Redis store"
        ))),
        None => Ok(()),
    }
}

/// The updates of one scope in a batch.
#[derive(Debug)]
pub(super) struct Job {
    /// Hash tag (cache key; cluster slot).
    pub tag: String,
    /// The version key.
    pub vkey: String,
    /// Indices of its updates, in order.
    pub idx: Vec<usize>,
    /// Every key the ops touch, once, with its kind.
    pub keys: Vec<(String, Kind)>,
    /// Dedupe markers, once each.
    pub markers: Vec<String>,
}

/// Groups `updates` by scope (first-seen order; each scope keeps its order).
pub(super) fn jobs(prefix: &str, updates: &[Update]) -> Result<Vec<Job>, StoreError> {
    let mut out: Vec<Job> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::default();
    for (i, u) in updates.iter().enumerate() {
        let tag = u.scope.tag();
        let j = match at.get(&tag) {
            Some(&j) => j,
            None => {
                at.insert(tag.clone(), out.len());
                out.push(Job {
                    vkey: u.scope.key(prefix, VERSION_KEY),
                    tag,
                    idx: Vec::new(),
                    keys: Vec::new(),
                    markers: Vec::new(),
                });
                out.len() - 1
            }
        };
        let job = &mut out[j];
        job.idx.push(i);
        let marker = u.scope.key(prefix, &format!("ev:{}", u.dedupe));
        if !job.markers.contains(&marker) {
            job.markers.push(marker);
        }
        for op in &u.ops {
            let (name, kind) = key_of(op);
            let key = u.scope.key(prefix, name);
            match job.keys.iter().find(|(k, _)| *k == key) {
                Some((_, k)) if *k != kind => {
                    return Err(protocol(format!(
                        "key {key} is used as two kinds of value in one batch"
                    )));
                }
                Some(_) => {}
                None => job.keys.push((key, kind)),
            }
        }
    }
    Ok(out)
}

/// A key known in a scope's state: its kind, the scope's use count at its
/// last use, and its estimated heap bytes then (a key changes only when a
/// batch uses it, so only used keys are re-measured).
pub(super) type Known = (Kind, u64, usize);

/// State of one scope as this process last saw it.
#[derive(Debug)]
struct Entry {
    version: Option<String>,
    space: Keyspace,
    kinds: HashMap<String, Known>,
    uses: u64,
    bytes: usize,
    used: u64,
}

/// Scope state cached between batches, bounded by an estimate of its bytes
/// (least recently used scopes go first).
#[derive(Debug)]
pub(super) struct Cache {
    entries: HashMap<String, Entry>,
    bytes: usize,
    budget: usize,
    tick: u64,
}

/// What a scope needs before its updates can run.
#[derive(Debug)]
pub(super) enum Need {
    /// The cached state holds every key.
    Ready(State),
    /// The cached state lacks these keys: read them (and the version).
    Partial(State, Vec<(String, Kind)>),
    /// Nothing cached: read every key and the markers.
    Full,
}

/// A scope's state for one round.
#[derive(Debug)]
pub(super) struct State {
    pub version: Option<String>,
    pub space: Keyspace,
    /// Every key known (present or absent), with the scope's use count at
    /// its last use and its estimated size then.
    pub kinds: HashMap<String, Known>,
    /// Batches that have used this state.
    pub uses: u64,
}

impl Cache {
    pub fn new(budget: usize) -> Self {
        Self {
            entries: HashMap::default(),
            bytes: 0,
            budget,
            tick: 0,
        }
    }

    /// Takes the cached state of `job`'s scope (a concurrent batch of this
    /// process then reads afresh), with the keys the job needs that it does
    /// not know yet.
    pub fn take(&mut self, job: &Job) -> Need {
        let Some(e) = self.entries.remove(&job.tag) else {
            return Need::Full;
        };
        self.bytes -= e.bytes;
        let mut missing = Vec::new();
        for (k, kind) in &job.keys {
            match e.kinds.get(k) {
                Some((known, _, _)) if known == kind => {}
                Some(_) => return Need::Full,
                None => missing.push((k.clone(), *kind)),
            }
        }
        let st = State {
            version: e.version,
            space: e.space,
            kinds: e.kinds,
            uses: e.uses,
        };
        if missing.is_empty() {
            Need::Ready(st)
        } else {
            Need::Partial(st, missing)
        }
    }

    /// Drops a scope's state (its commit failed or its outcome is unknown).
    pub fn forget(&mut self, tag: &str) {
        if let Some(e) = self.entries.remove(tag) {
            self.bytes -= e.bytes;
        }
    }

    /// Keeps a committed state of `job`'s scope. Keys the scope's last
    /// `KEEP_USES` batches did not use leave it (per-call keys would
    /// otherwise pile up); a later batch reads them again if it needs them.
    pub fn put(&mut self, job: &Job, st: State) {
        if self.budget == 0 {
            return;
        }
        self.tick += 1;
        let State {
            version,
            mut space,
            mut kinds,
            uses,
        } = st;
        let uses = uses + 1;
        for (k, _) in &job.keys {
            if let Some(e) = kinds.get_mut(k) {
                e.1 = uses;
                e.2 = size_of_key(&mut space, k);
            }
        }
        kinds.retain(|k, (_, last, _)| {
            let keep = *last + KEEP_USES >= uses;
            if !keep {
                space.remove(k);
            }
            keep
        });
        let bytes = 64 + kinds.values().map(|(_, _, size)| size).sum::<usize>();
        let tag = job.tag.clone();
        let e = Entry {
            version,
            space,
            kinds,
            uses,
            bytes,
            used: self.tick,
        };
        if let Some(old) = self.entries.insert(tag, e) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        if self.bytes > self.budget {
            // Evict the least recently used down to 3/4 of the budget.
            let mut by_age: Vec<(u64, String)> = self
                .entries
                .iter()
                .map(|(t, e)| (e.used, t.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, t) in by_age {
                if self.bytes <= self.budget / 4 * 3 {
                    break;
                }
                self.forget(&t);
            }
        }
    }
}

/// Rough heap bytes of one key of a scope's state.
fn size_of_key(space: &mut Keyspace, k: &str) -> usize {
    48 + k.len()
        + match space.get(k) {
            Some(Kv::Hash(h) | Kv::ZSet(h)) => h.len() * 64,
            Some(Kv::Spans(s)) => s.len() * 96,
            _ => 0,
        }
}

/// The read of a scope's version (first), of `keys` and, if given, of the
/// `markers`.
pub(super) fn read_cmds(vkey: &str, keys: &[(String, Kind)], markers: &[String]) -> Vec<Cmd> {
    let mut cmds = Vec::with_capacity(2 + 2 * keys.len());
    let mut c = redis::cmd("GET");
    c.arg(vkey);
    cmds.push(c);
    for (k, kind) in keys {
        let mut c = match kind {
            Kind::Hash | Kind::Spans => redis::cmd("HGETALL"),
            Kind::ZSet => redis::cmd("ZRANGE"),
        };
        c.arg(k);
        if *kind == Kind::ZSet {
            c.arg(0).arg(-1).arg("WITHSCORES");
        }
        cmds.push(c);
        let mut p = redis::cmd("PTTL");
        p.arg(k);
        cmds.push(p);
    }
    if !markers.is_empty() {
        let mut c = redis::cmd("MGET");
        c.arg(markers);
        cmds.push(c);
    }
    cmds
}

fn string(v: &Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b.clone()).map_err(|_| protocol("a stored value is not UTF-8"))
        }
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Double(d) => Ok(d.to_string()),
        other => Err(protocol(format!("expected a string, got {other:?}"))),
    }
}

fn int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Double(d) => Ok(*d as i64),
        other => {
            let s = string(other)?;
            s.parse::<i64>()
                .or_else(|_| s.parse::<f64>().map(|f| f as i64))
                .map_err(|_| protocol(format!("expected an integer, got {s:?}")))
        }
    }
}

/// Field/value pairs of an `HGETALL` or `ZRANGE … WITHSCORES` reply.
fn pairs(v: &Value) -> Result<Vec<(String, &Value)>, StoreError> {
    match v {
        Value::Array(items) if items.iter().all(|i| matches!(i, Value::Array(_))) => items
            .iter()
            .map(|i| match i {
                Value::Array(p) if p.len() == 2 => Ok((string(&p[0])?, &p[1])),
                other => Err(protocol(format!("bad pair {other:?}"))),
            })
            .collect(),
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return Err(protocol("odd field/value reply"));
            }
            items
                .chunks_exact(2)
                .map(|p| Ok((string(&p[0])?, &p[1])))
                .collect()
        }
        Value::Map(m) => m.iter().map(|(k, v)| Ok((string(k)?, v))).collect(),
        Value::Nil => Ok(Vec::new()),
        other => Err(protocol(format!("expected fields, got {other:?}"))),
    }
}

/// A span as stored: `start,end,closed(1|0),group`.
fn parse_span(s: &str) -> Option<(i64, i64, bool, String)> {
    let mut it = s.splitn(4, ',');
    let start = it.next()?.parse().ok()?;
    let end = it.next()?.parse().ok()?;
    let closed = match it.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    Some((start, end, closed, it.next()?.to_string()))
}

fn version_of(v: &Value) -> Result<Option<String>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        v => string(v).map(Some),
    }
}

/// Loads `keys` from their replies (body, PTTL each) into `st`.
fn load_keys(st: &mut State, keys: &[(String, Kind)], replies: &[Value]) -> Result<(), StoreError> {
    st.space.freeze(None);
    let now = st.space.now();
    for (i, (key, kind)) in keys.iter().enumerate() {
        st.kinds.insert(key.clone(), (*kind, st.uses, 0));
        let body = &replies[2 * i];
        let pttl = int(&replies[1 + 2 * i])?;
        if pttl == -2 {
            st.space.remove(key);
            continue; // absent (or expired since the read of its body)
        }
        let deadline = (pttl >= 0).then(|| now + pttl);
        let fields = pairs(body)?;
        if fields.is_empty() {
            st.space.remove(key);
            continue;
        }
        let value = match kind {
            Kind::Hash => Kv::Hash(
                fields
                    .into_iter()
                    .map(|(f, v)| Ok((f, int(v)?)))
                    .collect::<Result<_, StoreError>>()?,
            ),
            Kind::ZSet => Kv::ZSet(
                fields
                    .into_iter()
                    .map(|(f, v)| Ok((f, int(v)?)))
                    .collect::<Result<_, StoreError>>()?,
            ),
            Kind::Spans => Kv::Spans(
                fields
                    .into_iter()
                    .map(|(id, v)| {
                        let s = string(v)?;
                        let sp =
                            parse_span(&s).ok_or_else(|| protocol(format!("bad span {s:?}")))?;
                        Ok((id, sp))
                    })
                    .collect::<Result<_, StoreError>>()?,
            ),
        };
        st.space.load(key.clone(), value, deadline);
    }
    Ok(())
}

/// Builds a scope's state from the replies of its full [`read_cmds`]
/// (every key of the job and its markers).
pub(super) fn parse_full(job: &Job, replies: &[Value]) -> Result<State, StoreError> {
    let want = 2 + 2 * job.keys.len();
    if replies.len() != want {
        return Err(protocol(format!(
            "read of a scope returned {} replies for {want} commands",
            replies.len()
        )));
    }
    let mut st = State {
        version: version_of(&replies[0])?,
        space: Keyspace::new(),
        kinds: HashMap::with_capacity_and_hasher(job.keys.len(), Default::default()),
        uses: 0,
    };
    load_keys(&mut st, &job.keys, &replies[1..want - 1])?;
    let Value::Array(found) = &replies[want - 1] else {
        return Err(protocol("MGET of markers returned no array"));
    };
    if found.len() != job.markers.len() {
        return Err(protocol("MGET of markers returned a wrong count"));
    }
    for (m, v) in job.markers.iter().zip(found) {
        if !matches!(v, Value::Nil) {
            // Its TTL does not matter: markers leave the state after the
            // batch.
            st.space.load(m.clone(), Kv::Str("1".into()), None);
        }
    }
    Ok(st)
}

/// Adds the `missing` keys read by a partial [`read_cmds`] to a cached
/// state. False (state unusable) if the scope's version is no longer the
/// cached one: another writer changed it since.
pub(super) fn merge_partial(
    st: &mut State,
    missing: &[(String, Kind)],
    replies: &[Value],
) -> Result<bool, StoreError> {
    let want = 1 + 2 * missing.len();
    if replies.len() != want {
        return Err(protocol(format!(
            "partial read returned {} replies for {want} commands",
            replies.len()
        )));
    }
    if version_of(&replies[0])? != st.version {
        return Ok(false);
    }
    load_keys(st, missing, &replies[1..])?;
    Ok(true)
}

/// The writes of one scope, ready for [`WRITE`].
#[derive(Debug, Default)]
pub(super) struct Writes {
    /// KEYS: version key first.
    pub keys: Vec<String>,
    /// Command arguments (code, key index, n, args…).
    pub args: Vec<String>,
    /// Least TTL of the version.
    pub vttl: i64,
    /// The version expected and the one to set.
    pub expect: Option<String>,
    pub new: String,
}

impl Writes {
    fn key(&mut self, k: &str) -> usize {
        match self.keys.iter().position(|x| x == k) {
            Some(i) => i + 1,
            None => {
                self.keys.push(k.to_string());
                self.keys.len()
            }
        }
    }

    fn cmd(&mut self, code: &str, key: &str, args: Vec<String>, step: usize) {
        if args.is_empty() {
            return;
        }
        let ki = self.key(key);
        let per = ARGS_PER_CMD / step * step;
        for chunk in args.chunks(per) {
            self.args.push(code.to_string());
            self.args.push(ki.to_string());
            self.args.push(chunk.len().to_string());
            self.args.extend(chunk.iter().cloned());
        }
    }
}

/// Runs a scope's updates on its state and returns their outcomes and the
/// writes that bring Redis to the resulting state. Markers leave the state.
pub(super) fn run(
    prefix: &str,
    job: &Job,
    updates: &[Update],
    st: &mut State,
) -> (Vec<Outcome>, Writes) {
    let space = &mut st.space;
    space.freeze(None);
    let now = space.now();
    space.freeze(Some(now));
    space.take_touched();
    let before: Vec<Option<Kv>> = job
        .keys
        .iter()
        .map(|(k, _)| space.get(k).cloned())
        .collect();
    let had: Vec<bool> = job.markers.iter().map(|m| space.get(m).is_some()).collect();
    let t_ops = std::time::Instant::now();
    let outcomes: Vec<Outcome> = job
        .idx
        .iter()
        .map(|&i| space.apply(prefix, &updates[i]))
        .collect();
    let ops_us = t_ops.elapsed().as_micros();
    if ops_us >= SLOW_SCOPE_US {
        slow_scope(job, updates, space, ops_us);
    }
    let touched = space.take_touched();
    let mut w = Writes {
        keys: vec![job.vkey.clone()],
        expect: st.version.clone(),
        new: format!("{:016x}", rand::random::<u64>()),
        ..Default::default()
    };
    // New markers first: the script fails the scope on one that exists.
    for (m, had) in job.markers.iter().zip(had) {
        if !had && space.get(m).is_some() {
            let ttl = touched.get(m).copied().unwrap_or(1);
            w.vttl = w.vttl.max(ttl);
            w.cmd("N", m, vec![ttl.to_string()], 1);
        }
        space.remove(m);
    }
    for ((k, _), before) in job.keys.iter().zip(before) {
        let after = space.get(k);
        let mut set: Vec<String> = Vec::new();
        let mut del: Vec<String> = Vec::new();
        let (hset, hdel) = match (&before, after) {
            (Some(Kv::Hash(b)), Some(Kv::Hash(a))) | (Some(Kv::ZSet(b)), Some(Kv::ZSet(a))) => {
                let zset = matches!(after, Some(Kv::ZSet(_)));
                for (f, v) in a {
                    if b.get(f) != Some(v) {
                        if zset {
                            set.extend([v.to_string(), f.clone()]);
                        } else {
                            set.extend([f.clone(), v.to_string()]);
                        }
                    }
                }
                del.extend(b.keys().filter(|f| !a.contains_key(*f)).cloned());
                if zset { ("Z", "R") } else { ("H", "D") }
            }
            (None, Some(Kv::Hash(a))) => {
                for (f, v) in a {
                    set.extend([f.clone(), v.to_string()]);
                }
                ("H", "D")
            }
            (None, Some(Kv::ZSet(a))) => {
                for (f, v) in a {
                    set.extend([v.to_string(), f.clone()]);
                }
                ("Z", "R")
            }
            (before, Some(Kv::Spans(a))) => {
                let empty = HashMap::default();
                let b = match before {
                    Some(Kv::Spans(b)) => b,
                    _ => &empty,
                };
                for (id, sp) in a {
                    if b.get(id) != Some(sp) {
                        let (s, e, c, g) = sp;
                        set.extend([id.clone(), format!("{s},{e},{},{g}", u8::from(*c))]);
                    }
                }
                del.extend(b.keys().filter(|f| !a.contains_key(*f)).cloned());
                ("H", "D")
            }
            // Gone (expired here) or never there: Redis expires it too.
            _ => ("H", "D"),
        };
        w.cmd(hset, k, set, 2);
        w.cmd(hdel, k, del, 1);
        if let Some(ttl) = touched.get(k) {
            w.vttl = w.vttl.max(*ttl);
            w.cmd("E", k, vec![ttl.to_string()], 1);
        }
    }
    (outcomes, w)
}

/// A scope whose ops take this long (µs) in one batch is logged (debug
/// `slow scope`): a hot customer or range serialises its batch's work.
const SLOW_SCOPE_US: u128 = 5_000;

/// Logs a slow scope: its update and op counts and its largest keys.
fn slow_scope(job: &Job, updates: &[Update], space: &mut Keyspace, ops_us: u128) {
    let mut sizes: Vec<(usize, &str)> = job
        .keys
        .iter()
        .map(|(k, _)| {
            let n = match space.get(k) {
                Some(Kv::Hash(h)) => h.len(),
                Some(Kv::ZSet(z)) => z.len(),
                Some(Kv::Spans(s)) => s.len(),
                _ => 0,
            };
            (n, k.rsplit(':').next().unwrap_or(k))
        })
        .collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes.truncate(5);
    let ops: usize = job.idx.iter().map(|&i| updates[i].ops.len()).sum();
    tracing::debug!(tag = %job.tag, updates = job.idx.len(), ops, ops_us, largest = ?sizes, "slow scope");
}

/// Below this many updates a chunk runs on the calling thread alone.
const PARALLEL_MIN_UPDATES: usize = 256;

/// [`run`] over a chunk of scopes, results in the chunk's order. Scopes are
/// independent (each has its own state and keys), so with enough work they
/// run on two threads: the scopes go to two halves balanced by their number
/// of updates (largest first), one half on a scoped thread of its own.
pub(super) fn run_all(
    prefix: &str,
    jobs: &[Job],
    updates: &[Update],
    chunk: &mut [(usize, State)],
) -> Vec<(Vec<Outcome>, Writes)> {
    let size = |j: usize| jobs[j].idx.len();
    let total: usize = chunk.iter().map(|(j, _)| size(*j)).sum();
    if chunk.len() < 2 || total < PARALLEL_MIN_UPDATES {
        return chunk
            .iter_mut()
            .map(|(j, st)| run(prefix, &jobs[*j], updates, st))
            .collect();
    }
    let mut order: Vec<usize> = (0..chunk.len()).collect();
    order.sort_unstable_by_key(|&i| std::cmp::Reverse(size(chunk[i].0)));
    let mut other = vec![false; chunk.len()];
    let (mut here, mut there) = (0, 0);
    for i in order {
        let n = size(chunk[i].0);
        if here <= there {
            here += n;
        } else {
            other[i] = true;
            there += n;
        }
    }
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for (i, item) in chunk.iter_mut().enumerate() {
        if other[i] {
            theirs.push((i, item));
        } else {
            mine.push((i, item));
        }
    }
    let go = |part: Vec<(usize, &mut (usize, State))>| -> Vec<(usize, (Vec<Outcome>, Writes))> {
        part.into_iter()
            .map(|(i, (j, st))| (i, run(prefix, &jobs[*j], updates, st)))
            .collect()
    };
    let (a, b) = std::thread::scope(|s| {
        let t = s.spawn(|| go(theirs));
        let a = go(mine);
        (a, t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    let mut out: Vec<Option<(Vec<Outcome>, Writes)>> = (0..chunk.len()).map(|_| None).collect();
    for (i, r) in a.into_iter().chain(b) {
        out[i] = Some(r);
    }
    out.into_iter()
        .map(|r| r.expect("every scope ran"))
        .collect()
}

/// One `EVALSHA` of [`WRITE`] over `scopes`.
pub(super) fn write_cmd(sha: &str, scopes: &[&Writes]) -> Cmd {
    let nkeys: usize = scopes.iter().map(|w| w.keys.len()).sum();
    let nargs: usize = scopes.iter().map(|w| w.keys.len() + w.args.len() + 5).sum();
    let bytes: usize = scopes
        .iter()
        .map(|w| {
            w.keys.iter().map(String::len).sum::<usize>()
                + w.args.iter().map(String::len).sum::<usize>()
                + 64
        })
        .sum();
    let mut c = Cmd::with_capacity(nargs + 4, bytes + 128);
    c.arg("EVALSHA");
    c.arg(sha).arg(nkeys);
    for w in scopes {
        c.arg(&w.keys);
    }
    c.arg(scopes.len());
    for w in scopes {
        c.arg(w.keys.len())
            .arg(w.expect.as_deref().unwrap_or(""))
            .arg(&w.new)
            .arg(w.vttl.max(1))
            .arg(w.args.len())
            .arg(&w.args);
    }
    c
}

/// The cache behind a lock that is never held across an await.
#[derive(Debug)]
pub(super) struct SharedCache(Mutex<Cache>);

impl SharedCache {
    pub fn new(budget: usize) -> Self {
        Self(Mutex::new(Cache::new(budget)))
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
