//! `tollguard-notifier`: consumes alerts and notifies everyone who must act.

#![allow(clippy::print_stdout)] // a command-line program prints its results

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use tollguard_core::ConfigError;
use tollguard_core::bus::EventBus;
use tollguard_notifier::Notifier;
use tollguard_runtime::config::{exit_config, load};
use tollguard_runtime::health::{self, Health};
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings};
use tollguard_runtime::{shutdown, telemetry};

/// The notifier.
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Listen {
    #[serde(default = "default_http")]
    http: SocketAddr,
}

fn default_http() -> SocketAddr {
    "127.0.0.1:9103".parse().expect("static")
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: default_http(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifierConfig {
    #[serde(default)]
    listen: Listen,
    #[serde(default)]
    kafka: KafkaSettings,
    #[serde(default = "default_alerts")]
    alerts_topic: String,
    #[serde(default = "default_group")]
    group: String,
}

fn default_alerts() -> String {
    tollguard_core::bus::topics::ALERTS.into()
}
fn default_group() -> String {
    "tollguard-notifier".into()
}

impl NotifierConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if self.alerts_topic.is_empty() {
            return Err(ConfigError::new("alerts_topic", "must not be empty"));
        }
        if self.group.is_empty() {
            return Err(ConfigError::new("group", "must not be empty"));
        }
        Ok(())
    }
}

fn main() {
    let args = Args::parse();
    telemetry::init("notifier");
    let cfg: NotifierConfig = load(args.config.as_deref()).unwrap_or_else(|e| exit_config(&e));
    cfg.validate().unwrap_or_else(|e| exit_config(&e));
    if args.check_config {
        println!("configuration ok: notifier in group {}", cfg.group);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cfg)) {
        tracing::error!(error = %e, "notifier failed");
        std::process::exit(1);
    }
}

async fn run(cfg: NotifierConfig) -> anyhow::Result<()> {
    let stop = shutdown::on_signal();
    let health = Health::new("tollguard");
    let http = health::serve(cfg.listen.http, health.clone(), stop.clone()).await?;
    tracing::info!(%http, "health and metrics listening");
    let bus = Arc::new(
        KafkaBus::new(cfg.kafka.clone())
            .unwrap_or_else(|e| exit_config(&ConfigError::new("kafka", e))),
    );
    let sub = bus
        .subscribe(&[cfg.alerts_topic.as_str()], &cfg.group)
        .await?;
    let mut notifier = Notifier::new(sub);
    tracing::info!(group = %cfg.group, topic = %cfg.alerts_topic, "notifier consuming");
    while !stop.is_cancelled() {
        let r = tokio::select! {
            _ = stop.cancelled() => break,
            r = notifier.step(500, Duration::from_millis(200)) => r,
        };
        match r {
            Ok(_) => health.set("kafka", None),
            Err(e) => {
                health.set("kafka", Some(e.to_string()));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    notifier.close().await.ok();
    tracing::info!("notifier stopped");
    Ok(())
}
