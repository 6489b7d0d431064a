//! The shared window-store suite (DESIGN §5): every test below runs once
//! against the embedded [`MemoryStore`] (module `on_memory`) and once against
//! [`RedisStore`] on the real server at `TOLLGUARD_REDIS_URL` (module
//! `on_redis`), and a proptest checks that the two return identical outcomes
//! for random update sequences, re-sent duplicates included.
//!
//! The Redis variants never skip: without `TOLLGUARD_REDIS_URL` they fail and
//! say how to start Redis. Each test uses its own key prefix
//! (`tgtest:<test>:<random>:`), so runs never collide; every key it writes
//! carries a TTL (the consortium sets, which have none, are deleted at the
//! end of their test).
//!
//! With `TOLLGUARD_REDIS_CLUSTER_NODES` (comma-separated node URLs) the
//! Redis variants run against a Redis Cluster through
//! [`RedisStore::connect_cluster`] instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use tollguard_core::StoreError;
use tollguard_core::store::{
    Groups, LaneMark, MemoryStore, Op, OpResult, Outcome, Scope, StateWrite, Update, Val,
    WindowStore, ttl_slack,
};
use tollguard_runtime::redis_store::RedisStore;

/// TTL of the updates (ms).
const TTL: i64 = 60_000;
/// TTL of the per-call keys of CallMax (ms).
const CALL_TTL: i64 = 30_000;
/// TTL of the dedupe markers in the suite (shorter than every other).
const DEDUPE_TTL: i64 = 20_000;
/// A realistic event time (ms): values this large must survive Lua exactly.
const T0: i64 = 1_700_000_000_000;

fn t(offset: i64) -> i64 {
    T0 + offset
}

fn redis_url() -> String {
    std::env::var("TOLLGUARD_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "TOLLGUARD_REDIS_URL is not set, so the Redis variants of the store suite cannot \
             run (they never skip). Start the local services and load their environment:\n  \
             deploy/local/services.sh start\n  eval \"$(deploy/local/services.sh env)\""
        )
    })
}

fn unique_prefix(test: &str) -> String {
    format!("tgtest:{test}:{:016x}:", rand::random::<u64>())
}

/// Seed nodes of a Redis Cluster (comma-separated URLs) to run the Redis
/// variants against instead of the single node at `TOLLGUARD_REDIS_URL`.
fn cluster_nodes() -> Option<Vec<String>> {
    let v = std::env::var("TOLLGUARD_REDIS_CLUSTER_NODES").ok()?;
    let nodes: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

async fn connect_redis(prefix: &str) -> RedisStore {
    let res = match cluster_nodes() {
        Some(nodes) => RedisStore::connect_cluster(&nodes, prefix).await,
        None => RedisStore::connect(&redis_url(), prefix).await,
    };
    res.unwrap_or_else(|e| {
        panic!(
            "cannot connect the Redis store ({e}): run `deploy/local/services.sh start` and \
             `eval \"$(deploy/local/services.sh env)\"`"
        )
    })
}

/// A plain connection to inspect the server behind the store.
#[derive(Clone)]
enum Raw {
    Single(redis::aio::MultiplexedConnection),
    /// Commands go through the cluster client; SCAN runs on every node.
    Cluster {
        conn: redis::cluster_async::ClusterConnection,
        nodes: Vec<redis::aio::MultiplexedConnection>,
    },
}

async fn plain(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("a valid Redis URL");
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot reach Redis at {url} ({e}): run `deploy/local/services.sh start`")
        })
}

