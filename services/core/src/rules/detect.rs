//! The detector: plans the window-store updates for an event and evaluates
//! the rules on their results. Pure: it never calls the store itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::model::{CallEvent, Direction, Millis, NumberInfo, Phase};
use crate::money::{format_amount, format_eur};
use crate::rules::config::{Policies, Policy, RulesConfig, Severity, Thresholds};
use crate::store::{Groups, Op, OpResult, Outcome, Scope, Update, Val};

/// A detection rule (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Rolling spend over the customer's cap.
    SpendCap,
    /// High-risk calls through several carriers at once.
    MultiCarrierBurst,
    /// Many customers to one high-risk range through several carriers.
    DestinationConvergence,
    /// Simultaneous calls over the channel count.
    Concurrency,
    /// Sequential short calls in one range.
    SequentialProbe,
    /// Hot-list hit.
    HotNumber,
    /// One-ring inbound calls, then callbacks.
    Wangiri,
    /// Long call to a high-risk range.
    LongDuration,
    /// Call to a range the customer's policy blocks.
    BlockedDestination,
}

impl Rule {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::SpendCap => "spend_cap",
            Rule::MultiCarrierBurst => "multi_carrier_burst",
            Rule::DestinationConvergence => "destination_convergence",
            Rule::Concurrency => "concurrency",
            Rule::SequentialProbe => "sequential_probe",
            Rule::HotNumber => "hot_number",
            Rule::Wangiri => "wangiri",
            Rule::LongDuration => "long_duration",
            Rule::BlockedDestination => "blocked_destination",
        }
    }
}

/// What a finding is about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FindingSubject {
    /// Customer token (compact `keyid:hex`).
    pub customer: Option<crate::model::Token>,
    /// Range.
    pub range: Option<String>,
    /// Country of the range.
    pub country: Option<String>,
    /// Callee token (hot number).
    pub number: Option<crate::model::Token>,
}

/// Figures behind a finding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FindingEvidence {
    /// Calls per carrier.
    pub calls: BTreeMap<String, i64>,
    /// Spend per carrier, micro-EUR.
    pub spend: BTreeMap<String, i64>,
    /// Distinct customers per carrier (range rules).
    pub customers: BTreeMap<String, i64>,
    /// Distinct origins (customers or lines).
    pub distinct_origins: i64,
    /// Total calls.
    pub total_calls: i64,
    /// Total spend, micro-EUR.
    pub total_spend: i64,
    /// Concurrent calls.
    pub concurrent: i64,
    /// Window bounds.
    pub window: (Millis, Millis),
    /// Thresholds compared against.
    pub thresholds: BTreeMap<String, String>,
    /// Ranges involved.
    pub ranges: Vec<String>,
}

/// A rule fired for an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Rule.
    pub rule: Rule,
    /// Severity.
    pub severity: Severity,
    /// Scope holding the incident state.
    pub scope: Scope,
    /// Incident key within the scope (rule plus sub-key).
    pub incident_key: String,
    /// Subject.
    pub subject: FindingSubject,
    /// Evidence.
    pub evidence: FindingEvidence,
    /// Analyst-facing sentence.
    pub summary: String,
    /// Recommended action.
    pub action: String,
    /// Event time of the triggering event's phase.
    pub at: Millis,
    /// Triggering event key (provider/event).
    pub trigger: (String, String),
    /// Providers involved.
    pub providers: Vec<String>,
    /// Magnitude used to decide whether an update is material (calls,
    /// spend, customers… whichever the rule is about).
    pub magnitude: i64,
}

const MIN: i64 = 60_000;
const SPEND_DAILY_BUCKET: i64 = 15 * MIN;

/// Indices of the ops in a customer-scope update.
#[derive(Debug, Clone, Copy, Default)]
struct CustomerIdx {
    spend_h: Option<usize>,
    spend_d: Option<usize>,
    hr_calls: Option<usize>,
    hr_spend: Option<usize>,
    hr_lines: Option<usize>,
    hr_daily: Option<usize>,
    overlap: Option<usize>,
    probe: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
struct RangeIdx {
    customers: Option<usize>,
    calls: Option<usize>,
    spend: Option<usize>,
    callback: Option<usize>,
    callbacks: Option<usize>,
    wave: Option<usize>,
}

/// Indices of the reads of a baseline profile update (customer or peer
/// scope): the smoothed hour slot `k` weeks back (k = 1..), the same hour
/// `j` days back (j = 1..), and active days (customer: days it called
/// abroad; peer: members per day).
#[derive(Debug, Clone, Default)]
struct ProfileIdx {
    weeks: Vec<usize>,
    days: Vec<usize>,
    active: Option<usize>,
    /// Distinct days the customer called this country (customer scope).
    familiar: Option<usize>,
}

/// Indices of the ops of a Wangiri wave update (scope: the caller's range).
#[derive(Debug, Clone, Copy, Default)]
struct WaveIdx {
    subscribers: usize,
    callbacks: usize,
}

/// The plan for one event: its updates and where their results are.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Updates (0..=2).
    pub updates: Vec<Update>,
    cust: Option<(usize, CustomerIdx)>,
    range: Option<(usize, RangeIdx)>,
    wave: Option<(usize, WaveIdx)>,
    base: Option<(usize, ProfileIdx)>,
    peer: Option<(usize, ProfileIdx)>,
    now: Millis,
    /// The event arrived later than the allowed lateness: it still updates
    /// state (cumulative spend counts it) but its closed windows raise
    /// nothing new.
    pub late: bool,
}

/// The consortium hot list: entries `number:<token value>` and
/// `range:<range>`.
#[derive(Debug, Clone, Default)]
pub struct HotList {
    entries: HashSet<String>,
}

impl HotList {
    /// Builds from entries.
    pub fn new(entries: impl IntoIterator<Item = String>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// Entry for a range.
    pub fn range_entry(range: &str) -> String {
        format!("range:{range}")
    }

    /// Entry for a number token value.
    pub fn number_entry(token_value: &str) -> String {
        format!("number:{token_value}")
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn contains(&self, e: &str) -> bool {
        self.entries.contains(e)
    }
}

/// Plans updates and evaluates rules.
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: Arc<RulesConfig>,
    th: Thresholds,
    policies: Arc<Policies>,
    default_policy: Policy,
    hot: Arc<HotList>,
}

fn bucket(t: Millis, width: i64) -> i64 {
    t.div_euclid(width)
}

/// Formats a range as "+670 77" using its country code.
pub fn pretty_range(range: &str, cc: u16) -> String {
    let ccs = cc.to_string();
    match range
        .strip_prefix('+')
        .and_then(|r| r.strip_prefix(ccs.as_str()))
    {
        Some(rest) if !rest.is_empty() && cc != 0 => format!("+{ccs} {rest}"),
        _ => range.to_string(),
    }
}

fn carriers_list(m: &BTreeMap<String, i64>) -> String {
    m.iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn active(m: &BTreeMap<String, i64>) -> Vec<String> {
    m.iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, _)| k.clone())
        .collect()
}

