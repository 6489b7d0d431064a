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
    /// TTL of window state, seconds (≥ the longest window plus allowed
    /// lateness).
    pub state_ttl_s: u64,
    /// TTL of per-call state, seconds (longest call you expect). A call's
    /// state is kept only `allowed_lateness_s` after its end event (or this
    /// long, if shorter).
    pub call_ttl_s: u64,
    /// How long an event's dedupe markers live, seconds: a re-delivery of
    /// the same event (a correlator restarted or rebalanced before its
    /// offsets were committed, a carrier retrying a batch whose
    /// acknowledgement it lost) within this time changes nothing; one later
    /// counts again. Markers are the only per-event state, so this bounds
    /// the window store's memory: about `events/s × dedupe_ttl_s × 1.3`
    /// keys.
    pub dedupe_ttl_s: u64,
    /// Allowed lateness of events, seconds (clock skew and delivery delay).
    pub allowed_lateness_s: u64,
}

impl Default for General {
    fn default() -> Self {
        Self {
            state_ttl_s: 26 * 3600,
            call_ttl_s: 12 * 3600,
            dedupe_ttl_s: 300,
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
    /// Cap on spend to high-risk ranges (at or above
    /// `multi_carrier_burst.min_risk_tier`) outside business hours per
    /// rolling 24 h, EUR: catches slow burns that stay under every burst
    /// threshold (×`multi_carrier_burst.familiar_factor` for a customer with
    /// an established pattern to the range).
    pub high_risk_daily_cap_eur: String,
}

impl Default for SpendCap {
    fn default() -> Self {
        Self {
            enabled: true,
            daily_cap_eur: "2500.00".into(),
            hourly_cap_eur: "600.00".into(),
            warning_ratio: 0.6,
            high_risk_daily_cap_eur: "150.00".into(),
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
    /// Thresholds are multiplied by this outside the customer's business
    /// hours (policies with `business_hours`): a PBX dialling East Timor at
    /// 3 a.m. needs less evidence.
    pub out_of_hours_factor: f64,
    /// Thresholds are multiplied by this inside business hours (the
    /// customer's, or `default_business_hours` when it has no policy):
    /// enterprises legitimately call abroad in office hours.
    pub in_hours_factor: f64,
    /// Business hours assumed for customers without a policy.
    pub default_business_hours: String,
    /// Days of those business hours.
    pub default_business_days: String,
    /// Time zone of those business hours.
    pub default_time_zone: String,
    /// A customer that called the same country on at least this many distinct
    /// days in the last `familiar_window_days` has an established pattern…
    pub familiar_days: i64,
    /// … looked for over this many days …
    pub familiar_window_days: i64,
    /// … and its thresholds are multiplied by this.
    pub familiar_factor: f64,
    /// The customer's own normal: thresholds rise above its usual volume of
    /// high-risk calls at this hour of the week.
    pub baseline: Baseline,
}

/// `multi_carrier_burst.baseline`: per customer, an exponentially weighted
/// hour-of-week profile of its calls to ranges at or above the rule's
/// `min_risk_tier` (count and estimated spend). The burst rule fires on a
/// deviation from that normal (expected + k·√expected, Poisson), never below
/// the rule's constants. A customer with less than a week of history uses
/// its hour-of-day profile over the last days; with less than
/// `min_active_days` days, its policy's `peer_group` (the members' average);
/// with neither, the constants alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Baseline {
    /// Baselines on/off (on by default; off: the constants alone).
    pub enabled: bool,
    /// Weeks of hour-of-week history looked at.
    pub weeks: i64,
    /// Days of hour-of-day history looked at before a week exists.
    pub days: i64,
    /// EWMA weight of the most recent observed week (or day), in (0, 1].
    pub alpha: f64,
    /// The customer's own profile counts once it called abroad on at least
    /// this many days (within the weeks looked at); a past slot counts when
    /// the customer was already known then (silence then is a true zero).
    pub min_active_days: i64,
    /// Hours either side of the slot averaged in (smoothing).
    pub smoothing_hours: i64,
    /// Warning at expected + this many standard deviations.
    pub warning_sigmas: f64,
    /// Critical at expected + this many standard deviations.
    pub critical_sigmas: f64,
}

impl Default for Baseline {
    fn default() -> Self {
        Self {
            enabled: true,
            weeks: 4,
            days: 6,
            alpha: 0.5,
            min_active_days: 3,
            smoothing_hours: 1,
            warning_sigmas: 4.0,
            critical_sigmas: 8.0,
        }
    }
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
            out_of_hours_factor: 0.5,
            in_hours_factor: 1.5,
            default_business_hours: "08:00-18:00".into(),
            default_business_days: "mon-fri".into(),
            default_time_zone: "Europe/Amsterdam".into(),
            familiar_days: 3,
            familiar_window_days: 14,
            familiar_factor: 3.0,
            baseline: Baseline::default(),
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
    /// Estimated spend on the range in the window, over all carriers (EUR),
    /// below which no finding is raised, whatever the number of customers:
    /// a few customers placing ordinary short calls to a popular high-risk
    /// destination is everyday traffic, while an IRSF campaign pumps long,
    /// expensive calls. "0.00" turns the floor off.
    pub min_spend_eur: String,
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
            min_spend_eur: "50.00".into(),
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

/// `sequential_probe`: short calls to many numbers of one 100-number block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequentialProbe {
    /// Rule on/off.
    pub enabled: bool,
    /// Window, seconds.
    pub window_s: u64,
    /// A call counts as a probe if unanswered or shorter than this, seconds.
    pub short_call_s: f64,
    /// Distinct numbers of one block for a warning.
    pub warning_numbers: i64,
    /// Distinct numbers of one block for critical.
    pub critical_numbers: i64,
}

impl Default for SequentialProbe {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 900,
            short_call_s: 10.0,
            warning_numbers: 6,
            critical_numbers: 15,
        }
    }
}

/// `wangiri`: one-ring inbound calls from one foreign range to subscribers
/// at several carriers, then callbacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Wangiri {
    /// Rule on/off.
    pub enabled: bool,
    /// Window of the one-ring wave, seconds.
    pub window_s: u64,
    /// An inbound call is a "ring" if unanswered or shorter than this, seconds.
    pub ring_max_s: f64,
    /// Ranges at or above this tier are watched.
    pub min_risk_tier: RiskTier,
    /// Distinct subscribers rung for a warning.
    pub min_subscribers: i64,
    /// Carriers needed.
    pub min_carriers: usize,
    /// How long after a ring a call back counts as a callback, seconds.
    pub callback_window_s: u64,
    /// Callbacks for critical.
    pub critical_callbacks: i64,
}

