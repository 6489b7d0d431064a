//! Mutual TLS on the real binaries against the real broker and Redis:
//! carrier identity comes from the client certificate. A caller without a
//! certificate, with an untrusted one, with another carrier's, or with a
//! valid one sending records as another carrier is refused with the right
//! status, and nothing reaches Kafka (checked by consuming the topic). The
//! Alerts API is scoped to the certificate's identity: carrier A's `List`
//! and `Watch` never return carrier B's customer identifiers; the operator
//! is a separate identity that sees everything.

#[path = "security_pki.rs"]
mod pki;

#[path = "notifier_support.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use pki::Pki;
use prost::Message;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::alerts_client::AlertsClient;
use tollguard_proto::v1::ingest_client::IngestClient;
use tollguard_runtime::kafka::consume_all;
use tollguard_tests::*;
use tonic::Code;

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
    topic: String,
}

async fn ingester(dir: &Path, pki: &Pki, clients: &[(&str, &str)]) -> Ingester {
    let key = key_file(dir);
    let (grpc, http) = (free_port(), free_port());
    let topic = format!("tgtest.{}.calls", unique("mtls"));
    let mut env = vec![
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
    ];
    env.extend(pki.env(clients));
    let p = Proc::spawn(dir, "ingester", &bin("tollguard-ingester"), &[], &env);
    wait_ready(&p, http, Duration::from_secs(60)).await;
    Ingester {
        proc: p,
        grpc,
        topic,
    }
}

