//! Ingester configuration (`ingester.toml` + `TOLLGUARD__…` overrides).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tollguard_core::ConfigError;
use tollguard_core::ingest::validate_provider_id;
use tollguard_core::number::DialPlan;
use tollguard_core::record::CsvMapping;
use tollguard_runtime::kafka::KafkaSettings;
use tollguard_runtime::tls::TlsSettings;

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// gRPC address.
    #[serde(default = "default_grpc")]
    pub grpc: SocketAddr,
    /// HTTP address of /livez, /readyz, /metrics.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
}

fn default_grpc() -> SocketAddr {
    "127.0.0.1:50051".parse().expect("static")
}
fn default_http() -> SocketAddr {
    "127.0.0.1:9101".parse().expect("static")
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            grpc: default_grpc(),
            http: default_http(),
        }
    }
}

/// The consortium pseudonymisation key.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PseudonymizationConfig {
    /// Key id carried in every token.
    #[serde(default)]
    pub key_id: String,
    /// File holding the key (hex or text, ≥ 32 bytes). Preferred.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The key itself (e.g. from `TOLLGUARD__PSEUDONYMIZATION__KEY`); never
    /// logged.
    #[serde(default)]
    pub key: Option<String>,
    /// National digits kept in the clear range prefix.
    #[serde(default = "default_range_digits")]
    pub range_digits: usize,
    /// Key rotation: id of the next key.
    #[serde(default)]
    pub next_key_id: Option<String>,
    /// Key rotation: file holding the next key.
    #[serde(default)]
    pub next_key_file: Option<PathBuf>,
    /// Key rotation: the next key itself (e.g. from
    /// `TOLLGUARD__PSEUDONYMIZATION__NEXT_KEY`); never logged.
    #[serde(default)]
    pub next_key: Option<String>,
    /// Key rotation: RFC 3339 **event time** from which events are
    /// pseudonymised with the next key (the same at every ingester).
    #[serde(default)]
    pub rotate_at: Option<String>,
}

impl PseudonymizationConfig {
    /// The rotation instant (Unix ms), if a rotation is configured;
    /// validates the rotation keys.
    pub fn rotation(&self) -> Result<Option<i64>, ConfigError> {
        let any = self.next_key_id.is_some()
            || self.next_key_file.is_some()
            || self.next_key.is_some()
            || self.rotate_at.is_some();
        if !any {
            return Ok(None);
        }
        let id = self.next_key_id.as_deref().unwrap_or_default();
        if id.is_empty() {
            return Err(ConfigError::new(
                "pseudonymization.next_key_id",
                "is required with a key rotation (next_key_file/next_key, rotate_at)",
            ));
        }
        if id == self.key_id {
            return Err(ConfigError::new(
                "pseudonymization.next_key_id",
                "must differ from key_id (a new key gets a new id)",
            ));
        }
        match (&self.next_key_file, &self.next_key) {
            (None, None) => {
                return Err(ConfigError::new(
                    "pseudonymization.next_key_file",
                    "is required with next_key_id (or next_key)",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "pseudonymization.next_key",
                    "give either next_key_file or next_key, not both",
                ));
            }
            _ => {}
        }
        let at = self.rotate_at.as_deref().ok_or_else(|| {
            ConfigError::new(
                "pseudonymization.rotate_at",
                "is required with next_key_id: the RFC 3339 event time from which the next key applies",
            )
        })?;
        chrono::DateTime::parse_from_rfc3339(at.trim())
            .map(|t| Some(t.timestamp_millis()))
            .map_err(|e| {
                ConfigError::new(
                    "pseudonymization.rotate_at",
                    format!("{at:?} is not an RFC 3339 time: {e}"),
                )
            })
    }
}

fn default_range_digits() -> usize {
    2
}

/// Limits of the API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Records per batch.
    pub max_batch_records: usize,
    /// Bytes per gRPC message.
    pub max_message_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Sustained records per second per carrier (token bucket rate);
    /// beyond it batches are answered `RESOURCE_EXHAUSTED` with
    /// `retry-after-ms`.
    pub records_per_second: f64,
    /// Records a carrier may send at once above the rate (bucket size);
    /// at least `max_batch_records`.
    pub burst_records: u32,
    /// Open `Publish` streams per carrier.
    pub max_streams_per_carrier: usize,
    /// Deadline of every call (a client's shorter `grpc-timeout` wins),
    /// milliseconds.
    pub request_timeout_ms: u64,
    /// A `Publish` stream that sends no batch for this long is closed with
    /// `DEADLINE_EXCEEDED`, milliseconds.
    pub stream_idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch_records: 5000,
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 64,
            records_per_second: 20_000.0,
            burst_records: 50_000,
            max_streams_per_carrier: 16,
            request_timeout_ms: 30_000,
            stream_idle_timeout_ms: 300_000,
        }
    }
}

