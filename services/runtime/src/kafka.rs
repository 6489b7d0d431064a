//! The Kafka implementation of the core's [`EventBus`] / [`Subscription`]
//! traits (DESIGN §4, STYLE "Kafka the careful way").
//!
//! * **Producing.** One idempotent [`FutureProducer`] per [`KafkaBus`]
//!   (`enable.idempotence=true`, `acks=all`, bounded local queue, `linger.ms`
//!   ≈ 5, lz4). [`EventBus::publish`] enqueues without blocking; a full queue
//!   is [`BusError::Backpressure`], never a silent drop. A publish resolves
//!   only once every record it enqueued has a delivery report, so a caller
//!   never sees a batch half acknowledged: on any error, the records that
//!   were acknowledged are exactly those stored by the broker
//!   ([`KafkaBus::publish_report`] names them).
//! * **Consuming.** [`KafkaSubscription`] is a consumer-group member with
//!   `enable.auto.offset.store=false` and auto commit: librdkafka commits,
//!   every [`KafkaSettings::auto_commit_interval_ms`], on revocation and on
//!   close, only the offsets that [`Subscription::commit`] stored, i.e. only
//!   work that is done (at least once).
//!
//! Offsets: [`Subscription::commit`] hands librdkafka the offset of the last
//! processed record of each partition (`rd_kafka_offset_store`, which stores
//! `offset + 1`); the group's committed position is therefore the next record
//! to process, as Kafka expects. The integration tests check this exactly.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Deserializer};
use tokio::task::JoinHandle;
use tollguard_core::bus::{EventBus, InRecord, OutRecord, Subscription};
use tollguard_core::{BusError, ConfigError};

/// Consumer read-ahead defaults (see `consumer_config`): per-partition
/// message and total kilobyte caps of the prefetch queue, and fetch sizes.
const CONSUMER_READ_AHEAD: &[(&str, &str)] = &[
    ("queued.min.messages", "20000"),
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.max.bytes", "8388608"),
    ("max.partition.fetch.bytes", "2097152"),
];

/// Prefix of every configuration key reported by [`KafkaSettings::validate`].
const KEY_PREFIX: &str = "kafka";

/// Timeout of admin operations and of waiting for new topics' leaders.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka properties that [`KafkaSettings::extra`] must not set: either
/// the at-least-once / idempotence guarantees depend on them, or a dedicated
/// field sets them (the value is that field, if any).
const RESERVED: &[(&str, Option<&str>)] = &[
    ("bootstrap.servers", Some("bootstrap")),
    ("metadata.broker.list", Some("bootstrap")),
    ("client.id", Some("client_id")),
    ("group.id", None),
    ("enable.idempotence", None),
    ("acks", None),
    ("request.required.acks", None),
    ("enable.auto.commit", None),
    ("enable.auto.offset.store", None),
    ("auto.offset.reset", None),
    (
        "queue.buffering.max.messages",
        Some("queue_buffering_max_messages"),
    ),
    (
        "queue.buffering.max.kbytes",
        Some("queue_buffering_max_kbytes"),
    ),
    ("linger.ms", Some("linger_ms")),
    ("queue.buffering.max.ms", Some("linger_ms")),
    ("compression.type", Some("compression")),
    ("compression.codec", Some("compression")),
    ("message.timeout.ms", Some("message_timeout_ms")),
    ("delivery.timeout.ms", Some("message_timeout_ms")),
    ("session.timeout.ms", Some("session_timeout_ms")),
    ("heartbeat.interval.ms", Some("heartbeat_interval_ms")),
    ("auto.commit.interval.ms", Some("auto_commit_interval_ms")),
    ("max.poll.interval.ms", Some("max_poll_interval_ms")),
];

/// Substrings of `extra` keys whose values are secrets (redacted by `Debug`).
const SECRET_MARKERS: &[&str] = &["password", "secret", "jaas", ".pem", "ssl.key."];

/// Compression of produced batches (all built into our librdkafka: lz4 and
/// snappy are bundled, gzip uses zlib; zstd is not compiled in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    None,
    /// gzip (zlib).
    Gzip,
    /// snappy.
    Snappy,
    /// lz4 (the default: cheap on CPU, good on protobuf).
    #[default]
    Lz4,
}

impl Compression {
    fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

/// Kafka client settings, embedded by the services under `[kafka]`.
///
/// Every field has a default, so `[kafka]` may be as short as
/// `bootstrap = "kafka-0:9092,kafka-1:9092"`. `extra` passes any other
/// librdkafka property to every client (producer, consumers, admin), e.g. for
/// TLS and SASL; nested TOML tables are flattened with dots, so both
/// `"security.protocol" = "SASL_SSL"` and `security.protocol = "SASL_SSL"`
/// work under `[kafka.extra]`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap: String,
    /// `client.id`, visible in broker logs and quotas.
    pub client_id: String,
    /// Further librdkafka properties (`security.protocol`, `sasl.*`,
    /// `ssl.*`, ...). Properties the delivery guarantees depend on are
    /// refused by [`KafkaSettings::validate`].
    #[serde(deserialize_with = "deserialize_extra")]
    pub extra: BTreeMap<String, String>,
    /// `queue.buffering.max.messages`: bound of the producer's local queue;
    /// beyond it, publishing is [`BusError::Backpressure`].
    pub queue_buffering_max_messages: u32,
    /// `queue.buffering.max.kbytes`: byte bound of the producer's queue.
    pub queue_buffering_max_kbytes: u32,
    /// `linger.ms`: how long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// `compression.type`.
    pub compression: Compression,
    /// `message.timeout.ms`: how long a record may wait for its
    /// acknowledgement before its publish fails with
    /// [`BusError::Unavailable`]; bounds every publish.
    pub message_timeout_ms: u32,
    /// Delay suggested to callers on [`BusError::Backpressure`].
    pub backpressure_retry_after_ms: u64,
    /// `session.timeout.ms` of consumers.
    pub session_timeout_ms: u32,
    /// `heartbeat.interval.ms` of consumers (also how fast a member notices a
    /// rebalance).
    pub heartbeat_interval_ms: u32,
    /// `auto.commit.interval.ms`: how often stored offsets are committed.
    pub auto_commit_interval_ms: u32,
    /// `max.poll.interval.ms`: a member that does not poll for this long
    /// leaves the group.
    pub max_poll_interval_ms: u32,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            bootstrap: "127.0.0.1:9092".into(),
            client_id: "tollguard".into(),
            extra: BTreeMap::new(),
            queue_buffering_max_messages: 100_000,
            queue_buffering_max_kbytes: 65_536,
            linger_ms: 5,
            compression: Compression::Lz4,
            message_timeout_ms: 30_000,
            backpressure_retry_after_ms: 100,
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 3_000,
            auto_commit_interval_ms: 1_000,
            max_poll_interval_ms: 300_000,
        }
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let secret = SECRET_MARKERS.iter().any(|m| k.contains(m));
                (k.as_str(), if secret { "<redacted>" } else { v.as_str() })
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap", &self.bootstrap)
            .field("client_id", &self.client_id)
            .field("extra", &extra)
            .field(
                "queue_buffering_max_messages",
                &self.queue_buffering_max_messages,
            )
            .field(
                "queue_buffering_max_kbytes",
                &self.queue_buffering_max_kbytes,
            )
            .field("linger_ms", &self.linger_ms)
            .field("compression", &self.compression)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field(
                "backpressure_retry_after_ms",
                &self.backpressure_retry_after_ms,
            )
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("auto_commit_interval_ms", &self.auto_commit_interval_ms)
            .field("max_poll_interval_ms", &self.max_poll_interval_ms)
            .finish()
    }
}