fn batch(id: u64, recs: Vec<pb::CallRecord>) -> pb::PublishRequest {
    pb::PublishRequest {
        batch_id: id,
        records: recs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_identity_comes_from_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let kpn = pki.ca.client(&["kpn-ingest"], "KPN ingest");
    let bt = pki.ca.client(&["bt-ingest"], "BT ingest");
    // An untrusted CA issuing a certificate that claims kpn's identity.
    let rogue = pki::Ca::new("rogue CA").client(&["kpn-ingest"], "KPN ingest");
    let ing = ingester(dir.path(), &pki, &[("kpn-ingest", "kpn")]).await;
    let log = ing.proc.log_text();
    assert!(log.contains("mutual TLS"), "{log}");

    // 1. No client certificate: UNAUTHENTICATED.
    let mut c = IngestClient::new(pki.channel(ing.grpc, None).await.unwrap());
    let st = c
        .publish_batch(batch(1, vec![record("kpn", "anon-1")]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert!(
        st.message().contains("client certificate"),
        "{}",
        st.message()
    );

    // 2. A certificate from an untrusted CA: the handshake fails, no call
    //    is served.
    let refused = match pki.channel(ing.grpc, Some(&rogue)).await {
        Err(e) => e,
        Ok(ch) => {
            let st = IngestClient::new(ch)
                .publish_batch(batch(2, vec![record("kpn", "rogue-1")]))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    st.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                ),
                "{st:?}"
            );
            st.to_string()
        }
    };
    assert!(!refused.is_empty());

    // 3. A valid certificate of another carrier: PERMISSION_DENIED.
    let mut c = IngestClient::new(pki.channel(ing.grpc, Some(&bt)).await.unwrap());
    let st = c
        .publish_batch(batch(3, vec![record("bt", "bt-1")]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    // ... on the stream too.
    let st = c
        .publish(tokio_stream::iter(vec![batch(
            4,
            vec![record("bt", "bt-2")],
        )]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // 4. kpn's certificate, a batch holding a record as bt: the whole
    //    batch is PERMISSION_DENIED and nothing of it is published.
    let mut c = IngestClient::new(pki.channel(ing.grpc, Some(&kpn)).await.unwrap());
    let st = c
        .publish_batch(batch(
            5,
            vec![record("kpn", "mixed-ok"), record("bt", "as-bt")],
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("provider_id"), "{}", st.message());

    // 5. kpn as kpn: accepted.
    let ack = c
        .publish_batch(batch(
            6,
            vec![record("kpn", "good-1"), record("kpn", "good-2")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 2, "{ack:?}");

    // 6. A plaintext client on the TLS port gets nothing through.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", ing.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(ch) = plain {
        IngestClient::new(ch)
            .publish_batch(batch(7, vec![record("kpn", "plain-1")]))
            .await
            .unwrap_err();
    }

    // `tollguard send` with kpn's certificate over mTLS.
    let w = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cert, key) = (w("kpn.pem", &kpn.cert), w("kpn.key", &kpn.key));
    let file = w(
        "calls.jsonl",
        "{\"provider_id\":\"kpn\",\"event_id\":\"send-1\",\"call_id\":\"c\",\"phase\":\"end\",\"line_id\":\"t\",\"caller\":\"0302001000\",\"callee\":\"0067077123456\",\"direction\":\"outbound\",\"start_time\":\"2011-06-11T00:47:00+02:00\",\"duration_s\":60}\n",
    );
    let out = std::process::Command::new(bin("tollguard"))
        .arg("send")
        .arg(&file)
        .args(["--ingester", &format!("https://127.0.0.1:{}", ing.grpc)])
        .arg("--ca")
        .arg(&pki.ca_file)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["--tls-server-name", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollguard send over mTLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Kafka holds exactly the accepted events.
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
    assert_eq!(ids, ["good-1", "good-2", "send-1"]);
}

#[test]
fn an_ingester_without_certificates_or_with_another_carriers_mapping_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let key = key_file(dir.path());
    let run = |env: &[(String, String)]| {
        let mut cmd = std::process::Command::new(bin("tollguard-ingester"));
        cmd.arg("--check-config")
            .env("TOLLGUARD__PROVIDER_ID", "kpn")
            .env("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY", "NL")
            .env("TOLLGUARD__PSEUDONYMIZATION__KEY_ID", "k1")
            .env("TOLLGUARD__PSEUDONYMIZATION__KEY_FILE", &key);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // TLS is the default: no files, exit 64 naming tls.cert_file.
    let (code, err) = run(&[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("tls.cert_file"), "{err}");
    // Valid mTLS settings pass.
    let (code, err) = run(&pki.env(&[("kpn-ingest", "kpn")]));
    assert_eq!(code, Some(0), "{err}");
    // Another carrier's certificate mapped to this ingester: refused.
    let (code, err) = run(&pki.env(&[("bt-ingest", "bt")]));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("tls.clients.bt-ingest"), "{err}");
    // A key that does not belong to the certificate: refused, key not shown.
    let other = pki.ca.client(&["x"], "x");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, &other.key).unwrap();
    let mut env = pki.env(&[("kpn-ingest", "kpn")]);
    env.push((
        "TOLLGUARD__TLS__KEY_FILE".into(),
        wrong.display().to_string(),
    ));
    let (code, err) = run(&env);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("tls.key_file"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

const KPN_CUSTOMER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BT_CUSTOMER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alerts_calls_are_scoped_to_the_certificate_identity() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let kpn = pki.ca.client(&["kpn-alerts"], "KPN alerts");
    let ops = pki.ca.client(&[], "ops-console");
    let stranger = pki.ca.client(&["someone-else"], "someone");
    let names = support::Names::new("mtlsapi");
    support::create_topic(&names.alerts, 1).await;
    let tls: Vec<(String, String)> = pki.env(&[
        ("kpn-alerts", "kpn"),
        ("bt-alerts", "bt"),
        ("ops-console", "operator"),
    ]);
    let extra: Vec<(&str, String)> = tls.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let n = support::Notifier::start(dir.path(), "notifier", &names, &extra).await;
    support::publish(
        &names.alerts,
        &[
            support::alert(
                "inc-both",
                1,
                pb::Severity::Critical,
                &["kpn", "bt"],
                KPN_CUSTOMER,
            ),
            support::alert("inc-bt", 1, pb::Severity::Critical, &["bt"], BT_CUSTOMER),
            support::alert("inc-kpn", 1, pb::Severity::Warning, &["kpn"], KPN_CUSTOMER),
        ],
    )
    .await;

    let list_req = || pb::ListRequest {
        page_size: 100,
        include_closed: true,
        ..Default::default()
    };
    // The operator sees all three once the notifier has stored them.
    let mut op = AlertsClient::new(pki.channel(n.grpc, Some(&ops)).await.unwrap());
    let all = wait_for("three incidents", Duration::from_secs(30), || {
        let mut op = op.clone();
        async move {
            let l = op.list(list_req()).await.ok()?.into_inner();
            (l.incidents.len() == 3).then_some(l)
        }
    })
    .await;
    assert!(format!("{all:?}").contains(BT_CUSTOMER));

    // kpn sees its two, never bt's customer.
    let mut kc = AlertsClient::new(pki.channel(n.grpc, Some(&kpn)).await.unwrap());
    let l = kc.list(list_req()).await.unwrap().into_inner();
    let mut ids: Vec<String> = l
        .incidents
        .iter()
        .map(|i| i.latest.as_ref().unwrap().incident_id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["inc-both", "inc-kpn"]);
    assert!(!format!("{l:?}").contains(BT_CUSTOMER));
    // The incident of bt alone does not exist for kpn.
    let st = kc
        .acknowledge(pb::AcknowledgeRequest {
            incident_id: "inc-bt".into(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");

    // Watch from the beginning: kpn's two incidents, no bt customer.
    let mut w = kc
        .watch(pb::WatchRequest {
            from_beginning: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let env = tokio::time::timeout(Duration::from_secs(20), w.message())
            .await
            .expect("watch envelope")
            .unwrap()
            .unwrap();
        assert!(!format!("{env:?}").contains(BT_CUSTOMER), "{env:?}");
        seen.push(env.alert.unwrap().incident_id);
    }
    seen.sort();
    assert_eq!(seen, ["inc-both", "inc-kpn"]);
    // Nothing else arrives for kpn.
    let more = tokio::time::timeout(Duration::from_millis(1500), w.message()).await;
    assert!(more.is_err(), "{more:?}");

    // No certificate: UNAUTHENTICATED; a certificate mapped to nobody:
    // PERMISSION_DENIED; a bearer token is not accepted under mTLS.
    let mut anon = AlertsClient::new(pki.channel(n.grpc, None).await.unwrap());
    let st = anon.list(list_req()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    let mut r = tonic::Request::new(list_req());
    r.metadata_mut().insert(
        "x-tollguard-identity",
        "tok-operator-0123456789abcdef".parse().unwrap(),
    );
    let st = anon.list(r).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    let mut sc = AlertsClient::new(pki.channel(n.grpc, Some(&stranger)).await.unwrap());
    let st = sc.list(list_req()).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    op.list(list_req()).await.unwrap();
}