impl Raw {
    async fn connect() -> Self {
        match cluster_nodes() {
            Some(seeds) => {
                let conn = redis::cluster::ClusterClient::new(seeds.clone())
                    .expect("cluster client")
                    .get_async_connection()
                    .await
                    .expect("cluster connection");
                let mut nodes = Vec::new();
                for n in &seeds {
                    nodes.push(plain(n).await);
                }
                Raw::Cluster { conn, nodes }
            }
            None => Raw::Single(plain(&redis_url()).await),
        }
    }

    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        let r = match self {
            Raw::Single(c) => cmd.query_async(c).await,
            Raw::Cluster { conn, .. } => cmd.query_async(conn).await,
        };
        r.unwrap_or_else(|e| panic!("raw Redis command failed: {e}"))
    }

    /// Every key under `prefix`, by `SCAN MATCH` (never `KEYS`: the server
    /// is shared), sorted.
    async fn scan(&self, prefix: &str) -> Vec<String> {
        let conns = match self {
            Raw::Single(c) => vec![c.clone()],
            Raw::Cluster { nodes, .. } => nodes.clone(),
        };
        let mut keys = Vec::new();
        for mut c in conns {
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{prefix}*"))
                    .arg("COUNT")
                    .arg(10_000)
                    .query_async(&mut c)
                    .await
                    .expect("SCAN");
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

/// The store under test plus what the backend-specific checks need.
struct Harness {
    prefix: String,
    store: Arc<dyn WindowStore>,
    backend: Backend,
    seq: AtomicU64,
}

enum Backend {
    /// On a logical clock starting at 0: TTLs only run out when the test
    /// advances the clock.
    Memory(Arc<MemoryStore>),
    /// A raw connection to inspect keys and TTLs.
    Redis(Raw),
}

impl Harness {
    fn memory(test: &str) -> Self {
        let prefix = unique_prefix(test);
        let m = Arc::new(MemoryStore::with_event_clock(&prefix));
        Self {
            store: m.clone(),
            backend: Backend::Memory(m),
            prefix,
            seq: AtomicU64::new(0),
        }
    }

    async fn redis(test: &str) -> Self {
        let prefix = unique_prefix(test);
        let store = connect_redis(&prefix).await;
        Self {
            store: Arc::new(store),
            backend: Backend::Redis(Raw::connect().await),
            prefix,
            seq: AtomicU64::new(0),
        }
    }

    fn store(&self) -> &dyn WindowStore {
        &*self.store
    }

    async fn apply(&self, updates: &[Update]) -> Vec<Outcome> {
        let out = self.store.apply(updates).await.expect("apply");
        assert_eq!(out.len(), updates.len(), "one outcome per update");
        out
    }

    /// Applies `ops` under a fresh dedupe id; returns the results.
    async fn run(&self, scope: &Scope, ops: Vec<Op>) -> Vec<OpResult> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let u = update(scope, &format!("kpn/auto-{n}"), ops);
        let mut out = self.apply(std::slice::from_ref(&u)).await;
        let o = out.pop().expect("one outcome");
        assert!(!o.duplicate, "a fresh dedupe id is never a duplicate");
        assert_eq!(o.results.len(), u.ops.len(), "one result per op");
        o.results
    }

    /// Applies one read op under a fresh dedupe id; returns its result.
    async fn read(&self, scope: &Scope, op: Op) -> OpResult {
        self.run(scope, vec![op]).await.remove(0)
    }
}

fn update(scope: &Scope, dedupe: &str, ops: Vec<Op>) -> Update {
    Update {
        scope: scope.clone(),
        dedupe: dedupe.to_string(),
        ttl_ms: TTL,
        dedupe_ttl_ms: DEDUPE_TTL,
        ops,
    }
}

fn cust() -> Scope {
    Scope::Customer("k1:abc".into())
}

fn range() -> Scope {
    Scope::Range("+67077".into())
}

fn call_max(key: &str, field: &str, value: i64) -> Op {
    Op::CallMax {
        key: key.into(),
        field: field.into(),
        value,
        ttl_ms: CALL_TTL,
    }
}

fn add(key: &str, bucket: i64, group: &str, delta: Val) -> Op {
    Op::Add {
        key: key.into(),
        bucket,
        group: group.into(),
        delta,
        when: None,
    }
}

fn add_when(key: &str, bucket: i64, group: &str, delta: Val, when: usize) -> Op {
    Op::Add {
        key: key.into(),
        bucket,
        group: group.into(),
        delta,
        when: Some(when),
    }
}

fn sum(key: &str, from: i64, to: i64, prune_before: i64) -> Op {
    Op::Sum {
        key: key.into(),
        from,
        to,
        prune_before,
    }
}

fn mark(key: &str, group: &str, id: &str, ts: i64) -> Op {
    Op::Mark {
        key: key.into(),
        group: group.into(),
        id: id.into(),
        ts,
    }
}

fn distinct(key: &str, since: i64, prune_before: i64) -> Op {
    Op::Distinct {
        key: key.into(),
        since,
        prune_before,
    }
}

fn has(key: &str, group: &str, id: &str, since: i64) -> Op {
    Op::Has {
        key: key.into(),
        group: group.into(),
        id: id.into(),
        since,
    }
}

fn span(key: &str, id: &str, group: &str, start: i64, end: i64, closed: bool) -> Op {
    Op::Span {
        key: key.into(),
        id: id.into(),
        group: group.into(),
        start,
        end,
        closed,
    }
}

fn overlap(key: &str, at: i64, open_horizon: i64, prune_before: i64) -> Op {
    Op::Overlap {
        key: key.into(),
        at,
        open_horizon,
        prune_before,
    }
}

/// A grouped result.
fn g(total: i64, by: &[(&str, i64)]) -> OpResult {
    OpResult::Groups(Groups {
        total,
        by: by.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    })
}

fn int(v: i64) -> OpResult {
    OpResult::Int(v)
}

const NONE: OpResult = OpResult::None;

// ---------------------------------------------------------------------------
// The shared tests.

/// CallMax returns the increase over the previous maximum (absent = 0),
/// never a negative number, per key and field and scope.
async fn call_max_returns_the_increase_never_negative(h: &Harness) {
    let c = cust();
    assert_eq!(
        h.run(
            &c,
            vec![call_max("call:a", "s", 5), call_max("call:a", "n", 1)]
        )
        .await,
        vec![int(5), int(1)]
    );
    assert_eq!(
        h.run(&c, vec![call_max("call:a", "s", 3)]).await,
        vec![int(0)]
    );
    assert_eq!(
        h.run(&c, vec![call_max("call:a", "s", 8)]).await,
        vec![int(3)]
    );
    assert_eq!(
        h.run(&c, vec![call_max("call:a", "s", 8)]).await,
        vec![int(0)]
    );
    // A negative first observation is no increase, and is not stored.
    assert_eq!(
        h.run(&c, vec![call_max("call:b", "s", -4)]).await,
        vec![int(0)]
    );
    assert_eq!(
        h.run(&c, vec![call_max("call:b", "s", 2)]).await,
        vec![int(2)]
    );
    // Several observations in one update apply in order.
    assert_eq!(
        h.run(
            &c,
            vec![
                call_max("call:c", "s", 10),
                call_max("call:c", "s", 12),
                call_max("call:c", "s", 11)
            ]
        )
        .await,
        vec![int(10), int(2), int(0)]
    );
    // Another scope has its own keys.
    assert_eq!(
        h.run(&range(), vec![call_max("call:a", "s", 5)]).await,
        vec![int(5)]
    );
    // Millisecond-sized values stay exact.
    assert_eq!(
        h.run(&c, vec![call_max("call:d", "s", T0)]).await,
        vec![int(T0)]
    );
    assert_eq!(
        h.run(&c, vec![call_max("call:d", "s", T0 + 1)]).await,
        vec![int(1)]
    );
}

/// Add takes constants or the integer result of an earlier op (0 for a
/// missing, later or non-integer op), honours `when`, and a zero delta
/// creates nothing.
async fn add_follows_refs_and_conditions(h: &Harness) {
    let c = cust();
    let r = h
        .run(
            &c,
            vec![
                call_max("call:x", "s", 7),                   // 0 -> 7
                has("hl", "n", "nobody", 0),                  // 1 -> 0
                add("sh", 1, "kpn", Val::Ref(0)),             // +7
                add("sh", 1, "kpn", Val::Ref(1)),             // 0: nothing
                add_when("sh", 1, "bt", Val::Const(3), 0),    // op 0 is 7: +3
                add_when("sh", 1, "odido", Val::Const(4), 1), // op 1 is 0: skipped
                add("sh", 2, "kpn", Val::Ref(8)),             // a later op: 0
                add("sh", 2, "kpn", Val::Ref(99)),            // no such op: 0
                sum("sh", 0, 10, 0),                          // 10
                add("sh", 3, "kpn", Val::Ref(8)),             // a grouped result: 0
                add("sh", 3, "kpn", Val::Const(-2)),          // negative is fine
                add_when("sh", 3, "bt", Val::Const(1), 8),    // a grouped result: skipped
                sum("sh", 0, 10, 0),                          // 8
            ],
        )
        .await;
    assert_eq!(
        r,
        vec![
            int(7),
            int(0),
            NONE,
            NONE,
            NONE,
            NONE,
            NONE,
            NONE,
            g(10, &[("kpn", 7), ("bt", 3)]),
            NONE,
            NONE,
            NONE,
            g(8, &[("kpn", 5), ("bt", 3)]),
        ]
    );
    // A zero delta creates no field (a field would show up as a group).
    let r = h
        .run(
            &c,
            vec![add("zero", 1, "kpn", Val::Const(0)), sum("zero", 0, 10, 0)],
        )
        .await;
    assert_eq!(r, vec![NONE, g(0, &[])]);
}

/// Sum adds buckets `from..=to` in total and per group, and deletes buckets
/// below `prune_before` before counting.
async fn sum_windows_groups_and_prunes(h: &Harness) {
    let r = range();
    let k = "sh";
    let far = -1_000;
    h.run(
        &r,
        vec![
            add(k, 10, "kpn", Val::Const(5)),
            add(k, 11, "bt", Val::Const(7)),
            add(k, 12, "kpn", Val::Const(1)),
            add(k, 20, "odido", Val::Const(100)),
            add(k, -5, "kpn", Val::Const(3)),
            add(k, 30, "a|b", Val::Const(2)),
        ],
    )
    .await;
    assert_eq!(
        h.read(&r, sum(k, 10, 12, far)).await,
        g(13, &[("kpn", 6), ("bt", 7)])
    );
    assert_eq!(h.read(&r, sum(k, 11, 11, far)).await, g(7, &[("bt", 7)]));
    assert_eq!(h.read(&r, sum(k, 13, 19, far)).await, g(0, &[]));
    assert_eq!(h.read(&r, sum(k, -10, 0, far)).await, g(3, &[("kpn", 3)]));
    // A group may contain '|': the field splits at the first one.
    assert_eq!(h.read(&r, sum(k, 30, 30, far)).await, g(2, &[("a|b", 2)]));
    // Pruning deletes buckets -5 and 10 even though the window covers them.
    let all = g(110, &[("bt", 7), ("kpn", 1), ("odido", 100), ("a|b", 2)]);
    assert_eq!(h.read(&r, sum(k, -100, 100, 11)).await, all);
    assert_eq!(h.read(&r, sum(k, -100, 100, far)).await, all);
    assert_eq!(h.read(&r, sum(k, 0, 100, 21)).await, g(2, &[("a|b", 2)]));
    // Adds accumulate per bucket and group.
    h.run(
        &r,
        vec![
            add(k, 30, "a|b", Val::Const(3)),
            add(k, 30, "kpn", Val::Const(4)),
        ],
    )
    .await;
    assert_eq!(
        h.read(&r, sum(k, 30, 30, far)).await,
        g(9, &[("a|b", 5), ("kpn", 4)])
    );
    // Large amounts stay exact.
    for _ in 0..2 {
        h.run(&r, vec![add(k, 40, "kpn", Val::Const(1_000_000_000_001))])
            .await;
    }
    assert_eq!(
        h.read(&r, sum(k, 40, 40, far)).await,
        g(2_000_000_000_002, &[("kpn", 2_000_000_000_002)])
    );
    // A missing key is an empty result.
    assert_eq!(h.read(&r, sum("nothing", 0, 100, far)).await, g(0, &[]));
    assert_eq!(h.read(&cust(), sum(k, 0, 100, far)).await, g(0, &[]));
}

/// Mark keeps the latest time per (group, id); Distinct counts distinct ids
/// in total and ids per group since a time, pruning old members; Has tests
/// one member.
async fn mark_distinct_and_has(h: &Harness) {
    let c = cust();
    let k = "hl";
    h.run(
        &c,
        vec![
            mark(k, "kpn", "x", t(100)),
            mark(k, "bt", "x", t(105)),
            mark(k, "kpn", "y", t(90)),
            mark(k, "odido", "z", t(110)),
        ],
    )
    .await;
    // x under two groups is one distinct id, counted in each group.
    assert_eq!(
        h.read(&c, distinct(k, t(0), t(0))).await,
        g(3, &[("kpn", 2), ("bt", 1), ("odido", 1)])
    );
    assert_eq!(
        h.read(&c, distinct(k, t(100), t(0))).await,
        g(2, &[("kpn", 1), ("bt", 1), ("odido", 1)])
    );
    // The latest time wins; an older mark does not move it back.
    let r = h
        .run(
            &c,
            vec![
                mark(k, "kpn", "y", t(95)),
                mark(k, "kpn", "y", t(80)),
                has(k, "kpn", "y", t(95)),
                has(k, "kpn", "y", t(96)),
                has(k, "bt", "y", t(0)),
                has("nothing", "kpn", "x", t(0)),
                distinct(k, t(95), t(0)),
            ],
        )
        .await;
    assert_eq!(
        r,
        vec![
            NONE,
            NONE,
            int(1),
            int(0),
            int(0),
            int(0),
            g(3, &[("kpn", 2), ("bt", 1), ("odido", 1)]),
        ]
    );
    // Pruning deletes members last seen before prune_before.
    assert_eq!(
        h.read(&c, distinct(k, t(0), t(100))).await,
        g(2, &[("kpn", 1), ("bt", 1), ("odido", 1)])
    );
    assert_eq!(
        h.read(&c, distinct(k, t(0), t(0))).await,
        g(2, &[("kpn", 1), ("bt", 1), ("odido", 1)])
    );
    assert_eq!(h.read(&c, has(k, "kpn", "y", t(0))).await, int(0));
    // An id may contain '|': the member splits at the first one.
    h.run(
        &c,
        vec![
            mark("pk", "kpn", "p|q", t(200)),
            mark("pk", "bt", "p|q", t(201)),
        ],
    )
    .await;
    assert_eq!(
        h.read(&c, distinct("pk", t(0), t(0))).await,
        g(1, &[("kpn", 1), ("bt", 1)])
    );
    assert_eq!(h.read(&c, has("pk", "kpn", "p|q", t(200))).await, int(1));
    // A missing key is an empty result.
    assert_eq!(h.read(&c, distinct("nothing", t(0), t(0))).await, g(0, &[]));
}

/// Span keeps the union of a call's observations (earliest start, latest
/// end, closed once closed, the first group); Overlap counts calls up at a
/// time (open ones up to end + horizon) and prunes finished ones.
async fn span_and_overlap(h: &Harness) {
    let c = cust();
    let k = "sp";
    h.run(
        &c,
        vec![
            span(k, "a", "kpn", t(100), t(150), false),
            span(k, "b", "bt", t(120), t(200), true),
        ],
    )
    .await;
    let at = |x: i64, horizon: i64| overlap(k, t(x), horizon, t(0));
    assert_eq!(h.read(&c, at(160, 0)).await, g(1, &[("bt", 1)]));
    assert_eq!(
        h.read(&c, at(160, 20)).await,
        g(2, &[("kpn", 1), ("bt", 1)])
    );
    assert_eq!(
        h.read(&c, at(170, 20)).await,
        g(2, &[("kpn", 1), ("bt", 1)])
    );
    assert_eq!(h.read(&c, at(171, 20)).await, g(1, &[("bt", 1)]));
    assert_eq!(h.read(&c, at(100, 0)).await, g(1, &[("kpn", 1)]));
    assert_eq!(h.read(&c, at(99, 0)).await, g(0, &[]));
    assert_eq!(h.read(&c, at(200, 0)).await, g(1, &[("bt", 1)]));
    // The horizon extends only the open span.
    assert_eq!(h.read(&c, at(201, 0)).await, g(0, &[]));
    assert_eq!(h.read(&c, at(201, 1_000)).await, g(1, &[("kpn", 1)]));
    // Union: a later observation extends the end, keeps the first group.
    h.run(&c, vec![span(k, "a", "bt", t(110), t(180), false)])
        .await;
    assert_eq!(h.read(&c, at(175, 0)).await, g(2, &[("kpn", 1), ("bt", 1)]));
    // An earlier start extends it back; closed sticks; the end never shrinks.
    h.run(&c, vec![span(k, "a", "kpn", t(90), t(170), true)])
        .await;
    assert_eq!(h.read(&c, at(90, 0)).await, g(1, &[("kpn", 1)]));
    assert_eq!(h.read(&c, at(180, 0)).await, g(2, &[("kpn", 1), ("bt", 1)]));
    assert_eq!(h.read(&c, at(185, 1_000)).await, g(1, &[("bt", 1)]));
    // Pruning: a (closed, ends 180) goes, b (ends 200) stays.
    assert_eq!(h.read(&c, overlap(k, t(0), 0, t(190))).await, g(0, &[]));
    assert_eq!(h.read(&c, at(150, 0)).await, g(1, &[("bt", 1)]));
    // An open span is kept while end + horizon >= prune_before.
    h.run(&c, vec![span(k, "c", "odido", t(300), t(300), false)])
        .await;
    assert_eq!(h.read(&c, overlap(k, t(0), 10, t(310))).await, g(0, &[]));
    assert_eq!(h.read(&c, at(305, 10)).await, g(1, &[("odido", 1)]));
    assert_eq!(h.read(&c, overlap(k, t(0), 9, t(310))).await, g(0, &[]));
    assert_eq!(h.read(&c, at(305, 10)).await, g(0, &[]));
    // Any group string survives the span encoding.
    h.run(&c, vec![span("sp2", "d", "x,y|z", t(1), t(1), true)])
        .await;
    assert_eq!(
        h.read(&c, overlap("sp2", t(1), 0, t(0))).await,
        g(1, &[("x,y|z", 1)])
    );
    // A missing key is an empty result.
    assert_eq!(
        h.read(&c, overlap("nothing", t(1), 0, t(0))).await,
        g(0, &[])
    );
}

/// A re-delivered event (same dedupe id in the same scope) changes nothing
/// but still gets its reads; CallMax then reports no increase.
async fn duplicates_skip_writes_but_answer_reads(h: &Harness) {
    let c = cust();
    let u = update(
        &c,
        "kpn/ev-1",
        vec![
            call_max("call:c", "s", 50),                    // 0
            add("sh", 1, "kpn", Val::Ref(0)),               // 1
            mark("hl", "kpn", "l1", t(100)),                // 2
            span("sp", "c1", "kpn", t(100), t(110), false), // 3
            sum("sh", 0, 10, 0),                            // 4
            distinct("hl", t(0), t(0)),                     // 5
            overlap("sp", t(105), 0, t(0)),                 // 6
            has("hl", "kpn", "l1", t(0)),                   // 7: a read, runs on a duplicate
            add_when("sh", 2, "bt", Val::Const(5), 7),      // 8: a write, does not
            sum("sh", 0, 10, 0),                            // 9
        ],
    );
    let first = h.apply(std::slice::from_ref(&u)).await.remove(0);
    assert_eq!(
        first,
        Outcome {
            duplicate: false,
            results: vec![
                int(50),
                NONE,
                NONE,
                NONE,
                g(50, &[("kpn", 50)]),
                g(1, &[("kpn", 1)]),
                g(1, &[("kpn", 1)]),
                int(1),
                NONE,
                g(55, &[("kpn", 50), ("bt", 5)]),
            ],
        }
    );
    let again = h.apply(std::slice::from_ref(&u)).await.remove(0);
    assert_eq!(
        again,
        Outcome {
            duplicate: true,
            results: vec![
                int(0),
                NONE,
                NONE,
                NONE,
                g(55, &[("kpn", 50), ("bt", 5)]),
                g(1, &[("kpn", 1)]),
                g(1, &[("kpn", 1)]),
                int(1),
                NONE,
                g(55, &[("kpn", 50), ("bt", 5)]),
            ],
        }
    );
    // Same id, different writes: still nothing is written.
    let other = update(
        &c,
        "kpn/ev-1",
        vec![
            call_max("call:c", "s", 80),
            mark("hl", "kpn", "l2", t(100)),
            span("sp", "c2", "bt", t(100), t(110), false),
            distinct("hl", t(0), t(0)),
            overlap("sp", t(105), 0, t(0)),
            call_max("call:c", "s", 80),
        ],
    );
    assert_eq!(
        h.apply(&[other]).await.remove(0),
        Outcome {
            duplicate: true,
            results: vec![
                int(0),
                NONE,
                NONE,
                g(1, &[("kpn", 1)]),
                g(1, &[("kpn", 1)]),
                int(0)
            ],
        }
    );
    // The maximum stayed at 50.
    assert_eq!(
        h.run(&c, vec![call_max("call:c", "s", 80)]).await,
        vec![int(30)]
    );
    // A new event and a re-delivered one in one batch of the same scope:
    // the new one applies once (on Redis the first commit meets the old
    // marker, drops the new one's marker it had just set, and goes round
    // again), the re-delivered one stays a duplicate.
    let fresh = update(&c, "kpn/ev-9", vec![call_max("call:n", "s", 7)]);
    let old = update(&c, "kpn/ev-1", vec![call_max("call:n", "s", 9)]);
    assert_eq!(
        h.apply(&[fresh.clone(), old]).await,
        vec![
            Outcome {
                duplicate: false,
                results: vec![int(7)]
            },
            Outcome {
                duplicate: true,
                results: vec![int(0)]
            },
        ]
    );
    assert_eq!(
        h.apply(&[fresh]).await.remove(0),
        Outcome {
            duplicate: true,
            results: vec![int(0)]
        },
        "the new event's marker was kept"
    );
    assert_eq!(
        h.run(&c, vec![call_max("call:n", "s", 8)]).await,
        vec![int(1)],
        "applied once: the maximum is 7"
    );
    // The marker is per scope: the same id in another scope is new.
    let elsewhere = update(&range(), "kpn/ev-1", vec![call_max("call:c", "s", 50)]);
    assert_eq!(
        h.apply(&[elsewhere]).await.remove(0),
        Outcome {
            duplicate: false,
            results: vec![int(50)]
        }
    );
    // Within one batch, the second copy is the duplicate.
    let v = update(&c, "kpn/ev-2", vec![call_max("call:e", "s", 9)]);
    assert_eq!(
        h.apply(&[v.clone(), v]).await,
        vec![
            Outcome {
                duplicate: false,
                results: vec![int(9)]
            },
            Outcome {
                duplicate: true,
                results: vec![int(0)]
            },
        ]
    );
}

/// Every key written carries its TTL plus its slack (`ttl_slack`): the
/// update's dedupe TTL for the marker, its TTL for the scope keys, CallMax's
/// own for the call key; a state exactly its own (on Redis also the scope's
/// version key, the longest TTL written with it).
/// Reads and zero deltas create no key. All keys of a scope share its tag.
async fn every_key_written_expires(h: &Harness) {
    let c = cust();
    h.run(
        &c,
        vec![
            call_max("call:c", "s", 5),
            add("sh", 1, "kpn", Val::Ref(0)),
            add("zero", 1, "kpn", Val::Const(0)),
            mark("hl", "kpn", "l1", t(10)),
            span("sp", "c", "kpn", t(1), t(2), false),
            sum("r1", 0, 10, 0),
            distinct("r2", 0, 0),
            overlap("r3", 0, 0, 0),
            has("r4", "kpn", "l1", 0),
        ],
    )
    .await;
    let state = StateWrite {
        scope: c.clone(),
        name: "inc:x".into(),
        expect: None,
        value: "open".into(),
        ttl_ms: 45_000,
    };
    assert!(h.store().cas_state(&state).await.unwrap());

    match &h.backend {
        Backend::Memory(m) => {
            // marker, call:c, sh, hl, sp, st:inc:x. A written key lives its
            // TTL plus its slack (a sixteenth), a state exactly its TTL.
            let life = |ttl: i64| ttl + ttl_slack(ttl);
            assert_eq!(m.key_count(), 6);
            m.advance_clock(life(DEDUPE_TTL) - 1);
            assert_eq!(m.key_count(), 6);
            m.advance_clock(life(DEDUPE_TTL));
            assert_eq!(m.key_count(), 5, "the marker expires after the dedupe TTL");
            m.advance_clock(life(CALL_TTL) - 1);
            assert_eq!(m.key_count(), 5);
            m.advance_clock(life(CALL_TTL));
            assert_eq!(m.key_count(), 4, "the call key expires after its own TTL");
            m.advance_clock(45_000 - 1);
            assert_eq!(m.key_count(), 4);
            m.advance_clock(45_000);
            assert_eq!(m.key_count(), 3, "the state expires after its TTL");
            m.advance_clock(life(TTL) - 1);
            assert_eq!(m.key_count(), 3);
            m.advance_clock(life(TTL));
            assert_eq!(m.key_count(), 0, "every key expires");
        }
        Backend::Redis(raw) => {
            let mut raw = raw.clone();
            let base = format!("{}{{c:k1:abc}}:", h.prefix);
            let keys = raw.scan(&h.prefix).await;
            let mut expected: Vec<String> = [
                "ev:kpn/auto-0",
                "call:c",
                "sh",
                "hl",
                "sp",
                "st:inc:x",
                "ver",
            ]
            .iter()
            .map(|n| format!("{base}{n}"))
            .collect();
            expected.sort();
            assert_eq!(
                keys, expected,
                "exactly these keys, all in the scope's slot"
            );
            // Generous lower bounds: a slow machine may take seconds.
            for k in &keys {
                let pttl: i64 = raw.query(redis::cmd("PTTL").arg(k)).await;
                let life = |ttl: i64| (ttl + ttl_slack(ttl) - 10_000, ttl + ttl_slack(ttl));
                let (lo, hi) = if k.ends_with(":call:c") {
                    life(CALL_TTL)
                } else if k.contains(":ev:") {
                    life(DEDUPE_TTL)
                } else if k.ends_with(":st:inc:x") {
                    (35_000, 45_000)
                } else {
                    life(TTL)
                };
                assert!(
                    pttl > lo && pttl <= hi,
                    "{k}: PTTL {pttl} not in ({lo}, {hi}]"
                );
            }
        }
    }
}

/// cas_state writes only when the current value is the expected one
/// (`None` = absent); get_states reads several in order.
async fn cas_state_compares_then_sets(h: &Harness) {
    let s = h.store();
    let c = cust();
    let w = |expect: Option<&str>, value: &str| StateWrite {
        scope: c.clone(),
        name: "inc:x".into(),
        expect: expect.map(str::to_string),
        value: value.into(),
        ttl_ms: TTL,
    };
    let key = vec![(c.clone(), "inc:x".to_string())];
    let read = || s.get_states(&key);
    assert_eq!(read().await.unwrap(), vec![None]);
    assert!(
        !s.cas_state(&w(Some("v0"), "v1")).await.unwrap(),
        "expects a value, none there"
    );
    assert_eq!(read().await.unwrap(), vec![None]);
    assert!(
        s.cas_state(&w(None, "v1")).await.unwrap(),
        "absent as expected"
    );
    assert_eq!(read().await.unwrap(), vec![Some("v1".to_string())]);
    assert!(
        !s.cas_state(&w(None, "v2")).await.unwrap(),
        "expects absent, v1 there"
    );
    assert!(
        !s.cas_state(&w(Some("wrong"), "v2")).await.unwrap(),
        "wrong expectation"
    );
    assert_eq!(read().await.unwrap(), vec![Some("v1".to_string())]);
    assert!(
        s.cas_state(&w(Some("v1"), "v2")).await.unwrap(),
        "right expectation"
    );
    assert!(
        s.cas_state(&w(Some("v2"), "")).await.unwrap(),
        "an empty value is a value"
    );
    assert!(
        !s.cas_state(&w(None, "v3")).await.unwrap(),
        "an empty value is not absent"
    );
    assert!(s.cas_state(&w(Some(""), "v3")).await.unwrap());
    // A state and an op key of the same name do not meet.
    h.run(&c, vec![add("inc:x", 1, "kpn", Val::Const(1))]).await;
    assert_eq!(
        s.get_states(&[
            (c.clone(), "inc:x".to_string()),
            (range(), "inc:x".to_string()),
            (c.clone(), "other".to_string()),
            (c.clone(), "inc:x".to_string()),
        ])
        .await
        .unwrap(),
        vec![Some("v3".to_string()), None, None, Some("v3".to_string())]
    );
    assert_eq!(
        s.get_states(&[]).await.unwrap(),
        Vec::<Option<String>>::new()
    );
}

/// cas_states: each write on its own and in order (a later write of one key
/// compares against the earlier one's result), one flag per write.
async fn cas_states_apply_in_order(h: &Harness) {
    let s = h.store();
    let w = |scope: &Scope, name: &str, expect: Option<&str>, value: &str| StateWrite {
        scope: scope.clone(),
        name: name.into(),
        expect: expect.map(str::to_string),
        value: value.into(),
        ttl_ms: TTL,
    };
    let (c, r) = (cust(), range());
    assert_eq!(s.cas_states(&[]).await.unwrap(), Vec::<bool>::new());
    let flags = s
        .cas_states(&[
            w(&c, "inc:a", None, "a1"),
            w(&r, "inc:b", Some("nope"), "b1"),
            w(&c, "inc:a", Some("a1"), "a2"),
            w(&c, "inc:a", None, "a3"),
            w(&r, "inc:b", None, "b1"),
        ])
        .await
        .unwrap();
    assert_eq!(flags, vec![true, false, true, false, true]);
    assert_eq!(
        s.get_states(&[(c.clone(), "inc:a".into()), (r.clone(), "inc:b".into())])
            .await
            .unwrap(),
        vec![Some("a2".to_string()), Some("b1".to_string())]
    );
}

/// Consortium-wide sets: set_add says whether the member was new;
/// set_members lists them sorted.
async fn sets_add_and_list_sorted(h: &Harness) {
    let s = h.store();
    assert_eq!(s.set_members("hot").await.unwrap(), Vec::<String>::new());
    assert!(s.set_add("hot", "range:+67077").await.unwrap());
    assert!(!s.set_add("hot", "range:+67077").await.unwrap());
    assert!(s.set_add("hot", "number:abc").await.unwrap());
    assert!(s.set_add("hot", "range:+3712 ü").await.unwrap());
    assert!(s.set_add("cold", "range:+67077").await.unwrap());
    assert_eq!(
        s.set_members("hot").await.unwrap(),
        vec!["number:abc", "range:+3712 ü", "range:+67077"]
    );
    assert_eq!(s.set_members("cold").await.unwrap(), vec!["range:+67077"]);
    if let Backend::Redis(raw) = &h.backend {
        // The sets have no TTL (the trait gives none): delete them.
        let mut raw = raw.clone();
        let keys = raw.scan(&h.prefix).await;
        assert_eq!(keys.len(), 2, "{keys:?}");
        let _: i64 = raw.query(redis::cmd("DEL").arg(&keys)).await;
    }
}

fn lane(lane: &str, event_time: i64, seen: i64) -> LaneMark {
    LaneMark {
        lane: lane.into(),
        event_time,
        seen,
    }
}

/// The lane table the correlator replicas share: each lane keeps the
/// highest event time and the latest wall time any replica reported (one
/// replica's merge never lowers another's), the whole table comes back
/// sorted, a lane unseen for the retention is dropped, and the table has a
/// TTL of the retention.
async fn lanes_merge_by_maximum_and_expire(h: &Harness) {
    let s = h.store();
    let now = T0;
    const RETAIN: i64 = 1_800_000;
    // Replica A reports partition 0 for kpn and bt.
    let a = s
        .merge_lanes(
            "lanes",
            &[
                lane("0|kpn", t(7_200_000), now),
                lane("0|bt", t(600_000), now),
            ],
            now,
            RETAIN,
        )
        .await
        .unwrap();
    assert_eq!(
        a,
        vec![
            lane("0|bt", t(600_000), now),
            lane("0|kpn", t(7_200_000), now)
        ]
    );
    // Replica B reports partition 1 and an older view of partition 0 (it
    // owned it before a rebalance): nothing goes back.
    let b = s
        .merge_lanes(
            "lanes",
            &[
                lane("1|kpn", t(60_000), now + 5),
                lane("0|kpn", t(3_600_000), now + 5),
            ],
            now + 5,
            RETAIN,
        )
        .await
        .unwrap();
    assert_eq!(
        b,
        vec![
            lane("0|bt", t(600_000), now),
            lane("0|kpn", t(7_200_000), now + 5),
            lane("1|kpn", t(60_000), now + 5),
        ]
    );
    // A reader with nothing to report sees the same table; another table
    // name is another table.
    assert_eq!(
        s.merge_lanes("lanes", &[], now + 6, RETAIN).await.unwrap(),
        b
    );
    assert_eq!(
        s.merge_lanes("other", &[], now + 6, RETAIN).await.unwrap(),
        vec![]
    );
    // Later: bt's lane on partition 0 was not seen for longer than the
    // retention, kpn's were refreshed.
    let later = now + RETAIN + 1;
    let c = s
        .merge_lanes(
            "lanes",
            &[
                lane("0|kpn", t(7_300_000), later),
                lane("1|kpn", t(90_000), later),
            ],
            later,
            RETAIN,
        )
        .await
        .unwrap();
    assert_eq!(
        c,
        vec![
            lane("0|kpn", t(7_300_000), later),
            lane("1|kpn", t(90_000), later),
        ]
    );
    if let Backend::Redis(raw) = &h.backend {
        let mut raw = raw.clone();
        let keys = raw.scan(&h.prefix).await;
        assert_eq!(keys.len(), 1, "one table key: {keys:?}");
        let ttl: i64 = raw.query(redis::cmd("PTTL").arg(&keys[0])).await;
        assert!(ttl > 0 && ttl <= RETAIN, "the table expires: PTTL {ttl}");
        // The dropped lane is gone from the hash, not only from the answer.
        let fields: Vec<String> = raw.query(redis::cmd("HKEYS").arg(&keys[0])).await;
        assert!(
            !fields.iter().any(|f| f.contains("0|bt")),
            "stale lane kept: {fields:?}"
        );
    }
}

/// Empty batches, updates without ops, and ping.
async fn empty_batches_and_updates(h: &Harness) {
    let s = h.store();
    s.ping().await.unwrap();
    assert_eq!(s.apply(&[]).await.unwrap(), Vec::<Outcome>::new());
    let u = update(&cust(), "kpn/empty", vec![]);
    assert_eq!(
        h.apply(&[u.clone(), u]).await,
        vec![
            Outcome {
                duplicate: false,
                results: vec![]
            },
            Outcome {
                duplicate: true,
                results: vec![]
            },
        ]
    );
}

/// One batch over more scopes than the Redis store runs before sending
/// their writes (it sends a chunk's writes while the next chunk runs):
/// every scope's updates apply in order, once, and a re-sent update in the
/// same batch is a duplicate; a second batch sees every write.
async fn a_batch_over_many_scopes(h: &Harness) {
    const SCOPES: i64 = 300;
    let scope = |i: i64| Scope::Customer(format!("k1:many{i}"));
    let mut batch = Vec::new();
    for i in 0..SCOPES {
        let first = update(
            &scope(i),
            "kpn/m1",
            vec![add("sh", 1, "kpn", Val::Const(i + 1)), sum("sh", 0, 10, 0)],
        );
        batch.push(first.clone());
        batch.push(update(
            &scope(i),
            "bt/m2",
            vec![add("sh", 2, "bt", Val::Const(1)), sum("sh", 0, 10, 0)],
        ));
        batch.push(first);
    }
    let out = h.apply(&batch).await;
    assert_eq!(out.len(), batch.len());
    for i in 0..SCOPES {
        let o = &out[(3 * i) as usize..(3 * i + 3) as usize];
        let n = i + 1;
        assert_eq!(
            o,
            [
                Outcome {
                    duplicate: false,
                    results: vec![NONE, g(n, &[("kpn", n)])]
                },
                Outcome {
                    duplicate: false,
                    results: vec![NONE, g(n + 1, &[("kpn", n), ("bt", 1)])]
                },
                Outcome {
                    duplicate: true,
                    results: vec![NONE, g(n + 1, &[("kpn", n), ("bt", 1)])]
                },
            ],
            "scope {i}"
        );
    }
    let reads: Vec<Update> = (0..SCOPES)
        .map(|i| update(&scope(i), &format!("read/{i}"), vec![sum("sh", 0, 10, 0)]))
        .collect();
    // On Redis a second store (no cached state) reads what was written.
    let fresh: Arc<dyn WindowStore> = match &h.backend {
        Backend::Memory(_) => h.store.clone(),
        Backend::Redis(_) => Arc::new(connect_redis(&h.prefix).await),
    };
    let again = fresh.apply(&reads).await.expect("apply");
    for (i, o) in (0..SCOPES).zip(&again) {
        assert_eq!(
            o.results,
            vec![g(i + 2, &[("kpn", i + 1), ("bt", 1)])],
            "scope {i}"
        );
    }
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        /// The suite against [`MemoryStore`].
        mod on_memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Harness::memory(stringify!($test))).await;
                }
            )*
        }
        /// The suite against [`RedisStore`] at `TOLLGUARD_REDIS_URL`.
        mod on_redis {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Harness::redis(stringify!($test)).await).await;
                }
            )*
        }
    };
}

