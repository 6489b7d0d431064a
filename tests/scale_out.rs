//! Scale-out on the real path: three correlator replicas in one consumer
//! group with their windows on a three-node Redis Cluster (started by
//! `deploy/local/services.sh`) find the same critical incidents as the
//! embedded pipeline (itself checked against one correlator on one Redis by
//! `e2e_pipeline`), with no incident version published twice; and two
//! ingesters for the same carrier, the carrier's records split across them,
//! join as one.

#[path = "pipeline_support.rs"]
mod pipeline;

use std::time::{Duration, Instant};

use pipeline::*;
use tollguard_proto::v1 as pb;
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
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let stack = Stack::start_ingesters(dir.path()).await;
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
    let t0 = Instant::now();
    stack.send_all(&files);
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
        "{n} events through 3 correlators on a 3-node Redis Cluster in {:?}",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "flaky by construction: two feeds of one carrier replaying 3 days in seconds drift hours apart in event time, beyond the lane's allowed lateness (see RELIABILITY.md); run: cargo test -p tollguard-tests --test scale_out -- --ignored"]
async fn two_ingesters_for_one_carrier_share_its_records_and_join() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let mut stack = Stack::start_without_notifier(dir.path()).await;
    // A second ingester for every carrier (as behind a load balancer that
    // keeps a connection's records together, one exporter per set of
    // customers), each getting the records of every other customer of the
    // carrier's file. (Splitting a customer's calls across the two reorders
    // them; see RELIABILITY.md.)
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
    let split = dir.path().join("split");
    let (a, b) = (split.join("a"), split.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for (provider, _) in CARRIERS {
        let text = std::fs::read_to_string(files.join(format!("{provider}.jsonl"))).unwrap();
        let (mut x, mut y) = (String::new(), String::new());
        let mut calls = std::collections::BTreeMap::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let call = v["customer_id"]
                .as_str()
                .or(v["line_id"].as_str())
                .unwrap()
                .to_string();
            let next = calls.len();
            let i = *calls.entry(call).or_insert(next);
            let out = if i % 2 == 0 { &mut x } else { &mut y };
            out.push_str(l);
            out.push('\n');
        }
        std::fs::write(a.join(format!("{provider}.jsonl")), x).unwrap();
        std::fs::write(b.join(format!("{provider}.jsonl")), y).unwrap();
    }
    let first: Vec<_> = stack.ingesters.drain(..).collect();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sends = Vec::new();
    for (half, ingesters) in [
        (
            &a,
            first
                .iter()
                .map(|(p, g, _)| (p.clone(), *g))
                .collect::<Vec<_>>(),
        ),
        (
            &b,
            twins.iter().map(|(p, g, _)| (p.to_string(), *g)).collect(),
        ),
    ] {
        for (provider, grpc) in ingesters {
            sends.push(tokio::spawn(send_tracked(
                format!("http://127.0.0.1:{grpc}"),
                provider.clone(),
                half.join(format!("{provider}.jsonl")),
                500,
                Duration::ZERO,
                Duration::from_secs(120),
                progress.clone(),
            )));
        }
    }
    let mut histories = Vec::new();
    for s in sends {
        histories.push(s.await.unwrap());
    }
    stack.ingesters = first;
    stack.wait_processed(n as f64).await;
    let verdict = check_ingest(&histories, &events_in_kafka(&stack.calls).await);
    assert_eq!(verdict.acknowledged, n, "{verdict:?}");
    assert!(verdict.lost.is_empty(), "{verdict:?}");
    assert_eq!(verdict.duplicated, 0, "{verdict:?}");
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
}
