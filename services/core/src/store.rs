//! The window store: shared, windowed state of the correlators.
//!
//! Rules never touch a backend directly. For each event the detector plans
//! [`Update`]s — one per *scope* (a customer or a destination range) — each a
//! short list of [`Op`]s on keys inside that scope. A store applies an update
//! atomically: the event's dedupe marker and every write happen together or
//! not at all, and a re-delivered event (same dedupe id) changes nothing but
//! still gets the reads, so a correlator that crashed before publishing can
//! re-evaluate. Every key lives under `tg:{<scope>}:` (one Redis Cluster hash
//! slot per scope) and carries a TTL.
//!
//! [`MemoryStore`] is the embedded implementation; the Redis implementation
//! lives in `tollguard-runtime` and runs the same interpreter ([`Keyspace`])
//! on the scope's state read from Redis, committing the result under a
//! version check. One shared test suite (`tests/store_suite.rs`) runs
//! against both.

use std::collections::BTreeMap;

/// The hash map of window state: foldhash (fast, seeded at random per
/// process) instead of SipHash, which was ~8 % of the correlator's CPU
/// (BENCHMARKS.md, round 4). Keys are pseudonymous tokens and ids.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The hash set of window state (see [`HashMap`]).
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::StoreError;

/// A partition of state: every key of one scope hashes to one slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// A customer (pseudonym, or line pseudonym when no customer is known).
    Customer(String),
    /// A destination range such as `+67077`.
    Range(String),
    /// Consortium-wide state (hot list).
    Global,
    /// A peer group of customers (baselines).
    Peer(String),
}

impl Scope {
    /// Hash tag content: `c:<token>`, `r:<range>`, `p:<group>` or `g`.
    pub fn tag(&self) -> String {
        match self {
            Scope::Customer(c) => format!("c:{c}"),
            Scope::Range(r) => format!("r:{r}"),
            Scope::Peer(p) => format!("p:{p}"),
            Scope::Global => "g".to_string(),
        }
    }

    /// Full key of `name` in this scope: `tg:{c:…}:name`.
    pub fn key(&self, prefix: &str, name: &str) -> String {
        let (kind, id) = match self {
            Scope::Customer(c) => ("c:", c.as_str()),
            Scope::Range(r) => ("r:", r.as_str()),
            Scope::Peer(p) => ("p:", p.as_str()),
            Scope::Global => ("g", ""),
        };
        let mut k = String::with_capacity(prefix.len() + kind.len() + id.len() + name.len() + 3);
        k.push_str(prefix);
        k.push('{');
        k.push_str(kind);
        k.push_str(id);
        k.push_str("}:");
        k.push_str(name);
        k
    }
}

/// An integer argument: a constant or the integer result of an earlier op of
/// the same update (0 if that op was skipped as a duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Val {
    /// A constant.
    Const(i64),
    /// Result of op number `n` (0-based) of the same update.
    Ref(usize),
}

