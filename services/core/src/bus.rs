//! The event bus: topics of keyed records with at-least-once consumption.
//!
//! Kafka is the production implementation (`tollguard-runtime`); the
//! [`MemoryBus`] here is an in-process log with the same semantics (ordered
//! offsets, consumer-group positions that only advance on commit) for the
//! embedded pipeline and unit tests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::error::BusError;

/// Topic names (DESIGN §4).
pub mod topics {
    /// Normalised call events.
    pub const CALLS: &str = "tollguard.calls.v1";
    /// Alerts (new incidents, updates, escalations).
    pub const ALERTS: &str = "tollguard.alerts.v1";
    /// Proof-of-warning ledger.
    pub const DELIVERIES: &str = "tollguard.deliveries.v1";
    /// Call records that cannot be processed.
    pub const CALLS_DLQ: &str = "tollguard.calls.dlq.v1";
}

/// Header carrying the schema version of the value.
pub const HEADER_SCHEMA: &str = "tollguard-schema";
/// W3C trace context header.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header carrying the DLQ reason.
pub const HEADER_DLQ_REASON: &str = "tollguard-dlq-reason";

/// A record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    /// Topic.
    pub topic: String,
    /// Key (partitioning).
    pub key: Vec<u8>,
    /// Value.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl InRecord {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A bus: publish records; subscribe as a consumer group.
#[async_trait]
pub trait EventBus: Send + Sync + fmt::Debug {
    /// Publishes records; resolves once every record is durably stored (for
    /// Kafka: all delivery reports are in). A full queue is
    /// [`BusError::Backpressure`].
    async fn publish(&self, records: Vec<OutRecord>) -> Result<(), BusError>;
    /// Joins consumer group `group` on `topics`.
    async fn subscribe(
        &self,
        topics: &[&str],
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError>;
}

/// A consumer-group member.
#[async_trait]
pub trait Subscription: Send + fmt::Debug {
    /// Up to `max` records, waiting at most `timeout` for the first one.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<InRecord>, BusError>;
    /// Marks `records` (and everything before them in their partitions) as
    /// processed; only then can the group's position move past them.
    async fn commit(&mut self, records: &[InRecord]) -> Result<(), BusError>;
    /// Stops fetching from these partitions of `topic` and resumes every
    /// other partition of it paused before (flow control: records already
    /// fetched from a partition being paused may still be returned).
    /// Partitions this member does not own are ignored. The default (a
    /// bus without independent partitions) fetches everything.
    async fn pause_only(&mut self, topic: &str, partitions: &[i32]) -> Result<(), BusError> {
        let _ = (topic, partitions);
        Ok(())
    }
    /// Flushes committed positions and leaves the group (graceful shutdown).
    async fn close(&mut self) -> Result<(), BusError> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct TopicLog {
    /// Offset of `recs[0]`.
    base: i64,
    recs: std::collections::VecDeque<Arc<OutRecord>>,
}

impl TopicLog {
    fn end(&self) -> i64 {
        self.base + self.recs.len() as i64
    }
}

#[derive(Debug, Default)]
struct Log {
    topics: HashMap<String, TopicLog>,
    committed: HashMap<(String, String), i64>,
}

/// The in-process bus: one partition per topic.
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    log: Arc<Mutex<Log>>,
    notify: Arc<Notify>,
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// End offset of a topic (records ever published).
    pub fn end_offset(&self, topic: &str) -> i64 {
        self.lock().topics.get(topic).map_or(0, TopicLog::end)
    }

    /// Retained records of a topic (for tests and summaries).
    pub fn records(&self, topic: &str) -> Vec<OutRecord> {
        self.lock()
            .topics
            .get(topic)
            .map(|v| v.recs.iter().map(|r| (**r).clone()).collect())
            .unwrap_or_default()
    }

    /// Drops records below offset `upto` (retention), keeping offsets stable.
    pub fn trim(&self, topic: &str, upto: i64) {
        let mut log = self.lock();
        if let Some(t) = log.topics.get_mut(topic) {
            while t.base < upto && !t.recs.is_empty() {
                t.recs.pop_front();
                t.base += 1;
            }
        }
    }

    /// The committed position of a group on a topic.
    pub fn committed(&self, group: &str, topic: &str) -> i64 {
        self.lock()
            .committed
            .get(&(group.to_string(), topic.to_string()))
            .copied()
            .unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, records: Vec<OutRecord>) -> Result<(), BusError> {
        {
            let mut log = self.lock();
            for r in records {
                log.topics
                    .entry(r.topic.clone())
                    .or_default()
                    .recs
                    .push_back(Arc::new(r));
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn subscribe(
        &self,
        topics: &[&str],
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let log = self.lock();
        let positions = topics
            .iter()
            .map(|t| {
                let p = log
                    .committed
                    .get(&(group.to_string(), t.to_string()))
                    .copied()
                    .unwrap_or(0);
                (t.to_string(), p)
            })
            .collect();
        Ok(Box::new(MemorySubscription {
            bus: self.clone(),
            group: group.to_string(),
            positions,
        }))
    }
}

/// A member of a consumer group on the [`MemoryBus`].
#[derive(Debug)]
pub struct MemorySubscription {
    bus: MemoryBus,
    group: String,
    positions: Vec<(String, i64)>,
}

impl MemorySubscription {
    fn take(&mut self, max: usize) -> Vec<InRecord> {
        let log = self.bus.lock();
        let mut out = Vec::new();
        for (topic, pos) in self.positions.iter_mut() {
            let Some(t) = log.topics.get(topic.as_str()) else {
                continue;
            };
            *pos = (*pos).max(t.base);
            while *pos < t.end() && out.len() < max {
                let r = &t.recs[(*pos - t.base) as usize];
                out.push(InRecord {
                    topic: topic.clone(),
                    partition: 0,
                    offset: *pos,
                    key: r.key.clone(),
                    payload: r.payload.clone(),
                    headers: r.headers.clone(),
                });
                *pos += 1;
            }
        }
        out
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<InRecord>, BusError> {
        let notify = self.bus.notify.clone();
        let notified = notify.notified();
        let out = self.take(max);
        if !out.is_empty() {
            return Ok(out);
        }
        let _ = tokio::time::timeout(timeout, notified).await;
        Ok(self.take(max))
    }

    async fn commit(&mut self, records: &[InRecord]) -> Result<(), BusError> {
        let mut log = self.bus.lock();
        for r in records {
            let e = log
                .committed
                .entry((self.group.clone(), r.topic.clone()))
                .or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
        Ok(())
    }
}
