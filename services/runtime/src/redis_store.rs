//! The Redis implementation of the core's [`WindowStore`] (DESIGN §5, STYLE
//! "Redis the careful way").
//!
//! * **One connection.** A single multiplexed, auto-reconnecting
//!   [`ConnectionManager`] (or a [`ClusterConnection`] for Redis Cluster),
//!   cloned per call; never a connection per request.
//! * **The ops run here, Redis stores.** [`WindowStore::apply`] groups a
//!   batch by scope (each scope keeps its order; scopes touch disjoint keys,
//!   so their relative order is unobservable), runs each scope's updates with
//!   the memory store's own interpreter ([`Keyspace`]) on the scope's state
//!   and commits the difference — new dedupe markers (`SET NX PX`), changed
//!   and pruned fields, `PEXPIRE` of every key written — with one small
//!   script (`local::WRITE`) that first checks the scope's *version key*
//!   (`tg:{<tag>}:ver`, a random token every commit replaces) is the one the
//!   state was read at. The state comes from a cache of the scopes this
//!   process last committed, else from one pipelined read of the batch's
//!   missing scopes. A scope whose version moved (another correlator wrote
//!   it) or whose marker already existed (a re-delivery the cache could not
//!   know) writes nothing; it is read again and re-run, so every update is
//!   applied atomically, once, on the exact state it was evaluated on. See
//!   `redis_store/local.rs`. (Until 2026-11 a Lua script interpreted every
//!   op inside Redis; that cost ~120 µs of Redis CPU per event.)
//! * **One read, then writes overlapping the work.** One read of the
//!   scopes not cached, then the scopes run in chunks (up to
//!   `SCOPES_PER_CHUNK` scopes or `UPDATES_PER_CHUNK` updates; a chunk with
//!   enough updates runs on two threads, its scopes split by their number of
//!   updates): each chunk's pipeline of `EVALSHA`s of the write script (up
//!   to `SCOPES_PER_CALL` scopes each) goes out as a task of its own while
//!   the next chunk runs here, so Redis and the correlator work at the same
//!   time; plus one read-and-write round per round of conflicts. The debug
//!   log `redis apply` gives each batch's read, run and write-wait time. Every key of a scope is under the scope's `{<tag>}`;
//!   on a cluster the reads and writes go per scope (one slot each), all in
//!   flight at once. The script is loaded at connect; when the server has
//!   lost it (`NOSCRIPT` after a restart or `SCRIPT FLUSH`), it is loaded
//!   again and only the calls that failed (which wrote nothing) are re-sent.
//! * **Bounded waits.** Responses time out after 10 s, connects after 5 s;
//!   on one node a lost connection is retried twice about a second apart
//!   before the call fails as [`StoreError::Unavailable`].
//!
//! The semantics are exactly those of [`MemoryStore`]
//! (`tests/store_suite.rs` checks both stores against each other).
//!
//! **Number range.** Sorted-set scores are doubles: integers are exact up to
//! 2^53 (≈ 9·10^15). Millisecond timestamps (≈ 1.7·10^12), bucket indices
//! and micro-EUR amounts fit with room to spare; an update carrying a larger
//! integer is refused with [`StoreError::Protocol`] before anything is
//! written rather than silently rounded.
//!
//! **Errors.** Connection, I/O, timeout and transient server states
//! (LOADING, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY, OOM, BUSY, MOVED…)
//! are [`StoreError::Unavailable`]; anything else the server answers that
//! the store cannot interpret is [`StoreError::Protocol`]. If a batch fails
//! part-way, the updates that did run stay applied: a retry of the batch
//! sees them as duplicates (their reads are still answered), which is the
//! at-least-once contract of the dedupe marker. A batch whose scopes stay
//! contended for `MAX_ROUNDS` rounds fails as [`StoreError::Unavailable`].
//! Every writer of window state must go through this protocol (the version
//! key): a correlator of an older release must not run beside this one.
//!
//! [`MemoryStore`]: tollguard_core::store::MemoryStore
//! [`Keyspace`]: tollguard_core::store::Keyspace
//! [`ClusterConnection`]: redis::cluster_async::ClusterConnection

