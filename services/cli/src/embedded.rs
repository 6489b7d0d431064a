//! The embedded pipeline: the same ingest → bus → correlate → notify code as
//! the production services, in one process, over the in-process
//! [`MemoryBus`] and [`MemoryStore`]. `tollguard demo` and `tollguard
//! replay` run on it; `tollguard eval --kafka … --redis …` runs the same
//! code over a real broker and Redis ([`Backend::Real`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tollguard_core::bus::{EventBus, MemoryBus, topics};
use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::number::DialPlan;
use tollguard_core::pseudo::{Key, Pseudonymizer};
use tollguard_core::record::RawRecord;
use tollguard_core::rules::{Detector, Engine, HotList, Policies, RulesConfig};
use tollguard_core::store::{MemoryStore, WindowStore};
use tollguard_core::{ConfigError, FieldError};
use tollguard_correlator::{Topics, Worker};
use tollguard_ingester::{IngestCore, PublishError};
use tollguard_notifier::Notifier;
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings};
use tollguard_runtime::redis_store::RedisStore;

/// Dial plans by provider, with a fallback for unknown providers.
#[derive(Debug, Clone)]
pub struct Providers {
    plans: BTreeMap<String, DialPlan>,
    fallback: DialPlan,
}

impl Providers {
    /// Known plans plus a fallback home country.
    pub fn new(plans: BTreeMap<String, DialPlan>, fallback_country: &str) -> Self {
        Self {
            plans,
            fallback: DialPlan::new(fallback_country),
        }
    }

    /// The simulator's four carriers.
    pub fn simulated(fallback_country: &str) -> Self {
        let plans = tollguard_core::sim::default_carriers()
            .into_iter()
            .map(|c| (c.id, DialPlan::new(&c.home_country)))
            .collect();
        Self::new(plans, fallback_country)
    }

    fn plan(&self, provider: &str) -> DialPlan {
        self.plans
            .get(provider)
            .cloned()
            .unwrap_or_else(|| self.fallback.clone())
    }
}

/// A refused input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// Caller's position (e.g. line number).
    pub position: u64,
    /// Why.
    pub error: FieldError,
}

/// Where the pipeline's bus and window store live.
#[derive(Debug, Clone, Default)]
pub enum BackendOpts {
    /// In process (the default).
    #[default]
    Memory,
    /// A real Kafka broker and Redis server, on topics and a key prefix of
    /// this run (`tgeval.<run>.*`, `tgeval:<run>:`).
    Real {
        /// Kafka bootstrap servers.
        kafka: String,
        /// Redis URL.
        redis: String,
    },
}

#[derive(Debug)]
enum Backend {
    Memory {
        bus: MemoryBus,
        store: Arc<MemoryStore>,
    },
    Real {
        /// Records the correlator consumed so far.
        consumed: u64,
        /// Alerts it published so far.
        published: u64,
        /// Alerts the notifier received so far.
        received: u64,
    },
}

/// The embedded pipeline.
#[derive(Debug)]
pub struct Embedded {
    backend: Backend,
    dynbus: Arc<dyn EventBus>,
    topics: Topics,
    key: Key,
    refdata: Arc<ReferenceData>,
    providers: Providers,
    range_digits: usize,
    ingesters: BTreeMap<String, IngestCore>,
    worker: Worker,
    notifier: Notifier,
    /// Events accepted so far.
    pub accepted: u64,
}

/// What the embedded pipeline needs.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Rules.
    pub rules: RulesConfig,
    /// Policies file contents (TOML), if any.
    pub policies: Option<(String, String)>,
    /// The pseudonymisation key.
    pub key: Key,
    /// Dial plans.
    pub providers: Providers,
    /// Range digits.
    pub range_digits: usize,
    /// Reference data.
    pub refdata: ReferenceData,
}

impl Embedded {
    /// Builds the pipeline.
    pub async fn new(cfg: EmbeddedConfig) -> Result<Self, ConfigError> {
        Self::with_backend(cfg, &BackendOpts::Memory).await
    }

