//! The notifier: consumes `tollguard.alerts.v1` and fans warnings out.
//!
//! In this version it logs each alert as a structured line, deduplicating on
//! (incident id, version) so an alert re-published after a correlator crash
//! is delivered once. Webhooks, the partner `Alerts` API, e-mail and the
//! proof-of-warning ledger build on this loop.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use prost::Message;
use tollguard_core::bus::Subscription;
use tollguard_core::error::BusError;
use tollguard_proto::v1 as pb;

/// Remembers recently seen (incident, version) pairs.
#[derive(Debug, Default)]
pub struct Dedupe {
    seen: HashSet<(String, u32)>,
    order: VecDeque<(String, u32)>,
    cap: usize,
}

impl Dedupe {
    /// Remembers up to `cap` pairs.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Default::default()
        }
    }

    /// True the first time a pair is offered.
    pub fn first(&mut self, id: &str, version: u32) -> bool {
        let k = (id.to_string(), version);
        if self.seen.contains(&k) {
            return false;
        }
        self.seen.insert(k.clone());
        self.order.push_back(k);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// The alert consumer loop.
#[derive(Debug)]
pub struct Notifier {
    sub: Box<dyn Subscription>,
    dedupe: Dedupe,
}

impl Notifier {
    /// A notifier over a subscription to the alerts topic.
    pub fn new(sub: Box<dyn Subscription>) -> Self {
        Self {
            sub,
            dedupe: Dedupe::new(100_000),
        }
    }

    /// Commits and leaves the group.
    pub async fn close(&mut self) -> Result<(), BusError> {
        self.sub.close().await
    }

    /// Consumes up to `max` alerts, logs new ones, commits, and returns them.
    pub async fn step(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<pb::Alert>, BusError> {
        let batch = self.sub.poll(max, timeout).await?;
        let mut out = Vec::new();
        for r in &batch {
            match pb::Alert::decode(r.payload.as_slice()) {
                Ok(a) => {
                    if self.dedupe.first(&a.incident_id, a.version) {
                        tracing::info!(
                            incident = %a.incident_id,
                            version = a.version,
                            rule = %tollguard_core::render::rule_name(&a),
                            severity = %tollguard_core::render::severity_name(&a),
                            kind = %tollguard_core::render::kind_name(&a),
                            providers = ?a.providers,
                            summary = %a.summary,
                            action = %a.recommended_action,
                            "incident notification"
                        );
                        out.push(a);
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = r.partition, offset = r.offset, error = %e, "undecodable alert skipped");
                }
            }
        }
        if !batch.is_empty() {
            self.sub.commit(&batch).await?;
        }
        Ok(out)
    }
}
