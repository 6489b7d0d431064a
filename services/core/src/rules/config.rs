//! Rules configuration (`rules.toml`) and customer policies
//! (`policies.toml`), validated at load: unknown keys and bad values are
//! errors naming the key.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::model::{RiskTier, Token};
use crate::money::parse_amount;
use crate::pseudo::{Key, Kind};

/// Severity of an incident; only rises within one incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Info,
    /// Likely abuse.
    Warning,
    /// Abuse with material loss in progress.
    Critical,
}

impl Severity {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Defaults shared by all rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    /// TTL of window state and dedupe markers, seconds (≥ the longest window
    /// plus allowed lateness).
    pub state_ttl_s: u64,
    /// TTL of per-call state, seconds (longest call you expect).
    pub call_ttl_s: u64,
    /// Allowed lateness of events, seconds (clock skew and delivery delay).
    pub allowed_lateness_s: u64,
}

impl Default for General {
    fn default() -> Self {
        Self {
            state_ttl_s: 26 * 3600,
            call_ttl_s: 12 * 3600,
            allowed_lateness_s: 300,
        }
    }
}

/// `spend_cap`: rolling spend of one customer across all carriers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendCap {
    /// Rule on/off.
    pub enabled: bool,
    /// Default cap per rolling 24 h for customers without a policy, EUR.
    pub daily_cap_eur: String,
    /// Default cap per rolling hour, EUR.
    pub hourly_cap_eur: String,
    /// Fraction of a cap at which a warning is raised (0 < r < 1).
    pub warning_ratio: f64,
}

impl Default for SpendCap {
    fn default() -> Self {
        Self {
            enabled: true,
            daily_cap_eur: "2500.00".into(),
            hourly_cap_eur: "600.00".into(),
            warning_ratio: 0.6,
        }
    }
}

/// `multi_carrier_burst`: a customer's calls to high-risk ranges through two
/// or more carriers at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiCarrierBurst {
    /// Rule on/off.
    pub enabled: bool,
    /// Window, seconds.
    pub window_s: u64,
    /// Ranges at or above this tier count.
    pub min_risk_tier: RiskTier,
    /// Carriers needed.
    pub min_carriers: usize,
    /// High-risk calls in the window for a warning.
    pub warning_calls: i64,
    /// High-risk calls in the window for critical.
    pub critical_calls: i64,
    /// Or estimated high-risk spend in the window for critical, EUR.
    pub critical_spend_eur: String,
}

impl Default for MultiCarrierBurst {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 900,
            min_risk_tier: RiskTier::High,
            min_carriers: 2,
            warning_calls: 4,
            critical_calls: 6,
            critical_spend_eur: "40.00".into(),
        }
    }
}

/// `destination_convergence`: one high-risk range reached by many customers
/// through several carriers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DestinationConvergence {
    /// Rule on/off.
    pub enabled: bool,
    /// Window, seconds.
    pub window_s: u64,
    /// Ranges at or above this tier are watched.
    pub min_risk_tier: RiskTier,
    /// Carriers needed.
    pub min_carriers: usize,
    /// Distinct customers for a warning.
    pub warning_customers: i64,
    /// Distinct customers for critical.
    pub critical_customers: i64,
}

impl Default for DestinationConvergence {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 3600,
            min_risk_tier: RiskTier::High,
            min_carriers: 2,
            warning_customers: 5,
            critical_customers: 10,
        }
    }
}

/// `concurrency`: simultaneous calls of a customer across carriers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Concurrency {
    /// Rule on/off.
    pub enabled: bool,
    /// Channel count of customers without a policy.
    pub default_channels: i64,
    /// How long a call without an end event is assumed to be up after its
    /// last event, seconds.
    pub open_call_horizon_s: u64,
    /// Concurrent calls ≥ channels × this factor are critical.
    pub critical_factor: f64,
}

