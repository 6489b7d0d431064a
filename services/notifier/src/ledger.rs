//! Appending to the proof-of-warning ledger (`tollguard.deliveries.v1`).
//!
//! Each incident's records form a hash chain (see [`crate::chain`]). With
//! several notifier replicas the chain head — `(seq, hash)` of the last
//! record plus the record itself — lives in the window store and is advanced
//! with a compare-and-set, so two replicas can never both append seq `n`:
//!
//! 1. read the head; if its record is not yet marked published, publish it
//!    (again — an identical copy is harmless, verifiers skip it) and mark it;
//! 2. seal the new record after the head and CAS the head to it (retry from
//!    1 on conflict);
//! 3. publish the new record (retrying until Kafka confirms), then mark the
//!    head published.
//!
//! A crash between 2 and 3 leaves a head whose record was never stored; the
//! next append to that chain (by any replica) publishes it first, so the
//! chain never has a gap and records of one incident reach its partition in
//! chain order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prost::Message;
use serde::{Deserialize, Serialize};
use tollguard_core::bus::{EventBus, HEADER_SCHEMA, OutRecord};
use tollguard_core::store::{Scope, StateWrite, WindowStore};
use tollguard_core::{BusError, StoreError};
use tollguard_proto::v1 as pb;

use crate::chain::seal;

/// Schema header value of ledger records.
pub const DELIVERY_SCHEMA: &str = "tollguard.v1.DeliveryRecord";

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka failed (after retries).
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Too many concurrent appenders kept winning.
    #[error("ledger chain of {0} is contended; gave up after many compare-and-set conflicts")]
    Contended(String),
    /// The stored head is unreadable.
    #[error("ledger chain head of {0} is corrupt: {1}")]
    Corrupt(String, String),
    /// Shutting down.
    #[error("ledger closed")]
    Closed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
    /// The head record, protobuf, hex.
    record: String,
    published: bool,
}

/// What to append (the chain fields and the time are filled in).
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// Incident.
    pub incident_id: String,
    /// Alert version.
    pub alert_version: u32,
    /// Severity.
    pub severity: i32,
    /// Audience label.
    pub audience: String,
    /// Channel.
    pub channel: pb::DeliveryChannel,
    /// Redacted target.
    pub target: String,
    /// Attempt number (0 for API events).
    pub attempt: u32,
    /// Status.
    pub status: pb::DeliveryStatus,
    /// HTTP/SMTP code.
    pub response_code: u32,
    /// Error text.
    pub error: String,
    /// Delivery id.
    pub delivery_id: String,
    /// Actor (API events).
    pub actor: String,
    /// Note (API events).
    pub note: String,
}

/// The ledger appender. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn WindowStore>,
    bus: Arc<dyn EventBus>,
    topic: String,
    replica: String,
    ttl_ms: i64,
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    stop: tokio_util::sync::CancellationToken,
}

fn now_ts() -> prost_types::Timestamp {
    let now = chrono::Utc::now();
    prost_types::Timestamp {
        seconds: now.timestamp(),
        nanos: now.timestamp_subsec_nanos() as i32,
    }
}

