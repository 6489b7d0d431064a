//! The same-run baseline: raw Kafka produce → consume pass-through on the
//! same broker, with the pipeline's own messages (real `CallEvent` payloads,
//! keys and headers, made by the ingest code in-process), the same partition
//! count, the same producer settings (the services' `KafkaSettings`
//! defaults: idempotent, `acks=all`, lz4) and the same batch size and
//! concurrency as the load generator's gRPC calls; the consumer is a
//! consumer-group member that stores offsets as it goes, like the
//! correlator. No validation, no Redis, no rules: what Kafka alone does on
//! this machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tollguard_core::bus::{EventBus, OutRecord, Subscription};
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings};

/// What the baseline measured.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineResult {
    /// Seconds it produced for.
    pub seconds: f64,
    /// Records produced and acknowledged.
    pub produced: u64,
    /// Records consumed within the window.
    pub consumed: u64,
    /// Consumed records per second within the window (the pass-through).
    pub events_per_s: f64,
    /// Mean payload size in bytes.
    pub mean_payload_bytes: f64,
}

/// Runs the pass-through for `duration` on `topic` (created beforehand).
pub async fn run(
    settings: KafkaSettings,
    topic: &str,
    group: &str,
    messages: Vec<OutRecord>,
    batch: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<BaselineResult> {
    anyhow::ensure!(!messages.is_empty(), "no baseline messages");
    let mean_payload_bytes =
        messages.iter().map(|m| m.payload.len()).sum::<usize>() as f64 / messages.len() as f64;
    let bus = KafkaBus::new(settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut sub = bus
        .subscribe_kafka(&[topic], group)
        .await
        .map_err(|e| anyhow::anyhow!("baseline consumer: {e}"))?;
    // Join the group before producing, so the window measures flow only.
    let joined = Instant::now();
    while sub.assignment().await.map(|a| a.is_empty()).unwrap_or(true) {
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(30),
            "baseline consumer got no partition within 30 s"
        );
        let _ = sub.poll(1, Duration::from_millis(100)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let messages = Arc::new(messages);
    let started = Instant::now();
    let deadline = started + duration;
    let mut producers = Vec::new();
    for p in 0..concurrency {
        let (bus, stop, produced, messages) = (
            bus.clone(),
            stop.clone(),
            produced.clone(),
            messages.clone(),
        );
        producers.push(tokio::spawn(async move {
            let mut i = p * batch;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let out: Vec<OutRecord> = (0..batch)
                    .map(|k| messages[(i + k) % messages.len()].clone())
                    .collect();
                i += batch * concurrency;
                match bus.publish(out).await {
                    Ok(()) => {
                        produced.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    let mut consumed = 0u64;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let recs = sub
            .poll(5_000, left.min(Duration::from_millis(100)))
            .await
            .map_err(|e| anyhow::anyhow!("baseline consumer: {e}"))?;
        if Instant::now() <= deadline {
            consumed += recs.len() as u64;
        }
        if !recs.is_empty() {
            sub.commit(&recs)
                .await
                .map_err(|e| anyhow::anyhow!("baseline commit: {e}"))?;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        let _ = p.await;
    }
    let _ = sub.close().await;
    Ok(BaselineResult {
        seconds: duration.as_secs_f64(),
        produced: produced.load(Ordering::Relaxed),
        consumed,
        events_per_s: consumed as f64 / duration.as_secs_f64(),
        mean_payload_bytes,
    })
}