impl Default for Wangiri {
    fn default() -> Self {
        Self {
            enabled: true,
            window_s: 3600,
            ring_max_s: 5.0,
            min_risk_tier: RiskTier::Elevated,
            min_subscribers: 5,
            min_carriers: 2,
            callback_window_s: 86_400,
            critical_callbacks: 2,
        }
    }
}

/// `long_duration`: calls to high-risk ranges still running past a limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LongDuration {
    /// Rule on/off.
    pub enabled: bool,
    /// Ranges at or above this tier are watched.
    pub min_risk_tier: RiskTier,
    /// Duration for a warning, seconds.
    pub warning_s: u64,
    /// Duration for critical, seconds.
    pub critical_s: u64,
}

impl Default for LongDuration {
    fn default() -> Self {
        Self {
            enabled: true,
            min_risk_tier: RiskTier::High,
            warning_s: 2700,
            critical_s: 5400,
        }
    }
}

/// `blocked_destination`: calls to ranges a customer's policy blocks (or
/// outside its allowed ranges).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockedDestination {
    /// Rule on/off.
    pub enabled: bool,
    /// Severity of a call to a blocked range.
    pub severity: Severity,
}

impl Default for BlockedDestination {
    fn default() -> Self {
        Self {
            enabled: true,
            severity: Severity::Critical,
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
    /// sequential_probe.
    pub sequential_probe: SequentialProbe,
    /// wangiri.
    pub wangiri: Wangiri,
    /// long_duration.
    pub long_duration: LongDuration,
    /// blocked_destination (policy violations).
    pub blocked_destination: BlockedDestination,
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
    /// High-risk daily cap, micro-EUR.
    pub high_risk_daily_cap: i64,
    /// Destination convergence's spend floor, micro-EUR.
    pub convergence_min_spend: i64,
    /// Default business hours of customers without a policy.
    pub default_hours: BusinessHours,
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
        if !(60..=g.state_ttl_s).contains(&g.dedupe_ttl_s) {
            return Err(ConfigError::new(
                "general.dedupe_ttl_s",
                format!(
                    "must be between 60 and general.state_ttl_s ({} s)",
                    g.state_ttl_s
                ),
            ));
        }
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
        let convergence_min_spend = eur("destination_convergence.min_spend_eur", &d.min_spend_eur)?;
        let c = &self.concurrency;
        positive_i("concurrency.default_channels", c.default_channels)?;
        positive("concurrency.open_call_horizon_s", c.open_call_horizon_s)?;
        if !(c.critical_factor >= 1.0 && c.critical_factor.is_finite()) {
            return Err(ConfigError::new(
                "concurrency.critical_factor",
                "must be a number >= 1",
            ));
        }
        let high_risk_daily_cap = eur(
            "spend_cap.high_risk_daily_cap_eur",
            &s.high_risk_daily_cap_eur,
        )?;
        positive_i("spend_cap.high_risk_daily_cap_eur", high_risk_daily_cap)?;
        if !(b.in_hours_factor >= 1.0 && b.in_hours_factor.is_finite()) {
            return Err(ConfigError::new(
                "multi_carrier_burst.in_hours_factor",
                "must be >= 1",
            ));
        }
        if !(b.familiar_factor >= 1.0 && b.familiar_factor.is_finite()) {
            return Err(ConfigError::new(
                "multi_carrier_burst.familiar_factor",
                "must be >= 1",
            ));
        }
        positive_i("multi_carrier_burst.familiar_days", b.familiar_days)?;
        positive_i(
            "multi_carrier_burst.familiar_window_days",
            b.familiar_window_days,
        )?;
        let bl = &b.baseline;
        if !(1..=12).contains(&bl.weeks) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.weeks",
                "must be between 1 and 12",
            ));
        }
        if !(1..=14).contains(&bl.days) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.days",
                "must be between 1 and 14",
            ));
        }
        if !(bl.alpha > 0.0 && bl.alpha <= 1.0) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.alpha",
                "must be in (0, 1]",
            ));
        }
        if !(1..=7).contains(&bl.min_active_days) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.min_active_days",
                "must be between 1 and 7",
            ));
        }
        if !(0..=3).contains(&bl.smoothing_hours) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.smoothing_hours",
                "must be between 0 and 3",
            ));
        }
        if !(bl.warning_sigmas >= 0.0 && bl.warning_sigmas.is_finite()) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.warning_sigmas",
                "must be a number >= 0",
            ));
        }
        if !(bl.critical_sigmas >= bl.warning_sigmas && bl.critical_sigmas.is_finite()) {
            return Err(ConfigError::new(
                "multi_carrier_burst.baseline.critical_sigmas",
                "must be a number >= warning_sigmas",
            ));
        }
        let default_hours = business_hours(
            "multi_carrier_burst.default_business_hours",
            &b.default_business_hours,
            &b.default_business_days,
            &b.default_time_zone,
        )?;
        if !(b.out_of_hours_factor > 0.0 && b.out_of_hours_factor <= 1.0) {
            return Err(ConfigError::new(
                "multi_carrier_burst.out_of_hours_factor",
                "must be in (0, 1]",
            ));
        }
        let p = &self.sequential_probe;
        positive("sequential_probe.window_s", p.window_s)?;
        positive_i("sequential_probe.warning_numbers", p.warning_numbers)?;
        if p.critical_numbers < p.warning_numbers {
            return Err(ConfigError::new(
                "sequential_probe.critical_numbers",
                "must be >= warning_numbers",
            ));
        }
        if !(p.short_call_s >= 0.0 && p.short_call_s.is_finite()) {
            return Err(ConfigError::new(
                "sequential_probe.short_call_s",
                "must be >= 0",
            ));
        }
        let w = &self.wangiri;
        positive("wangiri.window_s", w.window_s)?;
        positive("wangiri.callback_window_s", w.callback_window_s)?;
        positive_i("wangiri.min_subscribers", w.min_subscribers)?;
        positive_i("wangiri.critical_callbacks", w.critical_callbacks)?;
        if !(w.ring_max_s >= 0.0 && w.ring_max_s.is_finite()) {
            return Err(ConfigError::new("wangiri.ring_max_s", "must be >= 0"));
        }
        if g.state_ttl_s < w.callback_window_s + g.allowed_lateness_s {
            return Err(ConfigError::new(
                "wangiri.callback_window_s",
                "must not exceed general.state_ttl_s minus allowed lateness",
            ));
        }
        let l = &self.long_duration;
        positive("long_duration.warning_s", l.warning_s)?;
        if l.critical_s < l.warning_s {
            return Err(ConfigError::new(
                "long_duration.critical_s",
                "must be >= warning_s",
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
            convergence_min_spend,
            high_risk_daily_cap,
            default_hours,
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
    /// Ranges (E.164 prefixes like "+670") the customer never calls: any
    /// call to them raises a `blocked_destination` incident.
    #[serde(default)]
    pub blocked_ranges: Vec<String>,
    /// If set, international calls outside these prefixes (and outside the
    /// customer's own country code) raise a `blocked_destination` incident.
    #[serde(default)]
    pub allowed_ranges: Vec<String>,
    /// Business hours, local time, e.g. "08:00-18:00".
    pub business_hours: Option<String>,
    /// Business days, e.g. "mon-fri" or "mon-sat".
    pub business_days: Option<String>,
    /// IANA time zone of the business hours (default Europe/Amsterdam).
    pub time_zone: Option<String>,
    /// Free-text label shown to operators (never sent to other carriers).
    pub label: Option<String>,
    /// Peer group (e.g. "call_centre"): while the customer has too little
    /// history of its own, the burst rule expects what the group's members
    /// do on average.
    pub peer_group: Option<String>,
}

/// `policies.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Entries.
    #[serde(default)]
    pub policy: Vec<PolicyEntry>,
}

/// The operator's run-time policies (set through the `Admin` gRPC API),
/// kept as one JSON state value in the shared store's global scope under
/// [`POLICY_OVERLAY`]; entries carry `customer_token`. They replace the
/// policies file's entry for the same customer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverlay {
    /// Incremented by every change.
    pub revision: u64,
    /// Entries, sorted by token.
    #[serde(default)]
    pub policy: Vec<PolicyEntry>,
}