impl Detector {
    /// Builds a detector. The config must have been validated.
    pub fn new(
        cfg: RulesConfig,
        policies: Policies,
        hot: HotList,
    ) -> Result<Self, crate::error::ConfigError> {
        let th = cfg.validate()?;
        let default_policy = Policy {
            daily_cap: th.daily_cap,
            hourly_cap: th.hourly_cap,
            channels: cfg.concurrency.default_channels,
            ..Default::default()
        };
        Ok(Self {
            cfg: Arc::new(cfg),
            th,
            policies: Arc::new(policies),
            default_policy,
            hot: Arc::new(hot),
        })
    }

    /// The default policy (for customers without one).
    pub fn default_policy(&self) -> &Policy {
        &self.default_policy
    }

    /// The rules configuration.
    pub fn config(&self) -> &RulesConfig {
        &self.cfg
    }

    /// Replaces the hot list (refreshed from the store by the service).
    pub fn set_hot_list(&mut self, hot: HotList) {
        self.hot = Arc::new(hot);
    }

    /// Takes over another detector's hot list.
    pub fn set_hot_list_from(&mut self, other: &Detector) {
        self.hot = other.hot.clone();
    }

    /// The policies in force.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// Replaces the policies (SIGHUP reload, operator overlay).
    pub fn set_policies(&mut self, p: Policies) {
        self.policies = Arc::new(p);
    }

    fn policy(&self, e: &CallEvent) -> &Policy {
        e.customer
            .as_ref()
            .and_then(|c| self.policies.get(c))
            .unwrap_or(&self.default_policy)
    }

    /// Plans the store updates for one event.
    pub fn plan(&self, e: &CallEvent) -> Plan {
        self.plan_at(e, Millis::MAX)
    }

