//! Correlator configuration (`correlator.toml` + `TOLLGUARD__…` overrides).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tollguard_core::ConfigError;
use tollguard_runtime::kafka::KafkaSettings;

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// HTTP address of /livez, /readyz, /metrics.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
}

fn default_http() -> SocketAddr {
    "127.0.0.1:9102".parse().expect("static")
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: default_http(),
        }
    }
}

/// Redis window store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/` (or `rediss://` for TLS).
    #[serde(default = "default_redis")]
    pub url: String,
    /// Prefix of every key.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Redis Cluster seed nodes (`redis://host:port/` each). When set, the
    /// window store runs on the cluster and `url` is not used.
    #[serde(default)]
    pub cluster_nodes: Vec<String>,
    /// `[redis.tls]`: CA and client certificate for `rediss://` (SECURITY.md).
    #[serde(default)]
    pub tls: tollguard_runtime::redis_tls::RedisTls,
}

impl RedisConfig {
    /// Loads `[redis.tls]` for the URLs in use (`cluster_nodes`, else
    /// `url`); `None` without TLS files. Errors name the key.
    pub fn load_tls(
        &self,
    ) -> Result<Option<tollguard_runtime::redis_tls::RedisTlsCerts>, ConfigError> {
        let urls: Vec<(String, &str)> = if self.cluster_nodes.is_empty() {
            vec![("redis.url".into(), self.url.as_str())]
        } else {
            (self.cluster_nodes.iter().enumerate())
                .map(|(i, n)| (format!("redis.cluster_nodes[{i}]"), n.as_str()))
                .collect()
        };
        self.tls.load("redis.tls", &urls)
    }
}

fn default_redis() -> String {
    "redis://127.0.0.1:6379/".into()
}
fn default_prefix() -> String {
    "tg:".into()
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: default_redis(),
            key_prefix: default_prefix(),
            cluster_nodes: Vec::new(),
            tls: Default::default(),
        }
    }
}

/// Topic names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicNames {
    /// Input.
    pub calls: String,
    /// Output.
    pub alerts: String,
    /// Dead letters.
    pub dlq: String,
}

impl Default for TopicNames {
    fn default() -> Self {
        let t = crate::Topics::default();
        Self {
            calls: t.calls,
            alerts: t.alerts,
            dlq: t.dlq,
        }
    }
}

/// Optional key, to resolve policies written with customer ids.
pub use tollguard_runtime::config::KeyConfig;

/// The whole correlator config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelatorConfig {
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Kafka.
    #[serde(default)]
    pub kafka: KafkaSettings,
    /// Redis.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Topics.
    #[serde(default)]
    pub topics: TopicNames,
    /// Consumer group.
    #[serde(default = "default_group")]
    pub group: String,
    /// Rules file; shipped defaults when absent.
    #[serde(default)]
    pub rules_file: Option<PathBuf>,
    /// Policies file.
    #[serde(default)]
    pub policies_file: Option<PathBuf>,
    /// Pseudonymisation key (only to resolve policies by customer id).
    #[serde(default)]
    pub pseudonymization: KeyConfig,
    /// Records per batch.
    #[serde(default = "default_batch")]
    pub batch_max: usize,
    /// Poll timeout, milliseconds.
    #[serde(default = "default_poll")]
    pub poll_timeout_ms: u64,
    /// How often the hot list is re-read from the store, seconds.
    #[serde(default = "default_hot")]
    pub hot_list_refresh_s: u64,
    /// The consortium's carriers: window state is not pruned until each has
    /// been seen, so a carrier that starts late (a backfill) still joins the
    /// others. Empty: prune by the carriers seen so far.
    #[serde(default)]
    pub expected_providers: Vec<String>,
    /// `[alignment]`: event-time alignment of the carriers' feeds.
    #[serde(default)]
    pub alignment: AlignmentConfig,
}

/// `[alignment]`: historical events (replays, backfills) are held until
/// every active carrier's feed has reached their event time, then
/// processed in event-time order (see `tollguard_correlator::align`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlignmentConfig {
    /// On: align. Off (the default): events are processed as polled, each
    /// batch in event time. Meant for one correlator: with several
    /// replicas each aligns only its own partitions (see ARCHITECTURE).
    pub enabled: bool,
    /// Events newer than this behind the wall clock are live: never held.
    pub live_window_s: u64,
    /// A carrier not heard from for this long stops holding the others.
    pub idle_ms: u64,
    /// The longest an event is held.
    pub max_hold_s: u64,
    /// The most events held at once (the earliest go first beyond it).
    pub max_events: usize,
}

impl Default for AlignmentConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            live_window_s: 60,
            idle_ms: 5000,
            max_hold_s: 600,
            max_events: 200_000,
        }
    }
}

