//! `tollguard-correlator`: joins all carriers' events in Redis windows and
//! publishes alerts.

#![allow(clippy::print_stdout)] // a command-line program prints its results

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tollguard_core::ConfigError;
use tollguard_core::rules::{Detector, Engine, HotList, Policies, Policy, RulesConfig};
use tollguard_core::store::WindowStore;
use tollguard_correlator::config::CorrelatorConfig;
use tollguard_correlator::metrics::Metrics;
use tollguard_correlator::{Topics, Worker, WorkerError};
use tollguard_runtime::config::{exit_config, load, read_file as read};
use tollguard_runtime::health::{self, Health};
use tollguard_runtime::kafka::KafkaBus;
use tollguard_runtime::redis_store::RedisStore;
use tollguard_runtime::redis_tls::RedisTlsCerts;
use tollguard_runtime::store_metrics::MeteredStore;
use tollguard_runtime::{shutdown, telemetry};

/// The correlator: consumes call events, evaluates the rules over shared
/// Redis windows and publishes alerts.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `TOLLGUARD__SECTION__KEY` variables override it.
    #[arg(long, short, env = "TOLLGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit (0 if valid, 64 if not).
    #[arg(long)]
    check_config: bool,
}

/// Loads rules and policies into a detector.
fn detector(cfg: &CorrelatorConfig) -> Result<Detector, ConfigError> {
    cfg.validate()?;
    let rules = match &cfg.rules_file {
        Some(p) => RulesConfig::parse(&p.display().to_string(), &read("rules_file", p)?)?,
        None => RulesConfig::default(),
    };
    let th = rules.validate()?;
    let key = cfg.pseudonymization.load(None)?;
    let defaults = Policy {
        daily_cap: th.daily_cap,
        hourly_cap: th.hourly_cap,
        channels: rules.concurrency.default_channels,
        ..Default::default()
    };
    let policies = match &cfg.policies_file {
        Some(p) => Policies::parse(
            &p.display().to_string(),
            &read("policies_file", p)?,
            key.as_ref(),
            &defaults,
        )?,
        None => Policies::default(),
    };
    Detector::new(rules, policies, HotList::default())
}

/// mimalloc instead of glibc malloc: the hot paths allocate many small
/// strings per event, and glibc's free-list consolidation alone took ~10 %
/// of the correlator's CPU (BENCHMARKS.md, round 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = Args::parse();
    telemetry::init("correlator");
    let cfg: CorrelatorConfig = load(args.config.as_deref()).unwrap_or_else(|e| exit_config(&e));
    let det = detector(&cfg).unwrap_or_else(|e| exit_config(&e));
    let redis_tls = cfg.redis.load_tls().unwrap_or_else(|e| exit_config(&e));
    if args.check_config {
        println!("configuration ok: correlator in group {}", cfg.group);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cfg, det, redis_tls)) {
        tracing::error!(error = %e, "correlator failed");
        telemetry::shutdown();
        std::process::exit(1);
    }
    // Flush the spans of the drain (after the graceful stop).
    telemetry::shutdown();
}

