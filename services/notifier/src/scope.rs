//! Who sees what: visibility and scoping of alerts per audience, and the
//! plain-language version for customers.
//!
//! * The consortium operator (and the operations team) sees everything.
//! * A carrier sees an incident only when its traffic is part of the
//!   evidence (it is in `alert.providers`). It then sees full figures for
//!   its own traffic and one aggregate entry, `"other carriers (N)"`, for the
//!   rest; the other carriers' names are removed from `providers`, the
//!   summary and the recommended action, and the trigger event is hidden
//!   unless it is its own.
//! * A customer gets a plain-language warning about its own phone system.

use tollguard_core::money::format_eur;
use tollguard_core::render::{alert_json, rule_name, severity_name};
use tollguard_proto::v1 as pb;

use crate::countries::country_name;

/// The party an alert is rendered for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Viewer {
    /// The consortium operator / operations team: everything.
    Operator,
    /// A carrier (provider id).
    Carrier(String),
    /// The affected customer.
    Customer,
}

/// Label of the aggregate entry for `n` other carriers.
pub fn others_label(n: usize) -> String {
    format!("other carriers ({n})")
}

/// Whether `viewer` may see the incident of `alert` at all (customers are
/// matched by the caller on `subject.customer`).
pub fn visible(alert: &pb::Alert, viewer: &Viewer) -> bool {
    match viewer {
        Viewer::Operator | Viewer::Customer => true,
        Viewer::Carrier(p) => alert.providers.iter().any(|x| x == p),
    }
}

fn add_money(a: &mut Option<pb::Money>, b: &Option<pb::Money>) {
    if let Some(b) = b {
        let e = a.get_or_insert_with(|| pb::Money {
            currency: b.currency.clone(),
            micros: 0,
        });
        e.micros += b.micros;
    }
}

fn micros(m: &Option<pb::Money>) -> i64 {
    m.as_ref().map_or(0, |m| m.micros)
}

/// Replaces whole-word occurrences of `word` in `text` by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    if word.is_empty() {
        return text.to_string();
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut prev: Option<char> = None;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().last().or(prev);
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_none_or(|c| !is_word(c)) && after.is_none_or(|c| !is_word(c)) {
            out.push_str(with);
        } else {
            out.push_str(word);
        }
        prev = word.chars().last();
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Human duration of a window, e.g. "15 minutes", "2 hours", "1 day".
pub fn window_text(alert: &pb::Alert) -> Option<String> {
    let ev = alert.evidence.as_ref()?;
    let (a, b) = match (&ev.window_start, &ev.window_end) {
        (Some(a), Some(b)) => (a, b),
        _ => match (&ev.first_event_time, &ev.last_event_time) {
            (Some(a), Some(b)) => (a, b),
            _ => return None,
        },
    };
    let secs = (b.seconds - a.seconds).max(0);
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    Some(if secs >= 86_400 && secs % 86_400 == 0 {
        plural(secs / 86_400, "day")
    } else if secs >= 3_600 && secs % 3_600 == 0 {
        plural(secs / 3_600, "hour")
    } else if secs >= 60 {
        plural((secs + 30) / 60, "minute")
    } else {
        plural(secs.max(1), "second")
    })
}

/// "+670 77" for the range "+67077".
pub fn range_text(range: &str) -> String {
    let digits = range.trim_start_matches('+');
    match tollguard_core::number::country_code_of(digits) {
        Some(cc) => {
            let cc = cc.to_string();
            let rest = &digits[cc.len().min(digits.len())..];
            if rest.is_empty() {
                format!("+{cc}")
            } else {
                format!("+{cc} {rest}")
            }
        }
        None => range.to_string(),
    }
}

/// "East Timor (+670 77)".
pub fn destination_text(alert: &pb::Alert) -> Option<String> {
    let s = alert.subject.as_ref()?;
    let range = if s.range.is_empty() {
        alert
            .evidence
            .as_ref()
            .and_then(|e| e.ranges.first().cloned())?
    } else {
        s.range.clone()
    };
    let country = country_name(&s.country).map(str::to_string);
    Some(match country {
        Some(c) => format!("{c} ({})", range_text(&range)),
        None => range_text(&range),
    })
}

