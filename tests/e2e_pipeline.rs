//! End to end on the real path: ingesters for every carrier, the correlator
//! and the notifier as separate processes (the built binaries) against the
//! real Kafka broker and Redis server; the 2011 scenario sent with
//! `tollguard send`; the incident read back from `tollguard.alerts.v1` with a
//! plain Kafka consumer.

#[path = "pipeline_support.rs"]
mod pipeline;

use std::time::Duration;

use pipeline::*;
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings, consume_all};
use tollguard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_2011_case_through_real_kafka_and_redis_matches_the_embedded_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let stack = Stack::start(dir.path()).await;
    stack.send_all(&files);
    stack.wait_processed(n as f64).await;

    let alerts = stack.alerts().await;
    let real = incidents(&alerts);
    let burst: Vec<_> = alerts
        .iter()
        .filter(|a| {
            a.rule == pb::Rule::MultiCarrierBurst as i32
                && a.severity == pb::Severity::Critical as i32
        })
        .collect();
    assert!(
        !burst.is_empty(),
        "no critical multi_carrier_burst on the alerts topic: {real:?}"
    );
    let b = burst[0];
    assert_eq!(b.subject.as_ref().unwrap().range, "+67077");
    let mut providers = b.providers.clone();
    providers.sort();
    assert_eq!(providers, ["bt", "kpn"]);
    assert!(
        alerts
            .iter()
            .any(|a| a.rule == pb::Rule::DestinationConvergence as i32),
        "distributed IRSF not found"
    );
    assert_no_duplicate_versions(&alerts);

    // Same incidents as the embedded pipeline for the same input and key.
    let embedded = incidents(&embedded_incidents(&files, &stack.key, &stack.policies).await);
    assert_eq!(
        critical(&real),
        critical(&embedded),
        "critical incidents differ: real {real:?} embedded {embedded:?}"
    );
    assert!(critical(&real).contains(&b.incident_id));

    // Re-sending everything changes nothing: no new incident, no new alert.
    let before = alerts.len();
    let dups_before = metric(
        stack.correlator_http,
        "tollguard_correlator_duplicate_events_total",
    )
    .await;
    stack.send_all(&files);
    stack.wait_processed(2.0 * n as f64).await;
    let dups = metric(
        stack.correlator_http,
        "tollguard_correlator_duplicate_events_total",
    )
    .await
        - dups_before;
    assert_eq!(
        dups as usize, n,
        "every re-sent event is recognised as a duplicate"
    );
    let again = stack.alerts().await;
    assert_eq!(again.len(), before, "re-sending produced new alerts");
    assert_eq!(incidents(&again), real);

    // The notifier logged each incident.
    let log = stack.notifier.as_ref().unwrap().log_text();
    for id in real.keys() {
        assert!(log.contains(id.as_str()), "notifier did not log {id}");
    }

    // A poison record goes to the DLQ with its reason and does not block its
    // partition: a valid event sent after it is still processed.
    let bus = KafkaBus::new(KafkaSettings::new(kafka())).unwrap();
    let processed = metric(stack.correlator_http, "tollguard_correlator_events_total").await;
    bus.publish(vec![OutRecord {
        topic: stack.calls.clone(),
        key: b"poison".to_vec(),
        payload: b"\xff\x00 not a protobuf CallEvent".to_vec(),
        headers: vec![],
    }])
    .await
    .unwrap();
    stack.send_one(&files, "kpn", 1);
    stack.wait_processed(processed + 1.0).await;
    let dlq = consume_all(
        &kafka(),
        &format!("{}.dlq", stack.calls),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(dlq.len(), 1, "one record in the DLQ");
    assert_eq!(dlq[0].payload, b"\xff\x00 not a protobuf CallEvent");
    let reason =
        String::from_utf8_lossy(dlq[0].header("tollguard-dlq-reason").unwrap()).to_string();
    assert!(reason.contains("undecodable"), "{reason}");
    assert_eq!(
        metric(
            stack.correlator_http,
            "tollguard_correlator_dead_letters_total"
        )
        .await,
        1.0
    );

    // SIGTERM: every service drains and exits 0 within 30 s.
    let mut stack = stack;
    let mut procs: Vec<Proc> = stack.ingesters.drain(..).map(|(_, _, p)| p).collect();
    procs.push(stack.correlator.take().unwrap());
    for mut p in procs {
        let code = p.terminate(Duration::from_secs(30));
        assert_eq!(
            code,
            Some(0),
            "{} did not exit cleanly on SIGTERM: {}",
            p.name,
            p.log_text()
        );
    }
    let mut notifier = stack.notifier.take().unwrap();
    let code = notifier.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "notifier: {}", notifier.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correlator_killed_mid_stream_restarts_with_the_same_incidents_and_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let mut stack = Stack::start(dir.path()).await;
    stack.send_all(&files);
    // Kill -9 once it is part-way through.
    let port = stack.correlator_http;
    wait_for(
        "the correlator to make progress",
        Duration::from_secs(120),
        || async move {
            (metric(port, "tollguard_correlator_events_total").await >= (n / 3) as f64)
                .then_some(())
        },
    )
    .await;
    stack.correlator.as_mut().unwrap().kill9();
    stack.correlator = None;
    stack.start_correlator(2).await;
    // The restarted correlator resumes from the committed offsets; wait
    // until the group has committed everything.
    let group = stack.group.clone();
    let calls = stack.calls.clone();
    wait_for(
        "the correlator group to commit every record",
        Duration::from_secs(180),
        || {
            let (g, c) = (group.clone(), calls.clone());
            async move { (group_lag(&g, &c) == Some(0)).then_some(()) }
        },
    )
    .await;
    let alerts = wait_for("the burst incident", Duration::from_secs(60), || {
        let s = &stack;
        async move {
            let a = s.alerts().await;
            a.iter()
                .any(|a| {
                    a.rule == pb::Rule::MultiCarrierBurst as i32
                        && a.severity == pb::Severity::Critical as i32
                })
                .then_some(a)
        }
    })
    .await;
    assert_no_duplicate_versions(&alerts);
    let real = incidents(&alerts);
    let embedded = incidents(&embedded_incidents(&files, &stack.key, &stack.policies).await);
    assert_eq!(
        critical(&real),
        critical(&embedded),
        "real {real:?} embedded {embedded:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carriers_sent_one_after_another_still_join() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let stack = Stack::start(dir.path()).await;
    // Each carrier's whole history arrives only after the previous one's.
    stack.send_sequential(&files).await;
    stack.wait_processed(n as f64).await;
    let alerts = stack.alerts().await;
    let real = incidents(&alerts);
    assert!(
        alerts
            .iter()
            .any(|a| a.rule == pb::Rule::MultiCarrierBurst as i32
                && a.severity == pb::Severity::Critical as i32),
        "the cross-carrier burst was missed: {real:?}"
    );
    let embedded = incidents(&embedded_incidents(&files, &stack.key, &stack.policies).await);
    assert_eq!(
        critical(&real),
        critical(&embedded),
        "real {real:?} embedded {embedded:?}"
    );
}
