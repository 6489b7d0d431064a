//! Notifier configuration (`notifier.toml` + `TOLLGUARD__…` overrides) and
//! the routing configuration (`contacts.toml`): who is warned of what, and
//! how. Everything is validated at load; an error names the offending entry
//! (`customers[2].emails[0]: "bob@" is not an e-mail address`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use ipnet::IpNet;
use lettre::Address;
use reqwest::Url;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tollguard_core::ConfigError;
use tollguard_core::pseudo::Kind;
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::KafkaSettings;

use crate::scope::Viewer;
use crate::ssrf::Guard;

/// Dead-letter topic of notifications.
pub const NOTIFICATIONS_DLQ: &str = "tollguard.notifications.dlq.v1";

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// HTTP address of /livez, /readyz, /metrics.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// gRPC address of the `Alerts` API (with gRPC health and reflection);
    /// the API is not served when unset.
    #[serde(default)]
    pub grpc: Option<SocketAddr>,
}

fn default_http() -> SocketAddr {
    "127.0.0.1:9103".parse().expect("static")
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: default_http(),
            grpc: None,
        }
    }
}

/// Redis (incident state, dedupe decisions, ledger chain heads, hot list).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://…`; when unset the notifier keeps its state in memory, which
    /// is only correct for a single replica (development).
    #[serde(default)]
    pub url: Option<String>,
    /// Prefix of every key (the correlator's, so the hot list is shared).
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// `[redis.tls]`: CA and client certificate for `rediss://` (SECURITY.md).
    #[serde(default)]
    pub tls: tollguard_runtime::redis_tls::RedisTls,
}

impl RedisConfig {
    /// Loads `[redis.tls]` for `url`; `None` without TLS files. Errors
    /// name the key.
    pub fn load_tls(
        &self,
    ) -> Result<Option<tollguard_runtime::redis_tls::RedisTlsCerts>, ConfigError> {
        let urls: Vec<(String, &str)> = (self.url.iter())
            .map(|u| ("redis.url".to_string(), u.as_str()))
            .collect();
        self.tls.load("redis.tls", &urls)
    }
}

fn default_prefix() -> String {
    "tg:".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: default_prefix(),
            tls: Default::default(),
        }
    }
}

/// Webhook delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Allow `http://` targets (tests and development only).
    pub allow_insecure_http: bool,
    /// CIDRs whose addresses may be targets although they are private,
    /// loopback, link-local, CGNAT, … (e.g. `["127.0.0.0/8"]` in tests).
    pub allow_cidrs: Vec<String>,
    /// Timeout of one attempt (connect, send, response), milliseconds.
    pub timeout_ms: u64,
    /// Connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// Concurrent requests per endpoint when the entry does not say.
    pub default_max_concurrency: usize,
    /// Notifications waiting for one endpoint beyond which new ones are
    /// dead-lettered at once.
    pub max_queue: usize,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_insecure_http: false,
            allow_cidrs: Vec::new(),
            timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            default_max_concurrency: 4,
            max_queue: 10_000,
        }
    }
}

/// Retries of webhook and e-mail deliveries: exponential backoff with full
/// jitter, `Retry-After` honoured, bounded by attempts and a time horizon.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts in total (first one included).
    pub max_attempts: u32,
    /// Backoff cap of the first retry, milliseconds (doubles per attempt).
    pub initial_backoff_ms: u64,
    /// Largest backoff, milliseconds.
    pub max_backoff_ms: u64,
    /// No attempt starts later than this after the first one, milliseconds.
    pub horizon_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff_ms: 5_000,
            max_backoff_ms: 300_000,
            horizon_ms: 600_000,
        }
    }
}

/// Transport security of SMTP.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (test sinks only).
    None,
    /// STARTTLS (submission, port 587).
    #[default]
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
}