/// The rule in words, e.g. "calls through several carriers at once".
pub fn rule_title(alert: &pb::Alert) -> &'static str {
    match pb::Rule::try_from(alert.rule) {
        Ok(pb::Rule::SpendCap) => "spend above the customer's cap",
        Ok(pb::Rule::MultiCarrierBurst) => "high-risk calls through several carriers at once",
        Ok(pb::Rule::DestinationConvergence) => "distributed calling campaign to one range",
        Ok(pb::Rule::Concurrency) => "more simultaneous calls than the customer's channels",
        Ok(pb::Rule::SequentialProbe) => "number scanning (sequential short calls)",
        Ok(pb::Rule::HotNumber) => "calls to a number or range on the consortium hot list",
        Ok(pb::Rule::Wangiri) => "one-ring (Wangiri) calls and callbacks",
        Ok(pb::Rule::LongDuration) => "a long call to a high-risk destination",
        Ok(pb::Rule::BlockedDestination) => "calls to a destination the customer's policy blocks",
        _ => "suspicious traffic",
    }
}

fn subject_text(alert: &pb::Alert) -> String {
    let s = alert.subject.clone().unwrap_or_default();
    let dest = destination_text(alert);
    match (&s.customer, dest) {
        (Some(c), Some(d)) => format!("customer {}:{} to {d}", c.key_id, c.value),
        (Some(c), None) => format!("customer {}:{}", c.key_id, c.value),
        (None, Some(d)) => d,
        (None, None) => "the consortium".into(),
    }
}

/// The alert as `viewer` may see it.
pub fn scope(alert: &pb::Alert, viewer: &Viewer) -> pb::Alert {
    match viewer {
        Viewer::Operator => alert.clone(),
        Viewer::Carrier(p) => scope_carrier(alert, p),
        Viewer::Customer => {
            let mut a = alert.clone();
            a.trigger_event_id.clear();
            a.trigger_provider_id.clear();
            a.summary = plain_language(alert);
            a.recommended_action = customer_action(alert);
            a
        }
    }
}

