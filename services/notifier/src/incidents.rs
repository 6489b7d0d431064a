//! Incident state shared by every notifier replica, in the window store's
//! state values (compare-and-set, with TTLs):
//!
//! * `inc:<incident id>` (scope `Global`): the latest alert of the
//!   incident (highest version), its state, acknowledgements and
//!   resolution, as JSON;
//! * `incidx:<yyyymmdd>` (scope `Global`): the ids of the incidents first
//!   seen that (UTC) day, as a JSON array — the index `List` reads.
//!
//! Alerts are rare compared with call events, so one hash slot (`{g}`) for
//! all of them is fine even on Redis Cluster.

use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};
use tollguard_core::StoreError;
use tollguard_core::store::{Scope, StateWrite, WindowStore};
use tollguard_proto::v1 as pb;

use crate::scope::{Viewer, scope};

/// One acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckDoc {
    /// Identity.
    pub by: String,
    /// When, ms.
    pub at_ms: i64,
    /// Note.
    pub note: String,
}

/// The stored incident.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentDoc {
    /// Latest alert, protobuf, hex.
    pub alert: String,
    /// Its version.
    pub version: u32,
    /// `pb::IncidentState`.
    pub state: i32,
    /// Acknowledgements.
    pub acks: Vec<AckDoc>,
    /// `pb::Resolution` (0 while open).
    pub resolution: i32,
    /// Who resolved.
    pub resolved_by: String,
    /// When, ms.
    pub resolved_at_ms: i64,
    /// Resolution note.
    pub resolution_note: String,
    /// When this notifier first saw the incident, ms.
    pub received_ms: i64,
}

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

impl IncidentDoc {
    /// The latest alert.
    pub fn alert(&self) -> pb::Alert {
        hex::decode(&self.alert)
            .ok()
            .and_then(|b| pb::Alert::decode(b.as_slice()).ok())
            .unwrap_or_default()
    }

    /// True once acknowledged or resolved.
    pub fn closed(&self) -> bool {
        self.state != pb::IncidentState::Open as i32
    }

    /// The API message, scoped for `viewer`.
    pub fn to_proto(&self, viewer: &Viewer) -> pb::Incident {
        pb::Incident {
            latest: Some(scope(&self.alert(), viewer)),
            state: self.state,
            acknowledgements: self
                .acks
                .iter()
                .map(|a| pb::Acknowledgement {
                    by: a.by.clone(),
                    at: Some(ts(a.at_ms)),
                    note: a.note.clone(),
                })
                .collect(),
            resolution: self.resolution,
            resolved_by: self.resolved_by.clone(),
            resolved_at: (self.resolved_at_ms > 0).then(|| ts(self.resolved_at_ms)),
            resolution_note: self.resolution_note.clone(),
        }
    }
}

/// The incident store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Incidents {
    store: Arc<dyn WindowStore>,
    ttl_ms: i64,
}

fn key(id: &str) -> (Scope, String) {
    (Scope::Global, format!("inc:{id}"))
}

fn day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y%m%d").to_string())
        .unwrap_or_else(|| "19700101".into())
}

