//! The Redis implementation of the core's [`WindowStore`] (DESIGN §5, STYLE
//! "Redis the careful way").
//!
//! * **One connection.** A single multiplexed, auto-reconnecting
//!   [`ConnectionManager`] (or a [`ClusterConnection`] for Redis Cluster),
//!   cloned per call; never a connection per request.
//! * **One script call per run of updates.** The Lua script `APPLY` applies
//!   each [`Update`] atomically: the dedupe marker (`SET NX PX`) decides
//!   whether the writes run, reads always run, and every key written gets
//!   its TTL (once per call, the last TTL given: time is frozen inside a
//!   script, so the deadline is the one a `PEXPIRE` after each write would
//!   set). One call carries up to `UPDATES_PER_CALL` updates, which
//!   amortises the fixed cost of a script call; a batch is grouped by scope
//!   (order kept within a scope), so a call's updates mostly share a scope
//!   and the script parses each bucketed or span hash once per call and
//!   keeps its parsed copy exact through the call's own writes.
//!   An update's `KEYS` are the marker and the op keys, all under the
//!   scope's `{<tag>}`; on a cluster a call only ever carries updates of one
//!   scope, so they share one hash slot.
//! * **One round trip per batch.** [`WindowStore::apply`] sends the batch as
//!   one pipeline of `EVALSHA`s. The script is loaded at connect; when the
//!   server has lost it (`NOSCRIPT` after a restart or `SCRIPT FLUSH`), it is
//!   loaded again and only the calls that failed are re-sent — an update
//!   that ran is never sent twice, so none is wrongly reported as duplicate.
//!   On a cluster the batch is split per scope (a pipeline must stay in one
//!   slot) and the pipelines run concurrently; updates of different scopes
//!   touch disjoint keys, so their relative order is unobservable. (The
//!   cluster client reports a pipeline's errors as one, so there a
//!   `NOSCRIPT` re-sends the scope's whole pipeline.)
//! * **Bounded waits.** Responses time out after 10 s, connects after 5 s;
//!   on one node a lost connection is retried twice about a second apart
//!   before the call fails as [`StoreError::Unavailable`].
//!
//! The semantics are exactly those of [`MemoryStore`]
//! (`tests/store_suite.rs` checks both stores against each other).
//!
//! **Number range.** Lua numbers are doubles: integers are exact up to 2^53
//! (≈ 9·10^15). Millisecond timestamps (≈ 1.7·10^12), bucket indices and
//! micro-EUR amounts fit with room to spare; an update carrying a larger
//! integer is refused with [`StoreError::Protocol`] rather than silently
//! rounded. Sums computed inside the script share that bound.
//!
//! **Errors.** Connection, I/O, timeout and transient server states
//! (LOADING, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY, OOM, BUSY, MOVED…)
//! are [`StoreError::Unavailable`]; anything else the server answers that
//! the store cannot interpret is [`StoreError::Protocol`]. If a batch fails
//! part-way, the updates that did run stay applied: a retry of the batch
//! sees them as duplicates (their reads are still answered), which is the
//! at-least-once contract of the dedupe marker. Requires Redis ≥ 6.2
//! (`ZADD GT`).
//!
//! [`MemoryStore`]: tollguard_core::store::MemoryStore
//! [`ClusterConnection`]: redis::cluster_async::ClusterConnection

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisFuture, RetryMethod, Script, Value};
use tollguard_core::StoreError;
use tollguard_core::store::{
    Groups, Op, OpResult, Outcome, Scope, StateWrite, Update, Val, WindowStore,
};

/// Applies a run of [`Update`]s, each atomically (the whole call is one
/// script, so the run is atomic too). See the header comment for its calling
/// convention; [`RedisStore`] builds the arguments in `encode` and `chunk_cmd`.
const APPLY: &str = r#"
-- TollGuard: apply window-store updates atomically (redis_store.rs).
-- KEYS      the keys of every update, one update after another: its dedupe
--           marker, then every key its ops touch (on a cluster all the
--           updates of one call share a scope, so one {tag}: one hash slot).
-- ARGV[1]   the number of updates; then per update: the number of its KEYS,
--           the TTL in ms of its marker and of every scope key it writes,
--           the number of op arguments, and the ops one after another: op
--           code, index of its key among the update's KEYS, then the op's
--           parameters (listed at each branch below).
-- Reply     per update { duplicate 1|0, result of op 1, result of op 2, ... },
--           each an integer (CallMax, Has; 0 for the other writes) or, for
--           Sum, Distinct and Overlap, a flat { total, group, n, group, n, ... }.
-- Numbers are Lua doubles, exact up to 2^53; arguments are copied to Redis
-- as the caller's decimal strings wherever possible.

