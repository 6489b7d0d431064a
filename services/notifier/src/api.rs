//! The partner `Alerts` gRPC API: `Watch`, `List`, `Acknowledge`, `Resolve`,
//! every call scoped to the caller's identity.
//!
//! **Authentication** is by mutual TLS: the caller's client certificate
//! identity (SAN or CN) is mapped by `tls.clients` to a principal, a provider
//! id or `operator` (see [`tollguard_runtime::tls`]). A call without a
//! certificate is `UNAUTHENTICATED`; a certificate mapped to nobody is
//! `PERMISSION_DENIED`. A carrier sees only incidents its traffic is part
//! of, scoped by [`crate::scope`]; the operator sees everything.
//!
//! In the **development mode** (`tls.enabled = false`, loudly logged) the
//! caller instead sends a bearer token in the `x-tollguard-identity`
//! metadata header, mapped to an identity by `api.tokens`.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::Stream;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tollguard_core::StoreError;
use tollguard_core::store::WindowStore;
use tollguard_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::config::ApiSettings;
use crate::incidents::{AckDoc, IncidentDoc, Incidents, UpdateError};
use crate::ledger::{Entry, Ledger};
use crate::metrics::Metrics;
use crate::scope::{Viewer, scope, visible};
use crate::watch::{AlertLog, Cursor, LogError, Start};

/// Metadata header carrying the (development-mode) bearer token.
pub const IDENTITY_HEADER: &str = "x-tollguard-identity";

/// Longest note accepted.
const MAX_NOTE: usize = 1000;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The consortium operator: sees everything.
    Operator,
    /// A carrier.
    Carrier(String),
}

impl Identity {
    /// From a configured identity string.
    pub fn parse(s: &str) -> Self {
        if s == tollguard_runtime::tls::OPERATOR {
            Identity::Operator
        } else {
            Identity::Carrier(s.to_string())
        }
    }

    /// How alerts are scoped for it.
    pub fn viewer(&self) -> Viewer {
        match self {
            Identity::Operator => Viewer::Operator,
            Identity::Carrier(p) => Viewer::Carrier(p.clone()),
        }
    }

    /// `operator` or the provider id.
    pub fn name(&self) -> &str {
        match self {
            Identity::Operator => "operator",
            Identity::Carrier(p) => p,
        }
    }

    /// Ledger audience label.
    pub fn label(&self) -> String {
        match self {
            Identity::Operator => "operator".into(),
            Identity::Carrier(p) => format!("carrier:{p}"),
        }
    }
}

/// How callers are identified.
#[derive(Clone)]
pub enum Auth {
    /// Mutual TLS: client certificate identity → principal.
    Certificates(tollguard_runtime::tls::ClientAuth),
    /// DEVELOPMENT MODE: bearer token → identity, keyed by the tokens'
    /// SHA-256 (no token is compared byte by byte, and none is kept in
    /// clear).
    DevTokens(HashMap<[u8; 32], Identity>),
}

impl Default for Auth {
    fn default() -> Self {
        Auth::DevTokens(HashMap::new())
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Certificates(c) => f
                .debug_struct("Auth::Certificates")
                .field("identities", &c.len())
                .finish(),
            Auth::DevTokens(t) => f
                .debug_struct("Auth::DevTokens")
                .field("identities", &t.values().collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl Auth {
    /// Development mode, from `api.tokens`.
    pub fn new(tokens: &BTreeMap<String, String>) -> Self {
        Auth::DevTokens(
            tokens
                .iter()
                .map(|(t, i)| (Sha256::digest(t.as_bytes()).into(), Identity::parse(i)))
                .collect(),
        )
    }

    /// Mutual TLS with `tls.clients`.
    pub fn certificates(clients: tollguard_runtime::tls::ClientAuth) -> Self {
        Auth::Certificates(clients)
    }

    /// The caller of `req`.
    pub fn identify<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        let tokens = match self {
            Auth::Certificates(c) => {
                return c
                    .authenticate(req)
                    .map(|who| Identity::parse(&who.principal))
                    .inspect_err(|st| {
                        tracing::warn!(code = ?st.code(), reason = %st.message(), "Alerts API call refused");
                    });
            }
            Auth::DevTokens(t) => t,
        };
        let token = req
            .metadata()
            .get(IDENTITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().trim_start_matches("Bearer ").trim())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "missing credentials: send the {IDENTITY_HEADER} header"
                ))
            })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        tokens
            .get(&digest)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct AlertsService {
    inner: Arc<ApiInner>,
}

