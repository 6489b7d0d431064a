//! Fault suite: the real services as separate processes against the real
//! Kafka broker and Redis, a carrier's client that resends what was not
//! acknowledged ([`send_tracked`]), and a history checker comparing what the
//! clients were told with what Kafka holds, and the incidents and
//! notifications with a fault-free run of the same input (the embedded
//! pipeline, or a second notifier that is left alone).
//!
//! Each case stops by itself within about two minutes and uses its own
//! topics, groups and key prefixes. The Kafka broker faults (SIGSTOP, then
//! SIGKILL and restart) happen to a dedicated broker the test starts itself
//! ([`Broker`]), never to the shared one other tests use at the same time.
//!
//! Lines starting `RELIABILITY` on stderr (`--nocapture`) are the measured
//! figures quoted in RELIABILITY.md.

#[path = "pipeline_support.rs"]
mod pipeline;

#[path = "notifier_support.rs"]
mod support;

#[path = "../services/cli/src/audit.rs"]
mod audit;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pipeline::*;
use support::{Behaviour, Names, Notifier, Receiver, SECRET};
use tokio::task::JoinHandle;
use tollguard_tests::*;

/// Starts a paced, tracked send of every carrier's file to the stack's
/// ingesters; returns the tasks and per-carrier progress counters.
fn send_everything(
    stack: &Stack,
    files: &Path,
    batch: usize,
    pause: Duration,
    within: Duration,
) -> (
    Vec<JoinHandle<SendHistory>>,
    BTreeMap<String, Arc<AtomicUsize>>,
) {
    let mut tasks = Vec::new();
    let mut progress = BTreeMap::new();
    for (provider, grpc, _) in &stack.ingesters {
        let p = Arc::new(AtomicUsize::new(0));
        progress.insert(provider.clone(), p.clone());
        tasks.push(tokio::spawn(send_tracked(
            format!("http://127.0.0.1:{grpc}"),
            provider.clone(),
            files.join(format!("{provider}.jsonl")),
            batch,
            pause,
            within,
            p,
        )));
    }
    (tasks, progress)
}

async fn histories(tasks: Vec<JoinHandle<SendHistory>>) -> Vec<SendHistory> {
    let mut v = Vec::new();
    for t in tasks {
        v.push(t.await.expect("a sender panicked"));
    }
    v
}

async fn wait_progress(what: &str, counter: &Arc<AtomicUsize>, at_least: usize) {
    let c = counter.clone();
    wait_for(what, Duration::from_secs(90), || {
        let c = c.clone();
        async move { (c.load(Ordering::SeqCst) >= at_least).then_some(()) }
    })
    .await;
}

async fn wait_metric_at_least(ports: &[u16], name: &str, n: f64, within: Duration) {
    let ports = ports.to_vec();
    wait_for(&format!("{name} ≥ {n}"), within, || {
        let ports = ports.clone();
        async move {
            let mut s = 0.0;
            for p in &ports {
                s += metric(*p, name).await.max(0.0);
            }
            (s >= n).then_some(())
        }
    })
    .await;
}

/// Asserts the ingest history: nothing acknowledged lost, no duplicate the
/// client could not have caused, nothing in Kafka that was not
/// acknowledged. Returns the verdict.
async fn assert_ingest(stack: &Stack, hs: &[SendHistory], n: usize) -> IngestVerdict {
    let kafka = events_in_kafka_at(&stack.bootstrap, &stack.calls).await;
    let v = check_ingest(hs, &kafka);
    assert_eq!(v.acknowledged, n, "every record acknowledged in the end");
    assert!(v.lost.is_empty(), "acknowledged events lost: {:?}", v.lost);
    assert!(
        v.unexplained_duplicates.is_empty(),
        "events in Kafka twice though acknowledged at the first attempt: {:?}",
        v.unexplained_duplicates
    );
    assert_eq!(v.unacknowledged, 0, "events in Kafka never acknowledged");
    v
}

/// Asserts the incidents on the alerts topic against the embedded run.
async fn assert_incidents(stack: &Stack, files: &Path) -> (usize, usize) {
    let alerts = stack.alerts().await;
    assert_no_duplicate_versions(&alerts);
    let real = incidents(&alerts);
    let embedded = incidents(&embedded_incidents(files, &stack.key, &stack.policies).await);
    assert!(!critical(&embedded).is_empty());
    assert_eq!(
        critical(&real),
        critical(&embedded),
        "critical incidents differ: real {real:?} embedded {embedded:?}"
    );
    (critical(&real).len(), alerts.len())
}