    /// Builds the pipeline over `backend`.
    pub async fn with_backend(
        cfg: EmbeddedConfig,
        backend: &BackendOpts,
    ) -> Result<Self, ConfigError> {
        let (backend, dynbus, store, topics): (_, Arc<dyn EventBus>, Arc<dyn WindowStore>, _) =
            match backend {
                BackendOpts::Memory => {
                    let bus = MemoryBus::new();
                    let store = Arc::new(MemoryStore::with_event_clock("tg:"));
                    (
                        Backend::Memory {
                            bus: bus.clone(),
                            store: store.clone(),
                        },
                        Arc::new(bus),
                        store,
                        Topics::default(),
                    )
                }
                BackendOpts::Real { kafka, redis } => {
                    let run = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
                    let topics = Topics {
                        calls: format!("tgeval.{run}.calls"),
                        alerts: format!("tgeval.{run}.alerts"),
                        dlq: format!("tgeval.{run}.dlq"),
                    };
                    let bus = KafkaBus::new(KafkaSettings::new(kafka.clone()))
                        .map_err(|e| ConfigError::new("kafka", e))?;
                    bus.ensure_topics(&[
                        (topics.calls.as_str(), 4, &[]),
                        (topics.alerts.as_str(), 2, &[]),
                        (topics.dlq.as_str(), 1, &[]),
                    ])
                    .await
                    .map_err(|e| ConfigError::new("kafka", e))?;
                    let store = RedisStore::connect(redis, &format!("tgeval:{run}:"))
                        .await
                        .map_err(|e| ConfigError::new("redis", e))?;
                    tracing::info!(
                        calls = %topics.calls,
                        alerts = %topics.alerts,
                        prefix = %format!("tgeval:{run}:"),
                        "evaluating over the real broker and Redis"
                    );
                    (
                        Backend::Real {
                            consumed: 0,
                            published: 0,
                            received: 0,
                        },
                        Arc::new(bus),
                        Arc::new(store),
                        topics,
                    )
                }
            };
        let th = cfg.rules.validate()?;
        let default_policy = tollguard_core::rules::Policy {
            daily_cap: th.daily_cap,
            hourly_cap: th.hourly_cap,
            channels: cfg.rules.concurrency.default_channels,
            ..Default::default()
        };
        let policies = match &cfg.policies {
            Some((name, text)) => Policies::parse(name, text, Some(&cfg.key), &default_policy)?,
            None => Policies::default(),
        };
        let detector = Detector::new(cfg.rules.clone(), policies, HotList::default())?;
        let engine = Engine::new(store, detector);
        let group = |g: &str| match &backend {
            Backend::Memory { .. } => g.to_string(),
            Backend::Real { .. } => format!("{}-{g}", topics.calls),
        };
        let sub = dynbus
            .subscribe(&[topics.calls.as_str()], &group("tollguard-correlator"))
            .await
            .map_err(|e| ConfigError::new("bus", e))?;
        let worker = Worker::new(engine, dynbus.clone(), sub, topics.clone(), None);
        let nsub = dynbus
            .subscribe(&[topics.alerts.as_str()], &group("tollguard-notifier"))
            .await
            .map_err(|e| ConfigError::new("bus", e))?;
        Ok(Self {
            backend,
            dynbus,
            topics,
            key: cfg.key,
            refdata: Arc::new(cfg.refdata),
            providers: cfg.providers,
            range_digits: cfg.range_digits,
            ingesters: BTreeMap::new(),
            worker,
            notifier: Notifier::new(nsub),
            accepted: 0,
        })
    }

    fn ingester(&mut self, provider: &str) -> Result<&IngestCore, ConfigError> {
        if !self.ingesters.contains_key(provider) {
            let ing = Ingestor::new(
                provider,
                self.providers.plan(provider),
                self.range_digits,
                Pseudonymizer::new(self.key.clone()),
                self.refdata.clone(),
            )?;
            let core = IngestCore::new(ing, self.dynbus.clone(), &self.topics.calls);
            self.ingesters.insert(provider.to_string(), core);
        }
        Ok(&self.ingesters[provider])
    }