/// E-mail over SMTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailSettings {
    /// SMTP server; e-mail is disabled when unset.
    pub host: Option<String>,
    /// Port (587 for STARTTLS, 465 for TLS, 25 plain).
    pub port: Option<u16>,
    /// Transport security.
    pub tls: SmtpTls,
    /// SMTP user name.
    pub username: Option<String>,
    /// SMTP password (prefer `password_file`); never logged.
    pub password: Option<String>,
    /// File holding the SMTP password.
    pub password_file: Option<PathBuf>,
    /// Sender, e.g. `TollGuard <alerts@tollguard.example>`.
    pub from: String,
    /// Timeout of one SMTP conversation, milliseconds.
    pub timeout_ms: u64,
}

impl Default for EmailSettings {
    fn default() -> Self {
        Self {
            host: None,
            port: None,
            tls: SmtpTls::Starttls,
            username: None,
            password: None,
            password_file: None,
            from: "TollGuard <alerts@tollguard.invalid>".into(),
            timeout_ms: 30_000,
        }
    }
}

/// Dedupe and throttling.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleSettings {
    /// An `UPDATED` alert at the severity an audience was last notified of
    /// is re-sent only when the last notification is at least this old
    /// (alert publication time), milliseconds; escalations always go out.
    pub update_interval_ms: u64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            update_interval_ms: 3_600_000,
        }
    }
}

/// The `Alerts` API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// DEVELOPMENT-MODE authentication: bearer token (sent in the
    /// `x-tollguard-identity` metadata header) → identity (a provider id or
    /// `operator`). Replaced by mTLS client certificates (security issue).
    pub tokens: BTreeMap<String, String>,
    /// A TOML file of further `"token" = "identity"` entries (e.g. a mounted
    /// secret), merged into `tokens` at load.
    pub tokens_file: Option<PathBuf>,
    /// Envelopes a `Watch` subscriber may fall behind by before it is
    /// disconnected with `RESOURCE_EXHAUSTED`.
    pub watch_buffer: usize,
    /// How long a subscriber's full buffer may stay full (the subscriber
    /// reads nothing) before it is disconnected, milliseconds. A reader
    /// that keeps up is never cut off by a burst.
    pub watch_stall_ms: u64,
    /// Concurrent `Watch` streams per replica.
    pub max_watchers: usize,
    /// How many days back `List` looks (incident index retention).
    pub list_days: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            tokens: BTreeMap::new(),
            tokens_file: None,
            watch_buffer: 256,
            watch_stall_ms: 5_000,
            max_watchers: 256,
            list_days: 30,
        }
    }
}

/// Retention of state in the store.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    /// Incident state, index and dedupe decisions, days.
    pub incident_ttl_days: u32,
    /// Ledger chain heads, days (a chain continued after its head expired
    /// would restart at seq 1).
    pub ledger_ttl_days: u32,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            incident_ttl_days: 30,
            ledger_ttl_days: 400,
        }
    }
}

/// The whole notifier configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Kafka.
    #[serde(default)]
    pub kafka: KafkaSettings,
    /// Redis.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Input topic.
    #[serde(default = "default_alerts")]
    pub alerts_topic: String,
    /// The proof-of-warning ledger.
    #[serde(default = "default_deliveries")]
    pub deliveries_topic: String,
    /// Dead letters of notifications.
    #[serde(default = "default_dlq")]
    pub dlq_topic: String,
    /// Partitions of the ledger and DLQ topics when the notifier creates them.
    #[serde(default = "default_partitions")]
    pub topic_partitions: i32,
    /// Consumer group.
    #[serde(default = "default_group")]
    pub group: String,
    /// Routing configuration (`contacts.toml`); without it only the API and
    /// the log receive alerts.
    #[serde(default)]
    pub contacts_file: Option<PathBuf>,
    /// Name of this replica in the ledger (default: host name and pid).
    #[serde(default)]
    pub instance: Option<String>,
    /// Alerts whose deliveries may be in flight at once.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Webhooks.
    #[serde(default)]
    pub webhooks: WebhookSettings,
    /// Retries.
    #[serde(default)]
    pub retry: RetrySettings,
    /// E-mail.
    #[serde(default)]
    pub email: EmailSettings,
    /// Dedupe and throttling.
    #[serde(default)]
    pub throttle: ThrottleSettings,
    /// The Alerts API.
    #[serde(default)]
    pub api: ApiSettings,
    /// State retention.
    #[serde(default)]
    pub state: StateSettings,
    /// Mutual TLS of the Alerts API (required when `listen.grpc` is set,
    /// unless `enabled = false`); `tls.clients` maps client certificate
    /// identities to a provider id or `operator`.
    #[serde(default)]
    pub tls: tollguard_runtime::tls::TlsSettings,
}