/// One operation on a key of the update's scope. Writes are skipped when the
/// update is a duplicate; reads always run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write. Per-call monotonic maximum of `field` in the small hash `key`
    /// (which expires after `ttl_ms`). Returns the increase over the previous
    /// maximum (absent = 0), never negative.
    CallMax {
        /// Key name.
        key: String,
        /// Field.
        field: String,
        /// New observation.
        value: i64,
        /// TTL of the per-call key.
        ttl_ms: i64,
    },
    /// Write. Adds `delta` to bucket `bucket` of group `group` in the bucketed
    /// counter `key`.
    Add {
        /// Key name.
        key: String,
        /// Bucket index (event time / bucket width).
        bucket: i64,
        /// Group, e.g. the provider id.
        group: String,
        /// Amount.
        delta: Val,
        /// Only if the integer result of this earlier op is non-zero.
        when: Option<usize>,
    },
    /// Read. Sum of buckets `from..=to` of `key`, in total and per group;
    /// deletes buckets older than `prune_before`.
    Sum {
        /// Key name.
        key: String,
        /// First bucket.
        from: i64,
        /// Last bucket.
        to: i64,
        /// Buckets below this are deleted.
        prune_before: i64,
    },
    /// Write. Records that `id` of `group` was seen at `ts` (keeps the
    /// latest time).
    Mark {
        /// Key name.
        key: String,
        /// Group, e.g. provider id.
        group: String,
        /// Member id, e.g. a customer token.
        id: String,
        /// Event time.
        ts: i64,
    },
    /// Read. Distinct ids seen at or after `since`: total distinct ids and
    /// distinct ids per group; deletes members last seen before
    /// `prune_before`.
    Distinct {
        /// Key name.
        key: String,
        /// Window start.
        since: i64,
        /// Members older than this are deleted.
        prune_before: i64,
    },
    /// Read. 1 if member (`group`, `id`) of `key` was seen at or after
    /// `since`, else 0 (a membership test against [`Op::Mark`]ed members).
    Has {
        /// Key name.
        key: String,
        /// Group of the member.
        group: String,
        /// Member id.
        id: String,
        /// Earliest time that counts.
        since: i64,
    },
    /// Write. Records the interval of call `id` (of `group`): the union of
    /// all observations (earliest start, latest end); `closed` once the call
    /// ended.
    Span {
        /// Key name.
        key: String,
        /// Call id.
        id: String,
        /// Group (provider).
        group: String,
        /// Call start.
        start: i64,
        /// Latest known time the call was up.
        end: i64,
        /// The call has ended.
        closed: bool,
    },
    /// Read. Number of calls up at `at`, in total and per group: closed
    /// spans with `start <= at <= end`, open spans with
    /// `start <= at <= end + open_horizon`. Deletes spans whose end (plus the
    /// horizon for open ones) is before `prune_before`.
    Overlap {
        /// Key name.
        key: String,
        /// Evaluation time.
        at: i64,
        /// How long an open call is assumed to continue after its last
        /// observation.
        open_horizon: i64,
        /// Spans ending before this are deleted.
        prune_before: i64,
    },
}

impl Op {
    /// True for ops that change state.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::CallMax { .. } | Op::Add { .. } | Op::Mark { .. } | Op::Span { .. }
        )
    }
}

/// Result of a read op over groups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Groups {
    /// Total (sum, distinct ids, or concurrent calls).
    pub total: i64,
    /// Per group.
    pub by: BTreeMap<String, i64>,
}

impl Groups {
    /// Adds `v` to group `grp` (allocating its name only the first time).
    fn add(&mut self, grp: &str, v: i64) {
        match self.by.get_mut(grp) {
            Some(n) => *n += v,
            None => {
                self.by.insert(grp.to_string(), v);
            }
        }
    }
}

/// Result of one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A write with no value.
    None,
    /// An integer (CallMax, Has).
    Int(i64),
    /// A grouped read.
    Groups(Groups),
}

impl OpResult {
    /// Integer value (0 unless `Int`).
    pub fn int(&self) -> i64 {
        match self {
            OpResult::Int(v) => *v,
            _ => 0,
        }
    }

    /// Groups (empty unless `Groups`).
    pub fn groups(&self) -> Groups {
        match self {
            OpResult::Groups(g) => g.clone(),
            _ => Groups::default(),
        }
    }
}

/// An atomic update of one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The scope.
    pub scope: Scope,
    /// Dedupe id (provider/event id): writes apply at most once per id.
    pub dedupe: String,
    /// TTL of every key written (ops with their own TTL aside).
    pub ttl_ms: i64,
    /// TTL of the dedupe marker: how long a re-delivery is recognised.
    pub dedupe_ttl_ms: i64,
    /// The ops, in order.
    pub ops: Vec<Op>,
}

/// Outcome of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The dedupe id had been applied before: no write happened.
    pub duplicate: bool,
    /// One result per op.
    pub results: Vec<OpResult>,
}

/// A compare-and-set of a small state value (incident state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    /// Scope.
    pub scope: Scope,
    /// Name within the scope.
    pub name: String,
    /// Expected current value (`None` = must be absent).
    pub expect: Option<String>,
    /// New value.
    pub value: String,
    /// TTL.
    pub ttl_ms: i64,
}

/// One input lane's progress as a correlator replica saw it (see
/// [`WindowStore::merge_lanes`]): a lane is one carrier's events in one
/// partition of the calls topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LaneMark {
    /// The lane, `<partition>|<carrier>`.
    pub lane: String,
    /// Highest event time seen on it (ms).
    pub event_time: i64,
    /// Wall time it was last seen (ms).
    pub seen: i64,
}

