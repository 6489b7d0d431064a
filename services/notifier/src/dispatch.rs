//! The fan-out: for every alert, record the incident, decide per audience
//! whether to notify (dedupe and throttling, agreed by every replica through
//! the store), and deliver over webhooks and e-mail concurrently — outside
//! the consumer loop, each endpoint behind its own concurrency limit and
//! queue bound, with retries, dead letters, and a ledger record for every
//! attempt and outcome.
//!
//! # Dedupe and throttling
//!
//! Per (incident, audience) the store holds the last decision
//! (`ntf:<incident>:<audience>`): the version it was made for, the severity
//! and publication time of the last notification sent, and whether its
//! deliveries settled. An alert is sent to an audience when
//!
//! * the audience has not been notified of the incident yet;
//! * its severity is higher than the one last sent (an escalation);
//! * or it is an update at the same severity and the last notification is
//!   at least `throttle.update_interval_ms` older (by publication time).
//!
//! Otherwise it is coalesced. A decision is made once per version (compare-
//! and-set); a version whose deliveries were decided but never settled (the
//! replica died) is delivered again by whoever processes the alert next —
//! at least once, with the same `TollGuard-Delivery` id, so receivers can
//! drop the copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lettre::Address;
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tollguard_core::StoreError;
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_core::store::{Scope, StateWrite, WindowStore};
use tollguard_proto::v1 as pb;

use crate::config::{Audience, Endpoint, RetrySettings, Routing, ThrottleSettings};
use crate::email::{Mailer, mask_address};
use crate::incidents::Incidents;
use crate::ledger::{Entry, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::scope::{Mail, email, visible, webhook_body};
use crate::webhook::{Attempt, WebhookClient, backoff};

/// Settings of the fan-out.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Retries.
    pub retry: RetrySettings,
    /// Throttling.
    pub throttle: ThrottleSettings,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Queue bound per endpoint.
    pub max_queue: usize,
    /// TTL of decisions, ms.
    pub state_ttl_ms: i64,
    /// Concurrent SMTP conversations.
    pub smtp_concurrency: usize,
}

/// What the fan-out needs.
#[derive(Debug)]
pub struct FanoutDeps {
    /// Routing.
    pub routing: Arc<Routing>,
    /// Store (decisions; incidents and ledger use it too).
    pub store: Arc<dyn WindowStore>,
    /// Bus (dead letters).
    pub bus: Arc<dyn EventBus>,
    /// The ledger.
    pub ledger: Ledger,
    /// Incident state.
    pub incidents: Incidents,
    /// The webhook client.
    pub webhooks: WebhookClient,
    /// The mailer, when e-mail is configured.
    pub mailer: Option<Mailer>,
    /// Settings.
    pub settings: DispatchSettings,
    /// Metrics.
    pub metrics: Metrics,
}

/// Resolves when every delivery of one alert settled (`true`), or `false`
/// when some were abandoned at shutdown (the alert must then not be
/// committed).
pub type Settled = tokio::task::JoinHandle<bool>;

/// The fan-out. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fanout {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    deps: FanoutDeps,
    smtp_permits: Arc<Semaphore>,
    stop: CancellationToken,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Decision {
    v: u32,
    sev: i32,
    sent_ms: i64,
    send: bool,
    done: bool,
    /// Older versions decided to be sent whose deliveries have not settled
    /// yet: a newer version's decision must not erase that obligation, or a
    /// replica dying mid-delivery would lose the notification (the replay
    /// of the older alert would look stale).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<u32>,
}

