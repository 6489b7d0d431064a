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
    /// The Kafka bootstrap the stack's services use (the shared broker, or
    /// a test's own [`Broker`]).
    pub bootstrap: String,
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
    /// [`common_env`] with the stack's own Kafka bootstrap.
    pub fn base_env(&self) -> Vec<(String, String)> {
        let mut env = common_env(&self.dir);
        for (k, v) in &mut env {
            if k == "TOLLGUARD__KAFKA__BOOTSTRAP" {
                v.clone_from(&self.bootstrap);
            }
        }
        env
    }

    pub fn correlator_env(&self) -> Vec<(String, String)> {
        let mut env = self.base_env();
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
            // As the chart does: the consortium's carriers hold pruning
            // back until each has been seen.
            (
                "TOLLGUARD__EXPECTED_PROVIDERS".into(),
                format!(
                    "[{}]",
                    CARRIERS
                        .iter()
                        .map(|(p, _)| format!("\"{p}\""))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ),
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
        let mut s = Stack::start_ingesters(dir).await;
        s.start_correlator(1).await;
        s
    }

    /// Ingesters for every carrier only; the caller starts the
    /// correlator(s) it needs ([`Stack::spawn_correlator`]).
    pub async fn start_ingesters(dir: &Path) -> Stack {
        Stack::start_ingesters_on(dir, &kafka(), &[]).await
    }

    /// Ingesters for every carrier on the broker at `bootstrap`, with
    /// `extra` environment overrides (e.g. producer queue and timeouts).
    pub async fn start_ingesters_on(
        dir: &Path,
        bootstrap: &str,
        extra: &[(String, String)],
    ) -> Stack {
        let key = key_file(dir);
        let policies = dir.join("policies.toml");
        std::fs::write(&policies, VICTIM_POLICY).unwrap();
        let id = unique("e2e");
        let mut s = Stack {
            dir: dir.to_path_buf(),
            bootstrap: bootstrap.to_string(),
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
        for (provider, _) in CARRIERS {
            let grpc = free_port();
            let p = s
                .spawn_ingester_with(
                    &format!("ingester-{provider}"),
                    provider,
                    grpc,
                    free_port(),
                    extra,
                )
                .await;
            s.ingesters.push((provider.to_string(), grpc, p));
        }
        s
    }

    /// The environment of an ingester for `provider` on the given ports.
    pub fn ingester_env(&self, provider: &str, grpc: u16, http: u16) -> Vec<(String, String)> {
        let country = CARRIERS
            .iter()
            .find(|(p, _)| *p == provider)
            .map_or("NL", |(_, c)| *c);
        let mut env = self.base_env();
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
                self.key.display().to_string(),
            ),
            ("TOLLGUARD__TOPIC".into(), self.calls.clone()),
            // plaintext development mode (mTLS: tests/security_*.rs)
            ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
        ]);
        env
    }

    /// Starts an ingester for `provider` (another one, or a restart on the
    /// same ports) logging to `<name>.log`, and waits until it is ready.
    pub async fn spawn_ingester(&self, name: &str, provider: &str, grpc: u16, http: u16) -> Proc {
        self.spawn_ingester_with(name, provider, grpc, http, &[])
            .await
    }

    /// [`Stack::spawn_ingester`] with `extra` environment overrides.
    pub async fn spawn_ingester_with(
        &self,
        name: &str,
        provider: &str,
        grpc: u16,
        http: u16,
        extra: &[(String, String)],
    ) -> Proc {
        let mut env = self.ingester_env(provider, grpc, http);
        env.extend(extra.iter().cloned());
        let p = Proc::spawn(&self.dir, name, &bin("tollguard-ingester"), &[], &env);
        wait_ready(&p, http, Duration::from_secs(60)).await;
        p
    }

    /// Starts another correlator of the stack's group, its health on `http`,
    /// with `extra` environment overrides (e.g. a Redis Cluster), and waits
    /// until it is ready. The stack does not own it.
    pub async fn spawn_correlator(
        &self,
        name: &str,
        http: u16,
        extra: &[(String, String)],
    ) -> Proc {
        let mut env = self.correlator_env();
        env.retain(|(k, _)| k != "TOLLGUARD__LISTEN__HTTP");
        env.push((
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{http}"),
        ));
        env.extend(extra.iter().cloned());
        let p = Proc::spawn(&self.dir, name, &bin("tollguard-correlator"), &[], &env);
        wait_ready(&p, http, Duration::from_secs(60)).await;
        p
    }

    /// Waits until the correlator group has committed every record of the
    /// calls topic.
    pub async fn wait_group_caught_up(&self, within: Duration) {
        let (b, g, c) = (
            self.bootstrap.clone(),
            self.group.clone(),
            self.calls.clone(),
        );
        wait_for(
            "the correlator group to commit every record",
            within,
            || {
                let (b, g, c) = (b.clone(), g.clone(), c.clone());
                async move { (group_lag_at(&b, &g, &c) == Some(0)).then_some(()) }
            },
        )
        .await;
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

    /// Sends the carriers' files one after another (a backfill): each
    /// carrier's file only once the correlator has processed every event
    /// sent before it, so no carrier is seen before the previous one's whole
    /// history went through the windows.
    pub async fn send_sequential(&self, files: &Path) {
        let mut sent = 0usize;
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
            sent += lines(files, provider);
            self.wait_processed(sent as f64).await;
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
        consume_all(&self.bootstrap, &self.alerts, Duration::from_secs(20))
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

/// Records in a carrier's file.
pub fn lines(files: &Path, provider: &str) -> usize {
    std::fs::read_to_string(files.join(format!("{provider}.jsonl")))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
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

// ---------------------------------------------------------------------------
// History checking for the fault tests: what a carrier's client was told
// (acknowledged event ids), what Kafka holds, and the verdict.

/// What one client was told while sending a carrier's file.
#[derive(Debug, Default, Clone)]
pub struct SendHistory {
    /// The carrier.
    pub provider: String,
    /// Event ids acknowledged as accepted.
    pub acked: BTreeSet<String>,
    /// Event ids of batches acknowledged only after a failed attempt: the
    /// failed attempt may have reached Kafka, so these may be there twice
    /// (the correlator drops the copy by event id).
    pub retried: BTreeSet<String>,
    /// Failed attempts by gRPC code (`Unavailable`, `ResourceExhausted`…).
    pub failures: BTreeMap<String, u64>,
    /// Acknowledged batches.
    pub batches: u64,
    /// Longest time from a failed attempt to the next acknowledgement.
    pub longest_outage: Duration,
}

impl SendHistory {
    /// Failed attempts in all.
    pub fn failed_attempts(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Sends `provider`'s `file` to the ingester at `addr` with `PublishBatch`
/// in batches of `batch`, pausing `pause` after each acknowledgement, and
/// resending a batch (after reconnecting) until it is acknowledged or
/// `within` passes — a carrier's client behaving as the contract asks.
/// `progress` counts acknowledged records as they come.
pub async fn send_tracked(
    addr: String,
    provider: String,
    file: PathBuf,
    batch: usize,
    pause: Duration,
    within: Duration,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> SendHistory {
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    use tollguard_cli::input::RecordReader;
    use tollguard_ingester::service::raw_to_proto;
    use tollguard_proto::v1::ingest_client::IngestClient;

    let deadline = Instant::now() + within;
    let records: Vec<pb::CallRecord> = RecordReader::open(&file, Format::Auto, None)
        .unwrap()
        .map(|(line, r)| raw_to_proto(&r.unwrap_or_else(|e| panic!("{file:?}:{line}: {e}"))))
        .collect();
    let mut h = SendHistory {
        provider: provider.clone(),
        ..Default::default()
    };
    let mut client: Option<IngestClient<tonic::transport::Channel>> = None;
    for (i, chunk) in records.chunks(batch).enumerate() {
        let req = pb::PublishRequest {
            batch_id: i as u64 + 1,
            records: chunk.to_vec(),
        };
        let mut failed_since: Option<Instant> = None;
        loop {
            assert!(
                Instant::now() < deadline,
                "{provider}: batch {} not acknowledged within {within:?} ({h:?})",
                i + 1
            );
            let c = match client.as_mut() {
                Some(c) => c,
                None => match tonic::transport::Endpoint::from_shared(addr.clone())
                    .unwrap()
                    .connect_timeout(Duration::from_secs(2))
                    .connect()
                    .await
                {
                    Ok(ch) => client.insert(IngestClient::new(ch)),
                    Err(_) => {
                        *h.failures.entry("connect".into()).or_default() += 1;
                        failed_since.get_or_insert_with(Instant::now);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(Duration::from_secs(10));
            match c.publish_batch(r).await {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    assert_eq!(
                        (ack.accepted as usize, ack.rejected),
                        (chunk.len(), 0),
                        "{provider}: batch {} partly rejected: {:?}",
                        i + 1,
                        ack.errors
                    );
                    for r in chunk {
                        h.acked.insert(r.event_id.clone());
                        if failed_since.is_some() {
                            h.retried.insert(r.event_id.clone());
                        }
                    }
                    if let Some(t) = failed_since {
                        h.longest_outage = h.longest_outage.max(t.elapsed());
                    }
                    h.batches += 1;
                    progress.fetch_add(chunk.len(), Ordering::SeqCst);
                    break;
                }
                Err(st) => {
                    *h.failures.entry(format!("{:?}", st.code())).or_default() += 1;
                    failed_since.get_or_insert_with(Instant::now);
                    let wait = st
                        .metadata()
                        .get("retry-after-ms")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .unwrap_or(200)
                        .min(2_000);
                    if !matches!(st.code(), tonic::Code::ResourceExhausted) {
                        client = None; // reconnect: the ingester may be gone
                    }
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    h
}

/// Copies of each (provider, event id) on the calls topic `topic`.
pub async fn events_in_kafka(topic: &str) -> BTreeMap<(String, String), usize> {
    events_in_kafka_at(&kafka(), topic).await
}

/// [`events_in_kafka`] on the broker at `bootstrap`.
pub async fn events_in_kafka_at(bootstrap: &str, topic: &str) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for r in consume_all(bootstrap, topic, Duration::from_secs(30))
        .await
        .unwrap()
    {
        let Ok(e) = pb::CallEvent::decode(r.payload.as_slice()) else {
            continue; // a test's poison record
        };
        *m.entry((e.provider_id, e.event_id)).or_default() += 1;
    }
    m
}

/// The verdict of comparing what clients were told with what Kafka holds.
#[derive(Debug, Default)]
pub struct IngestVerdict {
    /// Events acknowledged to the clients.
    pub acknowledged: usize,
    /// Distinct events in Kafka.
    pub in_kafka: usize,
    /// Acknowledged but not in Kafka (must be none).
    pub lost: Vec<(String, String)>,
    /// In Kafka more than once (at-least-once redelivery of a batch whose
    /// acknowledgement the client never got).
    pub duplicated: usize,
    /// Duplicates of events whose batch was acknowledged at the first
    /// attempt: the system itself published twice (must be none).
    pub unexplained_duplicates: Vec<(String, String)>,
    /// In Kafka but never acknowledged (a batch refused after it was
    /// partly written; must be none when every batch ends acknowledged).
    pub unacknowledged: usize,
}

/// Compares the histories of all clients with the calls topic's content.
pub fn check_ingest(
    histories: &[SendHistory],
    kafka: &BTreeMap<(String, String), usize>,
) -> IngestVerdict {
    let mut v = IngestVerdict {
        in_kafka: kafka.len(),
        ..Default::default()
    };
    let mut acked = BTreeSet::new();
    for h in histories {
        for id in &h.acked {
            let k = (h.provider.clone(), id.clone());
            v.acknowledged += 1;
            match kafka.get(&k) {
                None => v.lost.push(k.clone()),
                Some(1) => {}
                Some(_) => {
                    v.duplicated += 1;
                    if !h.retried.contains(id) {
                        v.unexplained_duplicates.push(k.clone());
                    }
                }
            }
            acked.insert(k);
        }
    }
    v.unacknowledged = kafka.keys().filter(|k| !acked.contains(*k)).count();
    v
}

// ---------------------------------------------------------------------------
// A test's own Kafka broker: for faults that must not touch the shared one.

/// A dedicated single-node KRaft broker (broker and controller in one JVM)
/// of one test, from the jars `deploy/local/services.sh` installed
/// (`TOLLGUARD_KAFKA_HOME`), configured like the shared broker but on its
/// own loopback ports with its log directory under the test's temporary
/// directory. Killed on drop; a detached watchdog also kills it (SIGKILL
/// works on a stopped process too) once the test process is gone, so a
/// killed test run leaves no broker behind.
pub struct Broker {
    /// Data, configuration and logs.
    pub dir: PathBuf,
    /// Client port.
    pub port: u16,
    /// Controller port.
    pub cport: u16,
    proc: Option<Proc>,
    starts: usize,
}

fn kafka_home() -> PathBuf {
    PathBuf::from(env("TOLLGUARD_KAFKA_HOME"))
}

/// Java as `services.sh` picks it: `$JAVA_HOME/bin/java`, else `java`.
fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME").map_or_else(
        || PathBuf::from("java"),
        |h| PathBuf::from(h).join("bin/java"),
    )
}

/// True when the broker at `bootstrap` answers a metadata request.
pub async fn broker_answers(bootstrap: &str) -> bool {
    let b = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        use rdkafka::ClientConfig;
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let Ok(c) = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .create::<BaseConsumer>()
        else {
            return false;
        };
        c.fetch_metadata(None, Duration::from_secs(2))
            .is_ok_and(|m| !m.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}

impl Broker {
    /// Formats the storage in `dir` and starts the broker; waits until it
    /// answers (at most 120 s: a JVM on a loaded 2-core machine).
    pub async fn start(dir: &Path) -> Broker {
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let (port, cport) = (free_port(), free_port());
        let props = dir.join("server.properties");
        std::fs::write(
            &props,
            format!(
                "process.roles=broker,controller\nnode.id=1\n\
                 controller.quorum.voters=1@127.0.0.1:{cport}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 inter.broker.listener.name=PLAINTEXT\ncontroller.listener.names=CONTROLLER\n\
                 log.dirs={}\nnum.partitions=4\ndefault.replication.factor=1\nmin.insync.replicas=1\n\
                 auto.create.topics.enable=true\ndelete.topic.enable=true\n\
                 offsets.topic.replication.factor=1\noffsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
                 transaction.state.log.num.partitions=4\n\
                 share.coordinator.state.topic.replication.factor=1\n\
                 share.coordinator.state.topic.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\nnum.network.threads=2\nnum.io.threads=2\n\
                 num.recovery.threads.per.data.dir=1\nlog.retention.hours=24\n\
                 log.segment.bytes=67108864\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let home = kafka_home();
        let out = Command::new(java())
            .args([
                "-Xmx256m",
                "-XX:+UseSerialGC",
                &format!(
                    "-Dlog4j2.configurationFile={}",
                    home.join("config/tools-log4j2.properties").display()
                ),
                "-cp",
                &format!("{}/libs/*", home.display()),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                &kafka_cluster_id(),
                "-c",
                props.to_str().unwrap(),
            ])
            .output()
            .expect("java (Kafka's StorageTool)");
        assert!(
            out.status.success(),
            "formatting the dedicated broker's storage failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut b = Broker {
            dir: dir.to_path_buf(),
            port,
            cport,
            proc: None,
            starts: 0,
        };
        b.launch();
        b.wait_ready(Duration::from_secs(120)).await;
        b
    }

    fn launch(&mut self) {
        self.starts += 1;
        let home = kafka_home();
        let p = Proc::spawn(
            &self.dir,
            &format!("broker-{}", self.starts),
            &java(),
            &[
                "-Xmx384m",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                &format!("-Dkafka.logs.dir={}", self.dir.join("logs").display()),
                &format!(
                    "-Dlog4j2.configurationFile={}",
                    home.join("config/log4j2.properties").display()
                ),
                "-cp",
                &format!("{}/libs/*", home.display()),
                "kafka.Kafka",
                self.dir.join("server.properties").to_str().unwrap(),
            ],
            &[],
        );
        // Watchdog: kills this broker once the test process is gone.
        let (me, pid) = (std::process::id(), p.child.id());
        let st = Command::new("setsid")
            .args([
                "-f",
                "sh",
                "-c",
                &format!(
                    "while kill -0 {me} 2>/dev/null; do sleep 2; done; \
                     grep -q kafka.Kafka /proc/{pid}/cmdline 2>/dev/null && kill -9 {pid}"
                ),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("broker watchdog");
        assert!(st.success(), "could not start the broker watchdog");
        self.proc = Some(p);
    }

    /// `127.0.0.1:<port>`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's pid (the JVM).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("broker running").child.id()
    }

    /// Waits until the broker answers a metadata request.
    pub async fn wait_ready(&self, within: Duration) {
        let b = self.bootstrap();
        let log = self.dir.join("logs/server.log");
        wait_for(
            &format!("the dedicated broker on {b} (log: {})", log.display()),
            within,
            || {
                let b = b.clone();
                async move { broker_answers(&b).await.then_some(()) }
            },
        )
        .await;
    }

    /// SIGKILL (no controlled shutdown, no flush) and wait for the exit.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Starts the broker again on the same ports and log directory (after
    /// [`Broker::kill9`]); waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.proc.is_none(), "the broker is still running");
        self.launch();
        self.wait_ready(Duration::from_secs(120)).await;
    }
}

// ---------------------------------------------------------------------------
// A test's own Redis Cluster with replicas: for node failures that must not
// touch the shared cluster of `services.sh` (three primaries, no replicas).

/// `redis-cli -p <port> <args…>` output (empty when it fails).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\r', ""))
        .unwrap_or_default()
}

/// A field of `INFO`/`CLUSTER INFO` output.
pub fn info_field(text: &str, field: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// A Redis Cluster of `primaries` primaries with one replica each, every
/// node a private `redis-server` (no persistence, like the shared cluster;
/// `cluster-node-timeout` 2 s so a replica takes over quickly), each in its
/// own directory (its `nodes.conf` survives a kill, so a restarted node
/// rejoins). Killed on drop.
pub struct RedisCluster {
    pub dir: PathBuf,
    /// Client port of each node, in creation order: the first `primaries`
    /// start as primaries.
    pub ports: Vec<u16>,
    nodes: Vec<Option<Proc>>,
    starts: usize,
}

impl RedisCluster {
    pub async fn start(dir: &Path, primaries: usize) -> RedisCluster {
        let n = primaries * 2;
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut c = RedisCluster {
            dir: dir.to_path_buf(),
            ports,
            nodes: (0..n).map(|_| None).collect(),
            starts: 0,
        };
        for i in 0..n {
            c.launch(i);
        }
        for p in &c.ports {
            wait_redis(*p, Duration::from_secs(20)).await;
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ports = c.ports.clone();
        wait_for(
            "the dedicated cluster to be ok on every node, replicas in sync",
            Duration::from_secs(60),
            || {
                let ports = ports.clone();
                async move {
                    let ok = ports.iter().all(|p| {
                        info_field(&redis_cli(*p, &["cluster", "info"]), "cluster_state").as_deref()
                            == Some("ok")
                    });
                    let synced = ports.iter().all(|p| {
                        let i = redis_cli(*p, &["info", "replication"]);
                        info_field(&i, "role").as_deref() == Some("master")
                            || info_field(&i, "master_link_status").as_deref() == Some("up")
                    });
                    (ok && synced).then_some(())
                }
            },
        )
        .await;
        c
    }

    fn launch(&mut self, i: usize) {
        self.starts += 1;
        let d = self.dir.join(format!("node{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let port = self.ports[i].to_string();
        let dir_s = d.display().to_string();
        let args = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_s,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        self.nodes[i] = Some(Proc::spawn(
            &d,
            &format!("redis-{}", self.starts),
            Path::new("redis-server"),
            &args,
            &[],
        ));
    }

    /// `redis://127.0.0.1:<port>/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// The correlator's override that puts its windows on this cluster.
    pub fn correlator_env(&self) -> Vec<(String, String)> {
        let nodes: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        vec![(
            "TOLLGUARD__REDIS__CLUSTER_NODES".into(),
            format!("[{}]", nodes.join(",")),
        )]
    }

    /// Node `i`'s replication role (`master`/`slave`), None if it does not
    /// answer.
    pub fn role(&self, i: usize) -> Option<String> {
        info_field(&redis_cli(self.ports[i], &["info", "replication"]), "role")
    }

    /// The index of node `i`'s replica (a node whose master is `i`).
    pub fn replica_of(&self, i: usize) -> Option<usize> {
        (0..self.ports.len()).find(|&j| {
            let r = redis_cli(self.ports[j], &["info", "replication"]);
            info_field(&r, "role").as_deref() == Some("slave")
                && info_field(&r, "master_port").as_deref() == Some(&self.ports[i].to_string())
        })
    }

    /// SIGKILL node `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    /// Starts node `i` again on its port and directory.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} still running");
        self.launch(i);
        wait_redis(self.ports[i], Duration::from_secs(20)).await;
    }
}
