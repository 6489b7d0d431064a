//! One trace from gRPC ingest through Kafka to the correlator and the
//! notifier: the three binaries export their spans over OTLP/gRPC to a
//! collector this test runs on loopback, for a real event through the real
//! broker and Redis. The caller's `traceparent` is continued by the
//! ingester, crosses `tollguard.calls` and `tollguard.alerts` in record
//! headers, and every hop's span is the child of the previous hop's.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings};
use tollguard_tests::*;
use tonic::{Request, Response, Status};

/// One received span.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

/// A minimal OTLP/gRPC trace collector keeping what it receives.
#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: s.name,
                    trace: hex::encode(&s.trace_id),
                    span: hex::encode(&s.span_id),
                    parent: hex::encode(&s.parent_span_id),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                });
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a loopback port; returns the port.
    async fn start(&self) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        port
    }

    fn of_trace(&self, trace: &str) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

fn one<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    let found: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one span {name:?} of {service}; trace has {spans:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_ingest_correlator_and_notifier_through_real_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let id = unique("otel");
    let prefix = format!("tgtest:{id}:");
    let calls = format!("tgtest.{id}.calls");
    let alerts = format!("tgtest.{id}.alerts");
    let bus = KafkaBus::new(KafkaSettings::new(kafka())).unwrap();
    bus.ensure_topics(&[(calls.as_str(), 1, &[]), (alerts.as_str(), 1, &[])])
        .await
        .unwrap();

    let collector = Collector::default();
    let otlp = collector.start().await;
    let otel = || -> Vec<(String, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://127.0.0.1:{otlp}"),
            ),
            // Export every 100 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    };

    // An operator has put the destination range on the hot list: a single
    // call to it is an alert.
    let st = Command::new(bin("tollguard"))
        .args([
            "hotlist",
            "add",
            "--range",
            "+67571",
            "--redis",
            &redis(),
            "--prefix",
            &prefix,
        ])
        .status()
        .unwrap();
    assert!(st.success());

    // The three services, exporting to the collector.
    let (ing_grpc, ing_http, cor_http, not_http) =
        (free_port(), free_port(), free_port(), free_port());
    let mut env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        ("TOLLGUARD__PROVIDER_ID".into(), "kpn".into()),
        ("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY".into(), "NL".into()),
        (
            "TOLLGUARD__LISTEN__GRPC".into(),
            format!("127.0.0.1:{ing_grpc}"),
        ),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{ing_http}"),
        ),
        ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID".into(), "k1".into()),
        (
            "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE".into(),
            key.display().to_string(),
        ),
        ("TOLLGUARD__TOPIC".into(), calls.clone()),
        // plaintext development mode (mTLS is tested in tests/security_*.rs)
        ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
    ];
    env.extend(otel());
    let ingester = Proc::spawn(
        dir.path(),
        "ingester",
        &bin("tollguard-ingester"),
        &[],
        &env,
    );
    let mut env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{cor_http}"),
        ),
        ("TOLLGUARD__REDIS__URL".into(), redis()),
        ("TOLLGUARD__REDIS__KEY_PREFIX".into(), prefix.clone()),
        ("TOLLGUARD__TOPICS__CALLS".into(), calls.clone()),
        ("TOLLGUARD__TOPICS__ALERTS".into(), alerts.clone()),
        (
            "TOLLGUARD__TOPICS__DLQ".into(),
            format!("tgtest.{id}.calls.dlq"),
        ),
        ("TOLLGUARD__GROUP".into(), format!("{id}-correlator")),
    ];
    env.extend(otel());
    let correlator = Proc::spawn(
        dir.path(),
        "correlator",
        &bin("tollguard-correlator"),
        &[],
        &env,
    );
    let mut env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{not_http}"),
        ),
        ("TOLLGUARD__REDIS__URL".into(), redis()),
        ("TOLLGUARD__REDIS__KEY_PREFIX".into(), prefix.clone()),
        ("TOLLGUARD__ALERTS_TOPIC".into(), alerts.clone()),
        (
            "TOLLGUARD__DELIVERIES_TOPIC".into(),
            format!("tgtest.{id}.deliveries"),
        ),
        ("TOLLGUARD__DLQ_TOPIC".into(), format!("tgtest.{id}.ndlq")),
        ("TOLLGUARD__GROUP".into(), format!("{id}-notifier")),
    ];
    env.extend(otel());
    let notifier = Proc::spawn(
        dir.path(),
        "notifier",
        &bin("tollguard-notifier"),
        &[],
        &env,
    );
    for (p, port) in [
        (&ingester, ing_http),
        (&correlator, cor_http),
        (&notifier, not_http),
    ] {
        wait_ready(p, port, Duration::from_secs(60)).await;
    }

    // A carrier's call to the hot range, sent with the carrier's own trace
    // context.
    let trace = format!("{:032x}", rand::random::<u128>() | 1);
    let caller_span = format!("{:016x}", rand::random::<u64>() | 1);
    let mut client = IngestClient::connect(format!("http://127.0.0.1:{ing_grpc}"))
        .await
        .unwrap();
    let now = chrono::Utc::now().to_rfc3339();
    let mut req = Request::new(pb::PublishRequest {
        batch_id: 1,
        records: vec![pb::CallRecord {
            provider_id: "kpn".into(),
            event_id: "otel-1".into(),
            call_id: "otel-1".into(),
            phase: "start".into(),
            customer_id: "kvk:1".into(),
            line_id: "l1".into(),
            caller: "+31201234567".into(),
            callee: "+67571234567".into(),
            direction: "outbound".into(),
            start_time: now,
            ..Default::default()
        }],
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{caller_span}-01").parse().unwrap(),
    );
    let ack = client.publish_batch(req).await.unwrap().into_inner();
    assert_eq!(ack.accepted, 1, "{ack:?}");

    // The trace reaches all three services.
    let want: BTreeSet<String> = [
        "tollguard-ingester",
        "tollguard-correlator",
        "tollguard-notifier",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let spans = wait_for(
        "spans of the three services in the caller's trace",
        Duration::from_secs(30),
        || {
            let c = collector.clone();
            let (trace, want) = (trace.clone(), want.clone());
            async move {
                let spans = c.of_trace(&trace);
                let services: BTreeSet<String> = spans.iter().map(|s| s.service.clone()).collect();
                let notified = spans.iter().any(|s| s.service == "tollguard-notifier");
                (services == want && notified).then_some(spans)
            }
        },
    )
    .await;

    // Each hop is the child of the previous one.
    let ingest = one(&spans, "tollguard-ingester", "tollguard.v1.Ingest/Publish");
    assert_eq!(
        ingest.parent, caller_span,
        "the ingest span continues the caller's span"
    );
    let produce = one(&spans, "tollguard-ingester", &format!("{calls} publish"));
    assert_eq!(produce.parent, ingest.span);
    let alert = one(&spans, "tollguard-correlator", "alert");
    assert_eq!(
        alert.parent, produce.span,
        "the alert span's parent is the producer span whose traceparent the event carried"
    );
    let notify = one(&spans, "tollguard-notifier", &format!("{alerts} process"));
    assert_eq!(
        notify.parent, alert.span,
        "the notifier continues from the alert's traceparent header"
    );

    // The correlator's batch span (a trace of its own) links to the event.
    let batch = collector
        .all()
        .into_iter()
        .find(|s| s.service == "tollguard-correlator" && s.name == format!("{calls} process"))
        .expect("the correlator's batch span");
    assert!(
        batch.links.contains(&(trace.clone(), produce.span.clone())),
        "the batch span links to the event's producer span: {batch:?}"
    );
    // The alert's publish is part of the batch's trace.
    let publish = collector
        .all()
        .into_iter()
        .find(|s| s.service == "tollguard-correlator" && s.name == format!("{alerts} publish"))
        .expect("the correlator's alert publish span");
    assert_eq!(publish.trace, batch.trace);
    assert_eq!(publish.parent, batch.span);

    // The same run's metrics: window store latency per call and the
    // consumer lag of each group, measured from the broker.
    assert!(
        metric(cor_http, "tollguard_window_store_request_seconds_count").await >= 1.0,
        "correlator: no window store call timed"
    );
    for (port, group) in [(cor_http, "correlator"), (not_http, "notifier")] {
        let body = http_get(port, "/metrics").await.unwrap().1;
        assert!(
            body.lines()
                .any(|l| l.starts_with("tollguard_kafka_consumer_lag_records{")
                    && l.contains(&format!("group=\"{id}-{group}\""))),
            "{group}: no consumer lag gauge:\n{body}"
        );
    }
}