fn index_key(day: &str) -> (Scope, String) {
    (Scope::Global, format!("incidx:{day}"))
}

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// No such incident.
    #[error("not found")]
    NotFound,
    /// The change is not allowed in the current state.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Incidents {
    /// Incidents in `store`, kept `ttl_ms` after their last change.
    pub fn new(store: Arc<dyn WindowStore>, ttl_ms: i64) -> Self {
        Self { store, ttl_ms }
    }

    async fn cas(
        &self,
        k: (Scope, String),
        expect: Option<String>,
        value: String,
    ) -> Result<bool, StoreError> {
        self.store
            .cas_state(&StateWrite {
                scope: k.0,
                name: k.1,
                expect,
                value,
                ttl_ms: self.ttl_ms,
            })
            .await
    }

    async fn index(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let k = index_key(&day(now_ms));
        for _ in 0..100 {
            let cur = self
                .store
                .get_states(std::slice::from_ref(&k))
                .await?
                .pop()
                .flatten();
            let mut ids: Vec<String> = cur
                .as_deref()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            if ids.iter().any(|x| x == id) {
                return Ok(());
            }
            ids.push(id.to_string());
            let v = serde_json::to_string(&ids).unwrap_or_default();
            if self.cas(k.clone(), cur, v).await? {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(
            "incident index is contended".into(),
        ))
    }

    /// Records an alert: the incident's latest alert becomes the one with the
    /// highest version. Returns true if the incident was new.
    pub async fn record(&self, a: &pb::Alert, now_ms: i64) -> Result<bool, StoreError> {
        for _ in 0..100 {
            let cur = self
                .store
                .get_states(&[key(&a.incident_id)])
                .await?
                .pop()
                .flatten();
            let old: Option<IncidentDoc> =
                cur.as_deref().and_then(|s| serde_json::from_str(s).ok());
            if old.as_ref().is_some_and(|d| d.version >= a.version) {
                return Ok(false);
            }
            let is_new = old.is_none();
            if is_new {
                // Index first: a crash after it leaves an id without a
                // document (skipped by List) until the alert is re-processed.
                self.index(&a.incident_id, now_ms).await?;
            }
            let mut doc = old.unwrap_or(IncidentDoc {
                state: pb::IncidentState::Open as i32,
                received_ms: now_ms,
                ..Default::default()
            });
            doc.alert = hex::encode(a.encode_to_vec());
            doc.version = a.version;
            let v = serde_json::to_string(&doc).unwrap_or_default();
            if self.cas(key(&a.incident_id), cur, v).await? {
                return Ok(is_new);
            }
        }
        Err(StoreError::Unavailable(
            "incident state is contended".into(),
        ))
    }

    /// The incident, if known.
    pub async fn get(&self, id: &str) -> Result<Option<IncidentDoc>, StoreError> {
        let cur = self.store.get_states(&[key(id)]).await?.pop().flatten();
        Ok(cur.as_deref().and_then(|s| serde_json::from_str(s).ok()))
    }

    /// Applies `f` to the incident atomically (compare-and-set, retried).
    pub async fn update<F>(&self, id: &str, f: F) -> Result<IncidentDoc, UpdateError>
    where
        F: Fn(&mut IncidentDoc) -> Result<(), UpdateError>,
    {
        for _ in 0..100 {
            let cur = self.store.get_states(&[key(id)]).await?.pop().flatten();
            let Some(mut doc) = cur
                .as_deref()
                .and_then(|s| serde_json::from_str::<IncidentDoc>(s).ok())
            else {
                return Err(UpdateError::NotFound);
            };
            f(&mut doc)?;
            let v = serde_json::to_string(&doc).unwrap_or_default();
            if self.cas(key(id), cur, v).await? {
                return Ok(doc);
            }
        }
        Err(UpdateError::Store(StoreError::Unavailable(
            "incident state is contended".into(),
        )))
    }

    /// Every incident first seen in the last `days` days.
    pub async fn list(&self, days: u32, now_ms: i64) -> Result<Vec<IncidentDoc>, StoreError> {
        let keys: Vec<(Scope, String)> = (0..=i64::from(days))
            .map(|d| index_key(&day(now_ms - d * 86_400_000)))
            .collect();
        let mut ids: Vec<String> = Vec::new();
        for v in self.store.get_states(&keys).await?.into_iter().flatten() {
            if let Ok(list) = serde_json::from_str::<Vec<String>>(&v) {
                ids.extend(list);
            }
        }
        ids.sort();
        ids.dedup();
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let keys: Vec<(Scope, String)> = chunk.iter().map(|i| key(i)).collect();
            for v in self.store.get_states(&keys).await?.into_iter().flatten() {
                if let Ok(d) = serde_json::from_str::<IncidentDoc>(&v) {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollguard_core::store::MemoryStore;

    fn alert(id: &str, v: u32) -> pb::Alert {
        pb::Alert {
            incident_id: id.into(),
            version: v,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn latest_version_wins_and_state_survives_updates() {
        let inc = Incidents::new(Arc::new(MemoryStore::new("t:")), 60_000);
        let now = 1_700_000_000_000;
        assert!(inc.record(&alert("a", 2), now).await.unwrap());
        assert!(!inc.record(&alert("a", 1), now).await.unwrap());
        inc.update("a", |d| {
            d.state = pb::IncidentState::Acknowledged as i32;
            Ok(())
        })
        .await
        .unwrap();
        inc.record(&alert("a", 3), now).await.unwrap();
        let d = inc.get("a").await.unwrap().unwrap();
        assert_eq!(
            (d.version, d.state),
            (3, pb::IncidentState::Acknowledged as i32)
        );
        assert!(matches!(
            inc.update("zzz", |_| Ok(())).await,
            Err(UpdateError::NotFound)
        ));
        inc.record(&alert("b", 1), now + 86_400_000).await.unwrap();
        let all = inc.list(30, now + 86_400_000).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(inc.list(0, now + 86_400_000).await.unwrap().len(), 1);
    }
}
