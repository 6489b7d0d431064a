//! Shared by the memory and Redis variants of the rules reference test: a
//! naive reference computation of every rule over the set of distinct events
//! seen so far, and a generator of random call sequences.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashSet};

use proptest::prelude::*;
use tollguard_core::model::*;
use tollguard_core::rules::config::Severity;
use tollguard_core::rules::{Detector, HotList, Policies, Rule, RulesConfig};
use tollguard_core::store::WindowStore;

const MIN: i64 = 60_000;
const T0: i64 = 1_307_746_020_000;

fn rules() -> RulesConfig {
    let mut r = RulesConfig::default();
    r.general.allowed_lateness_s = 120;
    r.multi_carrier_burst.warning_calls = 2;
    r.multi_carrier_burst.critical_calls = 4;
    r.multi_carrier_burst.critical_spend_eur = "5.00".into();
    r.multi_carrier_burst.window_s = 600;
    r.destination_convergence.warning_customers = 2;
    r.destination_convergence.critical_customers = 3;
    r.destination_convergence.window_s = 900;
    r.destination_convergence.min_spend_eur = "2.00".into();
    r.concurrency.default_channels = 2;
    r.concurrency.open_call_horizon_s = 300;
    r.spend_cap.hourly_cap_eur = "8.00".into();
    r.spend_cap.daily_cap_eur = "20.00".into();
    r.sequential_probe.warning_numbers = 3;
    r.sequential_probe.critical_numbers = 5;
    r.sequential_probe.short_call_s = 30.0;
    r
}

fn tok(v: &str) -> Token {
    Token {
        key_id: "k1".into(),
        value: v.into(),
    }
}

fn info(range: &str, tier: RiskTier) -> NumberInfo {
    NumberInfo {
        country: "TL".into(),
        country_code: 670,
        range: range.into(),
        number_type: NumberType::Mobile,
        risk_tier: tier,
        unallocated: false,
    }
}

/// A call: (provider, customer, range idx, start offset s, duration s, phased,
/// charge cents/min, (block, offset in block))
pub type CallSpec = (usize, usize, usize, i64, i64, bool, i64, (usize, u32));