    /// Plans the store updates for one event, pruning nothing newer than
    /// `horizon` minus each window: `horizon` is the low watermark of the
    /// input (the slowest carrier's event time), so a carrier that lags
    /// behind the others still finds their events in the window.
    pub fn plan_at(&self, e: &CallEvent, horizon: Millis) -> Plan {
        let cfg = &self.cfg;
        let now = e.phase_time();
        // Event times are after 2000-01-01, so 0 is "prune nothing" without overflow.
        let pn = now.min(horizon).max(0);
        let ttl = (cfg.general.state_ttl_s * 1000) as i64;
        // A call's state serves its later events; after its end event only
        // late ones (within the allowed lateness) can still come.
        let call_ttl = if e.phase == Phase::End {
            lateness(cfg).clamp(1, (cfg.general.call_ttl_s * 1000) as i64)
        } else {
            (cfg.general.call_ttl_s * 1000) as i64
        };
        let dedupe_ttl = (cfg.general.dedupe_ttl_s * 1000) as i64;
        let ck = e.call_key();
        let prov = e.provider_id.clone();
        let outbound = e.direction == Direction::Outbound;
        let remote = e.remote();
        let mut updates = Vec::new();

        // Customer scope.
        let mut ops = Vec::new();
        let mut ci = CustomerIdx::default();
        let call_key = format!("call:{ck}");
        if outbound {
            ops.push(Op::CallMax {
                key: call_key.clone(),
                field: "s".into(),
                value: e.estimated_charge,
                ttl_ms: call_ttl,
            });
            ops.push(Op::CallMax {
                key: call_key.clone(),
                field: "n".into(),
                value: 1,
                ttl_ms: call_ttl,
            });
            let (spend, newcall) = (0usize, 1usize);
            if cfg.spend_cap.enabled {
                ops.push(Op::Add {
                    key: "sh".into(),
                    bucket: bucket(e.start_time, MIN),
                    group: prov.clone(),
                    delta: Val::Ref(spend),
                    when: None,
                });
                ops.push(Op::Add {
                    key: "sd".into(),
                    bucket: bucket(e.start_time, SPEND_DAILY_BUCKET),
                    group: prov.clone(),
                    delta: Val::Ref(spend),
                    when: None,
                });
                ci.spend_h = Some(ops.len());
                ops.push(Op::Sum {
                    key: "sh".into(),
                    from: bucket(now - 3_600_000, MIN) + 1,
                    to: bucket(now, MIN),
                    prune_before: bucket(pn - 3_600_000 - lateness(cfg), MIN),
                });
                ci.spend_d = Some(ops.len());
                ops.push(Op::Sum {
                    key: "sd".into(),
                    from: bucket(now - 86_400_000, SPEND_DAILY_BUCKET) + 1,
                    to: bucket(now, SPEND_DAILY_BUCKET),
                    prune_before: bucket(pn - 86_400_000 - lateness(cfg), SPEND_DAILY_BUCKET),
                });
            }
            let b = &cfg.multi_carrier_burst;
            if b.enabled && remote.risk_tier >= b.min_risk_tier {
                let w = (b.window_s * 1000) as i64;
                ops.push(Op::Add {
                    key: "hc".into(),
                    bucket: bucket(e.start_time, MIN),
                    group: prov.clone(),
                    delta: Val::Ref(newcall),
                    when: None,
                });
                ops.push(Op::Add {
                    key: "hs".into(),
                    bucket: bucket(e.start_time, MIN),
                    group: prov.clone(),
                    delta: Val::Ref(spend),
                    when: None,
                });
                ops.push(Op::Mark {
                    key: "hl".into(),
                    group: prov.clone(),
                    id: e.line.value.clone(),
                    ts: now,
                });
                let from = bucket(now - w, MIN) + 1;
                let prune = bucket(pn - w - lateness(cfg), MIN);
                ci.hr_calls = Some(ops.len());
                ops.push(Op::Sum {
                    key: "hc".into(),
                    from,
                    to: bucket(now, MIN),
                    prune_before: prune,
                });
                ci.hr_spend = Some(ops.len());
                ops.push(Op::Sum {
                    key: "hs".into(),
                    from,
                    to: bucket(now, MIN),
                    prune_before: prune,
                });
                ci.hr_lines = Some(ops.len());
                ops.push(Op::Distinct {
                    key: "hl".into(),
                    since: now - w,
                    prune_before: pn - w - lateness(cfg),
                });
                // Cumulative out-of-hours high-risk spend (slow burns run at
                // night, when nobody watches).
                let hours = self
                    .policy(e)
                    .business_hours
                    .as_ref()
                    .unwrap_or(&self.th.default_hours);
                if !hours.contains(e.start_time) {
                    ops.push(Op::Add {
                        key: "hsd".into(),
                        bucket: bucket(e.start_time, SPEND_DAILY_BUCKET),
                        group: prov.clone(),
                        delta: Val::Ref(spend),
                        when: None,
                    });
                }
                ci.hr_daily = Some(ops.len());
                ops.push(Op::Sum {
                    key: "hsd".into(),
                    from: bucket(now - 86_400_000, SPEND_DAILY_BUCKET) + 1,
                    to: bucket(now, SPEND_DAILY_BUCKET),
                    prune_before: bucket(pn - 86_400_000 - lateness(cfg), SPEND_DAILY_BUCKET),
                });
            }
        }
        let sp = &cfg.sequential_probe;
        if outbound && sp.enabled && is_short(e, sp.short_call_s) {
            let w = (sp.window_s * 1000) as i64;
            let key = format!("pb:{}", e.callee_block.value);
            ops.push(Op::Mark {
                key: key.clone(),
                group: prov.clone(),
                id: e.callee_block_offset.to_string(),
                ts: now,
            });
            ci.probe = Some(ops.len());
            ops.push(Op::Distinct {
                key,
                since: now - w,
                prune_before: pn - w - lateness(cfg),
            });
        }
        if cfg.concurrency.enabled {
            let horizon = (cfg.concurrency.open_call_horizon_s * 1000) as i64;
            ops.push(Op::Span {
                key: "sp".into(),
                id: ck.clone(),
                group: prov.clone(),
                start: e.answer_time.unwrap_or(e.start_time),
                end: now,
                closed: e.phase == Phase::End,
            });
            ci.overlap = Some(ops.len());
            ops.push(Op::Overlap {
                key: "sp".into(),
                at: now,
                open_horizon: horizon,
                prune_before: pn - horizon - lateness(cfg) - 3_600_000,
            });
        }
        let cust = if ops.is_empty() {
            None
        } else {
            updates.push(Update {
                scope: Scope::Customer(e.subject().compact()),
                dedupe: e.event_key(),
                ttl_ms: ttl,
                dedupe_ttl_ms: dedupe_ttl,
                ops,
            });
            Some((updates.len() - 1, ci))
        };

        // Range scope of the destination: convergence and Wangiri callbacks.
        let d = &cfg.destination_convergence;
        let wg = &cfg.wangiri;
        let conv = outbound && d.enabled && remote.risk_tier >= d.min_risk_tier;
        let callback = outbound && wg.enabled && remote.risk_tier >= wg.min_risk_tier;
        let cb_window = (wg.callback_window_s * 1000) as i64;
        let q = 15 * MIN;
        let range = if conv || callback {
            let mut ops = Vec::new();
            let mut ri = RangeIdx::default();
            ops.push(Op::CallMax {
                key: call_key.clone(),
                field: "n".into(),
                value: 1,
                ttl_ms: call_ttl,
            });
            ops.push(Op::CallMax {
                key: call_key,
                field: "s".into(),
                value: e.estimated_charge,
                ttl_ms: call_ttl,
            });
            if conv {
                let w = (d.window_s * 1000) as i64;
                ops.push(Op::Add {
                    key: "rn".into(),
                    bucket: bucket(e.start_time, MIN),
                    group: prov.clone(),
                    delta: Val::Ref(0),
                    when: None,
                });
                ops.push(Op::Add {
                    key: "rs".into(),
                    bucket: bucket(e.start_time, MIN),
                    group: prov.clone(),
                    delta: Val::Ref(1),
                    when: None,
                });
                ops.push(Op::Mark {
                    key: "rc".into(),
                    group: prov.clone(),
                    id: e.subject().compact(),
                    ts: now,
                });
                let from = bucket(now - w, MIN) + 1;
                let prune = bucket(pn - w - lateness(cfg), MIN);
                ri.calls = Some(ops.len());
                ops.push(Op::Sum {
                    key: "rn".into(),
                    from,
                    to: bucket(now, MIN),
                    prune_before: prune,
                });
                ri.spend = Some(ops.len());
                ops.push(Op::Sum {
                    key: "rs".into(),
                    from,
                    to: bucket(now, MIN),
                    prune_before: prune,
                });
                ri.customers = Some(ops.len());
                ops.push(Op::Distinct {
                    key: "rc".into(),
                    since: now - w,
                    prune_before: pn - w - lateness(cfg),
                });
            }
            if callback {
                let has = ops.len();
                ri.callback = Some(has);
                ops.push(Op::Has {
                    key: "wn".into(),
                    group: "n".into(),
                    id: e.callee.value.clone(),
                    since: now - cb_window,
                });
                ops.push(Op::Add {
                    key: "wcb".into(),
                    bucket: bucket(e.start_time, q),
                    group: prov.clone(),
                    delta: Val::Ref(0),
                    when: Some(has),
                });
                ri.callbacks = Some(ops.len());
                ops.push(Op::Sum {
                    key: "wcb".into(),
                    from: bucket(now - cb_window, q) + 1,
                    to: bucket(now, q),
                    prune_before: bucket(pn - cb_window - lateness(cfg), q),
                });
                let ww = (wg.window_s * 1000) as i64;
                ri.wave = Some(ops.len());
                ops.push(Op::Distinct {
                    key: "wi".into(),
                    since: now - cb_window.max(ww),
                    prune_before: pn - cb_window.max(ww) - lateness(cfg),
                });
            }
            updates.push(Update {
                scope: Scope::Range(remote.range.clone()),
                dedupe: e.event_key(),
                ttl_ms: ttl,
                dedupe_ttl_ms: dedupe_ttl,
                ops,
            });
            Some((updates.len() - 1, ri))
        } else {
            None
        };

        // Wangiri wave: one-ring inbound calls from a foreign range.
        let ring = e.direction == Direction::Inbound
            && wg.enabled
            && e.caller_info.risk_tier >= wg.min_risk_tier
            && e.caller_info.country != e.callee_info.country
            && is_short(e, wg.ring_max_s);
        let wave = if ring {
            let ww = (wg.window_s * 1000) as i64;
            let ops = vec![
                Op::Mark {
                    key: "wi".into(),
                    group: prov.clone(),
                    id: e.subject().compact(),
                    ts: now,
                },
                Op::Mark {
                    key: "wn".into(),
                    group: "n".into(),
                    id: e.caller.value.clone(),
                    ts: now,
                },
                Op::Distinct {
                    key: "wi".into(),
                    since: now - ww,
                    prune_before: pn - cb_window.max(ww) - lateness(cfg),
                },
                Op::Sum {
                    key: "wcb".into(),
                    from: bucket(now - cb_window, q) + 1,
                    to: bucket(now, q),
                    prune_before: bucket(pn - cb_window - lateness(cfg), q),
                },
            ];
            updates.push(Update {
                scope: Scope::Range(e.caller_info.range.clone()),
                dedupe: e.event_key(),
                ttl_ms: ttl,
                dedupe_ttl_ms: dedupe_ttl,
                ops,
            });
            Some((
                updates.len() - 1,
                WaveIdx {
                    subscribers: 2,
                    callbacks: 3,
                },
            ))
        } else {
            None
        };
        // History kept for weeks: the customer's familiarity with the
        // country and its baseline profile, and its peer group's.
        let b = &cfg.multi_carrier_burst;
        let bl = &b.baseline;
        let abroad = e.callee_info.country != e.caller_info.country;
        let (mut base, mut peer) = (None, None);
        if outbound && abroad && b.enabled {
            let counted = remote.risk_tier >= b.min_risk_tier;
            let member = e.subject().compact();
            let (ops, idx) = profile_ops(b, e, now, pn, counted, &e.call_key(), None, call_ttl);
            let bttl = (((bl.weeks * 7).max(b.familiar_window_days) + 2) * DAY).max(ttl);
            updates.push(Update {
                scope: Scope::Customer(member.clone()),
                dedupe: format!("bl/{}", e.event_key()),
                ttl_ms: bttl,
                dedupe_ttl_ms: dedupe_ttl,
                ops,
            });
            base = Some((updates.len() - 1, idx));
            if let Some(g) = &self.policy(e).peer_group
                && bl.enabled
            {
                let (ops, idx) = profile_ops(
                    b,
                    e,
                    now,
                    pn,
                    counted,
                    &e.call_key(),
                    Some(&member),
                    call_ttl,
                );
                updates.push(Update {
                    scope: Scope::Peer(g.clone()),
                    dedupe: format!("pg/{}", e.event_key()),
                    ttl_ms: bttl,
                    dedupe_ttl_ms: dedupe_ttl,
                    ops,
                });
                peer = Some((updates.len() - 1, idx));
            }
        }
        Plan {
            updates,
            cust,
            range,
            wave,
            base,
            peer,
            now,
            late: false,
        }
    }