async fn run(
    cfg: CorrelatorConfig,
    det: Detector,
    redis_tls: Option<RedisTlsCerts>,
) -> anyhow::Result<()> {
    let stop = shutdown::on_signal();
    let health = Health::new("tollguard");
    let metrics = health.with_registry(Metrics::register);
    let http = health::serve(cfg.listen.http, health.clone(), stop.clone()).await?;
    tracing::info!(%http, "health and metrics listening");
    health.set("kafka", Some("connecting".into()));
    health.set("redis", Some("connecting".into()));

    let bus = Arc::new(
        KafkaBus::new(cfg.kafka.clone())
            .unwrap_or_else(|e| exit_config(&ConfigError::new("kafka", e))),
    );
    // Connect to Redis, retrying until it answers or we are told to stop.
    let store: Arc<dyn WindowStore> = loop {
        let connected = if cfg.redis.cluster_nodes.is_empty() {
            RedisStore::connect_tls(&cfg.redis.url, &cfg.redis.key_prefix, redis_tls.as_ref()).await
        } else {
            RedisStore::connect_cluster_tls(
                &cfg.redis.cluster_nodes,
                &cfg.redis.key_prefix,
                redis_tls.as_ref(),
            )
            .await
        };
        match connected {
            Ok(s) => break Arc::new(s),
            Err(e) => {
                health.set("redis", Some(e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    health.set("redis", None);
    // Store latency by operation; consumer lag of the group.
    let store = health.with_registry(|r| MeteredStore::wrap(store, r));
    tollguard_runtime::lag::spawn(
        cfg.kafka.clone(),
        cfg.group.clone(),
        vec![cfg.topics.calls.clone()],
        health.with_registry(tollguard_runtime::lag::register),
        Duration::from_secs(15),
        stop.clone(),
    );
    let topics = Topics {
        calls: cfg.topics.calls.clone(),
        alerts: cfg.topics.alerts.clone(),
        dlq: cfg.topics.dlq.clone(),
    };
    let sub = tollguard_core::bus::EventBus::subscribe(&*bus, &[topics.calls.as_str()], &cfg.group)
        .await?;
    let mut layered = tollguard_correlator::overlay::Layered::new(
        det.policies().clone(),
        det.default_policy().clone(),
    );
    let engine = Engine::new(store.clone(), det);
    let mut worker = Worker::new(engine, bus.clone(), sub, topics, Some(metrics));
    if cfg.expected_providers.is_empty() {
        tracing::warn!(
            "expected_providers is empty: window state is pruned by the carriers seen so far, so a carrier whose events arrive only after another's (a late backfill) may miss joining them; list the consortium's carriers"
        );
    }
    worker.expect_carriers(cfg.expected_providers.clone());
    if let Some(a) = cfg.alignment.bounds() {
        worker.align(a);
    }
    let timeout = Duration::from_millis(cfg.poll_timeout_ms);
    let mut partitions = 0;
    let mut last_hot = Instant::now() - Duration::from_secs(3600);
    let mut backoff = Duration::from_millis(100);
    tracing::info!(group = %cfg.group, "correlator consuming");
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    while !stop.is_cancelled() {
        if last_hot.elapsed() >= Duration::from_secs(cfg.hot_list_refresh_s) {
            match store.set_members("hot").await {
                Ok(m) => worker
                    .engine_mut()
                    .detector_mut()
                    .set_hot_list(HotList::new(m)),
                Err(e) => tracing::warn!(error = %e, "hot list refresh failed"),
            }
            // The operator's policies (Admin API) over the file's.
            match layered.refresh(&*store).await {
                Ok(Some(p)) => worker.engine_mut().detector_mut().set_policies(p),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "policy overlay not applied; keeping the policies in force")
                }
            }
            // Every partition of the calls topic holds pruning back until a
            // lane was seen on it (partitions can be added at run time).
            match bus
                .partition_count(&cfg.topics.calls, Duration::from_secs(5))
                .await
            {
                Ok(Some(n)) if n != partitions => {
                    tracing::info!(topic = %cfg.topics.calls, partitions = n, "pruning waits for a lane on every partition");
                    worker.expect_partitions(n);
                    partitions = n;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "calls topic metadata not read; keeping the partitions known")
                }
            }
            last_hot = Instant::now();
        }
        let step = tokio::select! {
            _ = stop.cancelled() => break,
            _ = hup.recv() => {
                // Reload rules and policies; on any error keep the running ones.
                match detector(&cfg) {
                    Ok(mut d) => {
                        let p = layered.set_file(d.policies().clone(), d.default_policy().clone());
                        d.set_policies(p);
                        worker.engine_mut().set_detector(d);
                        tracing::info!("rules and policies reloaded (SIGHUP)");
                    }
                    Err(e) => tracing::error!(key = %e.key, reason = %e.reason, "reload failed; keeping the previous rules and policies"),
                }
                continue;
            }
            r = worker.step(cfg.batch_max, timeout) => r,
        };
        match step {
            Ok(_) => {
                health.set("kafka", None);
                health.set("redis", None);
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                let dep = match e {
                    WorkerError::Store(_) => "redis",
                    WorkerError::Bus(_) => "kafka",
                };
                health.set(dep, Some(e.to_string()));
                tracing::warn!(error = %e, dependency = dep, "batch failed; will retry");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!("intake stopped; committing offsets");
    if let Err(e) = worker.close().await {
        tracing::warn!(error = %e, "final commit failed");
    }
    if let Err(e) = bus.flush(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "producer flush incomplete");
    }
    tracing::info!("correlator stopped");
    Ok(())
}