fn key(field: &str) -> String {
    format!("{KEY_PREFIX}.{field}")
}

fn extra_key(property: &str) -> String {
    format!("{KEY_PREFIX}.extra.\"{property}\"")
}

fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            key(field),
            format!("{value} is out of range {min}..={max}"),
        ))
    }
}

impl KafkaSettings {
    /// Defaults with the given bootstrap servers.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            ..Self::default()
        }
    }

    /// Checks every value; the error names the key (`kafka.bootstrap`,
    /// `kafka.extra."sasl.mechanism"`, ...). librdkafka itself vets the
    /// property names and values of `extra`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_bootstrap()?;
        if self.client_id.trim().is_empty() {
            return Err(ConfigError::new(key("client_id"), "must not be empty"));
        }
        const I32_MAX: u64 = i32::MAX as u64;
        check_range(
            "queue_buffering_max_messages",
            self.queue_buffering_max_messages.into(),
            1,
            I32_MAX,
        )?;
        check_range(
            "queue_buffering_max_kbytes",
            self.queue_buffering_max_kbytes.into(),
            1,
            I32_MAX,
        )?;
        check_range("linger_ms", self.linger_ms.into(), 0, 900_000)?;
        check_range(
            "message_timeout_ms",
            self.message_timeout_ms.into(),
            1,
            I32_MAX,
        )?;
        if self.message_timeout_ms < self.linger_ms {
            return Err(ConfigError::new(
                key("message_timeout_ms"),
                format!(
                    "must be at least linger_ms ({} < {})",
                    self.message_timeout_ms, self.linger_ms
                ),
            ));
        }
        check_range(
            "backpressure_retry_after_ms",
            self.backpressure_retry_after_ms,
            1,
            60_000,
        )?;
        check_range(
            "session_timeout_ms",
            self.session_timeout_ms.into(),
            1,
            3_600_000,
        )?;
        check_range(
            "heartbeat_interval_ms",
            self.heartbeat_interval_ms.into(),
            1,
            3_600_000,
        )?;
        if self.heartbeat_interval_ms >= self.session_timeout_ms {
            return Err(ConfigError::new(
                key("heartbeat_interval_ms"),
                format!(
                    "must be below session_timeout_ms ({} >= {})",
                    self.heartbeat_interval_ms, self.session_timeout_ms
                ),
            ));
        }
        check_range(
            "auto_commit_interval_ms",
            self.auto_commit_interval_ms.into(),
            1,
            86_400_000,
        )?;
        check_range(
            "max_poll_interval_ms",
            self.max_poll_interval_ms.into(),
            1,
            86_400_000,
        )?;
        if self.max_poll_interval_ms < self.session_timeout_ms {
            return Err(ConfigError::new(
                key("max_poll_interval_ms"),
                format!(
                    "must be at least session_timeout_ms ({} < {})",
                    self.max_poll_interval_ms, self.session_timeout_ms
                ),
            ));
        }
        for property in self.extra.keys() {
            if property.trim().is_empty() {
                return Err(ConfigError::new(
                    key("extra"),
                    "property names must not be empty",
                ));
            }
            if let Some((_, field)) = RESERVED.iter().find(|(p, _)| p == property) {
                let reason = match field {
                    Some(field) => format!("set {} instead", key(field)),
                    None => "fixed by TollGuard's delivery guarantees".to_string(),
                };
                return Err(ConfigError::new(extra_key(property), reason));
            }
        }
        self.validate_security()?;
        // Let librdkafka vet names and values (no client is created).
        for config in [
            self.producer_config(),
            self.consumer_config("tollguard-validate"),
        ] {
            if let Err(e) = config.create_native_config() {
                return Err(self.config_error(e));
            }
        }
        Ok(())
    }

    /// Security properties in `extra` (see SECURITY.md): SASL needs a
    /// mechanism TollGuard supports and both credentials; a password never
    /// travels in clear (`PLAIN` only over TLS); TLS files must exist.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let get = |p: &str| self.extra.get(p).map(|v| v.trim());
        let protocol = get("security.protocol")
            .unwrap_or("plaintext")
            .to_ascii_uppercase();
        let sasl = match protocol.as_str() {
            "PLAINTEXT" | "SSL" => false,
            "SASL_PLAINTEXT" | "SASL_SSL" => true,
            other => {
                return Err(ConfigError::new(
                    extra_key("security.protocol"),
                    format!("{other:?} is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
                ));
            }
        };
        let tls = protocol.ends_with("SSL");
        if sasl {
            let mech = get("sasl.mechanism")
                .or_else(|| get("sasl.mechanisms"))
                .unwrap_or("")
                .to_ascii_uppercase();
            match mech.as_str() {
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => {}
                "PLAIN" if tls => {}
                "PLAIN" => {
                    return Err(ConfigError::new(
                        extra_key("sasl.mechanism"),
                        "PLAIN over SASL_PLAINTEXT sends the password in clear; use SCRAM-SHA-512 or SASL_SSL",
                    ));
                }
                "" => {
                    return Err(ConfigError::new(
                        extra_key("sasl.mechanism"),
                        format!(
                            "is required with security.protocol = {protocol} (SCRAM-SHA-512 recommended)"
                        ),
                    ));
                }
                other => {
                    return Err(ConfigError::new(
                        extra_key("sasl.mechanism"),
                        format!(
                            "{other:?} is not supported: use SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN over SASL_SSL"
                        ),
                    ));
                }
            }
            for p in ["sasl.username", "sasl.password"] {
                if get(p).is_none_or(str::is_empty) {
                    return Err(ConfigError::new(
                        extra_key(p),
                        format!("is required with security.protocol = {protocol}"),
                    ));
                }
            }
        }
        for p in [
            "ssl.ca.location",
            "ssl.certificate.location",
            "ssl.key.location",
        ] {
            if let Some(f) = get(p) {
                if !tls {
                    return Err(ConfigError::new(
                        extra_key(p),
                        format!("is set but security.protocol = {protocol} does not use TLS"),
                    ));
                }
                if !std::path::Path::new(f).exists() {
                    return Err(ConfigError::new(
                        extra_key(p),
                        format!("{f} does not exist"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_bootstrap(&self) -> Result<(), ConfigError> {
        let k = key("bootstrap");
        if self.bootstrap.trim().is_empty() {
            return Err(ConfigError::new(k, "must list at least one host:port"));
        }
        for entry in self.bootstrap.split(',') {
            let entry = entry.trim();
            let hostport = entry.rsplit_once("://").map_or(entry, |(_, rest)| rest);
            let Some((host, port)) = hostport.rsplit_once(':') else {
                return Err(ConfigError::new(k, format!("`{entry}` is not host:port")));
            };
            if host.is_empty() || host.chars().any(char::is_whitespace) {
                return Err(ConfigError::new(k, format!("`{entry}` has no valid host")));
            }
            if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                return Err(ConfigError::new(k, format!("`{entry}` has no valid port")));
            }
        }
        Ok(())
    }

    /// Maps a librdkafka configuration error back to the key it came from.
    fn config_error(&self, e: KafkaError) -> ConfigError {
        match &e {
            KafkaError::ClientConfig(_, desc, property, _) => {
                let k = if self.extra.contains_key(property) {
                    extra_key(property)
                } else {
                    RESERVED
                        .iter()
                        .find(|(p, _)| p == property)
                        .and_then(|(_, f)| *f)
                        .map_or_else(|| key(property), key)
                };
                ConfigError::new(k, desc)
            }
            _ => ConfigError::new(KEY_PREFIX, e),
        }
    }

    /// Properties shared by every client: ours, then `extra`.
    fn common_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap)
            .set("client.id", &self.client_id)
            .set_log_level(RDKafkaLogLevel::Info);
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.common_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "queue.buffering.max.messages",
                self.queue_buffering_max_messages.to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                self.queue_buffering_max_kbytes.to_string(),
            )
            .set("linger.ms", self.linger_ms.to_string())
            .set("compression.type", self.compression.as_str())
            .set("message.timeout.ms", self.message_timeout_ms.to_string());
        if !self.extra.contains_key("partitioner") {
            // The Java client's partitioner: a key lands on the same
            // partition whichever client produced it.
            c.set("partitioner", "murmur2_random");
        }
        c
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.common_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "auto.commit.interval.ms",
                self.auto_commit_interval_ms.to_string(),
            )
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                self.heartbeat_interval_ms.to_string(),
            )
            .set(
                "max.poll.interval.ms",
                self.max_poll_interval_ms.to_string(),
            );
        if !self.extra.contains_key("partition.assignment.strategy") {
            c.set("partition.assignment.strategy", "cooperative-sticky");
        }
        // Bounded read-ahead: librdkafka's defaults (100,000 messages per
        // partition, 64 MiB queued, 50 MiB per fetch) let a lagging consumer
        // hold ~200 MiB of prefetched records (a correlator at 264 MiB RSS,
        // BENCHMARKS.md). A few MiB is dozens of batches of the services'
        // ~350-byte events: enough to keep them busy, small enough to keep a
        // service well under its 256 MiB. `[kafka.extra]` may override each.
        for (property, value) in CONSUMER_READ_AHEAD {
            if !self.extra.contains_key(*property) {
                c.set(*property, *value);
            }
        }
        c
    }

    fn admin_config(&self) -> ClientConfig {
        self.common_config()
    }
}

