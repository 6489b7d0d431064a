//! The correlator: consumes `tollguard.calls.v1`, joins every carrier's
//! events in the shared window store, evaluates the rules and publishes
//! alerts to `tollguard.alerts.v1`.
//!
//! Architecture invariant: offsets are committed only after the window
//! store update and the alert publication succeeded (at-least-once), and
//! every effect is idempotent (event ids dedupe window updates, incident
//! claims dedupe alerts), so a crash loses nothing and duplicates nothing.
//! A record that cannot be decoded goes to the DLQ and never blocks its
//! partition.

pub mod config;
pub mod metrics;
pub mod overlay;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tollguard_core::bus::{
    EventBus, HEADER_DLQ_REASON, HEADER_TRACEPARENT, InRecord, OutRecord, Subscription,
};
use tollguard_core::codec::decode_event;
use tollguard_core::error::{BusError, StoreError};
use tollguard_core::rules::Engine;
use tollguard_proto::v1 as pb;

use crate::metrics::Metrics;

/// Topic names the worker uses.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Input.
    pub calls: String,
    /// Output.
    pub alerts: String,
    /// Dead letters.
    pub dlq: String,
}

impl Default for Topics {
    fn default() -> Self {
        use tollguard_core::bus::topics;
        Self {
            calls: topics::CALLS.into(),
            alerts: topics::ALERTS.into(),
            dlq: topics::CALLS_DLQ.into(),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Records consumed and committed.
    pub records: usize,
    /// Alerts published.
    pub alerts: usize,
    /// Records sent to the DLQ.
    pub dead_letters: usize,
    /// Re-delivered events (no state change).
    pub duplicates: usize,
    /// Events later than the allowed lateness.
    pub late: usize,
}

/// Why a step failed (the batch is kept and retried).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Window store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bus failure.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One consumer-group member's processing loop.
#[derive(Debug)]
pub struct Worker {
    engine: Engine,
    bus: Arc<dyn EventBus>,
    sub: Box<dyn Subscription>,
    topics: Topics,
    metrics: Option<Metrics>,
    /// A polled batch not yet fully processed (retried after a failure).
    pending: Option<Vec<InRecord>>,
    watermarks: tollguard_core::rules::Watermarks,
}

fn wall() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Traceparent continuing the trace of `parent` (new span id).
pub fn child_traceparent(parent: Option<&[u8]>) -> Option<String> {
    let p = std::str::from_utf8(parent?).ok()?;
    let parts: Vec<&str> = p.split('-').collect();
    if parts.len() != 4 || parts[1].len() != 32 {
        return None;
    }
    let span: u64 = rand::random();
    Some(format!("00-{}-{:016x}-{}", parts[1], span.max(1), parts[3]))
}

impl Worker {
    /// Builds a worker over a subscription to `topics.calls`.
    pub fn new(
        engine: Engine,
        bus: Arc<dyn EventBus>,
        sub: Box<dyn Subscription>,
        topics: Topics,
        metrics: Option<Metrics>,
    ) -> Self {
        Self {
            engine,
            bus,
            sub,
            topics,
            metrics,
            pending: None,
            watermarks: Default::default(),
        }
    }

    /// Waits for these carriers before pruning window state (see
    /// [`tollguard_core::rules::Watermarks`]).
    pub fn expect_carriers(&mut self, carriers: Vec<String>) {
        self.watermarks = tollguard_core::rules::Watermarks::expecting(carriers);
    }

    /// The engine (to refresh the hot list or policies).
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Polls up to `max` records (waiting at most `timeout`) and processes
    /// them. On error the batch is kept and the next call retries it.
    pub async fn step(&mut self, max: usize, timeout: Duration) -> Result<StepReport, WorkerError> {
        let batch = match self.pending.take() {
            Some(b) => b,
            None => self.sub.poll(max, timeout).await?,
        };
        if batch.is_empty() {
            return Ok(StepReport::default());
        }
        // The batch's consumer span, linked to the traces of its records.
        let span = tracing::info_span!(
            "process",
            otel.name = format!("{} process", self.topics.calls),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %self.topics.calls,
            messaging.batch.message_count = batch.len(),
        );
        tollguard_runtime::otel::add_links(
            &span,
            batch.iter().filter_map(|r| r.header(HEADER_TRACEPARENT)),
            128,
        );
        match tracing::Instrument::instrument(self.process(&batch), span).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.pending = Some(batch);
                Err(e)
            }
        }
    }

