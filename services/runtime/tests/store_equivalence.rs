//! The Redis window store returns exactly what the memory store returns, on
//! random update sequences (re-sent dedupe ids included), against the real
//! Redis server at `TOLLGUARD_REDIS_URL`.

use proptest::prelude::*;
use tollguard_core::store::{MemoryStore, Op, Scope, StateWrite, Update, Val, WindowStore};
use tollguard_runtime::redis_store::RedisStore;

fn redis_url() -> String {
    std::env::var("TOLLGUARD_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "TOLLGUARD_REDIS_URL is not set: run `bash deploy/local/services.sh start` and \
             `eval \"$(bash deploy/local/services.sh env)\"` (or `bash deploy/local/test.sh`)"
        )
    })
}

fn prefix(test: &str) -> String {
    format!("tgtest:{test}:{:08x}:", rand::random::<u32>())
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop::sample::select(vec!["a", "b"]).prop_map(str::to_string);
    let group = prop::sample::select(vec!["kpn", "bt", "odido"]).prop_map(str::to_string);
    let id = prop::sample::select(vec!["x", "y", "z", "w"]).prop_map(str::to_string);
    let t = 0i64..60;
    prop_oneof![
        (
            id.clone(),
            prop::sample::select(vec!["s", "n"]),
            0i64..1_000_000
        )
            .prop_map(|(c, f, v)| Op::CallMax {
                key: format!("call:{c}"),
                field: f.to_string(),
                value: v,
                ttl_ms: 60_000
            }),
        (
            key.clone(),
            t.clone(),
            group.clone(),
            prop_oneof![
                (-5i64..50).prop_map(Val::Const),
                (0usize..4).prop_map(Val::Ref)
            ],
            prop::option::of(0usize..4)
        )
            .prop_map(|(key, bucket, group, delta, when)| Op::Add {
                key,
                bucket,
                group,
                delta,
                when
            }),
        (key.clone(), t.clone(), 0i64..30, 0i64..20).prop_map(|(key, from, len, pb)| Op::Sum {
            key,
            from,
            to: from + len,
            prune_before: pb
        }),
        (key.clone(), group.clone(), id.clone(), t.clone()).prop_map(|(key, group, id, ts)| {
            Op::Mark {
                key: format!("m{key}"),
                group,
                id,
                ts,
            }
        }),
        (key.clone(), t.clone(), 0i64..20).prop_map(|(key, since, pb)| Op::Distinct {
            key: format!("m{key}"),
            since,
            prune_before: pb
        }),
        (
            id.clone(),
            group.clone(),
            t.clone(),
            0i64..30,
            any::<bool>()
        )
            .prop_map(|(id, group, start, len, closed)| Op::Span {
                key: "sp".into(),
                id,
                group,
                start,
                end: start + len,
                closed
            }),
        (key.clone(), group.clone(), id.clone(), t.clone()).prop_map(|(key, group, id, since)| {
            Op::Has {
                key: format!("m{key}"),
                group,
                id,
                since,
            }
        }),
        (t.clone(), 0i64..20, 0i64..30).prop_map(|(at, hz, pb)| Op::Overlap {
            key: "sp".into(),
            at,
            open_horizon: hz,
            prune_before: pb
        }),
    ]
}

fn update() -> impl Strategy<Value = Update> {
    (
        prop::sample::select(vec![
            Scope::Customer("k1:c1".into()),
            Scope::Range("+67077".into()),
        ]),
        0u32..12,
        prop::collection::vec(op(), 1..8),
    )
        .prop_map(|(scope, ev, ops)| Update {
            scope,
            dedupe: format!("kpn/e{ev}"),
            ttl_ms: 600_000,
            dedupe_ttl_ms: 600_000,
            ops,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn redis_store_equals_memory_store(updates in prop::collection::vec(update(), 1..30), batch in 1usize..6) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let p = prefix("equiv");
            let redis = RedisStore::connect(&redis_url(), &p).await.unwrap();
            let mem = MemoryStore::new(&p);
            for chunk in updates.chunks(batch) {
                let a = mem.apply(chunk).await.unwrap();
                let b = redis.apply(chunk).await.unwrap();
                assert_eq!(a, b, "outcomes differ for {chunk:?}");
            }
        });
    }
}

#[tokio::test]
async fn every_key_has_a_ttl_and_state_cas_and_sets_behave() {
    let p = prefix("ttl");
    let store = RedisStore::connect(&redis_url(), &p).await.unwrap();
    let scope = Scope::Customer("k1:abc".into());
    let u = Update {
        scope: scope.clone(),
        dedupe: "kpn/e1".into(),
        ttl_ms: 60_000,
        dedupe_ttl_ms: 60_000,
        ops: vec![
            Op::CallMax {
                key: "call:c".into(),
                field: "s".into(),
                value: 5,
                ttl_ms: 30_000,
            },
            Op::Add {
                key: "sh".into(),
                bucket: 10,
                group: "kpn".into(),
                delta: Val::Ref(0),
                when: None,
            },
            Op::Mark {
                key: "hl".into(),
                group: "kpn".into(),
                id: "l1".into(),
                ts: 10,
            },
            Op::Span {
                key: "sp".into(),
                id: "c".into(),
                group: "kpn".into(),
                start: 1,
                end: 2,
                closed: false,
            },
        ],
    };
    let out = store.apply(std::slice::from_ref(&u)).await.unwrap();
    assert!(!out[0].duplicate);
    assert_eq!(out[0].results[0].int(), 5);
    let again = store.apply(std::slice::from_ref(&u)).await.unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].results[0].int(), 0);

    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    // marker, call:c, sh, hl, sp and the scope's version key
    assert_eq!(keys.len(), 6, "{keys:?}");
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut c).await.unwrap();
        assert!(ttl > 0, "{k} has no TTL");
        assert!(
            k.starts_with(&format!("{p}{{c:k1:abc}}:")),
            "{k} is outside the scope's hash slot"
        );
    }

    let w = StateWrite {
        scope: scope.clone(),
        name: "inc:x".into(),
        expect: None,
        value: "v1".into(),
        ttl_ms: 60_000,
    };
    assert!(store.cas_state(&w).await.unwrap());
    assert!(
        !store.cas_state(&w).await.unwrap(),
        "absent expectation fails when present"
    );
    let w2 = StateWrite {
        expect: Some("wrong".into()),
        value: "v2".into(),
        ..w.clone()
    };
    assert!(!store.cas_state(&w2).await.unwrap());
    let w3 = StateWrite {
        expect: Some("v1".into()),
        value: "v2".into(),
        ..w.clone()
    };
    assert!(store.cas_state(&w3).await.unwrap());
    assert_eq!(
        store
            .get_states(&[(scope.clone(), "inc:x".into()), (scope, "nope".into())])
            .await
            .unwrap(),
        vec![Some("v2".into()), None]
    );
    assert!(store.set_add("hot", "range:+67077").await.unwrap());
    assert!(!store.set_add("hot", "range:+67077").await.unwrap());
    store.set_add("hot", "number:abc").await.unwrap();
    assert_eq!(
        store.set_members("hot").await.unwrap(),
        vec!["number:abc".to_string(), "range:+67077".to_string()]
    );
    store.ping().await.unwrap();
}