/// The reference semantics of [`WindowStore::merge_lanes`] over a table of
/// lane → (event time, seen): each reported lane keeps the higher of each
/// value, lanes not seen for `retain_ms` before `now` are dropped, and the
/// whole table is returned, sorted by lane.
pub fn merge_lane_table(
    table: &mut BTreeMap<String, (i64, i64)>,
    lanes: &[LaneMark],
    now: i64,
    retain_ms: i64,
) -> Vec<LaneMark> {
    for l in lanes {
        let e = table
            .entry(l.lane.clone())
            .or_insert((l.event_time, l.seen));
        e.0 = e.0.max(l.event_time);
        e.1 = e.1.max(l.seen);
    }
    table.retain(|_, (_, seen)| now - *seen <= retain_ms);
    table
        .iter()
        .map(|(lane, (event_time, seen))| LaneMark {
            lane: lane.clone(),
            event_time: *event_time,
            seen: *seen,
        })
        .collect()
}

/// Shared windowed state. Implementations must give identical results for
/// identical update sequences (the shared suite checks this).
#[async_trait]
pub trait WindowStore: Send + Sync + fmt::Debug {
    /// Applies updates in order (each atomically) and returns their outcomes.
    async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError>;
    /// Reads state values.
    async fn get_states(&self, keys: &[(Scope, String)])
    -> Result<Vec<Option<String>>, StoreError>;
    /// Compare-and-set of one state value; true if it was written.
    async fn cas_state(&self, write: &StateWrite) -> Result<bool, StoreError>;
    /// Compare-and-sets of several state values, each on its own exactly as
    /// [`WindowStore::cas_state`] and in order (a later write of the same
    /// key compares against the earlier one's result); one flag per write.
    /// Backends override it to save round trips. On error, some of the
    /// writes may have been applied.
    async fn cas_states(&self, writes: &[StateWrite]) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(self.cas_state(w).await?);
        }
        Ok(out)
    }
    /// Members of a consortium-wide set (e.g. the hot list).
    async fn set_members(&self, name: &str) -> Result<Vec<String>, StoreError>;
    /// Adds a member to a consortium-wide set; true if it was new.
    async fn set_add(&self, name: &str, member: &str) -> Result<bool, StoreError>;
    /// Merges `lanes` into the consortium-wide lane table `name`, which
    /// every correlator replica shares, and returns the whole table (see
    /// [`merge_lane_table`]: each lane keeps the highest event time and the
    /// latest wall time any replica reported; lanes not seen for
    /// `retain_ms` before `now`, wall time, are dropped). Atomic per call.
    /// The table lives `retain_ms` after its last merge.
    async fn merge_lanes(
        &self,
        name: &str,
        lanes: &[LaneMark],
        now: i64,
        retain_ms: i64,
    ) -> Result<Vec<LaneMark>, StoreError>;
    /// Checks the backend is reachable.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// A value of the memory store (and of a [`Keyspace`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A hash of integers: `CallMax` fields, `Add`/`Sum` buckets
    /// (`<bucket>|<group>`).
    Hash(HashMap<String, i64>),
    /// A sorted set of `Mark`ed members (`<group>|<id>`) with their time.
    ZSet(HashMap<String, i64>),
    /// Call intervals by call id: (start, end, closed, group).
    Spans(HashMap<String, (i64, i64, bool, String)>),
    /// A string (dedupe marker, state value).
    Str(String),
    /// A set (consortium-wide lists).
    Set(HashSet<String>),
}

/// A key's value and its expiry deadline (milliseconds on the store's
/// clock; `None` = never), in one map entry: one hash lookup per access.
#[derive(Debug, Clone)]
struct Slot {
    value: Value,
    expires: Option<i64>,
}

