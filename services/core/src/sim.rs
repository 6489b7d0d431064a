//! Seeded, deterministic consortium traffic with labelled fraud campaigns.
//!
//! `tollguard simulate` writes one JSON Lines file per carrier plus a labels
//! file; `tollguard demo` replays the `pbx2011` preset in memory. The four
//! carriers deliberately differ the way real feeds do: number formats
//! (national `0…`/`00…`, E.164, spaced), event styles (start/interim/end vs
//! CDR-only) and home countries.

use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone, Timelike};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::model::Millis;
use crate::record::RawRecord;
use crate::render::rfc3339;

/// How a carrier writes numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberStyle {
    /// `0…` national, `00…` international.
    National,
    /// `+…` E.164 everywhere.
    E164,
    /// Mixed `+…` and `00…`.
    Mixed,
    /// E.164 with spaces (`+31 30 123 4567`).
    Spaced,
}

/// How a carrier reports calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStyle {
    /// START at answer, INTERIM every `interim_s`, END.
    Phased,
    /// One END record per call (a CDR).
    CdrOnly,
}

/// One carrier of the simulated consortium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimCarrier {
    /// Carrier id.
    pub id: String,
    /// Home country (ISO).
    pub home_country: String,
    /// Home country calling code.
    pub home_cc: String,
    /// Number style.
    pub numbers: NumberStyle,
    /// Event style.
    pub events: EventStyle,
}

/// The default four carriers.
pub fn default_carriers() -> Vec<SimCarrier> {
    vec![
        SimCarrier {
            id: "kpn".into(),
            home_country: "NL".into(),
            home_cc: "31".into(),
            numbers: NumberStyle::National,
            events: EventStyle::Phased,
        },
        SimCarrier {
            id: "bt".into(),
            home_country: "GB".into(),
            home_cc: "44".into(),
            numbers: NumberStyle::E164,
            events: EventStyle::Phased,
        },
        SimCarrier {
            id: "vodafone".into(),
            home_country: "NL".into(),
            home_cc: "31".into(),
            numbers: NumberStyle::Mixed,
            events: EventStyle::CdrOnly,
        },
        SimCarrier {
            id: "odido".into(),
            home_country: "NL".into(),
            home_cc: "31".into(),
            numbers: NumberStyle::Spaced,
            events: EventStyle::Phased,
        },
    ]
}

/// A labelled campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Campaign id.
    pub campaign: String,
    /// Kind, e.g. `multi_carrier_pbx_hack`.
    pub kind: String,
    /// Customers involved (consortium ids).
    pub customers: Vec<String>,
    /// Destination ranges.
    pub ranges: Vec<String>,
    /// Carriers carrying the traffic.
    pub providers: Vec<String>,
    /// First fraudulent call (RFC 3339).
    pub start: String,
    /// Last fraudulent call start (RFC 3339).
    pub end: String,
    /// Event ids of the campaign's records, by provider (for scoring).
    #[serde(skip)]
    pub start_ms: Millis,
    /// Rules expected to fire.
    pub expected_rules: Vec<String>,
}

/// Scenario parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Seed.
    pub seed: u64,
    /// First day (00:00 UTC).
    pub start: Millis,
    /// Days of benign traffic.
    pub days: u32,
    /// Benign enterprises.
    pub enterprises: usize,
    /// Carriers.
    pub carriers: Vec<SimCarrier>,
    /// Seconds between interim events.
    pub interim_s: u32,
    /// Include the 2011 multi-carrier PBX hack.
    pub pbx_hack: bool,
    /// Include a distributed IRSF campaign.
    pub distributed_irsf: bool,
    /// Include the rest of the evaluation suite: probing then pumping,
    /// Wangiri with callbacks, a concurrency burst, a slow burn over days,
    /// and benign look-alikes (a call centre, a customer with real ties to a
    /// high-risk country).
    pub suite: bool,
}

impl Scenario {
    /// The `pbx2011` preset: the 2011 case among a few hundred benign
    /// enterprises over four days at four carriers.
    pub fn pbx2011(seed: u64) -> Self {
        Self {
            seed,
            // 2011-06-08T00:00:00Z
            start: 1_307_491_200_000,
            days: 4,
            enterprises: 300,
            carriers: default_carriers(),
            interim_s: 300,
            pbx_hack: true,
            distributed_irsf: false,
            suite: false,
        }
    }

