//! Bad input: every field of the partner record (DESIGN §3) refused with an
//! error naming it; CSV mapping; the ingest path end to end.

use std::sync::Arc;

use serde_json::{Value, json};
use tollguard_core::error::FieldErrorKind;
use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::model::{Direction, Phase};
use tollguard_core::number::DialPlan;
use tollguard_core::pseudo::{Key, Kind, Pseudonymizer};
use tollguard_core::record::{CsvMapping, RawRecord};

const NOW: i64 = 1_700_000_000_000;

fn ingestor() -> Ingestor {
    Ingestor::new(
        "kpn",
        DialPlan::new("NL"),
        2,
        Pseudonymizer::new(Key::new("k1", &[9u8; 32]).unwrap()),
        Arc::new(ReferenceData::default()),
    )
    .unwrap()
}

fn good() -> Value {
    json!({
        "provider_id": "kpn",
        "event_id": "e1",
        "call_id": "c1",
        "phase": "end",
        "customer_id": "kvk:30123456",
        "line_id": "trunk-1",
        "caller": "0302001000",
        "callee": "0067077123456",
        "direction": "outbound",
        "start_time": "2011-06-11T00:47:00+02:00",
        "answer_time": "2011-06-11T00:47:05+02:00",
        "duration_s": 605,
        "disposition": "answered",
        "source_ip": "192.0.2.7",
        "charge": {"amount": "14.50", "currency": "EUR"}
    })
}

fn ingest(v: &Value) -> Result<tollguard_core::CallEvent, tollguard_core::FieldError> {
    let raw = RawRecord::from_json_line(&v.to_string())?;
    ingestor().ingest(&raw, NOW)
}

#[test]
fn a_good_record_is_normalised_and_pseudonymised() {
    let e = ingest(&good()).unwrap();
    assert_eq!(e.phase, Phase::End);
    assert_eq!(e.direction, Direction::Outbound);
    assert_eq!(e.callee_info.range, "+67077");
    assert_eq!(e.callee_info.country, "TL");
    assert_eq!(e.start_time, 1_307_746_020_000);
    assert_eq!(e.estimated_charge, 14_500_000);
    let key = Key::new("k1", &[9u8; 32]).unwrap();
    assert_eq!(e.customer, Some(key.token(Kind::Customer, "kvk:30123456")));
    assert_eq!(e.callee, key.token(Kind::Number, "+67077123456"));
    assert_eq!(e.line, key.token(Kind::Line, "kpn/trunk-1"));
    // No raw identity anywhere in the encoded event.
    let bytes = tollguard_core::codec::encode_event(&e);
    let text = String::from_utf8_lossy(&bytes);
    for raw in [
        "67077123456",
        "302001000",
        "30123456",
        "trunk-1",
        "192.0.2.7",
    ] {
        assert!(!text.contains(raw), "raw {raw} leaked into the event");
    }
    let back = tollguard_core::codec::decode_event(&bytes).unwrap();
    assert_eq!(back, e);
}

#[test]
fn charge_is_estimated_from_the_rate_deck_without_answer_delay() {
    let mut v = good();
    v.as_object_mut().unwrap().remove("charge");
    let e = ingest(&v).unwrap();
    // 600 billable seconds at EUR 1.45/min.
    assert_eq!(e.estimated_charge, 14_500_000);
    v["direction"] = json!("inbound");
    assert_eq!(ingest(&v).unwrap().estimated_charge, 0);
}

/// (field to change, new value, field the error must name)
fn cases() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        ("provider_id", Value::Null, "provider_id"),
        ("event_id", json!(""), "event_id"),
        ("event_id", json!("x".repeat(200)), "event_id"),
        ("event_id", json!(42), "event_id"),
        ("call_id", Value::Null, "call_id"),
        ("phase", json!("ringing"), "phase"),
        ("phase", Value::Null, "phase"),
        ("customer_id", json!("a\u{0001}b"), "customer_id"),
        ("line_id", Value::Null, "line_id"),
        ("caller", json!("+999123"), "caller"),
        ("caller", Value::Null, "caller"),
        ("callee", json!("0067O77123456"), "callee"),
        ("callee", json!("+3130123456789012"), "callee"),
        ("callee", json!(["+31"]), "callee"),
        ("direction", json!("sideways"), "direction"),
        ("start_time", json!("yesterday"), "start_time"),
        ("start_time", json!("1999-12-31T23:59:59Z"), "start_time"),
        ("start_time", json!("2999-01-01T00:00:00Z"), "start_time"),
        ("start_time", Value::Null, "start_time"),
        ("answer_time", json!("2011-06-10T00:00:00Z"), "answer_time"),
        ("answer_time", json!("soon"), "answer_time"),
        ("duration_s", json!(-1), "duration_s"),
        ("duration_s", json!(1e12), "duration_s"),
        ("duration_s", json!("10"), "duration_s"),
        ("duration_s", Value::Null, "duration_s"),
        ("disposition", json!("hung_up"), "disposition"),
        ("source_ip", json!("300.1.1.1"), "source_ip"),
        ("charge", json!("12.34"), "charge"),
        (
            "charge",
            json!({"amount": "-1", "currency": "EUR"}),
            "charge.amount",
        ),
        (
            "charge",
            json!({"amount": "1.2.3", "currency": "EUR"}),
            "charge.amount",
        ),
        (
            "charge",
            json!({"amount": "1", "currency": "eur"}),
            "charge.currency",
        ),
        (
            "charge",
            json!({"amount": "1", "currency": "XYZ"}),
            "charge.currency",
        ),
        ("charge", json!({"amount": "1"}), "charge.currency"),
        (
            "charge",
            json!({"amount": "1", "currency": "EUR", "tax": 1}),
            "charge.tax",
        ),
        ("calee", json!("+31301234567"), "calee"),
    ]
}

