//! The gRPC `Ingest` service over [`IngestCore`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio_stream::StreamExt;
use tollguard_core::error::BusError;
use tollguard_core::record::RawRecord;
use tollguard_proto::v1 as pb;
use tollguard_runtime::tls::ClientAuth;
use tonic::{Request, Response, Status, Streaming};

use crate::limits::{RateLimiter, StreamSlot, StreamSlots};
use crate::metrics::Metrics;
use crate::{IngestCore, PublishError};

/// Who may call and how much: authentication, rate and stream limits.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Client certificate identities (`None`: plaintext development mode,
    /// every caller is taken to be the configured carrier).
    pub clients: Option<ClientAuth>,
    /// Records per second per carrier.
    pub limiter: Arc<RateLimiter>,
    /// Open `Publish` streams per carrier.
    pub streams: StreamSlots,
    /// A stream idle for this long is closed.
    pub stream_idle: Duration,
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct IngestService {
    core: IngestCore,
    max_batch: usize,
    metrics: Metrics,
    guard: Guard,
}

fn opt(s: &str) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s.to_string())
    }
}

/// Converts a gRPC record to the raw record (empty string = absent).
pub fn raw_from_proto(r: &pb::CallRecord) -> RawRecord {
    RawRecord {
        provider_id: opt(&r.provider_id),
        event_id: opt(&r.event_id),
        call_id: opt(&r.call_id),
        phase: opt(&r.phase),
        customer_id: opt(&r.customer_id),
        line_id: opt(&r.line_id),
        caller: opt(&r.caller),
        callee: opt(&r.callee),
        direction: opt(&r.direction),
        start_time: opt(&r.start_time),
        answer_time: opt(&r.answer_time),
        duration_s: Some(r.duration_s),
        disposition: opt(&r.disposition),
        source_ip: opt(&r.source_ip),
        charge_amount: opt(&r.charge_amount),
        charge_currency: opt(&r.charge_currency),
    }
}