    /// The `suite` preset: every labelled campaign kind and the benign
    /// look-alikes over a week (what `tollguard eval` scores).
    pub fn suite(seed: u64) -> Self {
        Self {
            days: 7,
            distributed_irsf: true,
            suite: true,
            ..Self::pbx2011(seed)
        }
    }

    /// The `consortium` preset: the 2011 case and a distributed IRSF
    /// campaign.
    pub fn consortium(seed: u64) -> Self {
        Self {
            distributed_irsf: true,
            ..Self::pbx2011(seed)
        }
    }
}

/// A simulated record and the carrier it is sent by.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRecord {
    /// Event time (for ordering).
    pub at: Millis,
    /// Carrier.
    pub provider: String,
    /// The record.
    pub record: RawRecord,
}

#[derive(Debug, Clone)]
struct Enterprise {
    id: String,
    carriers: Vec<usize>,
    lines: usize,
    calls_per_day: f64,
    intl_share: f64,
    tie: Option<(&'static str, usize)>,
}

/// Destination generators: (prefix, remaining digits).
const DOMESTIC_NL: &[(&str, usize)] = &[
    ("+3130", 7),
    ("+3120", 7),
    ("+3110", 7),
    ("+316", 8),
    ("+3170", 7),
];
const EU: &[(&str, usize)] = &[
    ("+322", 7),
    ("+4930", 8),
    ("+4420", 8),
    ("+331", 8),
    ("+3491", 7),
    ("+4179", 7),
    ("+4915", 9),
];
const WORLD: &[(&str, usize)] = &[
    ("+1212555", 4),
    ("+8621", 8),
    ("+9122", 8),
    ("+6129", 8),
    ("+2711", 7),
    ("+90212", 7),
];
/// Real-ties destinations for a few benign enterprises (including
/// high-risk countries: benign look-alikes).
const TIES: &[(&str, usize)] = &[
    ("+23480", 8),
    ("+6757", 7),
    ("+5372", 6),
    ("+2521", 6),
    ("+63917", 7),
];

struct Gen {
    rng: ChaCha8Rng,
    sc: Scenario,
    seq: u64,
}

impl Gen {
    fn number(&mut self, set: &[(&str, usize)]) -> String {
        let (p, n) = set[self.rng.random_range(0..set.len())];
        let mut s = p.to_string();
        for i in 0..n {
            let d = if i == 0 {
                self.rng.random_range(1..10)
            } else {
                self.rng.random_range(0..10)
            };
            s.push(char::from(b'0' + d as u8));
        }
        s
    }

    fn format(&mut self, c: &SimCarrier, e164: &str) -> String {
        let digits = &e164[1..];
        match c.numbers {
            NumberStyle::E164 => e164.to_string(),
            NumberStyle::National => match digits.strip_prefix(c.home_cc.as_str()) {
                Some(rest) => format!("0{rest}"),
                None => format!("00{digits}"),
            },
            NumberStyle::Mixed => {
                if self.rng.random_bool(0.5) {
                    e164.to_string()
                } else {
                    format!("00{digits}")
                }
            }
            NumberStyle::Spaced => {
                let mut out = String::from("+");
                for (i, ch) in digits.chars().enumerate() {
                    if i == 2 || i == 4 || i == 7 {
                        out.push(' ');
                    }
                    out.push(ch);
                }
                out
            }
        }
    }