suite!(
    call_max_returns_the_increase_never_negative,
    add_follows_refs_and_conditions,
    sum_windows_groups_and_prunes,
    mark_distinct_and_has,
    span_and_overlap,
    duplicates_skip_writes_but_answer_reads,
    every_key_written_expires,
    cas_state_compares_then_sets,
    cas_states_apply_in_order,
    sets_add_and_list_sorted,
    empty_batches_and_updates,
    a_batch_over_many_scopes,
    lanes_merge_by_maximum_and_expire,
);

// ---------------------------------------------------------------------------
// Redis only: recovery and errors.

mod redis_only {
    use super::*;

    /// A key the scope cache does not hold (written by another process
    /// before this one cached the scope, or dropped from the cache while
    /// unused) is read before the ops run, so CallMax answers the increase
    /// over the stored value, not the whole value again.
    #[tokio::test]
    async fn a_key_the_cache_lacks_is_read_and_counted_once() {
        let p = unique_prefix("cachelacks");
        let (a, b) = (connect_redis(&p).await, connect_redis(&p).await);
        async fn one(store: &RedisStore, dedupe: &str, ops: Vec<Op>) -> Vec<OpResult> {
            let u = update(&cust(), dedupe, ops);
            store.apply(&[u]).await.expect("apply").remove(0).results
        }
        // Another process writes a call's key; this one then caches the
        // scope without it.
        assert_eq!(
            one(&b, "kpn/b1", vec![call_max("call:x", "s", 5)]).await,
            vec![int(5)]
        );
        one(&a, "kpn/a1", vec![add("sh", 1, "kpn", Val::Const(1))]).await;
        assert_eq!(
            one(&a, "kpn/a2", vec![call_max("call:x", "s", 8)]).await,
            vec![int(3)],
            "the increase over the 5 another process stored"
        );
        // A key this process wrote, then dropped from its cache while the
        // scope's batches did not use it.
        assert_eq!(
            one(&a, "kpn/a3", vec![call_max("call:y", "s", 5)]).await,
            vec![int(5)]
        );
        for i in 0..12 {
            one(
                &a,
                &format!("kpn/f{i}"),
                vec![add("sh", 1, "kpn", Val::Const(1))],
            )
            .await;
        }
        assert_eq!(
            one(&a, "kpn/a4", vec![call_max("call:y", "s", 7)]).await,
            vec![int(2)],
            "the increase over the 5 written before the key left the cache"
        );
        // A key that really is new is simply written.
        assert_eq!(
            one(&a, "kpn/a5", vec![call_max("call:z", "s", 4)]).await,
            vec![int(4)]
        );
        assert_eq!(
            one(&b, "kpn/b2", vec![call_max("call:z", "s", 4)]).await,
            vec![int(0)]
        );
    }

