//! `loadgen`: TollGuard's end-to-end load generator (issue #8).
//!
//! Starts the release service binaries (one ingester per carrier and a
//! correlator) against the local Kafka and Redis, on unique topics and a
//! unique Redis key prefix; first measures a raw Kafka produce → consume
//! pass-through on the same broker (the same-run baseline), then streams the
//! simulated consortium over gRPC for a bounded time, and reports sustained
//! events/s, ingest-ack and event-to-alert latency percentiles (HDR
//! histograms), consumer lag, RSS of every service and Redis memory over
//! time. Everything it created (processes, topics, consumer groups, Redis
//! keys) is removed at the end, also on Ctrl-C. Loopback only.

#![allow(clippy::print_stdout)] // a command-line program prints its results

mod baseline;
mod report;
mod stack;
mod traffic;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use prost::Message;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tollguard_core::bus::{OutRecord, Subscription};
use tollguard_core::sim::Scenario;
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings};

use crate::report::{Percentiles, Report, Sample, ServiceUsage};
use crate::stack::{Children, Service};
use crate::traffic::{SendPlan, SendStats, Traffic, lock};

/// Scenario preset.
#[derive(Debug, Clone, Copy, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Preset {
    /// The 2011 PBX hack and a distributed IRSF campaign among 300
    /// enterprises over 4 days (119k records at 4 carriers).
    Consortium,
    /// Every labelled campaign kind over 7 days.
    Suite,
    /// The 2011 PBX hack only.
    Pbx2011,
}

/// End-to-end load generator: spawns one ingester per carrier and a
/// correlator (release binaries) on the local Kafka and Redis, measures a
/// raw Kafka pass-through baseline, then streams simulated consortium
/// traffic over gRPC for a bounded time and reports throughput, latency
/// percentiles, consumer lag, RSS and Redis memory. Loopback only; cleans up
/// its processes, topics, groups and Redis keys (also on Ctrl-C).
///
/// Example: `cargo run --release -p tollguard-benches --bin loadgen -- --duration 60`
/// (after `cargo build --release -p tollguard-ingester -p tollguard-correlator`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Seconds to send traffic (the measured window).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration: u64,
    /// Target events per second over all carriers; 0 sends flat out (as
    /// fast as the ingesters acknowledge).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Carriers (ingesters), the first N of kpn, bt, vodafone, odido.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=4))]
    carriers: u64,
    /// Partitions of the calls and alerts topics (and of the baseline topic).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=64))]
    partitions: i32,
    /// Records per gRPC batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=5000))]
    batch: u64,
    /// gRPC batches in flight per carrier. Above 1, batches of a carrier may
    /// reach Kafka out of order; since the scenario is replayed thousands of
    /// times faster than real time, a batch then spans many minutes of event
    /// time and its events count as late (beyond `allowed_lateness_s`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    inflight: u64,
    /// With --rate: a partly filled batch is sent after this many ms.
    #[arg(long, default_value_t = 10)]
    linger_ms: u64,
    /// Scenario preset.
    #[arg(long, value_enum, default_value = "consortium")]
    preset: Preset,
    /// Scenario seed.
    #[arg(long, default_value_t = 2011)]
    seed: u64,
    /// Benign enterprises (the preset's number when absent).
    #[arg(long)]
    enterprises: Option<usize>,
    /// Seconds of the raw Kafka baseline (0 skips it).
    #[arg(long, default_value_t = 20)]
    baseline_duration: u64,
    /// After the load, seconds to wait for the correlator to catch up.
    #[arg(long, default_value_t = 30)]
    drain: u64,
    /// Seconds between progress lines (on stderr).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    progress: u64,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Kafka bootstrap (must be on loopback).
    #[arg(
        long,
        env = "TOLLGUARD_KAFKA_BOOTSTRAP",
        default_value = "127.0.0.1:9092"
    )]
    kafka: String,
    /// Redis URL (must be on loopback).
    #[arg(
        long,
        env = "TOLLGUARD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    redis: String,
    /// Directory of tollguard-ingester and tollguard-correlator (default:
    /// this program's own directory, i.e. target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Extra environment for every ingester (KEY=VALUE, repeatable), e.g.
    /// TOLLGUARD__KAFKA__LINGER_MS=10.
    #[arg(long, value_name = "KEY=VALUE")]
    ingester_env: Vec<String>,
    /// Extra environment for the correlator (KEY=VALUE, repeatable), e.g.
    /// TOLLGUARD__BATCH_MAX=5000.
    #[arg(long, value_name = "KEY=VALUE")]
    correlator_env: Vec<String>,
    /// Keep the services' logs (their directory is printed).
    #[arg(long)]
    keep_logs: bool,
}