fn scope_carrier(alert: &pb::Alert, own: &str) -> pb::Alert {
    let mut a = alert.clone();
    let others: Vec<String> = {
        let mut v: Vec<String> = alert
            .providers
            .iter()
            .chain(
                alert
                    .evidence
                    .iter()
                    .flat_map(|e| e.carriers.iter().map(|c| &c.provider_id)),
            )
            .filter(|p| p.as_str() != own)
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let n = others.len();
    a.providers = alert
        .providers
        .iter()
        .filter(|p| p.as_str() == own)
        .cloned()
        .collect();
    if n > 0 {
        a.providers.push(others_label(n));
    }
    let mut own_ev = pb::CarrierEvidence::default();
    let mut agg = pb::CarrierEvidence {
        provider_id: others_label(n),
        ..Default::default()
    };
    if let Some(ev) = a.evidence.as_mut() {
        let mut kept = Vec::new();
        for c in &ev.carriers {
            if c.provider_id == own {
                own_ev.calls += c.calls;
                add_money(&mut own_ev.spend, &c.spend);
                kept.push(c.clone());
            } else {
                agg.calls += c.calls;
                add_money(&mut agg.spend, &c.spend);
                agg.distinct_customers += c.distinct_customers;
            }
        }
        if n > 0 && ev.carriers.iter().any(|c| c.provider_id != own) {
            kept.push(agg.clone());
        }
        ev.carriers = kept;
    }
    if a.trigger_provider_id != own {
        a.trigger_provider_id.clear();
        a.trigger_event_id.clear();
    }
    let mut action = alert.recommended_action.clone();
    for o in &others {
        action = replace_word(&action, o, "another carrier");
    }
    a.recommended_action = action;
    let ev = alert.evidence.clone().unwrap_or_default();
    let window = window_text(alert)
        .map(|w| format!(" within {w}"))
        .unwrap_or_default();
    let mut s = format!(
        "{}: {}: {} calls, est. {}{window}",
        capitalise(rule_title(alert)),
        subject_text(alert),
        ev.calls,
        format_eur(micros(&ev.estimated_spend)),
    );
    s.push_str(&format!(
        "; through your network: {} calls, est. {}",
        own_ev.calls,
        format_eur(micros(&own_ev.spend))
    ));
    if n > 0 {
        s.push_str(&format!(
            "; through {}: {} calls, est. {}",
            if n == 1 {
                "1 other carrier".to_string()
            } else {
                format!("{n} other carriers")
            },
            agg.calls,
            format_eur(micros(&agg.spend))
        ));
    }
    s.push('.');
    a.summary = s;
    a
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn carriers_text(alert: &pb::Alert) -> String {
    match alert.providers.len() {
        0 => String::new(),
        1 => " through 1 carrier".into(),
        n => format!(" through {n} carriers"),
    }
}

/// The plain-language warning for a customer, e.g. "Calls from your phone
/// system to East Timor (+670 77) through 2 carriers: an estimated EUR 44.42
/// in the last 15 minutes."
pub fn plain_language(alert: &pb::Alert) -> String {
    let ev = alert.evidence.clone().unwrap_or_default();
    let spend = format_eur(micros(&ev.estimated_spend));
    let last = window_text(alert)
        .map(|w| format!(" in the last {w}"))
        .unwrap_or_default();
    let to = destination_text(alert)
        .map(|d| format!(" to {d}"))
        .unwrap_or_default();
    let via = carriers_text(alert);
    match pb::Rule::try_from(alert.rule) {
        Ok(pb::Rule::Concurrency) => format!(
            "{} calls were running at the same time from your phone system{via}, more than your lines allow: an estimated {spend}{last}.",
            ev.concurrent_calls
        ),
        Ok(pb::Rule::LongDuration) => format!(
            "A call from your phone system{to}{via} has been running unusually long: an estimated {spend} so far."
        ),
        Ok(pb::Rule::SequentialProbe) => format!(
            "Your phone system made many short calls to consecutive numbers{to}{via}{last}: someone may be testing it before running up expensive calls."
        ),
        Ok(pb::Rule::BlockedDestination) => format!(
            "Calls from your phone system{to}{via}, a destination your policy blocks: an estimated {spend}{last}."
        ),
        Ok(pb::Rule::SpendCap) => format!(
            "Calls from your phone system{via} exceeded your spending limit: an estimated {spend}{last}."
        ),
        _ => format!("Calls from your phone system{to}{via}: an estimated {spend}{last}."),
    }
}

/// The recommended action in a customer's words.
pub fn customer_action(alert: &pb::Alert) -> String {
    let dest = destination_text(alert)
        .map(|d| format!("calls to {d}"))
        .unwrap_or_else(|| "international calls".into());
    format!(
        "Check your phone system (PBX) for unauthorised access now: change its passwords, disable \
         unused extensions and remote access, and ask your carriers to block {dest} until you \
         have confirmed the traffic."
    )
}

/// The JSON body of a webhook for `viewer`: `alert_json` of the scoped alert
/// plus `audience` (and, for customers, the plain-language `message`).
pub fn webhook_body(alert: &pb::Alert, viewer: &Viewer, audience: &str) -> String {
    let scoped = scope(alert, viewer);
    let mut v = alert_json(&scoped);
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "audience".into(),
            serde_json::Value::String(audience.into()),
        );
        if *viewer == Viewer::Customer {
            m.insert(
                "message".into(),
                serde_json::Value::String(format!(
                    "{} Recommended action: {}",
                    scoped.summary, scoped.recommended_action
                )),
            );
        }
    }
    v.to_string()
}

/// An e-mail: subject and plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// Subject (names the incident id and the severity).
    pub subject: String,
    /// Text body.
    pub body: String,
}

