//! End to end on the real path: ingesters for every carrier, the correlator
//! and the notifier as separate processes (the built binaries) against the
//! real Kafka broker and Redis server; the 2011 scenario sent with
//! `tollguard send`; the incident read back from `tollguard.alerts.v1` with a
//! plain Kafka consumer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prost::Message;
use tollguard_cli::common::PipelineOpts;
use tollguard_cli::demo::VICTIM_POLICY;
use tollguard_cli::input::Format;
use tollguard_cli::replay::{ReplayArgs, run as replay};
use tollguard_cli::simulate::{Preset, SimulateArgs, run as simulate};
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings, consume_all};
use tollguard_tests::*;

const CARRIERS: [(&str, &str); 4] = [
    ("kpn", "NL"),
    ("bt", "GB"),
    ("vodafone", "NL"),
    ("odido", "NL"),
];

struct Stack {
    dir: PathBuf,
    key: PathBuf,
    policies: PathBuf,
    calls: String,
    alerts: String,
    group: String,
    prefix: String,
    ingesters: Vec<(String, u16, Proc)>,
    correlator: Option<Proc>,
    correlator_http: u16,
    notifier: Proc,
}

fn common_env(dir: &Path) -> Vec<(String, String)> {
    let _ = dir;
    vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".into(), kafka()),
        ("TOLLGUARD_LOG_FORMAT".into(), "json".into()),
    ]
}

impl Stack {
    fn correlator_env(&self) -> Vec<(String, String)> {
        let mut env = common_env(&self.dir);
        env.extend([
            (
                "TOLLGUARD__LISTEN__HTTP".into(),
                format!("127.0.0.1:{}", self.correlator_http),
            ),
            ("TOLLGUARD__REDIS__URL".into(), redis()),
            ("TOLLGUARD__REDIS__KEY_PREFIX".into(), self.prefix.clone()),
            ("TOLLGUARD__TOPICS__CALLS".into(), self.calls.clone()),
            ("TOLLGUARD__TOPICS__ALERTS".into(), self.alerts.clone()),
            (
                "TOLLGUARD__TOPICS__DLQ".into(),
                format!("{}.dlq", self.calls),
            ),
            ("TOLLGUARD__GROUP".into(), self.group.clone()),
            (
                "TOLLGUARD__POLICIES_FILE".into(),
                self.policies.display().to_string(),
            ),
            ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID".into(), "k1".into()),
            (
                "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE".into(),
                self.key.display().to_string(),
            ),
        ]);
        env
    }

    async fn start_correlator(&mut self, n: usize) {
        let p = Proc::spawn(
            &self.dir,
            &format!("correlator-{n}"),
            &bin("tollguard-correlator"),
            &[],
            &self.correlator_env(),
        );
        wait_ready(&p, self.correlator_http, Duration::from_secs(60)).await;
        self.correlator = Some(p);
    }

    async fn start(dir: &Path) -> Stack {
        let key = key_file(dir);
        let policies = dir.join("policies.toml");
        std::fs::write(&policies, VICTIM_POLICY).unwrap();
        let id = unique("e2e");
        let mut s = Stack {
            dir: dir.to_path_buf(),
            key,
            policies,
            calls: format!("tgtest.{id}.calls"),
            alerts: format!("tgtest.{id}.alerts"),
            group: format!("{id}-correlator"),
            prefix: format!("tgtest:{id}:"),
            ingesters: Vec::new(),
            correlator: None,
            correlator_http: free_port(),
            notifier: Proc::spawn(dir, "placeholder", Path::new("/bin/true"), &[], &[]),
        };
        for (provider, country) in CARRIERS {
            let (grpc, http) = (free_port(), free_port());
            let mut env = common_env(dir);
            env.extend([
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
                (
                    "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE".into(),
                    s.key.display().to_string(),
                ),
                ("TOLLGUARD__TOPIC".into(), s.calls.clone()),
            ]);
            let p = Proc::spawn(
                dir,
                &format!("ingester-{provider}"),
                &bin("tollguard-ingester"),
                &[],
                &env,
            );
            wait_ready(&p, http, Duration::from_secs(60)).await;
            s.ingesters.push((provider.to_string(), grpc, p));
        }
        s.start_correlator(1).await;
        let nhttp = free_port();
        let mut env = common_env(dir);
        env.extend([
            (
                "TOLLGUARD__LISTEN__HTTP".into(),
                format!("127.0.0.1:{nhttp}"),
            ),
            ("TOLLGUARD__ALERTS_TOPIC".into(), s.alerts.clone()),
            ("TOLLGUARD__GROUP".into(), format!("{id}-notifier")),
        ]);
        s.notifier = Proc::spawn(dir, "notifier", &bin("tollguard-notifier"), &[], &env);
        wait_ready(&s.notifier, nhttp, Duration::from_secs(60)).await;
        s
    }