    /// Distinct days (within `familiar_window_days`) the customer called the
    /// event's destination country.
    fn familiar_days(&self, plan: &Plan, outcomes: &[Outcome]) -> i64 {
        plan.base
            .as_ref()
            .and_then(|(u, idx)| Some((*u, idx.familiar?)))
            .and_then(|(u, i)| outcomes.get(u)?.results.get(i))
            .map_or(0, |r| {
                let today = plan.now.div_euclid(DAY);
                let from = today - self.cfg.multi_carrier_burst.familiar_window_days;
                r.groups()
                    .by
                    .iter()
                    .filter(|(d, n)| {
                        **n > 0 && d.parse::<i64>().is_ok_and(|d| d > from && d <= today)
                    })
                    .count() as i64
            })
    }

    /// The normal high-risk volume at this hour for the event's customer:
    /// its own profile, else its peer group's, else none.
    fn expected_for(&self, plan: &Plan, outcomes: &[Outcome], policy: &Policy) -> Option<Expected> {
        let bl = &self.cfg.multi_carrier_burst.baseline;
        let results = |u: usize| outcomes.get(u).map_or(&[][..], |o| o.results.as_slice());
        if let Some((u, idx)) = &plan.base
            && let Some(x) = expected(bl, idx, results(*u), plan.now, false)
        {
            return Some(x);
        }
        let (u, idx) = plan.peer.as_ref()?;
        let mut x = expected(bl, idx, results(*u), plan.now, true)?;
        x.basis = format!(
            "peer group {} ({})",
            policy.peer_group.as_deref().unwrap_or("?"),
            x.basis
        );
        Some(x)
    }