impl Default for Concurrency {
    fn default() -> Self {
        Self {
            enabled: true,
            default_channels: 30,
            open_call_horizon_s: 7200,
            critical_factor: 2.0,
        }
    }
}

/// `hot_number`: callee or range on the consortium hot list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotNumber {
    /// Rule on/off.
    pub enabled: bool,
    /// Severity of a hit on an exact number.
    pub number_severity: Severity,
    /// Severity of a hit on a range.
    pub range_severity: Severity,
}

impl Default for HotNumber {
    fn default() -> Self {
        Self {
            enabled: true,
            number_severity: Severity::Critical,
            range_severity: Severity::Warning,
        }
    }
}

/// Incident lifecycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Incidents {
    /// Minimum event time between two update alerts of one incident, seconds.
    pub update_interval_s: u64,
    /// Evidence must grow by this fraction to publish an update.
    pub update_growth: f64,
    /// An incident with no new evidence for this long closes; later evidence
    /// opens a new one, seconds.
    pub quiet_close_s: u64,
}

impl Default for Incidents {
    fn default() -> Self {
        Self {
            update_interval_s: 300,
            update_growth: 0.5,
            quiet_close_s: 24 * 3600,
        }
    }
}

/// The whole rules file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Shared settings.
    pub general: General,
    /// spend_cap.
    pub spend_cap: SpendCap,
    /// multi_carrier_burst.
    pub multi_carrier_burst: MultiCarrierBurst,
    /// destination_convergence.
    pub destination_convergence: DestinationConvergence,
    /// concurrency.
    pub concurrency: Concurrency,
    /// hot_number.
    pub hot_number: HotNumber,
    /// Incident lifecycle.
    pub incidents: Incidents,
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(ConfigError::new(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

fn positive_i(key: &str, v: i64) -> Result<(), ConfigError> {
    if v <= 0 {
        Err(ConfigError::new(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

fn eur(key: &str, v: &str) -> Result<i64, ConfigError> {
    parse_amount(key, v).map_err(|e| ConfigError::new(key, e.reason))
}

/// Thresholds with amounts parsed to micro-EUR.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Default daily cap, micro-EUR.
    pub daily_cap: i64,
    /// Default hourly cap, micro-EUR.
    pub hourly_cap: i64,
    /// Burst critical spend, micro-EUR.
    pub burst_critical_spend: i64,
}

impl RulesConfig {
    /// Parses and validates a rules file.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: RulesConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(file, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Validates values; returns parsed thresholds.
    pub fn validate(&self) -> Result<Thresholds, ConfigError> {
        let g = &self.general;
        positive("general.state_ttl_s", g.state_ttl_s)?;
        positive("general.call_ttl_s", g.call_ttl_s)?;
        let longest = self
            .multi_carrier_burst
            .window_s
            .max(self.destination_convergence.window_s)
            .max(24 * 3600);
        if g.state_ttl_s < longest + g.allowed_lateness_s {
            return Err(ConfigError::new(
                "general.state_ttl_s",
                format!(
                    "must be at least the longest window plus allowed lateness ({} s)",
                    longest + g.allowed_lateness_s
                ),
            ));
        }
        let s = &self.spend_cap;
        let daily_cap = eur("spend_cap.daily_cap_eur", &s.daily_cap_eur)?;
        let hourly_cap = eur("spend_cap.hourly_cap_eur", &s.hourly_cap_eur)?;
        positive_i("spend_cap.daily_cap_eur", daily_cap)?;
        positive_i("spend_cap.hourly_cap_eur", hourly_cap)?;
        if !(s.warning_ratio > 0.0 && s.warning_ratio < 1.0) {
            return Err(ConfigError::new(
                "spend_cap.warning_ratio",
                "must be between 0 and 1 (exclusive)",
            ));
        }
        let b = &self.multi_carrier_burst;
        positive("multi_carrier_burst.window_s", b.window_s)?;
        positive_i("multi_carrier_burst.warning_calls", b.warning_calls)?;
        if b.min_carriers < 2 {
            return Err(ConfigError::new(
                "multi_carrier_burst.min_carriers",
                "must be at least 2 (the rule is about several carriers)",
            ));
        }
        if b.critical_calls < b.warning_calls {
            return Err(ConfigError::new(
                "multi_carrier_burst.critical_calls",
                "must be >= warning_calls",
            ));
        }
        let burst_critical_spend = eur(
            "multi_carrier_burst.critical_spend_eur",
            &b.critical_spend_eur,
        )?;
        let d = &self.destination_convergence;
        positive("destination_convergence.window_s", d.window_s)?;
        positive_i(
            "destination_convergence.warning_customers",
            d.warning_customers,
        )?;
        if d.min_carriers < 1 {
            return Err(ConfigError::new(
                "destination_convergence.min_carriers",
                "must be at least 1",
            ));
        }
        if d.critical_customers < d.warning_customers {
            return Err(ConfigError::new(
                "destination_convergence.critical_customers",
                "must be >= warning_customers",
            ));
        }
        let c = &self.concurrency;
        positive_i("concurrency.default_channels", c.default_channels)?;
        positive("concurrency.open_call_horizon_s", c.open_call_horizon_s)?;
        if !(c.critical_factor >= 1.0 && c.critical_factor.is_finite()) {
            return Err(ConfigError::new(
                "concurrency.critical_factor",
                "must be a number >= 1",
            ));
        }
        let i = &self.incidents;
        if !(i.update_growth >= 0.0 && i.update_growth.is_finite()) {
            return Err(ConfigError::new("incidents.update_growth", "must be >= 0"));
        }
        positive("incidents.quiet_close_s", i.quiet_close_s)?;
        Ok(Thresholds {
            daily_cap,
            hourly_cap,
            burst_critical_spend,
        })
    }
}

/// One customer's policy as written in `policies.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// Consortium customer id (pseudonymised with the consortium key at
    /// load), e.g. "kvk:30123456".
    pub customer_id: Option<String>,
    /// Or the customer token directly (`keyid:hex`, from `tollguard
    /// pseudonymize customer …`).
    pub customer_token: Option<String>,
    /// Cap per rolling 24 h, EUR.
    pub daily_cap_eur: Option<String>,
    /// Cap per rolling hour, EUR.
    pub hourly_cap_eur: Option<String>,
    /// Channel count (simultaneous calls).
    pub channels: Option<i64>,
    /// Free-text label shown to operators (never sent to other carriers).
    pub label: Option<String>,
}

/// `policies.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Entries.
    #[serde(default)]
    pub policy: Vec<PolicyEntry>,
}

/// A resolved policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Cap per 24 h, micro-EUR.
    pub daily_cap: i64,
    /// Cap per hour, micro-EUR.
    pub hourly_cap: i64,
    /// Channel count.
    pub channels: i64,
}

/// Policies by customer token (`keyid:hex`).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    by_token: HashMap<String, Policy>,
}

impl Policies {
    /// Parses `policies.toml`; ids are pseudonymised with `key`.
    pub fn parse(
        file: &str,
        text: &str,
        key: Option<&Key>,
        defaults: &Policy,
    ) -> Result<Self, ConfigError> {
        let f: PolicyFile = toml::from_str(text).map_err(|e| ConfigError::from_toml(file, &e))?;
        Self::resolve(&f, key, defaults)
    }

    /// Resolves parsed entries.
    pub fn resolve(
        f: &PolicyFile,
        key: Option<&Key>,
        defaults: &Policy,
    ) -> Result<Self, ConfigError> {
        let mut by_token = HashMap::new();
        for (i, p) in f.policy.iter().enumerate() {
            let k = |f: &str| format!("policy[{i}].{f}");
            let token = match (&p.customer_id, &p.customer_token, key) {
                (Some(id), None, Some(key)) => key.token(Kind::Customer, id).compact(),
                (Some(_), None, None) => {
                    return Err(ConfigError::new(
                        k("customer_id"),
                        "needs the pseudonymisation key to resolve; configure it or use customer_token",
                    ));
                }
                (None, Some(t), _) => {
                    if !t.contains(':') {
                        return Err(ConfigError::new(k("customer_token"), "must be keyid:hex"));
                    }
                    t.clone()
                }
                (Some(_), Some(_), _) => {
                    return Err(ConfigError::new(
                        k("customer_id"),
                        "give either customer_id or customer_token, not both",
                    ));
                }
                (None, None, _) => {
                    return Err(ConfigError::new(
                        k("customer_id"),
                        "is required (or customer_token)",
                    ));
                }
            };
            let daily_cap = match &p.daily_cap_eur {
                Some(v) => eur(&k("daily_cap_eur"), v)?,
                None => defaults.daily_cap,
            };
            let hourly_cap = match &p.hourly_cap_eur {
                Some(v) => eur(&k("hourly_cap_eur"), v)?,
                None => defaults.hourly_cap,
            };
            positive_i(&k("daily_cap_eur"), daily_cap)?;
            positive_i(&k("hourly_cap_eur"), hourly_cap)?;
            let channels = p.channels.unwrap_or(defaults.channels);
            positive_i(&k("channels"), channels)?;
            let policy = Policy {
                daily_cap,
                hourly_cap,
                channels,
            };
            if let Some(prev) = by_token.insert(token, policy.clone())
                && prev != policy
            {
                return Err(ConfigError::new(
                    k("customer_id"),
                    "contradicts an earlier entry for the same customer",
                ));
            }
        }
        Ok(Self { by_token })
    }

    /// The policy of a customer token.
    pub fn get(&self, token: &Token) -> Option<&Policy> {
        self.by_token.get(&token.compact())
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        RulesConfig::default().validate().unwrap();
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = RulesConfig::parse("rules.toml", "[spend_cap]\ndaily_cap = 3\n").unwrap_err();
        assert!(e.key.contains("daily_cap"), "{e}");
        let e = RulesConfig::parse("rules.toml", "[spend_cap]\nwarning_ratio = 1.5\n").unwrap_err();
        assert_eq!(e.key, "spend_cap.warning_ratio");
        let e =
            RulesConfig::parse("rules.toml", "[spend_cap]\ndaily_cap_eur = \"-5\"\n").unwrap_err();
        assert_eq!(e.key, "spend_cap.daily_cap_eur");
        let e = RulesConfig::parse("rules.toml", "[multi_carrier_burst]\nmin_carriers = 1\n")
            .unwrap_err();
        assert_eq!(e.key, "multi_carrier_burst.min_carriers");
    }

    #[test]
    fn policies_name_the_entry() {
        let d = Policy {
            daily_cap: 1,
            hourly_cap: 1,
            channels: 1,
        };
        let key = Key::new("k1", &[1u8; 32]).unwrap();
        let text = "[[policy]]\ncustomer_id = \"kvk:1\"\nchannels = 4\n[[policy]]\ncustomer_id = \"kvk:2\"\nchannels = 0\n";
        let e = Policies::parse("p.toml", text, Some(&key), &d).unwrap_err();
        assert_eq!(e.key, "policy[1].channels");
        let text = "[[policy]]\ncustomer_id = \"kvk:1\"\nchannels = 4\n[[policy]]\ncustomer_id = \"kvk:1\"\nchannels = 5\n";
        let e = Policies::parse("p.toml", text, Some(&key), &d).unwrap_err();
        assert_eq!(e.key, "policy[1].customer_id");
        let ok = Policies::parse(
            "p.toml",
            "[[policy]]\ncustomer_id = \"kvk:1\"\n",
            Some(&key),
            &d,
        )
        .unwrap();
        assert_eq!(
            ok.get(&key.token(Kind::Customer, "kvk:1"))
                .unwrap()
                .channels,
            1
        );
    }
}
