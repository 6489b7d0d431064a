//! The ingest API against a real ingester process and the real broker: bad
//! input is refused with the right status naming the field, and nothing of a
//! refused record reaches Kafka.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use prost::Message;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;
use tollguard_runtime::kafka::consume_all;
use tollguard_tests::*;

fn record(event_id: &str) -> pb::CallRecord {
    pb::CallRecord {
        provider_id: "kpn".into(),
        event_id: event_id.into(),
        call_id: format!("call-{event_id}"),
        phase: "end".into(),
        customer_id: "kvk:30123456".into(),
        line_id: "trunk-1".into(),
        caller: "0302001000".into(),
        callee: "0067077123456".into(),
        direction: "outbound".into(),
        start_time: "2011-06-11T00:47:00+02:00".into(),
        duration_s: 60.0,
        ..Default::default()
    }
}

struct Ingester {
    _proc: Proc,
    grpc: u16,
    topic: String,
}

async fn start(dir: &Path) -> Ingester {
    start_with(dir, &[]).await
}

async fn start_with(dir: &Path, extra: &[(&str, &str)]) -> Ingester {
    let key = key_file(dir);
    let (grpc, http) = (free_port(), free_port());
    let topic = format!("tgtest.{}.calls", unique("ingest"));
    let env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        ("TOLLGUARD__PROVIDER_ID".into(), "kpn".into()),
        ("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY".into(), "NL".into()),
        (
            "TOLLGUARD__LISTEN__GRPC".into(),
            format!("127.0.0.1:{grpc}"),
        ),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{http}"),
        ),
        ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID".into(), "k1".into()),
        (
            "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE".into(),
            key.display().to_string(),
        ),
        ("TOLLGUARD__TOPIC".into(), topic.clone()),
        ("TOLLGUARD__LIMITS__MAX_BATCH_RECORDS".into(), "100".into()),
        (
            "TOLLGUARD__LIMITS__MAX_MESSAGE_BYTES".into(),
            "65536".into(),
        ),
        // plaintext development mode (mTLS: tests/security_*.rs)
        ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
    ];
    let mut env = env;
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let p = Proc::spawn(dir, "ingester", &bin("tollguard-ingester"), &[], &env);
    wait_ready(&p, http, Duration::from_secs(60)).await;
    Ingester {
        _proc: p,
        grpc,
        topic,
    }
}