#[test]
fn every_invalid_field_is_named() {
    for (field, value, named) in cases() {
        let mut v = good();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = value.clone();
        }
        let e = ingest(&v).expect_err(&format!("{field} = {value}"));
        assert_eq!(e.field, named, "{field} = {value}: {e}");
        assert_eq!(e.kind, FieldErrorKind::Invalid);
        assert!(!e.reason.is_empty());
    }
}

#[test]
fn disposition_only_on_end_and_interim_needs_duration() {
    let mut v = good();
    v["phase"] = json!("start");
    assert_eq!(ingest(&v).unwrap_err().field, "disposition");
    v.as_object_mut().unwrap().remove("disposition");
    v.as_object_mut().unwrap().remove("duration_s");
    assert!(ingest(&v).is_ok(), "start without duration is fine");
    v["phase"] = json!("interim");
    assert_eq!(ingest(&v).unwrap_err().field, "duration_s");
}

#[test]
fn another_providers_record_is_permission_denied() {
    let mut v = good();
    v["provider_id"] = json!("bt");
    let e = ingest(&v).unwrap_err();
    assert_eq!(e.field, "provider_id");
    assert_eq!(e.kind, FieldErrorKind::PermissionDenied);
    assert_eq!(e.kind.code(), "PERMISSION_DENIED");
}

#[test]
fn hostile_json_is_refused_cleanly() {
    for line in [
        "",
        "not json",
        "[1,2,3]",
        "{\"event_id\":",
        &format!("{{\"event_id\":\"{}\"}}", "x".repeat(20_000)),
        &("[".repeat(5000) + &"]".repeat(5000)),
        "{\"duration_s\": NaN}",
    ] {
        let e = RawRecord::from_json_line(line).unwrap_err();
        assert!(!e.field.is_empty(), "{line:.40}");
    }
}

#[test]
fn csv_mapping_with_columns_values_and_time_zone() {
    let mapping: CsvMapping = toml::from_str(
        r#"
        delimiter = ";"
        time_zone = "Europe/Amsterdam"
        time_format = "%d-%m-%Y %H:%M:%S"
        [columns]
        event_id = "cdr_id"
        call_id = "call_ref"
        caller = "a_number"
        callee = "b_number"
        start_time = "begin"
        duration_s = "secs"
        customer_id = "account"
        line_id = "trunk"
        phase = "kind"
        [constants]
        provider_id = "kpn"
        direction = "outbound"
        [values.phase]
        E = "end"
        "#,
    )
    .unwrap();
    mapping.validate("csv").unwrap();
    let data = "cdr_id;call_ref;a_number;b_number;begin;secs;account;trunk;kind\n\
                x1;c9;0302001000;0067077123456;11-06-2011 00:47:00;605;kvk:30123456;t1;E\n";
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b';')
        .from_reader(data.as_bytes());
    let header = rdr.headers().unwrap().clone();
    let m = mapping.reader(&header).unwrap();
    let row = rdr.records().next().unwrap().unwrap();
    let raw = m.map(&row).unwrap();
    assert_eq!(raw.phase.as_deref(), Some("end"));
    let e = ingestor().ingest(&raw, NOW).unwrap();
    // 00:47 in Amsterdam summer time is 22:47 UTC the day before.
    assert_eq!(e.start_time, 1_307_746_020_000);
    assert_eq!(e.callee_info.range, "+67077");

    let bad: CsvMapping = toml::from_str("[columns]\ncallee = \"nope\"\n").unwrap();
    let e = bad.reader(&header).unwrap_err();
    assert_eq!(e.key, "csv.columns.callee");
    let bad: CsvMapping = toml::from_str("time_zone = \"Mars/Olympus\"\n").unwrap();
    assert_eq!(bad.validate("csv").unwrap_err().key, "csv.time_zone");
    let bad: CsvMapping = toml::from_str("[columns]\ncalee = \"b\"\n").unwrap();
    assert_eq!(bad.validate("csv").unwrap_err().key, "csv.columns.calee");
}

#[test]
fn shipped_example_rules_are_the_defaults() {
    let text = include_str!("../../../deploy/examples/rules.toml");
    let parsed = tollguard_core::rules::RulesConfig::parse("rules.toml", text).unwrap();
    assert_eq!(parsed, tollguard_core::rules::RulesConfig::default());
}

#[test]
fn the_example_rules_file_lists_every_key() {
    let text = include_str!("../../../deploy/examples/rules.toml");
    let written: toml::Table = toml::from_str(text).unwrap();
    let defaults = toml::Table::try_from(tollguard_core::rules::RulesConfig::default()).unwrap();
    for (section, keys) in &defaults {
        let w = written
            .get(section)
            .and_then(|v| v.as_table())
            .unwrap_or_else(|| panic!("[{section}] missing"));
        for k in keys.as_table().unwrap().keys() {
            assert!(
                w.contains_key(k),
                "{section}.{k} missing from deploy/examples/rules.toml"
            );
        }
    }
}