    /// After the server lost the script (NOSCRIPT), apply reloads it and
    /// re-sends the batch; no update is applied twice.
    #[tokio::test]
    async fn noscript_reloads_the_script_and_resends() {
        let p = unique_prefix("noscript");
        let store = connect_redis(&p)
            .await
            .with_unloaded_apply_script(&format!("{:016x}", rand::random::<u64>()));
        let c = cust();
        let out = store
            .apply(&[
                update(&c, "kpn/n1", vec![call_max("call:a", "s", 4)]),
                update(&c, "kpn/n2", vec![call_max("call:a", "s", 6)]),
                update(&range(), "kpn/n1", vec![call_max("call:a", "s", 1)]),
            ])
            .await
            .expect("apply recovers from NOSCRIPT");
        let got: Vec<(bool, Vec<OpResult>)> =
            out.into_iter().map(|o| (o.duplicate, o.results)).collect();
        assert_eq!(
            got,
            vec![
                (false, vec![int(4)]),
                (false, vec![int(2)]),
                (false, vec![int(1)])
            ]
        );
    }

    /// No server: Unavailable.
    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let e = RedisStore::connect(&format!("redis://127.0.0.1:{port}/"), "tgtest:x:")
            .await
            .expect_err("nothing listens there");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }

    /// A reply the store cannot use (a key of the wrong type): Protocol.
    #[tokio::test]
    async fn wrong_type_is_a_protocol_error() {
        let p = unique_prefix("wrongtype");
        let store = connect_redis(&p).await;
        let mut raw = Raw::connect().await;
        let _: () = raw
            .query(
                redis::cmd("SET")
                    .arg(Scope::Global.key(&p, "hot"))
                    .arg("x")
                    .arg("PX")
                    .arg(TTL),
            )
            .await;
        let e = store.set_members("hot").await.expect_err("WRONGTYPE");
        assert!(matches!(e, StoreError::Protocol(_)), "{e:?}");
    }

    /// Integers beyond Lua's exact range are refused before anything is
    /// written, never rounded.
    #[tokio::test]
    async fn integers_beyond_2_pow_53_are_refused() {
        let p = unique_prefix("bigint");
        let store = connect_redis(&p).await;
        let c = cust();
        let big = update(&c, "kpn/big", vec![mark("hl", "kpn", "x", (1 << 53) + 1)]);
        let e = store.apply(&[big]).await.expect_err("refused");
        assert!(matches!(e, StoreError::Protocol(_)), "{e:?}");
        let ok = update(&c, "kpn/big", vec![mark("hl", "kpn", "x", 1 << 53)]);
        let out = store.apply(&[ok]).await.unwrap();
        assert!(!out[0].duplicate, "the refused update left no marker");
    }
}