/// A TOML value under `[kafka.extra]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExtraValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Table(BTreeMap<String, ExtraValue>),
}

fn flatten_extra(
    prefix: &str,
    table: BTreeMap<String, ExtraValue>,
    out: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    for (k, v) in table {
        let name = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        let value = match v {
            ExtraValue::Table(t) => {
                flatten_extra(&name, t, out)?;
                continue;
            }
            ExtraValue::Bool(b) => b.to_string(),
            ExtraValue::Int(i) => i.to_string(),
            ExtraValue::Float(x) => x.to_string(),
            ExtraValue::Str(s) => s,
        };
        if out.insert(name.clone(), value).is_some() {
            return Err(format!("librdkafka property `{name}` is given twice"));
        }
    }
    Ok(())
}

fn deserialize_extra<'de, D: Deserializer<'de>>(
    de: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, ExtraValue>::deserialize(de)?;
    let mut out = BTreeMap::new();
    flatten_extra("", raw, &mut out).map_err(serde::de::Error::custom)?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Client contexts: librdkafka logs, errors and rebalances go to `tracing`.

fn log_rdkafka(client: &str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(client, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(client, fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(client, fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(client, fac, "librdkafka: {message}"),
    }
}

/// Context of the producer and admin clients.
#[derive(Debug, Clone)]
struct ClientLog {
    client: &'static str,
    /// The last authentication failure the client reported (librdkafka's
    /// text names the mechanism, never the password), shown by
    /// [`KafkaBus::probe`]: a wrong SASL password otherwise surfaces only as
    /// a generic transport failure.
    auth_error: Arc<Mutex<Option<String>>>,
}

impl ClientLog {
    fn new(client: &'static str) -> Self {
        Self {
            client,
            auth_error: Arc::default(),
        }
    }
}

impl ClientContext for ClientLog {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_rdkafka(self.client, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(client = self.client, error = %error, reason, "kafka client error");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Authentication)
            || reason.contains("SASL")
        {
            *self.auth_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
        }
    }
}

/// Highest offset stored per partition (offset of the last processed
/// record), shared between a subscription and its rebalance callback.
type StoredOffsets = Arc<Mutex<HashMap<(String, i32), i64>>>;

fn lock(stored: &StoredOffsets) -> std::sync::MutexGuard<'_, HashMap<(String, i32), i64>> {
    stored.lock().unwrap_or_else(|e| e.into_inner())
}

fn tpl_list(tpl: &TopicPartitionList) -> String {
    let parts: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect();
    parts.join(",")
}

/// Context of a [`KafkaSubscription`]'s consumer. Its callbacks run on the
/// thread that polls the consumer (a blocking task), never on an async worker.
struct ConsumerCtx {
    group: String,
    stored: StoredOffsets,
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_rdkafka("consumer", level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(group = %self.group, error = %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            // Cooperative rebalances also deliver empty increments: not news.
            Rebalance::Assign(tpl) if tpl.count() == 0 => {
                tracing::debug!(group = %self.group, "kafka rebalance: nothing assigned");
            }
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group, partitions = %tpl_list(tpl), "kafka partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                // librdkafka commits what was stored for these partitions
                // (auto commit); forget them, the next owner takes over.
                let mut stored = lock(&self.stored);
                for e in tpl.elements() {
                    stored.remove(&(e.topic().to_string(), e.partition()));
                }
                if tpl.count() == 0 {
                    tracing::debug!(group = %self.group, "kafka rebalance: nothing revoked");
                } else {
                    tracing::info!(group = %self.group, partitions = %tpl_list(tpl), "kafka partitions revoked");
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka rebalance error");
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                tracing::debug!(group = %self.group, partitions = %tpl_list(offsets), "kafka offsets committed")
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka offset commit failed")
            }
        }
    }
}

fn unavailable(what: &str, e: impl fmt::Display) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------
// Producing.

/// A topic for [`KafkaBus::ensure_topics`]: name, partition count and topic
/// configs (e.g. `("retention.ms", "86400000")`).
pub type TopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

/// Where an acknowledged record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acknowledged {
    /// Index of the record in the published batch.
    pub index: usize,
    /// Partition it was stored in.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

/// Outcome of [`KafkaBus::publish_report`]: once it exists, no record of the
/// batch is in flight any more.
#[derive(Debug, Default)]
pub struct PublishReport {
    /// The records the broker acknowledged (`acks=all`), in batch order.
    pub acknowledged: Vec<Acknowledged>,
    /// Why not all of them were; `None` when all were. On
    /// [`BusError::Backpressure`] the acknowledged records are a prefix of the
    /// batch: retrying the rest (`batch[acknowledged.len()..]`) publishes
    /// each record exactly once, retrying the whole batch at least once.
    pub error: Option<BusError>,
}

impl PublishReport {
    /// `Ok` when every record was acknowledged.
    pub fn into_result(self) -> Result<(), BusError> {
        self.error.map_or(Ok(()), Err)
    }
}

/// The Kafka [`EventBus`]: one idempotent producer; consumers are created
/// per [`EventBus::subscribe`]. Cheap to clone (the producer is shared).
#[derive(Clone)]
pub struct KafkaBus {
    settings: Arc<KafkaSettings>,
    producer: FutureProducer<ClientLog>,
    /// The producer's last authentication failure ([`ClientLog`]).
    auth_error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBus")
            .field("bootstrap", &self.settings.bootstrap)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the producer (it connects in the background; see
    /// [`KafkaBus::probe`] for readiness). Invalid settings are refused here
    /// too, so the idempotence and acknowledgement settings always hold.
    pub fn new(settings: KafkaSettings) -> Result<Self, BusError> {
        settings
            .validate()
            .map_err(|e| unavailable("invalid kafka settings", e))?;
        let log = ClientLog::new("producer");
        let auth_error = log.auth_error.clone();
        let producer = settings
            .producer_config()
            .create_with_context(log)
            .map_err(|e| unavailable("cannot create kafka producer", e))?;
        Ok(Self {
            settings: Arc::new(settings),
            producer,
            auth_error,
        })
    }

    /// The settings the bus was built with.
    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// Records in the producer's queue (enqueued, in flight, or delivered
    /// but not yet freed), over all publishers. librdkafka frees a delivered
    /// batch just after the delivery callbacks that resolve `publish` have
    /// run, so right after a publish returns this may briefly still count
    /// its records.
    pub fn in_flight_count(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Publishes `records` and reports which were acknowledged.
    ///
    /// Every record is enqueued without blocking (`send_result`), with its
    /// key (an empty key is sent as a null key) and headers. A full local
    /// queue stops the enqueueing ([`BusError::Backpressure`]), as does any
    /// other enqueue error ([`BusError::Unavailable`]); either way the
    /// records already enqueued are awaited before this returns, so none is
    /// left in flight. A failed delivery is [`BusError::Unavailable`] with
    /// librdkafka's reason, and takes precedence over backpressure.
    pub async fn publish_report(&self, records: &[OutRecord]) -> PublishReport {
        let mut pending = Vec::with_capacity(records.len());
        let mut stop: Option<BusError> = None;
        for (index, r) in records.iter().enumerate() {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_slice()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic)
                .payload(r.payload.as_slice())
                .headers(headers);
            if !r.key.is_empty() {
                record = record.key(r.key.as_slice());
            }
            match self.producer.send_result(record) {
                Ok(delivery) => pending.push((index, delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tracing::debug!(
                        enqueued = index,
                        batch = records.len(),
                        "kafka producer queue full"
                    );
                    stop = Some(BusError::Backpressure {
                        retry_after_ms: self.settings.backpressure_retry_after_ms,
                    });
                    break;
                }
                Err((e, _)) => {
                    stop = Some(unavailable(
                        &format!("cannot enqueue record for {}", r.topic),
                        e,
                    ));
                    break;
                }
            }
        }
        let mut report = PublishReport {
            acknowledged: Vec::with_capacity(pending.len()),
            error: None,
        };
        let mut failed = 0usize;
        let mut first_failure = None;
        let (indexes, deliveries): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        let outcomes = futures::future::join_all(deliveries).await;
        for (index, outcome) in indexes.into_iter().zip(outcomes) {
            match outcome {
                Ok(Ok(d)) => report.acknowledged.push(Acknowledged {
                    index,
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((e, msg))) => {
                    failed += 1;
                    first_failure
                        .get_or_insert_with(|| format!("delivery to {} failed: {e}", msg.topic()));
                }
                Err(_canceled) => {
                    failed += 1;
                    first_failure.get_or_insert_with(|| "producer shut down".to_string());
                }
            }
        }
        report.error = match first_failure {
            Some(first) => Some(BusError::Unavailable(format!(
                "{failed} of {} records not acknowledged; first: {first}",
                records.len()
            ))),
            None => stop,
        };
        report
    }

    /// Waits until every enqueued record is acknowledged or failed (graceful
    /// shutdown), at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| unavailable("kafka flush task", e))?
            .map_err(|e| unavailable("kafka flush", e))
    }

    /// Whether the cluster answers a metadata request within `timeout`
    /// (readiness). Blocks the calling thread: from async code use
    /// [`KafkaBus::probe`].
    pub fn metadata_ok(&self, timeout: Duration) -> bool {
        self.producer
            .client()
            .fetch_metadata(None, timeout)
            .map(|m| !m.brokers().is_empty())
            .unwrap_or(false)
    }

    /// Async readiness check: `Ok` when the cluster answers a metadata
    /// request within `timeout`, else the reason (for `Health::set`).
    pub async fn probe(&self, timeout: Duration) -> Result<(), BusError> {
        let producer = self.producer.clone();
        let metadata =
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout))
                .await
                .map_err(|e| unavailable("kafka metadata task", e))?
                .map_err(|e| {
                    match self
                        .auth_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                    {
                        Some(auth) => unavailable("kafka metadata", format!("{e}; {auth}")),
                        None => unavailable("kafka metadata", e),
                    }
                })?;
        *self.auth_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if metadata.brokers().is_empty() {
            return Err(BusError::Unavailable(
                "kafka metadata lists no broker".into(),
            ));
        }
        Ok(())
    }

    /// Number of partitions of `topic`, `None` if it does not exist. Fetches
    /// the cluster's metadata for all topics (never auto-creates `topic`).
    pub async fn partition_count(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<usize>, BusError> {
        let producer = self.producer.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let m = producer
                .client()
                .fetch_metadata(None, timeout)
                .map_err(|e| unavailable("kafka metadata", e))?;
            Ok(m.topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len()))
        })
        .await
        .map_err(|e| unavailable("kafka metadata task", e))?
    }

    /// Creates each `(name, partitions, configs)` topic that does not exist
    /// (with the broker's default replication factor), then waits until
    /// every listed topic has a leader for each of its partitions. An
    /// existing topic is left as it is (a different partition count is
    /// logged).
    pub async fn ensure_topics(&self, topics: &[TopicSpec<'_>]) -> Result<(), BusError> {
        if topics.is_empty() {
            return Ok(());
        }
        let admin: AdminClient<ClientLog> = self
            .settings
            .admin_config()
            .create_with_context(ClientLog::new("admin"))
            .map_err(|e| unavailable("cannot create kafka admin client", e))?;
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions, configs)| {
                configs.iter().fold(
                    NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)),
                    |t, (k, v)| t.set(k, v),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .operation_timeout(Some(ADMIN_TIMEOUT))
            .request_timeout(Some(ADMIN_TIMEOUT));
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|e| unavailable("kafka create topics", e))?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(topic = %name, "kafka topic created"),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic = %name, "kafka topic already exists");
                }
                Err((name, code)) => {
                    return Err(unavailable(
                        &format!("cannot create kafka topic {name}"),
                        code,
                    ));
                }
            }
        }
        // Creation is asynchronous on the controller: wait for the leaders.
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        let wanted: Vec<(String, i32)> =
            topics.iter().map(|(n, p, _)| (n.to_string(), *p)).collect();
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                let problem = match producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(5))
                {
                    Err(e) => format!("metadata: {e}"),
                    Ok(m) => {
                        let not_ready = wanted.iter().find_map(|(name, _)| {
                            let Some(t) = m.topics().iter().find(|t| t.name() == name) else {
                                return Some(format!("topic {name} not in metadata yet"));
                            };
                            if let Some(e) = t.error() {
                                return Some(format!("topic {name}: {e:?}"));
                            }
                            let leaderless = t
                                .partitions()
                                .iter()
                                .any(|p| p.leader() < 0 || p.error().is_some());
                            (t.partitions().is_empty() || leaderless)
                                .then(|| format!("topic {name} has partitions without a leader"))
                        });
                        match not_ready {
                            Some(problem) => problem,
                            None => {
                                for (name, partitions) in &wanted {
                                    let actual = m
                                        .topics()
                                        .iter()
                                        .find(|t| t.name() == name)
                                        .map_or(0, |t| t.partitions().len());
                                    if actual != *partitions as usize {
                                        tracing::warn!(
                                            topic = %name,
                                            requested = partitions,
                                            actual,
                                            "kafka topic exists with a different partition count"
                                        );
                                    }
                                }
                                return Ok(());
                            }
                        }
                    }
                };
                if Instant::now() >= deadline {
                    return Err(BusError::Unavailable(format!(
                        "kafka topics not ready: {problem}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .map_err(|e| unavailable("kafka metadata task", e))?
    }

    /// Joins consumer group `group` on `topics` (the concrete type, with the
    /// Kafka-specific extras such as [`KafkaSubscription::commit_now`]).
    pub async fn subscribe_kafka(
        &self,
        topics: &[&str],
        group: &str,
    ) -> Result<KafkaSubscription, BusError> {
        KafkaSubscription::create(&self.settings, topics, group).await
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, records: Vec<OutRecord>) -> Result<(), BusError> {
        self.publish_report(&records).await.into_result()
    }

    async fn subscribe(
        &self,
        topics: &[&str],
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(self.subscribe_kafka(topics, group).await?))
    }
}

// ---------------------------------------------------------------------------
// Consuming.

/// Result of one blocking poll: the records, and an error met after some
/// records were already taken (reported by the next poll, so no taken record
/// is ever dropped).
type PollOutcome = (Vec<InRecord>, Option<BusError>);

/// A consumer-group member on Kafka.
///
/// # Why a `BaseConsumer` polled on a blocking task
///
/// Measured against the local Kafka 4.4 broker (release build, one tokio
/// worker, 200-byte records, `max` = 500; a throwaway harness outside the
/// repository), comparing this type with a `StreamConsumer` doing the same
/// (`recv()` with a timeout, then `now_or_never` draining, same offset
/// storing):
///
/// * Rebalances (member A consuming an 8-partition topic under a steady
///   produce load while member B joins and leaves 3 times; 6 runs each): no
///   stall with either in rdkafka 0.39. The longest gap between A's batches
///   was 30–70 ms for both (one BaseConsumer run had a single 1.02 s gap,
///   not seen again in 5 more runs). But the `StreamConsumer` runs the
///   rebalance callback (`rd_kafka_incremental_(un)assign`) inside `recv()`,
///   on the async worker: up to 16 ms in a single `poll` of its future, versus
///   under 4 ms here, where that work runs on the blocking thread.
/// * Draining 200 000 records: about 2.4 M records/s for the
///   `StreamConsumer`, 1.1–1.3 M/s here (one `spawn_blocking` hop per batch) —
///   both about 50× the 25 000 events/s the pipeline needs.
/// * Close (revoke, final commit, LeaveGroup): about 100 ms for both; a
///   dropped `StreamConsumer` spends it on the async worker.
///
/// So this type keeps every librdkafka callback and blocking call (poll,
/// rebalance, commit-and-wait, close) off the async workers, which share two
/// cores with the gRPC front end, for a throughput cost that does not matter
/// here.
///
/// Cancellation safety: `poll` keeps the blocking task's handle until its
/// records are returned, so a `poll` future dropped mid-flight (e.g. in a
/// `select!`) loses nothing — the next `poll` returns those records first.
///
/// Dropping the subscription leaves the group and commits the stored
/// offsets before `drop` returns (on a multi-thread runtime via
/// `block_in_place`), so re-subscribing the same group right after sees them.
/// [`Subscription::close`] does the same without blocking a worker.
pub struct KafkaSubscription {
    consumer: Option<Arc<BaseConsumer<ConsumerCtx>>>,
    group: String,
    topics: Vec<String>,
    stored: StoredOffsets,
    pending: Option<JoinHandle<PollOutcome>>,
    deferred: Option<BusError>,
    /// Partitions paused by [`Subscription::pause_only`], and when their
    /// pause was last asserted (re-asserted every [`PAUSE_REASSERT`]: a
    /// partition revoked and assigned again may come back fetching).
    paused: (String, Vec<i32>),
    paused_at: Option<Instant>,
}

/// How often a non-empty pause set is asserted again.
const PAUSE_REASSERT: Duration = Duration::from_secs(1);

fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    tpl
}

