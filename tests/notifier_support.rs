//! Shared helpers of the `notifier_*` tests: alerts, real HTTP webhook
//! receivers, the notifier binary with a generated configuration, and
//! reading the ledger and DLQ topics. Included with `#[path]` by each test.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use prost::Message;
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings, consume_all};
use tollguard_tests::*;

/// A webhook secret of the tests.
pub const SECRET: &str = "test-webhook-secret-0123456789";

/// Unique names of one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub id: String,
    pub alerts: String,
    pub deliveries: String,
    pub dlq: String,
    pub group: String,
    pub prefix: String,
}

impl Names {
    pub fn new(what: &str) -> Self {
        let id = unique(what);
        Self {
            alerts: format!("tgtest.{id}.alerts"),
            deliveries: format!("tgtest.{id}.deliveries"),
            dlq: format!("tgtest.{id}.ndlq"),
            group: format!("{id}-notifier"),
            prefix: format!("tgtest:{id}:"),
            id,
        }
    }
}

pub fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

pub fn money(cents: i64) -> Option<pb::Money> {
    Some(pb::Money {
        currency: "EUR".into(),
        micros: cents * 10_000,
    })
}

/// A `multi_carrier_burst` alert of incident `id` through `providers`
/// (per-carrier figures: 10·(i+1) calls), about customer token `customer`.
pub fn alert(
    id: &str,
    version: u32,
    severity: pb::Severity,
    providers: &[&str],
    customer: &str,
) -> pb::Alert {
    let now = chrono_now();
    pb::Alert {
        incident_id: id.into(),
        version,
        rule: pb::Rule::MultiCarrierBurst as i32,
        severity: severity as i32,
        kind: if version == 1 {
            pb::AlertKind::Opened as i32
        } else {
            pb::AlertKind::Escalated as i32
        },
        subject: Some(pb::Subject {
            customer: Some(pb::Token {
                key_id: "k1".into(),
                value: customer.into(),
            }),
            range: "+67077".into(),
            country: "TL".into(),
            number: None,
        }),
        providers: providers.iter().map(|p| p.to_string()).collect(),
        evidence: Some(pb::Evidence {
            carriers: providers
                .iter()
                .enumerate()
                .map(|(i, p)| pb::CarrierEvidence {
                    provider_id: p.to_string(),
                    calls: 10 * (i as u64 + 1),
                    spend: money(1000 * (i as i64 + 1)),
                    distinct_customers: 0,
                })
                .collect(),
            calls: (1..=providers.len() as u64).map(|i| 10 * i).sum(),
            estimated_spend: money((1..=providers.len() as i64).map(|i| 1000 * i).sum()),
            window_start: ts(now - 900),
            window_end: ts(now),
            ranges: vec!["+67077".into()],
            ..Default::default()
        }),
        summary: format!(
            "Customer k1:{customer} made calls through {} at once",
            providers.join(" and ")
        ),
        recommended_action: format!("Block +67077 at {} now", providers.join(" and ")),
        detected_at: ts(now),
        published_at: ts(now),
        opened_at: ts(now - 60),
        trigger_provider_id: providers.first().map(|p| p.to_string()).unwrap_or_default(),
        trigger_event_id: "ev-1".into(),
    }
}

/// Now, Unix millis.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn bus() -> KafkaBus {
    KafkaBus::new(KafkaSettings::new(kafka())).unwrap()
}

/// Creates `topic` with `partitions` partitions.
pub async fn create_topic(topic: &str, partitions: i32) {
    bus()
        .ensure_topics(&[(topic, partitions, &[])])
        .await
        .unwrap();
}

/// Publishes alerts (key = incident id).
pub async fn publish(topic: &str, alerts: &[pb::Alert]) {
    bus()
        .publish(
            alerts
                .iter()
                .map(|a| OutRecord {
                    topic: topic.to_string(),
                    key: a.incident_id.as_bytes().to_vec(),
                    payload: a.encode_to_vec(),
                    headers: vec![],
                })
                .collect(),
        )
        .await
        .unwrap();
}

/// Ledger records of `topic`, in (partition, offset) order.
pub async fn ledger(topic: &str) -> Vec<(i32, i64, pb::DeliveryRecord)> {
    let mut v: Vec<_> = consume_all(&kafka(), topic, Duration::from_secs(20))
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.partition,
                r.offset,
                pb::DeliveryRecord::decode(r.payload.as_slice()).unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|(p, o, _)| (*p, *o));
    v
}

/// Dead letters of `topic`.
pub async fn dead_letters(topic: &str) -> Vec<pb::DeadLetter> {
    consume_all(&kafka(), topic, Duration::from_secs(20))
        .await
        .unwrap()
        .into_iter()
        .map(|r| pb::DeadLetter::decode(r.payload.as_slice()).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Webhook receivers.

/// What a receiver answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// 200.
    Ok,
    /// `status` for the first `n` requests, then 200.
    FailFirst(usize, u16),
    /// Always `status`.
    Always(u16),
    /// Sleeps, then 200.
    Slow(Duration),
    /// `status` until the instant, then 200.
    FailUntil(Instant, u16),
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    /// Wall-clock receive time, Unix millis.
    pub wall_ms: i64,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub status: u16,
    pub signature_ok: Result<(), String>,
    pub finished: bool,
}

#[derive(Debug)]
struct RxState {
    behaviour: Behaviour,
    secret: Vec<u8>,
    log: Mutex<Vec<Received>>,
}

/// A real HTTP server on 127.0.0.1 that verifies signatures.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<RxState>,
}

