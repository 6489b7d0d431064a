//! `tollguard-notifier`: consumes alerts and notifies everyone who must act.

#![allow(clippy::print_stdout)] // a command-line program prints its results

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;
use tollguard_core::ConfigError;
use tollguard_core::bus::EventBus;
use tollguard_core::store::{MemoryStore, WindowStore};
use tollguard_notifier::Notifier;
use tollguard_notifier::api::{AlertsService, Auth};
use tollguard_notifier::config::{NotifierConfig, Routing, load_contacts};
use tollguard_notifier::dispatch::{DispatchSettings, Fanout, FanoutDeps};
use tollguard_notifier::email::Mailer;
use tollguard_notifier::incidents::Incidents;
use tollguard_notifier::kafka_log::KafkaAlertLog;
use tollguard_notifier::ledger::Ledger;
use tollguard_notifier::metrics::Metrics;
use tollguard_notifier::webhook::WebhookClient;
use tollguard_proto::v1::alerts_server::AlertsServer;
use tollguard_runtime::config::{exit_config, load};
use tollguard_runtime::health::{self, Health};
use tollguard_runtime::kafka::KafkaBus;
use tollguard_runtime::redis_store::RedisStore;
use tollguard_runtime::store_metrics::MeteredStore;
use tollguard_runtime::{shutdown, telemetry};

/// The notifier: fans alerts out to webhooks and e-mail, serves the partner
/// Alerts API, and keeps the proof-of-warning ledger.
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

/// Everything loaded and validated before any port is bound.
struct Loaded {
    cfg: NotifierConfig,
    routing: Routing,
    mailer: Option<Mailer>,
    webhooks: WebhookClient,
    /// TLS of the Alerts API (certificates loaded and checked).
    security: tollguard_runtime::tls::GrpcSecurity,
    /// `[redis.tls]` certificates (files loaded and checked).
    redis_tls: Option<tollguard_runtime::redis_tls::RedisTlsCerts>,
}

fn load_all(mut cfg: NotifierConfig) -> Result<Loaded, ConfigError> {
    cfg.load_tokens()?;
    cfg.validate()?;
    let guard = Arc::new(cfg.guard()?);
    let routing = match &cfg.contacts_file {
        Some(p) => {
            let (r, warnings) = load_contacts(p, &guard, cfg.webhooks.default_max_concurrency)?;
            for w in warnings {
                tracing::warn!(warning = %w, "webhook target not resolvable now; it is checked again on every delivery");
            }
            r
        }
        None => Routing::default(),
    };
    let mailer = Mailer::new(&cfg.email, cfg.smtp_password()?)?;
    let webhooks = WebhookClient::new(
        guard,
        Duration::from_millis(cfg.webhooks.timeout_ms),
        Duration::from_millis(cfg.webhooks.connect_timeout_ms),
    )
    .map_err(|e| ConfigError::new("webhooks", e))?;
    let redis_tls = cfg.redis.load_tls()?;
    let security = if cfg.listen.grpc.is_some() {
        cfg.tls.load()?
    } else {
        tollguard_runtime::tls::GrpcSecurity::Plaintext
    };
    Ok(Loaded {
        cfg,
        routing,
        mailer,
        webhooks,
        security,
        redis_tls,
    })
}

/// mimalloc instead of glibc malloc: the hot paths allocate many small
/// strings per event, and glibc's free-list consolidation alone took ~10 %
/// of the correlator's CPU (BENCHMARKS.md, round 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = Args::parse();
    telemetry::init("notifier");
    let cfg: NotifierConfig = load(args.config.as_deref()).unwrap_or_else(|e| exit_config(&e));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The reqwest client is built inside the runtime (it may spawn).
    let loaded = rt
        .block_on(async { load_all(cfg) })
        .unwrap_or_else(|e| exit_config(&e));
    if args.check_config {
        println!(
            "configuration ok: notifier in group {}, {} push target(s), API {}",
            loaded.cfg.group,
            loaded.routing.target_count(),
            loaded
                .cfg
                .listen
                .grpc
                .map_or("disabled".to_string(), |a| a.to_string())
        );
        return;
    }
    if let Err(e) = rt.block_on(run(loaded)) {
        tracing::error!(error = %e, "notifier failed");
        telemetry::shutdown();
        std::process::exit(1);
    }
    // Flush the spans of the drain (after the graceful stop).
    telemetry::shutdown();
}

