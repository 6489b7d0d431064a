//! Pseudonymisation key rotation through the real ingesters and broker: the
//! schedule is by event time, so two carriers' ingesters that both carry the
//! current and the next key give the same customer the same token for the
//! same event time (they correlate), switch together at `rotate_at`, and a
//! late event from before the switch still gets the old key and joins its
//! window. The keys never appear in the logs.

use std::path::Path;
use std::time::Duration;

use prost::Message;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;
use tollguard_runtime::kafka::consume_all;
use tollguard_tests::*;

const ROTATE_AT: &str = "2011-06-10T23:00:00Z";

fn record(provider: &str, event_id: &str, start: &str) -> pb::CallRecord {
    pb::CallRecord {
        provider_id: provider.into(),
        event_id: event_id.into(),
        call_id: format!("call-{event_id}"),
        phase: "end".into(),
        customer_id: "kvk:30123456".into(),
        line_id: "trunk-1".into(),
        caller: "+31302001000".into(),
        callee: "+67077123456".into(),
        direction: "outbound".into(),
        start_time: start.into(),
        duration_s: 60.0,
        ..Default::default()
    }
}

async fn ingester(
    dir: &Path,
    provider: &str,
    country: &str,
    topic: &str,
    keys: (&str, &str),
) -> (Proc, u16) {
    let (grpc, http) = (free_port(), free_port());
    let env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        ("TOLLGUARD__PROVIDER_ID".into(), provider.into()),
        ("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY".into(), country.into()),
        (
            "TOLLGUARD__LISTEN__GRPC".into(),
            format!("127.0.0.1:{grpc}"),
        ),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{http}"),
        ),
        ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID".into(), "k1".into()),
        ("TOLLGUARD__PSEUDONYMIZATION__KEY".into(), keys.0.into()),
        (
            "TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY_ID".into(),
            "k2".into(),
        ),
        (
            "TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY".into(),
            keys.1.into(),
        ),
        (
            "TOLLGUARD__PSEUDONYMIZATION__ROTATE_AT".into(),
            ROTATE_AT.into(),
        ),
        ("TOLLGUARD__TOPIC".into(), topic.into()),
        ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
        ("RUST_LOG".into(), "debug".into()),
    ];
    let p = Proc::spawn(
        dir,
        &format!("ingester-{provider}"),
        &bin("tollguard-ingester"),
        &[],
        &env,
    );
    wait_ready(&p, http, Duration::from_secs(60)).await;
    (p, grpc)
}

async fn send(port: u16, recs: Vec<pb::CallRecord>) {
    let mut c = IngestClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let n = recs.len() as u32;
    let ack = c
        .publish_batch(pb::PublishRequest {
            batch_id: 1,
            records: recs,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, n, "{ack:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_under_the_old_and_new_key_correlate_by_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("tgtest.{}.calls", unique("rotation"));
    let k1 = hex::encode(rand::random::<[u8; 32]>());
    let k2 = hex::encode(rand::random::<[u8; 32]>());
    let (kpn, kpn_port) = ingester(dir.path(), "kpn", "NL", &topic, (&k1, &k2)).await;
    let (bt, bt_port) = ingester(dir.path(), "bt", "GB", &topic, (&k1, &k2)).await;

    send(
        kpn_port,
        vec![
            record("kpn", "kpn-before", "2011-06-10T22:47:00Z"),
            record("kpn", "kpn-after", "2011-06-10T23:10:00Z"),
        ],
    )
    .await;
    send(
        bt_port,
        vec![record("bt", "bt-after", "2011-06-10T23:12:00Z")],
    )
    .await;
    // bt backfills an event from before the switch, after it.
    send(
        bt_port,
        vec![record("bt", "bt-late", "2011-06-10T22:55:00Z")],
    )
    .await;

    let recs = consume_all(&kafka(), &topic, Duration::from_secs(20))
        .await
        .unwrap();
    let ev: std::collections::BTreeMap<String, pb::CallEvent> = recs
        .iter()
        .map(|r| pb::CallEvent::decode(r.payload.as_slice()).unwrap())
        .map(|e| (e.event_id.clone(), e))
        .collect();
    assert_eq!(ev.len(), 4);
    let cust = |id: &str| ev[id].customer.clone().unwrap();
    let callee = |id: &str| ev[id].callee.clone().unwrap();
    // Before the switch: k1 at both carriers, the same token.
    assert_eq!(cust("kpn-before").key_id, "k1");
    assert_eq!(cust("kpn-before"), cust("bt-late"));
    assert_eq!(callee("kpn-before"), callee("bt-late"));
    // After: k2 at both carriers, the same token, a different value.
    assert_eq!(cust("kpn-after").key_id, "k2");
    assert_eq!(cust("kpn-after"), cust("bt-after"));
    assert_eq!(callee("kpn-after"), callee("bt-after"));
    assert_ne!(cust("kpn-after").value, cust("kpn-before").value);
    // The Kafka key (the join key of the correlator) follows the token.
    let key_of = |id: &str| {
        recs.iter()
            .find(|r| {
                pb::CallEvent::decode(r.payload.as_slice())
                    .unwrap()
                    .event_id
                    == id
            })
            .unwrap()
            .key
            .clone()
    };
    assert_eq!(key_of("kpn-before"), key_of("bt-late"));
    assert_eq!(key_of("kpn-after"), key_of("bt-after"));
    for p in [&kpn, &bt] {
        let log = p.log_text();
        assert!(log.contains("rotation scheduled"), "{log}");
        assert!(!log.contains(&k1) && !log.contains(&k2), "a key in the log");
    }
}

#[test]
fn a_half_configured_rotation_exits_64_naming_the_key() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(bin("tollguard-ingester"));
        cmd.arg("--check-config")
            .env("TOLLGUARD__PROVIDER_ID", "kpn")
            .env("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY", "NL")
            .env("TOLLGUARD__PSEUDONYMIZATION__KEY_ID", "k1")
            .env("TOLLGUARD__PSEUDONYMIZATION__KEY", "a".repeat(64))
            .env("TOLLGUARD__TLS__ENABLED", "false");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let next = "b".repeat(64);
    let full: [(&str, &str); 3] = [
        ("TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY_ID", "k2"),
        ("TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY", &next),
        ("TOLLGUARD__PSEUDONYMIZATION__ROTATE_AT", ROTATE_AT),
    ];
    assert_eq!(run(&full).0, Some(0));
    for (drop, named) in [
        (0, "pseudonymization.next_key_id"),
        (1, "pseudonymization.next_key_file"),
        (2, "pseudonymization.rotate_at"),
    ] {
        let env: Vec<(&str, &str)> = full
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != drop)
            .map(|(_, kv)| *kv)
            .collect();
        let (code, err) = run(&env);
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains(named), "{err}");
    }
    let (code, err) = run(&[
        ("TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY_ID", "k1"),
        ("TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY", &next),
        ("TOLLGUARD__PSEUDONYMIZATION__ROTATE_AT", ROTATE_AT),
    ]);
    assert_eq!(code, Some(64));
    assert!(err.contains("next_key_id"), "{err}");
    let (code, err) = run(&[
        ("TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY_ID", "k2"),
        ("TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY", "short"),
        ("TOLLGUARD__PSEUDONYMIZATION__ROTATE_AT", ROTATE_AT),
    ]);
    assert_eq!(code, Some(64));
    assert!(err.contains("pseudonymization.next_key"), "{err}");
    assert!(!err.contains(&next));
}