impl fmt::Debug for KafkaSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSubscription")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("open", &self.consumer.is_some())
            .field("poll_in_flight", &self.pending.is_some())
            .finish_non_exhaustive()
    }
}

fn to_in_record(m: &BorrowedMessage<'_>) -> InRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    InRecord {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}

/// Sorts a consumer error: `Ok` = informational (librdkafka recovers by
/// itself, e.g. a broker connection dropped), `Err` = the subscription is
/// unusable.
fn classify(group: &str, e: KafkaError) -> Result<(), BusError> {
    match e {
        KafkaError::PartitionEOF(_) => Ok(()),
        KafkaError::MessageConsumptionFatal(code) => {
            Err(unavailable(&format!("kafka consumer {group} failed"), code))
        }
        other => {
            tracing::warn!(group, error = %other, "kafka consumer error (retrying)");
            Ok(())
        }
    }
}

/// Blocking: up to `max` records, waiting at most `timeout` for the first,
/// then taking whatever is already fetched (never waiting again).
fn poll_blocking(
    consumer: &BaseConsumer<ConsumerCtx>,
    group: &str,
    max: usize,
    timeout: Duration,
) -> PollOutcome {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    // `poll` also returns `None` after serving a rebalance or commit event
    // before its timeout: loop until the deadline.
    while out.is_empty() {
        match consumer.poll(deadline.saturating_duration_since(Instant::now())) {
            Some(Ok(m)) => out.push(to_in_record(&m)),
            Some(Err(e)) => {
                if let Err(fatal) = classify(group, e) {
                    return (out, Some(fatal));
                }
            }
            None => {}
        }
        if out.is_empty() && Instant::now() >= deadline {
            return (out, None);
        }
    }
    while out.len() < max {
        match consumer.poll(Duration::ZERO) {
            Some(Ok(m)) => out.push(to_in_record(&m)),
            Some(Err(e)) => {
                if let Err(fatal) = classify(group, e) {
                    return (out, Some(fatal));
                }
            }
            None => break,
        }
    }
    (out, None)
}

impl KafkaSubscription {
    async fn create(
        settings: &KafkaSettings,
        topics: &[&str],
        group: &str,
    ) -> Result<Self, BusError> {
        if topics.is_empty() {
            return Err(BusError::Unavailable("subscribe: no topic given".into()));
        }
        let stored: StoredOffsets = Arc::default();
        let config = settings.consumer_config(group);
        let ctx = ConsumerCtx {
            group: group.to_string(),
            stored: stored.clone(),
        };
        let topic_names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let names = topic_names.clone();
        // Creating a client and `subscribe` wait on librdkafka's threads.
        let consumer = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer<ConsumerCtx> = config
                .create_with_context(ctx)
                .map_err(|e| unavailable("cannot create kafka consumer", e))?;
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            consumer
                .subscribe(&refs)
                .map_err(|e| unavailable("kafka subscribe", e))?;
            Ok::<_, BusError>(consumer)
        })
        .await
        .map_err(|e| unavailable("kafka consumer task", e))??;
        tracing::info!(group, topics = ?topic_names, "kafka consumer subscribed");
        Ok(Self {
            consumer: Some(Arc::new(consumer)),
            group: group.to_string(),
            topics: topic_names,
            stored,
            pending: None,
            deferred: None,
            paused: (String::new(), Vec::new()),
            paused_at: None,
        })
    }

    fn consumer(&self) -> Result<&Arc<BaseConsumer<ConsumerCtx>>, BusError> {
        self.consumer.as_ref().ok_or(BusError::Closed)
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Partitions currently assigned to this member.
    pub async fn assignment(&self) -> Result<Vec<(String, i32)>, BusError> {
        let consumer = self.consumer()?.clone();
        tokio::task::spawn_blocking(move || {
            let tpl = consumer
                .assignment()
                .map_err(|e| unavailable("kafka assignment", e))?;
            Ok(tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect())
        })
        .await
        .map_err(|e| unavailable("kafka consumer task", e))?
    }

    /// The low and high watermarks (first retained offset, end offset) of
    /// each of `partitions` of one topic, by partition; asks the broker.
    pub async fn watermarks(
        &self,
        partitions: &[(String, i32)],
        timeout: Duration,
    ) -> Result<BTreeMap<i32, (i64, i64)>, BusError> {
        let consumer = self.consumer()?.clone();
        let partitions = partitions.to_vec();
        tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .map(|(t, p)| {
                    consumer
                        .fetch_watermarks(t, *p, timeout)
                        .map(|w| (*p, w))
                        .map_err(|e| unavailable("kafka watermarks", e))
                })
                .collect()
        })
        .await
        .map_err(|e| unavailable("kafka consumer task", e))?
    }

    /// The group's committed positions (next offset to consume) of the
    /// given partitions, `None` where nothing is committed; asks the broker.
    pub async fn committed_offsets(
        &self,
        partitions: &[(&str, i32)],
        timeout: Duration,
    ) -> Result<BTreeMap<(String, i32), Option<i64>>, BusError> {
        let consumer = self.consumer()?.clone();
        let mut tpl = TopicPartitionList::new();
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        tokio::task::spawn_blocking(move || {
            let tpl = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| unavailable("kafka committed offsets", e))?;
            Ok(tpl
                .elements()
                .iter()
                .map(|e| {
                    let offset = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    ((e.topic().to_string(), e.partition()), offset)
                })
                .collect())
        })
        .await
        .map_err(|e| unavailable("kafka consumer task", e))?
    }

    /// Commits the stored offsets now and waits for the broker's answer
    /// (shutdown; otherwise auto commit does it every
    /// `auto_commit_interval_ms`). Nothing stored is not an error.
    pub async fn commit_now(&self) -> Result<(), BusError> {
        let consumer = self.consumer()?.clone();
        tokio::task::spawn_blocking(move || commit_sync(&consumer))
            .await
            .map_err(|e| unavailable("kafka consumer task", e))?
    }
}