    async fn process(&mut self, batch: &[InRecord]) -> Result<StepReport, WorkerError> {
        let mut events = Vec::with_capacity(batch.len());
        let mut late = Vec::with_capacity(batch.len());
        let lateness = self.engine.detector().config().general.allowed_lateness_s as i64 * 1000;
        let mut parents = Vec::with_capacity(batch.len());
        let mut out = Vec::new();
        let mut report = StepReport {
            records: batch.len(),
            ..Default::default()
        };
        for r in batch {
            match decode_event(&r.payload) {
                Ok(e) => {
                    late.push(
                        self.watermarks
                            .observe_at(r.partition, &e, lateness, wall()),
                    );
                    parents.push((
                        e.event_key(),
                        r.header(HEADER_TRACEPARENT).map(<[u8]>::to_vec),
                    ));
                    events.push(e);
                }
                Err(err) => {
                    tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, reason = %err, "undecodable record sent to the DLQ");
                    let mut headers = r.headers.clone();
                    headers.push((HEADER_DLQ_REASON.into(), err.to_string().into_bytes()));
                    headers.push((
                        "tollguard-dlq-source".into(),
                        format!("{}/{}/{}", r.topic, r.partition, r.offset).into_bytes(),
                    ));
                    out.push(OutRecord {
                        topic: self.topics.dlq.clone(),
                        key: r.key.clone(),
                        payload: r.payload.clone(),
                        headers,
                    });
                    report.dead_letters += 1;
                }
            }
        }
        let started = std::time::Instant::now();
        let horizon = self.watermarks.horizon(wall());
        let processed = self
            .engine
            .process_at(&events, &late, horizon, wall())
            .await?;
        if let Some(m) = &self.metrics {
            m.store_seconds.observe(started.elapsed().as_secs_f64());
        }
        report.duplicates = processed.duplicates;
        report.late = processed.late;
        // One span per alert in the trace of the event that triggered it,
        // open until the alert is published.
        let mut alert_spans = Vec::with_capacity(processed.alerts.len());
        for a in &processed.alerts {
            let parent = parents
                .iter()
                .find(|(k, _)| *k == format!("{}/{}", a.trigger_provider_id, a.trigger_event_id))
                .and_then(|(_, p)| p.as_deref());
            let mut headers = vec![(
                tollguard_core::bus::HEADER_SCHEMA.to_string(),
                b"1".to_vec(),
            )];
            let span = tracing::info_span!(
                "alert",
                incident = %a.incident_id,
                version = a.version,
                rule = %tollguard_core::render::rule_name(a),
                severity = %tollguard_core::render::severity_name(a),
            );
            tollguard_runtime::otel::set_parent(&span, parent);
            if let Some(tp) =
                tollguard_runtime::otel::traceparent(&span).or_else(|| child_traceparent(parent))
            {
                headers.push((HEADER_TRACEPARENT.into(), tp.into_bytes()));
            }
            span.in_scope(|| {
                tracing::info!(
                    incident = %a.incident_id,
                    version = a.version,
                    rule = %tollguard_core::render::rule_name(a),
                    severity = %tollguard_core::render::severity_name(a),
                    "alert"
                )
            });
            alert_spans.push(span);
            if let Some(m) = &self.metrics {
                m.alert(a);
            }
            out.push(OutRecord {
                topic: self.topics.alerts.clone(),
                key: a.incident_id.clone().into_bytes(),
                payload: a.encode_to_vec(),
                headers,
            });
        }
        report.alerts = processed.alerts.len();
        if !out.is_empty() {
            let span = tracing::info_span!(
                "publish",
                otel.name = format!("{} publish", self.topics.alerts),
                otel.kind = "producer",
                messaging.system = "kafka",
                messaging.operation.type = "send",
                messaging.destination.name = %self.topics.alerts,
                messaging.batch.message_count = out.len(),
            );
            tracing::Instrument::instrument(self.bus.publish(out), span).await?;
        }
        drop(alert_spans);
        self.engine.confirm(processed).await?;
        self.sub.commit(batch).await?;
        if let Some(m) = &self.metrics {
            m.events.inc_by(events.len() as u64);
            m.dead_letters.inc_by(report.dead_letters as u64);
            m.duplicates.inc_by(report.duplicates as u64);
            m.late.inc_by(report.late as u64);
        }
        Ok(report)
    }

    /// Commits what was processed and leaves the group. A batch still
    /// pending (failed) is not committed and will be redelivered.
    pub async fn close(&mut self) -> Result<(), BusError> {
        self.sub.close().await
    }

    /// Decodes alerts (helper for consumers of the alerts topic).
    pub fn decode_alert(r: &InRecord) -> Option<pb::Alert> {
        pb::Alert::decode(r.payload.as_slice()).ok()
    }
}