/// Whether to notify: pure, for tests. `prev` is the stored decision;
/// returns the new decision (`None` = leave the state alone) and whether to
/// send.
fn decide(
    prev: Option<&Decision>,
    a: &pb::Alert,
    published_ms: i64,
    interval_ms: u64,
) -> (Option<Decision>, bool) {
    let pending = |p: &Decision| {
        let mut v = p.pending.clone();
        if p.send && !p.done {
            v.push(p.v);
        }
        v
    };
    let fresh = |send: bool, sev: i32, sent_ms: i64, pending: Vec<u32>| Decision {
        v: a.version,
        sev,
        sent_ms,
        send,
        done: !send,
        pending,
    };
    match prev {
        None => (
            Some(fresh(true, a.severity, published_ms, Vec::new())),
            true,
        ),
        // An older version: re-sent only if it was to be sent and never settled.
        Some(p) if p.v > a.version => (None, p.pending.contains(&a.version)),
        Some(p) if p.v == a.version => (None, p.send && !p.done),
        Some(p) => {
            let send = a.severity > p.sev
                || (a.severity == p.sev
                    && published_ms.saturating_sub(p.sent_ms) >= interval_ms as i64);
            if send {
                (
                    Some(fresh(true, a.severity, published_ms, pending(p))),
                    true,
                )
            } else {
                (Some(fresh(false, p.sev, p.sent_ms, pending(p))), false)
            }
        }
    }
}

fn ms(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn now_ts() -> prost_types::Timestamp {
    let n = chrono::Utc::now();
    prost_types::Timestamp {
        seconds: n.timestamp(),
        nanos: n.timestamp_subsec_nanos() as i32,
    }
}

/// The stable id of one notification (incident version) to one target.
pub fn delivery_id(incident: &str, version: u32, audience: &str, target: &str) -> String {
    let mut h = Sha256::new();
    for part in [incident, &version.to_string(), audience, target] {
        h.update(part.as_bytes());
        h.update([0x1f]);
    }
    format!("dlv-{}", &hex::encode(h.finalize())[..24])
}

enum Target {
    Webhook { ep: Arc<Endpoint>, body: String },
    Email { to: Address, mail: Mail },
}

impl Target {
    fn channel(&self) -> pb::DeliveryChannel {
        match self {
            Target::Webhook { .. } => pb::DeliveryChannel::Webhook,
            Target::Email { .. } => pb::DeliveryChannel::Email,
        }
    }
    fn channel_name(&self) -> &'static str {
        match self {
            Target::Webhook { .. } => "webhook",
            Target::Email { .. } => "email",
        }
    }
    fn full(&self) -> String {
        match self {
            Target::Webhook { ep, .. } => ep.url.to_string(),
            Target::Email { to, .. } => to.to_string(),
        }
    }
    fn redacted(&self) -> String {
        match self {
            Target::Webhook { ep, .. } => ep.redacted(),
            Target::Email { to, .. } => mask_address(to),
        }
    }
    fn body(&self) -> String {
        match self {
            Target::Webhook { body, .. } => body.clone(),
            Target::Email { mail, .. } => format!("Subject: {}\n\n{}", mail.subject, mail.body),
        }
    }
}