#[derive(Debug)]
struct ApiInner {
    auth: Auth,
    incidents: Incidents,
    store: Arc<dyn WindowStore>,
    ledger: Ledger,
    log: Arc<dyn AlertLog>,
    settings: ApiSettings,
    metrics: Metrics,
    watchers: Arc<AtomicUsize>,
    stop: CancellationToken,
}

fn store_status(e: StoreError) -> Status {
    Status::unavailable(format!("state store: {e}"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ts_ms(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

struct WatchSlot {
    watchers: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::SeqCst);
        self.metrics.watch_subscribers.dec();
    }
}

/// The stream type of `Watch`.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::AlertEnvelope, Status>> + Send>>;

impl AlertsService {
    /// Builds the service. `stop` ends every `Watch` stream (shutdown).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        auth: Auth,
        incidents: Incidents,
        store: Arc<dyn WindowStore>,
        ledger: Ledger,
        log: Arc<dyn AlertLog>,
        settings: ApiSettings,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(ApiInner {
                auth,
                incidents,
                store,
                ledger,
                log,
                settings,
                metrics,
                watchers: Arc::new(AtomicUsize::new(0)),
                stop,
            }),
        }
    }

    /// The tonic server.
    pub fn into_server(self) -> pb::alerts_server::AlertsServer<Self> {
        pb::alerts_server::AlertsServer::new(self)
    }

    /// The incident if `who` may see it, else `NOT_FOUND`.
    async fn visible_doc(&self, id: &str, who: &Identity) -> Result<IncidentDoc, Status> {
        if id.trim().is_empty() {
            return Err(Status::invalid_argument("incident_id: must not be empty"));
        }
        let not_found = || Status::not_found(format!("incident {id} not found"));
        let doc = self
            .inner
            .incidents
            .get(id)
            .await
            .map_err(store_status)?
            .ok_or_else(not_found)?;
        if !visible(&doc.alert(), &who.viewer()) {
            return Err(not_found());
        }
        Ok(doc)
    }

    async fn ledger_event(
        &self,
        doc: &IncidentDoc,
        who: &Identity,
        status: pb::DeliveryStatus,
        note: String,
    ) -> Result<(), Status> {
        let a = doc.alert();
        self.inner
            .ledger
            .append(Entry {
                incident_id: a.incident_id.clone(),
                alert_version: a.version,
                severity: a.severity,
                audience: who.label(),
                channel: pb::DeliveryChannel::Api,
                target: "Alerts API".into(),
                attempt: 0,
                status,
                actor: who.name().to_string(),
                note,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| Status::unavailable(format!("ledger: {e}")))
    }
}

fn update_status(e: UpdateError, id: &str) -> Status {
    match e {
        UpdateError::NotFound => Status::not_found(format!("incident {id} not found")),
        UpdateError::Refused(m) => Status::failed_precondition(m),
        UpdateError::Store(e) => store_status(e),
    }
}

fn resolution_name(r: i32) -> &'static str {
    match pb::Resolution::try_from(r) {
        Ok(pb::Resolution::ConfirmedFraud) => "confirmed_fraud",
        Ok(pb::Resolution::FalsePositive) => "false_positive",
        _ => "unspecified",
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch_task(
    mut reader: Box<dyn crate::watch::LogReader>,
    tx: mpsc::Sender<Result<pb::AlertEnvelope, Status>>,
    overflow: CancellationToken,
    viewer: Viewer,
    min_severity: i32,
    stop: CancellationToken,
    buffer: usize,
    stall: Duration,
    _slot: WatchSlot,
) {
    loop {
        let mut pos = reader.position();
        let batch = tokio::select! {
            _ = tx.closed() => return,
            _ = stop.cancelled() => return,
            r = reader.poll(500, Duration::from_millis(250)) => r,
        };
        let recs = match batch {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.try_send(Err(Status::unavailable(e.to_string())));
                return;
            }
        };
        for rec in recs {
            pos.0.insert(rec.partition, rec.offset + 1);
            let Ok(alert) = pb::Alert::decode(rec.payload.as_slice()) else {
                tracing::debug!(
                    partition = rec.partition,
                    offset = rec.offset,
                    "watch: undecodable alert skipped"
                );
                continue;
            };
            if !visible(&alert, &viewer) || alert.severity < min_severity {
                continue;
            }
            let env = pb::AlertEnvelope {
                cursor: pos.to_string(),
                alert: Some(scope(&alert, &viewer)),
            };
            // A full buffer that stays full for `stall` means the
            // subscriber reads nothing: cut it off (a reader that keeps up
            // drains the buffer well within that time, bursts or not).
            let sent = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(stall, tx.send(Ok(env))) => r,
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(_closed)) => return,
                Err(_stalled) => {
                    tracing::warn!(
                        buffer,
                        stall_ms = stall.as_millis() as u64,
                        "watch subscriber fell behind; disconnecting it"
                    );
                    overflow.cancel();
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::alerts_server::Alerts for AlertsService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = self.inner.auth.identify(&req)?;
        let r = req.into_inner();
        let start = if !r.cursor.is_empty() {
            Start::At(
                Cursor::parse(&r.cursor)
                    .map_err(|e| Status::invalid_argument(format!("cursor: {e}")))?,
            )
        } else if r.from_beginning {
            Start::Beginning
        } else {
            Start::End
        };
        let i = &self.inner;
        if i.watchers.fetch_add(1, Ordering::SeqCst) >= i.settings.max_watchers {
            i.watchers.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::resource_exhausted(format!(
                "this replica serves at most {} Watch streams",
                i.settings.max_watchers
            )));
        }
        i.metrics.watch_subscribers.inc();
        let slot = WatchSlot {
            watchers: i.watchers.clone(),
            metrics: i.metrics.clone(),
        };
        let reader = i.log.open(start).await.map_err(|e| match e {
            LogError::Expired { .. } => Status::out_of_range(e.to_string()),
            LogError::Invalid(_) => Status::invalid_argument(e.to_string()),
            LogError::Unavailable(_) => Status::unavailable(e.to_string()),
        })?;
        let buffer = i.settings.watch_buffer;
        let (tx, rx) = mpsc::channel(buffer);
        let overflow = CancellationToken::new();
        tracing::info!(identity = %who.name(), "watch stream opened");
        tokio::spawn(watch_task(
            reader,
            tx,
            overflow.clone(),
            who.viewer(),
            r.min_severity,
            i.stop.clone(),
            buffer,
            Duration::from_millis(i.settings.watch_stall_ms),
            slot,
        ));
        let stream = futures::stream::unfold(
            (rx, overflow, false),
            move |(mut rx, ov, done)| async move {
                if done {
                    return None;
                }
                tokio::select! {
                    biased;
                    _ = ov.cancelled() => Some((
                        Err(Status::resource_exhausted(format!(
                            "subscriber fell behind by more than {buffer} alerts; resume from your last cursor"
                        ))),
                        (rx, ov, true),
                    )),
                    m = rx.recv() => m.map(|m| (m, (rx, ov, false))),
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let who = self.inner.auth.identify(&req)?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(Status::invalid_argument("page_size: at most 1000"));
            }
            n => n as usize,
        };
        let after: Option<(i64, String)> = if r.page_token.is_empty() {
            None
        } else {
            let t = r
                .page_token
                .strip_prefix("p1:")
                .and_then(|t| t.split_once(':'))
                .and_then(|(ms, id)| Some((ms.parse::<i64>().ok()?, id.to_string())))
                .ok_or_else(|| Status::invalid_argument("page_token: malformed"))?;
            Some(t)
        };
        let since = ts_ms(&r.since);
        let viewer = who.viewer();
        let docs = self
            .inner
            .incidents
            .list(self.inner.settings.list_days, now_ms())
            .await
            .map_err(store_status)?;
        let mut rows: Vec<(i64, String, IncidentDoc)> = docs
            .into_iter()
            .filter_map(|d| {
                let a = d.alert();
                let opened = ts_ms(&a.opened_at).unwrap_or(d.received_ms);
                let keep = visible(&a, &viewer)
                    && a.severity >= r.min_severity
                    && (r.rules.is_empty() || r.rules.contains(&a.rule))
                    && since.is_none_or(|s| opened >= s)
                    && (r.include_closed || !d.closed());
                keep.then(|| (opened, a.incident_id.clone(), d))
            })
            .collect();
        rows.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
        if let Some((ms, id)) = &after {
            rows.retain(|(o, i, _)| (*o, i) < (*ms, id));
        }
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match (more, rows.last()) {
            (true, Some((o, i, _))) => format!("p1:{o}:{i}"),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListResponse {
            incidents: rows.iter().map(|(_, _, d)| d.to_proto(&viewer)).collect(),
            next_page_token,
        }))
    }

    async fn acknowledge(
        &self,
        req: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        let who = self.inner.auth.identify(&req)?;
        let r = req.into_inner();
        if r.note.chars().count() > MAX_NOTE {
            return Err(Status::invalid_argument(format!(
                "note: at most {MAX_NOTE} characters"
            )));
        }
        let doc = self.visible_doc(&r.incident_id, &who).await?;
        self.ledger_event(&doc, &who, pb::DeliveryStatus::Acknowledged, r.note.clone())
            .await?;
        let ack = AckDoc {
            by: who.name().to_string(),
            at_ms: now_ms(),
            note: r.note.clone(),
        };
        let doc = self
            .inner
            .incidents
            .update(&r.incident_id, |d| {
                d.acks.push(ack.clone());
                if d.state == pb::IncidentState::Open as i32 {
                    d.state = pb::IncidentState::Acknowledged as i32;
                }
                Ok(())
            })
            .await
            .map_err(|e| update_status(e, &r.incident_id))?;
        tracing::info!(incident = %r.incident_id, by = %who.name(), "incident acknowledged");
        Ok(Response::new(pb::AcknowledgeResponse {
            incident: Some(doc.to_proto(&who.viewer())),
        }))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let who = self.inner.auth.identify(&req)?;
        let r = req.into_inner();
        let resolution = match pb::Resolution::try_from(r.resolution) {
            Ok(pb::Resolution::ConfirmedFraud) | Ok(pb::Resolution::FalsePositive) => r.resolution,
            _ => {
                return Err(Status::invalid_argument(
                    "resolution: must be RESOLUTION_CONFIRMED_FRAUD or RESOLUTION_FALSE_POSITIVE",
                ));
            }
        };
        if r.note.chars().count() > MAX_NOTE {
            return Err(Status::invalid_argument(format!(
                "note: at most {MAX_NOTE} characters"
            )));
        }
        let doc = self.visible_doc(&r.incident_id, &who).await?;
        if doc.resolution != 0 && doc.resolution != resolution {
            return Err(Status::failed_precondition(format!(
                "incident {} is already resolved as {}",
                r.incident_id,
                resolution_name(doc.resolution)
            )));
        }
        if resolution == pb::Resolution::ConfirmedFraud as i32 {
            let subject = doc.alert().subject.unwrap_or_default();
            if !subject.range.is_empty() {
                self.inner
                    .store
                    .set_add("hot", &format!("range:{}", subject.range))
                    .await
                    .map_err(store_status)?;
            }
            if let Some(n) = subject.number.as_ref().filter(|n| !n.value.is_empty()) {
                self.inner
                    .store
                    .set_add("hot", &format!("number:{}", n.value))
                    .await
                    .map_err(store_status)?;
            }
        }
        if doc.resolution == resolution {
            return Ok(Response::new(pb::ResolveResponse {
                incident: Some(doc.to_proto(&who.viewer())),
            }));
        }
        let note = if r.note.is_empty() {
            resolution_name(resolution).to_string()
        } else {
            format!("{}: {}", resolution_name(resolution), r.note)
        };
        self.ledger_event(&doc, &who, pb::DeliveryStatus::Resolved, note)
            .await?;
        let at = now_ms();
        let doc = self
            .inner
            .incidents
            .update(&r.incident_id, |d| {
                if d.resolution != 0 && d.resolution != resolution {
                    return Err(UpdateError::Refused(format!(
                        "already resolved as {}",
                        resolution_name(d.resolution)
                    )));
                }
                d.resolution = resolution;
                d.state = if resolution == pb::Resolution::ConfirmedFraud as i32 {
                    pb::IncidentState::ConfirmedFraud as i32
                } else {
                    pb::IncidentState::FalsePositive as i32
                };
                d.resolved_by = who.name().to_string();
                d.resolved_at_ms = at;
                d.resolution_note = r.note.clone();
                Ok(())
            })
            .await
            .map_err(|e| update_status(e, &r.incident_id))?;
        tracing::info!(incident = %r.incident_id, by = %who.name(), resolution = resolution_name(resolution), "incident resolved");
        Ok(Response::new(pb::ResolveResponse {
            incident: Some(doc.to_proto(&who.viewer())),
        }))
    }
}
