//! The notifier: consumes `tollguard.alerts.v1` and warns everyone who must
//! act (DESIGN §6).
//!
//! * [`Notifier`] — the consumer loop. It deduplicates on (incident id,
//!   version), so an alert re-published after a correlator crash is handled
//!   once, logs every new alert, and, with a [`dispatch::Fanout`], hands it
//!   to the fan-out. Deliveries run on their own tasks; an alert's offset is
//!   committed only once all its deliveries settled (delivered or
//!   dead-lettered), in partition order, so a crash re-delivers rather than
//!   loses.
//! * [`dispatch`] — audiences, dedupe and throttling, webhooks and e-mail
//!   with retries, dead letters; [`scope`] — who sees what.
//! * [`ledger`] and [`chain`] — the hash-chained proof-of-warning ledger.
//! * [`api`] — the partner `Alerts` gRPC service; [`watch`] and
//!   [`kafka_log`] — resumable reading of the alerts topic.
//! * [`config`] — `notifier.toml` and `contacts.toml`; [`ssrf`] — which
//!   webhook targets may be contacted.
//!
//! Architecture invariant: the library talks to Kafka and Redis only through
//! the core's `EventBus`/`WindowStore` traits, except [`kafka_log`], the
//! assignment-based reader `Watch` needs.

pub mod admin;
pub mod api;
pub mod chain;
pub mod config;
pub mod countries;
pub mod dispatch;
pub mod email;
pub mod incidents;
pub mod kafka_log;
pub mod ledger;
pub mod metrics;
pub mod scope;
pub mod ssrf;
pub mod watch;
pub mod webhook;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::FutureExt;
use prost::Message;
use tollguard_core::bus::{InRecord, Subscription};
use tollguard_core::error::BusError;
use tollguard_proto::v1 as pb;

use crate::dispatch::{Fanout, Settled};
use crate::metrics::Metrics;

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

/// Errors of the consumer loop.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Stopped while an alert could not be processed (it stays uncommitted).
    #[error("stopped before the alert could be processed: {0}")]
    Stopped(String),
}

/// Alerts of one partition in offset order, each with its deliveries'
/// handle (`None`: nothing to wait for).
type PartitionQueue = VecDeque<(i64, Option<Settled>)>;

/// In-flight alerts per partition, committed in order once settled.
#[derive(Debug, Default)]
struct Tracker {
    parts: BTreeMap<(String, i32), PartitionQueue>,
    count: usize,
}

impl Tracker {
    fn push(&mut self, r: &InRecord, settled: Option<Settled>) {
        self.parts
            .entry((r.topic.clone(), r.partition))
            .or_default()
            .push_back((r.offset, settled));
        self.count += 1;
    }

    /// Pops the settled prefix of every partition; returns the records to
    /// commit (one per partition: the highest settled offset).
    fn settled(&mut self) -> Vec<InRecord> {
        let mut out = Vec::new();
        for ((topic, partition), q) in self.parts.iter_mut() {
            let mut highest = None;
            while let Some((offset, h)) = q.front_mut() {
                let done = match h {
                    None => true,
                    Some(s) if s.is_finished() => {
                        let ok = matches!(s.now_or_never(), Some(Ok(true)));
                        if !ok {
                            // Abandoned at shutdown: never committed; park a
                            // handle that never finishes in its place.
                            *h = Some(tokio::spawn(futures::future::pending()));
                        }
                        ok
                    }
                    Some(_) => false,
                };
                if !done {
                    break;
                }
                highest = Some(*offset);
                q.pop_front();
                self.count -= 1;
            }
            if let Some(offset) = highest {
                out.push(InRecord {
                    topic: topic.clone(),
                    partition: *partition,
                    offset,
                    key: Vec::new(),
                    payload: Vec::new(),
                    headers: Vec::new(),
                });
            }
        }
        out
    }
}

/// The alert consumer loop.
#[derive(Debug)]
pub struct Notifier {
    sub: Box<dyn Subscription>,
    dedupe: Dedupe,
    fanout: Option<Fanout>,
    tracker: Tracker,
    max_in_flight: usize,
    metrics: Option<Metrics>,
}

