//! Scale-out on the real path: three correlator replicas in one consumer
//! group with their windows on a three-node Redis Cluster (started by
//! `deploy/local/services.sh`) find the same critical incidents as the
//! embedded pipeline (itself checked against one correlator on one Redis by
//! `e2e_pipeline`), with no incident version published twice; and two
//! ingesters for the same carrier, the carrier's records split across them
//! by customer and sent in event-time lockstep, join as one.

#[path = "pipeline_support.rs"]
mod pipeline;

use std::time::{Duration, Instant};

use pipeline::*;
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings};
use tollguard_tests::*;

/// Sum of a metric over several services.
async fn metric_sum(ports: &[u16], name: &str) -> f64 {
    let mut s = 0.0;
    for p in ports {
        s += metric(*p, name).await.max(0.0);
    }
    s
}

fn has_burst(alerts: &[pb::Alert]) -> bool {
    alerts.iter().any(|a| {
        a.rule == pb::Rule::MultiCarrierBurst as i32 && a.severity == pb::Severity::Critical as i32
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_correlators_on_a_redis_cluster_find_what_one_finds() {
    three_correlators(None).await;
}

/// Two replicas frozen (SIGSTOP, shorter than the group's session timeout,
/// so they keep their partitions) while the third runs hours of event time
/// ahead, then thawed: their events still join the third's in the shared
/// range windows, because no replica prunes behind a partition no lane was
/// seen on, nor behind another replica's slowest lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_frozen_while_the_others_run_ahead_finds_what_one_finds() {
    three_correlators(Some(Duration::from_secs(6))).await;
}

/// Three correlators in one group, on the Redis Cluster, against the
/// embedded pipeline; with `freeze`, all but the first are stopped for
/// that long from just before the carriers send.
async fn three_correlators(freeze: Option<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let stack = Stack::start_ingesters(dir.path()).await;
    // The calls topic exists before the replicas join, so the group
    // assigns its partitions before anything is sent (else the first
    // publish creates it, and a replica that joins late may find the
    // traffic already processed).
    let bus = KafkaBus::new(KafkaSettings::new(kafka())).unwrap();
    bus.ensure_topics(&[(stack.calls.as_str(), 6, &[])])
        .await
        .unwrap();
    let cluster = cluster_env();
    let mut replicas = Vec::new();
    let mut ports = Vec::new();
    for i in 1..=3 {
        let http = free_port();
        replicas.push(
            stack
                .spawn_correlator(&format!("correlator-{i}"), http, &cluster)
                .await,
        );
        ports.push(http);
    }
    // Every replica must take part (and the frozen ones own partitions):
    // wait until the group has given each replica some.
    wait_for(
        "every replica to be assigned partitions",
        Duration::from_secs(60),
        || {
            let logs: Vec<String> = replicas.iter().map(|r| r.log_text()).collect();
            async move {
                logs.iter()
                    .all(|l| l.contains("kafka partitions assigned"))
                    .then_some(())
            }
        },
    )
    .await;
    let thaw = if let Some(pause) = freeze {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids: Vec<String> = replicas[1..]
            .iter()
            .map(|r| r.child.id().to_string())
            .collect();
        for pid in &pids {
            let st = std::process::Command::new("kill")
                .args(["-STOP", pid])
                .status()
                .unwrap();
            assert!(st.success());
        }
        Some(std::thread::spawn(move || {
            std::thread::sleep(pause);
            pids.iter().all(|pid| {
                std::process::Command::new("kill")
                    .args(["-CONT", pid])
                    .status()
                    .unwrap()
                    .success()
            })
        }))
    } else {
        None
    };
    let t0 = Instant::now();
    stack.send_all(&files);
    if let Some(t) = thaw {
        assert!(t.join().unwrap(), "SIGCONT");
    }
    wait_for(
        &format!("three replicas to process {n} events"),
        Duration::from_secs(180),
        || {
            let ports = ports.clone();
            async move {
                (metric_sum(&ports, "tollguard_correlator_events_total").await >= n as f64)
                    .then_some(())
            }
        },
    )
    .await;
    stack.wait_group_caught_up(Duration::from_secs(60)).await;
    eprintln!(
        "{n} events through 3 correlators on a 3-node Redis Cluster in {:?} (freeze {freeze:?})",
        t0.elapsed()
    );
    // Every replica took part: the group spread the partitions.
    for (p, r) in ports.iter().zip(&replicas) {
        let e = metric(*p, "tollguard_correlator_events_total").await;
        assert!(e > 0.0, "{} processed nothing: {}", r.name, r.log_text());
    }
    // Every store call went to the cluster without error.
    assert_eq!(
        metric_sum(&ports, "tollguard_correlator_dead_letters_total").await,
        0.0
    );

    let alerts = stack.alerts().await;
    assert!(
        has_burst(&alerts),
        "no critical burst: {:?}",
        incidents(&alerts)
    );
    assert_no_duplicate_versions(&alerts);
    let real = incidents(&alerts);
    let embedded = incidents(&embedded_incidents(&files, &stack.key, &stack.policies).await);
    assert_eq!(
        critical(&real),
        critical(&embedded),
        "critical incidents differ: cluster {real:?} embedded {embedded:?}"
    );
    // The windows really are on the cluster: keys under the stack's prefix
    // exist on more than one node.
    let mut nodes_with_keys = 0;
    for url in redis_cluster_urls() {
        let port = url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .unwrap()
            .to_string();
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &port,
                "--scan",
                "--pattern",
                &format!("{}*", stack.prefix),
            ])
            .output()
            .unwrap();
        if !out.stdout.is_empty() {
            nodes_with_keys += 1;
        }
    }
    assert!(
        nodes_with_keys >= 2,
        "window keys on {nodes_with_keys} cluster node(s) only"
    );
}