/// State name of the [`PolicyOverlay`] in the global scope.
pub const POLICY_OVERLAY: &str = "policy-overlay";

/// Why the stored [`PolicyOverlay`] could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OverlayReadError {
    /// The store failed.
    #[error("policy overlay unavailable: {0}")]
    Store(#[from] crate::error::StoreError),
    /// The stored value is not an overlay.
    #[error("policy overlay is unreadable: {0}")]
    Decode(String),
}

impl PolicyOverlay {
    /// Reads the overlay from `store`: the raw stored value (the
    /// expectation of a later compare-and-set; `None` when never set) and
    /// its content (empty when never set).
    pub async fn read(
        store: &dyn crate::store::WindowStore,
    ) -> Result<(Option<String>, PolicyOverlay), OverlayReadError> {
        let raw = store
            .get_states(&[(crate::store::Scope::Global, POLICY_OVERLAY.to_string())])
            .await?
            .into_iter()
            .next()
            .flatten();
        let overlay = match &raw {
            None => PolicyOverlay::default(),
            Some(s) => {
                serde_json::from_str(s).map_err(|e| OverlayReadError::Decode(e.to_string()))?
            }
        };
        Ok((raw, overlay))
    }
}

/// Business hours of a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessHours {
    /// Opening, minutes after local midnight.
    pub open_min: u32,
    /// Closing, minutes after local midnight.
    pub close_min: u32,
    /// Days 0 = Monday … 6 = Sunday.
    pub days: Vec<u32>,
    /// Time zone.
    pub tz: chrono_tz::Tz,
}