mod local;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, RedisError, RedisFuture, RetryMethod, Script, Value};
use tollguard_core::StoreError;
use tollguard_core::store::{LaneMark, Outcome, Scope, StateWrite, Update, WindowStore};

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

/// Merge of lane progress into the shared lane table (the semantics of
/// `tollguard_core::store::merge_lane_table`). KEYS[1] = the table (a hash
/// of `t:<lane>` → event time and `s:<lane>` → wall time seen); ARGV = now,
/// retention in ms, then (lane, event time, seen) triples. Returns the
/// table after the merge as a flat list of (lane, event time, seen).
const MERGE_LANES: &str = r#"
local now, retain = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local lane, t, s = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local ct = redis.call('HGET', KEYS[1], 't:' .. lane)
  if not ct or tonumber(ct) < tonumber(t) then redis.call('HSET', KEYS[1], 't:' .. lane, t) end
  local cs = redis.call('HGET', KEYS[1], 's:' .. lane)
  if not cs or tonumber(cs) < tonumber(s) then redis.call('HSET', KEYS[1], 's:' .. lane, s) end
end
local all = redis.call('HGETALL', KEYS[1])
local seen, times = {}, {}
for i = 1, #all, 2 do
  local kind, lane = string.sub(all[i], 1, 2), string.sub(all[i], 3)
  if kind == 's:' then seen[lane] = all[i + 1] else times[lane] = all[i + 1] end