    /// Ingests records as their own provider's ingester would (each record
    /// authenticated as the provider it names). `now` is the wall time used
    /// for the "not in the future" check.
    pub async fn ingest(&mut self, records: &[(u64, RawRecord)], now: i64) -> Vec<InputError> {
        let mut errors = Vec::new();
        // Runs of consecutive records of one provider, in order.
        let mut runs: Vec<(String, Vec<u64>, Vec<RawRecord>)> = Vec::new();
        for (pos, r) in records {
            let provider = r.provider_id.clone().unwrap_or_default();
            match runs.last_mut() {
                Some((p, ps, rs)) if *p == provider => {
                    ps.push(*pos);
                    rs.push(r.clone());
                }
                _ => runs.push((provider, vec![*pos], vec![r.clone()])),
            }
        }
        let mut ready = Vec::new();
        for (provider, positions, chunk) in runs {
            match self.ingester(&provider) {
                Ok(_) => ready.push((provider, positions, chunk)),
                Err(e) => errors.extend(positions.into_iter().map(|p| InputError {
                    position: p,
                    error: FieldError::invalid("provider_id", format!("{e}")),
                })),
            }
        }
        let outcomes =
            match &self.backend {
                Backend::Memory { store, .. } => {
                    let mut out = Vec::new();
                    for (provider, _, chunk) in &ready {
                        // The store's TTL clock follows event time (see
                        // MemoryStore::with_event_clock).
                        if let Some(t) = chunk.iter().map(crate::input::phase_time).max() {
                            store.advance_clock(t);
                        }
                        out.push(self.ingesters[provider].publish(chunk, now, None).await);
                    }
                    out
                }
                // Over Kafka every run is in flight at once (the producer keeps
                // each partition's order), rather than one broker round trip per
                // run of consecutive records.
                Backend::Real { .. } => {
                    futures::future::join_all(ready.iter().map(|(provider, _, chunk)| {
                        self.ingesters[provider].publish(chunk, now, None)
                    }))
                    .await
                }
            };
        for ((_, positions, _), outcome) in ready.iter().zip(outcomes) {
            match outcome {
                Ok(out) => {
                    self.accepted += out.accepted as u64;
                    for r in out.rejected {
                        errors.push(InputError {
                            position: positions[r.index as usize],
                            error: r.error,
                        });
                    }
                }
                Err(PublishError::Denied(r)) => errors.push(InputError {
                    position: positions[r.index as usize],
                    error: r.error,
                }),
                Err(PublishError::Bus(e)) => {
                    errors.extend(positions.iter().map(|p| InputError {
                        position: *p,
                        error: FieldError::invalid("record", format!("bus: {e}")),
                    }));
                }
            }
        }
        errors.sort_by_key(|e| e.position);
        errors
    }

    /// Runs the correlator and notifier until both have caught up; returns
    /// the alerts delivered by the notifier, in order.
    pub async fn drain(&mut self) -> Result<Vec<pb::Alert>, anyhow::Error> {
        if let Backend::Real { .. } = self.backend {
            return self.drain_real().await;
        }
        loop {
            let r = self.worker.step(2000, Duration::ZERO).await?;
            if r.records == 0 {
                break;
            }
        }
        let mut alerts = Vec::new();
        loop {
            let a = self.notifier.step(1000, Duration::ZERO).await?;
            if a.is_empty() {
                break;
            }
            alerts.extend(a);
        }
        if let Backend::Memory { bus, .. } = &self.backend {
            let committed = bus.committed("tollguard-correlator", topics::CALLS);
            bus.trim(topics::CALLS, committed);
            let committed = bus.committed("tollguard-notifier", topics::ALERTS);
            bus.trim(topics::ALERTS, committed);
        }
        Ok(alerts)
    }

    /// Over Kafka: steps until the correlator has consumed every accepted
    /// record and the notifier every published alert (polls wait, so an
    /// empty poll is not the end); gives up after 60 s without progress.
    async fn drain_real(&mut self) -> Result<Vec<pb::Alert>, anyhow::Error> {
        let Backend::Real {
            mut consumed,
            mut published,
            mut received,
        } = self.backend
        else {
            unreachable!("drain_real runs over the real backend only")
        };
        let wait = Duration::from_millis(200);
        let stall = 300;
        let mut idle = 0;
        while consumed < self.accepted {
            let r = self.worker.step(2000, wait).await?;
            consumed += r.records as u64;
            published += r.alerts as u64;
            idle = if r.records == 0 { idle + 1 } else { 0 };
            if idle > stall {
                anyhow::bail!(
                    "the correlator consumed {consumed} of {} records and made no progress for 60 s",
                    self.accepted
                );
            }
        }
        let mut alerts = Vec::new();
        idle = 0;
        while received < published {
            let a = self.notifier.step(1000, wait).await?;
            received += a.len() as u64;
            idle = if a.is_empty() { idle + 1 } else { 0 };
            alerts.extend(a);
            if idle > stall {
                anyhow::bail!(
                    "the notifier received {received} of {published} alerts and made no progress for 60 s"
                );
            }
        }
        self.backend = Backend::Real {
            consumed,
            published,
            received,
        };
        Ok(alerts)
    }

    /// Live keys in the window store.
    pub fn store_keys(&self) -> usize {
        match &self.backend {
            Backend::Memory { store, .. } => store.key_count(),
            Backend::Real { .. } => 0,
        }
    }
}