    /// Evaluates the rules for `e` given the outcomes of its plan's updates
    /// (same order as `plan.updates`).
    pub fn evaluate(&self, e: &CallEvent, plan: &Plan, outcomes: &[Outcome]) -> Vec<Finding> {
        let mut out = Vec::new();
        let get = |u: usize, i: Option<usize>| -> Groups {
            i.and_then(|i| outcomes.get(u).and_then(|o| o.results.get(i)))
                .map(OpResult::groups)
                .unwrap_or_default()
        };
        let now = plan.now;
        let remote = e.remote();
        let pr = pretty_range(&remote.range, remote.country_code);
        let who = e.subject().short();
        let policy = self.policy(e);
        let cfg = &self.cfg;
        let base = |rule: Rule, severity: Severity, scope: Scope, key: String| Finding {
            rule,
            severity,
            scope,
            incident_key: key,
            subject: FindingSubject::default(),
            evidence: FindingEvidence::default(),
            summary: String::new(),
            action: String::new(),
            at: now,
            trigger: (e.provider_id.clone(), e.event_id.clone()),
            providers: Vec::new(),
            magnitude: 0,
        };
        let cust_scope = Scope::Customer(e.subject().compact());
        let cust_subject = FindingSubject {
            customer: Some(e.subject().clone()),
            ..Default::default()
        };

        if let Some((u, ci)) = plan.cust {
            // spend_cap
            if cfg.spend_cap.enabled && ci.spend_d.is_some() {
                let d = get(u, ci.spend_d);
                let h = get(u, ci.spend_h);
                let ratio = cfg.spend_cap.warning_ratio;
                let level = |v: i64, cap: i64| {
                    if v >= cap {
                        Some(Severity::Critical)
                    } else if v as f64 >= cap as f64 * ratio {
                        Some(Severity::Warning)
                    } else {
                        None
                    }
                };
                let hr = get(u, ci.hr_daily);
                // A customer with an established pattern to this range (its
                // office abroad) gets more room before a slow-burn alert.
                let b = &cfg.multi_carrier_burst;
                let familiar = self.familiar_days(plan, outcomes) >= b.familiar_days;
                let hr_cap = if familiar {
                    (self.th.high_risk_daily_cap as f64 * b.familiar_factor) as i64
                } else {
                    self.th.high_risk_daily_cap
                };
                let ld = level(d.total, policy.daily_cap);
                let lh = level(h.total, policy.hourly_cap);
                let lr = level(hr.total, hr_cap);
                if let Some(sev) = ld.max(lh).max(lr) {
                    let (g, cap, span, win) = if lr > ld.max(lh) {
                        (
                            &hr,
                            hr_cap,
                            "24 h to high-risk destinations outside business hours",
                            86_400_000,
                        )
                    } else if ld >= lh {
                        (&d, policy.daily_cap, "24 h", 86_400_000)
                    } else {
                        (&h, policy.hourly_cap, "hour", 3_600_000)
                    };
                    let mut f = base(Rule::SpendCap, sev, cust_scope.clone(), "spend_cap".into());
                    f.subject = cust_subject.clone();
                    f.evidence.spend = g.by.clone();
                    f.evidence.total_spend = g.total;
                    f.evidence.window = (now - win, now);
                    f.evidence.ranges = vec![remote.range.clone()];
                    f.evidence
                        .thresholds
                        .insert("daily_cap_eur".into(), format_amount(policy.daily_cap));
                    f.evidence
                        .thresholds
                        .insert("hourly_cap_eur".into(), format_amount(policy.hourly_cap));
                    f.evidence
                        .thresholds
                        .insert("warning_ratio".into(), ratio.to_string());
                    f.providers = active(&g.by);
                    f.magnitude = g.total;
                    f.summary = format!(
                        "Customer {who} spent an estimated {} in the last {span} across {} carrier(s) ({}); its cap is {}.",
                        format_eur(g.total),
                        f.providers.len(),
                        g.by.iter()
                            .map(|(k, v)| format!("{k} {}", format_eur(*v)))
                            .collect::<Vec<_>>()
                            .join(", "),
                        format_eur(cap)
                    );
                    f.action = format!(
                        "Bar international calls for customer {who} at {} until the customer confirms the traffic; last destination {pr}.",
                        f.providers.join(" and ")
                    );
                    out.push(f);
                }
            }
            // multi_carrier_burst
            let b = &cfg.multi_carrier_burst;
            if b.enabled && ci.hr_calls.is_some() && !plan.late {
                let calls = get(u, ci.hr_calls);
                let spend = get(u, ci.hr_spend);
                let lines = get(u, ci.hr_lines);
                let carriers = active(&calls.by);
                // Outside the customer's business hours less evidence is needed.
                let off_hours = policy
                    .business_hours
                    .as_ref()
                    .is_some_and(|h| !h.contains(now));
                let in_hours = policy
                    .business_hours
                    .as_ref()
                    .unwrap_or(&self.th.default_hours)
                    .contains(now);
                let familiar_days = self.familiar_days(plan, outcomes);
                let familiar = familiar_days >= b.familiar_days;
                let factor = if off_hours {
                    b.out_of_hours_factor
                } else if in_hours {
                    b.in_hours_factor
                } else {
                    1.0
                } * if familiar { b.familiar_factor } else { 1.0 };
                let scale = |v: i64| ((v as f64 * factor).ceil() as i64).max(2);
                // The customer's normal at this hour (or its peers'): the
                // thresholds are a deviation from it, never below the
                // constants.
                let bl = &b.baseline;
                let normal = self.expected_for(plan, outcomes, policy);
                let mu = normal
                    .as_ref()
                    .map_or(0.0, |x| x.calls_per_hour * b.window_s as f64 / 3600.0);
                let dev = |k: f64| (mu + k * mu.sqrt()).ceil() as i64;
                let warning_calls = scale(b.warning_calls).max(dev(bl.warning_sigmas));
                let critical_calls = scale(b.critical_calls)
                    .max(dev(bl.critical_sigmas))
                    .max(warning_calls);
                let critical_spend = match &normal {
                    Some(x) if x.calls_per_hour > 0.0 => self
                        .th
                        .burst_critical_spend
                        .max((x.spend_per_hour / x.calls_per_hour * critical_calls as f64) as i64),
                    _ => self.th.burst_critical_spend,
                };
                if carriers.len() >= b.min_carriers && calls.total >= warning_calls {
                    let sev = if calls.total >= critical_calls || spend.total >= critical_spend {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    };
                    let mut f = base(
                        Rule::MultiCarrierBurst,
                        sev,
                        cust_scope.clone(),
                        "multi_carrier_burst".into(),
                    );
                    f.subject = FindingSubject {
                        customer: Some(e.subject().clone()),
                        range: Some(remote.range.clone()),
                        country: Some(remote.country.clone()),
                        number: None,
                    };
                    let w = (b.window_s * 1000) as i64;
                    f.evidence.calls = calls.by.clone();
                    f.evidence.spend = spend.by.clone();
                    f.evidence.total_calls = calls.total;
                    f.evidence.total_spend = spend.total;
                    f.evidence.distinct_origins = lines.total;
                    f.evidence.window = (now - w, now);
                    f.evidence.ranges = vec![remote.range.clone()];
                    let t = &mut f.evidence.thresholds;
                    t.insert("window_s".into(), b.window_s.to_string());
                    t.insert("min_carriers".into(), b.min_carriers.to_string());
                    t.insert("warning_calls".into(), warning_calls.to_string());
                    t.insert("critical_calls".into(), critical_calls.to_string());
                    t.insert("outside_business_hours".into(), off_hours.to_string());
                    t.insert("inside_business_hours".into(), in_hours.to_string());
                    t.insert(
                        "days_calling_this_country".into(),
                        familiar_days.to_string(),
                    );
                    t.insert("critical_spend_eur".into(), format_amount(critical_spend));
                    t.insert("min_risk_tier".into(), b.min_risk_tier.as_str().into());
                    t.insert(
                        "baseline".into(),
                        normal.as_ref().map_or_else(
                            || "no history: consortium defaults".to_string(),
                            |x| x.basis.clone(),
                        ),
                    );
                    t.insert("expected_calls_in_window".into(), format!("{mu:.2}"));
                    f.providers = carriers.clone();
                    f.magnitude = calls.total;
                    f.summary = format!(
                        "Customer {who} made {} calls to {} risk destinations ({pr}, {}) through {} carriers at once ({}) within {} min, est. {}, from {} line(s); no single carrier saw more than {}.",
                        calls.total,
                        remote.risk_tier.as_str(),
                        remote.country,
                        carriers.len(),
                        carriers_list(&calls.by),
                        b.window_s / 60,
                        format_eur(spend.total),
                        lines.total,
                        calls.by.values().max().copied().unwrap_or(0),
                    );
                    f.action = format!(
                        "Block {pr} for customer {who} at {} now and check the customer's PBX for compromise (typical PBX hack).",
                        carriers.join(" and ")
                    );
                    out.push(f);
                }
            }
            // concurrency
            let c = &cfg.concurrency;
            if c.enabled && ci.overlap.is_some() && !plan.late {
                let ov = get(u, ci.overlap);
                if ov.total > policy.channels {
                    let sev = if ov.total as f64 >= policy.channels as f64 * c.critical_factor {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    };
                    let mut f = base(
                        Rule::Concurrency,
                        sev,
                        cust_scope.clone(),
                        "concurrency".into(),
                    );
                    f.subject = cust_subject.clone();
                    f.evidence.calls = ov.by.clone();
                    f.evidence.concurrent = ov.total;
                    f.evidence.total_calls = ov.total;
                    f.evidence.window = (now, now);
                    f.evidence
                        .thresholds
                        .insert("channels".into(), policy.channels.to_string());
                    f.evidence
                        .thresholds
                        .insert("critical_factor".into(), c.critical_factor.to_string());
                    f.providers = active(&ov.by);
                    f.magnitude = ov.total;
                    f.summary = format!(
                        "Customer {who} had {} simultaneous calls across {} carrier(s) ({}); its channel count is {}.",
                        ov.total,
                        f.providers.len(),
                        carriers_list(&ov.by),
                        policy.channels
                    );
                    f.action = format!(
                        "Limit customer {who} to {} channels across carriers and verify the traffic with the customer.",
                        policy.channels
                    );
                    out.push(f);
                }
            }
            // sequential_probe
            let sp = &cfg.sequential_probe;
            if sp.enabled && ci.probe.is_some() && !plan.late {
                let g = get(u, ci.probe);
                if g.total >= sp.warning_numbers {
                    let sev = if g.total >= sp.critical_numbers {
                        Severity::Critical
                    } else {
                        Severity::Warning
                    };
                    let mut f = base(
                        Rule::SequentialProbe,
                        sev,
                        cust_scope.clone(),
                        "sequential_probe".into(),
                    );
                    f.subject = FindingSubject {
                        customer: Some(e.subject().clone()),
                        range: Some(remote.range.clone()),
                        country: Some(remote.country.clone()),
                        number: None,
                    };
                    let w = (sp.window_s * 1000) as i64;
                    f.evidence.calls = g.by.clone();
                    f.evidence.total_calls = g.total;
                    f.evidence.distinct_origins = 1;
                    f.evidence.window = (now - w, now);
                    f.evidence.ranges = vec![remote.range.clone()];
                    let t = &mut f.evidence.thresholds;
                    t.insert("window_s".into(), sp.window_s.to_string());
                    t.insert("short_call_s".into(), sp.short_call_s.to_string());
                    t.insert("warning_numbers".into(), sp.warning_numbers.to_string());
                    t.insert("critical_numbers".into(), sp.critical_numbers.to_string());
                    f.providers = active(&g.by);
                    f.magnitude = g.total;
                    f.summary = format!(
                        "Customer {who} made short or unanswered calls to {} different numbers of one 100-number block in {pr} ({}) within {} min ({}): number scanning or test calls before pumping.",
                        g.total,
                        remote.country,
                        sp.window_s / 60,
                        carriers_list(&g.by)
                    );
                    f.action = format!(
                        "Watch customer {who} for long calls to {pr} and consider blocking {pr}; check the PBX for compromise."
                    );
                    out.push(f);
                }
            }
        }

        // destination_convergence
        if let Some((u, ri)) = plan.range.filter(|_| !plan.late) {
            let d = &cfg.destination_convergence;
            let cust = get(u, ri.customers);
            let carriers = active(&cust.by);
            let spend = get(u, ri.spend);
            if carriers.len() >= d.min_carriers
                && cust.total >= d.warning_customers
                && spend.total >= self.th.convergence_min_spend
            {
                let sev = if cust.total >= d.critical_customers {
                    Severity::Critical
                } else {
                    Severity::Warning
                };
                let calls = get(u, ri.calls);
                let mut f = base(
                    Rule::DestinationConvergence,
                    sev,
                    Scope::Range(remote.range.clone()),
                    "destination_convergence".into(),
                );
                f.subject = FindingSubject {
                    customer: None,
                    range: Some(remote.range.clone()),
                    country: Some(remote.country.clone()),
                    number: None,
                };
                let w = (d.window_s * 1000) as i64;
                f.evidence.customers = cust.by.clone();
                f.evidence.calls = calls.by.clone();
                f.evidence.spend = spend.by.clone();
                f.evidence.total_calls = calls.total;
                f.evidence.total_spend = spend.total;
                f.evidence.distinct_origins = cust.total;
                f.evidence.window = (now - w, now);
                f.evidence.ranges = vec![remote.range.clone()];
                let t = &mut f.evidence.thresholds;
                t.insert("window_s".into(), d.window_s.to_string());
                t.insert("warning_customers".into(), d.warning_customers.to_string());
                t.insert(
                    "critical_customers".into(),
                    d.critical_customers.to_string(),
                );
                t.insert("min_carriers".into(), d.min_carriers.to_string());
                t.insert("min_spend_eur".into(), d.min_spend_eur.clone());
                f.providers = carriers.clone();
                f.magnitude = cust.total;
                f.summary = format!(
                    "Range {pr} ({}, {} risk) was called by {} distinct customers through {} carriers within {} min (customers per carrier: {}), {} calls, est. {}; each carrier alone saw at most {}.",
                    remote.country,
                    remote.risk_tier.as_str(),
                    cust.total,
                    carriers.len(),
                    d.window_s / 60,
                    carriers_list(&cust.by),
                    calls.total,
                    format_eur(spend.total),
                    cust.by.values().max().copied().unwrap_or(0),
                );
                f.action = format!(
                    "Distributed IRSF campaign likely: block {pr} consortium-wide at {} and add it to the hot list if confirmed.",
                    carriers.join(", ")
                );
                out.push(f);
            }
        }

        // wangiri: a callback to a number that rang subscribers, or the wave
        let wg = &cfg.wangiri;
        let mut wangiri = |scope_range: &NumberInfo,
                           wave: Groups,
                           callbacks: Groups,
                           callback_now: bool| {
            let carriers = active(&wave.by);
            let wave_ok = wave.total >= wg.min_subscribers && carriers.len() >= wg.min_carriers;
            if !(wave_ok || callback_now) {
                return;
            }
            let sev = if callbacks.total >= wg.critical_callbacks {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let rp = pretty_range(&scope_range.range, scope_range.country_code);
            let mut f = base(
                Rule::Wangiri,
                sev,
                Scope::Range(scope_range.range.clone()),
                "wangiri".into(),
            );
            f.subject = FindingSubject {
                customer: None,
                range: Some(scope_range.range.clone()),
                country: Some(scope_range.country.clone()),
                number: None,
            };
            f.evidence.customers = wave.by.clone();
            f.evidence.calls = callbacks.by.clone();
            f.evidence.distinct_origins = wave.total;
            f.evidence.total_calls = callbacks.total;
            f.evidence.window = (now - (wg.window_s * 1000) as i64, now);
            f.evidence.ranges = vec![scope_range.range.clone()];
            let t = &mut f.evidence.thresholds;
            t.insert("window_s".into(), wg.window_s.to_string());
            t.insert("ring_max_s".into(), wg.ring_max_s.to_string());
            t.insert("min_subscribers".into(), wg.min_subscribers.to_string());
            t.insert(
                "critical_callbacks".into(),
                wg.critical_callbacks.to_string(),
            );
            let mut providers = carriers.clone();
            providers.extend(active(&callbacks.by));
            providers.sort();
            providers.dedup();
            f.providers = providers;
            f.magnitude = wave.total + 10 * callbacks.total;
            f.summary = format!(
                "Numbers in {rp} ({}) rang {} subscribers at {} carrier(s) with one-ring calls ({}); {} call(s) back to those numbers so far (Wangiri).",
                scope_range.country,
                wave.total,
                carriers.len(),
                carriers_list(&wave.by),
                callbacks.total
            );
            f.action = format!(
                "Block outgoing calls to {rp} consortium-wide and warn subscribers not to call back unknown foreign numbers."
            );
            out.push(f);
        };
        if let Some((u, ri)) = plan.range
            && ri.callback.is_some()
            && !plan.late
        {
            let hit = ri
                .callback
                .and_then(|i| outcomes.get(u).and_then(|o| o.results.get(i)))
                .map(OpResult::int)
                .unwrap_or(0)
                == 1;
            if hit {
                wangiri(remote, get(u, ri.wave), get(u, ri.callbacks), true);
            }
        }
        if let Some((u, wi)) = plan.wave.filter(|_| !plan.late) {
            wangiri(
                &e.caller_info,
                get(u, Some(wi.subscribers)),
                get(u, Some(wi.callbacks)),
                false,
            );
        }

        // long_duration
        let ld = &cfg.long_duration;
        if ld.enabled
            && e.direction == Direction::Outbound
            && remote.risk_tier >= ld.min_risk_tier
            && e.phase != Phase::Start
            && e.duration_s >= ld.warning_s as f64
        {
            let sev = if e.duration_s >= ld.critical_s as f64 {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let mut f = base(
                Rule::LongDuration,
                sev,
                cust_scope.clone(),
                "long_duration".into(),
            );
            f.subject = FindingSubject {
                customer: Some(e.subject().clone()),
                range: Some(remote.range.clone()),
                country: Some(remote.country.clone()),
                number: None,
            };
            f.evidence.calls = BTreeMap::from([(e.provider_id.clone(), 1)]);
            f.evidence.spend = BTreeMap::from([(e.provider_id.clone(), e.estimated_charge)]);
            f.evidence.total_calls = 1;
            f.evidence.total_spend = e.estimated_charge;
            f.evidence.window = (e.start_time, now);
            f.evidence.ranges = vec![remote.range.clone()];
            f.evidence
                .thresholds
                .insert("warning_s".into(), ld.warning_s.to_string());
            f.evidence
                .thresholds
                .insert("critical_s".into(), ld.critical_s.to_string());
            f.providers = vec![e.provider_id.clone()];
            f.magnitude = (e.duration_s / 60.0) as i64;
            f.summary = format!(
                "A call of customer {who} to {pr} ({}, {} risk) via {} has been up for {} min ({}), est. {}.",
                remote.country,
                remote.risk_tier.as_str(),
                e.provider_id,
                (e.duration_s / 60.0) as i64,
                if e.phase == Phase::End {
                    "ended"
                } else {
                    "still running"
                },
                format_eur(e.estimated_charge)
            );
            f.action = format!(
                "Release the call and check customer {who}'s PBX at {}; long calls to {pr} are typical of IRSF pumping.",
                e.provider_id
            );
            out.push(f);
        }

        // blocked_destination (policy)
        let bd = &cfg.blocked_destination;
        if bd.enabled && e.direction == Direction::Outbound {
            let blocked = policy
                .blocked_ranges
                .iter()
                .find(|p| remote.range.starts_with(p.as_str()))
                .cloned();
            let international = e.callee_info.country_code != e.caller_info.country_code;
            let outside = international
                && !policy.allowed_ranges.is_empty()
                && !policy.allowed_ranges.iter().any(|p| {
                    remote.range.starts_with(p.as_str()) || p.starts_with(remote.range.as_str())
                });
            if blocked.is_some() || outside {
                let mut f = base(
                    Rule::BlockedDestination,
                    bd.severity,
                    cust_scope.clone(),
                    format!("blocked_destination:{}", remote.range),
                );
                f.subject = FindingSubject {
                    customer: Some(e.subject().clone()),
                    range: Some(remote.range.clone()),
                    country: Some(remote.country.clone()),
                    number: None,
                };
                f.evidence.calls = BTreeMap::from([(e.provider_id.clone(), 1)]);
                f.evidence.total_calls = 1;
                f.evidence.total_spend = e.estimated_charge;
                f.evidence.window = (e.start_time, now);
                f.evidence.ranges = vec![remote.range.clone()];
                match &blocked {
                    Some(b) => f
                        .evidence
                        .thresholds
                        .insert("blocked_range".into(), b.clone()),
                    None => f
                        .evidence
                        .thresholds
                        .insert("allowed_ranges".into(), policy.allowed_ranges.join(" ")),
                };
                f.providers = vec![e.provider_id.clone()];
                f.magnitude = 1;
                f.summary = match &blocked {
                    Some(b) => format!(
                        "Customer {who} called {pr} ({}) via {}, a destination its policy blocks ({b}).",
                        remote.country, e.provider_id
                    ),
                    None => format!(
                        "Customer {who} called {pr} ({}) via {}, outside the destinations its policy allows.",
                        remote.country, e.provider_id
                    ),
                };
                f.action = format!(
                    "Block {pr} for customer {who} at every carrier, as its policy requires."
                );
                out.push(f);
            }
        }

        // hot_number
        let hcfg = &cfg.hot_number;
        if hcfg.enabled && e.direction == Direction::Outbound && !self.hot.is_empty() {
            let num = HotList::number_entry(&e.callee.value);
            let rng = HotList::range_entry(&remote.range);
            let hit = if self.hot.contains(&num) {
                Some((hcfg.number_severity, "number"))
            } else if self.hot.contains(&rng) {
                Some((hcfg.range_severity, "range"))
            } else {
                None
            };
            if let Some((sev, what)) = hit {
                let key = if what == "number" {
                    format!("hot_number:{num}")
                } else {
                    format!("hot_number:{rng}")
                };
                let mut f = base(Rule::HotNumber, sev, cust_scope.clone(), key);
                f.subject = FindingSubject {
                    customer: Some(e.subject().clone()),
                    range: Some(remote.range.clone()),
                    country: Some(remote.country.clone()),
                    number: (what == "number").then(|| e.callee.clone()),
                };
                f.evidence.calls = BTreeMap::from([(e.provider_id.clone(), 1)]);
                f.evidence.total_calls = 1;
                f.evidence.total_spend = e.estimated_charge;
                f.evidence.window = (e.start_time, now);
                f.evidence.ranges = vec![remote.range.clone()];
                f.evidence
                    .thresholds
                    .insert("hot_list_entry".into(), what.into());
                f.providers = vec![e.provider_id.clone()];
                f.magnitude = 1;
                f.summary = format!(
                    "Customer {who} called a {what} on the consortium hot list ({pr}, {}) via {}.",
                    remote.country, e.provider_id
                );
                f.action = format!(
                    "Block {pr} for customer {who} at {}: the destination was confirmed as fraud by the consortium.",
                    e.provider_id
                );
                out.push(f);
            }
        }
        out
    }
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

/// The ops of a customer's (or peer group's) long-lived history update,
/// kept for weeks unlike the windows. Writes: a call to a counted range
/// marks its day in the customer's days calling that country (`hd:<cc>`)
/// and, with baselines on, adds 1 (once per call) and its spend to the hour
/// bucket of its start (`bh`, groups `n` and `s`); every call abroad marks
/// its day active (`ad`; in a peer scope, the member active that day).
/// Reads, only for a counted call (where the burst rule looks): the days
/// calling that country, the smoothed hour slot in each past week and on
/// each past day, and the active days.
#[allow(clippy::too_many_arguments)]
fn profile_ops(
    b: &super::config::MultiCarrierBurst,
    e: &CallEvent,
    now: Millis,
    pn: Millis,
    counted: bool,
    call_key: &str,
    member: Option<&str>,
    call_ttl: i64,
) -> (Vec<Op>, ProfileIdx) {
    let bl = &b.baseline;
    let mut ops = Vec::new();
    let mut idx = ProfileIdx::default();
    let day = e.start_time.div_euclid(DAY);
    if counted && member.is_none() {
        // Per country, not per range: a travel agency booking hotels all
        // over Cuba every day knows Cuba, whichever range.
        let fw = b.familiar_window_days * DAY;
        let fkey = format!("hd:{}", e.remote().country_code);
        // One member per day, grouped by day, so the reader counts only
        // days up to the event's own (a backfill has later days already).
        ops.push(Op::Mark {
            key: fkey.clone(),
            group: day.to_string(),
            id: "d".into(),
            ts: e.start_time,
        });
        idx.familiar = Some(ops.len());
        ops.push(Op::Distinct {
            key: fkey,
            since: now - fw,
            prune_before: pn - fw,
        });
    }
    if !bl.enabled {
        return (ops, idx);
    }
    if counted {
        let ck = format!("bc:{call_key}");
        let first = ops.len();
        ops.push(Op::CallMax {
            key: ck.clone(),
            field: "n".into(),
            value: 1,
            ttl_ms: call_ttl,
        });
        ops.push(Op::CallMax {
            key: ck,
            field: "s".into(),
            value: e.estimated_charge,
            ttl_ms: call_ttl,
        });
        let h = e.start_time.div_euclid(HOUR);
        for (group, r) in [("n", first), ("s", first + 1)] {
            ops.push(Op::Add {
                key: "bh".into(),
                bucket: h,
                group: group.into(),
                delta: Val::Ref(r),
                when: None,
            });
        }
    }
    ops.push(Op::Mark {
        key: "ad".into(),
        group: day.to_string(),
        id: member.unwrap_or("1").to_string(),
        ts: e.start_time,
    });
    if counted {
        let h = now.div_euclid(HOUR);
        let sm = bl.smoothing_hours;
        let oldest = h - bl.weeks * 168 - sm - 1;
        let prune = pn.div_euclid(HOUR) - bl.weeks * 168 - sm - 1;
        for k in 1..=bl.weeks {
            idx.weeks.push(ops.len());
            ops.push(Op::Sum {
                key: "bh".into(),
                from: h - 168 * k - sm,
                to: h - 168 * k + sm,
                prune_before: prune.min(oldest),
            });
        }
        for j in 1..=bl.days {
            idx.days.push(ops.len());
            ops.push(Op::Sum {
                key: "bh".into(),
                from: h - 24 * j - sm,
                to: h - 24 * j + sm,
                prune_before: prune.min(oldest),
            });
        }
        idx.active = Some(ops.len());
        let span = (bl.weeks * 7 + 4) * DAY;
        ops.push(Op::Distinct {
            key: "ad".into(),
            since: now - span,
            prune_before: pn - span,
        });
    }
    (ops, idx)
}

/// What a profile says is normal at this hour: high-risk calls and spend
/// per hour, and how that was established.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    calls_per_hour: f64,
    spend_per_hour: f64,
    basis: String,
}

/// EWMA of `(calls, spend)` samples ordered most recent first.
fn ewma(samples: &[(f64, f64)], alpha: f64) -> (f64, f64) {
    let (mut w, mut c, mut s, mut total) = (alpha, 0.0, 0.0, 0.0);
    for (n, sp) in samples {
        c += w * n;
        s += w * sp;
        total += w;
        w *= 1.0 - alpha;
    }
    if total == 0.0 {
        (0.0, 0.0)
    } else {
        (c / total, s / total)
    }
}

/// Evaluates a profile's reads. `per_member`: divide by the members active
/// in the period (peer groups).
fn expected(
    bl: &super::config::Baseline,
    idx: &ProfileIdx,
    results: &[OpResult],
    now: Millis,
    per_member: bool,
) -> Option<Expected> {
    let groups = |i: usize| results.get(i).map(OpResult::groups).unwrap_or_default();
    let active = groups(idx.active?);
    let today = now.div_euclid(DAY);
    // Active days (or members per day) by day index.
    let on = |d: i64| active.by.get(&d.to_string()).copied().unwrap_or(0);
    let width = (2 * bl.smoothing_hours + 1) as f64;
    let sample = |i: usize, members: i64| {
        let g = groups(i);
        let n = g.by.get("n").copied().unwrap_or(0) as f64;
        let s = g.by.get("s").copied().unwrap_or(0) as f64;
        let m = if per_member {
            members.max(1) as f64
        } else {
            1.0
        };
        (n / width / m, s / width / m)
    };
    // The customer's history starts at its first active day in the span;
    // a slot counts once it was known by then (a slot it was known at but
    // silent is a true zero). A peer group's slot counts when it had
    // members that day.
    // Only days up to today count (a backfill has later days already).
    let past: Vec<i64> = active
        .by
        .iter()
        .filter(|(_, n)| **n > 0)
        .filter_map(|(d, _)| d.parse::<i64>().ok())
        .filter(|d| *d <= today)
        .collect();
    let first = past.iter().copied().min()?;
    if !per_member && (past.len() as i64) < bl.min_active_days {
        return None;
    }
    let known = |d: i64| {
        if per_member { on(d) > 0 } else { first <= d }
    };
    let mut weekly = Vec::new();
    for (k, &i) in idx.weeks.iter().enumerate() {
        let d = today - 7 * (k as i64 + 1);
        if known(d) {
            weekly.push(sample(i, on(d)));
        }
    }
    if !weekly.is_empty() {
        let (c, s) = ewma(&weekly, bl.alpha);
        return Some(Expected {
            calls_per_hour: c,
            spend_per_hour: s,
            basis: format!("hour-of-week profile over {} week(s)", weekly.len()),
        });
    }
    let mut daily = Vec::new();
    for (j, &i) in idx.days.iter().enumerate() {
        let d = today - (j as i64 + 1);
        if known(d) {
            daily.push(sample(i, on(d)));
        }
    }
    if daily.is_empty() {
        return None;
    }
    let (c, s) = ewma(&daily, bl.alpha);
    Some(Expected {
        calls_per_hour: c,
        spend_per_hour: s,
        basis: format!("hour-of-day profile over {} day(s)", daily.len()),
    })
}

/// A short or unanswered call (an END event; start/interim events of a call
/// never are).
fn is_short(e: &CallEvent, max_s: f64) -> bool {
    e.phase == Phase::End
        && (e
            .disposition
            .is_some_and(|d| d != crate::model::Disposition::Answered)
            || e.duration_s <= max_s)
}

fn lateness(cfg: &RulesConfig) -> i64 {
    (cfg.general.allowed_lateness_s * 1000) as i64
}