/// Sends one carrier's `records` (file order, which is the carrier's
/// event-time order) to two ingesters in lockstep: consecutive records of
/// the same half go as one batch (at most `batch`), and a batch is sent only
/// once the previous one, to either ingester, was acknowledged. So the two
/// feeds never drift apart in event time — as two real-time exporters of one
/// carrier, seconds apart — while every record goes through the ingester of
/// its half. A batch is resent until acknowledged.
async fn send_lockstep(
    provider: String,
    records: Vec<(usize, pb::CallRecord)>,
    addrs: [String; 2],
    batch: usize,
    within: Duration,
) -> SendHistory {
    use tollguard_proto::v1::ingest_client::IngestClient;
    let deadline = Instant::now() + within;
    let mut h = SendHistory {
        provider: provider.clone(),
        ..Default::default()
    };
    let mut clients: [Option<IngestClient<tonic::transport::Channel>>; 2] = [None, None];
    let mut batches: Vec<(usize, Vec<pb::CallRecord>)> = Vec::new();
    for (half, r) in records {
        match batches.last_mut() {
            Some((h, b)) if *h == half && b.len() < batch => b.push(r),
            _ => batches.push((half, vec![r])),
        }
    }
    for (i, (half, recs)) in batches.into_iter().enumerate() {
        let req = pb::PublishRequest {
            batch_id: i as u64 + 1,
            records: recs.clone(),
        };
        let mut failed = false;
        loop {
            assert!(
                Instant::now() < deadline,
                "{provider}: batch {} not acknowledged within {within:?} ({:?})",
                i + 1,
                h.failures
            );
            if clients[half].is_none() {
                match tonic::transport::Endpoint::from_shared(addrs[half].clone())
                    .unwrap()
                    .connect()
                    .await
                {
                    Ok(ch) => clients[half] = Some(IngestClient::new(ch)),
                    Err(_) => {
                        *h.failures.entry("connect".into()).or_default() += 1;
                        failed = true;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let c = clients[half].as_mut().unwrap();
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(Duration::from_secs(10));
            match c.publish_batch(r).await {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    assert_eq!(
                        (ack.accepted as usize, ack.rejected),
                        (recs.len(), 0),
                        "{provider}: {:?}",
                        ack.errors
                    );
                    for r in &recs {
                        h.acked.insert(r.event_id.clone());
                        if failed {
                            h.retried.insert(r.event_id.clone());
                        }
                    }
                    h.batches += 1;
                    break;
                }
                Err(st) => {
                    *h.failures.entry(format!("{:?}", st.code())).or_default() += 1;
                    failed = true;
                    if st.code() != tonic::Code::ResourceExhausted {
                        clients[half] = None;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingesters_for_one_carrier_share_its_records_and_join() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let stack = Stack::start_without_notifier(dir.path()).await;
    // A second ingester for every carrier (as behind a load balancer that
    // keeps a connection's records together, one exporter per set of
    // customers): each customer's records go through one of the two (every
    // record of half 1 only through the second ingester, so its records in
    // Kafka prove it published).
    let mut twins = Vec::new();
    for (provider, _) in CARRIERS {
        let grpc = free_port();
        let p = stack
            .spawn_ingester(
                &format!("ingester-{provider}-2"),
                provider,
                grpc,
                free_port(),
            )
            .await;
        twins.push((provider, grpc, p));
    }
    let t0 = Instant::now();
    let mut sends = Vec::new();
    for ((provider, grpc, _), (_, twin, _)) in stack.ingesters.iter().zip(&twins) {
        use tollguard_cli::input::{Format, RecordReader};
        use tollguard_ingester::service::raw_to_proto;
        let file = files.join(format!("{provider}.jsonl"));
        let mut customers = std::collections::BTreeMap::new();
        let records: Vec<(usize, pb::CallRecord)> = RecordReader::open(&file, Format::Auto, None)
            .unwrap()
            .map(|(_, r)| {
                let r = raw_to_proto(&r.unwrap());
                let who = if r.customer_id.is_empty() {
                    r.line_id.clone()
                } else {
                    r.customer_id.clone()
                };
                let next = customers.len();
                let i = *customers.entry(who).or_insert(next);
                (i % 2, r)
            })
            .collect();
        assert!(
            records.iter().any(|(h, _)| *h == 1),
            "{provider}: one half empty"
        );
        sends.push(tokio::spawn(send_lockstep(
            provider.clone(),
            records,
            [
                format!("http://127.0.0.1:{grpc}"),
                format!("http://127.0.0.1:{twin}"),
            ],
            100,
            Duration::from_secs(180),
        )));
    }
    let mut histories = Vec::new();
    for s in sends {
        histories.push(s.await.unwrap());
    }
    let sent = t0.elapsed();
    let batches: u64 = histories.iter().map(|h| h.batches).sum();
    stack.wait_processed(n as f64).await;
    let verdict = check_ingest(&histories, &events_in_kafka(&stack.calls).await);
    assert_eq!(verdict.acknowledged, n, "{verdict:?}");
    assert!(verdict.lost.is_empty(), "{verdict:?}");
    assert!(verdict.unexplained_duplicates.is_empty(), "{verdict:?}");
    assert_eq!(verdict.in_kafka, n, "{verdict:?}");

    let alerts = stack.alerts().await;
    assert!(
        has_burst(&alerts),
        "no critical burst: {:?}",
        incidents(&alerts)
    );
    assert_no_duplicate_versions(&alerts);
    let real = incidents(&alerts);
    let embedded = incidents(&embedded_incidents(&files, &stack.key, &stack.policies).await);
    assert_eq!(
        critical(&real),
        critical(&embedded),
        "real {real:?} embedded {embedded:?}"
    );
    eprintln!(
        "RELIABILITY two-ingesters: acknowledged={} in_kafka={} lost={} duplicated={} batches={batches} sent_in={sent:?} \
         critical={} (same as embedded)",
        verdict.acknowledged,
        verdict.in_kafka,
        verdict.lost.len(),
        verdict.duplicated,
        critical(&real).len()
    );
}