fn default_alerts() -> String {
    tollguard_core::bus::topics::ALERTS.into()
}
fn default_deliveries() -> String {
    tollguard_core::bus::topics::DELIVERIES.into()
}
fn default_dlq() -> String {
    NOTIFICATIONS_DLQ.into()
}
fn default_group() -> String {
    "tollguard-notifier".into()
}
fn default_partitions() -> i32 {
    3
}
fn default_in_flight() -> usize {
    10_000
}

fn range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::new(
            key,
            format!("{v} is out of range {lo}..={hi}"),
        ));
    }
    Ok(())
}

impl NotifierConfig {
    /// Validates what can be checked without I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        for (k, v) in [
            ("alerts_topic", &self.alerts_topic),
            ("deliveries_topic", &self.deliveries_topic),
            ("dlq_topic", &self.dlq_topic),
            ("group", &self.group),
        ] {
            if v.trim().is_empty() {
                return Err(ConfigError::new(k, "must not be empty"));
            }
        }
        if let Some(url) = &self.redis.url
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://"))
        {
            return Err(ConfigError::new(
                "redis.url",
                "must start with redis://, rediss:// or redis+unix://",
            ));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                "redis.key_prefix",
                "must be non-empty and contain no braces",
            ));
        }
        range("topic_partitions", self.topic_partitions, 1, 1000)?;
        range("max_in_flight", self.max_in_flight, 1, 1_000_000)?;
        self.guard()?;
        let w = &self.webhooks;
        range("webhooks.timeout_ms", w.timeout_ms, 1, 300_000)?;
        range(
            "webhooks.connect_timeout_ms",
            w.connect_timeout_ms,
            1,
            300_000,
        )?;
        range(
            "webhooks.default_max_concurrency",
            w.default_max_concurrency,
            1,
            1024,
        )?;
        range("webhooks.max_queue", w.max_queue, 1, 1_000_000)?;
        let r = &self.retry;
        range("retry.max_attempts", r.max_attempts, 1, 100)?;
        range(
            "retry.initial_backoff_ms",
            r.initial_backoff_ms,
            1,
            3_600_000,
        )?;
        range("retry.max_backoff_ms", r.max_backoff_ms, 1, 86_400_000)?;
        if r.max_backoff_ms < r.initial_backoff_ms {
            return Err(ConfigError::new(
                "retry.max_backoff_ms",
                "must be at least retry.initial_backoff_ms",
            ));
        }
        range("retry.horizon_ms", r.horizon_ms, 1, 7 * 86_400_000)?;
        let e = &self.email;
        if let Some(h) = &e.host
            && h.trim().is_empty()
        {
            return Err(ConfigError::new("email.host", "must not be empty when set"));
        }
        if e.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(ConfigError::new(
                "email.from",
                format!("{:?} is not an e-mail address", e.from),
            ));
        }
        if e.password.is_some() && e.password_file.is_some() {
            return Err(ConfigError::new(
                "email.password",
                "give either password or password_file, not both",
            ));
        }
        if (e.password.is_some() || e.password_file.is_some()) && e.username.is_none() {
            return Err(ConfigError::new(
                "email.username",
                "is required with a password",
            ));
        }
        range("email.timeout_ms", e.timeout_ms, 1, 600_000)?;
        let a = &self.api;
        for (token, identity) in &a.tokens {
            if token.len() < 16 {
                return Err(ConfigError::new(
                    "api.tokens",
                    format!("the token for identity {identity:?} is shorter than 16 characters"),
                ));
            }
            if identity.trim().is_empty() {
                return Err(ConfigError::new("api.tokens", "an identity is empty"));
            }
        }
        if self.listen.grpc.is_some() {
            self.tls.validate(|p| {
                if p == tollguard_runtime::tls::OPERATOR {
                    return Ok(());
                }
                tollguard_core::ingest::validate_provider_id("principal", p).map_err(|e| e.reason)
            })?;
            if !self.tls.plaintext() && !a.tokens.is_empty() {
                return Err(ConfigError::new(
                    "api.tokens",
                    "development-mode bearer tokens are accepted only with tls.enabled = false; \
                     with mutual TLS callers are identified by their client certificates (tls.clients)",
                ));
            }
        }
        range("api.watch_buffer", a.watch_buffer, 1, 1_000_000)?;
        range("api.watch_stall_ms", a.watch_stall_ms, 1, 600_000)?;
        range("api.max_watchers", a.max_watchers, 1, 100_000)?;
        range("api.list_days", a.list_days, 1, 3650)?;
        range(
            "state.incident_ttl_days",
            self.state.incident_ttl_days,
            1,
            3650,
        )?;
        range(
            "state.ledger_ttl_days",
            self.state.ledger_ttl_days,
            1,
            36_500,
        )?;
        Ok(())
    }

    /// Merges `api.tokens_file` into `api.tokens`.
    pub fn load_tokens(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.api.tokens_file else {
            return Ok(());
        };
        let key = "api.tokens_file";
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
        let map: BTreeMap<String, String> = toml::from_str(&text).map_err(|e| {
            ConfigError::new(
                key,
                format!(
                    "{}: expected `\"token\" = \"identity\"` lines: {}",
                    path.display(),
                    e.message()
                ),
            )
        })?;
        self.api.tokens.extend(map);
        Ok(())
    }

    /// The SSRF guard of `[webhooks]`.
    pub fn guard(&self) -> Result<Guard, ConfigError> {
        let mut nets = Vec::new();
        for (i, c) in self.webhooks.allow_cidrs.iter().enumerate() {
            let net: IpNet = c.parse().map_err(|e| {
                ConfigError::new(
                    format!("webhooks.allow_cidrs[{i}]"),
                    format!("{c:?} is not a CIDR: {e}"),
                )
            })?;
            nets.push(net);
        }
        Ok(Guard::new(self.webhooks.allow_insecure_http, nets))
    }

    /// The SMTP password, if any (read from its file).
    pub fn smtp_password(&self) -> Result<Option<String>, ConfigError> {
        match (&self.email.password, &self.email.password_file) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(f)) => {
                tollguard_runtime::config::read_secret("email.password_file", f).map(Some)
            }
            (None, None) => Ok(None),
        }
    }
}