/// Decrements an endpoint's queue counter when dropped.
struct Queued(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct Job {
    alert: Arc<pb::Alert>,
    audience: String,
    target: Target,
    id: String,
}

impl Fanout {
    /// Builds the fan-out.
    pub fn new(deps: FanoutDeps) -> Self {
        let smtp = deps.settings.smtp_concurrency.max(1);
        Self {
            inner: Arc::new(Inner {
                deps,
                smtp_permits: Arc::new(Semaphore::new(smtp)),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Incident state.
    pub fn incidents(&self) -> &Incidents {
        &self.inner.deps.incidents
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.deps.ledger
    }

    /// Abandons waiting retries (shutdown); their alerts stay uncommitted.
    pub fn stop(&self) {
        self.inner.stop.cancel();
        self.inner.deps.ledger.close();
    }

    /// True once [`Fanout::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    async fn decision(&self, a: &pb::Alert, audience: &str) -> Result<bool, StoreError> {
        let d = &self.inner.deps;
        let key = (Scope::Global, format!("ntf:{}:{audience}", a.incident_id));
        let published = ms(&a.published_at).unwrap_or_else(now_ms);
        for _ in 0..100 {
            let cur = d
                .store
                .get_states(std::slice::from_ref(&key))
                .await?
                .pop()
                .flatten();
            let prev: Option<Decision> = cur.as_deref().and_then(|s| serde_json::from_str(s).ok());
            let (next, send) = decide(
                prev.as_ref(),
                a,
                published,
                d.settings.throttle.update_interval_ms,
            );
            let Some(next) = next else {
                return Ok(send);
            };
            let ok = d
                .store
                .cas_state(&StateWrite {
                    scope: key.0.clone(),
                    name: key.1.clone(),
                    expect: cur,
                    value: serde_json::to_string(&next).unwrap_or_default(),
                    ttl_ms: d.settings.state_ttl_ms,
                })
                .await?;
            if ok {
                return Ok(send);
            }
        }
        Err(StoreError::Unavailable(
            "notification decision is contended".into(),
        ))
    }

    async fn mark_done(&self, a: &pb::Alert, audience: &str) {
        let d = &self.inner.deps;
        let key = (Scope::Global, format!("ntf:{}:{audience}", a.incident_id));
        for _ in 0..20 {
            let Ok(cur) = d.store.get_states(std::slice::from_ref(&key)).await else {
                return;
            };
            let cur = cur.into_iter().next().flatten();
            let Some(mut st) = cur
                .as_deref()
                .and_then(|s| serde_json::from_str::<Decision>(s).ok())
            else {
                return;
            };
            if st.v == a.version && !st.done {
                st.done = true;
            } else if let Some(i) = st.pending.iter().position(|v| *v == a.version) {
                st.pending.remove(i);
            } else {
                return;
            }
            match d
                .store
                .cas_state(&StateWrite {
                    scope: key.0.clone(),
                    name: key.1.clone(),
                    expect: cur,
                    value: serde_json::to_string(&st).unwrap_or_default(),
                    ttl_ms: d.settings.state_ttl_ms,
                })
                .await
            {
                Ok(true) | Err(_) => return,
                Ok(false) => continue,
            }
        }
    }

    fn targets(&self, a: &pb::Alert, aud: &Audience) -> Vec<Target> {
        let mut out = Vec::new();
        if !aud.webhooks.is_empty() {
            let body = webhook_body(a, &aud.viewer, &aud.label);
            for ep in &aud.webhooks {
                out.push(Target::Webhook {
                    ep: ep.clone(),
                    body: body.clone(),
                });
            }
        }
        if !aud.emails.is_empty() {
            if self.inner.deps.mailer.is_some() {
                let mail = email(a, &aud.viewer);
                for to in &aud.emails {
                    out.push(Target::Email {
                        to: to.clone(),
                        mail: mail.clone(),
                    });
                }
            } else {
                tracing::warn!(audience = %aud.label, "e-mail addresses configured but [email] host is not set; not e-mailed");
            }
        }
        out
    }

    /// Processes one alert: records the incident, decides per audience, and
    /// starts the deliveries. Store errors are returned (the caller retries
    /// the alert); deliveries run on their own tasks.
    pub async fn handle(&self, alert: &pb::Alert) -> Result<Settled, StoreError> {
        let d = &self.inner.deps;
        d.incidents.record(alert, now_ms()).await?;
        let shared = Arc::new(alert.clone());
        let mut audiences = Vec::new();
        for aud in d.routing.audiences(alert) {
            if !visible(alert, &aud.viewer) || (aud.emails.is_empty() && aud.webhooks.is_empty()) {
                continue;
            }
            if !self.decision(alert, &aud.label).await? {
                tracing::debug!(incident = %alert.incident_id, version = alert.version, audience = %aud.label, "notification coalesced");
                continue;
            }
            let jobs: Vec<Job> = self
                .targets(alert, aud)
                .into_iter()
                .map(|t| Job {
                    id: delivery_id(&alert.incident_id, alert.version, &aud.label, &t.full()),
                    alert: shared.clone(),
                    audience: aud.label.clone(),
                    target: t,
                })
                .collect();
            audiences.push((aud.label.clone(), jobs));
        }
        let me = self.clone();
        // The deliveries are children of the caller's (the notify) span.
        Ok(tokio::spawn(tracing::Instrument::in_current_span(
            async move {
                let mut all = true;
                let per_audience = audiences.into_iter().map(|(label, jobs)| {
                    let me = me.clone();
                    let alert = shared.clone();
                    async move {
                        let handles: Vec<_> = jobs
                            .into_iter()
                            .map(|j| {
                                let span = tracing::info_span!(
                                    "deliver",
                                    channel = j.target.channel_name(),
                                    audience = %j.audience,
                                    delivery = %j.id,
                                );
                                tokio::spawn(tracing::Instrument::instrument(
                                    me.clone().deliver(j),
                                    span,
                                ))
                            })
                            .collect();
                        let mut ok = true;
                        for h in handles {
                            ok &= h.await.unwrap_or(false);
                        }
                        if ok {
                            me.mark_done(&alert, &label).await;
                        }
                        ok
                    }
                });
                for ok in futures::future::join_all(per_audience).await {
                    all &= ok;
                }
                all
            },
        )))
    }

    async fn record(&self, e: Entry) -> Result<(), LedgerError> {
        match self.inner.deps.ledger.append(e).await {
            Ok(_) => Ok(()),
            Err(LedgerError::Closed) => Err(LedgerError::Closed),
            Err(e) => {
                tracing::error!(error = %e, "ledger append failed");
                Err(e)
            }
        }
    }

    fn entry(&self, j: &Job, attempt: u32, status: pb::DeliveryStatus) -> Entry {
        Entry {
            incident_id: j.alert.incident_id.clone(),
            alert_version: j.alert.version,
            severity: j.alert.severity,
            audience: j.audience.clone(),
            channel: j.target.channel(),
            target: j.target.redacted(),
            attempt,
            status,
            delivery_id: j.id.clone(),
            ..Default::default()
        }
    }

    /// Delivers one notification with retries; true once settled
    /// (delivered or dead-lettered), false if abandoned at shutdown.
    async fn deliver(self, j: Job) -> bool {
        let d = &self.inner.deps;
        let stop = self.inner.stop.clone();
        let policy = d.settings.retry;
        let _queued = match &j.target {
            Target::Webhook { ep, .. } => {
                let n = ep.queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let q = Queued(ep.queued.clone());
                if n > d.settings.max_queue {
                    let mut e = self.entry(&j, 0, pb::DeliveryStatus::Failed);
                    e.error = format!("endpoint queue full ({} waiting)", d.settings.max_queue);
                    if self.record(e).await.is_err() {
                        return false;
                    }
                    return self
                        .dead_letter(&j, Vec::new(), "endpoint queue full".into())
                        .await;
                }
                Some(q)
            }
            Target::Email { .. } => None,
        };
        let first = Instant::now();
        let mut history: Vec<pb::DeliveryAttempt> = Vec::new();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let permits = match &j.target {
                Target::Webhook { ep, .. } => ep.permits.clone(),
                Target::Email { .. } => self.inner.smtp_permits.clone(),
            };
            let permit = tokio::select! {
                _ = stop.cancelled() => return false,
                p = permits.acquire_owned() => match p { Ok(p) => p, Err(_) => return false },
            };
            let started = now_ts();
            let t0 = Instant::now();
            let res = match &j.target {
                Target::Webhook { ep, body } => {
                    d.webhooks
                        .attempt(ep, body, &j.id, &j.alert.incident_id, attempt)
                        .await
                }
                Target::Email { to, mail } => match &d.mailer {
                    Some(m) => m.send(to, mail, &j.alert.incident_id, &j.id).await,
                    None => Attempt::Permanent {
                        code: 0,
                        error: "e-mail is not configured".into(),
                    },
                },
            };
            drop(permit);
            let took = t0.elapsed();
            let (status, code, mut error, next) = match res {
                Attempt::Delivered { code } => {
                    (pb::DeliveryStatus::Delivered, code, String::new(), None)
                }
                Attempt::Refused { error } => (pb::DeliveryStatus::Refused, 0, error, None),
                Attempt::Permanent { code, error } => {
                    (pb::DeliveryStatus::Failed, code, error, None)
                }
                Attempt::Transient {
                    code,
                    error,
                    retry_after,
                } => {
                    let delay = backoff(&policy, attempt + 1, retry_after);
                    let horizon = Duration::from_millis(policy.horizon_ms);
                    if attempt >= policy.max_attempts {
                        (
                            pb::DeliveryStatus::Failed,
                            code,
                            format!("{error}; giving up after {attempt} attempts"),
                            None,
                        )
                    } else if first.elapsed() + delay > horizon {
                        (
                            pb::DeliveryStatus::Failed,
                            code,
                            format!(
                                "{error}; giving up: the next attempt (in {} ms) would start past the retry horizon",
                                delay.as_millis()
                            ),
                            None,
                        )
                    } else {
                        (pb::DeliveryStatus::Retrying, code, error, Some(delay))
                    }
                }
            };
            if error.len() > 1000 {
                error.truncate(1000);
            }
            let outcome = crate::chain::status_name(status as i32);
            d.metrics
                .attempt(j.target.channel_name(), outcome, took.as_secs_f64());
            tracing::info!(
                incident = %j.alert.incident_id,
                version = j.alert.version,
                audience = %j.audience,
                channel = j.target.channel_name(),
                target = %j.target.redacted(),
                delivery = %j.id,
                attempt,
                outcome,
                code,
                error = %error,
                "delivery attempt"
            );
            history.push(pb::DeliveryAttempt {
                attempt,
                at: Some(started),
                status: status as i32,
                response_code: code,
                error: error.clone(),
                duration_ms: took.as_millis() as u64,
            });
            let mut e = self.entry(&j, attempt, status);
            e.response_code = code;
            e.error = error.clone();
            if self.record(e).await.is_err() {
                return false;
            }
            match (status, next) {
                (pb::DeliveryStatus::Delivered, _) => return true,
                (pb::DeliveryStatus::Retrying, Some(delay)) => {
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                _ => return self.dead_letter(&j, history, error).await,
            }
        }
    }

    async fn dead_letter(
        &self,
        j: &Job,
        attempts: Vec<pb::DeliveryAttempt>,
        reason: String,
    ) -> bool {
        let d = &self.inner.deps;
        let viewer = d
            .routing
            .audiences(&j.alert)
            .into_iter()
            .find(|a| a.label == j.audience)
            .map(|a| a.viewer.clone())
            .unwrap_or(crate::scope::Viewer::Operator);
        let dl = pb::DeadLetter {
            delivery_id: j.id.clone(),
            incident_id: j.alert.incident_id.clone(),
            alert_version: j.alert.version,
            audience: j.audience.clone(),
            channel: j.target.channel() as i32,
            target: j.target.full(),
            body: j.target.body(),
            attempts,
            reason: reason.clone(),
            alert: Some(crate::scope::scope(&j.alert, &viewer)),
        };
        let rec = OutRecord {
            topic: d.settings.dlq_topic.clone(),
            key: j.alert.incident_id.as_bytes().to_vec(),
            payload: dl.encode_to_vec(),
            headers: vec![(
                tollguard_core::bus::HEADER_DLQ_REASON.to_string(),
                reason.as_bytes().to_vec(),
            )],
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match d.bus.publish(vec![rec.clone()]).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter publish failed; retrying");
                    tokio::select! {
                        _ = self.inner.stop.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        d.metrics.dlq.inc();
        tracing::warn!(incident = %j.alert.incident_id, audience = %j.audience, delivery = %j.id, reason = %reason, "notification dead-lettered");
        let mut e = self.entry(
            j,
            dl.attempts.len() as u32,
            pb::DeliveryStatus::DeadLettered,
        );
        e.error = reason;
        self.record(e).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(v: u32, sev: pb::Severity) -> pb::Alert {
        pb::Alert {
            incident_id: "i".into(),
            version: v,
            severity: sev as i32,
            ..Default::default()
        }
    }

    #[test]
    fn one_notification_per_severity_updates_coalesced_escalations_sent() {
        let hour = 3_600_000u64;
        let w = pb::Severity::Warning;
        let (d1, s1) = decide(None, &alert(1, w), 0, hour);
        assert!(s1);
        let d1 = d1.unwrap();
        // An update 10 minutes later: coalesced.
        let (d2, s2) = decide(Some(&d1), &alert(2, w), 600_000, hour);
        assert!(!s2);
        let d2 = d2.unwrap();
        assert_eq!((d2.v, d2.sent_ms, d2.done), (2, 0, true));
        // Escalation: always.
        let (d3, s3) = decide(Some(&d2), &alert(3, pb::Severity::Critical), 700_000, hour);
        assert!(s3);
        let d3 = d3.unwrap();
        // An update more than the interval after the last one sent: sent.
        let (_, s4) = decide(
            Some(&d3),
            &alert(4, pb::Severity::Critical),
            700_000 + hour as i64,
            hour,
        );
        assert!(s4);
        // Stale and repeated versions.
        assert_eq!(decide(Some(&d3), &alert(2, w), 0, hour), (None, false));
        // The same version again: re-sent only if it never settled.
        assert_eq!(
            decide(Some(&d3), &alert(3, pb::Severity::Critical), 0, hour),
            (None, true)
        );
        let settled = Decision { done: true, ..d3 };
        assert_eq!(
            decide(Some(&settled), &alert(3, pb::Severity::Critical), 0, hour),
            (None, false)
        );
    }

    #[test]
    fn a_newer_version_keeps_an_unsettled_older_send() {
        let hour = 3_600_000u64;
        let w = pb::Severity::Warning;
        // v1 decided and in flight; v2 coalesced before v1 settled.
        let (d1, _) = decide(None, &alert(1, w), 0, hour);
        let d1 = d1.unwrap();
        let (d2, s2) = decide(Some(&d1), &alert(2, w), 1_000, hour);
        assert!(!s2);
        let d2 = d2.unwrap();
        assert_eq!(d2.pending, [1]);
        // The replica dies: the replay of v1 still sends it, v2's does not.
        assert_eq!(decide(Some(&d2), &alert(1, w), 0, hour), (None, true));
        assert_eq!(decide(Some(&d2), &alert(2, w), 1_000, hour), (None, false));
        // An escalation carries the obligation on; once v1 settled it is
        // gone (mark_done removes it from `pending`).
        let (d3, s3) = decide(Some(&d2), &alert(3, pb::Severity::Critical), 2_000, hour);
        assert!(s3);
        let d3 = d3.unwrap();
        assert_eq!(d3.pending, [1]);
        let settled = Decision {
            pending: Vec::new(),
            ..d3.clone()
        };
        assert_eq!(decide(Some(&settled), &alert(1, w), 0, hour), (None, false));
        // v3 unsettled, then v4 coalesced: both obligations kept.
        let (d4, _) = decide(Some(&d3), &alert(4, pb::Severity::Critical), 3_000, hour);
        assert_eq!(d4.unwrap().pending, [1, 3]);
        // A decision stored before this field existed still reads.
        let old: Decision =
            serde_json::from_str(r#"{"v":2,"sev":1,"sent_ms":0,"send":true,"done":false}"#)
                .unwrap();
        assert!(old.pending.is_empty());
    }

    #[test]
    fn delivery_ids_are_stable() {
        let a = delivery_id("inc", 1, "carrier:kpn", "https://x/");
        assert_eq!(a, delivery_id("inc", 1, "carrier:kpn", "https://x/"));
        assert_ne!(a, delivery_id("inc", 2, "carrier:kpn", "https://x/"));
        assert!(a.starts_with("dlv-") && a.len() == 28);
    }
}