// ---------------------------------------------------------------------------
// Memory ≡ Redis on random update sequences.

fn pick(items: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop::sample::select(items).prop_map(str::to_string)
}

fn op() -> impl Strategy<Value = Op> {
    let hash = pick(&["a", "b"]);
    let zset = pick(&["ma", "mb"]);
    let spans = pick(&["sa", "sb"]);
    let group = pick(&["kpn", "bt", "o|d", "x,y", ""]);
    let id = pick(&["x", "y", "z|w", ""]);
    let time = (0i64..60).prop_map(|s| t(s * 1_000));
    let bucket = -3i64..40;
    let big = 1_000_000_000_000i64;
    prop_oneof![
        (
            pick(&["call:x", "call:y"]),
            pick(&["s", "n"]),
            prop_oneof![-5i64..20, 0..big]
        )
            .prop_map(|(key, field, value)| Op::CallMax {
                key,
                field,
                value,
                ttl_ms: 60_000
            }),
        (
            hash.clone(),
            bucket.clone(),
            group.clone(),
            prop_oneof![
                (-5i64..50).prop_map(Val::Const),
                (0..big).prop_map(Val::Const),
                (0usize..8).prop_map(Val::Ref)
            ],
            prop::option::of(0usize..8)
        )
            .prop_map(|(key, bucket, group, delta, when)| Op::Add {
                key,
                bucket,
                group,
                delta,
                when
            }),
        (hash, bucket.clone(), 0i64..30, bucket).prop_map(|(key, from, len, prune_before)| {
            Op::Sum {
                key,
                from,
                to: from + len,
                prune_before,
            }
        }),
        (zset.clone(), group.clone(), id.clone(), time.clone())
            .prop_map(|(key, group, id, ts)| Op::Mark { key, group, id, ts }),
        (zset.clone(), time.clone(), time.clone()).prop_map(|(key, since, prune_before)| {
            Op::Distinct {
                key,
                since,
                prune_before,
            }
        }),
        (zset, group.clone(), id.clone(), time.clone()).prop_map(|(key, group, id, since)| {
            Op::Has {
                key,
                group,
                id,
                since,
            }
        }),
        (
            spans.clone(),
            id,
            group,
            time.clone(),
            0i64..30_000,
            any::<bool>()
        )
            .prop_map(|(key, id, group, start, len, closed)| Op::Span {
                key,
                id,
                group,
                start,
                end: start + len,
                closed
            }),
        (spans, time.clone(), 0i64..20_000, time).prop_map(
            |(key, at, open_horizon, prune_before)| Op::Overlap {
                key,
                at,
                open_horizon,
                prune_before
            }
        ),
    ]
}