// ---------------------------------------------------------------------------
// contacts.toml

/// The consortium key, to pseudonymise `customer_id`s.
pub use tollguard_runtime::config::KeyConfig;

/// A webhook endpoint entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEntry {
    /// `https://…` URL.
    pub url: String,
    /// File holding the signing secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The signing secret inline (prefer `secret_file`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Concurrent requests to this endpoint.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
}

/// A carrier's contacts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarrierEntry {
    /// The provider id (as in `alert.providers`).
    pub provider_id: String,
    /// Fraud-desk addresses.
    #[serde(default)]
    pub emails: Vec<String>,
    /// Webhook endpoints.
    #[serde(default)]
    pub webhooks: Vec<WebhookEntry>,
}

/// A customer's contact.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerEntry {
    /// Consortium customer id (`kvk:30123456`), pseudonymised at load with
    /// the `[pseudonymization]` key.
    #[serde(default)]
    pub customer_id: Option<String>,
    /// Or the customer's token (`k1:3f2a…`).
    #[serde(default)]
    pub customer_token: Option<String>,
    /// Contact name (appears in the ledger as `customer:<name>`).
    pub name: String,
    /// Addresses.
    #[serde(default)]
    pub emails: Vec<String>,
    /// Webhook endpoints.
    #[serde(default)]
    pub webhooks: Vec<WebhookEntry>,
}

/// The consortium operations team.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TeamEntry {
    /// Addresses.
    #[serde(default)]
    pub emails: Vec<String>,
    /// Webhook endpoints.
    #[serde(default)]
    pub webhooks: Vec<WebhookEntry>,
}