/// Converts a raw record to its gRPC form.
pub fn raw_to_proto(r: &RawRecord) -> pb::CallRecord {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    pb::CallRecord {
        provider_id: s(&r.provider_id),
        event_id: s(&r.event_id),
        call_id: s(&r.call_id),
        phase: s(&r.phase),
        customer_id: s(&r.customer_id),
        line_id: s(&r.line_id),
        caller: s(&r.caller),
        callee: s(&r.callee),
        direction: s(&r.direction),
        start_time: s(&r.start_time),
        answer_time: s(&r.answer_time),
        duration_s: r.duration_s.unwrap_or(0.0),
        disposition: s(&r.disposition),
        source_ip: s(&r.source_ip),
        charge_amount: s(&r.charge_amount),
        charge_currency: s(&r.charge_currency),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl IngestService {
    /// Builds the service.
    pub fn new(core: IngestCore, max_batch: usize, metrics: Metrics, guard: Guard) -> Self {
        Self {
            core,
            max_batch,
            metrics,
            guard,
        }
    }

    /// The carrier calling: from its client certificate (mutual TLS), or
    /// the configured carrier in plaintext development mode. A certificate
    /// of another carrier is `PERMISSION_DENIED`.
    fn authorize<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let me = self.core.provider_id();
        let Some(clients) = &self.guard.clients else {
            return Ok(me.to_string());
        };
        let caller = clients.authenticate(req).inspect_err(|st| {
            tracing::warn!(code = ?st.code(), reason = %st.message(), "ingest call refused");
        })?;
        if caller.principal != me {
            tracing::warn!(identity = %caller.identity, principal = %caller.principal, "ingest call refused: certificate of another carrier");
            return Err(Status::permission_denied(format!(
                "client certificate {:?} is carrier {:?}; this ingester accepts records of {me:?} only",
                caller.identity, caller.principal
            )));
        }
        Ok(caller.principal)
    }

    /// One batch under its `Ingest` server span, which continues the
    /// caller's trace when the call carried a `traceparent`.
    async fn handle(
        &self,
        principal: &str,
        req: pb::PublishRequest,
        traceparent: Option<&str>,
    ) -> Result<pb::PublishAck, Status> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "ingest",
            otel.name = "tollguard.v1.Ingest/Publish",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "tollguard.v1.Ingest",
            provider = %self.core.provider_id(),
            batch = req.batch_id,
            records = req.records.len(),
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        tollguard_runtime::otel::set_parent(&span, traceparent.map(str::as_bytes));
        let res = self
            .handle_batch(principal, req, traceparent)
            .instrument(span.clone())
            .await;
        if let Err(st) = &res {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", st.message());
        }
        res
    }

    async fn handle_batch(
        &self,
        principal: &str,
        req: pb::PublishRequest,
        traceparent: Option<&str>,
    ) -> Result<pb::PublishAck, Status> {
        let started = Instant::now();
        let provider = self.core.provider_id().to_string();
        if req.records.len() > self.max_batch {
            self.metrics
                .count(&provider, "rejected", req.records.len() as u64);
            return Err(Status::invalid_argument(format!(
                "records: batch {} has {} records; at most {} are allowed per batch",
                req.batch_id,
                req.records.len(),
                self.max_batch
            )));
        }
        if let Err(wait) = self
            .guard
            .limiter
            .admit(principal, req.records.len(), Instant::now())
        {
            self.metrics
                .count(&provider, "throttled", req.records.len() as u64);
            // A batch within max_batch always fits the burst (validated).
            let ms = wait.map_or(1000, |w| w.as_millis().max(1) as u64);
            let mut st = Status::resource_exhausted(format!(
                "rate limit of carrier {principal} exceeded; batch {} was not acknowledged, resend it after {ms} ms",
                req.batch_id
            ));
            if let Ok(v) = ms.to_string().parse() {
                st.metadata_mut().insert("retry-after-ms", v);
            }
            return Err(st);
        }
        let raws: Vec<RawRecord> = req.records.iter().map(raw_from_proto).collect();
        match self.core.publish(&raws, now_ms(), traceparent).await {
            Ok(out) => {
                self.metrics
                    .count(&provider, "accepted", out.accepted as u64);
                self.metrics
                    .count(&provider, "rejected", out.rejected.len() as u64);
                self.metrics
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(pb::PublishAck {
                    batch_id: req.batch_id,
                    accepted: out.accepted,
                    rejected: out.rejected.len() as u32,
                    errors: out
                        .rejected
                        .into_iter()
                        .map(|r| pb::RecordError {
                            index: r.index,
                            event_id: r.event_id,
                            field: r.error.field,
                            reason: r.error.reason,
                            code: r.error.kind.code().to_string(),
                        })
                        .collect(),
                })
            }
            Err(PublishError::Denied(r)) => {
                self.metrics.count(&provider, "denied", raws.len() as u64);
                tracing::warn!(provider = %provider, batch = req.batch_id, index = r.index, "batch refused: record names another provider");
                Err(Status::permission_denied(format!(
                    "records[{}].{}: {}; nothing of batch {} was published",
                    r.index, r.error.field, r.error.reason, req.batch_id
                )))
            }
            Err(PublishError::Bus(BusError::Backpressure { retry_after_ms })) => {
                self.metrics
                    .count(&provider, "backpressure", raws.len() as u64);
                let mut st = Status::resource_exhausted(format!(
                    "ingest queue full; batch {} was not acknowledged, resend it after {retry_after_ms} ms (resending is safe)",
                    req.batch_id
                ));
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    st.metadata_mut().insert("retry-after-ms", v);
                }
                Err(st)
            }
            Err(PublishError::Bus(e)) => {
                tracing::error!(provider = %provider, error = %e, "publish failed");
                Err(Status::unavailable(format!(
                    "event bus unavailable; batch {} was not acknowledged, resend it: {e}",
                    req.batch_id
                )))
            }
        }
    }
}

fn traceparent<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::PublishAck, Status>> + Send>>;

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    type PublishStream = AckStream;

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let principal = self.authorize(&request)?;
        let slot: StreamSlot = self.guard.streams.acquire(&principal).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "carrier {principal} already has {} open Publish streams; close one or use fewer",
                self.guard.streams.max()
            ))
        })?;
        let tp = traceparent(&request);
        let mut inbound = request.into_inner();
        let this = self.clone();
        let idle = self.guard.stream_idle;
        let out = async_stream_acks(move |tx| async move {
            let _slot = slot;
            loop {
                let next = match tokio::time::timeout(idle, inbound.next()).await {
                    Ok(Some(n)) => n,
                    Ok(None) => break,
                    Err(_) => {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "no batch received for {} ms; stream closed (open a new one)",
                                idle.as_millis()
                            ))))
                            .await;
                        break;
                    }
                };
                let res = match next {
                    Ok(req) => this.handle(&principal, req, tp.as_deref()).await,
                    Err(s) => Err(s),
                };
                let stop = res.is_err();
                if tx.send(res).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishAck>, Status> {
        let principal = self.authorize(&request)?;
        let tp = traceparent(&request);
        self.handle(&principal, request.into_inner(), tp.as_deref())
            .await
            .map(Response::new)
    }
}

/// Runs `f` with a bounded channel and returns its receiving end as a stream
/// (one ack in flight per stream: acks go out in order, backpressure flows to
/// the client).
fn async_stream_acks<F, Fut>(f: F) -> AckStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::PublishAck, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