fn events_of(i: usize, c: &CallSpec) -> Vec<CallEvent> {
    let (p, cust, r, off, dur, phased, rate, (blk, boff)) = *c;
    let provider = ["kpn", "bt", "odido"][p].to_string();
    let (range, tier) = [("+67077", RiskTier::High), ("+3130", RiskTier::Low)][r];
    let start = T0 + off * 1000;
    let mk = |phase: Phase, d: f64, n: usize| CallEvent {
        provider_id: provider.clone(),
        event_id: format!("e{i}-{n}"),
        call_id: format!("c{i}"),
        phase,
        customer: Some(tok(&format!("cust{cust}"))),
        line: tok(&format!("line{p}{cust}")),
        caller: tok("a"),
        callee: tok("b"),
        callee_info: info(range, tier),
        caller_info: info("+3130", RiskTier::Low),
        direction: Direction::Outbound,
        start_time: start,
        answer_time: Some(start),
        duration_s: d,
        disposition: (phase == Phase::End).then_some(Disposition::Answered),
        source_ip: None,
        charge: None,
        estimated_charge: (rate * 10_000) * d as i64 / 60,
        callee_block: tok(&format!("blk{blk}")),
        callee_block_offset: boff,
        ingested_at: 0,
    };
    if phased {
        let mut v = vec![mk(Phase::Start, 0.0, 0)];
        let mut n = 1;
        let mut el = 120;
        while el < dur {
            v.push(mk(Phase::Interim, el as f64, n));
            n += 1;
            el += 120;
        }
        v.push(mk(Phase::End, dur as f64, n));
        v
    } else {
        vec![mk(Phase::End, dur as f64, 0)]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Obs {
    rule: &'static str,
    severity: Severity,
    calls: BTreeMap<String, i64>,
    total_spend: i64,
    origins: i64,
    concurrent: i64,
}

fn bucket(t: i64, w: i64) -> i64 {
    t.div_euclid(w)
}

/// The naive reference: recompute every aggregate from the applied events.
fn reference(cfg: &RulesConfig, seen: &[CallEvent], e: &CallEvent) -> BTreeSet<Obs> {
    let mut out = BTreeSet::new();
    let now = e.phase_time();
    let cust = e.subject();
    // Per call of this customer: provider, start, max charge, high risk?
    let mut calls: BTreeMap<String, (String, i64, i64, bool)> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.subject() == cust) {
        let c = calls.entry(s.call_key()).or_insert((
            s.provider_id.clone(),
            s.start_time,
            0,
            s.callee_info.risk_tier >= RiskTier::High,
        ));
        c.2 = c.2.max(s.estimated_charge);
    }
    let sum_spend = |from: i64, to: i64, w: i64| -> BTreeMap<String, i64> {
        let mut m = BTreeMap::new();
        for (p, st, ch, _) in calls.values() {
            let b = bucket(*st, w);
            if b >= from && b <= to && *ch != 0 {
                *m.entry(p.clone()).or_insert(0) += ch;
            }
        }
        m
    };
    // spend_cap
    let h = sum_spend(bucket(now - 3_600_000, MIN) + 1, bucket(now, MIN), MIN);
    let d = sum_spend(
        bucket(now - 86_400_000, 15 * MIN) + 1,
        bucket(now, 15 * MIN),
        15 * MIN,
    );
    let (ht, dt): (i64, i64) = (h.values().sum(), d.values().sum());
    let th = cfg.validate().unwrap();
    let lvl = |v: i64, cap: i64| {
        if v >= cap {
            Some(Severity::Critical)
        } else if v as f64 >= cap as f64 * cfg.spend_cap.warning_ratio {
            Some(Severity::Warning)
        } else {
            None
        }
    };
    let (ld, lh) = (lvl(dt, th.daily_cap), lvl(ht, th.hourly_cap));
    if let Some(sev) = ld.max(lh) {
        let total = if ld >= lh { dt } else { ht };
        out.insert(Obs {
            rule: "spend_cap",
            severity: sev,
            calls: BTreeMap::new(),
            total_spend: total,
            origins: 0,
            concurrent: 0,
        });
    }
    // multi_carrier_burst (only evaluated for high-risk events)
    let b = &cfg.multi_carrier_burst;
    if e.callee_info.risk_tier >= b.min_risk_tier {
        let w = b.window_s as i64 * 1000;
        let (from, to) = (bucket(now - w, MIN) + 1, bucket(now, MIN));
        let mut n: BTreeMap<String, i64> = BTreeMap::new();
        let mut spend = 0;
        for (p, st, ch, hr) in calls.values() {
            let bk = bucket(*st, MIN);
            if *hr && bk >= from && bk <= to {
                *n.entry(p.clone()).or_insert(0) += 1;
                spend += ch;
            }
        }
        let lines: HashSet<&str> = seen
            .iter()
            .filter(|s| s.subject() == cust && s.callee_info.risk_tier >= b.min_risk_tier)
            .filter(|s| s.phase_time() >= now - w)
            .map(|s| s.line.value.as_str())
            .collect();
        let total: i64 = n.values().sum();
        if n.len() >= b.min_carriers && total >= b.warning_calls {
            let sev = if total >= b.critical_calls || spend >= th.burst_critical_spend {
                Severity::Critical
            } else {
                Severity::Warning
            };
            out.insert(Obs {
                rule: "multi_carrier_burst",
                severity: sev,
                calls: n,
                total_spend: spend,
                origins: lines.len() as i64,
                concurrent: 0,
            });
        }
    }
    // concurrency
    let horizon = cfg.concurrency.open_call_horizon_s as i64 * 1000;
    let mut spans: BTreeMap<String, (String, i64, i64, bool)> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.subject() == cust) {
        let st = s.answer_time.unwrap_or(s.start_time);
        let sp =
            spans
                .entry(s.call_key())
                .or_insert((s.provider_id.clone(), st, s.phase_time(), false));
        sp.1 = sp.1.min(st);
        sp.2 = sp.2.max(s.phase_time());
        sp.3 |= s.phase == Phase::End;
    }
    let mut conc: BTreeMap<String, i64> = BTreeMap::new();
    for (p, st, end, closed) in spans.values() {
        let until = if *closed { *end } else { end + horizon };
        if *st <= now && now <= until {
            *conc.entry(p.clone()).or_insert(0) += 1;
        }
    }
    let ct: i64 = conc.values().sum();
    if ct > cfg.concurrency.default_channels {
        let sev = if ct as f64
            >= cfg.concurrency.default_channels as f64 * cfg.concurrency.critical_factor
        {
            Severity::Critical
        } else {
            Severity::Warning
        };
        out.insert(Obs {
            rule: "concurrency",
            severity: sev,
            calls: conc,
            total_spend: 0,
            origins: 0,
            concurrent: ct,
        });
    }
    // destination_convergence
    let dc = &cfg.destination_convergence;
    if e.callee_info.risk_tier >= dc.min_risk_tier {
        let w = dc.window_s as i64 * 1000;
        let mut by: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut all = BTreeSet::new();
        for s in seen
            .iter()
            .filter(|s| s.callee_info.range == e.callee_info.range)
        {
            if s.phase_time() >= now - w {
                by.entry(s.provider_id.clone())
                    .or_default()
                    .insert(s.subject().compact());
                all.insert(s.subject().compact());
            }
        }
        let total = all.len() as i64;
        if by.len() >= dc.min_carriers && total >= dc.warning_customers {
            let sev = if total >= dc.critical_customers {
                Severity::Critical
            } else {
                Severity::Warning
            };
            // Calls per carrier in the range window (by start bucket); the
            // spend floor is checked on their estimated charges.
            let (from, to) = (bucket(now - w, MIN) + 1, bucket(now, MIN));
            let mut rc: BTreeMap<String, (String, i64, i64)> = BTreeMap::new();
            for s in seen
                .iter()
                .filter(|s| s.callee_info.range == e.callee_info.range)
            {
                let c = rc
                    .entry(s.call_key())
                    .or_insert((s.provider_id.clone(), s.start_time, 0));
                c.2 = c.2.max(s.estimated_charge);
            }
            let mut calls = BTreeMap::new();
            let mut spend = 0;
            for (p, st, ch) in rc.values() {
                let bk = bucket(*st, MIN);
                if bk >= from && bk <= to {
                    *calls.entry(p.clone()).or_insert(0) += 1;
                    spend += ch;
                }
            }
            if spend >= th.convergence_min_spend {
                out.insert(Obs {
                    rule: "destination_convergence",
                    severity: sev,
                    calls,
                    total_spend: spend,
                    origins: total,
                    concurrent: 0,
                });
            }
        }
    }
    // sequential_probe: distinct offsets of short calls in the event's block.
    let sp = &cfg.sequential_probe;
    let short = |s: &CallEvent| s.phase == Phase::End && s.duration_s <= sp.short_call_s;
    if sp.enabled && short(e) {
        let w = sp.window_s as i64 * 1000;
        let mut by: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        let mut all = BTreeSet::new();
        for s in seen
            .iter()
            .filter(|s| s.subject() == cust && short(s) && s.callee_block == e.callee_block)
        {
            if s.phase_time() >= now - w {
                by.entry(s.provider_id.clone())
                    .or_default()
                    .insert(s.callee_block_offset);
                all.insert(s.callee_block_offset);
            }
        }
        let total = all.len() as i64;
        if total >= sp.warning_numbers {
            out.insert(Obs {
                rule: "sequential_probe",
                severity: if total >= sp.critical_numbers {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                calls: by.into_iter().map(|(k, v)| (k, v.len() as i64)).collect(),
                total_spend: 0,
                origins: 1,
                concurrent: 0,
            });
        }
    }
    // long_duration: a pure check of the event.
    let ld = &cfg.long_duration;
    if e.callee_info.risk_tier >= ld.min_risk_tier
        && e.phase != Phase::Start
        && e.duration_s >= ld.warning_s as f64
    {
        out.insert(Obs {
            rule: "long_duration",
            severity: if e.duration_s >= ld.critical_s as f64 {
                Severity::Critical
            } else {
                Severity::Warning
            },
            calls: BTreeMap::from([(e.provider_id.clone(), 1)]),
            total_spend: e.estimated_charge,
            origins: 0,
            concurrent: 0,
        });
    }
    out
}

fn observed(f: &tollguard_core::rules::Finding) -> Obs {
    let rule = match f.rule {
        Rule::SpendCap => "spend_cap",
        Rule::MultiCarrierBurst => "multi_carrier_burst",
        Rule::Concurrency => "concurrency",
        Rule::DestinationConvergence => "destination_convergence",
        Rule::SequentialProbe => "sequential_probe",
        Rule::LongDuration => "long_duration",
        other => panic!("unexpected rule {other:?}"),
    };
    let calls = if matches!(f.rule, Rule::SpendCap) {
        BTreeMap::new()
    } else {
        f.evidence
            .calls
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    Obs {
        rule,
        severity: f.severity,
        calls,
        total_spend: if matches!(f.rule, Rule::Concurrency) {
            0
        } else {
            f.evidence.total_spend
        },
        origins: if matches!(f.rule, Rule::SpendCap | Rule::Concurrency) {
            0
        } else {
            f.evidence.distinct_origins
        },
        concurrent: f.evidence.concurrent,
    }
}

pub fn call_spec() -> impl Strategy<Value = CallSpec> {
    (
        0..3usize,
        0..3usize,
        0..2usize,
        0..1800i64,
        prop_oneof![4 => 1..40i64, 4 => 40..900i64, 1 => 2600..6000i64],
        any::<bool>(),
        20..300i64,
        (0..2usize, 0..12u32),
    )
}

/// Runs one case: events of `calls`, with every `dup_every`-th event re-sent,
/// shuffled within the allowed lateness by `jitter_seed`, through `store`;
/// every evaluation must equal the reference.
pub fn run_case(
    store: &dyn WindowStore,
    rt: &tokio::runtime::Runtime,
    calls: &[CallSpec],
    jitter_seed: u64,
    dup_every: usize,
) -> Result<(), TestCaseError> {
    let cfg = rules();
    let lateness = cfg.general.allowed_lateness_s as i64 * 1000;
    let det = Detector::new(cfg.clone(), Policies::default(), HotList::default()).unwrap();
    let mut evs: Vec<CallEvent> = calls
        .iter()
        .enumerate()
        .flat_map(|(i, c)| events_of(i, c))
        .collect();
    // Re-send some events (duplicates).
    let dups: Vec<CallEvent> = evs.iter().step_by(dup_every).cloned().collect();
    evs.extend(dups);
    // Shuffle within the allowed lateness: order by phase time + jitter < lateness.
    let mut x = jitter_seed | 1;
    let mut keyed: Vec<(i64, CallEvent)> = evs
        .into_iter()
        .map(|e| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((e.phase_time() + (x % lateness as u64) as i64), e)
        })
        .collect();
    keyed.sort_by_key(|(k, _)| *k);
    let mut seen: Vec<CallEvent> = Vec::new();
    let mut keys = HashSet::new();
    for (_, e) in keyed {
        let plan = det.plan(&e);
        let outcomes = rt.block_on(store.apply(&plan.updates)).unwrap();
        let first = keys.insert(e.event_key());
        prop_assert_eq!(
            outcomes.iter().all(|o| o.duplicate),
            !first,
            "dedupe of {}",
            e.event_key()
        );
        if first {
            seen.push(e.clone());
        }
        let got: BTreeSet<Obs> = det
            .evaluate(&e, &plan, &outcomes)
            .iter()
            .map(observed)
            .collect();
        let want = reference(&cfg, &seen, &e);
        prop_assert_eq!(got, want, "event {} at {}", e.event_key(), e.phase_time());
    }
    Ok(())
}