/// `contacts.toml`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ContactsFile {
    /// The consortium key (needed for `customer_id` entries).
    #[serde(default)]
    pub pseudonymization: KeyConfig,
    /// Carriers.
    #[serde(default)]
    pub carriers: Vec<CarrierEntry>,
    /// Customers' contacts.
    #[serde(default)]
    pub customers: Vec<CustomerEntry>,
    /// The operations team.
    #[serde(default)]
    pub ops: Option<TeamEntry>,
}

/// A webhook endpoint at run time: URL, secret, and its own concurrency
/// limit and queue counter (shared by every audience that names the URL).
pub struct Endpoint {
    /// Where it was configured (`carriers[0].webhooks[1]`).
    pub key: String,
    /// URL.
    pub url: Url,
    secret: Vec<u8>,
    /// Concurrency limit.
    pub max_concurrency: usize,
    /// Permits of in-flight requests.
    pub permits: Arc<Semaphore>,
    /// Notifications queued for or in flight to this endpoint.
    pub queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("key", &self.key)
            .field("url", &self.url.as_str())
            .field("secret", &"<redacted>")
            .field("max_concurrency", &self.max_concurrency)
            .finish()
    }
}

impl Endpoint {
    /// A new endpoint.
    pub fn new(key: &str, url: Url, secret: Vec<u8>, max_concurrency: usize) -> Self {
        Self {
            key: key.to_string(),
            url,
            secret,
            max_concurrency,
            permits: Arc::new(Semaphore::new(max_concurrency)),
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The signing secret.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The redacted target for the ledger: the host.
    pub fn redacted(&self) -> String {
        self.url.host_str().unwrap_or("?").to_string()
    }
}

/// One audience: who, how it sees alerts, and where to reach it.
#[derive(Debug, Clone)]
pub struct Audience {
    /// `carrier:kpn`, `customer:<name>`, `ops`.
    pub label: String,
    /// How alerts are scoped for it.
    pub viewer: Viewer,
    /// E-mail addresses.
    pub emails: Vec<Address>,
    /// Webhook endpoints.
    pub webhooks: Vec<Arc<Endpoint>>,
}

/// The resolved routing configuration.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// By provider id.
    pub carriers: BTreeMap<String, Audience>,
    /// By customer token (`k1:3f2a…`).
    pub customers: HashMap<String, Vec<Audience>>,
    /// The operations team.
    pub ops: Option<Audience>,
}

impl Routing {
    /// The audiences of `alert`: every carrier in `providers` that has
    /// contacts, the affected customer's contacts, and the operations team.
    pub fn audiences(&self, alert: &pb::Alert) -> Vec<&Audience> {
        let mut out = Vec::new();
        let mut providers: Vec<&String> = alert.providers.iter().collect();
        providers.sort();
        providers.dedup();
        for p in providers {
            if let Some(a) = self.carriers.get(p) {
                out.push(a);
            }
        }
        if let Some(c) = alert.subject.as_ref().and_then(|s| s.customer.as_ref())
            && let Some(v) = self.customers.get(&format!("{}:{}", c.key_id, c.value))
        {
            out.extend(v.iter());
        }
        if let Some(o) = &self.ops {
            out.push(o);
        }
        out
    }

    /// Every endpoint, with its configuration key.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        let mut all: Vec<Arc<Endpoint>> = self
            .carriers
            .values()
            .chain(self.customers.values().flatten())
            .chain(self.ops.iter())
            .flat_map(|a| a.webhooks.iter().cloned())
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all.dedup_by(|a, b| Arc::ptr_eq(a, b));
        all
    }

    /// Number of push targets (webhooks and addresses).
    pub fn target_count(&self) -> usize {
        self.carriers
            .values()
            .chain(self.customers.values().flatten())
            .chain(self.ops.iter())
            .map(|a| a.emails.len() + a.webhooks.len())
            .sum()
    }
}

struct Builder<'a> {
    default_concurrency: usize,
    by_url: HashMap<String, Arc<Endpoint>>,
    base: Option<&'a Path>,
}