async fn client(port: u16) -> IngestClient<tonic::transport::Channel> {
    IngestClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_never_reaches_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let ing = start(dir.path()).await;
    let mut c = client(ing.grpc).await;

    // A record naming another carrier: the whole batch is PERMISSION_DENIED.
    let mut spoof = record("spoof-1");
    spoof.provider_id = "bt".into();
    let st = c
        .publish_batch(pb::PublishRequest {
            batch_id: 1,
            records: vec![record("spoof-ok"), spoof],
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("provider_id"), "{}", st.message());

    // Malformed fields: per-record INVALID_ARGUMENT naming the field; the good one is stored.
    let mut bad_callee = record("bad-callee");
    bad_callee.callee = "0067O77123456".into();
    let mut bad_time = record("bad-time");
    bad_time.start_time = "yesterday".into();
    let ack = c
        .publish_batch(pb::PublishRequest {
            batch_id: 2,
            records: vec![bad_callee, record("good-1"), bad_time],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ack.batch_id, ack.accepted, ack.rejected), (2, 1, 2));
    let fields: Vec<(u32, &str, &str)> = ack
        .errors
        .iter()
        .map(|e| (e.index, e.field.as_str(), e.code.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            (0, "callee", "INVALID_ARGUMENT"),
            (2, "start_time", "INVALID_ARGUMENT")
        ]
    );
    assert!(
        ack.errors[0].reason.contains("letters"),
        "{:?}",
        ack.errors[0]
    );

    // Oversized message.
    let mut huge = record("huge");
    huge.line_id = "x".repeat(100_000);
    let st = c
        .publish_batch(pb::PublishRequest {
            batch_id: 3,
            records: vec![huge],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            st.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{st:?}"
    );
    assert!(
        st.message().to_lowercase().contains("message"),
        "{}",
        st.message()
    );

    // Too many records in one batch.
    let st = c
        .publish_batch(pb::PublishRequest {
            batch_id: 4,
            records: (0..101).map(|i| record(&format!("many-{i}"))).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(
        st.message().contains("records") && st.message().contains("100"),
        "{}",
        st.message()
    );

    // The bidirectional stream acknowledges batches in order.
    let reqs = vec![
        pb::PublishRequest {
            batch_id: 10,
            records: vec![record("s-1"), record("s-2")],
        },
        pb::PublishRequest {
            batch_id: 11,
            records: vec![record("s-3")],
        },
    ];
    let mut acks = c
        .publish(tokio_stream_iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let a1 = acks.message().await.unwrap().unwrap();
    let a2 = acks.message().await.unwrap().unwrap();
    assert_eq!(
        (a1.batch_id, a1.accepted, a2.batch_id, a2.accepted),
        (10, 2, 11, 1)
    );

    // Kafka holds exactly the accepted events, and no raw identity.
    let recs = consume_all(&kafka(), &ing.topic, Duration::from_secs(20))
        .await
        .unwrap();
    let mut ids: Vec<String> = recs
        .iter()
        .map(|r| {
            pb::CallEvent::decode(r.payload.as_slice())
                .unwrap()
                .event_id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["good-1", "s-1", "s-2", "s-3"]);
    for r in &recs {
        let text = String::from_utf8_lossy(&r.payload);
        for raw in ["67077123456", "302001000", "kvk:30123456", "trunk-1"] {
            assert!(!text.contains(raw), "raw {raw} reached Kafka");
        }
        assert_eq!(r.header("tollguard-schema"), Some(&b"1"[..]));
        let tp = std::str::from_utf8(r.header("traceparent").unwrap()).unwrap();
        assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_is_resource_exhausted_with_retry_advice() {
    let dir = tempfile::tempdir().unwrap();
    let ing = start_with(
        dir.path(),
        &[
            ("TOLLGUARD__KAFKA__QUEUE_BUFFERING_MAX_MESSAGES", "10"),
            ("TOLLGUARD__KAFKA__LINGER_MS", "200"),
        ],
    )
    .await;
    let mut c = client(ing.grpc).await;
    let st = c
        .publish_batch(pb::PublishRequest {
            batch_id: 7,
            records: (0..60).map(|i| record(&format!("bp-{i}"))).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("resend"), "{}", st.message());
    let retry: u64 = st
        .metadata()
        .get("retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0);
    // Batches that fit are acknowledged.
    let ack = c
        .publish_batch(pb::PublishRequest {
            batch_id: 8,
            records: vec![record("fits")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1);
}

fn tokio_stream_iter(
    v: Vec<pb::PublishRequest>,
) -> impl tokio_stream::Stream<Item = pb::PublishRequest> {
    tokio_stream::iter(v)
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin("tollguard-ingester"));
        cmd.arg("--check-config")
            .env("TOLLGUARD__PROVIDER_ID", "kpn")
            .env("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY", "NL")
            .env("TOLLGUARD__PSEUDONYMIZATION__KEY_ID", "k1")
            .env("TOLLGUARD__PSEUDONYMIZATION__KEY_FILE", &key)
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
    assert_eq!(run(&[]).0, Some(0));
    for (k, v, named) in [
        (
            "TOLLGUARD__DIAL_PLAN__HOME_COUNTRY",
            "XX",
            "dial_plan.home_country",
        ),
        (
            "TOLLGUARD__LIMITS__MAX_BATCH_RECORDS",
            "0",
            "limits.max_batch_records",
        ),
        (
            "TOLLGUARD__LIMITS__MAX_BATCH_RECORDS",
            "lots",
            "limits.max_batch_records",
        ),
        (
            "TOLLGUARD__KAFKA__BOOTSTRAP",
            "nohostport",
            "kafka.bootstrap",
        ),
        ("TOLLGUARD__PROVIDER_ID", "KPN!", "provider_id"),
        ("TOLLGUARD__LISTEN__GRPC", "not-an-address", "listen.grpc"),
        ("TOLLGUARD__BOGUS", "1", "bogus"),
        // mTLS is the default: turning it on without files is refused.
        ("TOLLGUARD__TLS__ENABLED", "true", "tls.cert_file"),
        (
            "TOLLGUARD__LIMITS__BURST_RECORDS",
            "10",
            "limits.burst_records",
        ),
        (
            "TOLLGUARD__LIMITS__RECORDS_PER_SECOND",
            "0",
            "limits.records_per_second",
        ),
        (
            "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE",
            "/nonexistent/key",
            "pseudonymization.key_file",
        ),
    ] {
        let (code, err) = run(&[(k, v)]);
        assert_eq!(code, Some(64), "{k}={v}: {err}");
        assert!(err.contains(named), "{k}={v}: {err}");
    }
    // The key's content never appears in an error.
    let secret = std::fs::read_to_string(&key).unwrap();
    let (_, err) = run(&[("TOLLGUARD__PSEUDONYMIZATION__KEY_ID", "bad id!")]);
    assert!(!err.contains(secret.trim()), "{err}");
}
