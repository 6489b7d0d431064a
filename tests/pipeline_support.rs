//! The real pipeline as separate processes: an ingester per carrier, the
//! correlator and the notifier (the built binaries) against the real Kafka
//! broker and Redis server, plus the simulated scenario files and the
//! embedded pipeline's verdict on them. Included with `#[path]` by the
//! end-to-end tests.

#![allow(dead_code)]

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
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::consume_all;
use tollguard_tests::*;

pub const CARRIERS: [(&str, &str); 4] = [
    ("kpn", "NL"),
    ("bt", "GB"),
    ("vodafone", "NL"),
    ("odido", "NL"),
];

pub struct Stack {
    pub dir: PathBuf,
    pub key: PathBuf,
    pub policies: PathBuf,
    pub calls: String,
    pub alerts: String,
    pub group: String,
    pub prefix: String,
    pub ingesters: Vec<(String, u16, Proc)>,
    pub correlator: Option<Proc>,
    pub correlator_http: u16,
    /// The notifier, when the stack started one (see [`Stack::start`]).
    pub notifier: Option<Proc>,
}

pub fn common_env(dir: &Path) -> Vec<(String, String)> {
    let _ = dir;
    vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".into(), kafka()),
        ("TOLLGUARD_LOG_FORMAT".into(), "json".into()),
    ]
}

impl Stack {
    pub fn correlator_env(&self) -> Vec<(String, String)> {
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

    pub async fn start_correlator(&mut self, n: usize) {
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

    /// Ingesters, correlator and a notifier with a default configuration.
    pub async fn start(dir: &Path) -> Stack {
        let mut s = Stack::start_without_notifier(dir).await;
        let nhttp = free_port();
        let mut env = common_env(dir);
        env.extend([
            (
                "TOLLGUARD__LISTEN__HTTP".into(),
                format!("127.0.0.1:{nhttp}"),
            ),
            ("TOLLGUARD__ALERTS_TOPIC".into(), s.alerts.clone()),
            ("TOLLGUARD__GROUP".into(), format!("{}-notifier", s.group)),
        ]);
        let n = Proc::spawn(dir, "notifier", &bin("tollguard-notifier"), &[], &env);
        wait_ready(&n, nhttp, Duration::from_secs(60)).await;
        s.notifier = Some(n);
        s
    }

    /// Ingesters for every carrier and the correlator; the caller starts
    /// the notifier it needs.
    pub async fn start_without_notifier(dir: &Path) -> Stack {
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
            notifier: None,
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
                // plaintext development mode (mTLS: tests/security_*.rs)
                ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
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
        s
    }

    /// Sends each carrier's file with `tollguard send`, all in parallel.
    pub fn send_all(&self, files: &Path) {
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
    pub fn send_sequential(&self, files: &Path) {
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
    pub fn send_one(&self, files: &Path, provider: &str, n: usize) {
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

    pub async fn alerts(&self) -> Vec<pb::Alert> {
        consume_all(&kafka(), &self.alerts, Duration::from_secs(20))
            .await
            .unwrap()
            .iter()
            .map(|r| pb::Alert::decode(r.payload.as_slice()).unwrap())
            .collect()
    }

    /// Waits until the correlator has processed `n` events (counting
    /// re-deliveries).
    pub async fn wait_processed(&self, n: f64) {
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

/// The consortium scenario (the 2011 case and a distributed IRSF campaign
/// among 40 enterprises over 3 days): (directory of per-carrier files,
/// record count).
pub fn scenario(dir: &Path) -> (PathBuf, usize) {
    scenario_of(dir, Preset::Consortium)
}

/// `preset` among 40 enterprises over 3 days.
pub fn scenario_of(dir: &Path, preset: Preset) -> (PathBuf, usize) {
    let out = dir.join("sim");
    let (n, _) = simulate(
        &SimulateArgs {
            out: out.clone(),
            preset,
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
pub async fn embedded_incidents(files: &Path, key: &Path, policies: &Path) -> Vec<pb::Alert> {
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
pub fn incidents(alerts: &[pb::Alert]) -> BTreeMap<String, (i32, i32)> {
    let mut m = BTreeMap::new();
    for a in alerts {
        let e = m
            .entry(a.incident_id.clone())
            .or_insert((a.rule, a.severity));
        e.1 = e.1.max(a.severity);
    }
    m
}

pub fn critical(m: &BTreeMap<String, (i32, i32)>) -> BTreeSet<String> {
    m.iter()
        .filter(|(_, (_, s))| *s == pb::Severity::Critical as i32)
        .map(|(k, _)| k.clone())
        .collect()
}

pub fn assert_no_duplicate_versions(alerts: &[pb::Alert]) {
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