    /// Emits the records of one call.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        out: &mut Vec<SimRecord>,
        ci: usize,
        customer: Option<&str>,
        line: &str,
        caller_e164: &str,
        callee_e164: &str,
        start: Millis,
        duration: f64,
        answered: bool,
    ) {
        let c = self.sc.carriers[ci].clone();
        self.seq += 1;
        let call_id = format!("{}-c{:08}", c.id, self.seq);
        let caller = self.format(&c, caller_e164);
        let callee = self.format(&c, callee_e164);
        let base = RawRecord {
            provider_id: Some(c.id.clone()),
            call_id: Some(call_id.clone()),
            customer_id: customer.map(str::to_string),
            line_id: Some(line.to_string()),
            caller: Some(caller),
            callee: Some(callee),
            direction: Some("outbound".into()),
            start_time: Some(rfc3339(start)),
            answer_time: answered.then(|| rfc3339(start)),
            ..Default::default()
        };
        let mut emit = |phase: &str, t: Millis, dur: f64, n: u32| {
            let mut r = base.clone();
            r.event_id = Some(format!("{call_id}-{n}"));
            r.phase = Some(phase.into());
            if phase != "start" {
                r.duration_s = Some(dur);
            }
            if phase == "end" {
                r.disposition = Some(if answered { "answered" } else { "no_answer" }.into());
            }
            out.push(SimRecord {
                at: t,
                provider: c.id.clone(),
                record: r,
            });
        };
        match c.events {
            EventStyle::CdrOnly => emit("end", start + (duration * 1000.0) as i64, duration, 0),
            EventStyle::Phased => {
                emit("start", start, 0.0, 0);
                let step = self.sc.interim_s as f64;
                let mut n = 1;
                let mut el = step;
                while answered && el < duration {
                    emit("interim", start + (el * 1000.0) as i64, el, n);
                    n += 1;
                    el += step;
                }
                emit("end", start + (duration * 1000.0) as i64, duration, n);
            }
        }
    }
}

/// Generated traffic: records sorted by event time, and labels.
#[derive(Debug, Clone, Default)]
pub struct SimOutput {
    /// Records in event-time order.
    pub records: Vec<SimRecord>,
    /// Labelled campaigns.
    pub labels: Vec<Label>,
}

fn exp(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    let u: f64 = rng.random_range(1e-9..1.0);
    -mean * u.ln()
}

/// The hacked enterprise of the 2011 case.
pub const PBX2011_CUSTOMER: &str = "kvk:30123456";
/// The East Timor range of the 2011 case.
pub const PBX2011_RANGE: &str = "+67077";

/// Generates a scenario.
pub fn generate(sc: &Scenario) -> SimOutput {
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(sc.seed),
        sc: sc.clone(),
        seq: 0,
    };
    let nc = sc.carriers.len();
    let mut ents = Vec::new();
    for i in 0..sc.enterprises {
        let first = g.rng.random_range(0..nc);
        let mut carriers = vec![first];
        if g.rng.random_bool(0.35) && nc > 1 {
            let second = (first + 1 + g.rng.random_range(0..nc - 1)) % nc;
            carriers.push(second);
        }
        let lines = g.rng.random_range(2..20usize);
        let tie = if g.rng.random_bool(0.04) {
            Some((TIES[g.rng.random_range(0..TIES.len())].0, TIES.len()))
        } else {
            None
        };
        ents.push(Enterprise {
            id: format!("kvk:{}", 40_000_000 + i * 7919 % 9_000_000 + i),
            carriers,
            lines,
            calls_per_day: lines as f64 * g.rng.random_range(3.0..9.0),
            intl_share: g.rng.random_range(0.03..0.25),
            tie,
        });
    }
    let mut out = SimOutput::default();
    let tz = chrono_tz::Europe::Amsterdam;
    for day in 0..sc.days {
        let day_start = sc.start + day as i64 * 86_400_000;
        let weekday = chrono::DateTime::from_timestamp_millis(day_start)
            .map(|d| d.with_timezone(&tz).weekday().number_from_monday())
            .unwrap_or(1);
        let weekend = weekday >= 6;
        for e in ents.clone() {
            let n = if weekend {
                e.calls_per_day * 0.08
            } else {
                e.calls_per_day
            };
            let n = (n + g.rng.random_range(-0.5..0.5)).max(0.0).round() as usize;
            for _ in 0..n {
                // Business hours 08:00-18:00 local, a few evening calls.
                let hour = if g.rng.random_bool(0.93) {
                    g.rng.random_range(8.0..18.0)
                } else {
                    g.rng.random_range(18.0..22.0)
                };
                let local = day_start + (hour * 3_600_000.0) as i64;
                // Amsterdam is UTC+2 in summer; shift back to UTC.
                let offset = chrono::DateTime::from_timestamp_millis(local)
                    .map(|d| {
                        let l = d.with_timezone(&tz);
                        (l.hour() as i64 - d.hour() as i64).rem_euclid(24)
                    })
                    .unwrap_or(0);
                let start = local - offset * 3_600_000;
                let ci = e.carriers[g.rng.random_range(0..e.carriers.len())];
                let r: f64 = g.rng.random();
                let callee = if let Some((tie, _)) = e.tie.filter(|_| r < 0.02) {
                    g.number(&[(tie, if tie.len() >= 6 { 6 } else { 7 })])
                } else if r < e.intl_share * 0.8 {
                    g.number(EU)
                } else if r < e.intl_share {
                    g.number(WORLD)
                } else {
                    g.number(DOMESTIC_NL)
                };
                let line_no = g.rng.random_range(0..e.lines);
                let caller = format!(
                    "+3130{:07}",
                    1_000_000 + (ents_index(&e.id) * 37 + line_no) % 8_999_999
                );
                let answered = g.rng.random_bool(0.86);
                let duration = if answered {
                    exp(&mut g.rng, 170.0).clamp(3.0, 5400.0).round()
                } else {
                    0.0
                };
                let line = format!("{}-pbx-{}", e.id.replace(':', ""), line_no % 4);
                g.call(
                    &mut out.records,
                    ci,
                    Some(&e.id),
                    &line,
                    &caller,
                    &callee,
                    start,
                    duration,
                    answered,
                );
            }
        }
    }
    if sc.pbx_hack {
        pbx_hack(&mut g, &mut out);
    }
    if sc.distributed_irsf {
        distributed_irsf(&mut g, &mut out, &ents);
    }
    if sc.suite {
        probe_then_pump(&mut g, &mut out);
        wangiri(&mut g, &mut out, &ents);
        concurrency_burst(&mut g, &mut out);
        slow_burn(&mut g, &mut out);
        call_centre(&mut g, &mut out);
        real_ties(&mut g, &mut out);
        holiday_peak(&mut g, &mut out);
        new_branch_abroad(&mut g, &mut out);
    }
    out.records.sort_by(|a, b| {
        a.at.cmp(&b.at)
            .then_with(|| a.record.event_id.cmp(&b.record.event_id))
    });
    out
}

