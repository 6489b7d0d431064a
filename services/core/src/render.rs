//! Human and JSON renderings of alerts, for the CLI, logs and webhooks.

use serde_json::{Value, json};
use tollguard_proto::v1 as pb;

use crate::codec::from_ts;
use crate::money::format_amount;

/// RFC 3339 of epoch millis.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn t(x: &Option<prost_types::Timestamp>) -> Value {
    x.as_ref()
        .map(|t| Value::String(rfc3339(from_ts(t))))
        .unwrap_or(Value::Null)
}

fn name<T: std::fmt::Debug>(v: Result<T, prost::UnknownEnumValue>) -> String {
    match v {
        Ok(v) => snake(&format!("{v:?}")),
        Err(_) => "unspecified".into(),
    }
}

fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Rule name (snake_case) of an alert.
pub fn rule_name(a: &pb::Alert) -> String {
    name(pb::Rule::try_from(a.rule))
}

/// Severity name of an alert.
pub fn severity_name(a: &pb::Alert) -> String {
    name(pb::Severity::try_from(a.severity))
}

/// Kind name of an alert.
pub fn kind_name(a: &pb::Alert) -> String {
    name(pb::AlertKind::try_from(a.kind))
}

fn money(m: &Option<pb::Money>) -> Value {
    m.as_ref()
        .map(|m| json!({"amount": format_amount(m.micros), "currency": m.currency}))
        .unwrap_or(Value::Null)
}

fn token(t: &Option<pb::Token>) -> Value {
    t.as_ref()
        .map(|t| Value::String(format!("{}:{}", t.key_id, t.value)))
        .unwrap_or(Value::Null)
}

/// The JSON form of an alert (stable field names; documented in
/// docs/alerts.md).
pub fn alert_json(a: &pb::Alert) -> Value {
    let ev = a.evidence.clone().unwrap_or_default();
    let subj = a.subject.clone().unwrap_or_default();
    let mut thresholds: Vec<_> = ev.thresholds.iter().collect();
    thresholds.sort();
    json!({
        "incident_id": a.incident_id,
        "version": a.version,
        "rule": rule_name(a),
        "severity": severity_name(a),
        "kind": kind_name(a),
        "subject": {
            "customer": token(&subj.customer),
            "range": subj.range,
            "country": subj.country,
            "number": token(&subj.number),
        },
        "providers": a.providers,
        "evidence": {
            "carriers": ev.carriers.iter().map(|c| json!({
                "provider_id": c.provider_id,
                "calls": c.calls,
                "spend": money(&c.spend),
                "distinct_customers": c.distinct_customers,
            })).collect::<Vec<_>>(),
            "distinct_origins": ev.distinct_origins,
            "estimated_spend": money(&ev.estimated_spend),
            "calls": ev.calls,
            "concurrent_calls": ev.concurrent_calls,
            "first_event_time": t(&ev.first_event_time),
            "last_event_time": t(&ev.last_event_time),
            "window_start": t(&ev.window_start),
            "window_end": t(&ev.window_end),
            "thresholds": thresholds.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "ranges": ev.ranges,
        },
        "summary": a.summary,
        "recommended_action": a.recommended_action,
        "detected_at": t(&a.detected_at),
        "opened_at": t(&a.opened_at),
        "published_at": t(&a.published_at),
        "trigger": {"provider_id": a.trigger_provider_id, "event_id": a.trigger_event_id},
    })
}

/// One readable line per alert: time, severity, rule, summary.
pub fn alert_line(a: &pb::Alert) -> String {
    let at = a
        .detected_at
        .as_ref()
        .map(|x| rfc3339(from_ts(x)))
        .unwrap_or_default();
    format!(
        "{at}  {:<8} {:<9} {:<24} {} v{}\n    {}\n    action: {}",
        severity_name(a).to_uppercase(),
        kind_name(a),
        rule_name(a),
        a.incident_id,
        a.version,
        a.summary,
        a.recommended_action
    )
}