end
local out = {}
for lane, t in pairs(times) do
  local s = seen[lane]
  if s and now - tonumber(s) <= retain then
    out[#out + 1] = lane
    out[#out + 1] = t
    out[#out + 1] = s
  else
    redis.call('HDEL', KEYS[1], 't:' .. lane, 's:' .. lane)
  end
end
if #all > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return out
"#;

/// Default bound of the scope state kept between batches (bytes, estimated).
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// Largest integer magnitude that crosses into Lua exactly (2^53).
const LUA_EXACT: u64 = 1 << 53;

/// How often one batch re-loads the script after `NOSCRIPT` before giving up.
const NOSCRIPT_RELOADS: usize = 2;

/// The connection: one node through a [`ConnectionManager`], or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// Least time between two rebuilds of a cluster connection.
const CLUSTER_REBUILD_EVERY: Duration = Duration::from_secs(5);

/// Bound of one rebuild (the client's own connect has none over its
/// topology discovery).
const CLUSTER_REBUILD_WITHIN: Duration = Duration::from_secs(15);

/// A cluster connection that is rebuilt from the seed nodes when a call on
/// it times out. The client recovers from `MOVED` and refused connections
/// by itself, but after a primary is killed under load its connection can
/// wedge: every later call, to every slot, times out, also after the
/// replica is promoted (redis 0.32, seen about one failover in ten here). A
/// fresh connection reads the topology again and serves at once.
struct Cluster {
    client: redis::cluster::ClusterClient,
    /// The connection in use and its generation (counts rebuilds).
    current: std::sync::RwLock<(u64, ClusterConnection)>,
    /// Serialises rebuilds; holds when the last one started.
    rebuilt: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl Cluster {
    async fn connect(client: redis::cluster::ClusterClient) -> Result<Self, RedisError> {
        let conn = client.get_async_connection().await?;
        Ok(Self {
            client,
            current: std::sync::RwLock::new((0, conn)),
            rebuilt: tokio::sync::Mutex::new(None),
        })
    }

    /// The connection in use and its generation.
    fn get(&self) -> (u64, ClusterConnection) {
        let g = self.current.read().unwrap_or_else(|p| p.into_inner());
        (g.0, g.1.clone())
    }

    /// After a call on generation `failed` met `e`: on a timeout, replaces
    /// the connection with a fresh one, unless another call already did or
    /// the last rebuild is under [`CLUSTER_REBUILD_EVERY`] old. A failed
    /// rebuild keeps the connection in use.
    async fn heal(&self, failed: u64, e: &RedisError) {
        if !e.is_timeout() {
            return;
        }
        let mut last = self.rebuilt.lock().await;
        if self.get().0 != failed || last.is_some_and(|t| t.elapsed() < CLUSTER_REBUILD_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        match tokio::time::timeout(CLUSTER_REBUILD_WITHIN, self.client.get_async_connection()).await
        {
            Ok(Ok(conn)) => {
                let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
                *g = (failed + 1, conn);
                tracing::warn!(
                    error = %e,
                    generation = failed + 1,
                    "redis cluster call timed out; connection rebuilt from the seed nodes"
                );
            }
            Ok(Err(re)) => {
                tracing::warn!(error = %e, rebuild = %re, "redis cluster call timed out; rebuilding the connection failed, keeping it")
            }
            Err(_) => tracing::warn!(
                error = %e,
                within = ?CLUSTER_REBUILD_WITHIN,
                "redis cluster call timed out; rebuilding the connection timed out, keeping it"
            ),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(h) => Box::pin(async move {
                let (generation, mut c) = h.get();
                let r = c.req_packed_command(cmd).await;
                if let Err(e) = &r {
                    h.heal(generation, e).await;
                }
                r
            }),
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
            Conn::Cluster(h) => Box::pin(async move {
                let (generation, mut c) = h.get();
                let r = c.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &r {
                    h.heal(generation, e).await;
                }
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(h) => h.get().1.get_db(),
        }
    }
}

/// Replies of write calls sent as a task of their own ([`RedisStore::send`]).
type Sent = tokio::task::JoinHandle<Result<Vec<Result<Value, RedisError>>, RedisError>>;

/// The per-scope statuses of one [`local::WRITE`] call over `n` scopes.
fn call_statuses(n: usize, reply: Option<Value>) -> Result<Vec<i64>, StoreError> {
    match reply {
        Some(Value::Array(items)) if items.len() == n => items.iter().map(int).collect(),
        other => Err(protocol(format!("write returned {other:?} for {n} scopes"))),
    }
}

/// One command per group, each reply on its own (errors included): one
/// pipeline on one node; on a cluster each command on its own, all in
/// flight (the cluster client folds a pipeline's errors into one). Owns its
/// connection, so it can run as a task of its own.
async fn raw_calls(
    conn: Conn,
    groups: Vec<Vec<Cmd>>,
) -> Result<Vec<Result<Value, RedisError>>, RedisError> {
    match conn {
        Conn::Single(mut c) => {
            let mut pipe = redis::pipe();
            for cmd in groups.into_iter().flatten() {
                pipe.add_command(cmd);
            }
            let n = pipe.cmd_iter().count();
            let raw = c.req_packed_commands(&pipe, 0, n).await?;
            Ok(raw.into_iter().map(Value::extract_error).collect())
        }
        Conn::Cluster(h) => {
            let all = groups.into_iter().flatten().map(|cmd| {
                let mut c = Conn::Cluster(h.clone());
                async move {
                    match c.req_packed_command(&cmd).await {
                        Ok(v) => Ok(v.extract_error()),
                        Err(e) if e.kind() == ErrorKind::NoScriptError => Ok(Err(e)),
                        Err(e) => Err(e),
                    }
                }
            });
            futures::future::try_join_all(all).await
        }
    }
}

/// The Redis implementation of [`WindowStore`].
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    write: Script,
    cas: Script,
    merge_lanes: Script,
    /// Scope state between batches (shared by clones).
    cache: Arc<local::SharedCache>,
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
        let conn = Cluster::connect(client).await.map_err(store_err)?;
        Self::init(Conn::Cluster(Arc::new(conn)), prefix).await
    }

    async fn init(conn: Conn, prefix: &str) -> Result<Self, StoreError> {
        let s = Self {
            conn,
            prefix: prefix.to_string(),
            write: Script::new(local::WRITE),
            cas: Script::new(CAS),
            merge_lanes: Script::new(MERGE_LANES),
            cache: Arc::new(local::SharedCache::new(DEFAULT_CACHE_BYTES)),
        };
        s.load(&s.write).await?;
        s.load(&s.cas).await?;
        s.load(&s.merge_lanes).await?;
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

    /// Bounds the scope state kept between batches to about `bytes` (0 keeps
    /// none: every batch reads its scopes). The default is
    /// [`DEFAULT_CACHE_BYTES`]; clones share one cache.
    pub fn with_cache_bytes(mut self, bytes: usize) -> Self {
        self.cache = Arc::new(local::SharedCache::new(bytes));
        self
    }

    /// Test hook: swaps the write script for a copy (salted with `salt`)
    /// that the server has not loaded, so the next [`WindowStore::apply`]
    /// meets `NOSCRIPT` — without flushing the server's script cache under
    /// other clients.
    #[doc(hidden)]
    pub fn with_unloaded_apply_script(mut self, salt: &str) -> Self {
        self.write = Script::new(&format!("{}\n-- test salt: {salt}\n", local::WRITE));
        self
    }

    /// Runs each group of commands as one pipeline and returns the replies
    /// per group: on one node all groups share one pipeline (one round
    /// trip); on a cluster each group (one scope, one slot) is its own
    /// pipeline, all in flight at once.
    async fn pipelines(&self, groups: Vec<Vec<Cmd>>) -> Result<Vec<Vec<Value>>, StoreError> {
        let run = |cmds: Vec<Cmd>| async move {
            let mut pipe = redis::pipe();
            for c in cmds {
                pipe.add_command(c);
            }
            let n = pipe.cmd_iter().count();
            let mut c = self.conn.clone();
            let raw = c
                .req_packed_commands(&pipe, 0, n)
                .await
                .map_err(store_err)?;
            if raw.len() != n {
                return Err(protocol(format!(
                    "pipeline returned {} replies for {n} commands",
                    raw.len()
                )));
            }
            raw.into_iter()
                .map(|v| v.extract_error().map_err(store_err))
                .collect::<Result<Vec<_>, _>>()
        };
        match self.conn {
            Conn::Single(_) => {
                let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
                let mut all = run(groups.into_iter().flatten().collect())
                    .await?
                    .into_iter();
                Ok(sizes
                    .into_iter()
                    .map(|n| all.by_ref().take(n).collect())
                    .collect())
            }
            Conn::Cluster(_) => futures::future::try_join_all(groups.into_iter().map(run)).await,
        }
    }

    /// Commits the scopes' writes with [`local::WRITE`] and returns each
    /// scope's status (1 written, 0 version changed, 2 marker existed). One
    /// node: one pipeline of calls of up to [`local::SCOPES_PER_CALL`]
    /// scopes; a cluster: one call per scope, all in flight. A call that met
    /// `NOSCRIPT` ran nothing and is re-sent after a reload.
    async fn commit(&self, writes: &[&local::Writes]) -> Result<Vec<i64>, StoreError> {
        let calls: Vec<&[&local::Writes]> = writes.chunks(self.scopes_per_call()).collect();
        let mut replies: Vec<Option<Value>> = vec![None; calls.len()];
        let mut pending: Vec<usize> = (0..calls.len()).collect();
        for attempt in 0..=NOSCRIPT_RELOADS {
            let groups = pending
                .iter()
                .map(|&i| vec![local::write_cmd(self.write.get_hash(), calls[i])])
                .collect();
            let noscript = match raw_calls(self.conn.clone(), groups).await {
                Ok(raw) => {
                    let mut noscript = Vec::new();
                    for (&i, v) in pending.iter().zip(raw) {
                        match v {
                            Ok(v) => replies[i] = Some(v),
                            Err(e) if e.kind() == ErrorKind::NoScriptError => noscript.push(i),
                            Err(e) => return Err(store_err(e)),
                        }
                    }
                    noscript
                }
                Err(e) => return Err(store_err(e)),
            };
            if noscript.is_empty() {
                break;
            }
            if attempt == NOSCRIPT_RELOADS {
                return Err(StoreError::Unavailable(format!(
                    "NOSCRIPT persists after {NOSCRIPT_RELOADS} reloads of the write script"
                )));
            }
            tracing::warn!(
                calls = noscript.len(),
                "redis lost the write script (NOSCRIPT); reloading and re-sending"
            );
            self.load(&self.write).await?;
            pending = noscript;
        }
        let mut out = Vec::with_capacity(writes.len());
        for (call, reply) in calls.iter().zip(replies) {
            out.extend(call_statuses(call.len(), reply)?);
        }
        Ok(out)
    }

    /// Scopes per [`local::WRITE`] call: [`local::SCOPES_PER_CALL`] on one
    /// node, one on a cluster (a call stays in one slot).
    fn scopes_per_call(&self) -> usize {
        match self.conn {
            Conn::Single(_) => local::SCOPES_PER_CALL,
            Conn::Cluster(_) => 1,
        }
    }

    /// Sends the scopes' writes as a task of its own, so Redis runs them
    /// while this process computes the next scopes' writes; [`Self::finish`]
    /// collects the statuses.
    fn send(&self, writes: &[&local::Writes]) -> Sent {
        let groups = writes
            .chunks(self.scopes_per_call())
            .map(|c| vec![local::write_cmd(self.write.get_hash(), c)])
            .collect();
        tokio::spawn(raw_calls(self.conn.clone(), groups))
    }

    /// The statuses of writes [`Self::send`] sent (as [`Self::commit`]
    /// returns them); calls that met `NOSCRIPT` ran nothing and go again
    /// through [`Self::commit`], which reloads the script.
    async fn finish(&self, writes: &[&local::Writes], sent: Sent) -> Result<Vec<i64>, StoreError> {
        let raw = sent
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis write task: {e}")))?
            .map_err(store_err)?;
        let calls: Vec<&[&local::Writes]> = writes.chunks(self.scopes_per_call()).collect();
        if raw.len() != calls.len() {
            return Err(protocol(format!(
                "pipeline returned {} replies for {} write calls",
                raw.len(),
                calls.len()
            )));
        }
        let mut out: Vec<Option<Vec<i64>>> = Vec::with_capacity(calls.len());
        let mut again: Vec<&local::Writes> = Vec::new();
        for (call, reply) in calls.iter().zip(raw) {
            match reply {
                Ok(v) => out.push(Some(call_statuses(call.len(), Some(v))?)),
                Err(e) if e.kind() == ErrorKind::NoScriptError => {
                    again.extend(call.iter().copied());
                    out.push(None);
                }
                Err(e) => return Err(store_err(e)),
            }
        }
        let mut resent = if again.is_empty() {
            Vec::new()
        } else {
            tracing::warn!(
                scopes = again.len(),
                "redis lost the write script (NOSCRIPT); reloading and re-sending"
            );
            self.load(&self.write).await?;
            self.commit(&again).await?
        }
        .into_iter();
        let mut all = Vec::with_capacity(writes.len());
        for (call, o) in calls.iter().zip(out) {
            match o {
                Some(v) => all.extend(v),
                None => all.extend(resent.by_ref().take(call.len())),
            }
        }
        if all.len() != writes.len() {
            return Err(protocol("missing write status after NOSCRIPT"));
        }
        Ok(all)
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
}

#[async_trait]
impl WindowStore for RedisStore {
    async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        for u in updates {
            local::check_ints(u)?;
        }
        let jobs = local::jobs(&self.prefix, updates)?;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; updates.len()];
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        let (mut rounds, mut reads, mut conflicts) = (0, 0, 0);
        // Where a batch's time goes (debug log): reading, running the ops
        // here, and waiting for Redis to finish the writes.
        let t0 = std::time::Instant::now();
        let (mut read_us, mut run_us, mut write_wait_us) = (0u128, 0u128, 0u128);
        while !pending.is_empty() {
            if rounds == local::MAX_ROUNDS {
                return Err(StoreError::Unavailable(format!(
                    "{} scopes still contended after {rounds} rounds",
                    pending.len()
                )));
            }
            rounds += 1;
            // 1. State: cached, with the keys it lacks read, else read in
            //    full; all reads of the round in one round trip.
            let needs: Vec<local::Need> = {
                let mut cache = self.cache.lock();
                pending.iter().map(|&j| cache.take(&jobs[j])).collect()
            };
            let mut groups = Vec::new();
            for (need, &j) in needs.iter().zip(&pending) {
                let job = &jobs[j];
                match need {
                    local::Need::Ready(_) => {}
                    local::Need::Partial(_, missing) => {
                        groups.push(local::read_cmds(&job.vkey, missing, &[]));
                    }
                    local::Need::Full => {
                        reads += 1;
                        groups.push(local::read_cmds(&job.vkey, &job.keys, &job.markers));
                    }
                }
            }
            let tr = std::time::Instant::now();
            let mut replies = if groups.is_empty() {
                Vec::new()
            } else {
                self.pipelines(groups).await?
            }
            .into_iter();
            read_us += tr.elapsed().as_micros();
            let tr = std::time::Instant::now();
            let mut ready: Vec<(usize, local::State)> = Vec::with_capacity(pending.len());
            let mut retry = Vec::new();
            for (need, &j) in needs.into_iter().zip(&pending) {
                match need {
                    local::Need::Ready(st) => ready.push((j, st)),
                    local::Need::Partial(mut st, missing) => {
                        let r = replies.next().unwrap_or_default();
                        if local::merge_partial(&mut st, &missing, &r)? {
                            ready.push((j, st));
                        } else {
                            // Changed by another writer: read in full.
                            conflicts += 1;
                            retry.push(j);
                        }
                    }
                    local::Need::Full => {
                        let r = replies.next().unwrap_or_default();
                        ready.push((j, local::parse_full(&jobs[j], &r)?));
                    }
                }
            }
            // 2. The ops, here, and 3. the commit under the version check:
            //    chunk by chunk, each chunk's writes sent while the next
            //    chunk runs (scopes are independent: their order does not
            //    matter).
            let mut runs: Vec<(Vec<Outcome>, local::Writes)> = Vec::with_capacity(ready.len());
            let mut sent = Vec::new();
            let mut rest: &mut [(usize, local::State)] = &mut ready;
            while !rest.is_empty() {
                let cut = local::chunk_len(&jobs, rest);
                let (chunk, tail) = std::mem::take(&mut rest).split_at_mut(cut);
                rest = tail;
                let from = runs.len();
                runs.extend(local::run_all(&self.prefix, &jobs, updates, chunk));
                let writes: Vec<&local::Writes> = runs[from..].iter().map(|(_, w)| w).collect();
                sent.push((from..runs.len(), self.send(&writes)));
            }
            run_us += tr.elapsed().as_micros();
            let tw = std::time::Instant::now();
            let mut status = Vec::with_capacity(runs.len());
            for (range, handle) in sent {
                let writes: Vec<&local::Writes> = runs[range].iter().map(|(_, w)| w).collect();
                status.extend(self.finish(&writes, handle).await?);
            }
            write_wait_us += tw.elapsed().as_micros();
            let mut cache = self.cache.lock();
            for ((j, mut st), ((outs, w), ok)) in
                ready.into_iter().zip(runs.into_iter().zip(status))
            {
                if ok == 1 {
                    for (&i, o) in jobs[j].idx.iter().zip(outs) {
                        outcomes[i] = Some(o);
                    }
                    if !w.args.is_empty() {
                        st.version = Some(w.new);
                    }
                    cache.put(&jobs[j], st);
                } else {
                    conflicts += 1;
                    retry.push(j);
                }
            }
            pending = retry;
        }
        tracing::debug!(
            updates = updates.len(),
            scopes = jobs.len(),
            reads,
            conflicts,
            total_us = t0.elapsed().as_micros(),
            read_us,
            run_us,
            write_wait_us,
            "redis apply"
        );
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| protocol("missing outcome")))
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

    async fn merge_lanes(
        &self,
        name: &str,
        lanes: &[LaneMark],
        now: i64,
        retain_ms: i64,
    ) -> Result<Vec<LaneMark>, StoreError> {
        let mut inv = self.merge_lanes.key(Scope::Global.key(&self.prefix, name));
        inv.arg(now).arg(retain_ms.max(1));
        for l in lanes {
            inv.arg(&l.lane).arg(l.event_time).arg(l.seen);
        }
        let mut c = self.conn.clone();
        let flat: Vec<String> = inv.invoke_async(&mut c).await.map_err(store_err)?;
        if !flat.len().is_multiple_of(3) {
            return Err(protocol(format!(
                "lane table: {} values, not triples",
                flat.len()
            )));
        }
        let num = |v: &str| {
            v.parse::<i64>()
                .map_err(|_| protocol(format!("lane table: {v:?} is not an integer")))
        };
        let mut out = flat
            .chunks(3)
            .map(|c| {
                Ok(LaneMark {
                    lane: c[0].clone(),
                    event_time: num(&c[1])?,
                    seen: num(&c[2])?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort();
        Ok(out)
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