impl Builder<'_> {
    fn emails(&self, key: &str, list: &[String]) -> Result<Vec<Address>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let k = format!("{key}.emails[{i}]");
                let trimmed = e.trim();
                if trimmed != e || trimmed.contains(['<', '>', ' ']) {
                    return Err(ConfigError::new(
                        k,
                        format!("{e:?} is not an e-mail address"),
                    ));
                }
                e.parse::<Address>()
                    .map_err(|_| ConfigError::new(k, format!("{e:?} is not an e-mail address")))
            })
            .collect()
    }

    fn webhooks(
        &mut self,
        key: &str,
        list: &[WebhookEntry],
    ) -> Result<Vec<Arc<Endpoint>>, ConfigError> {
        let mut out = Vec::new();
        for (i, w) in list.iter().enumerate() {
            let k = format!("{key}.webhooks[{i}]");
            let url = Url::parse(&w.url).map_err(|e| {
                ConfigError::new(format!("{k}.url"), format!("{:?} is not a URL: {e}", w.url))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(ConfigError::new(
                    format!("{k}.url"),
                    format!("{:?}: only https (and http in tests) is allowed", w.url),
                ));
            }
            let secret = match (&w.secret, &w.secret_file) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        format!("{k}.secret"),
                        "give either secret or secret_file, not both",
                    ));
                }
                (Some(s), None) => s.clone(),
                (None, Some(f)) => {
                    let path = match self.base {
                        Some(b) if f.is_relative() => b.join(f),
                        _ => f.clone(),
                    };
                    tollguard_runtime::config::read_secret(&format!("{k}.secret_file"), &path)?
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        format!("{k}.secret_file"),
                        "a signing secret is required (secret_file or secret)",
                    ));
                }
            };
            if secret.len() < 16 {
                return Err(ConfigError::new(
                    format!("{k}.secret"),
                    "the signing secret must be at least 16 bytes",
                ));
            }
            let conc = w.max_concurrency.unwrap_or(self.default_concurrency);
            if !(1..=1024).contains(&conc) {
                return Err(ConfigError::new(
                    format!("{k}.max_concurrency"),
                    format!("{conc} is out of range 1..=1024"),
                ));
            }
            let ep = match self.by_url.get(url.as_str()) {
                Some(e) if e.secret() == secret.as_bytes() => e.clone(),
                Some(_) => {
                    return Err(ConfigError::new(
                        format!("{k}.secret"),
                        format!("{} is configured elsewhere with another secret", w.url),
                    ));
                }
                None => {
                    let e = Arc::new(Endpoint::new(&k, url.clone(), secret.into_bytes(), conc));
                    self.by_url.insert(url.as_str().to_string(), e.clone());
                    e
                }
            };
            out.push(ep);
        }
        Ok(out)
    }
}