fn ents_index(id: &str) -> usize {
    id.bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % 100_000
}

fn carrier_index(sc: &Scenario, id: &str) -> usize {
    sc.carriers.iter().position(|c| c.id == id).unwrap_or(0)
}

/// The 2011 case: from 00:47 local on the fourth night, intruders pump calls
/// from the enterprise's PBX to East Timor mobile numbers over both of its
/// carriers (voice at kpn, the data line at bt), up to eight channels.
fn pbx_hack(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let kpn = carrier_index(&sc, "kpn");
    let bt = carrier_index(&sc, "bt");
    let night = sc.start + (sc.days.saturating_sub(1) as i64) * 86_400_000;
    // 00:47 CEST = 22:47 UTC the previous day.
    let t0 = night - 73 * 60_000;
    let end = sc.start + sc.days as i64 * 86_400_000 + 6 * 3_600_000;
    let targets: Vec<String> = (0..5).map(|_| g.number(&[("+67077", 6)])).collect();
    // The enterprise's normal traffic (so it has history at both carriers).
    let mut channels = [t0; 8];
    for (ch, next) in channels.iter_mut().enumerate() {
        *next = t0 + ch as i64 * g.rng.random_range(20_000..50_000);
    }
    let mut first = i64::MAX;
    let mut last = 0;
    loop {
        let (ch, &start) = channels
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| **t)
            .expect("eight channels");
        if start >= end {
            break;
        }
        let ci = if ch % 2 == 0 { kpn } else { bt };
        let callee = targets[g.rng.random_range(0..targets.len())].clone();
        let duration = g.rng.random_range(240.0..1500.0f64).round();
        let line = if ci == kpn {
            "kvk30123456-sip-trunk-1"
        } else {
            "kvk30123456-dsl-voip"
        };
        g.call(
            &mut out.records,
            ci,
            Some(PBX2011_CUSTOMER),
            line,
            "+31302001000",
            &callee,
            start,
            duration,
            true,
        );
        first = first.min(start);
        last = last.max(start);
        channels[ch] = start + (duration * 1000.0) as i64 + g.rng.random_range(2_000..30_000);
    }
    out.labels.push(Label {
        campaign: "pbx-hack-2011".into(),
        kind: "multi_carrier_pbx_hack".into(),
        customers: vec![PBX2011_CUSTOMER.into()],
        ranges: vec![PBX2011_RANGE.into()],
        providers: vec![sc.carriers[kpn].id.clone(), sc.carriers[bt].id.clone()],
        start: rfc3339(first),
        end: rfc3339(last),
        start_ms: first,
        expected_rules: vec!["multi_carrier_burst".into(), "spend_cap".into()],
    });
}

