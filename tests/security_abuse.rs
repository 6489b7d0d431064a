//! Abuse and hygiene against the real binaries, broker and Redis: a flood
//! from one carrier is throttled (`RESOURCE_EXHAUSTED` + `retry-after-ms`)
//! while another carrier's traffic keeps flowing; a corpus of hostile
//! records each gets a clear error naming the field and the ingester keeps
//! serving; no raw caller or callee number reaches Kafka or the logs; no
//! secret (key material, webhook secret, API token) appears in the logs.

#[path = "notifier_support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tollguard_core::record::RawRecord;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;
use tollguard_runtime::kafka::consume_all;
use tollguard_tests::*;
use tonic::Code;

/// Raw numbers of the test input, as dialled and as normalised.
const RAW_NUMBERS: &[&str] = &["302001000", "67077123456"];

fn record(provider: &str, event_id: &str) -> pb::CallRecord {
    pb::CallRecord {
        provider_id: provider.into(),
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
    proc: Proc,
    grpc: u16,
    http: u16,
}

/// A plaintext ingester for `provider` publishing to `topic`, logging at
/// debug level, the key given inline (`secret`) so the logs can be checked
/// for it.
async fn ingester(
    dir: &Path,
    provider: &str,
    country: &str,
    topic: &str,
    secret: &str,
    extra: &[(&str, &str)],
) -> Ingester {
    let (grpc, http) = (free_port(), free_port());
    let mut env = vec![
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
        ("TOLLGUARD__PSEUDONYMIZATION__KEY".into(), secret.into()),
        ("TOLLGUARD__TOPIC".into(), topic.into()),
        ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
        ("TOLLGUARD__LIMITS__MAX_BATCH_RECORDS".into(), "100".into()),
        (
            "TOLLGUARD__LIMITS__MAX_MESSAGE_BYTES".into(),
            "262144".into(),
        ),
        ("RUST_LOG".into(), "debug".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let p = Proc::spawn(
        dir,
        &format!("ingester-{provider}"),
        &bin("tollguard-ingester"),
        &[],
        &env,
    );
    wait_ready(&p, http, Duration::from_secs(60)).await;
    Ingester {
        proc: p,
        grpc,
        http,
    }
}

async fn client(port: u16) -> IngestClient<tonic::transport::Channel> {
    IngestClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap()
}

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for raw in RAW_NUMBERS {
        assert!(!text.contains(raw), "raw number {raw} in {what}");
    }
    for s in secrets {
        assert!(!text.contains(s), "a secret appears in {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_from_one_carrier_is_throttled_while_another_keeps_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("tgtest.{}.calls", unique("flood"));
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let limits = [
        ("TOLLGUARD__LIMITS__RECORDS_PER_SECOND", "200"),
        ("TOLLGUARD__LIMITS__BURST_RECORDS", "200"),
    ];
    let kpn = ingester(dir.path(), "kpn", "NL", &topic, &secret, &limits).await;
    let bt = ingester(dir.path(), "bt", "GB", &topic, &secret, &limits).await;

    // kpn floods: 4 concurrent senders of 100-record batches for 2 s.
    let accepted = Arc::new(AtomicU64::new(0));
    let throttled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut flood = Vec::new();
    for w in 0..4 {
        let mut c = client(kpn.grpc).await;
        let (accepted, throttled) = (accepted.clone(), throttled.clone());
        flood.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(2) {
                n += 1;
                let recs = (0..100)
                    .map(|i| record("kpn", &format!("f{w}-{n}-{i}")))
                    .collect();
                match c
                    .publish_batch(pb::PublishRequest {
                        batch_id: n,
                        records: recs,
                    })
                    .await
                {
                    Ok(a) => {
                        accepted.fetch_add(u64::from(a.into_inner().accepted), Ordering::SeqCst);
                    }
                    Err(st) => {
                        assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
                        let ms: u64 = st
                            .metadata()
                            .get("retry-after-ms")
                            .expect("retry-after-ms")
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        assert!(ms > 0 && ms <= 1000, "{ms}");
                        assert!(st.message().contains("rate limit"), "{}", st.message());
                        throttled.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    // Meanwhile bt sends 20 batches of 5 records (50 records/s): all pass.
    let mut c = client(bt.grpc).await;
    for b in 0..20u64 {
        let recs = (0..5)
            .map(|i| record("bt", &format!("bt-{b}-{i}")))
            .collect();
        let ack = c
            .publish_batch(pb::PublishRequest {
                batch_id: b,
                records: recs,
            })
            .await
            .unwrap_or_else(|st| panic!("bt batch {b} refused during kpn's flood: {st:?}"))
            .into_inner();
        assert_eq!(ack.accepted, 5);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for f in flood {
        f.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let (acc, thr) = (
        accepted.load(Ordering::SeqCst),
        throttled.load(Ordering::SeqCst),
    );
    assert!(thr > 0, "kpn's flood was never throttled");
    // The burst plus the rate over the run, one batch of slack.
    let bound = 200.0 + 200.0 * secs + 100.0;
    assert!(
        (acc as f64) <= bound,
        "kpn got {acc} records through in {secs:.1}s"
    );
    assert!(acc >= 200, "kpn's burst passed: {acc}");
    assert!(metric(kpn.http, "tollguard_ingest_records_total").await > 0.0);

    // Every bt record is on the topic; no raw number, no key.
    let recs = consume_all(&kafka(), &topic, Duration::from_secs(20))
        .await
        .unwrap();
    let bt_events = recs
        .iter()
        .map(|r| pb::CallEvent::decode(r.payload.as_slice()).unwrap())
        .filter(|e| e.event_id.starts_with("bt-"))
        .count();
    assert_eq!(bt_events, 100);
    for r in &recs {
        assert_clean("Kafka", &String::from_utf8_lossy(&r.payload), &[&secret]);
    }
    assert_clean("kpn's log", &kpn.proc.log_text(), &[&secret]);
    assert_clean("bt's log", &bt.proc.log_text(), &[&secret]);
}

/// `PublishRequest` with `caller` as raw bytes, to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct BytesRequest {
    #[prost(uint64, tag = "1")]
    batch_id: u64,
    #[prost(message, repeated, tag = "2")]
    records: Vec<BytesRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BytesRecord {
    #[prost(string, tag = "1")]
    provider_id: String,
    #[prost(string, tag = "2")]
    event_id: String,
    #[prost(bytes = "vec", tag = "7")]
    caller: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_get_clear_errors_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let topic = format!("tgtest.{}.calls", unique("hostile"));
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let ing = ingester(dir.path(), "kpn", "NL", &topic, &secret, &[]).await;
    let mut c = client(ing.grpc).await;

    type Mutate = fn(&mut pb::CallRecord);
    let corpus: Vec<(&str, Mutate, &str)> = vec![
        (
            "huge event id",
            |r| r.event_id = "e".repeat(100_000),
            "event_id",
        ),
        (
            "huge customer",
            |r| r.customer_id = "c".repeat(5_000),
            "customer_id",
        ),
        ("huge caller", |r| r.caller = "3".repeat(10_000), "caller"),
        ("NaN duration", |r| r.duration_s = f64::NAN, "duration_s"),
        (
            "infinite duration",
            |r| r.duration_s = f64::INFINITY,
            "duration_s",
        ),
        ("negative duration", |r| r.duration_s = -1.0, "duration_s"),
        ("huge duration", |r| r.duration_s = 1e300, "duration_s"),
        (
            "far future",
            |r| r.start_time = "2999-01-01T00:00:00Z".into(),
            "start_time",
        ),
        (
            "far past",
            |r| r.start_time = "1900-01-01T00:00:00Z".into(),
            "start_time",
        ),
        (
            "year 0",
            |r| r.start_time = "0000-01-01T00:00:00Z".into(),
            "start_time",
        ),
        (
            "garbage time",
            |r| r.start_time = "9".repeat(40),
            "start_time",
        ),
        (
            "letters in callee",
            |r| r.callee = "0067O77123456".into(),
            "callee",
        ),
        (
            "letters in caller",
            |r| r.caller = "03020O1000".into(),
            "caller",
        ),
        (
            "control char in callee",
            |r| r.callee = "00670771\u{7}23456".into(),
            "callee",
        ),
        (
            "newline in event id",
            |r| r.event_id = "ev\n{\"forged\":1}".into(),
            "event_id",
        ),
        (
            "NUL in caller",
            |r| r.caller = "0302\u{0}001000".into(),
            "caller",
        ),
        (
            "too many digits",
            |r| r.callee = "00670771234567890123".into(),
            "callee",
        ),
        (
            "unknown country",
            |r| r.callee = "00999123456".into(),
            "callee",
        ),
        (
            "bad charge",
            |r| {
                r.charge_amount = "12,34e999".into();
                r.charge_currency = "EUR".into();
            },
            "charge.amount",
        ),
    ];
    let records: Vec<pb::CallRecord> = corpus
        .iter()
        .enumerate()
        .map(|(i, (_, m, _))| {
            let mut r = record("kpn", &format!("h-{i}"));
            m(&mut r);
            r
        })
        .chain(std::iter::once(record("kpn", "still-good")))
        .collect();
    let ack = c
        .publish_batch(pb::PublishRequest {
            batch_id: 1,
            records,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1, "{ack:?}");
    assert_eq!(ack.rejected as usize, corpus.len(), "{ack:?}");
    for (e, (what, _, field)) in ack.errors.iter().zip(&corpus) {
        assert_eq!(e.field, *field, "{what}: {e:?}");
        assert_eq!(e.code, "INVALID_ARGUMENT", "{what}: {e:?}");
        assert!(
            !e.reason.is_empty() && e.reason.len() < 400,
            "{what}: {e:?}"
        );
    }

    // Invalid UTF-8 in a string field: the message is refused naming it.
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ing.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let st = grpc
        .unary::<BytesRequest, pb::PublishAck, _>(
            tonic::Request::new(BytesRequest {
                batch_id: 2,
                records: vec![BytesRecord {
                    provider_id: "kpn".into(),
                    event_id: "utf8".into(),
                    caller: vec![0x30, 0xff, 0xfe, 0x31],
                }],
            }),
            "/tollguard.v1.Ingest/PublishBatch".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("field records.caller") && st.message().contains("UTF-8"),
        "{}",
        st.message()
    );
    // The same on the `Publish` stream: the stream ends with the status.
    let bad = BytesRequest {
        batch_id: 4,
        records: vec![BytesRecord {
            provider_id: "kpn".into(),
            event_id: "utf8-stream".into(),
            caller: vec![0xc3, 0x28],
        }],
    };
    grpc.ready().await.unwrap();
    let mut acks = grpc
        .streaming::<_, BytesRequest, pb::PublishAck, _>(
            tonic::Request::new(tokio_stream::iter(vec![bad])),
            "/tollguard.v1.Ingest/Publish".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let st = acks.message().await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("field records.caller"),
        "{}",
        st.message()
    );

    // The JSON Lines parser of `tollguard send`: deeply nested JSON, huge
    // lines and wrong types are clear errors, not a crash.
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let e = RawRecord::from_json_line(&nested).unwrap_err();
    assert_eq!(e.field, "record");
    let deep = format!(
        "{{\"provider_id\":\"kpn\",\"charge\":{}1{}}}",
        "{\"a\":".repeat(2000),
        "}".repeat(2000)
    );
    assert!(RawRecord::from_json_line(&deep).is_err());
    let e = RawRecord::from_json_line("{\"duration_s\":\"NaN\"}").unwrap_err();
    assert_eq!(e.field, "duration_s");
    let e = RawRecord::from_json_line("{\"duration_s\":1e999}").unwrap_err();
    assert_eq!(e.field, "record", "{e:?}");

    // Still serving; only the good record reached Kafka, and no raw
    // number or key is in Kafka or the log.
    let ack = c
        .publish_batch(pb::PublishRequest {
            batch_id: 3,
            records: vec![record("kpn", "after")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 1);
    let recs = consume_all(&kafka(), &topic, Duration::from_secs(20))
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
    assert_eq!(ids, ["after", "still-good"]);
    for r in &recs {
        assert_clean("Kafka", &String::from_utf8_lossy(&r.payload), &[&secret]);
    }
    let log = ing.proc.log_text();
    assert_clean("the ingester's log", &log, &[&secret]);
    assert!(!log.contains("{\"forged\":1}"), "a forged log line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_the_notifiers_logs() {
    const TOKEN: &str = "tok-operator-5ecret-0123456789";
    const WEBHOOK_SECRET: &str = "whsec-5ecret-abcdef0123456789";
    let dir = tempfile::tempdir().unwrap();
    let names = support::Names::new("secrets");
    support::create_topic(&names.alerts, 1).await;
    let rx = support::Receiver::start(support::Behaviour::Always(500)).await;
    let contacts = support::contacts(
        dir.path(),
        &format!(
            "[[carriers]]\nprovider_id = \"kpn\"\n[[carriers.webhooks]]\nurl = \"{}\"\nsecret = \"{WEBHOOK_SECRET}\"\n",
            rx.url()
        ),
    );
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, format!("\"{TOKEN}\" = \"operator\"\n")).unwrap();
    let n = support::Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[
            ("TOLLGUARD__CONTACTS_FILE", contacts.display().to_string()),
            ("TOLLGUARD__API__TOKENS_FILE", tokens.display().to_string()),
            ("RUST_LOG", "debug".into()),
        ],
    )
    .await;
    support::publish(
        &names.alerts,
        &[support::alert(
            "inc-s",
            1,
            pb::Severity::Critical,
            &["kpn"],
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        )],
    )
    .await;
    // Deliveries are attempted (and fail), API calls with good and bad tokens.
    wait_for("a webhook attempt", Duration::from_secs(30), || async {
        (!rx.received().is_empty()).then_some(())
    })
    .await;
    let mut c = tollguard_proto::v1::alerts_client::AlertsClient::connect(n.endpoint())
        .await
        .unwrap();
    for t in [TOKEN, "tok-wrong-5ecret-0123456789"] {
        let mut r = tonic::Request::new(pb::ListRequest::default());
        r.metadata_mut()
            .insert("x-tollguard-identity", t.parse().unwrap());
        let _ = c.list(r).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = n.proc.log_text();
    assert!(log.len() > 1000, "the debug log is empty?");
    for s in [TOKEN, WEBHOOK_SECRET, "5ecret"] {
        assert!(
            !log.contains(s),
            "a secret ({}…) appears in the notifier's log",
            &s[..4]
        );
    }
}

/// `AcknowledgeRequest` with `incident_id` as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct BytesAcknowledge {
    #[prost(bytes = "vec", tag = "1")]
    incident_id: Vec<u8>,
}

/// `SetPolicyRequest` whose policy's `customer_token` is raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct BytesSetPolicy {
    #[prost(message, optional, tag = "1")]
    policy: Option<BytesPolicy>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BytesPolicy {
    #[prost(bytes = "vec", tag = "1")]
    customer_token: Vec<u8>,
}

/// Sends `req` to `path` as the operator and returns the refusal.
async fn undecodable<M: prost::Message + Send + Sync + 'static>(
    endpoint: &str,
    token: &str,
    path: &'static str,
    req: M,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("x-tollguard-identity", token.parse().unwrap());
    grpc.unary::<M, pb::AcknowledgeResponse, _>(
        r,
        path.parse().unwrap(),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_alerts_and_admin_requests_are_invalid_argument_naming_the_field() {
    const TOKEN: &str = "tok-operator-utf8-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let names = support::Names::new("utf8");
    support::create_topic(&names.alerts, 1).await;
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, format!("\"{TOKEN}\" = \"operator\"\n")).unwrap();
    let n = support::Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[("TOLLGUARD__API__TOKENS_FILE", tokens.display().to_string())],
    )
    .await;
    let st = undecodable(
        &n.endpoint(),
        TOKEN,
        "/tollguard.v1.Alerts/Acknowledge",
        BytesAcknowledge {
            incident_id: vec![b'i', 0xff, b'd'],
        },
    )
    .await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("field incident_id") && st.message().contains("UTF-8"),
        "{}",
        st.message()
    );
    let st = undecodable(
        &n.endpoint(),
        TOKEN,
        "/tollguard.v1.Admin/SetPolicy",
        BytesSetPolicy {
            policy: Some(BytesPolicy {
                customer_token: vec![b'k', b'1', b':', 0xc0, 0xaf],
            }),
        },
    )
    .await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(
        st.message().contains("field policy.customer_token") && st.message().contains("UTF-8"),
        "{}",
        st.message()
    );
    // The API keeps serving: a well-formed call from the same operator.
    let mut c = tollguard_proto::v1::alerts_client::AlertsClient::connect(n.endpoint())
        .await
        .unwrap();
    let mut r = tonic::Request::new(pb::ListRequest::default());
    r.metadata_mut()
        .insert("x-tollguard-identity", TOKEN.parse().unwrap());
    c.list(r).await.unwrap();
}