fn is_token(s: &str) -> bool {
    match s.split_once(':') {
        Some((k, v)) => {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && v.len() == 32
                && v.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Parses and resolves `contacts.toml` (no DNS; see [`check_targets`]).
/// `name` is used in messages; relative `secret_file`s and `key_file`s are
/// resolved against `base`.
pub fn parse_contacts(
    name: &str,
    text: &str,
    base: Option<&Path>,
    default_concurrency: usize,
) -> Result<Routing, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::from_toml(name, &e))?;
    let file: ContactsFile = tollguard_runtime::config::from_table(name, table)?;
    let key = file.pseudonymization.load(base)?;
    let mut b = Builder {
        default_concurrency,
        by_url: HashMap::new(),
        base,
    };
    let mut routing = Routing::default();
    for (i, c) in file.carriers.iter().enumerate() {
        let k = format!("carriers[{i}]");
        if c.provider_id.trim().is_empty() {
            return Err(ConfigError::new(
                format!("{k}.provider_id"),
                "must not be empty",
            ));
        }
        if routing.carriers.contains_key(&c.provider_id) {
            return Err(ConfigError::new(
                format!("{k}.provider_id"),
                format!("{:?} is listed twice", c.provider_id),
            ));
        }
        let a = Audience {
            label: format!("carrier:{}", c.provider_id),
            viewer: Viewer::Carrier(c.provider_id.clone()),
            emails: b.emails(&k, &c.emails)?,
            webhooks: b.webhooks(&k, &c.webhooks)?,
        };
        routing.carriers.insert(c.provider_id.clone(), a);
    }
    let mut names = std::collections::HashSet::new();
    for (i, c) in file.customers.iter().enumerate() {
        let k = format!("customers[{i}]");
        if c.name.trim().is_empty() {
            return Err(ConfigError::new(format!("{k}.name"), "must not be empty"));
        }
        if !names.insert(c.name.clone()) {
            return Err(ConfigError::new(
                format!("{k}.name"),
                format!("{:?} is used by another customer contact", c.name),
            ));
        }
        let token = match (&c.customer_id, &c.customer_token, &key) {
            (Some(_), Some(_), _) => {
                return Err(ConfigError::new(
                    format!("{k}.customer_id"),
                    "give either customer_id or customer_token, not both",
                ));
            }
            (Some(id), None, Some(key)) => {
                if id.trim().is_empty() {
                    return Err(ConfigError::new(
                        format!("{k}.customer_id"),
                        "must not be empty",
                    ));
                }
                key.token(Kind::Customer, id)
            }
            (Some(_), None, None) => {
                return Err(ConfigError::new(
                    format!("{k}.customer_id"),
                    "needs the consortium key: set [pseudonymization] key_id and key_file, or give customer_token",
                ));
            }
            (None, Some(t), _) => {
                if !is_token(t) {
                    return Err(ConfigError::new(
                        format!("{k}.customer_token"),
                        format!("{t:?} is not a token (`<key id>:<32 hex digits>`)"),
                    ));
                }
                let (kid, v) = t.split_once(':').unwrap_or_default();
                tollguard_core::model::Token {
                    key_id: kid.to_string(),
                    value: v.to_ascii_lowercase(),
                }
            }
            (None, None, _) => {
                return Err(ConfigError::new(
                    format!("{k}.customer_id"),
                    "give customer_id or customer_token",
                ));
            }
        };
        let a = Audience {
            label: format!("customer:{}", c.name),
            viewer: Viewer::Customer,
            emails: b.emails(&k, &c.emails)?,
            webhooks: b.webhooks(&k, &c.webhooks)?,
        };
        routing
            .customers
            .entry(token.compact())
            .or_default()
            .push(a);
    }
    if let Some(o) = &file.ops {
        routing.ops = Some(Audience {
            label: "ops".into(),
            viewer: Viewer::Operator,
            emails: b.emails("ops", &o.emails)?,
            webhooks: b.webhooks("ops", &o.webhooks)?,
        });
    }
    Ok(routing)
}

/// Checks every webhook target with the SSRF guard, resolving host names:
/// a refused address is an error naming the entry; a host that does not
/// resolve right now is only a warning (returned), since DNS can be briefly
/// unavailable at start-up and every delivery checks again.
pub fn check_targets(routing: &Routing, guard: &Guard) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    for e in routing.endpoints() {
        match guard.check_target_blocking(&e.url) {
            Ok(Ok(())) => {}
            Ok(Err(w)) => warnings.push(format!("{}.url: {w}", e.key)),
            Err(refusal) => {
                return Err(ConfigError::new(
                    format!("{}.url", e.key),
                    format!("{}: refused: {refusal}", e.url),
                ));
            }
        }
    }
    Ok(warnings)
}