/// A distributed IRSF campaign: a dozen compromised customers at three
/// carriers each place one or two calls to one Papua New Guinea range within
/// an hour — each carrier alone sees only a few.
fn distributed_irsf(g: &mut Gen, out: &mut SimOutput, ents: &[Enterprise]) {
    let sc = g.sc.clone();
    let t0 = sc.start + 86_400_000 + 14 * 3_600_000 + 5 * 60_000;
    let mut victims: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..12 {
        let e = &ents[(i * 23 + 5) % ents.len()];
        victims.insert(e.id.clone(), e.carriers[0]);
    }
    let mut providers = std::collections::BTreeSet::new();
    let mut last = t0;
    for (k, (id, ci)) in victims.iter().enumerate() {
        let calls = 1 + (k % 2);
        for j in 0..calls {
            let start = t0 + (k as i64) * 4 * 60_000 + j as i64 * 90_000;
            let callee = g.number(&[("+67571", 6)]);
            let line = format!("{}-pbx-0", id.replace(':', ""));
            let dur = g.rng.random_range(600.0..2400.0f64).round();
            g.call(
                &mut out.records,
                *ci,
                Some(id),
                &line,
                "+31301112233",
                &callee,
                start,
                dur,
                true,
            );
            providers.insert(sc.carriers[*ci].id.clone());
            last = last.max(start);
        }
    }
    out.labels.push(Label {
        campaign: "distributed-irsf-png".into(),
        kind: "distributed_irsf".into(),
        customers: victims.keys().cloned().collect(),
        ranges: vec!["+67571".into()],
        providers: providers.into_iter().collect(),
        start: rfc3339(t0),
        end: rfc3339(last),
        start_ms: t0,
        expected_rules: vec!["destination_convergence".into()],
    });
}

/// RFC 3339 helper for callers formatting label times.
pub fn utc(ms: Millis) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
}

