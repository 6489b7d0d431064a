//! The embedded pipeline: the same ingest → bus → correlate → notify code as
//! the production services, in one process, over the in-process
//! [`MemoryBus`] and [`MemoryStore`]. `tollguard demo` and `tollguard
//! replay` run on it.

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

/// The embedded pipeline.
#[derive(Debug)]
pub struct Embedded {
    bus: MemoryBus,
    store: Arc<MemoryStore>,
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
        let bus = MemoryBus::new();
        let store = Arc::new(MemoryStore::with_event_clock("tg:"));
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
        let engine = Engine::new(store.clone() as Arc<dyn WindowStore>, detector);
        let dynbus: Arc<dyn EventBus> = Arc::new(bus.clone());
        let sub = dynbus
            .subscribe(&[topics::CALLS], "tollguard-correlator")
            .await
            .map_err(|e| ConfigError::new("bus", e))?;
        let worker = Worker::new(engine, dynbus.clone(), sub, Topics::default(), None);
        let nsub = dynbus
            .subscribe(&[topics::ALERTS], "tollguard-notifier")
            .await
            .map_err(|e| ConfigError::new("bus", e))?;
        Ok(Self {
            bus,
            store,
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
            let core = IngestCore::new(ing, Arc::new(self.bus.clone()), topics::CALLS);
            self.ingesters.insert(provider.to_string(), core);
        }
        Ok(&self.ingesters[provider])
    }

    /// Ingests records as their own provider's ingester would (each record
    /// authenticated as the provider it names). `now` is the wall time used
    /// for the "not in the future" check.
    pub async fn ingest(&mut self, records: &[(u64, RawRecord)], now: i64) -> Vec<InputError> {
        let mut errors = Vec::new();
        // Group consecutive records by provider, preserving order.
        let mut i = 0;
        while i < records.len() {
            let provider = records[i].1.provider_id.clone().unwrap_or_default();
            let mut j = i;
            while j < records.len() && records[j].1.provider_id.as_deref().unwrap_or("") == provider
            {
                j += 1;
            }
            let chunk: Vec<RawRecord> = records[i..j].iter().map(|(_, r)| r.clone()).collect();
            // The store's TTL clock follows event time (see MemoryStore::with_event_clock).
            if let Some(t) = chunk.iter().map(crate::input::phase_time).max() {
                self.store.advance_clock(t);
            }
            let positions: Vec<u64> = records[i..j].iter().map(|(p, _)| *p).collect();
            match self.ingester(&provider) {
                Err(e) => {
                    for p in positions {
                        errors.push(InputError {
                            position: p,
                            error: FieldError::invalid("provider_id", format!("{e}")),
                        });
                    }
                }
                Ok(core) => match core.publish(&chunk, now, None).await {
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
                        for p in positions {
                            errors.push(InputError {
                                position: p,
                                error: FieldError::invalid("record", format!("bus: {e}")),
                            });
                        }
                    }
                },
            }
            i = j;
        }
        errors
    }

    /// Runs the correlator and notifier until both have caught up; returns
    /// the alerts delivered by the notifier, in order.
    pub async fn drain(&mut self) -> Result<Vec<pb::Alert>, anyhow::Error> {
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
        let committed = self.bus.committed("tollguard-correlator", topics::CALLS);
        self.bus.trim(topics::CALLS, committed);
        let committed = self.bus.committed("tollguard-notifier", topics::ALERTS);
        self.bus.trim(topics::ALERTS, committed);
        Ok(alerts)
    }

    /// Live keys in the window store.
    pub fn store_keys(&self) -> usize {
        self.store.key_count()
    }
}
