//! `tollguard eval --kafka --redis`: the labelled suite through the same
//! ingest, correlator and notifier code over the real broker and Redis
//! reaches the same verdicts as the in-process run.

use tollguard_cli::common::PipelineOpts;
use tollguard_cli::eval::{EvalArgs, run};
use tollguard_tests::*;

fn args(kafka: Option<String>, redis: Option<String>) -> EvalArgs {
    EvalArgs {
        seed: 2011,
        enterprises: 20,
        json: None,
        svg: None,
        kafka,
        redis,
        pipeline: PipelineOpts {
            rules: None,
            policies: None,
            key_file: None,
            key_id: "k1".into(),
            risk_table: None,
            rate_deck: None,
            range_digits: 2,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_over_real_kafka_and_redis_matches_the_in_process_run() {
    let mut out = Vec::new();
    let memory = run(&args(None, None), &mut out).await.unwrap();
    let mut out = Vec::new();
    let real = run(&args(Some(kafka()), Some(redis())), &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(real.records, memory.records);
    let verdict = |r: &tollguard_cli::eval::EvalReport| {
        r.campaigns
            .iter()
            .map(|c| (c.campaign.clone(), c.detected, c.rules.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(verdict(&real), verdict(&memory), "{text}");
    assert!(real.campaigns.iter().all(|c| c.detected), "{text}");
    assert_eq!(real.false_critical_incidents, 0, "{text}");
    // Over Kafka the carriers' events interleave across partitions in
    // another order than the in-process merge by event time, so a campaign
    // may be caught a little earlier or later; never minutes later.
    for (a, b) in real.campaigns.iter().zip(&memory.campaigns) {
        let (x, y) = (a.first_alert_s.unwrap(), b.first_alert_s.unwrap());
        assert!(
            x <= y + 300,
            "{}: {x} s over Kafka vs {y} s in process\n{text}",
            a.campaign
        );
    }
}