    /// Sends each carrier's file with `tollguard send`, all in parallel.
    fn send_all(&self, files: &Path) {
        let children: Vec<_> = self
            .ingesters
            .iter()
            .map(|(provider, grpc, _)| {
                let file = files.join(format!("{provider}.jsonl"));
                let out = self.dir.join(format!("send-{provider}.log"));
                let child = Command::new(bin("tollguard"))
                    .args([
                        "send",
                        file.to_str().unwrap(),
                        "--ingester",
                        &format!("http://127.0.0.1:{grpc}"),
                    ])
                    .stderr(std::fs::File::create(&out).unwrap())
                    .spawn()
                    .unwrap();
                (provider.clone(), out, child)
            })
            .collect();
        for (provider, out, mut child) in children {
            let st = child.wait().unwrap();
            let log = std::fs::read_to_string(&out).unwrap_or_default();
            assert!(st.success(), "send to {provider} failed: {log}");
            assert!(log.contains(" 0 rejected"), "{provider}: {log}");
        }
    }

    /// Sends the carriers' files one after another (a backfill).
    fn send_sequential(&self, files: &Path) {
        for (provider, grpc, _) in &self.ingesters {
            let file = files.join(format!("{provider}.jsonl"));
            let st = Command::new(bin("tollguard"))
                .args([
                    "send",
                    file.to_str().unwrap(),
                    "--ingester",
                    &format!("http://127.0.0.1:{grpc}"),
                ])
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "send to {provider}");
        }
    }

    /// Re-sends the first `n` lines of one carrier's file.
    fn send_one(&self, files: &Path, provider: &str, n: usize) {
        let (_, grpc, _) = self
            .ingesters
            .iter()
            .find(|(p, _, _)| p == provider)
            .unwrap();
        let text = std::fs::read_to_string(files.join(format!("{provider}.jsonl"))).unwrap();
        // A fresh event id so it is not a duplicate.
        let lines: Vec<String> = text
            .lines()
            .take(n)
            .map(|l| l.replacen("\"event_id\":\"", "\"event_id\":\"again-", 1))
            .collect();
        let file = self.dir.join(format!("{provider}-again.jsonl"));
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let st = Command::new(bin("tollguard"))
            .args([
                "send",
                file.to_str().unwrap(),
                "--ingester",
                &format!("http://127.0.0.1:{grpc}"),
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }

    async fn alerts(&self) -> Vec<pb::Alert> {
        consume_all(&kafka(), &self.alerts, Duration::from_secs(20))
            .await
            .unwrap()
            .iter()
            .map(|r| pb::Alert::decode(r.payload.as_slice()).unwrap())
            .collect()
    }

    /// Waits until the correlator has processed `n` events (counting
    /// re-deliveries).
    async fn wait_processed(&self, n: f64) {
        let port = self.correlator_http;
        wait_for(
            &format!("the correlator to process {n} events"),
            Duration::from_secs(180),
            || async move {
                (metric(port, "tollguard_correlator_events_total").await >= n).then_some(())
            },
        )
        .await;
    }
}

fn scenario(dir: &Path) -> (PathBuf, usize) {
    let out = dir.join("sim");
    let (n, _) = simulate(
        &SimulateArgs {
            out: out.clone(),
            preset: Preset::Consortium,
            seed: 11,
            days: Some(3),
            enterprises: Some(40),
        },
        &mut Vec::new(),
    )
    .unwrap();
    (out, n)
}

/// Incidents the embedded pipeline finds for the same files and key.
async fn embedded_incidents(files: &Path, key: &Path, policies: &Path) -> Vec<pb::Alert> {
    let args = ReplayArgs {
        files: CARRIERS
            .iter()
            .map(|(p, _)| files.join(format!("{p}.jsonl")))
            .collect(),
        json: true,
        format: Format::Auto,
        csv_mapping: None,
        home_country: "NL".into(),
        chunk: 5000,
        pipeline: PipelineOpts {
            rules: None,
            policies: Some(policies.to_path_buf()),
            key_file: Some(key.to_path_buf()),
            key_id: "k1".into(),
            risk_table: None,
            rate_deck: None,
            range_digits: 2,
        },
    };
    replay(&args, &mut Vec::new(), &mut Vec::new())
        .await
        .unwrap()
        .alerts
}

/// incident id → (rule, max severity)
fn incidents(alerts: &[pb::Alert]) -> BTreeMap<String, (i32, i32)> {
    let mut m = BTreeMap::new();
    for a in alerts {
        let e = m
            .entry(a.incident_id.clone())
            .or_insert((a.rule, a.severity));
        e.1 = e.1.max(a.severity);
    }
    m
}

fn critical(m: &BTreeMap<String, (i32, i32)>) -> BTreeSet<String> {
    m.iter()
        .filter(|(_, (_, s))| *s == pb::Severity::Critical as i32)
        .map(|(k, _)| k.clone())
        .collect()
}

fn assert_no_duplicate_versions(alerts: &[pb::Alert]) {
    let mut seen: BTreeMap<(String, u32), pb::Alert> = BTreeMap::new();
    for a in alerts {
        let mut norm = a.clone();
        norm.published_at = None;
        if let Some(prev) = seen.get(&(a.incident_id.clone(), a.version)) {
            // A re-publication after a crash must be the identical alert.
            assert_eq!(
                prev, &norm,
                "two different alerts share incident {} version {}",
                a.incident_id, a.version
            );
        }
        seen.insert((a.incident_id.clone(), a.version), norm);
    }
}

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
    let log = stack.notifier.log_text();
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
    let code = stack.notifier.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "notifier: {}", stack.notifier.log_text());
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
    stack.send_sequential(&files);
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