fn scope() -> impl Strategy<Value = Scope> {
    prop::sample::select(vec![
        Scope::Customer("k1:c1".into()),
        Scope::Customer("k1:c2".into()),
        Scope::Range("+67077".into()),
        Scope::Global,
    ])
}

fn random_update() -> impl Strategy<Value = Update> {
    (scope(), 0u32..10, prop::collection::vec(op(), 0..8)).prop_map(|(scope, ev, ops)| Update {
        scope,
        dedupe: format!("kpn/e{ev}"),
        ttl_ms: 600_000,
        dedupe_ttl_ms: 600_000,
        ops,
    })
}

/// Up to 40 updates; about one in five is an exact re-send of an earlier one.
fn updates() -> impl Strategy<Value = Vec<Update>> {
    prop::collection::vec(
        (
            random_update(),
            prop::option::weighted(0.2, any::<prop::sample::Index>()),
        ),
        1..40,
    )
    .prop_map(|items| {
        let mut out: Vec<Update> = Vec::with_capacity(items.len());
        for (u, resend) in items {
            match resend {
                Some(ix) if !out.is_empty() => {
                    let earlier = out[ix.index(out.len())].clone();
                    out.push(earlier);
                }
                _ => out.push(u),
            }
        }
        out
    })
}

/// One update per scope reading every key whole (plus some overlap points),
/// to compare the final states too.
fn audit() -> Vec<Update> {
    // CallMax reveals the stored maximum as 2^52 minus it.
    let top = 1 << 52;
    let mut ops = vec![
        call_max("call:x", "s", top),
        call_max("call:x", "n", top),
        call_max("call:y", "s", top),
        call_max("call:y", "n", top),
    ];
    for k in ["a", "b"] {
        ops.push(sum(k, -100, 100, -100));
    }
    for k in ["ma", "mb"] {
        ops.push(distinct(k, 0, 0));
    }
    for k in ["sa", "sb"] {
        for s in (0..90).step_by(7) {
            ops.push(overlap(k, t(s * 1_000), 5_000, 0));
        }
    }
    [
        Scope::Customer("k1:c1".into()),
        Scope::Customer("k1:c2".into()),
        Scope::Range("+67077".into()),
        Scope::Global,
    ]
    .iter()
    .map(|s| update(s, "kpn/audit", ops.clone()))
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn memory_and_redis_agree_on_random_updates(
        updates in updates(),
        batches in prop::collection::vec(1usize..6, 40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let p = unique_prefix("prop");
            let mem = MemoryStore::new(&p);
            let redis = connect_redis(&p).await;
            let mut rest: &[Update] = &updates;
            for n in batches.iter().copied() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                let a = mem.apply(chunk).await.unwrap();
                let b = redis.apply(chunk).await.unwrap();
                prop_assert_eq!(a, b, "outcomes differ for {:?}", chunk);
            }
            if !rest.is_empty() {
                let a = mem.apply(rest).await.unwrap();
                let b = redis.apply(rest).await.unwrap();
                prop_assert_eq!(a, b, "outcomes differ for {:?}", rest);
            }
            let audit = audit();
            let a = mem.apply(&audit).await.unwrap();
            let b = redis.apply(&audit).await.unwrap();
            prop_assert_eq!(a, b, "final states differ");
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Two Redis stores on the same keys (two correlators, each with its
    /// own cache of scope state) taking turns: every commit of one makes the
    /// other's cached state stale, which the version check must catch; a
    /// re-send through the other store is a duplicate its cache cannot know
    /// about. Outcomes stay those of one memory store, and the cache can be
    /// off altogether.
    #[test]
    fn redis_stores_sharing_scopes_agree_with_memory(
        updates in updates(),
        batches in prop::collection::vec((1usize..6, 0usize..3), 40),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let p = unique_prefix("prop2");
            let mem = MemoryStore::new(&p);
            let stores = [
                connect_redis(&p).await,
                connect_redis(&p).await,
                connect_redis(&p).await.with_cache_bytes(0),
            ];
            let mut rest: &[Update] = &updates;
            for (n, who) in batches.iter().copied() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                let a = mem.apply(chunk).await.unwrap();
                let b = stores[who].apply(chunk).await.unwrap();
                prop_assert_eq!(a, b, "outcomes differ (store {}) for {:?}", who, chunk);
            }
            let audit = audit();
            let a = mem.apply(&audit).await.unwrap();
            let b = stores[0].apply(&audit).await.unwrap();
            prop_assert_eq!(a, b, "final states differ");
            Ok(())
        })?;
    }
}