impl Slot {
    fn fresh(value: Value) -> Self {
        Self {
            value,
            expires: None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    data: HashMap<String, Slot>,
    /// Logical clock (event time) when set; wall clock otherwise.
    clock: Option<i64>,
    ops_since_sweep: usize,
    /// When journaling: the last TTL given to each key touched.
    touched: Option<HashMap<String, i64>>,
    /// Lane tables ([`WindowStore::merge_lanes`]), by key.
    lanes: HashMap<String, BTreeMap<String, (i64, i64)>>,
}

/// How much longer than its TTL a written key may live: a sixteenth of the
/// TTL (97 minutes of a 26-hour window, 19 s of a 5-minute marker). Within
/// it a key's deadline is not moved on every write (see `Inner::touch`).
pub fn ttl_slack(ttl_ms: i64) -> i64 {
    ttl_ms.max(1) / 16
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Inner {
    fn now(&self) -> i64 {
        self.clock.unwrap_or_else(wall_ms)
    }

    fn alive(&mut self, key: &str) -> bool {
        let now = self.now();
        match self.data.get(key) {
            Some(s) if s.expires.is_some_and(|t| t <= now) => {
                self.data.remove(key);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// The live value at `key` (an expired one is left for the sweep).
    fn live(&self, key: &str) -> Option<&Value> {
        let now = self.now();
        self.data
            .get(key)
            .filter(|s| s.expires.is_none_or(|t| t > now))
            .map(|s| &s.value)
    }

    /// Gives `key` (which exists: every caller has just written it; like
    /// `PEXPIRE`, a missing key gets none) a TTL of at least `ttl_ms`: a key
    /// whose deadline is already between `ttl_ms` and `ttl_ms` plus its
    /// [`ttl_slack`] from now keeps it; any other gets the upper end. So
    /// every key lives at least its TTL after each write and at most a
    /// sixteenth longer, and a key written again and again has its TTL
    /// re-sent to Redis (`PEXPIRE`) about once per slack, not per write.
    fn touch(&mut self, key: &str, ttl_ms: i64) {
        let now = self.now();
        let ttl = ttl_ms.max(1);
        let hi = ttl + ttl_slack(ttl);
        if let Some(s) = self.data.get_mut(key) {
            if s.expires.is_some_and(|d| d >= now + ttl && d <= now + hi) {
                return;
            }
            s.expires = Some(now + hi);
        }
        self.journal_ttl(key, hi);
    }

    /// Sets the TTL of `key` to exactly `ttl_ms` (state values, as
    /// `SET … PX`).
    fn expire_exact(&mut self, key: &str, ttl_ms: i64) {
        let ttl = ttl_ms.max(1);
        let deadline = self.now() + ttl;
        if let Some(s) = self.data.get_mut(key) {
            s.expires = Some(deadline);
        }
        self.journal_ttl(key, ttl);
    }

    fn journal_ttl(&mut self, key: &str, ttl: i64) {
        if let Some(t) = self.touched.as_mut() {
            match t.get_mut(key) {
                Some(v) => *v = ttl,
                None => {
                    t.insert(key.to_string(), ttl);
                }
            }
        }
    }

    /// The live value at `key`, created with `make` when absent or expired,
    /// and replaced by `make`'s when it holds another kind (`is` says which
    /// kinds fit).
    fn slot(&mut self, key: &str, make: fn() -> Value, is: fn(&Value) -> bool) -> &mut Value {
        let now = self.now();
        match self.data.get_mut(key) {
            Some(s) => {
                if s.expires.is_some_and(|t| t <= now) {
                    *s = Slot::fresh(make());
                } else if !is(&s.value) {
                    s.value = make();
                }
            }
            None => {
                self.data.insert(key.to_string(), Slot::fresh(make()));
            }
        }
        match self.data.get_mut(key) {
            Some(s) => &mut s.value,
            None => unreachable!("inserted above"),
        }
    }

    fn sweep(&mut self) {
        self.ops_since_sweep += 1;
        if self.ops_since_sweep < 10_000 {
            return;
        }
        self.ops_since_sweep = 0;
        let now = self.now();
        self.data.retain(|_, s| s.expires.is_none_or(|t| t > now));
    }

    fn hash(&mut self, key: &str) -> &mut HashMap<String, i64> {
        match self.slot(
            key,
            || Value::Hash(HashMap::default()),
            |v| matches!(v, Value::Hash(_)),
        ) {
            Value::Hash(h) => h,
            _ => unreachable!("slot makes the kind asked for"),
        }
    }

    fn zset(&mut self, key: &str) -> &mut HashMap<String, i64> {
        match self.slot(
            key,
            || Value::ZSet(HashMap::default()),
            |v| matches!(v, Value::ZSet(_)),
        ) {
            Value::ZSet(h) => h,
            _ => unreachable!("slot makes the kind asked for"),
        }
    }

    fn spans(&mut self, key: &str) -> &mut HashMap<String, (i64, i64, bool, String)> {
        match self.slot(
            key,
            || Value::Spans(HashMap::default()),
            |v| matches!(v, Value::Spans(_)),
        ) {
            Value::Spans(h) => h,
            _ => unreachable!("slot makes the kind asked for"),
        }
    }

    fn apply(&mut self, prefix: &str, u: &Update) -> Outcome {
        self.sweep();
        let marker = u.scope.key(prefix, &format!("ev:{}", u.dedupe));
        let duplicate = self.alive(&marker);
        if !duplicate {
            self.data
                .insert(marker.clone(), Slot::fresh(Value::Str("1".into())));
            self.touch(&marker, u.dedupe_ttl_ms);
        }
        let mut results: Vec<OpResult> = Vec::with_capacity(u.ops.len());
        for op in &u.ops {
            let r = if duplicate && op.is_write() {
                match op {
                    Op::CallMax { .. } => OpResult::Int(0),
                    _ => OpResult::None,
                }
            } else {
                self.op(prefix, u, op, &results)
            };
            results.push(r);
        }
        Outcome { duplicate, results }
    }

    fn op(&mut self, prefix: &str, u: &Update, op: &Op, prev: &[OpResult]) -> OpResult {
        let k = |name: &str| u.scope.key(prefix, name);
        match op {
            Op::CallMax {
                key,
                field,
                value,
                ttl_ms,
            } => {
                let key = k(key);
                let h = self.hash(&key);
                let old = h.get(field).copied().unwrap_or(0);
                let inc = (*value - old).max(0);
                if *value > old {
                    h.insert(field.clone(), *value);
                }
                self.touch(&key, *ttl_ms);
                OpResult::Int(inc)
            }
            Op::Add {
                key,
                bucket,
                group,
                delta,
                when,
            } => {
                let d = match delta {
                    Val::Const(v) => *v,
                    Val::Ref(i) => prev.get(*i).map(OpResult::int).unwrap_or(0),
                };
                let enabled = when.is_none_or(|w| prev.get(w).map(OpResult::int).unwrap_or(0) != 0);
                if d != 0 && enabled {
                    let key = k(key);
                    *self
                        .hash(&key)
                        .entry(format!("{bucket}|{group}"))
                        .or_insert(0) += d;
                    self.touch(&key, u.ttl_ms);
                }
                OpResult::None
            }
            Op::Sum {
                key,
                from,
                to,
                prune_before,
            } => {
                let key = k(key);
                if !self.alive(&key) {
                    return OpResult::Groups(Groups::default());
                }
                let h = self.hash(&key);
                let mut g = Groups::default();
                h.retain(|f, v| {
                    let (b, grp) = f.split_once('|').unwrap_or((f, ""));
                    let b: i64 = b.parse().unwrap_or(i64::MIN);
                    if b < *prune_before {
                        return false;
                    }
                    if b >= *from && b <= *to {
                        g.total += *v;
                        g.add(grp, *v);
                    }
                    true
                });
                OpResult::Groups(g)
            }
            Op::Mark { key, group, id, ts } => {
                let key = k(key);
                let z = self.zset(&key);
                let e = z.entry(format!("{group}|{id}")).or_insert(*ts);
                if *ts > *e {
                    *e = *ts;
                }
                self.touch(&key, u.ttl_ms);
                OpResult::None
            }
            Op::Distinct {
                key,
                since,
                prune_before,
            } => {
                let key = k(key);
                if !self.alive(&key) {
                    return OpResult::Groups(Groups::default());
                }
                let z = self.zset(&key);
                z.retain(|_, ts| *ts >= *prune_before);
                // Borrowed ids and group names: no allocation per member
                // (hot ranges hold thousands).
                let mut ids: HashSet<&str> = HashSet::default();
                let mut g = Groups::default();
                for (m, ts) in z.iter() {
                    if *ts >= *since {
                        let (grp, id) = m.split_once('|').unwrap_or(("", m));
                        ids.insert(id);
                        g.add(grp, 1);
                    }
                }
                g.total = ids.len() as i64;
                OpResult::Groups(g)
            }
            Op::Has {
                key,
                group,
                id,
                since,
            } => {
                let key = k(key);
                if !self.alive(&key) {
                    return OpResult::Int(0);
                }
                let z = self.zset(&key);
                let hit = z
                    .get(&format!("{group}|{id}"))
                    .is_some_and(|ts| *ts >= *since);
                OpResult::Int(hit as i64)
            }
            Op::Span {
                key,
                id,
                group,
                start,
                end,
                closed,
            } => {
                let key = k(key);
                let s = self.spans(&key);
                let e = s
                    .entry(id.clone())
                    .or_insert((*start, *end, *closed, group.clone()));
                e.0 = e.0.min(*start);
                e.1 = e.1.max(*end);
                e.2 |= *closed;
                self.touch(&key, u.ttl_ms);
                OpResult::None
            }
            Op::Overlap {
                key,
                at,
                open_horizon,
                prune_before,
            } => {
                let key = k(key);
                if !self.alive(&key) {
                    return OpResult::Groups(Groups::default());
                }
                let s = self.spans(&key);
                let mut g = Groups::default();
                s.retain(|_, (start, end, closed, grp)| {
                    let until = if *closed { *end } else { *end + *open_horizon };
                    if until < *prune_before {
                        return false;
                    }
                    if *start <= *at && *at <= until {
                        g.total += 1;
                        g.add(grp, 1);
                    }
                    true
                });
                OpResult::Groups(g)
            }
        }
    }
}

/// The op interpreter of [`MemoryStore`] over a private keyspace on the wall
/// clock, for a backend that runs the ops itself: it loads the keys an
/// update touches, applies the update here (so the results are the memory
/// store's by construction) and writes the difference back. It journals the
/// TTL given to every key written ([`Keyspace::take_touched`]).
#[derive(Debug, Default)]
pub struct Keyspace {
    inner: Inner,
}

impl Keyspace {
    /// An empty keyspace on the wall clock, journaling TTLs.
    pub fn new() -> Self {
        Self {
            inner: Inner {
                touched: Some(HashMap::default()),
                ..Inner::default()
            },
        }
    }

    /// Current time of the keyspace's clock (wall milliseconds).
    pub fn now(&self) -> i64 {
        self.inner.now()
    }

    /// Freezes the clock at `t` (wall milliseconds) until the next call, as
    /// time stands still inside a Redis script; `None` runs it again.
    pub fn freeze(&mut self, t: Option<i64>) {
        self.inner.clock = t;
    }

    /// Stores `value` at `key`, expiring at `deadline` (ms on the wall
    /// clock; `None` = never).
    pub fn load(&mut self, key: String, value: Value, deadline: Option<i64>) {
        self.inner.data.insert(
            key,
            Slot {
                value,
                expires: deadline,
            },
        );
    }

    /// The live value at `key`.
    pub fn get(&mut self, key: &str) -> Option<&Value> {
        self.inner.live(key)
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) {
        self.inner.data.remove(key);
    }

    /// Keys held (live or not yet swept).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.inner.data.keys()
    }

    /// Applies one update exactly as [`MemoryStore`] does; keys are
    /// `prefix` + scope tag + name.
    pub fn apply(&mut self, prefix: &str, u: &Update) -> Outcome {
        self.inner.apply(prefix, u)
    }

    /// The TTL last given to each key written since the previous call.
    pub fn take_touched(&mut self) -> HashMap<String, i64> {
        self.inner
            .touched
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// The in-memory window store of the embedded pipeline and of unit tests.
#[derive(Debug)]
pub struct MemoryStore {
    prefix: String,
    inner: Mutex<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new("tg:")
    }
}

impl MemoryStore {
    /// A store whose keys start with `prefix` (e.g. `tg:`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A store whose TTLs run on a logical clock (event time) advanced with
    /// [`MemoryStore::advance_clock`]: replaying days of history in minutes
    /// then keeps memory bounded exactly as Redis TTLs do in real time.
    pub fn with_event_clock(prefix: &str) -> Self {
        let s = Self::new(prefix);
        s.lock().clock = Some(0);
        s
    }

    /// Moves the logical clock forward to `t` (never backwards); no effect
    /// on a wall-clock store.
    pub fn advance_clock(&self, t: i64) {
        let mut g = self.lock();
        if let Some(c) = g.clock.as_mut() {
            *c = (*c).max(t);
        }
    }

    /// Number of live keys (for tests of TTL/pruning).
    pub fn key_count(&self) -> usize {
        let mut g = self.inner.lock().expect("store lock");
        let keys: Vec<String> = g.data.keys().cloned().collect();
        keys.iter().filter(|k| g.alive(k)).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-update; the data is still
        // structurally valid, so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl WindowStore for MemoryStore {
    async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError> {
        let mut g = self.lock();
        Ok(updates.iter().map(|u| g.apply(&self.prefix, u)).collect())
    }

    async fn get_states(
        &self,
        keys: &[(Scope, String)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let g = self.lock();
        Ok(keys
            .iter()
            .map(|(s, n)| {
                let k = s.key(&self.prefix, &format!("st:{n}"));
                match g.live(&k) {
                    Some(Value::Str(v)) => Some(v.clone()),
                    _ => None,
                }
            })
            .collect())
    }

    async fn cas_state(&self, w: &StateWrite) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let k = w.scope.key(&self.prefix, &format!("st:{}", w.name));
        let cur = match g.live(&k) {
            Some(Value::Str(v)) => Some(v.clone()),
            _ => None,
        };
        if cur != w.expect {
            return Ok(false);
        }
        g.data
            .insert(k.clone(), Slot::fresh(Value::Str(w.value.clone())));
        g.expire_exact(&k, w.ttl_ms);
        Ok(true)
    }

    async fn set_members(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let g = self.lock();
        let k = Scope::Global.key(&self.prefix, name);
        let mut v: Vec<String> = match g.data.get(&k).map(|s| &s.value) {
            Some(Value::Set(s)) => s.iter().cloned().collect(),
            _ => Vec::new(),
        };
        v.sort();
        Ok(v)
    }

    async fn set_add(&self, name: &str, member: &str) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let k = Scope::Global.key(&self.prefix, name);
        let e = &mut g
            .data
            .entry(k)
            .or_insert_with(|| Slot::fresh(Value::Set(HashSet::default())))
            .value;
        if let Value::Set(s) = e {
            Ok(s.insert(member.to_string()))
        } else {
            *e = Value::Set(HashSet::from_iter([member.to_string()]));
            Ok(true)
        }
    }

    async fn merge_lanes(
        &self,
        name: &str,
        lanes: &[LaneMark],
        now: i64,
        retain_ms: i64,
    ) -> Result<Vec<LaneMark>, StoreError> {
        let mut g = self.lock();
        let table = g
            .lanes
            .entry(Scope::Global.key(&self.prefix, name))
            .or_default();
        Ok(merge_lane_table(table, lanes, now, retain_ms))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_max(dedupe: &str, value: i64, ttl_ms: i64) -> Update {
        Update {
            scope: Scope::Customer("t".into()),
            dedupe: dedupe.into(),
            ttl_ms: 160_000,
            dedupe_ttl_ms: 32_000,
            ops: vec![Op::CallMax {
                key: "call:x".into(),
                field: "s".into(),
                value,
                ttl_ms,
            }],
        }
    }

    #[test]
    fn a_key_written_again_within_its_slack_keeps_its_deadline_and_a_shorter_ttl_still_applies() {
        const T0: i64 = 1_700_000_000_000;
        let key = "{c:t}:call:x";
        let mut ks = Keyspace::new();
        ks.freeze(Some(T0));
        ks.apply("", &call_max("e1", 1, 160_000));
        let t = ks.take_touched();
        assert_eq!(t.get(key), Some(&170_000), "TTL plus a sixteenth: {t:?}");
        assert_eq!(t.get("{c:t}:ev:e1"), Some(&34_000), "the marker too");
        // Written again 5 s later (within the 10 s slack): no new TTL, and
        // the key still lives 160 s after this write.
        ks.freeze(Some(T0 + 5_000));
        ks.apply("", &call_max("e2", 2, 160_000));
        let t = ks.take_touched();
        assert_eq!(t.get(key), None, "{t:?}");
        ks.freeze(Some(T0 + 5_000 + 160_000));
        assert!(ks.get(key).is_some());
        ks.freeze(Some(T0 + 170_000));
        assert!(ks.get(key).is_none(), "gone at the deadline set first");
        // Beyond the slack: the deadline moves again.
        let mut ks = Keyspace::new();
        ks.freeze(Some(T0));
        ks.apply("", &call_max("e1", 1, 160_000));
        ks.take_touched();
        ks.freeze(Some(T0 + 11_000));
        ks.apply("", &call_max("e2", 2, 160_000));
        assert_eq!(ks.take_touched().get(key), Some(&170_000));
        // A shorter TTL (a call's end) shortens the deadline.
        ks.freeze(Some(T0 + 12_000));
        ks.apply("", &call_max("e3", 3, 1_600));
        assert_eq!(ks.take_touched().get(key), Some(&1_700));
        ks.freeze(Some(T0 + 12_000 + 1_700));
        assert!(ks.get(key).is_none());
    }
}