fn commit_sync(consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), BusError> {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
        Err(e) => Err(unavailable("kafka commit", e)),
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<InRecord>, BusError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let consumer = self.consumer()?.clone();
        if max == 0 {
            return Ok(Vec::new());
        }
        let handle = match self.pending.take() {
            Some(h) => h, // a cancelled poll's records come first
            None => {
                let group = self.group.clone();
                tokio::task::spawn_blocking(move || poll_blocking(&consumer, &group, max, timeout))
            }
        };
        let handle = self.pending.insert(handle);
        let joined = handle.await;
        self.pending = None;
        let (records, error) = joined.map_err(|e| unavailable("kafka poll task", e))?;
        match error {
            Some(e) if records.is_empty() => Err(e),
            Some(e) => {
                self.deferred = Some(e);
                Ok(records)
            }
            None => Ok(records),
        }
    }

    /// Pauses and resumes through librdkafka (local: no broker round trip).
    /// Pausing drops what was prefetched for a partition, and resuming
    /// fetches again from the position after the last record returned.
    async fn pause_only(&mut self, topic: &str, partitions: &[i32]) -> Result<(), BusError> {
        let (was_topic, was) = &self.paused;
        let same = was_topic == topic && was == partitions;
        if same
            && (partitions.is_empty()
                || self.paused_at.is_some_and(|t| t.elapsed() < PAUSE_REASSERT))
        {
            return Ok(());
        }
        let consumer = self.consumer()?;
        let resumed: Vec<i32> = was
            .iter()
            .filter(|p| was_topic != topic || !partitions.contains(p))
            .copied()
            .collect();
        if !resumed.is_empty() {
            consumer
                .resume(&partition_list(was_topic, &resumed))
                .map_err(|e| unavailable("kafka resume", e))?;
        }
        if !partitions.is_empty() {
            consumer
                .pause(&partition_list(topic, partitions))
                .map_err(|e| unavailable("kafka pause", e))?;
        }
        if !same {
            tracing::debug!(group = %self.group, topic, paused = ?partitions, resumed = ?resumed, "kafka fetch paused/resumed (flow control)");
        }
        self.paused = (topic.to_string(), partitions.to_vec());
        self.paused_at = Some(Instant::now());
        Ok(())
    }

    /// Stores, per partition, the offset of the highest record given
    /// (librdkafka commits it `+ 1`); never moves a partition backwards.
    /// Partitions this member no longer owns (revoked in a rebalance) are
    /// skipped: their next owner re-reads from the last commit.
    async fn commit(&mut self, records: &[InRecord]) -> Result<(), BusError> {
        let consumer = self.consumer()?.clone();
        let mut highest: HashMap<(&str, i32), i64> = HashMap::new();
        for r in records {
            let e = highest
                .entry((r.topic.as_str(), r.partition))
                .or_insert(r.offset);
            *e = (*e).max(r.offset);
        }
        let mut stored = lock(&self.stored);
        for ((topic, partition), offset) in highest {
            let k = (topic.to_string(), partition);
            if stored.get(&k).is_some_and(|&s| s >= offset) {
                continue;
            }
            match consumer.store_offset(topic, partition, offset) {
                Ok(()) => {
                    stored.insert(k, offset);
                }
                Err(KafkaError::StoreOffset(
                    code @ (RDKafkaErrorCode::State | RDKafkaErrorCode::UnknownPartition),
                )) => {
                    tracing::debug!(
                        group = %self.group, topic, partition, offset, error = %code,
                        "offset not stored: partition no longer assigned (rebalance)"
                    );
                }
                Err(e) => return Err(unavailable("kafka store offset", e)),
            }
        }
        Ok(())
    }

    /// Commits the stored offsets (waiting for the broker), leaves the group
    /// and closes the consumer, off the async workers. Records of a poll
    /// still in flight are dropped unprocessed (their offsets were never
    /// stored, so whoever consumes the partitions next gets them). Closing
    /// again is a no-op; `poll` and `commit` then return
    /// [`BusError::Closed`].
    async fn close(&mut self) -> Result<(), BusError> {
        let Some(consumer) = self.consumer.take() else {
            return Ok(());
        };
        let pending = self.pending.take();
        let group = self.group.clone();
        let t = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            if let Some(p) = pending {
                let _ = futures::executor::block_on(p);
            }
            let result = commit_sync(&consumer);
            drop(consumer); // close: revoke, final commit, LeaveGroup
            result
        })
        .await
        .map_err(|e| unavailable("kafka consumer task", e))?;
        tracing::info!(group, elapsed = ?t.elapsed(), "kafka consumer closed");
        result
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let pending = self.pending.take();
        let close = move || {
            if let Some(p) = pending {
                let _ = futures::executor::block_on(p);
            }
            drop(consumer); // last reference: revoke, commit stored offsets, leave
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(close);
            }
            _ => close(),
        }
    }
}