async fn receive(
    State(s): State<Arc<RxState>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let h: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let now = chrono_now();
    let sig = h.get("tollguard-signature").cloned().unwrap_or_default();
    let signature_ok = tollguard_notifier::webhook::verify_signature(
        &s.secret,
        &sig,
        &body,
        now,
        Duration::from_secs(300),
    );
    let idx = {
        let mut log = s.log.lock().unwrap();
        log.push(Received {
            at: Instant::now(),
            wall_ms: wall_ms(),
            headers: h,
            body: String::from_utf8_lossy(&body).to_string(),
            status: 0,
            signature_ok,
            finished: false,
        });
        log.len() - 1
    };
    let status = match &s.behaviour {
        Behaviour::Ok => 200,
        Behaviour::FailFirst(n, st) => {
            if idx < *n {
                *st
            } else {
                200
            }
        }
        Behaviour::Always(st) => *st,
        Behaviour::Slow(d) => {
            tokio::time::sleep(*d).await;
            200
        }
        Behaviour::FailUntil(t, st) => {
            if Instant::now() < *t {
                *st
            } else {
                200
            }
        }
    };
    {
        let mut log = s.log.lock().unwrap();
        log[idx].status = status;
        log[idx].finished = true;
    }
    (StatusCode::from_u16(status).unwrap(), "")
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Self {
        let state = Arc::new(RxState {
            behaviour,
            secret: SECRET.as_bytes().to_vec(),
            log: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    /// A receiver that is down: nothing listens on its port (connections
    /// are refused) for `refuse`; then it listens and behaves as `then`
    /// (e.g. [`Behaviour::FailUntil`] a later instant, or `Always(503)`).
    pub async fn start_down(refuse: Duration, then: Behaviour) -> Self {
        let state = Arc::new(RxState {
            behaviour: then,
            secret: SECRET.as_bytes().to_vec(),
            log: Mutex::new(Vec::new()),
        });
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        tokio::spawn(async move {
            tokio::time::sleep(refuse).await;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("receiver could not listen on {addr}: {e}"));
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests about `incident`.
    pub fn for_incident(&self, incident: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.headers.get("tollguard-incident").map(String::as_str) == Some(incident))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The notifier binary.

/// A running notifier.
pub struct Notifier {
    pub proc: Proc,
    pub http: u16,
    pub grpc: u16,
}

/// Writes `contacts.toml` with `body` and returns its path.
pub fn contacts(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("contacts.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// The notifier's environment for `names` plus `extra` overrides.
pub fn env(names: &Names, http: u16, grpc: u16, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        ("TOLLGUARD_LOG_FORMAT".into(), "json".into()),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{http}"),
        ),
        (
            "TOLLGUARD__LISTEN__GRPC".into(),
            format!("127.0.0.1:{grpc}"),
        ),
        ("TOLLGUARD__REDIS__URL".into(), redis()),
        ("TOLLGUARD__REDIS__KEY_PREFIX".into(), names.prefix.clone()),
        // plaintext development mode with api.tokens (mTLS: tests/security_*.rs)
        ("TOLLGUARD__TLS__ENABLED".into(), "false".into()),
        ("TOLLGUARD__ALERTS_TOPIC".into(), names.alerts.clone()),
        (
            "TOLLGUARD__DELIVERIES_TOPIC".into(),
            names.deliveries.clone(),
        ),
        ("TOLLGUARD__DLQ_TOPIC".into(), names.dlq.clone()),
        ("TOLLGUARD__GROUP".into(), names.group.clone()),
        (
            "TOLLGUARD__WEBHOOKS__ALLOW_INSECURE_HTTP".into(),
            "true".into(),
        ),
        (
            "TOLLGUARD__WEBHOOKS__ALLOW_CIDRS".into(),
            "[\"127.0.0.0/8\"]".into(),
        ),
        ("TOLLGUARD__RETRY__MAX_ATTEMPTS".into(), "4".into()),
        ("TOLLGUARD__RETRY__INITIAL_BACKOFF_MS".into(), "50".into()),
        ("TOLLGUARD__RETRY__MAX_BACKOFF_MS".into(), "200".into()),
        ("TOLLGUARD__RETRY__HORIZON_MS".into(), "30000".into()),
        ("TOLLGUARD__WEBHOOKS__TIMEOUT_MS".into(), "20000".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

impl Notifier {
    /// Starts the binary and waits until it is ready.
    pub async fn start(dir: &Path, name: &str, names: &Names, extra: &[(&str, String)]) -> Self {
        let (http, grpc) = (free_port(), free_port());
        let p = Proc::spawn(
            dir,
            name,
            &bin("tollguard-notifier"),
            &[],
            &env(names, http, grpc, extra),
        );
        wait_ready(&p, http, Duration::from_secs(60)).await;
        Self {
            proc: p,
            http,
            grpc,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }
}

// ---------------------------------------------------------------------------
// The SMTP sink.

/// Messages in the SMTP sink's maildir mentioning `needle`: (envelope
/// recipient, file modification time in Unix millis, unfolded text).
pub fn mails(maildir: &Path, needle: &str) -> Vec<(String, i64, String)> {
    let Ok(rd) = std::fs::read_dir(maildir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("eml") {
            continue;
        }
        let Ok(raw) = std::fs::read_to_string(&p) else {
            continue;
        };
        let text = raw
            .replace("=\r\n", "")
            .replace("\r\n ", " ")
            .replace("\r\n\t", " ")
            .replace("\r\n", "\n");
        if !text.contains(needle) {
            continue;
        }
        let to = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Envelope-To: "))
            .unwrap_or_default()
            .to_string();
        let at = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        out.push((to, at, text));
    }
    out.sort();
    out
}