impl BusinessHours {
    /// True when `t` (epoch ms) is inside business hours.
    pub fn contains(&self, t: crate::model::Millis) -> bool {
        use chrono::{Datelike, Timelike};
        let Some(utc) = chrono::DateTime::from_timestamp_millis(t) else {
            return true;
        };
        let local = utc.with_timezone(&self.tz);
        let minute = local.hour() * 60 + local.minute();
        self.days.contains(&local.weekday().num_days_from_monday())
            && minute >= self.open_min
            && minute < self.close_min
    }
}

/// A resolved policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Cap per 24 h, micro-EUR.
    pub daily_cap: i64,
    /// Cap per hour, micro-EUR.
    pub hourly_cap: i64,
    /// Channel count.
    pub channels: i64,
    /// Blocked prefixes.
    pub blocked_ranges: Vec<String>,
    /// Allowed prefixes (empty = all).
    pub allowed_ranges: Vec<String>,
    /// Business hours, if known.
    pub business_hours: Option<BusinessHours>,
    /// Peer group, if any.
    pub peer_group: Option<String>,
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
}

fn parse_days(s: &str) -> Option<Vec<u32>> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let idx = |d: &str| NAMES.iter().position(|n| *n == d.trim()).map(|i| i as u32);
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (idx(a)?, idx(b)?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(idx(part)?),
        }
    }
    Some(out)
}