fn instance_name(cfg: &NotifierConfig) -> String {
    cfg.instance.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "notifier".into());
        format!("{host}/{}", std::process::id())
    })
}

async fn run(l: Loaded) -> anyhow::Result<()> {
    let Loaded {
        cfg,
        routing,
        mailer,
        webhooks,
        security,
        redis_tls,
    } = l;
    let stop = shutdown::on_signal();
    let health = Health::new("tollguard");
    let metrics = health.with_registry(Metrics::register);
    let http = health::serve(cfg.listen.http, health.clone(), stop.clone()).await?;
    tracing::info!(%http, "health and metrics listening");
    health.set("kafka", Some("connecting".into()));

    let bus = Arc::new(
        KafkaBus::new(cfg.kafka.clone())
            .unwrap_or_else(|e| exit_config(&ConfigError::new("kafka", e))),
    );
    let store: Arc<dyn WindowStore> = match &cfg.redis.url {
        Some(url) => {
            health.set("redis", Some("connecting".into()));
            loop {
                match RedisStore::connect_tls(url, &cfg.redis.key_prefix, redis_tls.as_ref()).await
                {
                    Ok(s) => break Arc::new(s),
                    Err(e) => {
                        health.set("redis", Some(e.to_string()));
                        tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        }
        None => {
            tracing::warn!(
                "redis.url is not set: incident state, dedupe decisions and ledger chain heads are kept \
                 in memory; this is only correct with a single notifier replica (development)"
            );
            Arc::new(MemoryStore::new(&cfg.redis.key_prefix))
        }
    };
    health.set("redis", None);
    // Store latency by operation; consumer lag of the group.
    let store = health.with_registry(|r| MeteredStore::wrap(store, r));
    tollguard_runtime::lag::spawn(
        cfg.kafka.clone(),
        cfg.group.clone(),
        vec![cfg.alerts_topic.clone()],
        health.with_registry(tollguard_runtime::lag::register),
        Duration::from_secs(15),
        stop.clone(),
    );
    // The ledger and DLQ topics (left alone when they exist).
    loop {
        match bus
            .ensure_topics(&[
                (cfg.deliveries_topic.as_str(), cfg.topic_partitions, &[]),
                (cfg.dlq_topic.as_str(), cfg.topic_partitions, &[]),
            ])
            .await
        {
            Ok(()) => break,
            Err(e) => {
                health.set("kafka", Some(e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    // Readiness follows Kafka and Redis reachability.
    {
        let bus = bus.clone();
        let health = health.clone();
        let store = store.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let ok = bus.probe(Duration::from_secs(3)).await;
                health.set("kafka", ok.err().map(|e| e.to_string()));
                let ok = store.ping().await;
                health.set("redis", ok.err().map(|e| e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    let day_ms = 86_400_000i64;
    let replica = instance_name(&cfg);
    let ledger = Ledger::new(
        store.clone(),
        bus.clone(),
        &cfg.deliveries_topic,
        &replica,
        i64::from(cfg.state.ledger_ttl_days) * day_ms,
    );
    let incidents = Incidents::new(
        store.clone(),
        i64::from(cfg.state.incident_ttl_days) * day_ms,
    );
    let routing = Arc::new(routing);
    tracing::info!(
        carriers = routing.carriers.len(),
        customers = routing.customers.len(),
        ops = routing.ops.is_some(),
        targets = routing.target_count(),
        email = mailer.as_ref().map(|m| m.server().to_string()).unwrap_or_else(|| "disabled".into()),
        replica = %replica,
        "routing loaded"
    );
    let fanout = Fanout::new(FanoutDeps {
        routing,
        store: store.clone(),
        bus: bus.clone(),
        ledger: ledger.clone(),
        incidents: incidents.clone(),
        webhooks,
        mailer,
        settings: DispatchSettings {
            retry: cfg.retry,
            throttle: cfg.throttle,
            dlq_topic: cfg.dlq_topic.clone(),
            max_queue: cfg.webhooks.max_queue,
            state_ttl_ms: i64::from(cfg.state.incident_ttl_days) * day_ms,
            smtp_concurrency: 4,
        },
        metrics: metrics.clone(),
    });

    // The Alerts API.
    let api_stop = tokio_util::sync::CancellationToken::new();
    let server = match cfg.listen.grpc {
        Some(addr) => {
            security.log("alerts");
            let auth = match security.clients() {
                Some(clients) => Auth::certificates(clients.clone()),
                None => {
                    if cfg.api.tokens.is_empty() {
                        tracing::warn!(
                            "api.tokens is empty: every Alerts API call will be UNAUTHENTICATED"
                        );
                    }
                    tracing::warn!(
                        identities = cfg.api.tokens.len(),
                        "DEVELOPMENT-MODE AUTHENTICATION: Alerts API callers are identified by bearer tokens in the \
                         x-tollguard-identity header (api.tokens) over plaintext; never expose this endpoint \
                         outside a development machine (set the tls section for mutual TLS)"
                    );
                    Auth::new(&cfg.api.tokens)
                }
            };
            let admin = tollguard_notifier::admin::AdminService::new(auth.clone(), store.clone());
            let svc = AlertsService::new(
                auth,
                incidents.clone(),
                store.clone(),
                ledger.clone(),
                Arc::new(KafkaAlertLog::new(cfg.kafka.clone(), &cfg.alerts_topic)),
                cfg.api.clone(),
                metrics.clone(),
                api_stop.clone(),
            );
            let (reporter, health_svc) = tonic_health::server::health_reporter();
            reporter.set_serving::<AlertsServer<AlertsService>>().await;
            let reflection = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tollguard_proto::FILE_DESCRIPTOR_SET)
                .build_v1()?;
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(grpc = %listener.local_addr()?, "Alerts API listening");
            let api_stop2 = api_stop.clone();
            let builder = security.apply(tonic::transport::Server::builder())?;
            Some(tokio::spawn(async move {
                builder
                    .timeout(Duration::from_secs(30))
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                    .add_service(health_svc)
                    .add_service(reflection)
                    .add_service(svc.into_server())
                    .add_service(admin.into_server())
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                        api_stop2.cancelled().await
                    })
                    .await
            }))
        }
        None => {
            tracing::info!("listen.grpc is not set: the Alerts API is not served");
            None
        }
    };

    let sub = bus
        .subscribe(&[cfg.alerts_topic.as_str()], &cfg.group)
        .await?;
    let mut notifier = Notifier::with_fanout(sub, fanout.clone(), cfg.max_in_flight, metrics);
    tracing::info!(group = %cfg.group, topic = %cfg.alerts_topic, "notifier consuming");
    while !stop.is_cancelled() {
        let r = tokio::select! {
            _ = stop.cancelled() => break,
            r = notifier.step(500, Duration::from_millis(200)) => r,
        };
        match r {
            Ok(_) => {}
            Err(e) => {
                health.set("kafka", Some(e.to_string()));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // 1. intake stopped; 2. let running deliveries finish within the grace,
    // then abandon the rest (their alerts stay uncommitted and are
    // re-delivered by whoever consumes the partition next).
    tracing::info!(
        in_flight = notifier.in_flight(),
        "intake stopped; draining deliveries"
    );
    let left = notifier.drain(Duration::from_secs(15)).await.unwrap_or(0);
    if left > 0 {
        tracing::warn!(
            left,
            "deliveries still running at the end of the grace period; abandoned (not committed)"
        );
    }
    fanout.stop();
    // 3. flush producers, 4. store offsets, 5. stop the API.
    if let Err(e) = bus.flush(Duration::from_secs(5)).await {
        tracing::warn!(error = %e, "producer flush incomplete");
    }
    notifier.close().await.ok();
    api_stop.cancel();
    if let Some(s) = server
        && let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), s)
            .await
            .unwrap_or(Ok(Ok(())))
    {
        tracing::warn!(error = %e, "Alerts API server error");
    }
    tracing::info!("notifier stopped");
    Ok(())
}