impl Gen {
    /// An inbound call to `customer` from `caller_e164`, one END record.
    #[allow(clippy::too_many_arguments)]
    fn inbound(
        &mut self,
        out: &mut Vec<SimRecord>,
        ci: usize,
        customer: &str,
        line: &str,
        caller_e164: &str,
        callee_e164: &str,
        start: Millis,
        duration: f64,
    ) {
        let c = self.sc.carriers[ci].clone();
        self.seq += 1;
        let call_id = format!("{}-c{:08}", c.id, self.seq);
        let caller = self.format(&c, caller_e164);
        let callee = self.format(&c, callee_e164);
        out.push(SimRecord {
            at: start + (duration * 1000.0) as i64,
            provider: c.id.clone(),
            record: RawRecord {
                provider_id: Some(c.id.clone()),
                event_id: Some(format!("{call_id}-0")),
                call_id: Some(call_id),
                phase: Some("end".into()),
                customer_id: Some(customer.to_string()),
                line_id: Some(line.to_string()),
                caller: Some(caller),
                callee: Some(callee),
                direction: Some("inbound".into()),
                start_time: Some(rfc3339(start)),
                duration_s: Some(duration),
                disposition: Some(
                    if duration > 0.0 {
                        "answered"
                    } else {
                        "no_answer"
                    }
                    .into(),
                ),
                ..Default::default()
            },
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn label(
    kind: &str,
    campaign: &str,
    customers: Vec<String>,
    ranges: Vec<String>,
    providers: Vec<String>,
    first: Millis,
    last: Millis,
    rules: &[&str],
) -> Label {
    Label {
        campaign: campaign.into(),
        kind: kind.into(),
        customers,
        ranges,
        providers,
        start: rfc3339(first),
        end: rfc3339(last),
        start_ms: first,
        expected_rules: rules.iter().map(|r| r.to_string()).collect(),
    }
}

/// Local night hour `h` (Amsterdam summer time) of day `day` as UTC millis.
fn local(sc: &Scenario, day: u32, hour: f64) -> Millis {
    sc.start + day as i64 * 86_400_000 + ((hour - 2.0) * 3_600_000.0) as i64
}

/// Sequential probing of one Papua New Guinea block from a hacked PBX at one
/// carrier, then pumping long calls into the block.
fn probe_then_pump(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let ci = carrier_index(&sc, "odido");
    let cust = "kvk:51230001";
    let t0 = local(&sc, 1, 2.0 + 10.0 / 60.0);
    let mut t = t0;
    for i in 0..20 {
        g.call(
            &mut out.records,
            ci,
            Some(cust),
            "kvk51230001-pbx-0",
            "+31205550100",
            &format!("+675712345{i:02}"),
            t,
            3.0,
            false,
        );
        t += g.rng.random_range(15_000..40_000);
    }
    let pump_start = t + 120_000;
    let mut last = t;
    for ch in 0..4 {
        let mut tc = pump_start + ch * 45_000;
        while tc < pump_start + 3 * 3_600_000 {
            let dur = g.rng.random_range(1200.0..2400.0f64).round();
            let callee = format!("+675712345{:02}", g.rng.random_range(0..20));
            g.call(
                &mut out.records,
                ci,
                Some(cust),
                "kvk51230001-pbx-0",
                "+31205550100",
                &callee,
                tc,
                dur,
                true,
            );
            last = last.max(tc);
            tc += (dur * 1000.0) as i64 + 5_000;
        }
    }
    out.labels.push(label(
        "probe_then_pump",
        "probe-then-pump-png",
        vec![cust.into()],
        vec!["+67571".into()],
        vec![sc.carriers[ci].id.clone()],
        t0,
        last,
        &["sequential_probe", "long_duration", "spend_cap"],
    ));
}

/// Wangiri: one-ring calls from Ivory Coast numbers to 40 customers at every
/// carrier, then a few of them call back.
fn wangiri(g: &mut Gen, out: &mut SimOutput, ents: &[Enterprise]) {
    let sc = g.sc.clone();
    let t0 = local(&sc, 2, 19.0);
    let numbers: Vec<String> = (0..8).map(|_| g.number(&[("+22507", 8)])).collect();
    let mut providers = std::collections::BTreeSet::new();
    let mut victims = Vec::new();
    for i in 0..40 {
        let e = &ents[(i * 7 + 3) % ents.len()];
        let ci = e.carriers[0];
        let from = numbers[i % numbers.len()].clone();
        g.inbound(
            &mut out.records,
            ci,
            &e.id,
            &format!("{}-pbx-0", e.id.replace(':', "")),
            &from,
            "+31301234567",
            t0 + i as i64 * 40_000,
            0.0,
        );
        providers.insert(sc.carriers[ci].id.clone());
        victims.push((e.clone(), from));
    }
    let mut last = t0;
    for (k, (e, from)) in victims.iter().take(6).enumerate() {
        let start = t0 + 30 * 60_000 + k as i64 * 15 * 60_000;
        let dur = g.rng.random_range(120.0..400.0f64).round();
        g.call(
            &mut out.records,
            e.carriers[0],
            Some(&e.id),
            &format!("{}-pbx-1", e.id.replace(':', "")),
            "+31301234567",
            from,
            start,
            dur,
            true,
        );
        last = start;
    }
    out.labels.push(label(
        "wangiri",
        "wangiri-ci",
        victims.iter().map(|(e, _)| e.id.clone()).collect(),
        vec!["+22507".into()],
        providers.into_iter().collect(),
        t0,
        last,
        &["wangiri"],
    ));
}

/// A hacked PBX opens 70 simultaneous calls to UK personal numbers through
/// two carriers.
fn concurrency_burst(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let (a, b) = (carrier_index(&sc, "vodafone"), carrier_index(&sc, "odido"));
    let cust = "kvk:51230002";
    let t0 = local(&sc, 3, 21.0);
    let mut last = t0;
    for i in 0..70 {
        let ci = if i % 2 == 0 { a } else { b };
        let start = t0 + i as i64 * 4_000;
        g.call(
            &mut out.records,
            ci,
            Some(cust),
            &format!("kvk51230002-trunk-{}", i % 2),
            "+31105550100",
            &format!("+4470{:08}", 10_000_000 + i),
            start,
            900.0,
            true,
        );
        last = start;
    }
    out.labels.push(label(
        "concurrency_burst",
        "concurrency-uk070",
        vec![cust.into()],
        vec!["+4470".into()],
        vec![sc.carriers[a].id.clone(), sc.carriers[b].id.clone()],
        t0,
        last,
        &["concurrency"],
    ));
}

/// A slow burn: three calls a night to an international network number for
/// five nights, each too small to stand out.
fn slow_burn(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let ci = carrier_index(&sc, "kpn");
    let cust = "kvk:51230003";
    let target = g.number(&[("+88213", 6)]);
    let first = local(&sc, 1, 3.0);
    let mut last = first;
    for day in 1..6u32 {
        for k in 0..3 {
            let start = local(&sc, day, 3.0 + k as f64 * 0.7);
            let dur = g.rng.random_range(480.0..900.0f64).round();
            g.call(
                &mut out.records,
                ci,
                Some(cust),
                "kvk51230003-pbx-0",
                "+31205550300",
                &target,
                start,
                dur,
                true,
            );
            last = start;
        }
    }
    out.labels.push(label(
        "slow_burn",
        "slow-burn-882",
        vec![cust.into()],
        vec!["+88213".into()],
        vec![sc.carriers[ci].id.clone()],
        first,
        last,
        &["spend_cap"],
    ));
}

/// Benign look-alike: a call centre with heavy legitimate international
/// traffic at two carriers.
fn call_centre(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let (a, b) = (carrier_index(&sc, "kpn"), carrier_index(&sc, "bt"));
    let cust = "kvk:61230001";
    let dests: &[(&str, usize)] = &[
        ("+4420", 8),
        ("+4930", 8),
        ("+331", 8),
        ("+1212555", 4),
        ("+3491", 7),
        ("+23480", 8),
        ("+9122", 8),
    ];
    for day in 0..sc.days {
        for _ in 0..600 {
            let start = local(&sc, day, g.rng.random_range(8.0..20.0));
            let ci = if g.rng.random_bool(0.5) { a } else { b };
            let callee = g.number(dests);
            let dur = exp(&mut g.rng, 240.0).clamp(10.0, 1800.0).round();
            let line = format!("kvk61230001-agent-{}", g.rng.random_range(0..40));
            g.call(
                &mut out.records,
                ci,
                Some(cust),
                &line,
                "+31205559000",
                &callee,
                start,
                dur,
                true,
            );
        }
    }
    out.labels.push(label(
        "benign_lookalike",
        "call-centre",
        vec![cust.into()],
        vec![],
        vec![],
        sc.start,
        sc.start,
        &[],
    ));
}

/// Benign look-alike: a company with an office in Papua New Guinea that calls
/// it every business day through both its carriers.
fn real_ties(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let (a, b) = (carrier_index(&sc, "kpn"), carrier_index(&sc, "vodafone"));
    let cust = "kvk:61230002";
    let office: Vec<String> = (0..3).map(|_| g.number(&[("+6753", 6)])).collect();
    for day in 0..sc.days {
        // Office calls on working days (the scenario starts on a Wednesday).
        if matches!((day + 2) % 7, 5 | 6) {
            continue;
        }
        for _ in 0..8 {
            let start = local(&sc, day, g.rng.random_range(8.0..11.0));
            let ci = if g.rng.random_bool(0.5) { a } else { b };
            let callee = office[g.rng.random_range(0..office.len())].clone();
            let dur = exp(&mut g.rng, 300.0).clamp(20.0, 2400.0).round();
            g.call(
                &mut out.records,
                ci,
                Some(cust),
                "kvk61230002-pbx-0",
                "+31205559100",
                &callee,
                start,
                dur,
                true,
            );
        }
    }
    out.labels.push(label(
        "benign_lookalike",
        "png-office",
        vec![cust.into()],
        vec!["+6753".into()],
        vec![],
        sc.start,
        sc.start,
        &[],
    ));
}

/// Working-day calls from an office's desks to a set of numbers abroad,
/// through two carriers (the benign look-alikes below).
struct DeskCalls<'a> {
    customer: &'a str,
    carriers: (usize, usize),
    caller: &'a str,
    desks: u32,
    numbers: Vec<String>,
    /// Local hours of the day the calls fall in.
    hours: std::ops::Range<f64>,
    answer_rate: f64,
    mean_s: f64,
    duration_s: (f64, f64),
}

impl DeskCalls<'_> {
    /// `n` calls on `day`.
    fn day(&self, g: &mut Gen, out: &mut SimOutput, day: u32, n: usize) {
        let sc = g.sc.clone();
        let (a, b) = self.carriers;
        let line_prefix = self.customer.replace(':', "");
        for _ in 0..n {
            let start = local(&sc, day, g.rng.random_range(self.hours.clone()));
            let ci = if g.rng.random_bool(0.5) { a } else { b };
            let callee = self.numbers[g.rng.random_range(0..self.numbers.len())].clone();
            let answered = g.rng.random_bool(self.answer_rate);
            let dur = if answered {
                exp(&mut g.rng, self.mean_s)
                    .clamp(self.duration_s.0, self.duration_s.1)
                    .round()
            } else {
                0.0
            };
            let line = format!("{line_prefix}-desk-{}", g.rng.random_range(0..self.desks));
            g.call(
                &mut out.records,
                ci,
                Some(self.customer),
                &line,
                self.caller,
                &callee,
                start,
                dur,
                answered,
            );
        }
    }
}

/// A weekend day of the scenario (it starts on a Wednesday).
fn weekend(day: u32) -> bool {
    matches!((day + 2) % 7, 5 | 6)
}

/// Benign look-alike: a travel agency that books hotels in Cuba every
/// working day, and on the Monday before the holiday season calls them five
/// times as often, through both its carriers.
fn holiday_peak(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let cust = "kvk:61230003";
    let desks = DeskCalls {
        customer: cust,
        carriers: (carrier_index(&sc, "kpn"), carrier_index(&sc, "odido")),
        caller: "+31205559200",
        desks: 6,
        numbers: (0..25).map(|_| g.number(&[("+537", 7)])).collect(),
        hours: 9.0..17.5,
        answer_rate: 0.8,
        mean_s: 200.0,
        duration_s: (15.0, 1500.0),
    };
    for day in (0..sc.days).filter(|d| !weekend(*d)) {
        let monday = (day + 2) % 7 == 0;
        desks.day(g, out, day, if monday { 60 } else { 12 });
    }
    out.labels.push(label(
        "benign_lookalike",
        "holiday-peak",
        vec![cust.into()],
        vec!["+537".into()],
        vec![],
        sc.start,
        sc.start,
        &[],
    ));
}

/// Benign look-alike: an aid organisation that opens a branch office in
/// Somalia on the third day and from then on calls it from several desks
/// through two carriers (a first day of setting up, then routine).
fn new_branch_abroad(g: &mut Gen, out: &mut SimOutput) {
    let sc = g.sc.clone();
    let cust = "kvk:61230004";
    let desks = DeskCalls {
        customer: cust,
        carriers: (carrier_index(&sc, "vodafone"), carrier_index(&sc, "kpn")),
        caller: "+31205559300",
        desks: 5,
        numbers: (0..4).map(|_| g.number(&[("+2521", 6)])).collect(),
        hours: 9.0..17.0,
        answer_rate: 0.7,
        mean_s: 360.0,
        duration_s: (20.0, 2400.0),
    };
    for day in (2..sc.days).filter(|d| !weekend(*d)) {
        desks.day(g, out, day, if day == 2 { 20 } else { 12 });
    }
    out.labels.push(label(
        "benign_lookalike",
        "new-branch-abroad",
        vec![cust.into()],
        vec!["+2521".into()],
        vec![],
        sc.start,
        sc.start,
        &[],
    ));
}
