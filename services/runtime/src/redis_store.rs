//! The Redis window store.
//!
//! One Lua script applies a whole [`Update`] atomically: the event's dedupe
//! marker (`SET NX PX`) decides whether the writes run; reads always run.
//! All keys of an update share the `{<scope>}` hash tag, so the script is
//! valid on Redis Cluster. A batch of updates is one pipelined round trip of
//! `EVALSHA`s over one multiplexed [`ConnectionManager`] (cloned per call).
//!
//! Numbers cross into Lua as doubles: timestamps (ms, 13 digits) and
//! micro-EUR amounts below 10^14 per call are exact; constants are passed
//! through as the caller's decimal strings.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use tollguard_core::StoreError;
use tollguard_core::store::{
    Groups, Op, OpResult, Outcome, Scope, StateWrite, Update, Val, WindowStore,
};

/// Applies one update. KEYS[1] = dedupe marker, KEYS[2..] = op keys.
/// ARGV[1] = ttl ms, ARGV[2] = op count, then per op: code, key index, args.
const APPLY: &str = r#"
local ttl = ARGV[1]
local dup = not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ttl)
local res = { dup and 1 or 0 }
local ints = {}
local i = 3
local function split_group(s)
  local p = string.find(s, '|', 1, true)
  if p then return string.sub(s, 1, p - 1), string.sub(s, p + 1) end
  return nil, s
end
local function grouped(total, by, order)
  local out = { total }
  for _, g in ipairs(order) do out[#out + 1] = g; out[#out + 1] = by[g] end
  return out
end
for op = 1, tonumber(ARGV[2]) do
  local code = ARGV[i]
  local k = KEYS[tonumber(ARGV[i + 1])]
  local r = 0
  if code == 'M' then -- CallMax: field, value, ttl
    if not dup then
      local old = tonumber(redis.call('HGET', k, ARGV[i + 2]) or '0')
      local v = tonumber(ARGV[i + 3])
      if v > old then
        redis.call('HSET', k, ARGV[i + 2], ARGV[i + 3])
        r = v - old
      end
      redis.call('PEXPIRE', k, ARGV[i + 4])
    end
    ints[op] = r
    i = i + 5
  elseif code == 'A' then -- Add: bucket, group, kind(c|r), value, when(-|index)
    local d = tonumber(ARGV[i + 5])
    if ARGV[i + 4] == 'r' then d = ints[d + 1] or 0 end
    local enabled = ARGV[i + 6] == '-' or (ints[tonumber(ARGV[i + 6]) + 1] or 0) ~= 0
    if not dup and d ~= 0 and enabled then
      redis.call('HINCRBY', k, ARGV[i + 2] .. '|' .. ARGV[i + 3], d)
      redis.call('PEXPIRE', k, ttl)
    end
    i = i + 7
  elseif code == 'S' then -- Sum: from, to, prune_before
    local from, to, pb = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    local total, by, order = 0, {}, {}
    local h = redis.call('HGETALL', k)
    for j = 1, #h, 2 do
      local bs, g = split_group(h[j])
      if bs == nil then bs, g = h[j], '' end
      local b = tonumber(bs) or -math.huge
      if b < pb then
        redis.call('HDEL', k, h[j])
      elseif b >= from and b <= to then
        local v = tonumber(h[j + 1])
        total = total + v
        if by[g] == nil then by[g] = 0; order[#order + 1] = g end
        by[g] = by[g] + v
      end
    end
    r = grouped(total, by, order)
    i = i + 5
  elseif code == 'K' then -- Mark: group, id, ts
    if not dup then
      local m = ARGV[i + 2] .. '|' .. ARGV[i + 3]
      local cur = redis.call('ZSCORE', k, m)
      if (not cur) or tonumber(cur) < tonumber(ARGV[i + 4]) then
        redis.call('ZADD', k, ARGV[i + 4], m)
      end
      redis.call('PEXPIRE', k, ttl)
    end
    i = i + 5
  elseif code == 'D' then -- Distinct: since, prune_before
    redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. ARGV[i + 3])
    local ms = redis.call('ZRANGEBYSCORE', k, ARGV[i + 2], '+inf')
    local ids, n, by, order = {}, 0, {}, {}
    for _, m in ipairs(ms) do
      local g, id = split_group(m)
      if g == nil then g = '' end
      if not ids[id] then ids[id] = true; n = n + 1 end
      if by[g] == nil then by[g] = 0; order[#order + 1] = g end
      by[g] = by[g] + 1
    end
    r = grouped(n, by, order)
    i = i + 4
  elseif code == 'H' then -- Has: group, id, since
    local sc = redis.call('ZSCORE', k, ARGV[i + 2] .. '|' .. ARGV[i + 3])
    if sc and tonumber(sc) >= tonumber(ARGV[i + 4]) then r = 1 end
    ints[op] = r
    i = i + 5
  elseif code == 'P' then -- Span: id, group, start, end, closed
    if not dup then
      local st, en, cl, g = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5]), ARGV[i + 6], ARGV[i + 3]
      local cur = redis.call('HGET', k, ARGV[i + 2])
      if cur then
        local a, b, c, og = string.match(cur, '^([^,]+),([^,]+),([^,]+),(.*)$')
        st = math.min(st, tonumber(a))
        en = math.max(en, tonumber(b))
        if c == '1' then cl = '1' end
        g = og
      end
      redis.call('HSET', k, ARGV[i + 2], string.format('%d,%d,%s,%s', st, en, cl, g))
      redis.call('PEXPIRE', k, ttl)
    end
    i = i + 7
  elseif code == 'O' then -- Overlap: at, open_horizon, prune_before
    local at, hz, pb = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
    local total, by, order = 0, {}, {}
    local h = redis.call('HGETALL', k)
    for j = 1, #h, 2 do
      local a, b, c, g = string.match(h[j + 1], '^([^,]+),([^,]+),([^,]+),(.*)$')
      local st, en = tonumber(a), tonumber(b)
      local untl = en
      if c ~= '1' then untl = en + hz end
      if untl < pb then
        redis.call('HDEL', k, h[j])
      elseif st <= at and at <= untl then
        total = total + 1
        if by[g] == nil then by[g] = 0; order[#order + 1] = g end
        by[g] = by[g] + 1
      end
    end
    r = grouped(total, by, order)
    i = i + 5
  else
    return redis.error_reply('unknown op ' .. tostring(code))
  end
  res[#res + 1] = r
end
return res
"#;

/// Compare-and-set of a state value. ARGV: has_expect(0|1), expect, value, ttl.
const CAS: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and not cur) or (ARGV[1] == '1' and cur == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"#;

/// The Redis implementation of [`WindowStore`].
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    apply: redis::Script,
    cas: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn err(e: RedisError) -> StoreError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Protocol(e.to_string())
    }
}