impl Ledger {
    /// A ledger on `topic`, chain heads in `store` (kept `ttl_ms`).
    pub fn new(
        store: Arc<dyn WindowStore>,
        bus: Arc<dyn EventBus>,
        topic: &str,
        replica: &str,
        ttl_ms: i64,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                bus,
                topic: topic.to_string(),
                replica: replica.to_string(),
                ttl_ms,
                locks: Mutex::new(HashMap::new()),
                stop: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// Makes pending and future appends give up (shutdown).
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    fn lock_for(&self, incident: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.inner.locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = g.get(incident).and_then(Weak::upgrade) {
            return l;
        }
        if g.len() > 4096 {
            g.retain(|_, w| w.strong_count() > 0);
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        g.insert(incident.to_string(), Arc::downgrade(&l));
        l
    }

    fn key(incident: &str) -> (Scope, String) {
        (Scope::Global, format!("ledger:{incident}"))
    }

    async fn publish(&self, r: &pb::DeliveryRecord) -> Result<(), LedgerError> {
        let rec = OutRecord {
            topic: self.inner.topic.clone(),
            key: r.incident_id.as_bytes().to_vec(),
            payload: r.encode_to_vec(),
            headers: vec![(
                HEADER_SCHEMA.to_string(),
                DELIVERY_SCHEMA.as_bytes().to_vec(),
            )],
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.inner.bus.publish(vec![rec.clone()]).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(incident = %r.incident_id, seq = r.seq, error = %e, "ledger publish failed; retrying");
                    tokio::select! {
                        _ = self.inner.stop.cancelled() => return Err(LedgerError::Bus(e)),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn cas(
        &self,
        incident: &str,
        expect: Option<String>,
        head: &Head,
    ) -> Result<bool, LedgerError> {
        let (scope, name) = Self::key(incident);
        let value = serde_json::to_string(head)
            .map_err(|e| LedgerError::Corrupt(incident.into(), e.to_string()))?;
        Ok(self
            .inner
            .store
            .cas_state(&StateWrite {
                scope,
                name,
                expect,
                value,
                ttl_ms: self.inner.ttl_ms,
            })
            .await?)
    }

    /// Appends one record to its incident's chain and returns it as stored.
    pub async fn append(&self, e: Entry) -> Result<pb::DeliveryRecord, LedgerError> {
        let incident = e.incident_id.clone();
        let lock = self.lock_for(&incident);
        let _g = lock.lock().await;
        let base = pb::DeliveryRecord {
            incident_id: e.incident_id,
            seq: 0,
            prev_hash: String::new(),
            hash: String::new(),
            alert_version: e.alert_version,
            severity: e.severity,
            audience: e.audience,
            channel: e.channel as i32,
            target: e.target,
            attempt: e.attempt,
            at: Some(now_ts()),
            status: e.status as i32,
            response_code: e.response_code,
            error: e.error,
            delivery_id: e.delivery_id,
            actor: e.actor,
            note: e.note,
            replica: self.inner.replica.clone(),
        };
        for _ in 0..50 {
            if self.inner.stop.is_cancelled() {
                return Err(LedgerError::Closed);
            }
            let key = Self::key(&incident);
            let mut cur = self.inner.store.get_states(&[key]).await?.pop().flatten();
            let mut head: Option<Head> = match &cur {
                Some(s) => Some(
                    serde_json::from_str(s)
                        .map_err(|err| LedgerError::Corrupt(incident.clone(), err.to_string()))?,
                ),
                None => None,
            };
            if let Some(h) = head.as_mut().filter(|h| !h.published) {
                let bytes = hex::decode(&h.record)
                    .map_err(|err| LedgerError::Corrupt(incident.clone(), err.to_string()))?;
                let prev = pb::DeliveryRecord::decode(bytes.as_slice())
                    .map_err(|err| LedgerError::Corrupt(incident.clone(), err.to_string()))?;
                tracing::info!(incident = %incident, seq = h.seq, "re-publishing an unconfirmed ledger head");
                self.publish(&prev).await?;
                h.published = true;
                if !self.cas(&incident, cur.clone(), h).await? {
                    continue;
                }
                cur = Some(serde_json::to_string(h).unwrap_or_default());
            }
            let rec = seal(
                base.clone(),
                head.as_ref().map(|h| (h.seq, h.hash.as_str())),
            );
            let mut next = Head {
                seq: rec.seq,
                hash: rec.hash.clone(),
                record: hex::encode(rec.encode_to_vec()),
                published: false,
            };
            if !self.cas(&incident, cur.clone(), &next).await? {
                continue;
            }
            self.publish(&rec).await?;
            let pending = serde_json::to_string(&next).unwrap_or_default();
            next.published = true;
            // Failing here is harmless: the next appender re-publishes.
            let _ = self.cas(&incident, Some(pending), &next).await;
            tracing::debug!(incident = %incident, seq = rec.seq, status = rec.status, "ledger record appended");
            return Ok(rec);
        }
        Err(LedgerError::Contended(incident))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Located, verify};
    use tollguard_core::bus::MemoryBus;
    use tollguard_core::store::MemoryStore;

    #[tokio::test]
    async fn concurrent_appenders_on_two_replicas_keep_one_chain() {
        let store: Arc<dyn WindowStore> = Arc::new(MemoryStore::new("t:"));
        let bus = MemoryBus::new();
        let a = Ledger::new(store.clone(), Arc::new(bus.clone()), "led", "a", 60_000);
        let b = Ledger::new(store.clone(), Arc::new(bus.clone()), "led", "b", 60_000);
        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                l.append(Entry {
                    incident_id: format!("inc-{}", i % 3),
                    attempt: i,
                    status: pb::DeliveryStatus::Delivered,
                    ..Default::default()
                })
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let recs: Vec<Located> = bus
            .records("led")
            .iter()
            .enumerate()
            .map(|(i, r)| Located::decode(0, i as i64, &r.key, &r.payload))
            .collect();
        let rep = verify(&recs);
        assert!(rep.ok(), "{:?}", rep.problems);
        assert_eq!((rep.records, rep.chains), (20, 3));
    }

    #[tokio::test]
    async fn an_unpublished_head_is_published_before_the_next_record() {
        let store: Arc<dyn WindowStore> = Arc::new(MemoryStore::new("t:"));
        let bus = MemoryBus::new();
        let l = Ledger::new(store.clone(), Arc::new(bus.clone()), "led", "a", 60_000);
        let first = l
            .append(Entry {
                incident_id: "inc".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        // Simulate a crash after the CAS but before the publish of seq 2:
        // a head for seq 2 that was never published.
        let lost = seal(
            pb::DeliveryRecord {
                incident_id: "inc".into(),
                error: "lost".into(),
                ..Default::default()
            },
            Some((first.seq, &first.hash)),
        );
        let (scope, name) = Ledger::key("inc");
        let cur = store
            .get_states(&[(scope.clone(), name.clone())])
            .await
            .unwrap()[0]
            .clone();
        let head = Head {
            seq: lost.seq,
            hash: lost.hash.clone(),
            record: hex::encode(lost.encode_to_vec()),
            published: false,
        };
        assert!(
            store
                .cas_state(&StateWrite {
                    scope,
                    name,
                    expect: cur,
                    value: serde_json::to_string(&head).unwrap(),
                    ttl_ms: 60_000,
                })
                .await
                .unwrap()
        );
        let third = l
            .append(Entry {
                incident_id: "inc".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(third.seq, 3);
        let recs: Vec<Located> = bus
            .records("led")
            .iter()
            .enumerate()
            .map(|(i, r)| Located::decode(0, i as i64, &r.key, &r.payload))
            .collect();
        assert_eq!(recs.len(), 3);
        assert!(verify(&recs).ok());
    }
}