fn business_hours(
    key: &str,
    hours: &str,
    days: &str,
    tz: &str,
) -> Result<BusinessHours, ConfigError> {
    let (open, close) = hours
        .split_once('-')
        .and_then(|(a, b)| Some((parse_hhmm(a)?, parse_hhmm(b)?)))
        .filter(|(a, b)| a < b)
        .ok_or_else(|| {
            ConfigError::new(
                key,
                format!("`{hours}` is not a range like \"08:00-18:00\""),
            )
        })?;
    let days = parse_days(days)
        .ok_or_else(|| ConfigError::new(key, format!("`{days}` is not like \"mon-fri\"")))?;
    let tz = tz
        .parse::<chrono_tz::Tz>()
        .map_err(|_| ConfigError::new(key, format!("`{tz}` is not an IANA time zone")))?;
    Ok(BusinessHours {
        open_min: open,
        close_min: close,
        days,
        tz,
    })
}

fn check_prefixes(key: &str, v: &[String]) -> Result<(), ConfigError> {
    for (i, p) in v.iter().enumerate() {
        let ok = p.starts_with('+')
            && p.len() >= 2
            && p.len() <= 16
            && p[1..].bytes().all(|b| b.is_ascii_digit());
        if !ok {
            return Err(ConfigError::new(
                format!("{key}[{i}]"),
                format!("`{p}` is not a range like \"+670\""),
            ));
        }
    }
    Ok(())
}

/// Policies by customer token (`keyid:hex`).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    by_token: HashMap<String, Policy>,
}

impl Policies {
    /// These policies with `over`'s entries replacing any for the same
    /// customer.
    pub fn merged(&self, over: &Policies) -> Policies {
        let mut by_token = self.by_token.clone();
        by_token.extend(over.by_token.iter().map(|(k, v)| (k.clone(), v.clone())));
        Policies { by_token }
    }

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
            check_prefixes(&k("blocked_ranges"), &p.blocked_ranges)?;
            check_prefixes(&k("allowed_ranges"), &p.allowed_ranges)?;
            if let Some(b) = p.blocked_ranges.iter().find(|b| {
                p.allowed_ranges
                    .iter()
                    .any(|a| b.starts_with(a.as_str()) || a.starts_with(b.as_str()))
            }) {
                return Err(ConfigError::new(
                    k("blocked_ranges"),
                    format!("`{b}` overlaps an allowed range: the entry contradicts itself"),
                ));
            }
            let business_hours = match &p.business_hours {
                None => {
                    if p.business_days.is_some() || p.time_zone.is_some() {
                        return Err(ConfigError::new(
                            k("business_hours"),
                            "is required when business_days or time_zone is given",
                        ));
                    }
                    None
                }
                Some(h) => {
                    let (open, close) = h
                        .split_once('-')
                        .and_then(|(a, b)| Some((parse_hhmm(a)?, parse_hhmm(b)?)))
                        .filter(|(a, b)| a < b)
                        .ok_or_else(|| {
                            ConfigError::new(
                                k("business_hours"),
                                format!("`{h}` is not a range like \"08:00-18:00\""),
                            )
                        })?;
                    let days_s = p.business_days.as_deref().unwrap_or("mon-fri");
                    let days = parse_days(days_s).ok_or_else(|| {
                        ConfigError::new(
                            k("business_days"),
                            format!("`{days_s}` is not like \"mon-fri\" or \"mon,wed,fri\""),
                        )
                    })?;
                    let tz_s = p.time_zone.as_deref().unwrap_or("Europe/Amsterdam");
                    let tz = tz_s.parse::<chrono_tz::Tz>().map_err(|_| {
                        ConfigError::new(
                            k("time_zone"),
                            format!("`{tz_s}` is not an IANA time zone"),
                        )
                    })?;
                    Some(BusinessHours {
                        open_min: open,
                        close_min: close,
                        days,
                        tz,
                    })
                }
            };
            if let Some(g) = &p.peer_group
                && (g.is_empty()
                    || g.len() > 64
                    || !g
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'))
            {
                return Err(ConfigError::new(
                    k("peer_group"),
                    format!("`{g}` must be 1-64 letters, digits, '_' or '-'"),
                ));
            }
            let policy = Policy {
                daily_cap,
                hourly_cap,
                channels,
                blocked_ranges: p.blocked_ranges.clone(),
                allowed_ranges: p.allowed_ranges.clone(),
                business_hours,
                peer_group: p.peer_group.clone(),
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
            ..Default::default()
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