fn parse_env(list: &[String], flag: &str) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--{flag} {kv}: expected KEY=VALUE"))?;
            anyhow::ensure!(!k.is_empty(), "--{flag} {kv}: empty KEY");
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Refuses any host that is not loopback.
fn loopback(what: &str, host: &str) -> anyhow::Result<()> {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    let ok =
        h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|a| a.is_loopback());
    anyhow::ensure!(
        ok,
        "{what}: `{host}` is not a loopback address; the load generator only targets 127.0.0.1/::1/localhost"
    );
    Ok(())
}

fn check_targets(args: &Args) -> anyhow::Result<()> {
    for entry in args.kafka.split(',') {
        let entry = entry.trim();
        let hostport = entry.rsplit_once("://").map_or(entry, |(_, r)| r);
        let (host, _) = hostport
            .rsplit_once(':')
            .with_context(|| format!("--kafka: `{entry}` is not host:port"))?;
        loopback("--kafka", host)?;
    }
    let rest = args
        .redis
        .split_once("://")
        .map(|(_, r)| r)
        .with_context(|| format!("--redis: `{}` is not a redis:// URL", args.redis))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => hostport,
    };
    loopback("--redis", host)
}

fn bin_dir(args: &Args) -> anyhow::Result<PathBuf> {
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of the running program")?
            .to_path_buf(),
    };
    for b in ["tollguard-ingester", "tollguard-correlator"] {
        anyhow::ensure!(
            dir.join(b).exists(),
            "{} not found in {}: build the services first \
             (`cargo build --release -p tollguard-ingester -p tollguard-correlator`) or pass --bin-dir",
            b,
            dir.display()
        );
    }
    Ok(dir)
}

/// Everything the run creates, removed at the end whatever happened.
#[derive(Debug)]
struct Cleanup {
    kafka: String,
    redis: String,
    topics: Vec<String>,
    groups: Vec<String>,
    prefix: String,
    dir: PathBuf,
    keep_logs: bool,
    children: Children,
}

impl Cleanup {
    async fn run(&self) -> CleanupReport {
        let children = self.children.clone();
        let _ =
            tokio::task::spawn_blocking(move || children.stop_all(Duration::from_secs(15))).await;
        let mut rep = CleanupReport::default();
        match self.delete_kafka().await {
            Ok(()) => {}
            Err(e) => rep.errors.push(format!("kafka: {e}")),
        }
        match self.delete_redis().await {
            Ok(n) => rep.redis_keys = n,
            Err(e) => rep.errors.push(format!("redis: {e}")),
        }
        if !self.keep_logs {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        rep
    }

    async fn delete_kafka(&self) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .create()?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        admin.delete_topics(&topics, &opts).await?;
        let groups: Vec<&str> = self.groups.iter().map(String::as_str).collect();
        // A group that never committed does not exist: not an error.
        let _ = admin.delete_groups(&groups, &opts).await;
        Ok(())
    }

    async fn delete_redis(&self) -> anyhow::Result<u64> {
        let client = redis::Client::open(self.redis.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let pattern = format!("{}*", self.prefix);
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(20_000)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await?;
                deleted += n;
            }
            cursor = next;
            if cursor == 0 {
                return Ok(deleted);
            }
        }
    }
}

/// What cleaning up did.
#[derive(Debug, Default)]
struct CleanupReport {
    redis_keys: u64,
    errors: Vec<String>,
}

/// Committed lag of a consumer group on a topic.
struct LagProbe {
    consumer: BaseConsumer,
    topic: String,
    partitions: Vec<i32>,
}

