//! The labelled suite as a new user runs it: `tollguard simulate`, then each
//! carrier's file streamed to its ingester with `tollguard send`, all four
//! at once and unpaced, into the deployed services on the real Kafka and
//! Redis; the alerts read back from the alerts topic are scored like
//! `tollguard eval` and must match the embedded run.
//!
//! Unpaced, the carriers' feeds drift days apart in event time (the
//! smallest file is sent in a second); the correlator's alignment
//! (`[alignment]`, on in the example config) merges them back in event
//! time, so the cross-carrier
//! campaigns (a burst over two carriers, callbacks to numbers that rang
//! through another carrier) are caught as early as in the embedded run.

#[path = "pipeline_support.rs"]
mod pipeline;

use pipeline::*;
use tollguard_cli::common::PipelineOpts;
use tollguard_cli::eval::{EvalArgs, evaluate, score, suite};
use tollguard_cli::simulate::{Preset, SimulateArgs, run as simulate};
use tollguard_tests::{http_get, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_sent_unpaced_through_the_services_scores_like_the_embedded_run() {
    let (seed, enterprises) = (2011, 20);
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("sim");
    let (n, _) = simulate(
        &SimulateArgs {
            out: files.clone(),
            preset: Preset::Suite,
            seed,
            days: None,
            enterprises: Some(enterprises),
        },
        &mut Vec::new(),
    )
    .unwrap();
    // One correlator with alignment on, as deploy/examples/correlator.toml
    // runs it (off by default), with the default bounds. The four files are
    // sent in less than the aligner's warm-up (idle_ms), so nearly the whole
    // replay is held at once (carriers days apart in event time within every
    // partition): with a bound of 10,000 the aligner released the earliest
    // events past the slowest lane (17,715 of 27,715 here) and the
    // distributed campaign was caught at 1,200-2,160 s instead of 960 s in
    // three runs of four. The default holds it whole; the forced-release
    // counter says so.
    let mut stack = Stack::start_ingesters(dir.path()).await;
    let http = stack.correlator_http;
    let align = [("TOLLGUARD__ALIGNMENT__ENABLED".into(), "true".into())];
    stack.correlator = Some(stack.spawn_correlator("correlator", http, &align).await);
    stack.send_all(&files);
    stack.wait_processed(n as f64).await;
    let name = "tollguard_correlator_alignment_forced_releases_total";
    let (_, body) = http_get(http, "/metrics").await.expect("metrics");
    assert!(body.contains(&format!("\n{name} ")), "{name} exported");
    let forced = metric(http, name).await;
    assert_eq!(
        forced, 0.0,
        "events released at the alignment bound, out of order"
    );
    let pipeline = PipelineOpts {
        rules: None,
        policies: Some(stack.policies.clone()),
        key_file: Some(stack.key.clone()),
        key_id: "k1".into(),
        risk_table: None,
        rate_deck: None,
        range_digits: 2,
    };
    let (key, _) = pipeline.key().unwrap();
    let sent = score(
        suite(seed, enterprises),
        stack.alerts().await,
        &key,
        &pipeline,
    )
    .unwrap()
    .report;
    let embedded = evaluate(&EvalArgs {
        seed,
        enterprises,
        json: None,
        svg: None,
        kafka: None,
        redis: None,
        pipeline,
    })
    .await
    .unwrap()
    .report;
    let table: String = sent
        .campaigns
        .iter()
        .zip(&embedded.campaigns)
        .map(|(a, b)| {
            format!(
                "{:<22} sent {:?} s {:?} | embedded {:?} s {:?}\n",
                a.campaign, a.first_alert_s, a.rules, b.first_alert_s, b.rules
            )
        })
        .collect();
    eprintln!("{table}");
    for (a, b) in sent.campaigns.iter().zip(&embedded.campaigns) {
        assert!(a.detected && b.detected, "{} missed\n{table}", a.campaign);
        assert_eq!(a.rules, b.rules, "{}\n{table}", a.campaign);
        let (x, y) = (a.first_alert_s.unwrap(), b.first_alert_s.unwrap());
        assert!(
            (x - y).abs() <= 60,
            "{}: first alert {x} s sent vs {y} s embedded\n{table}",
            a.campaign
        );
    }
    assert_eq!(sent.false_critical_incidents, 0, "{table}");
    assert!(
        sent.false_positive_incidents.len() <= embedded.false_positive_incidents.len(),
        "false positives sent {:?}, embedded {:?}",
        sent.false_positive_incidents,
        embedded.false_positive_incidents
    );
}
