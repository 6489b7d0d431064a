//! Least privilege on Redis: the window store works as an ACL user limited
//! to TollGuard's key prefix and to the commands SECURITY.md lists (the
//! `ACL SETUSER` line below is the documented one with the test's prefix),
//! and that user can neither read other keys nor run administrative
//! commands. The user is created on the local Redis and deleted at the end.

use tollguard_core::store::{Op, Scope, StateWrite, Update, Val, WindowStore};
use tollguard_runtime::redis_store::RedisStore;
use tollguard_tests::*;

/// The commands of the correlator's and notifier's store (SECURITY.md).
const COMMANDS: &str = "-@all +ping +hello +auth +select +evalsha +eval +script|load \
     +mget +smembers +sadd +get +set +hget +hset +hgetall +hdel +hincrby +pexpire +zadd \
     +zrangebyscore +zremrangebyscore +zscore +zrange +zrem +pttl +exists";

async fn admin() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

struct User {
    name: String,
}

impl Drop for User {
    fn drop(&mut self) {
        if let Ok(c) = redis::Client::open(redis())
            && let Ok(mut c) = c.get_connection()
        {
            let _: Result<i64, _> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.name)
                .query(&mut c);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_runs_as_a_least_privilege_acl_user() {
    let id = unique("acl");
    let prefix = format!("tgtest:{id}:");
    let name = format!("tgtest-{id}");
    let password = hex::encode(rand::random::<[u8; 16]>());
    let mut a = admin().await;
    let mut setuser = redis::cmd("ACL");
    setuser
        .arg("SETUSER")
        .arg(&name)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"))
        .arg(format!("~{prefix}*"))
        .arg("resetchannels");
    for c in COMMANDS.split_whitespace() {
        setuser.arg(c);
    }
    let _: () = setuser.query_async(&mut a).await.unwrap();
    let _user = User { name: name.clone() };

    let base = redis();
    let url = base.replacen("redis://", &format!("redis://{name}:{password}@"), 1);
    assert_ne!(url, base, "TOLLGUARD_REDIS_URL must be a redis:// URL");
    let store = RedisStore::connect(&url, &prefix).await.unwrap();
    store.ping().await.unwrap();

    // Window updates (the Lua script), state CAS, reads and sets all work.
    let scope = Scope::Customer("k1:acl".into());
    let out = store
        .apply(&[Update {
            scope: scope.clone(),
            dedupe: "ev-1".into(),
            ttl_ms: 60_000,
            dedupe_ttl_ms: 60_000,
            ops: vec![
                Op::Add {
                    key: "spend".into(),
                    bucket: 1_700_000_000_000,
                    group: "kpn".into(),
                    delta: Val::Const(100),
                    when: None,
                },
                Op::Sum {
                    key: "spend".into(),
                    from: 0,
                    to: 1_800_000_000_000,
                    prune_before: 0,
                },
            ],
        }])
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    assert!(!out[0].duplicate);
    // A second store (no cached state: it reads the scope back) sees the
    // re-delivery as a duplicate, and marks and prunes a sorted set.
    let other = RedisStore::connect(&url, &prefix).await.unwrap();
    let again = other
        .apply(&[
            Update {
                scope: scope.clone(),
                dedupe: "ev-1".into(),
                ttl_ms: 60_000,
                dedupe_ttl_ms: 60_000,
                ops: vec![Op::Mark {
                    key: "seen".into(),
                    group: "kpn".into(),
                    id: "c1".into(),
                    ts: 1_700_000_000_000,
                }],
            },
            Update {
                scope: scope.clone(),
                dedupe: "ev-2".into(),
                ttl_ms: 60_000,
                dedupe_ttl_ms: 60_000,
                ops: vec![
                    Op::Mark {
                        key: "seen".into(),
                        group: "kpn".into(),
                        id: "c2".into(),
                        ts: 1_700_000_000_000,
                    },
                    Op::Distinct {
                        key: "seen".into(),
                        since: 0,
                        prune_before: 1_600_000_000_000,
                    },
                ],
            },
        ])
        .await
        .unwrap();
    assert!(again[0].duplicate, "{again:?}");
    assert!(!again[1].duplicate, "{again:?}");
    let w = StateWrite {
        scope: scope.clone(),
        name: "inc:x".into(),
        expect: None,
        value: "v1".into(),
        ttl_ms: 60_000,
    };
    assert!(store.cas_state(&w).await.unwrap());
    assert_eq!(
        store.get_states(&[(scope, "inc:x".into())]).await.unwrap(),
        vec![Some("v1".to_string())]
    );
    assert!(store.set_add("hot", "range:+67077").await.unwrap());
    assert_eq!(store.set_members("hot").await.unwrap(), ["range:+67077"]);

    // The same user cannot touch other keys or run admin commands.
    let mut u = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (what, cmd) in [
        (
            "a key outside the prefix",
            redis::cmd("GET").arg("tg:{c:other}:x").clone(),
        ),
        ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        ("CONFIG", redis::cmd("CONFIG").arg("GET").arg("*").clone()),
        ("DEL", redis::cmd("DEL").arg(format!("{prefix}x")).clone()),
        ("ACL", redis::cmd("ACL").arg("LIST").clone()),
    ] {
        let r: redis::RedisResult<redis::Value> = cmd.query_async(&mut u).await;
        let e = r.expect_err(what);
        assert!(
            e.to_string().contains("NOPERM") || e.code() == Some("NOPERM"),
            "{what}: {e}"
        );
    }
    // Clean up the consortium set (no TTL) as admin.
    let _: i64 = redis::cmd("DEL")
        .arg(Scope::Global.key(&prefix, "hot"))
        .query_async(&mut a)
        .await
        .unwrap_or(0);
}
