//! The per-carrier ingester: the `tollguard.v1.Ingest` gRPC service.
//!
//! Architecture invariant: a batch is acknowledged only after the bus has
//! confirmed that every accepted record is stored; refused records come back
//! in the ack and are never published; a full producer queue is answered with
//! `RESOURCE_EXHAUSTED` and retry advice, never buffered without bound.
//! Raw subscriber numbers never leave this crate: everything published is a
//! pseudonymised [`tollguard_core::CallEvent`].

pub mod config;
pub mod limits;
pub mod metrics;
pub mod service;

use std::sync::Arc;

use tollguard_core::bus::{EventBus, HEADER_SCHEMA, HEADER_TRACEPARENT, OutRecord};
use tollguard_core::codec::encode_event;
use tollguard_core::error::{BusError, FieldError, FieldErrorKind};
use tollguard_core::ingest::Ingestor;
use tollguard_core::record::RawRecord;

/// One refused record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index in the batch.
    pub index: u32,
    /// Its event id, if any.
    pub event_id: String,
    /// Why.
    pub error: FieldError,
}

/// Outcome of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Records stored on the bus.
    pub accepted: u32,
    /// Records refused.
    pub rejected: Vec<Rejected>,
}

/// The ingest logic, independent of gRPC: validate, normalise,
/// pseudonymise, publish, await.
#[derive(Debug, Clone)]
pub struct IngestCore {
    ingestor: Arc<Ingestor>,
    bus: Arc<dyn EventBus>,
    topic: String,
}

/// A W3C traceparent for a new trace (random ids).
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    format!("00-{:032x}-{:016x}-01", trace.max(1), span.max(1))
}

impl IngestCore {
    /// Builds the core over a bus.
    pub fn new(ingestor: Ingestor, bus: Arc<dyn EventBus>, topic: &str) -> Self {
        Self {
            ingestor: Arc::new(ingestor),
            bus,
            topic: topic.to_string(),
        }
    }

    /// The carrier served.
    pub fn provider_id(&self) -> &str {
        self.ingestor.provider_id()
    }

    /// Validates every record first; if any names another carrier the whole
    /// batch is refused (`Err(Rejected)` with `PermissionDenied`) and nothing
    /// is published. Otherwise publishes the valid ones and waits for the
    /// bus to confirm them.
    pub async fn publish(
        &self,
        records: &[RawRecord],
        now: i64,
        traceparent: Option<&str>,
    ) -> Result<BatchOutcome, PublishError> {
        use tracing::Instrument as _;
        let mut out = BatchOutcome::default();
        let mut batch = Vec::with_capacity(records.len());
        // The producer span: its traceparent goes into every record's
        // headers (the correlator continues from it). With traces off, the
        // caller's traceparent or a new one per record.
        let span = tracing::info_span!(
            "publish",
            otel.name = format!("{} publish", self.topic),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.type = "send",
            messaging.destination.name = %self.topic,
            messaging.batch.message_count = tracing::field::Empty,
        );
        let span_tp = tollguard_runtime::otel::traceparent(&span);
        let traceparent = span_tp.as_deref().or(traceparent);
        for (i, r) in records.iter().enumerate() {
            match check_text_fields(r).and_then(|()| self.ingestor.ingest(r, now)) {
                Ok(ev) => {
                    let key = ev.subject().compact().into_bytes();
                    let tp = traceparent
                        .map(str::to_string)
                        .unwrap_or_else(new_traceparent);
                    batch.push(OutRecord {
                        topic: self.topic.clone(),
                        key,
                        payload: encode_event(&ev),
                        headers: vec![
                            (
                                HEADER_SCHEMA.to_string(),
                                tollguard_proto::CALL_EVENT_SCHEMA_VERSION
                                    .to_string()
                                    .into_bytes(),
                            ),
                            (HEADER_TRACEPARENT.to_string(), tp.into_bytes()),
                        ],
                    });
                }
                Err(error) => {
                    let rej = Rejected {
                        index: i as u32,
                        event_id: r.event_id.clone().unwrap_or_default(),
                        error,
                    };
                    if rej.error.kind == FieldErrorKind::PermissionDenied {
                        return Err(PublishError::Denied(rej));
                    }
                    out.rejected.push(rej);
                }
            }
        }
        let n = batch.len() as u32;
        if n > 0 {
            span.record("messaging.batch.message_count", n);
            self.bus
                .publish(batch)
                .instrument(span)
                .await
                .map_err(PublishError::Bus)?;
        }
        out.accepted = n;
        Ok(out)
    }
}

/// Longest text field accepted, in bytes (ids, numbers, times, codes).
pub const MAX_FIELD_BYTES: usize = 256;

/// Refuses text fields that are too long or hold control characters (a
/// hostile or broken client must not inflate the bus or forge log lines).
/// The error names the field and never repeats its content.
pub fn check_text_fields(r: &RawRecord) -> Result<(), FieldError> {
    let fields: [(&str, &Option<String>); 15] = [
        ("provider_id", &r.provider_id),
        ("event_id", &r.event_id),
        ("call_id", &r.call_id),
        ("phase", &r.phase),
        ("customer_id", &r.customer_id),
        ("line_id", &r.line_id),
        ("caller", &r.caller),
        ("callee", &r.callee),
        ("direction", &r.direction),
        ("start_time", &r.start_time),
        ("answer_time", &r.answer_time),
        ("disposition", &r.disposition),
        ("source_ip", &r.source_ip),
        ("charge_amount", &r.charge_amount),
        ("charge_currency", &r.charge_currency),
    ];
    for (name, v) in fields {
        let Some(v) = v else { continue };
        if v.len() > MAX_FIELD_BYTES {
            return Err(FieldError::invalid(
                name,
                format!(
                    "is {} bytes long; at most {MAX_FIELD_BYTES} are allowed",
                    v.len()
                ),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(FieldError::invalid(name, "contains control characters"));
        }
    }
    Ok(())
}

/// Why a batch was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A record names another carrier: nothing was published.
    #[error("record {}: {}", .0.index, .0.error)]
    Denied(Rejected),
    /// The bus refused or failed (backpressure included).
    #[error(transparent)]
    Bus(BusError),
}