fn failures(hs: &[SendHistory]) -> String {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for h in hs {
        for (k, v) in &h.failures {
            *m.entry(k.clone()).or_default() += v;
        }
    }
    format!("{m:?}")
}

fn outage(hs: &[SendHistory]) -> Duration {
    hs.iter()
        .map(|h| h.longest_outage)
        .max()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingester_killed_mid_send_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let mut stack = Stack::start_without_notifier(dir.path()).await;
    let victim = "kpn";
    let total = lines(&files, victim);
    let (tasks, progress) = send_everything(
        &stack,
        &files,
        100,
        Duration::from_millis(20),
        Duration::from_secs(90),
    );
    wait_progress(
        "kpn's client to be a third through",
        &progress[victim],
        total / 3,
    )
    .await;
    let i = stack
        .ingesters
        .iter()
        .position(|(p, _, _)| p == victim)
        .unwrap();
    let grpc = stack.ingesters[i].1;
    stack.ingesters[i].2.kill9();
    let killed = Instant::now();
    let at_kill = progress[victim].load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = stack
        .spawn_ingester(
            &format!("ingester-{victim}-restarted"),
            victim,
            grpc,
            free_port(),
        )
        .await;
    let restarted = killed.elapsed();
    stack.ingesters[i].2 = p;
    let hs = histories(tasks).await;
    let v = assert_ingest(&stack, &hs, n).await;
    let h = hs.iter().find(|h| h.provider == victim).unwrap();
    assert!(
        h.failed_attempts() > 0,
        "the kill was not noticed by the client: {h:?}"
    );
    let in_kafka: usize = events_in_kafka(&stack.calls).await.values().sum();
    wait_metric_at_least(
        &[stack.correlator_http],
        "tollguard_correlator_events_total",
        in_kafka as f64,
        Duration::from_secs(120),
    )
    .await;
    stack.wait_group_caught_up(Duration::from_secs(60)).await;
    let dups = metric(
        stack.correlator_http,
        "tollguard_correlator_duplicate_events_total",
    )
    .await;
    assert!(
        dups >= v.duplicated as f64,
        "the correlator dropped {dups} copies; Kafka holds {}",
        v.duplicated
    );
    let (crit, alerts) = assert_incidents(&stack, &files).await;
    eprintln!(
        "RELIABILITY ingester-sigkill: acknowledged={} lost={} in_kafka_twice={} (resent after an unacknowledged attempt, dropped by the correlator: {dups}) \
         failed_attempts={} restart={restarted:?} client_outage={:?} killed_at={at_kill}/{total} critical={crit} alerts={alerts}",
        v.acknowledged,
        v.lost.len(),
        v.duplicated,
        failures(&hs),
        outage(&hs),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correlator_added_and_removed_under_load_changes_no_incident() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let mut stack = Stack::start_without_notifier(dir.path()).await;
    let (tasks, _) = send_everything(
        &stack,
        &files,
        100,
        Duration::from_millis(30),
        Duration::from_secs(90),
    );
    let first = stack.correlator_http;
    wait_metric_at_least(
        &[first],
        "tollguard_correlator_events_total",
        (n / 4) as f64,
        Duration::from_secs(90),
    )
    .await;
    // Scale out: a second replica joins the group (rebalance).
    let second = free_port();
    let joined = Instant::now();
    let c2 = stack
        .spawn_correlator("correlator-added", second, &[])
        .await;
    wait_metric_at_least(
        &[first, second],
        "tollguard_correlator_events_total",
        (n / 2) as f64,
        Duration::from_secs(90),
    )
    .await;
    // Scale in: the first leaves with SIGTERM (drains, commits, leaves).
    let mut c1 = stack.correlator.take().unwrap();
    let t = Instant::now();
    let code = c1.terminate(Duration::from_secs(30));
    let drain = t.elapsed();
    assert_eq!(code, Some(0), "{}", c1.log_text());
    let hs = histories(tasks).await;
    let v = assert_ingest(&stack, &hs, n).await;
    let caught = Instant::now();
    stack.wait_group_caught_up(Duration::from_secs(90)).await;
    let tail = caught.elapsed();
    let e2 = metric(second, "tollguard_correlator_events_total").await;
    assert!(
        e2 > 0.0,
        "the added replica processed nothing: {}",
        c2.log_text()
    );
    let (crit, alerts) = assert_incidents(&stack, &files).await;
    eprintln!(
        "RELIABILITY rebalance: acknowledged={} lost={} events_by_added_replica={e2} sigterm_drain={drain:?} \
         lag_zero_after_senders_done={tail:?} scale_out_to_end={:?} critical={crit} alerts={alerts}",
        v.acknowledged,
        v.lost.len(),
        joined.elapsed()
    );
    drop(c2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_degrades_visibly_and_recovers_with_its_aof() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let rport = free_port();
    let rdir = dir.path().join("redis");
    let mut redis = private_redis(&rdir, "redis", rport, true);
    wait_redis(rport, Duration::from_secs(20)).await;
    let stack = Stack::start_ingesters(dir.path()).await;
    let http = free_port();
    let redis_env = [(
        "TOLLGUARD__REDIS__URL".to_string(),
        format!("redis://127.0.0.1:{rport}/"),
    )];
    let _c = stack.spawn_correlator("correlator", http, &redis_env).await;
    let (tasks, _) = send_everything(
        &stack,
        &files,
        100,
        Duration::from_millis(30),
        Duration::from_secs(90),
    );
    wait_metric_at_least(
        &[http],
        "tollguard_correlator_events_total",
        (n / 3) as f64,
        Duration::from_secs(90),
    )
    .await;
    let errors_before = metric(http, "tollguard_window_store_errors_total").await;
    redis.kill9();
    let down = Instant::now();
    wait_for(
        "readiness to go false",
        Duration::from_secs(30),
        || async move { (ready_status(http).await == Some(503)).then_some(()) },
    )
    .await;
    let noticed = down.elapsed();
    assert!(metric(http, "tollguard_window_store_errors_total").await > errors_before);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _redis = private_redis(&rdir, "redis-restarted", rport, true);
    let up = Instant::now();
    wait_redis(rport, Duration::from_secs(20)).await;
    wait_for(
        "readiness to come back",
        Duration::from_secs(30),
        || async move { (ready_status(http).await == Some(200)).then_some(()) },
    )
    .await;
    let recovered = up.elapsed();
    let hs = histories(tasks).await;
    let v = assert_ingest(&stack, &hs, n).await;
    wait_metric_at_least(
        &[http],
        "tollguard_correlator_events_total",
        n as f64,
        Duration::from_secs(120),
    )
    .await;
    stack.wait_group_caught_up(Duration::from_secs(60)).await;
    let (crit, alerts) = assert_incidents(&stack, &files).await;
    eprintln!(
        "RELIABILITY redis-sigkill-aof: acknowledged={} lost={} readiness_false_after={noticed:?} ready_again_after_restart={recovered:?} \
         store_errors={} critical={crit} alerts={alerts}",
        v.acknowledged,
        v.lost.len(),
        metric(http, "tollguard_window_store_errors_total").await - errors_before,
    );
}

// ---------------------------------------------------------------------------
// Notifier.

fn contacts_for(dir: &Path, rx: &BTreeMap<&str, Receiver>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let text: String = rx
        .iter()
        .map(|(p, r)| {
            format!(
                "[[carriers]]\nprovider_id = \"{p}\"\n[[carriers.webhooks]]\nurl = \"{}\"\nsecret = \"{SECRET}\"\nmax_concurrency = 1\n\n",
                r.url()
            )
        })
        .collect();
    support::contacts(dir, &text)
}

/// Successful deliveries: (incident, version, audience) → delivery ids.
fn delivered(rx: &BTreeMap<&str, Receiver>) -> BTreeMap<(String, u64, String), Vec<String>> {
    let mut m: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for r in rx.values() {
        for got in r.received() {
            if got.status != 200 || !got.finished {
                continue;
            }
            assert!(got.signature_ok.is_ok(), "{:?}", got.signature_ok);
            let v: serde_json::Value = serde_json::from_str(&got.body).unwrap();
            let key = (
                v["incident_id"].as_str().unwrap().to_string(),
                v["version"].as_u64().unwrap(),
                v["audience"].as_str().unwrap().to_string(),
            );
            let id = got
                .headers
                .get("tollguard-delivery")
                .cloned()
                .unwrap_or_default();
            m.entry(key).or_default().push(id);
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notifier_killed_mid_delivery_loses_and_duplicates_no_notification() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = scenario(dir.path());
    let stack = Stack::start_without_notifier(dir.path()).await;
    // The notifier under test (slow receivers: deliveries are in flight
    // when it dies) and a reference notifier on the same alerts, left alone.
    let mut faulty = BTreeMap::new();
    let mut reference = BTreeMap::new();
    for (p, _) in CARRIERS {
        faulty.insert(
            p,
            Receiver::start(Behaviour::Slow(Duration::from_millis(300))).await,
        );
        reference.insert(p, Receiver::start(Behaviour::Ok).await);
    }
    let mut fnames = Names::new("fntf");
    fnames.alerts = stack.alerts.clone();
    let mut rnames = Names::new("fntr");
    rnames.alerts = stack.alerts.clone();
    let fcontacts = contacts_for(&dir.path().join("faulty"), &faulty);
    let rcontacts = contacts_for(&dir.path().join("reference"), &reference);
    let fextra = [("TOLLGUARD__CONTACTS_FILE", fcontacts.display().to_string())];
    let rextra = [("TOLLGUARD__CONTACTS_FILE", rcontacts.display().to_string())];
    let mut n1 = Notifier::start(dir.path(), "notifier", &fnames, &fextra).await;
    let rn = Notifier::start(dir.path(), "notifier-reference", &rnames, &rextra).await;
    stack.send_all(&files);
    // Kill -9 once some webhooks arrived and more are in flight.
    let t0 = Instant::now();
    while faulty.values().map(|r| r.received().len()).sum::<usize>() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no 3 webhooks at the faulty notifier's receivers in 90 s (the reference's got {})\n{}\n{}\n{}",
            reference
                .values()
                .map(|r| r.received().len())
                .sum::<usize>(),
            stack
                .correlator
                .as_ref()
                .map(|c| c.log_tail(20))
                .unwrap_or_default(),
            n1.proc.log_tail(30),
            rn.proc.log_tail(30),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n1.proc.kill9();
    let killed = Instant::now();
    let before_restart = delivered(&faulty).len();
    let _n2 = Notifier::start(dir.path(), "notifier-restarted", &fnames, &fextra).await;
    let restart = killed.elapsed();
    // Wait until the faulty side has every notification the reference sent
    // and the reference has been quiet for 3 s.
    let t0 = Instant::now();
    let (want, got) = loop {
        let want: BTreeSet<_> = delivered(&reference).into_keys().collect();
        let quiet = reference
            .values()
            .flat_map(|x| x.received())
            .all(|x| x.at.elapsed() > Duration::from_secs(3));
        let got: BTreeSet<_> = delivered(&faulty).into_keys().collect();
        if quiet && !want.is_empty() && got.is_superset(&want) {
            break (want, got);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the restarted notifier did not catch up with the reference in 90 s: missing {:?}, extra {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let caught_up = t0.elapsed();
    assert_eq!(
        got, want,
        "notifications differ from the fault-free notifier"
    );
    // At most one delivery id per (incident, version, audience); copies of
    // an in-flight delivery reuse its id (receivers drop them).
    let d = delivered(&faulty);
    let mut copies = 0;
    for (k, ids) in &d {
        let distinct: BTreeSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{k:?} notified as different deliveries: {ids:?}"
        );
        assert!(!ids[0].is_empty(), "{k:?} without a TollGuard-Delivery id");
        copies += ids.len() - 1;
    }
    // The ledger's chains are intact.
    let mut out = Vec::new();
    let code = audit::run(
        &audit::AuditCmd::Verify {
            kafka: kafka(),
            topic: fnames.deliveries.clone(),
            timeout_s: 60,
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
    eprintln!(
        "RELIABILITY notifier-sigkill: notifications={} (reference {}) lost=0 distinct_duplicates=0 same_id_redeliveries={copies} \
         delivered_before_kill={before_restart} restart={restart:?} caught_up_after={caught_up:?} ledger=intact",
        got.len(),
        want.len()
    );
}

// ---------------------------------------------------------------------------
// Kafka broker frozen, then killed and restarted: a dedicated broker.

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// A process stopped with SIGSTOP; SIGCONT on drop (also on panic), and a
/// detached watchdog that sends SIGCONT after `max` even if this process
/// dies first.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32, max: Duration) -> Self {
        // `setsid -f` forks the watchdog into its own session and returns.
        let st = std::process::Command::new("setsid")
            .args([
                "-f",
                "sh",
                "-c",
                &format!("sleep {}; kill -CONT {pid}", max.as_secs() + 1),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("watchdog");
        assert!(st.success(), "could not start the SIGCONT watchdog");
        signal(pid, "-STOP");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn acked(progress: &BTreeMap<String, Arc<AtomicUsize>>) -> usize {
    progress.values().map(|p| p.load(Ordering::SeqCst)).sum()
}

/// Waits until some client got an acknowledgement after `since` (the
/// acknowledged count grew past `from`); returns the time it took.
async fn first_ack_after(
    what: &str,
    progress: &BTreeMap<String, Arc<AtomicUsize>>,
    from: usize,
    since: Instant,
) -> Duration {
    let p = progress.clone();
    wait_for(what, Duration::from_secs(120), || {
        let p = p.clone();
        async move { (acked(&p) > from).then_some(()) }
    })
    .await;
    since.elapsed()
}

/// Seconds the broker stays frozen (`TOLLGUARD_TEST_KAFKA_FREEZE_S`,
/// default 30).
fn freeze_for() -> Duration {
    Duration::from_secs(
        std::env::var("TOLLGUARD_TEST_KAFKA_FREEZE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_then_killed_kafka_broker_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let mut broker = Broker::start(&dir.path().join("broker")).await;
    let bootstrap = broker.bootstrap();
    // Every publish is bounded: a record not acknowledged by the broker
    // within 5 s fails, and the ingester answers UNAVAILABLE well within
    // the client's 10 s deadline.
    let bounded = vec![(
        "TOLLGUARD__KAFKA__MESSAGE_TIMEOUT_MS".to_string(),
        "5000".to_string(),
    )];
    let mut stack = Stack::start_ingesters_on(dir.path(), &bootstrap, &bounded).await;
    // librdkafka's consumer-group log in the correlator's: if it ever stops
    // consuming after the freeze (a run once did), the failure shows the
    // group's state.
    let diagnostics = [
        (
            "RUST_LOG".to_string(),
            "info,tollguard_runtime::kafka=debug".to_string(),
        ),
        (
            "TOLLGUARD__KAFKA__EXTRA__DEBUG".to_string(),
            "cgrp".to_string(),
        ),
    ];
    let correlator = stack
        .spawn_correlator("correlator-1", stack.correlator_http, &diagnostics)
        .await;
    stack.correlator = Some(correlator);
    let http = stack.correlator_http;
    // A probe ingester of its own topic with a small producer queue (200
    // records), flooded during the freeze by six concurrent clients: its
    // queue fills, so it must answer RESOURCE_EXHAUSTED, and its memory
    // must stay bounded.
    let probe_topic = format!("{}.probe", stack.calls);
    let probe_grpc = free_port();
    let mut probe_env = bounded.clone();
    probe_env.extend([
        ("TOLLGUARD__TOPIC".to_string(), probe_topic.clone()),
        (
            "TOLLGUARD__KAFKA__QUEUE_BUFFERING_MAX_MESSAGES".to_string(),
            "200".to_string(),
        ),
    ]);
    let probe = stack
        .spawn_ingester_with("ingester-probe", "kpn", probe_grpc, free_port(), &probe_env)
        .await;
    let probe_dir = dir.path().join("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    let kpn_text = std::fs::read_to_string(files.join("kpn.jsonl")).unwrap();
    let kpn_lines: Vec<&str> = kpn_text.lines().take(1200).collect();
    let probe_files: Vec<PathBuf> = kpn_lines
        .chunks(200)
        .enumerate()
        .map(|(i, c)| {
            let f = probe_dir.join(format!("probe-{i}.jsonl"));
            std::fs::write(&f, c.join("\n") + "\n").unwrap();
            f
        })
        .collect();

    let kpn_total = lines(&files, "kpn");
    // Paced so that the senders are still busy at the kill after the freeze.
    let (tasks, progress) = send_everything(
        &stack,
        &files,
        50,
        Duration::from_millis(250),
        Duration::from_secs(300),
    );
    wait_progress(
        "kpn's client to be a fifth through",
        &progress["kpn"],
        kpn_total / 5,
    )
    .await;

    // Phase 1: SIGSTOP.
    let pids: Vec<u32> = stack
        .ingesters
        .iter()
        .map(|(_, _, p)| p.child.id())
        .chain([probe.child.id()])
        .collect();
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
    let mut rss_peak = rss_before.clone();
    let stop = freeze_for();
    let probe_progress = Arc::new(AtomicUsize::new(0));
    let (acked_settled, acked_end, probe_acked_frozen, probe_tasks, frozen_at) = {
        let frozen = Frozen::new(broker.pid(), stop);
        let t = Instant::now();
        let probe_tasks: Vec<JoinHandle<SendHistory>> = probe_files
            .iter()
            .map(|f| {
                tokio::spawn(send_tracked(
                    format!("http://127.0.0.1:{probe_grpc}"),
                    "kpn".into(),
                    f.clone(),
                    50,
                    Duration::ZERO,
                    Duration::from_secs(300),
                    probe_progress.clone(),
                ))
            })
            .collect();
        // Replies the broker had sent before it stopped arrive at once.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let settled = acked(&progress);
        let probe_settled = probe_progress.load(Ordering::SeqCst);
        while t.elapsed() < stop {
            for (i, p) in pids.iter().enumerate() {
                rss_peak[i] = rss_peak[i].max(rss_kb(*p));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let end = acked(&progress);
        let probe_frozen = probe_progress.load(Ordering::SeqCst) - probe_settled;
        drop(frozen);
        (settled, end, probe_frozen, probe_tasks, t.elapsed())
    };
    let cont = Instant::now();
    assert_eq!(
        acked_end, acked_settled,
        "events acknowledged while the broker was frozen"
    );
    assert_eq!(
        probe_acked_frozen, 0,
        "the probe ingester acknowledged while the broker was frozen"
    );
    let events_at_cont = metric(http, "tollguard_correlator_events_total").await;
    let clients_back = first_ack_after(
        "an acknowledgement after SIGCONT",
        &progress,
        acked_end,
        cont,
    )
    .await;
    // Bounded like `wait_metric_at_least`, but a correlator that does not
    // resume is reported with its readiness, whether it is still running and
    // the end of its log (a CI run once timed out here; it did not recur).
    let resumed = async {
        while metric(http, "tollguard_correlator_events_total").await < events_at_cont + 1.0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), resumed)
        .await
        .is_err()
    {
        let ready = http_get(http, "/readyz").await;
        let c = stack.correlator.as_mut().expect("the correlator");
        let exited = c.child.try_wait().ok().flatten();
        let log = std::fs::read_to_string(&c.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(120).collect();
        panic!(
            "the correlator processed nothing within 120 s of SIGCONT (events {events_at_cont}): \
             readyz={ready:?} exited={exited:?}\nlast log lines (newest first):\n{}",
            tail.join("\n")
        );
    }
    let correlator_back = cont.elapsed();
    let probe_hs = histories(probe_tasks).await;

    // Phase 2: SIGKILL, restart on the same log directory.
    let before_kill = acked(&progress);
    let at_kill = progress["kpn"].load(Ordering::SeqCst);
    assert!(
        at_kill < kpn_total,
        "the senders finished before the kill: no load to kill under"
    );
    broker.kill9();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    broker.restart().await;
    let broker_restart = t.elapsed();
    let clients_back_kill = first_ack_after(
        "an acknowledgement after the restart",
        &progress,
        before_kill,
        killed,
    )
    .await;

    // History: clients against the calls topic, the probe's against its own.
    let hs = histories(tasks).await;
    let v = assert_ingest(&stack, &hs, n).await;
    let codes = failures(&hs);
    assert!(
        hs.iter().any(|h| h.failures.contains_key("Unavailable")),
        "no ingester answered UNAVAILABLE while the broker was down: {codes}"
    );
    let pv = check_ingest(
        &probe_hs,
        &events_in_kafka_at(&bootstrap, &probe_topic).await,
    );
    assert_eq!(pv.acknowledged, kpn_lines.len(), "{pv:?}");
    assert!(pv.lost.is_empty(), "{pv:?}");
    assert!(pv.unexplained_duplicates.is_empty(), "{pv:?}");
    assert_eq!(pv.unacknowledged, 0, "{pv:?}");
    let probe_codes = failures(&probe_hs);
    assert!(
        probe_hs
            .iter()
            .any(|h| h.failures.contains_key("ResourceExhausted")),
        "the probe ingester's full queue never answered RESOURCE_EXHAUSTED: {probe_codes}"
    );
    // Memory: the producer queue bounds what an ingester holds.
    for (i, p) in pids.iter().enumerate() {
        let grew = rss_peak[i].saturating_sub(rss_before[i]);
        assert!(
            grew < 64 * 1024,
            "ingester pid {p} grew {grew} kB while the broker was frozen"
        );
    }

    let in_kafka: usize = events_in_kafka_at(&bootstrap, &stack.calls)
        .await
        .values()
        .sum();
    wait_metric_at_least(
        &[http],
        "tollguard_correlator_events_total",
        in_kafka as f64,
        Duration::from_secs(180),
    )
    .await;
    stack.wait_group_caught_up(Duration::from_secs(90)).await;
    let lag_zero = killed.elapsed();
    // Events of batches retried while the broker was away: re-applied,
    // recognised by event id, changed nothing.
    let reapplied = metric(http, "tollguard_correlator_duplicate_events_total").await;
    let (crit, alerts) = assert_incidents(&stack, &files).await;
    eprintln!(
        "RELIABILITY kafka-sigstop-{}s: acknowledged={} lost={} in_kafka_twice={} acked_while_frozen=0 (from 3 s in) \
         clients={codes} probe(queue 200, 6 clients)={probe_codes} probe_acknowledged={} probe_lost={} probe_in_kafka_twice={} \
         ingesters_rss_kb {rss_before:?}->{rss_peak:?} frozen={frozen_at:?} first_ack_after_sigcont={clients_back:?} \
         correlator_resumed_after_sigcont={correlator_back:?}",
        stop.as_secs(),
        v.acknowledged,
        v.lost.len(),
        v.duplicated,
        pv.acknowledged,
        pv.lost.len(),
        pv.duplicated,
    );
    eprintln!(
        "RELIABILITY kafka-sigkill: killed_at kpn {at_kill}/{kpn_total} broker_restart_to_ready={broker_restart:?} (after 2 s down) \
         first_ack_after_kill={clients_back_kill:?} lag_zero_after_kill={lag_zero:?} correlator_reapplied_events={reapplied} \
         client_outage={:?} critical={crit} alerts={alerts}",
        outage(&hs),
    );
}

// ---------------------------------------------------------------------------
// Redis Cluster: a primary killed under load, its replica takes over.

/// Window store calls slower than the histogram's largest finite bucket
/// (~3.3 s), over all operations: `+Inf` minus that bucket.
async fn slow_store_calls(port: u16) -> f64 {
    let Some((200, body)) = http_get(port, "/metrics").await else {
        return 0.0;
    };
    // labels without `le` → (largest finite le, its count, +Inf count)
    let mut m: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for l in body.lines() {
        let Some(rest) = l.strip_prefix("tollguard_window_store_request_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let (mut le, mut others) = (None, Vec::new());
        for kv in labels.split(',') {
            match kv.strip_prefix("le=") {
                Some(x) => le = Some(x.trim_matches('"').to_string()),
                None => others.push(kv),
            }
        }
        let e = m.entry(others.join(",")).or_insert((f64::MIN, 0.0, 0.0));
        match le.as_deref() {
            Some("+Inf") => e.2 = v,
            Some(x) => {
                if let Ok(b) = x.parse::<f64>()
                    && b > e.0
                {
                    (e.0, e.1) = (b, v);
                }
            }
            None => {}
        }
    }
    m.values().map(|(_, finite, inf)| inf - finite).sum()
}

/// Script calls (`EVALSHA`) node `port` has served.
fn script_calls(port: u16) -> u64 {
    redis_cli(port, &["info", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The primary that served the most script calls over `sample`.
async fn busiest_primary(cluster: &RedisCluster, sample: Duration) -> usize {
    let primaries: Vec<usize> = (0..cluster.ports.len())
        .filter(|&i| cluster.role(i).as_deref() == Some("master"))
        .collect();
    let before: Vec<u64> = primaries
        .iter()
        .map(|&i| script_calls(cluster.ports[i]))
        .collect();
    tokio::time::sleep(sample).await;
    let (busiest, calls) = primaries
        .iter()
        .zip(&before)
        .map(|(&i, b)| (i, script_calls(cluster.ports[i]).saturating_sub(*b)))
        .max_by_key(|&(_, d)| d)
        .expect("the cluster has primaries");
    assert!(
        calls > 0,
        "no primary served a script call in {sample:?}: no load to fail over under"
    );
    eprintln!("redis-cluster-failover: victim node {busiest}, {calls} script calls in {sample:?}");
    busiest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_primary_killed_under_load_fails_over_to_its_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario(dir.path());
    let mut cluster = RedisCluster::start(&dir.path().join("cluster"), 3).await;
    let stack = Stack::start_ingesters(dir.path()).await;
    let http = free_port();
    // Processing must be under way when the primary dies. With alignment
    // on, this paced replay is processed at the pace of the carrier slowest
    // through event time and the rest in one burst when the sends end, so
    // the kill could come after the last batch; the failover is what is
    // under test here (alignment: tests/eval_send.rs).
    let mut env = cluster.correlator_env();
    env.push(("TOLLGUARD__ALIGNMENT__ENABLED".into(), "false".into()));
    let c = stack.spawn_correlator("correlator", http, &env).await;
    let (tasks, _) = send_everything(
        &stack,
        &files,
        100,
        Duration::from_millis(30),
        Duration::from_secs(180),
    );
    wait_metric_at_least(
        &[http],
        "tollguard_correlator_events_total",
        (n / 3) as f64,
        Duration::from_secs(90),
    )
    .await;
    // The victim: the primary the correlator writes to most right now (a
    // third of the slots each, but the load of a moment can sit on a few
    // customers' slots: a primary no batch touches during its failover
    // would make the failover invisible by construction).
    let victim = busiest_primary(&cluster, Duration::from_secs(1)).await;
    assert_eq!(cluster.role(victim).as_deref(), Some("master"));
    let replica = cluster.replica_of(victim).expect("primary 0 has a replica");
    let keys_before = redis_cli(cluster.ports[victim], &["dbsize"]);
    // Bytes the replica had not yet received just before the kill: the
    // writes asynchronous replication can lose (an upper bound: the
    // replica's own offset is read first, the primary's just after).
    let offset = |port: u16, field: &str| -> i64 {
        info_field(&redis_cli(port, &["info", "replication"]), field)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let replica_off = offset(cluster.ports[replica], "slave_repl_offset");
    let master_off = offset(cluster.ports[victim], "master_repl_offset");
    let slow_before = slow_store_calls(http).await;
    let errors_before = metric(http, "tollguard_window_store_errors_total").await;
    let events_before = metric(http, "tollguard_correlator_events_total").await;
    cluster.kill9(victim);
    let down = Instant::now();
    // Watch the correlator and the cluster until the replica is primary and
    // the correlator processes again.
    let mut not_ready_after: Option<Duration> = None;
    let mut promoted_after: Option<Duration> = None;
    let (mut last_events, mut last_change, mut stall) = (events_before, down, Duration::ZERO);

    let ready_again_after = loop {
        let ready = ready_status(http).await;
        if ready != Some(200) && not_ready_after.is_none() {
            not_ready_after = Some(down.elapsed());
        }
        if promoted_after.is_none() && cluster.role(replica).as_deref() == Some("master") {
            promoted_after = Some(down.elapsed());
        }
        let events = metric(http, "tollguard_correlator_events_total").await;
        if events > last_events {
            stall = stall.max(last_change.elapsed());
            (last_events, last_change) = (events, Instant::now());
        }
        if promoted_after.is_some() && ready == Some(200) && events > events_before {
            break down.elapsed();
        }
        assert!(
            down.elapsed() < Duration::from_secs(60),
            "no recovery within 60 s of the kill: ready={ready:?} promoted={promoted_after:?} events {events_before}->{events}\n{}",
            c.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let store_errors = metric(http, "tollguard_window_store_errors_total").await - errors_before;
    let slow = slow_store_calls(http).await - slow_before;
    eprintln!(
        "redis-cluster-failover: readiness_false_after={not_ready_after:?} store_errors={store_errors} \
         replica_promoted_after={promoted_after:?} processing_and_ready_again_after={ready_again_after:?} \
         longest_processing_stall={stall:?} store_calls_over_3.3s={slow}"
    );
    // Visible: readiness false and a store error once a call outlives the
    // client's 10 s response timeout; a shorter stall shows as store calls
    // in the histogram's overflow bucket.
    assert!(
        not_ready_after.is_some() || store_errors > 0.0 || slow > 0.0,
        "the failover was invisible: readiness stayed 200, no store error, no slow store call"
    );
    // The old primary comes back and rejoins as its replica's replica.
    cluster.restart(victim).await;
    let back = Instant::now();
    let vp = cluster.ports[victim];
    wait_for(
        "the restarted node to rejoin as a replica, in sync",
        Duration::from_secs(60),
        || async move {
            let r = redis_cli(vp, &["info", "replication"]);
            (info_field(&r, "role").as_deref() == Some("slave")
                && info_field(&r, "master_link_status").as_deref() == Some("up"))
            .then_some(())
        },
    )
    .await;
    let rejoined = back.elapsed();

    let hs = histories(tasks).await;
    let v = assert_ingest(&stack, &hs, n).await;
    let in_kafka: usize = events_in_kafka(&stack.calls).await.values().sum();
    wait_metric_at_least(
        &[http],
        "tollguard_correlator_events_total",
        in_kafka as f64,
        Duration::from_secs(120),
    )
    .await;
    stack.wait_group_caught_up(Duration::from_secs(60)).await;
    let (crit, alerts) = assert_incidents(&stack, &files).await;
    eprintln!(
        "RELIABILITY redis-cluster-failover: acknowledged={} lost={} keys_on_victim={} unreplicated_bytes_at_kill={} \
         readiness_false_after={not_ready_after:?} store_errors={store_errors} replica_promoted_after={promoted_after:?} \
         processing_and_ready_again_after={ready_again_after:?} longest_processing_stall={stall:?} \
         store_calls_over_3.3s={slow} old_primary_rejoined_as_replica_after={rejoined:?} \
         critical={crit} alerts={alerts}",
        v.acknowledged,
        v.lost.len(),
        keys_before.trim(),
        master_off - replica_off,
    );
}
