//! `tollguard-ingester`: one carrier's gRPC ingest endpoint.

#![allow(clippy::print_stdout)] // a command-line program prints its results

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;
use tollguard_core::ConfigError;
use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::pseudo::{Key, Pseudonymizer};
use tollguard_core::tables::{RateDeck, RiskTable};
use tollguard_ingester::IngestCore;
use tollguard_ingester::config::IngesterConfig;
use tollguard_ingester::limits::{RateLimiter, StreamSlots};
use tollguard_ingester::metrics::Metrics;
use tollguard_ingester::service::{Guard, IngestService};
use tollguard_proto::v1::ingest_server::IngestServer;
use tollguard_runtime::config::{exit_config, load, read_file as read, read_secret};
use tollguard_runtime::health::{self, Health};
use tollguard_runtime::kafka::KafkaBus;
use tollguard_runtime::tls::GrpcSecurity;
use tollguard_runtime::{shutdown, telemetry};

/// One carrier's ingester: validates, normalises and pseudonymises call
/// events and publishes them to Kafka.
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

fn build(cfg: &IngesterConfig) -> Result<(Ingestor, GrpcSecurity), ConfigError> {
    cfg.validate()?;
    let security = cfg.tls.load()?;
    let p = &cfg.pseudonymization;
    let secret = match (&p.key_file, &p.key) {
        (Some(f), _) => read_secret("pseudonymization.key_file", f)?,
        (None, Some(k)) => k.clone(),
        (None, None) => unreachable!("validated"),
    };
    let key = Key::from_text(&p.key_id, &secret)?;
    let pseudo = match p.rotation()? {
        None => Pseudonymizer::new(key),
        Some(at) => {
            let next_secret = match (&p.next_key_file, &p.next_key) {
                (Some(f), _) => read_secret("pseudonymization.next_key_file", f)?,
                (None, Some(k)) => k.clone(),
                (None, None) => unreachable!("validated"),
            };
            let next_id = p.next_key_id.as_deref().unwrap_or_default();
            let next = Key::from_text(next_id, &next_secret).map_err(|e| {
                ConfigError::new(
                    e.key
                        .replace("pseudonymization.key", "pseudonymization.next_key"),
                    e.reason,
                )
            })?;
            tracing::info!(key_id = %p.key_id, next_key_id = %next_id, rotate_at = %p.rotate_at.as_deref().unwrap_or_default(), "pseudonymisation key rotation scheduled by event time");
            Pseudonymizer::with_rotation(key, next, at)
        }
    };
    let mut refdata = ReferenceData::default();
    if let Some(f) = &cfg.reference.risk_table {
        refdata.risk =
            RiskTable::parse(&f.display().to_string(), &read("reference.risk_table", f)?)?;
    }
    if let Some(f) = &cfg.reference.rate_deck {
        refdata.rates =
            RateDeck::parse(&f.display().to_string(), &read("reference.rate_deck", f)?)?;
    }
    let ingestor = Ingestor::new(
        &cfg.provider_id,
        cfg.dial_plan.clone(),
        p.range_digits,
        pseudo,
        Arc::new(refdata),
    )?;
    Ok((ingestor, security))
}

/// mimalloc instead of glibc malloc: the hot paths allocate many small
/// strings per event, and glibc's free-list consolidation alone took ~10 %
/// of the correlator's CPU (BENCHMARKS.md, round 4).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = Args::parse();
    telemetry::init("ingester");
    let cfg: IngesterConfig = load(args.config.as_deref()).unwrap_or_else(|e| exit_config(&e));
    let (ingestor, security) = build(&cfg).unwrap_or_else(|e| exit_config(&e));
    if args.check_config {
        println!(
            "configuration ok: ingester for provider {}",
            cfg.provider_id
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cfg, ingestor, security)) {
        tracing::error!(error = %e, "ingester failed");
        telemetry::shutdown();
        std::process::exit(1);
    }
    // Flush the spans of the drain (after the graceful stop).
    telemetry::shutdown();
}

async fn run(
    cfg: IngesterConfig,
    ingestor: Ingestor,
    security: GrpcSecurity,
) -> anyhow::Result<()> {
    let stop = shutdown::on_signal();
    let health = Health::new("tollguard");
    let metrics = health.with_registry(Metrics::register);
    let bus = Arc::new(
        KafkaBus::new(cfg.kafka.clone())
            .unwrap_or_else(|e| exit_config(&ConfigError::new("kafka", e))),
    );
    let http = health::serve(cfg.listen.http, health.clone(), stop.clone()).await?;
    tracing::info!(%http, "health and metrics listening");

    // Readiness follows Kafka reachability.
    {
        let bus = bus.clone();
        let health = health.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let ok = bus.probe(Duration::from_secs(3)).await;
                health.set("kafka", ok.err().map(|e| e.to_string()));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }

    let core = IngestCore::new(ingestor, bus.clone(), &cfg.topic);
    let l = &cfg.limits;
    let guard = Guard {
        clients: security.clients().cloned(),
        limiter: Arc::new(RateLimiter::new(
            l.records_per_second,
            f64::from(l.burst_records),
        )),
        streams: StreamSlots::new(l.max_streams_per_carrier),
        stream_idle: Duration::from_millis(l.stream_idle_timeout_ms),
    };
    let svc = IngestService::new(core, l.max_batch_records, metrics, guard);
    let (reporter, health_svc) = tonic_health::server::health_reporter();
    reporter.set_serving::<IngestServer<IngestService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tollguard_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let server = IngestServer::new(svc)
        .max_decoding_message_size(cfg.limits.max_message_bytes)
        .max_encoding_message_size(cfg.limits.max_message_bytes);
    let listener = tokio::net::TcpListener::bind(cfg.listen.grpc).await?;
    tracing::info!(grpc = %listener.local_addr()?, provider = %cfg.provider_id, tls = !security.is_plaintext(), "ingest API listening");
    security.log("ingest");
    let stop2 = stop.clone();
    security
        .apply(tonic::transport::Server::builder())?
        .timeout(Duration::from_millis(cfg.limits.request_timeout_ms))
        .max_concurrent_streams(cfg.limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(server)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            stop2.cancelled().await
        })
        .await?;
    // Intake stopped; flush what is in flight.
    tracing::info!("intake stopped; flushing the producer");
    if let Err(e) = bus.flush(Duration::from_secs(20)).await {
        tracing::warn!(error = %e, "producer flush incomplete");
    }
    tracing::info!("ingester stopped");
    Ok(())
}