impl AlignmentConfig {
    /// The worker's bounds, or `None` when disabled.
    pub fn bounds(&self) -> Option<crate::align::Alignment> {
        self.enabled.then(|| crate::align::Alignment {
            live_window_ms: self.live_window_s as i64 * 1000,
            idle_ms: self.idle_ms as i64,
            max_hold_ms: self.max_hold_s as i64 * 1000,
            max_events: self.max_events,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let a = self;
        for (key, ok, why) in [
            (
                "alignment.live_window_s",
                (1..=86_400).contains(&a.live_window_s),
                "must be between 1 and 86400",
            ),
            (
                "alignment.idle_ms",
                (1..=600_000).contains(&a.idle_ms),
                "must be between 1 and 600000",
            ),
            (
                "alignment.max_hold_s",
                (1..=86_400).contains(&a.max_hold_s),
                "must be between 1 and 86400",
            ),
            (
                "alignment.max_events",
                (1..=10_000_000).contains(&a.max_events),
                "must be between 1 and 10000000",
            ),
        ] {
            if !ok {
                return Err(ConfigError::new(key, why));
            }
        }
        Ok(())
    }
}

fn default_group() -> String {
    "tollguard-correlator".into()
}
fn default_batch() -> usize {
    2000
}
fn default_poll() -> u64 {
    100
}
fn default_hot() -> u64 {
    10
}

impl CorrelatorConfig {
    /// Validates what can be checked without I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if !(self.redis.url.starts_with("redis://")
            || self.redis.url.starts_with("rediss://")
            || self.redis.url.starts_with("redis+unix://"))
        {
            return Err(ConfigError::new(
                "redis.url",
                "must start with redis://, rediss:// or redis+unix://",
            ));
        }
        for (i, node) in self.redis.cluster_nodes.iter().enumerate() {
            if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                return Err(ConfigError::new(
                    format!("redis.cluster_nodes[{i}]"),
                    "must start with redis:// or rediss://",
                ));
            }
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                "redis.key_prefix",
                "must be non-empty and contain no braces",
            ));
        }
        if self.group.is_empty() {
            return Err(ConfigError::new("group", "must not be empty"));
        }
        if !(1..=100_000).contains(&self.batch_max) {
            return Err(ConfigError::new(
                "batch_max",
                "must be between 1 and 100000",
            ));
        }
        if self.poll_timeout_ms == 0 || self.poll_timeout_ms > 10_000 {
            return Err(ConfigError::new(
                "poll_timeout_ms",
                "must be between 1 and 10000",
            ));
        }
        for (i, p) in self.expected_providers.iter().enumerate() {
            tollguard_core::ingest::validate_provider_id(&format!("expected_providers[{i}]"), p)?;
        }
        if self.hot_list_refresh_s == 0 {
            return Err(ConfigError::new(
                "hot_list_refresh_s",
                "must be greater than 0",
            ));
        }
        self.alignment.validate()?;
        for (k, v) in [
            ("topics.calls", &self.topics.calls),
            ("topics.alerts", &self.topics.alerts),
            ("topics.dlq", &self.topics.dlq),
        ] {
            if v.is_empty() {
                return Err(ConfigError::new(k, "must not be empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<CorrelatorConfig, ConfigError> {
        let cfg: CorrelatorConfig = tollguard_runtime::config::load_with_env(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn cluster_nodes_come_from_an_array_override_and_must_be_redis_urls() {
        let cfg = with(&[(
            "TOLLGUARD__REDIS__CLUSTER_NODES",
            r#"["redis://127.0.0.1:7001/","redis://127.0.0.1:7002/"]"#,
        )])
        .unwrap();
        assert_eq!(cfg.redis.cluster_nodes.len(), 2);
        assert!(with(&[]).unwrap().redis.cluster_nodes.is_empty());
        let e = with(&[(
            "TOLLGUARD__REDIS__CLUSTER_NODES",
            r#"["redis://127.0.0.1:7001/","127.0.0.1:7002"]"#,
        )])
        .unwrap_err();
        assert_eq!(e.key, "redis.cluster_nodes[1]");
        assert!(e.reason.contains("redis://"), "{}", e.reason);
    }

    #[test]
    fn alignment_is_opt_in_and_bad_bounds_name_the_key() {
        assert!(
            with(&[]).unwrap().alignment.bounds().is_none(),
            "off by default"
        );
        let cfg = with(&[("TOLLGUARD__ALIGNMENT__ENABLED", "true")]).unwrap();
        let a = cfg.alignment.bounds().expect("enabled");
        assert_eq!(
            (a.live_window_ms, a.idle_ms, a.max_hold_ms, a.max_events),
            (60_000, 5_000, 600_000, 200_000)
        );
        for (var, key) in [
            (
                "TOLLGUARD__ALIGNMENT__LIVE_WINDOW_S",
                "alignment.live_window_s",
            ),
            ("TOLLGUARD__ALIGNMENT__IDLE_MS", "alignment.idle_ms"),
            ("TOLLGUARD__ALIGNMENT__MAX_HOLD_S", "alignment.max_hold_s"),
            ("TOLLGUARD__ALIGNMENT__MAX_EVENTS", "alignment.max_events"),
        ] {
            let e = with(&[(var, "0")]).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.reason.contains("between"), "{}", e.reason);
        }
    }
}