/// Reads, resolves and checks a contacts file.
pub fn load_contacts(
    path: &Path,
    guard: &Guard,
    default_concurrency: usize,
) -> Result<(Routing, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "contacts_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let name = path.display().to_string();
    let routing = parse_contacts(&name, &text, path.parent(), default_concurrency)?;
    let warnings = check_targets(&routing, guard)?;
    Ok((routing, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0707070707070707070707070707070707070707070707070707070707070707";

    fn parse(text: &str) -> Result<Routing, ConfigError> {
        parse_contacts("contacts.toml", text, None, 4)
    }

    #[test]
    fn a_full_contacts_file() {
        let text = format!(
            r#"
            [pseudonymization]
            key_id = "k1"
            key = "{KEY}"

            [[carriers]]
            provider_id = "kpn"
            emails = ["fraud@kpn.example"]
            [[carriers.webhooks]]
            url = "https://hooks.kpn.example/tollguard"
            secret = "0123456789abcdef0123"
            max_concurrency = 2

            [[customers]]
            customer_id = "kvk:30123456"
            name = "NEC service desk"
            emails = ["desk@nec.example"]

            [ops]
            emails = ["ops@tollguard.example"]
            "#
        );
        let r = parse(&text).unwrap();
        assert_eq!(r.carriers["kpn"].webhooks[0].max_concurrency, 2);
        assert_eq!(
            r.carriers["kpn"].webhooks[0].redacted(),
            "hooks.kpn.example"
        );
        let key = tollguard_core::pseudo::Key::from_text("k1", KEY).unwrap();
        let tok = key.token(Kind::Customer, "kvk:30123456");
        let alert = pb::Alert {
            providers: vec!["kpn".into(), "bt".into()],
            subject: Some(pb::Subject {
                customer: Some(pb::Token {
                    key_id: tok.key_id.clone(),
                    value: tok.value.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let labels: Vec<&str> = r
            .audiences(&alert)
            .iter()
            .map(|a| a.label.as_str())
            .collect();
        assert_eq!(labels, ["carrier:kpn", "customer:NEC service desk", "ops"]);
        assert_eq!(r.target_count(), 4);
    }

    #[test]
    fn bad_entries_are_named() {
        let e = parse(
            r#"
            [[customers]]
            customer_token = "k1:00112233445566778899aabbccddeeff"
            name = "a"
            [[customers]]
            customer_token = "k1:00112233445566778899aabbccddeeff"
            name = "b"
            [[customers]]
            customer_token = "k1:00112233445566778899aabbccddeeff"
            name = "c"
            emails = ["bob@"]
            "#,
        )
        .unwrap_err();
        assert_eq!(e.key, "customers[2].emails[0]");
        assert_eq!(e.reason, "\"bob@\" is not an e-mail address");
        let e = parse(
            "[[carriers]]\nprovider_id = \"kpn\"\nwebhooks = [{url = \"https://x.example/\"}]\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "carriers[0].webhooks[0].secret_file");
        let e = parse("[[customers]]\ncustomer_id = \"kvk:1\"\nname = \"x\"\n").unwrap_err();
        assert_eq!(e.key, "customers[0].customer_id");
        let e = parse("[[customers]]\ncustomer_token = \"nope\"\nname = \"x\"\n").unwrap_err();
        assert_eq!(e.key, "customers[0].customer_token");
        let e = parse("[[carriers]]\nprovider_id = \"kpn\"\nemail = []\n").unwrap_err();
        assert!(e.key.contains("email"), "{e}");
    }

    #[test]
    fn private_targets_are_refused_at_load() {
        let r = parse(
            "[ops]\nwebhooks = [{url = \"https://10.1.2.3/hook\", secret = \"0123456789abcdef\"}]\n",
        )
        .unwrap();
        let e = check_targets(&r, &Guard::new(false, vec![])).unwrap_err();
        assert_eq!(e.key, "ops.webhooks[0].url");
        assert!(e.reason.contains("private"), "{e}");
        let r = parse(
            "[ops]\nwebhooks = [{url = \"http://127.0.0.1:9/hook\", secret = \"0123456789abcdef\"}]\n",
        )
        .unwrap();
        assert!(check_targets(&r, &Guard::new(false, vec![])).is_err());
        let lax = Guard::new(true, vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(check_targets(&r, &lax).unwrap().is_empty());
    }

    #[test]
    fn defaults_validate() {
        let c: NotifierConfig =
            tollguard_runtime::config::from_table("t", toml::Table::new()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.dlq_topic, NOTIFICATIONS_DLQ);
        let mut bad = c.clone();
        bad.webhooks.allow_cidrs = vec!["10.0.0.0/33".into()];
        assert_eq!(bad.validate().unwrap_err().key, "webhooks.allow_cidrs[0]");
        let mut bad = c.clone();
        bad.api.tokens.insert("short".into(), "kpn".into());
        assert_eq!(bad.validate().unwrap_err().key, "api.tokens");
    }
}
