//! From a partner record to a [`CallEvent`]: validation, normalisation,
//! classification, charge estimation and pseudonymisation. Pure; the
//! ingester service and the embedded pipeline both call [`Ingestor::ingest`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{ConfigError, FieldError};
use crate::model::{CallEvent, Direction, Millis, NumberInfo};
use crate::number::{DialPlan, Normalized, Normalizer, classify};
use crate::pseudo::{Kind, Pseudonymizer};
use crate::record::{Limits, RawRecord, validate};
use crate::tables::{FxTable, RateDeck, RiskTable};

/// Reference data shared by every ingester: risk table, rate deck, FX.
#[derive(Debug, Clone)]
pub struct ReferenceData {
    /// Range-risk table.
    pub risk: RiskTable,
    /// Rate deck.
    pub rates: RateDeck,
    /// Currency conversion.
    pub fx: FxTable,
}

impl Default for ReferenceData {
    fn default() -> Self {
        Self {
            risk: RiskTable::default_table(),
            rates: RateDeck::default_deck(),
            fx: FxTable::default(),
        }
    }
}

/// Entries kept in the classification cache before it is cleared.
const CLASSIFY_CACHE: usize = 200_000;

/// One carrier's ingest pipeline.
#[derive(Debug, Clone)]
pub struct Ingestor {
    provider_id: String,
    normalizer: Normalizer,
    pseudo: Pseudonymizer,
    refdata: Arc<ReferenceData>,
    limits: Limits,
    range_digits: usize,
    /// libphonenumber classification is the costliest step of ingest and
    /// numbers repeat a lot (the same lines, the same destinations).
    cache: Arc<Mutex<HashMap<String, NumberInfo>>>,
}

impl Ingestor {
    /// Builds the ingest pipeline of `provider_id`.
    pub fn new(
        provider_id: &str,
        plan: DialPlan,
        range_digits: usize,
        pseudo: Pseudonymizer,
        refdata: Arc<ReferenceData>,
    ) -> Result<Self, ConfigError> {
        validate_provider_id("provider_id", provider_id)?;
        Ok(Self {
            provider_id: provider_id.to_string(),
            normalizer: Normalizer::new(plan, range_digits)?,
            pseudo,
            refdata,
            limits: Limits::default(),
            range_digits,
            cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn normalize(&self, field: &str, raw: &str) -> Result<Normalized, crate::FieldError> {
        let e164 = self.normalizer.to_e164(field, raw)?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let info = match cache.get(&e164) {
            Some(i) => i.clone(),
            None => {
                let i = classify(&e164, self.range_digits, &self.refdata.risk);
                if cache.len() >= CLASSIFY_CACHE {
                    cache.clear();
                }
                cache.insert(e164.clone(), i.clone());
                i
            }
        };
        Ok(Normalized { e164, info })
    }

    /// The carrier this ingestor serves.
    pub fn provider_id(&self) -> &str {
        &self.provider_id
    }

    /// Validates, normalises and pseudonymises one record received at wall
    /// time `now`.
    pub fn ingest(&self, raw: &RawRecord, now: Millis) -> Result<CallEvent, FieldError> {
        let fx = &self.refdata.fx;
        let v = validate(raw, &self.provider_id, now, &self.limits, |c| fx.knows(c))?;
        let caller = self.normalize("caller", &v.caller)?;
        let callee = self.normalize("callee", &v.callee)?;
        let (remote, _) = match v.direction {
            Direction::Outbound => (&callee, &caller),
            Direction::Inbound => (&caller, &callee),
        };
        let estimated_charge = match (&v.charge, v.direction) {
            (Some((cur, amount)), _) => fx.to_eur(cur, *amount).unwrap_or(0),
            // The customer pays for outbound calls only.
            (None, Direction::Outbound) => {
                let billable = match v.answer_time {
                    // Time before answer is not billed.
                    Some(a) => (v.duration_s - (a - v.start_time) as f64 / 1000.0).max(0.0),
                    None => v.duration_s,
                };
                self.refdata.rates.estimate(&remote.e164, billable)
            }
            (None, Direction::Inbound) => 0,
        };
        let (block, offset) = callee.block();
        // The key of the event's time (key rotation is by event time).
        let p = self.pseudo.key_at(v.start_time);
        Ok(CallEvent {
            provider_id: v.provider_id,
            event_id: v.event_id,
            call_id: v.call_id,
            phase: v.phase,
            customer: v.customer_id.as_deref().map(|c| p.token(Kind::Customer, c)),
            line: p.token(Kind::Line, &format!("{}/{}", self.provider_id, v.line_id)),
            caller: p.token(Kind::Number, &caller.e164),
            callee: p.token(Kind::Number, &callee.e164),
            callee_block: p.token(Kind::Block, block),
            callee_block_offset: offset,
            callee_info: callee.info,
            caller_info: caller.info,
            direction: v.direction,
            start_time: v.start_time,
            answer_time: v.answer_time,
            duration_s: v.duration_s,
            disposition: v.disposition,
            source_ip: v.source_ip.map(|ip| p.token(Kind::Ip, &ip.to_string())),
            charge: v.charge,
            estimated_charge,
            ingested_at: now,
        })
    }
}

/// Checks a carrier id: 1-64 characters of `[a-z0-9._-]`.
pub fn validate_provider_id(key: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(ConfigError::new(
            key,
            format!("`{id}` must be 1-64 characters of [a-z0-9._-]"),
        ));
    }
    Ok(())
}