/// Reference data overrides.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Range-risk CSV replacing the shipped table.
    pub risk_table: Option<PathBuf>,
    /// Rate deck CSV replacing the shipped deck.
    pub rate_deck: Option<PathBuf>,
}

/// The whole ingester config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngesterConfig {
    /// The carrier this ingester serves.
    pub provider_id: String,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Numbering plan of the carrier.
    pub dial_plan: DialPlan,
    /// CSV mapping of the carrier's exports (used by `tollguard send`).
    #[serde(default)]
    pub csv: Option<CsvMapping>,
    /// Pseudonymisation.
    #[serde(default)]
    pub pseudonymization: PseudonymizationConfig,
    /// Kafka.
    #[serde(default)]
    pub kafka: KafkaSettings,
    /// Topic to publish to.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Reference data.
    #[serde(default)]
    pub reference: Reference,
    /// Mutual TLS of the gRPC endpoint (required unless `enabled = false`);
    /// `tls.clients` maps client certificate identities to this carrier.
    #[serde(default)]
    pub tls: TlsSettings,
}

fn default_topic() -> String {
    tollguard_core::bus::topics::CALLS.to_string()
}

impl IngesterConfig {
    /// Validates everything that can be checked without I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_provider_id("provider_id", &self.provider_id)?;
        self.dial_plan.validate("dial_plan")?;
        if let Some(c) = &self.csv {
            c.validate("csv")?;
        }
        if self.pseudonymization.key_id.is_empty() {
            return Err(ConfigError::new(
                "pseudonymization.key_id",
                "is required (the consortium key id, e.g. \"k2026a\")",
            ));
        }
        match (&self.pseudonymization.key_file, &self.pseudonymization.key) {
            (None, None) => {
                return Err(ConfigError::new(
                    "pseudonymization.key_file",
                    "is required (or pseudonymization.key via TOLLGUARD__PSEUDONYMIZATION__KEY)",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "pseudonymization.key",
                    "give either key_file or key, not both",
                ));
            }
            _ => {}
        }
        self.pseudonymization.rotation()?;
        if !(1..=6).contains(&self.pseudonymization.range_digits) {
            return Err(ConfigError::new(
                "pseudonymization.range_digits",
                "must be between 1 and 6",
            ));
        }
        if self.limits.max_batch_records == 0 || self.limits.max_batch_records > 100_000 {
            return Err(ConfigError::new(
                "limits.max_batch_records",
                "must be between 1 and 100000",
            ));
        }
        if self.limits.max_message_bytes < 1024 {
            return Err(ConfigError::new(
                "limits.max_message_bytes",
                "must be at least 1024",
            ));
        }
        let l = &self.limits;
        if !(l.records_per_second.is_finite()
            && l.records_per_second >= 1.0
            && l.records_per_second <= 10_000_000.0)
        {
            return Err(ConfigError::new(
                "limits.records_per_second",
                "must be a number between 1 and 10000000",
            ));
        }
        if (l.burst_records as usize) < l.max_batch_records || l.burst_records > 100_000_000 {
            return Err(ConfigError::new(
                "limits.burst_records",
                format!(
                    "must be at least limits.max_batch_records ({}) so a full batch can ever pass, and at most 100000000",
                    l.max_batch_records
                ),
            ));
        }
        if !(1..=10_000).contains(&l.max_streams_per_carrier) {
            return Err(ConfigError::new(
                "limits.max_streams_per_carrier",
                "must be between 1 and 10000",
            ));
        }
        if !(100..=600_000).contains(&l.request_timeout_ms) {
            return Err(ConfigError::new(
                "limits.request_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(100..=86_400_000).contains(&l.stream_idle_timeout_ms) {
            return Err(ConfigError::new(
                "limits.stream_idle_timeout_ms",
                "must be between 100 and 86400000",
            ));
        }
        if self.topic.is_empty() {
            return Err(ConfigError::new("topic", "must not be empty"));
        }
        let me = self.provider_id.clone();
        self.tls.validate(|p| {
            if p == me {
                Ok(())
            } else {
                Err(format!(
                    "this ingester serves carrier {me:?}; map only that carrier's certificates to it"
                ))
            }
        })?;
        self.kafka.validate()?;
        Ok(())
    }
}