impl LagProbe {
    fn new(kafka: &str, group: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka)
            .set("group.id", group)
            .create()?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            partitions: (0..partitions).collect(),
        })
    }

    /// Records of the topic not yet committed by the group.
    fn lag(&self) -> Option<i64> {
        let t = Duration::from_secs(5);
        let mut tpl = TopicPartitionList::new();
        for p in &self.partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = self.consumer.committed_offsets(tpl, t).ok()?;
        let mut lag = 0;
        for p in &self.partitions {
            let (lo, hi) = self.consumer.fetch_watermarks(&self.topic, *p, t).ok()?;
            let off = match committed
                .find_partition(&self.topic, *p)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(o)) => o,
                _ => lo,
            };
            lag += hi - off;
        }
        Some(lag)
    }
}

async fn redis_used_memory(c: &mut redis::aio::MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(c).await.ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn redis_pid(c: &mut redis::aio::MultiplexedConnection) -> Option<u32> {
    let info: String = redis::cmd("INFO").arg("server").query_async(c).await.ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// An alert seen on the alerts topic: (carrier, trigger batch, when, rule).
type SeenAlert = (usize, Option<u64>, Instant, String);

struct Run<'a> {
    args: &'a Args,
    cleanup: &'a Cleanup,
    calls: String,
    alerts: String,
    dlq: String,
    raw: String,
    group: String,
    stop: Arc<AtomicBool>,
}

fn scenario(args: &Args) -> Scenario {
    let mut sc = match args.preset {
        Preset::Consortium => Scenario::consortium(args.seed),
        Preset::Suite => Scenario::suite(args.seed),
        Preset::Pbx2011 => Scenario::pbx2011(args.seed),
    };
    if let Some(n) = args.enterprises {
        sc.enterprises = n;
    }
    sc
}

/// Whether the ingester binary knows `tls.enabled` (then it is set to
/// false): its `--check-config` accepts the configuration with it.
fn plaintext_supported(bin: &std::path::Path, env: &[(String, String)]) -> anyhow::Result<bool> {
    let st = std::process::Command::new(bin)
        .arg("--check-config")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("TOLLGUARD__TLS__ENABLED", "false")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(st.success())
}

/// Real `CallEvent` messages as the ingesters would publish them.
fn baseline_messages(traffic: &Traffic, topic: &str) -> anyhow::Result<Vec<OutRecord>> {
    use tollguard_core::ingest::{Ingestor, ReferenceData};
    use tollguard_core::number::DialPlan;
    use tollguard_core::pseudo::{Key, Pseudonymizer};
    let secret: [u8; 32] = rand::random();
    let refdata = Arc::new(ReferenceData::default());
    let ingestors = traffic
        .carriers
        .iter()
        .map(|c| {
            let plan = DialPlan {
                home_country: c.home_country.clone(),
                international_prefix: "00".into(),
                national_prefix: "0".into(),
                strip_prefixes: Vec::new(),
            };
            let key = Key::new("k1", &secret)?;
            Ingestor::new(&c.id, plan, 2, Pseudonymizer::new(key), refdata.clone())
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut out = Vec::new();
    for (c, rec) in traffic.sample(20_000) {
        let raw = tollguard_ingester::service::raw_from_proto(&rec);
        if let Ok(ev) = ingestors[c].ingest(&raw, now) {
            out.push(OutRecord {
                topic: topic.to_string(),
                key: ev.subject().compact().into_bytes(),
                payload: tollguard_core::codec::encode_event(&ev),
                headers: vec![
                    (
                        tollguard_core::bus::HEADER_SCHEMA.to_string(),
                        tollguard_proto::CALL_EVENT_SCHEMA_VERSION
                            .to_string()
                            .into_bytes(),
                    ),
                    (
                        tollguard_core::bus::HEADER_TRACEPARENT.to_string(),
                        tollguard_ingester::new_traceparent().into_bytes(),
                    ),
                ],
            });
        }
    }
    Ok(out)
}

impl Run<'_> {
    async fn go(&self, report: &mut Report) -> anyhow::Result<()> {
        let args = self.args;
        let sc = scenario(args);
        let traffic = Arc::new(Traffic::new(&sc, args.carriers as usize));
        anyhow::ensure!(!traffic.is_empty(), "the scenario produced no records");
        report.config.records_per_pass = traffic.len();
        report.config.carrier_ids = traffic.carriers.iter().map(|c| c.id.clone()).collect();
        eprintln!(
            "loadgen: run {} — {} records per pass of the {:?} scenario for {}",
            report.run_id,
            traffic.len(),
            args.preset,
            report.config.carrier_ids.join(", ")
        );

        let settings = KafkaSettings::new(&args.kafka);
        let bus = KafkaBus::new(settings.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let p = args.partitions;
        bus.ensure_topics(&[
            (self.calls.as_str(), p, &[]),
            (self.alerts.as_str(), p, &[]),
            (self.dlq.as_str(), 1, &[]),
            (self.raw.as_str(), p, &[]),
        ])
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

        // 1. The baseline, alone on the machine.
        if args.baseline_duration > 0 {
            let msgs = baseline_messages(&traffic, &self.raw)?;
            eprintln!(
                "loadgen: baseline: raw Kafka produce → consume for {} s ({} distinct messages)",
                args.baseline_duration,
                msgs.len()
            );
            let b = baseline::run(
                settings.clone(),
                &self.raw,
                &format!("{}-baseline", self.group),
                msgs,
                args.batch as usize,
                (args.carriers * args.inflight) as usize,
                Duration::from_secs(args.baseline_duration),
            )
            .await?;
            eprintln!(
                "loadgen: baseline: {:.0} events/s consumed ({} produced, {:.0}-byte payloads)",
                b.events_per_s, b.produced, b.mean_payload_bytes
            );
            report.baseline = Some(b);
        }

        // 2. The services.
        let dir = &self.cleanup.dir;
        let bins = bin_dir(args)?;
        let key = dir.join("key");
        std::fs::write(&key, hex::encode(rand::random::<[u8; 32]>()))?;
        let common = |http: u16| -> Vec<(String, String)> {
            vec![
                ("TOLLGUARD__KAFKA__BOOTSTRAP".into(), args.kafka.clone()),
                (
                    "TOLLGUARD__LISTEN__HTTP".into(),
                    format!("127.0.0.1:{http}"),
                ),
            ]
        };
        let ing_env = parse_env(&args.ingester_env, "ingester-env")?;
        let cor_env = parse_env(&args.correlator_env, "correlator-env")?;
        let mut services: Vec<Service> = Vec::new();
        let mut grpc_ports = Vec::new();
        let mut tls_off: Option<bool> = None;
        for c in &traffic.carriers {
            let (grpc, http) = (stack::free_port()?, stack::free_port()?);
            let mut env = common(http);
            env.extend([
                ("TOLLGUARD__PROVIDER_ID".into(), c.id.clone()),
                (
                    "TOLLGUARD__DIAL_PLAN__HOME_COUNTRY".into(),
                    c.home_country.clone(),
                ),
                (
                    "TOLLGUARD__LISTEN__GRPC".into(),
                    format!("127.0.0.1:{grpc}"),
                ),
                ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID".into(), "k1".into()),
                (
                    "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE".into(),
                    key.display().to_string(),
                ),
                ("TOLLGUARD__TOPIC".into(), self.calls.clone()),
                (
                    "TOLLGUARD__KAFKA__CLIENT_ID".into(),
                    format!("loadgen-ingester-{}", c.id),
                ),
            ]);
            env.extend(ing_env.iter().cloned());
            // Ingesters that serve mutual TLS by default get it switched off
            // (loopback, plaintext gRPC like the load generator's client);
            // ingesters without TLS settings would refuse the key.
            let off = match tls_off {
                Some(v) => v,
                None => {
                    let v = plaintext_supported(&bins.join("tollguard-ingester"), &env)?;
                    tls_off = Some(v);
                    v
                }
            };
            if off && !env.iter().any(|(k, _)| k.starts_with("TOLLGUARD__TLS__")) {
                env.push(("TOLLGUARD__TLS__ENABLED".into(), "false".into()));
            }
            services.push(self.cleanup.children.spawn(
                dir,
                &format!("ingester-{}", c.id),
                &bins.join("tollguard-ingester"),
                &env,
                http,
            )?);
            grpc_ports.push(grpc);
        }
        let http = stack::free_port()?;
        let mut env = common(http);
        let expected: Vec<String> = traffic
            .carriers
            .iter()
            .map(|c| format!("{:?}", c.id))
            .collect();
        env.extend([
            ("TOLLGUARD__REDIS__URL".into(), args.redis.clone()),
            (
                "TOLLGUARD__REDIS__KEY_PREFIX".into(),
                self.cleanup.prefix.clone(),
            ),
            ("TOLLGUARD__TOPICS__CALLS".into(), self.calls.clone()),
            ("TOLLGUARD__TOPICS__ALERTS".into(), self.alerts.clone()),
            ("TOLLGUARD__TOPICS__DLQ".into(), self.dlq.clone()),
            ("TOLLGUARD__GROUP".into(), self.group.clone()),
            (
                "TOLLGUARD__KAFKA__CLIENT_ID".into(),
                "loadgen-correlator".into(),
            ),
            (
                "TOLLGUARD__EXPECTED_PROVIDERS".into(),
                format!("[{}]", expected.join(",")),
            ),
            // The load models live traffic: in production live events are
            // never held for alignment, but this traffic's event times are
            // years old (the scenario compressed ~36,000×), so the correlator
            // would treat it as a replay and hold it. Measure the replay
            // path with `--correlator-env TOLLGUARD__ALIGNMENT__ENABLED=true`.
            ("TOLLGUARD__ALIGNMENT__ENABLED".into(), "false".into()),
        ]);
        env.extend(cor_env);
        let correlator = self.cleanup.children.spawn(
            dir,
            "correlator",
            &bins.join("tollguard-correlator"),
            &env,
            http,
        )?;
        services.push(correlator);
        for s in &services {
            stack::wait_ready(s, &self.cleanup.children, Duration::from_secs(60)).await?;
        }
        let cport = services.last().map(|s| s.http).unwrap_or_default();
        eprintln!(
            "loadgen: {} services ready (logs in {})",
            services.len(),
            dir.display()
        );

        // 3. The alert watcher.
        let seen: Arc<std::sync::Mutex<Vec<SeenAlert>>> = Arc::default();
        let mut watch = bus
            .subscribe_kafka(&[self.alerts.as_str()], &format!("{}-watch", self.group))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let carrier_ids = report.config.carrier_ids.clone();
        let watcher = {
            let (seen, stop) = (seen.clone(), self.stop.clone());
            tokio::spawn(async move {
                let mut undecodable = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(recs) = watch.poll(1_000, Duration::from_millis(50)).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let now = Instant::now();
                    let mut s = lock(&seen);
                    for r in &recs {
                        let Ok(a) = pb::Alert::decode(r.payload.as_slice()) else {
                            undecodable += 1;
                            continue;
                        };
                        if let Some(c) =
                            carrier_ids.iter().position(|p| *p == a.trigger_provider_id)
                        {
                            s.push((
                                c,
                                traffic::batch_of(&a.trigger_event_id),
                                now,
                                tollguard_core::render::rule_name(&a),
                            ));
                        }
                    }
                }
                let _ = watch.close().await;
                undecodable
            })
        };
        // The watcher joins its group before the clock starts.
        tokio::time::sleep(Duration::from_secs(1)).await;

        // 4. The load.
        let stats = Arc::new(SendStats::default());
        let clients = traffic::connect(&grpc_ports).await?;
        let plan = SendPlan {
            rate: args.rate,
            batch: args.batch as usize,
            inflight: args.inflight as usize,
            linger: Duration::from_millis(args.linger_ms),
            duration: Duration::from_secs(args.duration),
        };
        let lag_probe = Arc::new(LagProbe::new(&args.kafka, &self.group, &self.calls, p)?);
        let redis_client = redis::Client::open(args.redis.as_str())?;
        let mut rconn = redis_client.get_multiplexed_async_connection().await?;
        let correlated0 = stack::metric(cport, "tollguard_correlator_events_total")
            .await
            .unwrap_or(0.0);
        let started = Instant::now();
        let sender = tokio::spawn(traffic::run(
            traffic.clone(),
            clients,
            plan,
            stats.clone(),
            self.stop.clone(),
        ));
        let mut usage: Vec<ServiceUsage> = services
            .iter()
            .map(|s| ServiceUsage {
                name: s.name.clone(),
                pid: s.pid,
                cpu_start_s: stack::cpu_seconds(s.pid).unwrap_or(0.0),
                ..Default::default()
            })
            .collect();
        // The shared infrastructure and the load generator itself, for the
        // CPU account (not TollGuard services: no RSS target applies).
        let mut infra = vec![("loadgen (this process)".to_string(), std::process::id())];
        if let Some(pid) = redis_pid(&mut rconn).await {
            infra.push(("redis-server (shared)".into(), pid));
        }
        if let Some(pid) = stack::find_process("kafka.Kafka") {
            infra.push(("kafka broker (shared)".into(), pid));
        }
        usage.extend(infra.into_iter().map(|(name, pid)| ServiceUsage {
            name,
            pid,
            infrastructure: true,
            cpu_start_s: stack::cpu_seconds(pid).unwrap_or(0.0),
            ..Default::default()
        }));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_line = (Instant::now(), 0u64, correlated0);
        let load_end = started + Duration::from_secs(args.duration);
        let mut correlated_at_end = None;
        let mut accepted_at_end = 0;
        let mut drain_deadline = None;
        loop {
            tick.tick().await;
            let t = started.elapsed().as_secs_f64();
            for u in usage.iter_mut() {
                if let Some(r) = stack::rss_bytes(u.pid) {
                    u.rss_max_bytes = u.rss_max_bytes.max(r);
                    u.rss_end_bytes = r;
                }
                if let Some(c) = stack::cpu_seconds(u.pid) {
                    u.cpu_end_s = c;
                }
            }
            let dead = self.cleanup.children.exited();
            if !dead.is_empty() {
                bail!("service(s) exited during the run: {}", dead.join(", "));
            }
            let correlated = stack::metric(cport, "tollguard_correlator_events_total")
                .await
                .unwrap_or(0.0);
            let accepted = stats.accepted.load(Ordering::Relaxed);
            if correlated_at_end.is_none() && Instant::now() >= load_end {
                correlated_at_end = Some(correlated);
                accepted_at_end = accepted;
                drain_deadline = Some(Instant::now() + Duration::from_secs(args.drain));
            }
            let whole = t.round() as u64;
            {
                let probe = lag_probe.clone();
                let lag = tokio::task::spawn_blocking(move || probe.lag())
                    .await
                    .ok()
                    .flatten();
                let mem = redis_used_memory(&mut rconn).await;
                report.samples.push(Sample {
                    t_s: t,
                    accepted,
                    correlated: (correlated - correlated0).max(0.0) as u64,
                    lag,
                    redis_used_bytes: mem,
                    rss_bytes: usage
                        .iter()
                        .filter(|u| !u.infrastructure)
                        .map(|u| u.rss_end_bytes)
                        .collect(),
                });
                if whole.is_multiple_of(args.progress) {
                    let dt = last_line.0.elapsed().as_secs_f64().max(1e-3);
                    let ack_rate = (accepted - last_line.1) as f64 / dt;
                    let cor_rate = (correlated - last_line.2) / dt;
                    last_line = (Instant::now(), accepted, correlated);
                    let rss: Vec<String> = usage
                        .iter()
                        .filter(|u| !u.infrastructure)
                        .map(|u| format!("{}={}", u.name, u.rss_end_bytes >> 20))
                        .collect();
                    eprintln!(
                        "[{:>4.0}s] acked {:>9} ({:>6.0}/s)  correlated {:>9} ({:>6.0}/s)  lag {:>7}  alerts {:>5}  RSS MiB {}  redis {} MiB",
                        t,
                        accepted,
                        ack_rate,
                        (correlated - correlated0) as u64,
                        cor_rate,
                        lag.map_or("?".into(), |l| l.to_string()),
                        lock(&seen).len(),
                        rss.join(" "),
                        mem.map_or("?".into(), |m| (m >> 20).to_string()),
                    );
                }
            }
            if let Some(dl) = drain_deadline {
                let caught_up = correlated - correlated0
                    >= stats.accepted.load(Ordering::Relaxed) as f64
                    && sender.is_finished();
                if caught_up || Instant::now() >= dl || self.stop.load(Ordering::Relaxed) {
                    report.pipeline.drained = caught_up;
                    break;
                }
            }
        }
        let _ = sender.await;
        // Let alerts from the last events arrive.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let drain_s = started.elapsed().as_secs_f64() - args.duration as f64;
        let correlated = stack::metric(cport, "tollguard_correlator_events_total")
            .await
            .unwrap_or(0.0);
        for (field, name) in [
            (
                &mut report.pipeline.dead_letters,
                "tollguard_correlator_dead_letters_total",
            ),
            (
                &mut report.pipeline.duplicates,
                "tollguard_correlator_duplicate_events_total",
            ),
            (
                &mut report.pipeline.late,
                "tollguard_correlator_late_events_total",
            ),
        ] {
            *field = stack::metric(cport, name).await.unwrap_or(0.0) as u64;
        }
        self.stop.store(true, Ordering::Relaxed);
        let undecodable = watcher.await.unwrap_or(0);

        // 5. The figures.
        let secs = args.duration as f64;
        let pl = &mut report.pipeline;
        pl.seconds = secs;
        pl.sent = stats.sent.load(Ordering::Relaxed);
        pl.accepted = stats.accepted.load(Ordering::Relaxed);
        pl.rejected = stats.rejected.load(Ordering::Relaxed);
        pl.failed_batches = stats.failed_batches.load(Ordering::Relaxed);
        pl.retries = stats.retries.load(Ordering::Relaxed);
        pl.first_error = lock(&stats.first_error).clone();
        pl.accepted_in_window = accepted_at_end;
        pl.accepted_per_s = accepted_at_end as f64 / secs;
        let cw = correlated_at_end.unwrap_or(correlated) - correlated0;
        pl.correlated_in_window = cw.max(0.0) as u64;
        pl.correlated_per_s = cw.max(0.0) / secs;
        pl.correlated_total = (correlated - correlated0).max(0.0) as u64;
        pl.drain_s = drain_s.max(0.0);
        pl.undecodable_alerts = undecodable;
        report.ack_latency_ms = Percentiles::of(&lock(&stats.ack_us));
        let acked_at = lock(&stats.acked_at);
        let mut h = traffic::histogram();
        let (mut early, mut unmatched) = (0u64, 0u64);
        let seen = lock(&seen);
        for (c, batch, when, rule) in seen.iter() {
            *report.alerts_by_rule.entry(rule.clone()).or_default() += 1;
            match batch.and_then(|b| acked_at.get(&(*c, b))) {
                Some(ack) => {
                    if *when < *ack {
                        early += 1;
                    }
                    let us = when.saturating_duration_since(*ack).as_micros().max(1) as u64;
                    let _ = h.record(us.min(600_000_000));
                }
                None => unmatched += 1,
            }
        }
        report.alert_latency_ms = Percentiles::of(&h);
        report.alerts = seen.len() as u64;
        report.alerts_before_ack = early;
        report.alerts_unmatched = unmatched;
        report.services = usage;
        Ok(())
    }
}

async fn main_async(args: Args) -> anyhow::Result<i32> {
    check_targets(&args)?;
    let id = format!("lg-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let dir = std::env::temp_dir().join(format!("tollguard-{id}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let calls = format!("tgbench.{id}.calls");
    let alerts = format!("tgbench.{id}.alerts");
    let dlq = format!("tgbench.{id}.dlq");
    let raw = format!("tgbench.{id}.raw");
    let group = format!("tgbench-{id}");
    let cleanup = Cleanup {
        kafka: args.kafka.clone(),
        redis: args.redis.clone(),
        topics: vec![calls.clone(), alerts.clone(), dlq.clone(), raw.clone()],
        groups: vec![
            group.clone(),
            format!("{group}-watch"),
            format!("{group}-baseline"),
        ],
        prefix: format!("tgbench:{id}:"),
        dir: dir.clone(),
        keep_logs: args.keep_logs,
        children: Children::default(),
    };
    let run = Run {
        args: &args,
        cleanup: &cleanup,
        calls,
        alerts,
        dlq,
        raw,
        group,
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut report = Report::new(&id, &args);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        r = run.go(&mut report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C)")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
    };
    run.stop.store(true, Ordering::Relaxed);
    eprintln!("loadgen: cleaning up (services, topics, consumer groups, Redis keys)");
    // The services' logs are kept when something went wrong.
    let keep = cleanup.keep_logs || outcome.is_err();
    let cleanup = Cleanup {
        keep_logs: keep,
        ..cleanup
    };
    let c = cleanup.run().await;
    report.redis_keys_at_end = c.redis_keys;
    for e in &c.errors {
        eprintln!("loadgen: cleanup: {e}");
    }
    if keep {
        eprintln!("loadgen: logs kept in {}", dir.display());
    }
    match outcome {
        Ok(()) => {
            report.finish();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(0)
        }
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            Ok(1)
        }
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(main_async(args)).unwrap_or_else(|e| {
        eprintln!("loadgen: error: {e:#}");
        2
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}
