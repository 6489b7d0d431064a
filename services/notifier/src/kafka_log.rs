//! The Kafka [`AlertLog`]: a consumer without a group, assigned every
//! partition of the alerts topic at explicit offsets, polled on a blocking
//! task. It never commits, so any number of `Watch` streams on any number of
//! replicas read independently.
//!
//! (The runtime crate owns Kafka otherwise; this reader needs an
//! assignment-based consumer that its `EventBus` does not offer. It takes
//! the service's [`KafkaSettings`], TLS/SASL `extra` included.)

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tollguard_core::bus::InRecord;
use tollguard_runtime::kafka::KafkaSettings;

use crate::watch::{AlertLog, Cursor, LogError, LogReader, Start};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Readers of one topic.
#[derive(Clone)]
pub struct KafkaAlertLog {
    settings: Arc<KafkaSettings>,
    topic: String,
}

impl fmt::Debug for KafkaAlertLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAlertLog")
            .field("bootstrap", &self.settings.bootstrap)
            .field("topic", &self.topic)
            .finish()
    }
}

impl KafkaAlertLog {
    /// Readers of `topic`.
    pub fn new(settings: KafkaSettings, topic: &str) -> Self {
        Self {
            settings: Arc::new(settings),
            topic: topic.to_string(),
        }
    }
}

fn config(s: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in &s.extra {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &s.bootstrap)
        .set("client.id", format!("{}-watch", s.client_id))
        .set(
            "group.id",
            format!("tollguard-watch-{:016x}", rand::random::<u64>()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    c
}

fn unavailable(what: &str, e: impl fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {e}"))
}

fn open_blocking(
    settings: &KafkaSettings,
    topic: &str,
    start: Start,
) -> Result<KafkaReader, LogError> {
    let consumer: BaseConsumer = config(settings)
        .create()
        .map_err(|e| unavailable("cannot create kafka consumer", e))?;
    let md = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|e| unavailable("kafka metadata", e))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| LogError::Unavailable(format!("topic {topic} not found")))?;
    if let Some(e) = t.error() {
        return Err(LogError::Unavailable(format!("topic {topic}: {e:?}")));
    }
    let partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(LogError::Unavailable(format!(
            "topic {topic} has no partitions"
        )));
    }
    if let Start::At(c) = &start
        && let Some(p) = c.0.keys().find(|p| !partitions.contains(p))
    {
        return Err(LogError::Invalid(format!(
            "partition {p} does not exist in {topic}"
        )));
    }
    let mut positions = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p, METADATA_TIMEOUT)
            .map_err(|e| unavailable("kafka watermarks", e))?;
        let at = match &start {
            Start::Beginning => lo,
            Start::End => hi,
            Start::At(c) => match c.0.get(&p) {
                None => lo,
                Some(&o) if o < lo => {
                    return Err(LogError::Expired {
                        partition: p,
                        offset: o,
                        earliest: lo,
                    });
                }
                Some(&o) if o > hi => {
                    return Err(LogError::Invalid(format!(
                        "partition {p} offset {o} is past the end of {topic} ({hi})"
                    )));
                }
                Some(&o) => o,
            },
        };
        positions.insert(p, at);
        tpl.add_partition_offset(topic, p, Offset::Offset(at))
            .map_err(|e| unavailable("kafka assignment", e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| unavailable("kafka assign", e))?;
    Ok(KafkaReader {
        consumer: Some(Arc::new(consumer)),
        positions,
    })
}

#[async_trait]
impl AlertLog for KafkaAlertLog {
    async fn open(&self, start: Start) -> Result<Box<dyn LogReader>, LogError> {
        let settings = self.settings.clone();
        let topic = self.topic.clone();
        let r = tokio::task::spawn_blocking(move || open_blocking(&settings, &topic, start))
            .await
            .map_err(|e| unavailable("kafka task", e))??;
        Ok(Box::new(r))
    }
}

/// One reader.
pub struct KafkaReader {
    consumer: Option<Arc<BaseConsumer>>,
    positions: BTreeMap<i32, i64>,
}

impl fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaReader")
            .field("positions", &self.positions)
            .finish_non_exhaustive()
    }
}

fn poll_blocking(
    c: &BaseConsumer,
    max: usize,
    timeout: Duration,
) -> Result<Vec<InRecord>, LogError> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let wait = if out.is_empty() {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        match c.poll(wait) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(InRecord {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers,
                });
                if out.len() >= max {
                    return Ok(out);
                }
            }
            Some(Err(e)) => {
                if let rdkafka::error::KafkaError::MessageConsumptionFatal(code) = e {
                    return Err(unavailable("kafka consumer", code));
                }
                tracing::debug!(error = %e, "watch consumer error (retrying)");
            }
            None => {
                if !out.is_empty() || Instant::now() >= deadline {
                    return Ok(out);
                }
            }
        }
    }
}

#[async_trait]
impl LogReader for KafkaReader {
    fn position(&self) -> Cursor {
        Cursor(self.positions.clone())
    }

    async fn poll(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<tollguard_core::bus::InRecord>, LogError> {
        let c = self
            .consumer
            .clone()
            .ok_or_else(|| LogError::Unavailable("reader closed".into()))?;
        let recs = tokio::task::spawn_blocking(move || poll_blocking(&c, max, timeout))
            .await
            .map_err(|e| unavailable("kafka task", e))??;
        for r in &recs {
            let e = self.positions.entry(r.partition).or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
        Ok(recs)
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        // Closing a consumer waits on librdkafka's threads: not on a worker.
        if let Some(c) = self.consumer.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || drop(c));
                }
                Err(_) => drop(c),
            }
        }
    }
}