impl Notifier {
    /// A notifier that logs alerts (the embedded pipeline's).
    pub fn new(sub: Box<dyn Subscription>) -> Self {
        Self {
            sub,
            dedupe: Dedupe::new(100_000),
            fanout: None,
            tracker: Tracker::default(),
            max_in_flight: usize::MAX,
            metrics: None,
        }
    }

    /// A notifier that also fans every new alert out.
    pub fn with_fanout(
        sub: Box<dyn Subscription>,
        fanout: Fanout,
        max_in_flight: usize,
        metrics: Metrics,
    ) -> Self {
        Self {
            fanout: Some(fanout),
            max_in_flight,
            metrics: Some(metrics),
            ..Self::new(sub)
        }
    }

    /// Alerts whose deliveries are still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.count
    }

    /// Commits and leaves the group.
    pub async fn close(&mut self) -> Result<(), BusError> {
        self.commit_settled().await?;
        self.sub.close().await
    }

    async fn commit_settled(&mut self) -> Result<(), BusError> {
        let done = self.tracker.settled();
        if !done.is_empty() {
            self.sub.commit(&done).await?;
        }
        Ok(())
    }

    /// Waits up to `grace` for in-flight deliveries, committing what
    /// settles (shutdown). Returns the number still in flight.
    pub async fn drain(&mut self, grace: Duration) -> Result<usize, BusError> {
        let deadline = Instant::now() + grace;
        loop {
            self.commit_settled().await?;
            if self.tracker.count == 0 || Instant::now() >= deadline {
                return Ok(self.tracker.count);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn hand_over(&self, fanout: &Fanout, a: &pb::Alert) -> Result<Settled, NotifierError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match fanout.handle(a).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if fanout.stopped() {
                        return Err(NotifierError::Stopped(e.to_string()));
                    }
                    tracing::warn!(incident = %a.incident_id, error = %e, "cannot process alert (state store); retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Consumes up to `max` alerts, logs new ones (and fans them out),
    /// commits what has settled, and returns the new alerts.
    pub async fn step(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<pb::Alert>, NotifierError> {
        self.commit_settled().await?;
        if self.tracker.count >= self.max_in_flight {
            tokio::time::sleep(timeout.min(Duration::from_millis(200))).await;
            return Ok(Vec::new());
        }
        let batch = self.sub.poll(max, timeout).await?;
        let mut out = Vec::new();
        for r in &batch {
            let alert = match pb::Alert::decode(r.payload.as_slice()) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(partition = r.partition, offset = r.offset, error = %e, "undecodable alert skipped");
                    self.tracker.push(r, None);
                    continue;
                }
            };
            if !self.dedupe.first(&alert.incident_id, alert.version) {
                self.tracker.push(r, None);
                continue;
            }
            // The handling span continues the alert's trace (its
            // `traceparent` header); the deliveries are its children.
            let span = tracing::info_span!(
                "notify",
                otel.name = format!("{} process", r.topic),
                otel.kind = "consumer",
                messaging.system = "kafka",
                messaging.operation.type = "process",
                messaging.destination.name = %r.topic,
                incident = %alert.incident_id,
                version = alert.version,
            );
            tollguard_runtime::otel::set_parent(
                &span,
                r.header(tollguard_core::bus::HEADER_TRACEPARENT),
            );
            span.in_scope(|| {
                tracing::info!(
                    incident = %alert.incident_id,
                    version = alert.version,
                    rule = %tollguard_core::render::rule_name(&alert),
                    severity = %tollguard_core::render::severity_name(&alert),
                    kind = %tollguard_core::render::kind_name(&alert),
                    providers = ?alert.providers,
                    summary = %alert.summary,
                    action = %alert.recommended_action,
                    "incident notification"
                )
            });
            if let Some(m) = &self.metrics {
                m.alerts.inc();
            }
            let settled = match &self.fanout {
                Some(f) => {
                    match tracing::Instrument::instrument(self.hand_over(f, &alert), span).await {
                        Ok(s) => Some(s),
                        Err(e) => {
                            // Leave this and the rest of the batch uncommitted.
                            tracing::warn!(error = %e, "alert left uncommitted");
                            return Err(e);
                        }
                    }
                }
                None => None,
            };
            self.tracker.push(r, settled);
            out.push(alert);
        }
        self.commit_settled().await?;
        Ok(out)
    }
}