/// Reads `topic` from the earliest offset with a fresh consumer group until
/// every assigned partition has been read up to the end offset it had when
/// the partitions were assigned, or `timeout` passed; commits nothing. For
/// tests and the CLI. (An idle gap is no end signal: a fresh group's first
/// fetch can take seconds on a loaded broker.)
pub async fn consume_all(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<InRecord>, BusError> {
    let settings = KafkaSettings {
        client_id: "tollguard-consume-all".into(),
        ..KafkaSettings::new(bootstrap)
    };
    settings
        .validate()
        .map_err(|e| unavailable("invalid kafka settings", e))?;
    let group = format!("tollguard-consume-all-{:016x}", rand::random::<u64>());
    let mut sub = KafkaSubscription::create(&settings, &[topic], &group).await?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    // Per partition: (first retained, end) offsets; known once assigned.
    let mut ends: Option<BTreeMap<i32, (i64, i64)>> = None;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if ends.is_none() {
            let assigned = sub.assignment().await?;
            if !assigned.is_empty() {
                ends = Some(sub.watermarks(&assigned, deadline - now).await?);
            }
        }
        if let Some(ends) = &ends
            && ends
                .iter()
                .all(|(p, (low, end))| next.get(p).copied().unwrap_or(*low) >= *end)
        {
            break;
        }
        let wait = (deadline - Instant::now()).min(Duration::from_millis(200));
        for r in sub.poll(10_000, wait).await? {
            let n = next.entry(r.partition).or_insert(0);
            *n = (*n).max(r.offset + 1);
            out.push(r);
        }
    }
    sub.close().await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        kafka: KafkaSettings,
    }

    fn parse(text: &str) -> Result<KafkaSettings, String> {
        toml::from_str::<Cfg>(text)
            .map(|c| c.kafka)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let s = KafkaSettings::default();
        s.validate().unwrap();
        assert_eq!(s.compression, Compression::Lz4);
        assert_eq!(parse("").unwrap(), s);
    }

    #[test]
    fn toml_with_flattened_extra() {
        let s = parse(
            r#"
            [kafka]
            bootstrap = "k1:9092,k2:9093"
            linger_ms = 10
            compression = "none"
            [kafka.extra]
            "security.protocol" = "SASL_SSL"
            sasl.mechanism = "PLAIN"
            sasl.password = "hunter2"
            socket.keepalive.enable = true
            fetch.min.bytes = 1
            "#,
        )
        .unwrap();
        assert_eq!(s.bootstrap, "k1:9092,k2:9093");
        assert_eq!(s.linger_ms, 10);
        assert_eq!(s.compression, Compression::None);
        assert_eq!(s.extra["security.protocol"], "SASL_SSL");
        assert_eq!(s.extra["sasl.mechanism"], "PLAIN");
        assert_eq!(s.extra["socket.keepalive.enable"], "true");
        assert_eq!(s.extra["fetch.min.bytes"], "1");
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = parse("[kafka]\nbootstrapp = \"x:1\"\n").unwrap_err();
        assert!(e.contains("bootstrapp"), "{e}");
        let e = parse("[kafka]\ncompression = \"zstd\"\n").unwrap_err();
        assert!(e.contains("zstd"), "{e}");
    }

    #[test]
    fn sasl_and_tls_settings_are_checked() {
        let with = |props: &[(&str, &str)]| {
            let mut s = KafkaSettings::default();
            for (k, v) in props {
                s.extra.insert(k.to_string(), v.to_string());
            }
            s.validate().map_err(|e| (e.key, e.reason))
        };
        let ca = std::env::temp_dir().join(format!("tg-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, "x").unwrap();
        let ca = ca.display().to_string();
        with(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "tollguard-ingester-kpn"),
            ("sasl.password", "hunter2"),
            ("ssl.ca.location", &ca),
        ])
        .unwrap();
        let e = with(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
        ])
        .unwrap_err();
        assert_eq!(e.0, "kafka.extra.\"sasl.username\"", "{e:?}");
        let e = with(&[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "u"),
            ("sasl.password", "hunter2"),
        ])
        .unwrap_err();
        assert!(e.1.contains("in clear"), "{e:?}");
        assert!(!e.1.contains("hunter2"));
        let e = with(&[("security.protocol", "SASL_SSL")]).unwrap_err();
        assert!(e.0.contains("sasl.mechanism"), "{e:?}");
        let e = with(&[
            ("security.protocol", "SSL"),
            ("ssl.ca.location", "/nonexistent/ca.pem"),
        ])
        .unwrap_err();
        assert!(e.0.contains("ssl.ca.location"), "{e:?}");
        let e = with(&[("ssl.ca.location", &ca)]).unwrap_err();
        assert!(e.1.contains("does not use TLS"), "{e:?}");
        let e = with(&[("security.protocol", "TLS")]).unwrap_err();
        assert!(e.0.contains("security.protocol"), "{e:?}");
    }

    fn invalid_key(f: impl FnOnce(&mut KafkaSettings)) -> String {
        let mut s = KafkaSettings::default();
        f(&mut s);
        s.validate().unwrap_err().key
    }

    #[test]
    fn validate_names_the_key() {
        assert_eq!(
            invalid_key(|s| s.bootstrap = String::new()),
            "kafka.bootstrap"
        );
        assert_eq!(
            invalid_key(|s| s.bootstrap = "host".into()),
            "kafka.bootstrap"
        );
        assert_eq!(
            invalid_key(|s| s.bootstrap = "a:1, :2".into()),
            "kafka.bootstrap"
        );
        assert_eq!(
            invalid_key(|s| s.bootstrap = "a:99999".into()),
            "kafka.bootstrap"
        );
        assert_eq!(invalid_key(|s| s.client_id = " ".into()), "kafka.client_id");
        assert_eq!(
            invalid_key(|s| s.queue_buffering_max_messages = 0),
            "kafka.queue_buffering_max_messages"
        );
        assert_eq!(invalid_key(|s| s.linger_ms = 1_000_000), "kafka.linger_ms");
        assert_eq!(
            invalid_key(|s| s.heartbeat_interval_ms = s.session_timeout_ms),
            "kafka.heartbeat_interval_ms"
        );
        assert_eq!(
            invalid_key(|s| s.max_poll_interval_ms = 1_000),
            "kafka.max_poll_interval_ms"
        );
        assert_eq!(
            invalid_key(|s| {
                s.extra.insert("enable.idempotence".into(), "false".into());
            }),
            "kafka.extra.\"enable.idempotence\""
        );
        assert_eq!(
            invalid_key(|s| {
                s.extra.insert("linger.ms".into(), "0".into());
            }),
            "kafka.extra.\"linger.ms\""
        );
        // librdkafka vets extra names and values.
        assert_eq!(
            invalid_key(|s| {
                s.extra.insert("no.such.property".into(), "1".into());
            }),
            "kafka.extra.\"no.such.property\""
        );
        assert_eq!(
            invalid_key(|s| {
                s.extra
                    .insert("security.protocol".into(), "carrier-pigeon".into());
            }),
            "kafka.extra.\"security.protocol\""
        );
    }

    #[test]
    fn every_compression_is_built_into_librdkafka() {
        for compression in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
        ] {
            let s = KafkaSettings {
                compression,
                ..KafkaSettings::default()
            };
            s.validate().unwrap();
        }
    }

    #[test]
    fn valid_variants() {
        let mut s = KafkaSettings::new("PLAINTEXT://[::1]:9092,broker.example:19092");
        s.extra
            .insert("security.protocol".into(), "SASL_SSL".into());
        s.extra
            .insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
        s.extra.insert("sasl.username".into(), "u".into());
        s.extra.insert("sasl.password".into(), "p".into());
        s.extra
            .insert("partitioner".into(), "consistent_random".into());
        s.validate().unwrap();
    }
}