local pos = 1 -- ARGV cursor (last argument consumed)
local function take(n) -- the next n arguments, in order
  local first = pos + 1
  pos = pos + n
  return unpack(ARGV, first, pos)
end

-- 'a|b|c' -> 'a', 'b|c' (split at the first '|'); no '|' -> nil, s
local function split(s)
  local p = string.find(s, '|', 1, true)
  if p then return string.sub(s, 1, p - 1), string.sub(s, p + 1) end
  return nil, s
end

-- A grouped result: a total plus a count per group, in first-seen order.
local function new_groups() return { total = 0, by = {}, order = {} } end
local function add_to(g, name, n)
  if g.by[name] == nil then g.by[name] = 0; g.order[#g.order + 1] = name end
  g.by[name] = g.by[name] + n
end
local function flat(g)
  local out = { g.total }
  for _, name in ipairs(g.order) do
    out[#out + 1] = name
    out[#out + 1] = g.by[name]
  end
  return out
end

-- A span is stored as 'start,end,closed(1|0),group'.
local function span(v)
  local s, e, c, g = string.match(v, '^([^,]*),([^,]*),([01]),(.*)$')
  return s, e, c, g
end

-- HDEL of many fields, a bounded number per call (Lua's C stack).
local function hdel(key, fields)
  local i = 1
  while i <= #fields do
    local j = math.min(i + 999, #fields)
    redis.call('HDEL', key, unpack(fields, i, j))
    i = j + 1
  end
end

-- Per-call caches, so that the updates of one scope in one call (the store
-- groups a batch's updates by scope) parse each hash once: for a bucketed
-- counter (Add/Sum) field -> { bucket number, group, value }; for a span hash
-- (Span/Overlap) id -> { start, end (numbers), their strings, closed, group }.
-- Writes through Add/Span keep them exact; any other op on a cached key drops
-- its entry. Keys cannot expire during a script (time is frozen in it).
local hcache, scache = {}, {}

local function hload(key)
  local c = hcache[key]
  if c then return c end
  c = {}
  local h = redis.call('HGETALL', key)
  for j = 1, #h, 2 do
    local b, group = split(h[j])
    if b == nil then b, group = h[j], '' end
    c[h[j]] = { tonumber(b) or -math.huge, group, tonumber(h[j + 1]) }
  end
  hcache[key] = c
  return c
end

local function sload(key)
  local c = scache[key]
  if c then return c end
  c = {}
  local h = redis.call('HGETALL', key)
  for j = 1, #h, 2 do
    local s, e, cl, group = span(h[j + 1])
    c[h[j]] = { tonumber(s), tonumber(e), s, e, cl, group }
  end
  scache[key] = c
  return c
end

-- Each key written gets its TTL once, at the end of the call (the last TTL
-- given wins, as if set after every write; time is frozen in a script, so
-- the deadline is the same).
local expire, expire_order = {}, {}
local function touch(key, t)
  if expire[key] == nil then expire_order[#expire_order + 1] = key end
  expire[key] = t
end

local replies = {}
local kbase = 0 -- KEYS offset of the current update
for u = 1, tonumber(ARGV[1]) do
  local nkeys, ttl, nargs = take(3)
  local stop = pos + tonumber(nargs)
  -- The marker decides: a re-delivered event skips every write; reads run.
  local dup = not redis.call('SET', KEYS[kbase + 1], '1', 'NX', 'PX', ttl)
  local ints = {} -- integer result of each op, for Val::Ref and `when`
  local function int_of(i) return ints[tonumber(i) + 1] or 0 end -- i is 0-based
  local res = { dup and 1 or 0 }
  local n = 0
  while pos < stop do
    n = n + 1
    local code, ki = take(2)
    local key = KEYS[kbase + tonumber(ki)]
    local r = 0
    if code ~= 'A' and code ~= 'S' then hcache[key] = nil end
    if code ~= 'P' and code ~= 'O' then scache[key] = nil end
    if code == 'M' then -- CallMax: field, value, ttl of the call key
      local field, v, call_ttl = take(3)
      if not dup then
        local old = tonumber(redis.call('HGET', key, field) or '0')
        if tonumber(v) > old then
          r = tonumber(v) - old
          redis.call('HSET', key, field, v)
        end
        touch(key, call_ttl)
      end
      ints[n] = r
    elseif code == 'A' then -- Add: bucket, group, '=' value | '@' op, when ('' | op)
      local bucket, group, kind, v, when = take(5)
      local d = v -- a constant goes to Redis exactly as the caller wrote it
      if kind == '@' then d = string.format('%d', int_of(v)) end
      local enabled = when == '' or int_of(when) ~= 0
      if not dup and tonumber(d) ~= 0 and enabled then
        local field = bucket .. '|' .. group
        local now = redis.call('HINCRBY', key, field, d)
        local c = hcache[key]
        if c then
          local f = c[field]
          if f then f[3] = now else c[field] = { tonumber(bucket) or -math.huge, group, now } end
        end
        touch(key, ttl)
      end
    elseif code == 'S' then -- Sum: from, to, prune_before
      local from, to, prune = take(3)
      from, to, prune = tonumber(from), tonumber(to), tonumber(prune)
      local g = new_groups()
      local dead = {}
      local c = hload(key)
      for field, f in pairs(c) do
        local b = f[1]
        if b < prune then
          dead[#dead + 1] = field
        elseif b >= from and b <= to then
          g.total = g.total + f[3]
          add_to(g, f[2], f[3])
        end
      end
      for _, field in ipairs(dead) do c[field] = nil end
      hdel(key, dead)
      r = flat(g)
    elseif code == 'K' then -- Mark: group, id, ts (the latest ts is kept)
      local group, id, ts = take(3)
      if not dup then
        redis.call('ZADD', key, 'GT', ts, group .. '|' .. id)
        touch(key, ttl)
      end
    elseif code == 'D' then -- Distinct: since, prune_before
      local since, prune = take(2)
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. prune)
      local g, seen = new_groups(), {}
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, since, '+inf')) do
        local group, id = split(m)
        if not seen[id] then seen[id] = true; g.total = g.total + 1 end
        add_to(g, group or '', 1)
      end
      r = flat(g)
    elseif code == 'H' then -- Has: group, id, since
      local group, id, since = take(3)
      local ts = redis.call('ZSCORE', key, group .. '|' .. id)
      if ts and tonumber(ts) >= tonumber(since) then r = 1 end
      ints[n] = r
    elseif code == 'P' then -- Span: id, group, start, end, closed (1|0)
      local id, group, s, e, c = take(5)
      if not dup then
        local cache = scache[key]
        local os, oe, oc, og
        if cache then
          local cur = cache[id]
          if cur then os, oe, oc, og = cur[3], cur[4], cur[5], cur[6] end
        else
          local cur = redis.call('HGET', key, id)
          if cur then os, oe, oc, og = span(cur) end
        end
        if os then -- union: earliest start, latest end, closed sticks, first group
          if tonumber(os) < tonumber(s) then s = os end
          if tonumber(oe) > tonumber(e) then e = oe end
          if oc == '1' then c = '1' end
          group = og
        end
        redis.call('HSET', key, id, s .. ',' .. e .. ',' .. c .. ',' .. group)
        if cache then cache[id] = { tonumber(s), tonumber(e), s, e, c, group } end
        touch(key, ttl)
      end
    elseif code == 'O' then -- Overlap: at, open_horizon, prune_before
      local at, horizon, prune = take(3)
      at, horizon, prune = tonumber(at), tonumber(horizon), tonumber(prune)
      local g = new_groups()
      local dead = {}
      local c = sload(key)
      for id, sp in pairs(c) do
        local untl = sp[2]
        if sp[5] ~= '1' then untl = untl + horizon end
        if untl < prune then
          dead[#dead + 1] = id
        elseif sp[1] <= at and at <= untl then
          g.total = g.total + 1
          add_to(g, sp[6], 1)
        end
      end
      for _, id in ipairs(dead) do c[id] = nil end
      hdel(key, dead)
      r = flat(g)
    else
      return redis.error_reply('ERR tollguard apply: unknown op code ' .. tostring(code))
    end
    res[#res + 1] = r
  end
  replies[u] = res
  kbase = kbase + tonumber(nkeys)
end
for _, k in ipairs(expire_order) do redis.call('PEXPIRE', k, expire[k]) end
return replies
"#;

/// Compare-and-set of one state value.
/// KEYS[1] = the state key; ARGV = expect present (1|0), expected value,
/// new value, TTL in ms. Returns 1 if written.
const CAS: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and not cur) or (ARGV[1] == '1' and cur == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"#;

/// Largest integer magnitude that crosses into Lua exactly (2^53).
const LUA_EXACT: u64 = 1 << 53;

/// How often one batch re-loads the script after `NOSCRIPT` before giving up.
const NOSCRIPT_RELOADS: usize = 2;

/// The connection: one node through a [`ConnectionManager`], or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis implementation of [`WindowStore`].
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    apply: Script,
    cas: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("mode", &mode)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Maps a client error: transient conditions are `Unavailable` (retry),
/// the rest `Protocol`.
fn store_err(e: RedisError) -> StoreError {
    let transient = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || !matches!(e.retry_method(), RetryMethod::NoRetry)
        || matches!(e.kind(), ErrorKind::ReadOnly)
        || matches!(
            e.code(),
            Some("OOM" | "BUSY" | "MISCONF" | "NOREPLICAS" | "LOADING")
        );
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

fn protocol(what: impl Into<String>) -> StoreError {
    StoreError::Protocol(what.into())
}

fn int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(protocol(format!("expected an integer, got {other:?}"))),
    }
}

fn text(v: &Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone())
            .map_err(|_| protocol("group name is not UTF-8".to_string())),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(protocol(format!("expected a string, got {other:?}"))),
    }
}

/// Decodes `{ total, group, n, group, n, ... }`.
fn groups(v: &Value) -> Result<Groups, StoreError> {
    let Value::Array(items) = v else {
        return Err(protocol(format!("expected a group array, got {v:?}")));
    };
    let Some((total, pairs)) = items.split_first() else {
        return Err(protocol("empty group array"));
    };
    if pairs.len() % 2 != 0 {
        return Err(protocol("odd group array"));
    }
    let mut g = Groups {
        total: int(total)?,
        ..Groups::default()
    };
    for pair in pairs.chunks_exact(2) {
        g.by.insert(text(&pair[0])?, int(&pair[1])?);
    }
    Ok(g)
}

/// One update, encoded for [`APPLY`].
#[derive(Debug)]
struct Encoded {
    /// Hash tag of the scope (the cluster slot).
    tag: String,
    keys: Vec<String>,
    args: Vec<String>,
}

/// Updates per `EVALSHA`: amortises the fixed cost of a script call (script
/// lookup, `KEYS`/`ARGV` tables, reply) and lets the updates of one scope
/// share the script's per-call caches and TTLs, while keeping each call short
/// (Redis runs one script at a time: 64 updates are a few milliseconds at
/// most).
const UPDATES_PER_CALL: usize = 64;

/// One `EVALSHA` of [`APPLY`] over `chunk` (its `ARGV[1]` is the count, then
/// per update: its key count, TTL, argument count and arguments).
fn chunk_cmd(sha: &str, chunk: &[&Encoded]) -> Cmd {
    let nkeys: usize = chunk.iter().map(|e| e.keys.len()).sum();
    let mut c = redis::cmd("EVALSHA");
    c.arg(sha).arg(nkeys);
    for e in chunk {
        c.arg(&e.keys);
    }
    c.arg(chunk.len());
    for e in chunk {
        // args[0] is the TTL, the rest the ops.
        c.arg(e.keys.len())
            .arg(&e.args[0])
            .arg(e.args.len() - 1)
            .arg(&e.args[1..]);
    }
    c
}

/// Builds `KEYS`/`ARGV` of one update.
struct Encoder<'a> {
    prefix: &'a str,
    scope: &'a Scope,
    names: Vec<&'a str>,
    keys: Vec<String>,
    args: Vec<String>,
}

impl<'a> Encoder<'a> {
    /// Op code and the (1-based) `KEYS` index of `name`, added once.
    fn op(&mut self, code: &str, name: &'a str) {
        let idx = match self.names.iter().position(|n| *n == name) {
            Some(i) => i + 2,
            None => {
                self.names.push(name);
                self.keys.push(self.scope.key(self.prefix, name));
                self.keys.len()
            }
        };
        self.args.push(code.to_string());
        self.args.push(idx.to_string());
    }

    fn s(&mut self, v: &str) {
        self.args.push(v.to_string());
    }

    fn i(&mut self, v: i64) -> Result<(), StoreError> {
        if v.unsigned_abs() > LUA_EXACT {
            return Err(protocol(format!(
                "integer {v} exceeds 2^53, the exact range of the Redis store's Lua script"
            )));
        }
        self.args.push(v.to_string());
        Ok(())
    }
}

fn encode(prefix: &str, u: &Update) -> Result<Encoded, StoreError> {
    let marker = u.scope.key(prefix, &format!("ev:{}", u.dedupe));
    let mut e = Encoder {
        prefix,
        scope: &u.scope,
        names: Vec::with_capacity(u.ops.len()),
        keys: vec![marker],
        args: Vec::with_capacity(1 + 6 * u.ops.len()),
    };
    e.i(u.ttl_ms.max(1))?;
    for op in &u.ops {
        match op {
            Op::CallMax {
                key,
                field,
                value,
                ttl_ms,
            } => {
                e.op("M", key);
                e.s(field);
                e.i(*value)?;
                e.i((*ttl_ms).max(1))?;
            }
            Op::Add {
                key,
                bucket,
                group,
                delta,
                when,
            } => {
                e.op("A", key);
                e.i(*bucket)?;
                e.s(group);
                match delta {
                    Val::Const(v) => {
                        e.s("=");
                        e.i(*v)?;
                    }
                    Val::Ref(i) => {
                        e.s("@");
                        e.s(&i.to_string());
                    }
                }
                e.s(&when.map(|w| w.to_string()).unwrap_or_default());
            }
            Op::Sum {
                key,
                from,
                to,
                prune_before,
            } => {
                e.op("S", key);
                e.i(*from)?;
                e.i(*to)?;
                e.i(*prune_before)?;
            }
            Op::Mark { key, group, id, ts } => {
                e.op("K", key);
                e.s(group);
                e.s(id);
                e.i(*ts)?;
            }
            Op::Distinct {
                key,
                since,
                prune_before,
            } => {
                e.op("D", key);
                e.i(*since)?;
                e.i(*prune_before)?;
            }
            Op::Has {
                key,
                group,
                id,
                since,
            } => {
                e.op("H", key);
                e.s(group);
                e.s(id);
                e.i(*since)?;
            }
            Op::Span {
                key,
                id,
                group,
                start,
                end,
                closed,
            } => {
                e.op("P", key);
                e.s(id);
                e.s(group);
                e.i(*start)?;
                e.i(*end)?;
                e.s(if *closed { "1" } else { "0" });
            }
            Op::Overlap {
                key,
                at,
                open_horizon,
                prune_before,
            } => {
                e.op("O", key);
                e.i(*at)?;
                e.i(*open_horizon)?;
                e.i(*prune_before)?;
            }
        }
    }
    Ok(Encoded {
        tag: u.scope.tag(),
        keys: e.keys,
        args: e.args,
    })
}

/// Decodes the script's reply for `u`.
fn decode(u: &Update, v: &Value) -> Result<Outcome, StoreError> {
    let Value::Array(items) = v else {
        return Err(protocol(format!("unexpected apply reply {v:?}")));
    };
    let Some((dup, rest)) = items.split_first() else {
        return Err(protocol("empty apply reply"));
    };
    if rest.len() != u.ops.len() {
        return Err(protocol(format!(
            "apply returned {} results for {} ops",
            rest.len(),
            u.ops.len()
        )));
    }
    let duplicate = match int(dup)? {
        0 => false,
        1 => true,
        other => return Err(protocol(format!("bad duplicate flag {other}"))),
    };
    let results = u
        .ops
        .iter()
        .zip(rest)
        .map(|(op, v)| match op {
            Op::CallMax { .. } | Op::Has { .. } => int(v).map(OpResult::Int),
            Op::Sum { .. } | Op::Distinct { .. } | Op::Overlap { .. } => {
                groups(v).map(OpResult::Groups)
            }
            Op::Add { .. } | Op::Mark { .. } | Op::Span { .. } => Ok(OpResult::None),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Outcome { duplicate, results })
}

impl RedisStore {
    /// Connects to one Redis node (one multiplexed, auto-reconnecting
    /// connection) and loads the scripts. `prefix` starts every key (`tg:`).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_tls(url, prefix, None).await
    }

    /// [`RedisStore::connect`] with the certificates of `[redis.tls]` for a
    /// `rediss://` URL (`None`: the system trust store, or plain `redis://`).
    pub async fn connect_tls(
        url: &str,
        prefix: &str,
        tls: Option<&crate::redis_tls::RedisTlsCerts>,
    ) -> Result<Self, StoreError> {
        let client = match tls {
            Some(t) => redis::Client::build_with_tls(url, t.0.clone()),
            None => redis::Client::open(url),
        }
        .map_err(store_err)?;
        // Reconnection backoff: redis 0.32 hands `factor` to backon as the
        // growth *multiplier* (first delay 1 s), not as a unit of
        // milliseconds as its docs suggest; the default (100, capped at 60 s)
        // made a request during an outage, or a connect to a dead server,
        // wait minutes. Here: ~1 s, then ≤ 1 s, then fail (Unavailable) and
        // let the caller retry.
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(10))
            .set_number_of_retries(2)
            .set_factor(2)
            .set_max_delay(1_000);
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(store_err)?;
        Self::init(Conn::Single(conn), prefix).await
    }

    /// Connects to a Redis Cluster through its seed `nodes`
    /// (`redis://host:port/` each) and loads the scripts on every primary.
    pub async fn connect_cluster(nodes: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::connect_cluster_tls(nodes, prefix, None).await
    }

    /// [`RedisStore::connect_cluster`] with the certificates of
    /// `[redis.tls]` for `rediss://` nodes.
    pub async fn connect_cluster_tls(
        nodes: &[String],
        prefix: &str,
        tls: Option<&crate::redis_tls::RedisTlsCerts>,
    ) -> Result<Self, StoreError> {
        let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(10));
        if let Some(t) = tls {
            builder = builder.certs(t.0.clone());
        }
        let client = builder.build().map_err(store_err)?;
        let conn = client.get_async_connection().await.map_err(store_err)?;
        Self::init(Conn::Cluster(conn), prefix).await
    }

    async fn init(conn: Conn, prefix: &str) -> Result<Self, StoreError> {
        let s = Self {
            conn,
            prefix: prefix.to_string(),
            apply: Script::new(APPLY),
            cas: Script::new(CAS),
        };
        s.load(&s.apply).await?;
        s.load(&s.cas).await?;
        tracing::debug!(store = ?s, "redis window store connected, scripts loaded");
        Ok(s)
    }

    async fn load(&self, script: &Script) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        script.load_async(&mut c).await.map_err(store_err)?;
        Ok(())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Test hook: swaps the apply script for a copy (salted with `salt`)
    /// that the server has not loaded, so the next [`WindowStore::apply`]
    /// meets `NOSCRIPT` — without flushing the server's script cache under
    /// other clients.
    #[doc(hidden)]
    pub fn with_unloaded_apply_script(mut self, salt: &str) -> Self {
        self.apply = Script::new(&format!("{APPLY}\n-- test salt: {salt}\n"));
        self
    }

    /// [`WindowStore::cas_states`] on one node: one pipeline of `EVALSHA`s
    /// of [`CAS`] (Redis runs a connection's commands in order), re-loading
    /// the script and re-sending only the writes that met `NOSCRIPT` (which
    /// ran nothing).
    async fn cas_pipeline(&self, writes: &[StateWrite]) -> Result<Vec<bool>, StoreError> {
        let mut written: Vec<Option<bool>> = vec![None; writes.len()];
        let mut pending: Vec<usize> = (0..writes.len()).collect();
        for attempt in 0..=NOSCRIPT_RELOADS {
            let mut pipe = redis::pipe();
            for &i in &pending {
                let w = &writes[i];
                let mut c = redis::cmd("EVALSHA");
                c.arg(self.cas.get_hash())
                    .arg(1)
                    .arg(w.scope.key(&self.prefix, &format!("st:{}", w.name)))
                    .arg(if w.expect.is_some() { "1" } else { "0" })
                    .arg(w.expect.as_deref().unwrap_or(""))
                    .arg(&w.value)
                    .arg(w.ttl_ms.max(1));
                pipe.add_command(c);
            }
            let mut c = self.conn.clone();
            let raw = c
                .req_packed_commands(&pipe, 0, pending.len())
                .await
                .map_err(store_err)?;
            if raw.len() != pending.len() {
                return Err(protocol(format!(
                    "pipeline returned {} replies for {} compare-and-sets",
                    raw.len(),
                    pending.len()
                )));
            }
            let mut retry = Vec::new();
            for (&i, v) in pending.iter().zip(raw) {
                match v.extract_error() {
                    Ok(v) => written[i] = Some(int(&v)? == 1),
                    Err(e) if e.kind() == ErrorKind::NoScriptError => retry.push(i),
                    Err(e) => return Err(store_err(e)),
                }
            }
            if let Some(&first) = retry.first() {
                // A write after a NOSCRIPT meets it too (the script is gone)
                // unless another client re-loads the script in between; the
                // engine never sends two writes of one key in one call.
                if attempt == NOSCRIPT_RELOADS {
                    return Err(StoreError::Unavailable(format!(
                        "NOSCRIPT persists after {NOSCRIPT_RELOADS} reloads of the CAS script"
                    )));
                }
                tracing::warn!(
                    writes = retry.len(),
                    first,
                    "redis lost the CAS script (NOSCRIPT); reloading and re-sending"
                );
                self.load(&self.cas).await?;
                pending = retry;
            } else {
                break;
            }
        }
        tracing::debug!(writes = writes.len(), "redis cas_states");
        written
            .into_iter()
            .map(|w| w.ok_or_else(|| protocol("missing compare-and-set reply")))
            .collect()
    }

    /// Runs `batch` as one pipeline of `EVALSHA`s (each over up to
    /// [`UPDATES_PER_CALL`] consecutive updates) and returns one reply per
    /// update, re-loading the script and re-sending only the calls that met
    /// `NOSCRIPT` (a call that met it ran none of its updates).
    async fn eval_pipeline(&self, batch: &[&Encoded]) -> Result<Vec<Value>, StoreError> {
        let chunks: Vec<&[&Encoded]> = batch.chunks(UPDATES_PER_CALL).collect();
        let mut replies: Vec<Option<Value>> = vec![None; chunks.len()];
        let mut pending: Vec<usize> = (0..chunks.len()).collect();
        for attempt in 0..=NOSCRIPT_RELOADS {
            let mut pipe = redis::pipe();
            for &i in &pending {
                pipe.add_command(chunk_cmd(self.apply.get_hash(), chunks[i]));
            }
            let mut c = self.conn.clone();
            // The per-command replies, errors included (`Pipeline::query_async`
            // would stop at the first error and hide which updates ran).
            let noscript = match c.req_packed_commands(&pipe, 0, pending.len()).await {
                Ok(raw) => {
                    if raw.len() != pending.len() {
                        return Err(protocol(format!(
                            "pipeline returned {} replies for {} commands",
                            raw.len(),
                            pending.len()
                        )));
                    }
                    let mut noscript = Vec::new();
                    for (&i, v) in pending.iter().zip(raw) {
                        match v.extract_error() {
                            Ok(v) => replies[i] = Some(v),
                            Err(e) if e.kind() == ErrorKind::NoScriptError => noscript.push(i),
                            Err(e) => return Err(store_err(e)),
                        }
                    }
                    noscript
                }
                // The cluster client folds per-command errors into one: all
                // of this (single-slot) pipeline is re-sent. Only a script
                // flush in the middle of the pipeline could then report an
                // update that ran as a duplicate — as a connection lost
                // mid-batch does anyway.
                Err(e) if e.kind() == ErrorKind::NoScriptError => pending.clone(),
                Err(e) => return Err(store_err(e)),
            };
            if noscript.is_empty() {
                break;
            }
            if attempt == NOSCRIPT_RELOADS {
                return Err(StoreError::Unavailable(format!(
                    "NOSCRIPT persists after {NOSCRIPT_RELOADS} reloads of the apply script"
                )));
            }
            tracing::warn!(
                calls = noscript.len(),
                "redis lost the apply script (NOSCRIPT); reloading and re-sending"
            );
            self.load(&self.apply).await?;
            pending = noscript;
        }
        let mut out = Vec::with_capacity(batch.len());
        for (chunk, reply) in chunks.iter().zip(replies) {
            match reply {
                Some(Value::Array(items)) if items.len() == chunk.len() => out.extend(items),
                Some(other) => {
                    return Err(protocol(format!(
                        "apply returned {other:?} for {} updates",
                        chunk.len()
                    )));
                }
                None => return Err(protocol("missing apply reply")),
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl WindowStore for RedisStore {
    async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = updates
            .iter()
            .map(|u| encode(&self.prefix, u))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::debug!(
            updates = updates.len(),
            keys = encoded.iter().map(|e| e.keys.len()).sum::<usize>(),
            "redis apply"
        );
        let replies = match self.conn {
            Conn::Single(_) => {
                // Grouped by scope (stable, so each scope keeps its order):
                // a call then carries consecutive updates of one scope and
                // the script parses each of its hashes once per call.
                // Updates of different scopes touch disjoint keys, so their
                // relative order is unobservable.
                let mut order: Vec<usize> = (0..encoded.len()).collect();
                order.sort_by(|&a, &b| encoded[a].tag.cmp(&encoded[b].tag));
                let sorted: Vec<&Encoded> = order.iter().map(|&i| &encoded[i]).collect();
                let part = self.eval_pipeline(&sorted).await?;
                let mut replies = vec![Value::Nil; updates.len()];
                for (i, v) in order.into_iter().zip(part) {
                    replies[i] = v;
                }
                replies
            }
            Conn::Cluster(_) => {
                // A cluster pipeline must stay in one slot: one per scope,
                // all in flight at once, order kept within each scope.
                let mut by_tag: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for (i, e) in encoded.iter().enumerate() {
                    by_tag.entry(&e.tag).or_default().push(i);
                }
                let parts = futures::future::try_join_all(by_tag.into_values().map(|idx| {
                    let batch: Vec<&Encoded> = idx.iter().map(|&i| &encoded[i]).collect();
                    async move { self.eval_pipeline(&batch).await.map(|r| (idx, r)) }
                }))
                .await?;
                let mut replies = vec![Value::Nil; updates.len()];
                for (idx, part) in parts {
                    for (i, v) in idx.into_iter().zip(part) {
                        replies[i] = v;
                    }
                }
                replies
            }
        };
        updates
            .iter()
            .zip(&replies)
            .map(|(u, v)| decode(u, v))
            .collect()
    }

    async fn get_states(
        &self,
        keys: &[(Scope, String)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // One MGET; on a cluster the client splits it per slot and
        // reassembles the replies in order.
        let mut cmd = redis::cmd("MGET");
        for (s, n) in keys {
            cmd.arg(s.key(&self.prefix, &format!("st:{n}")));
        }
        let mut c = self.conn.clone();
        let values: Vec<Option<String>> = cmd.query_async(&mut c).await.map_err(store_err)?;
        if values.len() != keys.len() {
            return Err(protocol(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                keys.len()
            )));
        }
        Ok(values)
    }

    async fn cas_state(&self, w: &StateWrite) -> Result<bool, StoreError> {
        let key = w.scope.key(&self.prefix, &format!("st:{}", w.name));
        let mut inv = self.cas.key(key);
        inv.arg(if w.expect.is_some() { "1" } else { "0" })
            .arg(w.expect.as_deref().unwrap_or(""))
            .arg(&w.value)
            .arg(w.ttl_ms.max(1));
        let mut c = self.conn.clone();
        // EVALSHA, falling back to SCRIPT LOAD + EVALSHA on NOSCRIPT.
        let written: i64 = inv.invoke_async(&mut c).await.map_err(store_err)?;
        tracing::debug!(name = %w.name, written = written == 1, "redis cas_state");
        Ok(written == 1)
    }

    async fn cas_states(&self, writes: &[StateWrite]) -> Result<Vec<bool>, StoreError> {
        match self.conn {
            Conn::Single(_) if writes.len() > 1 => self.cas_pipeline(writes).await,
            // A cluster pipeline must stay in one slot; each CAS on its own
            // (in order: two writes of one key must not race).
            _ => {
                let mut out = Vec::with_capacity(writes.len());
                for w in writes {
                    out.push(self.cas_state(w).await?);
                }
                Ok(out)
            }
        }
    }

    async fn set_members(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(Scope::Global.key(&self.prefix, name))
            .query_async(&mut c)
            .await
            .map_err(store_err)?;
        v.sort();
        Ok(v)
    }

    async fn set_add(&self, name: &str, member: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let added: i64 = redis::cmd("SADD")
            .arg(Scope::Global.key(&self.prefix, name))
            .arg(member)
            .query_async(&mut c)
            .await
            .map_err(store_err)?;
        Ok(added == 1)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: Value = redis::cmd("PING")
            .query_async(&mut c)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}
