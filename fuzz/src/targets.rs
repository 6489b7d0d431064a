//! The fuzzed functions, shared by the `cargo fuzz` targets
//! (`fuzz/fuzz_targets/*.rs`) and the bounded stable-toolchain harness
//! (`tests/security_fuzz.rs`), so both exercise exactly the same code.
//! Each takes arbitrary bytes; it must never panic, hang or allocate
//! without bound, and whatever it accepts must satisfy the invariants
//! asserted here.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::number::{DialPlan, Normalizer};
use tollguard_core::pseudo::{Key, Pseudonymizer};
use tollguard_core::record::{CsvMapping, RawRecord};
use tollguard_ingester::config::IngesterConfig;

/// A fixed wall clock (2011-06-11T12:00:00Z) so the far-future check is
/// deterministic.
const NOW: i64 = 1_307_793_600_000;

fn ingestor() -> &'static Ingestor {
    static I: OnceLock<Ingestor> = OnceLock::new();
    I.get_or_init(|| {
        let mut plan = DialPlan::new("NL");
        plan.national_prefix = "0".into();
        Ingestor::new(
            "kpn",
            plan,
            2,
            Pseudonymizer::new(Key::new("k1", &[7u8; 32]).expect("key")),
            Arc::new(ReferenceData::default()),
        )
        .expect("ingestor")
    })
}

fn check_event(ev: &tollguard_core::CallEvent) {
    // Raw numbers never survive into an event: tokens are 32 hex digits.
    for t in [&ev.caller, &ev.callee] {
        assert_eq!(t.value.len(), 32, "token {t:?}");
        assert!(t.value.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}

/// The JSON Lines record parser, then validation, normalisation and
/// pseudonymisation of what it accepts.
pub fn jsonl_record(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = RawRecord::from_json_line(line)
        && let Ok(ev) = ingestor().ingest(&r, NOW)
    {
        check_event(&ev);
    }
}

fn mapping() -> &'static CsvMapping {
    static M: OnceLock<CsvMapping> = OnceLock::new();
    M.get_or_init(|| {
        toml::from_str(
            r#"
delimiter = ";"
time_zone = "Europe/Amsterdam"
time_format = "%Y-%m-%d %H:%M:%S"
[columns]
event_id = "cdr_id"
call_id = "call_ref"
caller = "a_number"
callee = "b_number"
start_time = "begin"
duration_s = "secs"
customer_id = "account"
line_id = "trunk"
[constants]
provider_id = "kpn"
direction = "outbound"
phase = "end"
"#,
        )
        .expect("mapping")
    })
}

/// A CSV export (header row, then rows) through the carrier's mapping, then
/// the ingest path.
pub fn csv_mapping(data: &[u8]) {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b';')
        .flexible(true)
        .from_reader(data);
    let Ok(header) = rdr.headers().cloned() else {
        return;
    };
    let Ok(m) = mapping().reader(&header) else {
        return;
    };
    for row in rdr.records().take(64) {
        let Ok(row) = row else { continue };
        if let Ok(r) = m.map(&row)
            && let Ok(ev) = ingestor().ingest(&r, NOW)
        {
            check_event(&ev);
        }
    }
}

/// Number normalisation: whatever is accepted is `+` and 1-15 digits.
pub fn number(data: &[u8]) {
    static N: OnceLock<Normalizer> = OnceLock::new();
    let n = N.get_or_init(|| {
        let mut plan = DialPlan::new("NL");
        plan.national_prefix = "0".into();
        Normalizer::new(plan, 2).expect("normalizer")
    });
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(e164) = n.to_e164("callee", s) {
        let digits = e164.strip_prefix('+').expect("leading +");
        assert!(
            !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{s:?} -> {e164:?}"
        );
    }
}

/// The configuration loader: TOML → `IngesterConfig` (paths of bad keys)
/// → validation. Errors must name a key and never panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return;
    };
    match tollguard_runtime::config::from_table::<IngesterConfig>("fuzz.toml", table) {
        Ok(cfg) => {
            if let Err(e) = cfg.validate() {
                assert!(!e.key.is_empty(), "{e:?}");
            }
        }
        Err(e) => assert!(!e.reason.is_empty(), "{e:?}"),
    }
}