/// The e-mail for `viewer`.
pub fn email(alert: &pb::Alert, viewer: &Viewer) -> Mail {
    let scoped = scope(alert, viewer);
    let sev = severity_name(alert).to_uppercase();
    match viewer {
        Viewer::Customer => Mail {
            subject: format!(
                "[TollGuard {sev}] Suspected phone fraud on your lines (incident {})",
                alert.incident_id
            ),
            body: format!(
                "{}\n\nRecommended action: {}\n\nIncident: {} (severity {sev}, update {})\n\
                 This warning was sent by TollGuard on behalf of your carriers. Reply to your \
                 carrier's fraud desk quoting the incident id.\n",
                scoped.summary, scoped.recommended_action, alert.incident_id, alert.version
            ),
        },
        _ => {
            let ev = scoped.evidence.clone().unwrap_or_default();
            let mut body = format!(
                "{}\n\nRecommended action: {}\n\nIncident: {}  version {}  rule {}  severity {sev}\n",
                scoped.summary,
                scoped.recommended_action,
                alert.incident_id,
                alert.version,
                rule_name(alert)
            );
            for c in &ev.carriers {
                body.push_str(&format!(
                    "  {:<24} {:>6} calls  {}\n",
                    c.provider_id,
                    c.calls,
                    format_eur(micros(&c.spend))
                ));
            }
            body.push_str(
                "\nAcknowledge or resolve the incident through the TollGuard Alerts API.\n",
            );
            Mail {
                subject: format!(
                    "[TollGuard {sev}] {} - incident {}",
                    rule_title(alert),
                    alert.incident_id
                ),
                body,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Timestamp;

    fn money(eur_cents: i64) -> Option<pb::Money> {
        Some(pb::Money {
            currency: "EUR".into(),
            micros: eur_cents * 10_000,
        })
    }

    pub(crate) fn burst() -> pb::Alert {
        pb::Alert {
            incident_id: "inc-1".into(),
            version: 2,
            rule: pb::Rule::MultiCarrierBurst as i32,
            severity: pb::Severity::Critical as i32,
            kind: pb::AlertKind::Escalated as i32,
            subject: Some(pb::Subject {
                customer: Some(pb::Token {
                    key_id: "k1".into(),
                    value: "00112233445566778899aabbccddeeff".into(),
                }),
                range: "+67077".into(),
                country: "TL".into(),
                number: None,
            }),
            providers: vec!["bt".into(), "kpn".into(), "odido".into()],
            evidence: Some(pb::Evidence {
                carriers: vec![
                    pb::CarrierEvidence {
                        provider_id: "kpn".into(),
                        calls: 5,
                        spend: money(2000),
                        distinct_customers: 0,
                    },
                    pb::CarrierEvidence {
                        provider_id: "bt".into(),
                        calls: 7,
                        spend: money(2442),
                        distinct_customers: 0,
                    },
                    pb::CarrierEvidence {
                        provider_id: "odido".into(),
                        calls: 1,
                        spend: money(100),
                        distinct_customers: 0,
                    },
                ],
                estimated_spend: money(4542),
                calls: 13,
                window_start: Some(Timestamp {
                    seconds: 1_000,
                    nanos: 0,
                }),
                window_end: Some(Timestamp {
                    seconds: 1_900,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            summary: "Customer x made 13 calls through 3 carriers at once (bt 7, kpn 5, odido 1)"
                .into(),
            recommended_action: "Block +67077 for customer x at bt and kpn and odido now; debt."
                .into(),
            trigger_provider_id: "bt".into(),
            trigger_event_id: "bt-ev-9".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_carrier_sees_its_own_figures_and_an_aggregate() {
        let a = burst();
        assert!(visible(&a, &Viewer::Carrier("kpn".into())));
        assert!(!visible(&a, &Viewer::Carrier("vodafone".into())));
        let s = scope(&a, &Viewer::Carrier("kpn".into()));
        assert_eq!(s.providers, ["kpn", "other carriers (2)"]);
        let ev = s.evidence.unwrap();
        assert_eq!(ev.carriers.len(), 2);
        assert_eq!(ev.carriers[0].provider_id, "kpn");
        assert_eq!(ev.carriers[1].provider_id, "other carriers (2)");
        assert_eq!(ev.carriers[1].calls, 8);
        assert_eq!(ev.carriers[1].spend.as_ref().unwrap().micros, 25_420_000);
        assert_eq!(s.trigger_event_id, "");
        let text = format!("{} {} {:?}", s.summary, s.recommended_action, s.providers);
        assert!(!text.contains("bt ") && !text.contains("odido"), "{text}");
        assert!(text.contains("debt"), "word boundaries: {text}");
        assert!(s.recommended_action.contains("another carrier"), "{text}");
    }

    #[test]
    fn the_operator_sees_everything() {
        let a = burst();
        assert_eq!(scope(&a, &Viewer::Operator), a);
    }

    #[test]
    fn customers_get_plain_language() {
        let a = burst();
        let text = plain_language(&a);
        assert_eq!(
            text,
            "Calls from your phone system to East Timor (+670 77) through 3 carriers: an estimated EUR 45.42 in the last 15 minutes."
        );
        let m = email(&a, &Viewer::Customer);
        assert!(m.subject.contains("inc-1") && m.subject.contains("CRITICAL"));
        assert!(
            m.body
                .contains("Recommended action: Check your phone system")
        );
        let body: serde_json::Value =
            serde_json::from_str(&webhook_body(&a, &Viewer::Customer, "customer:NEC")).unwrap();
        assert!(body["message"].as_str().unwrap().starts_with("Calls from"));
        assert_eq!(body["audience"], "customer:NEC");
    }

    #[test]
    fn ranges_are_split_after_the_country_code() {
        assert_eq!(range_text("+67077"), "+670 77");
        assert_eq!(range_text("+3190"), "+31 90");
        assert_eq!(range_text("+1"), "+1");
    }
}