fn int(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(StoreError::Protocol(format!(
            "expected an integer, got {other:?}"
        ))),
    }
}

fn text(v: &Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(StoreError::Protocol(format!(
            "expected a string, got {other:?}"
        ))),
    }
}

fn groups(v: &Value) -> Result<Groups, StoreError> {
    let Value::Array(items) = v else {
        return Err(StoreError::Protocol(format!(
            "expected an array, got {v:?}"
        )));
    };
    let mut g = Groups {
        total: int(items
            .first()
            .ok_or_else(|| StoreError::Protocol("empty group reply".into()))?)?,
        ..Default::default()
    };
    for pair in items[1..].chunks(2) {
        if let [k, v] = pair {
            g.by.insert(text(k)?, int(v)?);
        }
    }
    Ok(g)
}

impl RedisStore {
    /// Connects (one multiplexed, auto-reconnecting connection) and loads
    /// the scripts.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(err)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(5))
            .set_response_timeout(std::time::Duration::from_secs(10))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, cfg)
            .await
            .map_err(err)?;
        let s = Self {
            conn,
            prefix: prefix.to_string(),
            apply: redis::Script::new(APPLY),
            cas: redis::Script::new(CAS),
        };
        s.load_scripts().await?;
        Ok(s)
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        for src in [APPLY, CAS] {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(src)
                .query_async(&mut c)
                .await
                .map_err(err)?;
        }
        Ok(())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn encode(&self, u: &Update) -> (Vec<String>, Vec<String>) {
        let mut keys = vec![u.scope.key(&self.prefix, &format!("ev:{}", u.dedupe))];
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut args = vec![u.ttl_ms.max(1).to_string(), u.ops.len().to_string()];
        let mut key_of = |name: &str, keys: &mut Vec<String>| -> String {
            let n = *index.entry(name.to_string()).or_insert_with(|| {
                keys.push(u.scope.key(&self.prefix, name));
                keys.len()
            });
            n.to_string()
        };
        for op in &u.ops {
            match op {
                Op::CallMax {
                    key,
                    field,
                    value,
                    ttl_ms,
                } => {
                    args.extend([
                        "M".into(),
                        key_of(key, &mut keys),
                        field.clone(),
                        value.to_string(),
                        ttl_ms.max(&1).to_string(),
                    ]);
                }
                Op::Add {
                    key,
                    bucket,
                    group,
                    delta,
                    when,
                } => {
                    let (kind, v) = match delta {
                        Val::Const(c) => ("c", *c),
                        Val::Ref(i) => ("r", *i as i64),
                    };
                    args.extend([
                        "A".into(),
                        key_of(key, &mut keys),
                        bucket.to_string(),
                        group.clone(),
                        kind.into(),
                        v.to_string(),
                        when.map_or_else(|| "-".to_string(), |w| w.to_string()),
                    ]);
                }
                Op::Sum {
                    key,
                    from,
                    to,
                    prune_before,
                } => {
                    args.extend([
                        "S".into(),
                        key_of(key, &mut keys),
                        from.to_string(),
                        to.to_string(),
                        prune_before.to_string(),
                    ]);
                }
                Op::Mark { key, group, id, ts } => {
                    args.extend([
                        "K".into(),
                        key_of(key, &mut keys),
                        group.clone(),
                        id.clone(),
                        ts.to_string(),
                    ]);
                }
                Op::Distinct {
                    key,
                    since,
                    prune_before,
                } => {
                    args.extend([
                        "D".into(),
                        key_of(key, &mut keys),
                        since.to_string(),
                        prune_before.to_string(),
                    ]);
                }
                Op::Has {
                    key,
                    group,
                    id,
                    since,
                } => {
                    args.extend([
                        "H".into(),
                        key_of(key, &mut keys),
                        group.clone(),
                        id.clone(),
                        since.to_string(),
                    ]);
                }
                Op::Span {
                    key,
                    id,
                    group,
                    start,
                    end,
                    closed,
                } => {
                    args.extend([
                        "P".into(),
                        key_of(key, &mut keys),
                        id.clone(),
                        group.clone(),
                        start.to_string(),
                        end.to_string(),
                        if *closed { "1" } else { "0" }.into(),
                    ]);
                }
                Op::Overlap {
                    key,
                    at,
                    open_horizon,
                    prune_before,
                } => {
                    args.extend([
                        "O".into(),
                        key_of(key, &mut keys),
                        at.to_string(),
                        open_horizon.to_string(),
                        prune_before.to_string(),
                    ]);
                }
            }
        }
        (keys, args)
    }

    fn decode(u: &Update, v: &Value) -> Result<Outcome, StoreError> {
        let Value::Array(items) = v else {
            return Err(StoreError::Protocol(format!(
                "unexpected script reply {v:?}"
            )));
        };
        if items.len() != u.ops.len() + 1 {
            return Err(StoreError::Protocol(format!(
                "script returned {} results for {} ops",
                items.len().saturating_sub(1),
                u.ops.len()
            )));
        }
        let duplicate = int(&items[0])? == 1;
        let results = u
            .ops
            .iter()
            .zip(&items[1..])
            .map(|(op, v)| match op {
                Op::CallMax { .. } | Op::Has { .. } => int(v).map(OpResult::Int),
                Op::Sum { .. } | Op::Distinct { .. } | Op::Overlap { .. } => {
                    groups(v).map(OpResult::Groups)
                }
                _ => Ok(OpResult::None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Outcome { duplicate, results })
    }

    async fn run_pipeline(&self, updates: &[Update]) -> Result<Vec<Value>, RedisError> {
        let mut pipe = redis::pipe();
        for u in updates {
            let (keys, args) = self.encode(u);
            pipe.cmd("EVALSHA")
                .arg(self.apply.get_hash())
                .arg(keys.len())
                .arg(keys)
                .arg(args);
        }
        let mut c = self.conn.clone();
        pipe.query_async(&mut c).await
    }
}

#[async_trait]
impl WindowStore for RedisStore {
    async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let replies = match self.run_pipeline(updates).await {
            Ok(r) => r,
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                // The server lost its script cache (restart, SCRIPT FLUSH): reload and retry.
                self.load_scripts().await?;
                self.run_pipeline(updates).await.map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        updates
            .iter()
            .zip(replies.iter())
            .map(|(u, v)| Self::decode(u, v))
            .collect()
    }

    async fn get_states(
        &self,
        keys: &[(Scope, String)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (s, n) in keys {
            pipe.cmd("GET").arg(s.key(&self.prefix, &format!("st:{n}")));
        }
        let mut c = self.conn.clone();
        pipe.query_async(&mut c).await.map_err(err)
    }

    async fn cas_state(&self, w: &StateWrite) -> Result<bool, StoreError> {
        let key = w.scope.key(&self.prefix, &format!("st:{}", w.name));
        let mut c = self.conn.clone();
        let mut inv = self.cas.key(key);
        inv.arg(if w.expect.is_some() { "1" } else { "0" })
            .arg(w.expect.as_deref().unwrap_or(""))
            .arg(&w.value)
            .arg(w.ttl_ms.max(1));
        let r: i64 = inv.invoke_async(&mut c).await.map_err(err)?;
        Ok(r == 1)
    }

    async fn set_members(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(Scope::Global.key(&self.prefix, name))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        v.sort();
        Ok(v)
    }

    async fn set_add(&self, name: &str, member: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let n: i64 = redis::cmd("SADD")
            .arg(Scope::Global.key(&self.prefix, name))
            .arg(member)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(n == 1)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await.map_err(err)?;
        Ok(())
    }
}
