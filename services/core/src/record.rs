//! The partner record (DESIGN §3): parsing from JSON Lines, gRPC and mapped
//! CSV into one [`RawRecord`], and its validation. Every error names the
//! field and the reason.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, NaiveDateTime, TimeZone};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ConfigError, FieldError};
use crate::model::{Direction, Disposition, Millis, Phase};
use crate::money::{clip, parse_amount};

/// The fields of a partner record, as received, before validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawRecord {
    /// See DESIGN §3 for each field.
    pub provider_id: Option<String>,
    /// Unique per provider.
    pub event_id: Option<String>,
    /// Call id.
    pub call_id: Option<String>,
    /// start | interim | end.
    pub phase: Option<String>,
    /// Consortium customer id.
    pub customer_id: Option<String>,
    /// Line id.
    pub line_id: Option<String>,
    /// Calling number.
    pub caller: Option<String>,
    /// Called number.
    pub callee: Option<String>,
    /// outbound | inbound.
    pub direction: Option<String>,
    /// RFC 3339.
    pub start_time: Option<String>,
    /// RFC 3339.
    pub answer_time: Option<String>,
    /// Seconds.
    pub duration_s: Option<f64>,
    /// answered | busy | no_answer | failed.
    pub disposition: Option<String>,
    /// IP address.
    pub source_ip: Option<String>,
    /// Decimal amount.
    pub charge_amount: Option<String>,
    /// ISO 4217.
    pub charge_currency: Option<String>,
}

/// The JSON field names accepted in a record.
pub const FIELDS: &[&str] = &[
    "provider_id",
    "event_id",
    "call_id",
    "phase",
    "customer_id",
    "line_id",
    "caller",
    "callee",
    "direction",
    "start_time",
    "answer_time",
    "duration_s",
    "disposition",
    "source_ip",
    "charge",
];

/// Maximum length of one JSON line, in bytes.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

fn str_field(
    obj: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<String>, FieldError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(FieldError::invalid(
            name,
            format!("must be a string, got {}", json_type(other)),
        )),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl RawRecord {
    /// Parses one JSON Lines record.
    pub fn from_json_line(line: &str) -> Result<Self, FieldError> {
        if line.len() > MAX_LINE_BYTES {
            return Err(FieldError::invalid(
                "record",
                format!(
                    "line is {} bytes; at most {MAX_LINE_BYTES} are allowed",
                    line.len()
                ),
            ));
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| FieldError::invalid("record", format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(FieldError::invalid("record", "must be a JSON object"));
        };
        if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(FieldError::invalid(
                clip(k),
                "unknown field (expected one of the fields of DESIGN §3)",
            ));
        }
        let duration_s = match obj.get("duration_s") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_f64()
                    .ok_or_else(|| FieldError::invalid("duration_s", "is not a finite number"))?,
            ),
            Some(other) => {
                return Err(FieldError::invalid(
                    "duration_s",
                    format!("must be a number, got {}", json_type(other)),
                ));
            }
        };
        let (charge_amount, charge_currency) = match obj.get("charge") {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(c)) => {
                if let Some(k) = c.keys().find(|k| *k != "amount" && *k != "currency") {
                    return Err(FieldError::invalid(
                        format!("charge.{}", clip(k)),
                        "unknown field (expected amount and currency)",
                    ));
                }
                let amount = match c.get("amount") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    None | Some(Value::Null) => {
                        return Err(FieldError::invalid("charge.amount", "is required"));
                    }
                    Some(other) => {
                        return Err(FieldError::invalid(
                            "charge.amount",
                            format!(
                                "must be a decimal string like \"12.34\", got {}",
                                json_type(other)
                            ),
                        ));
                    }
                };
                let currency = match c.get("currency") {
                    Some(Value::String(s)) => s.clone(),
                    None | Some(Value::Null) => {
                        return Err(FieldError::invalid("charge.currency", "is required"));
                    }
                    Some(other) => {
                        return Err(FieldError::invalid(
                            "charge.currency",
                            format!("must be a string, got {}", json_type(other)),
                        ));
                    }
                };
                (Some(amount), Some(currency))
            }
            Some(other) => {
                return Err(FieldError::invalid(
                    "charge",
                    format!(
                        "must be an object {{amount, currency}}, got {}",
                        json_type(other)
                    ),
                ));
            }
        };
        Ok(Self {
            provider_id: str_field(&obj, "provider_id")?,
            event_id: str_field(&obj, "event_id")?,
            call_id: str_field(&obj, "call_id")?,
            phase: str_field(&obj, "phase")?,
            customer_id: str_field(&obj, "customer_id")?,
            line_id: str_field(&obj, "line_id")?,
            caller: str_field(&obj, "caller")?,
            callee: str_field(&obj, "callee")?,
            direction: str_field(&obj, "direction")?,
            start_time: str_field(&obj, "start_time")?,
            answer_time: str_field(&obj, "answer_time")?,
            duration_s,
            disposition: str_field(&obj, "disposition")?,
            source_ip: str_field(&obj, "source_ip")?,
            charge_amount,
            charge_currency,
        })
    }

    /// Serialises as the partner JSON form (used by `tollguard simulate`).
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), Value::String(v.clone()));
            }
        };
        put("provider_id", &self.provider_id);
        put("event_id", &self.event_id);
        put("call_id", &self.call_id);
        put("phase", &self.phase);
        put("customer_id", &self.customer_id);
        put("line_id", &self.line_id);
        put("caller", &self.caller);
        put("callee", &self.callee);
        put("direction", &self.direction);
        put("start_time", &self.start_time);
        put("answer_time", &self.answer_time);
        put("disposition", &self.disposition);
        put("source_ip", &self.source_ip);
        if let Some(d) = self.duration_s {
            m.insert("duration_s".into(), serde_json::json!(d));
        }
        if let (Some(a), Some(c)) = (&self.charge_amount, &self.charge_currency) {
            m.insert(
                "charge".into(),
                serde_json::json!({"amount": a, "currency": c}),
            );
        }
        Value::Object(m)
    }
}

/// A record that passed validation; numbers are still raw here (the
/// [`crate::ingest::Ingestor`] normalises them with the carrier's plan).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRecord {
    /// Carrier.
    pub provider_id: String,
    /// Event id.
    pub event_id: String,
    /// Call id.
    pub call_id: String,
    /// Phase.
    pub phase: Phase,
    /// Customer id.
    pub customer_id: Option<String>,
    /// Line id.
    pub line_id: String,
    /// Raw caller.
    pub caller: String,
    /// Raw callee.
    pub callee: String,
    /// Direction.
    pub direction: Direction,
    /// Start time.
    pub start_time: Millis,
    /// Answer time.
    pub answer_time: Option<Millis>,
    /// Seconds.
    pub duration_s: f64,
    /// Disposition.
    pub disposition: Option<Disposition>,
    /// Source IP.
    pub source_ip: Option<IpAddr>,
    /// Charge (currency, micros).
    pub charge: Option<(String, i64)>,
}

/// Limits applied by validation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Latest acceptable start time relative to now (clock skew allowance).
    pub max_future_ms: i64,
    /// Earliest acceptable start time.
    pub min_time_ms: i64,
    /// Longest acceptable duration.
    pub max_duration_s: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_future_ms: 24 * 3600 * 1000,
            // 2000-01-01T00:00:00Z
            min_time_ms: 946_684_800_000,
            max_duration_s: 7.0 * 24.0 * 3600.0,
        }
    }
}

fn required<'a>(v: &'a Option<String>, field: &str) -> Result<&'a str, FieldError> {
    match v.as_deref().map(str::trim) {
        None | Some("") => Err(FieldError::invalid(field, "is required")),
        Some(s) => Ok(s),
    }
}

fn ident(field: &str, s: &str, max: usize) -> Result<String, FieldError> {
    if s.chars().count() > max {
        return Err(FieldError::invalid(
            field,
            format!("is longer than {max} characters"),
        ));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(FieldError::invalid(field, "contains control characters"));
    }
    Ok(s.to_string())
}

/// Parses an RFC 3339 time into epoch milliseconds.
pub fn parse_time(field: &str, s: &str) -> Result<Millis, FieldError> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            FieldError::invalid(
                field,
                format!(
                    "`{}` is not an RFC 3339 time like 2011-06-11T01:02:03Z ({e})",
                    clip(s)
                ),
            )
        })
}

/// Validates a raw record for the authenticated carrier `provider`, at wall
/// time `now`.
pub fn validate(
    raw: &RawRecord,
    provider: &str,
    now: Millis,
    limits: &Limits,
    known_currency: impl Fn(&str) -> bool,
) -> Result<ValidRecord, FieldError> {
    let provider_id = required(&raw.provider_id, "provider_id")?;
    if provider_id != provider {
        return Err(FieldError::denied(
            "provider_id",
            format!(
                "record names provider `{}` but the caller is authenticated as `{provider}`",
                clip(provider_id)
            ),
        ));
    }
    let event_id = ident("event_id", required(&raw.event_id, "event_id")?, 128)?;
    let call_id = ident("call_id", required(&raw.call_id, "call_id")?, 128)?;
    let phase_s = required(&raw.phase, "phase")?;
    let phase = Phase::parse(phase_s).ok_or_else(|| {
        FieldError::invalid(
            "phase",
            format!("`{}` is not one of start, interim, end", clip(phase_s)),
        )
    })?;
    let customer_id = match raw.customer_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(ident("customer_id", s, 128)?),
    };
    let line_id = ident("line_id", required(&raw.line_id, "line_id")?, 128)?;
    let caller = required(&raw.caller, "caller")?.to_string();
    let callee = required(&raw.callee, "callee")?.to_string();
    let dir_s = required(&raw.direction, "direction")?;
    let direction = Direction::parse(dir_s).ok_or_else(|| {
        FieldError::invalid(
            "direction",
            format!("`{}` is not one of outbound, inbound", clip(dir_s)),
        )
    })?;
    let start_time = parse_time("start_time", required(&raw.start_time, "start_time")?)?;
    if start_time < limits.min_time_ms {
        return Err(FieldError::invalid(
            "start_time",
            "is before 2000-01-01; check the clock or the time zone",
        ));
    }
    if start_time > now + limits.max_future_ms {
        return Err(FieldError::invalid(
            "start_time",
            format!(
                "is more than {} h in the future; check the carrier's clock",
                limits.max_future_ms / 3_600_000
            ),
        ));
    }
    let answer_time = match raw.answer_time.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => {
            let t = parse_time("answer_time", s)?;
            if t < start_time {
                return Err(FieldError::invalid("answer_time", "is before start_time"));
            }
            if t > start_time + 3_600_000 {
                return Err(FieldError::invalid(
                    "answer_time",
                    "is more than an hour after start_time",
                ));
            }
            Some(t)
        }
    };
    let duration_s = match raw.duration_s {
        None if phase == Phase::Start => 0.0,
        None => {
            return Err(FieldError::invalid(
                "duration_s",
                "is required on interim and end events",
            ));
        }
        Some(d) if !d.is_finite() => {
            return Err(FieldError::invalid("duration_s", "must be a finite number"));
        }
        Some(d) if d < 0.0 => return Err(FieldError::invalid("duration_s", "must be >= 0")),
        Some(d) if d > limits.max_duration_s => {
            return Err(FieldError::invalid(
                "duration_s",
                format!("is longer than {} s (7 days)", limits.max_duration_s),
            ));
        }
        Some(d) => d,
    };
    let disposition = match raw.disposition.as_deref().map(str::trim) {
        None | Some("") if phase == Phase::End => Some(if duration_s > 0.0 {
            Disposition::Answered
        } else {
            Disposition::NoAnswer
        }),
        None | Some("") => None,
        Some(s) => {
            if phase != Phase::End {
                return Err(FieldError::invalid(
                    "disposition",
                    "is only allowed on end events",
                ));
            }
            Some(Disposition::parse(s).ok_or_else(|| {
                FieldError::invalid(
                    "disposition",
                    format!(
                        "`{}` is not one of answered, busy, no_answer, failed",
                        clip(s)
                    ),
                )
            })?)
        }
    };
    let source_ip = match raw.source_ip.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(s) => Some(s.parse::<IpAddr>().map_err(|_| {
            FieldError::invalid("source_ip", format!("`{}` is not an IP address", clip(s)))
        })?),
    };
    let charge = match (&raw.charge_amount, &raw.charge_currency) {
        (None, None) => None,
        (Some(_), None) => return Err(FieldError::invalid("charge.currency", "is required")),
        (None, Some(_)) => return Err(FieldError::invalid("charge.amount", "is required")),
        (Some(a), Some(c)) => {
            let amount = parse_amount("charge.amount", a)?;
            let c = c.trim();
            if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(FieldError::invalid(
                    "charge.currency",
                    format!("`{}` is not an ISO 4217 code like EUR", clip(c)),
                ));
            }
            if !known_currency(c) {
                return Err(FieldError::invalid(
                    "charge.currency",
                    format!("`{c}` has no configured exchange rate"),
                ));
            }
            Some((c.to_string(), amount))
        }
    };
    Ok(ValidRecord {
        provider_id: provider_id.to_string(),
        event_id,
        call_id,
        phase,
        customer_id,
        line_id,
        caller,
        callee,
        direction,
        start_time,
        answer_time,
        duration_s,
        disposition,
        source_ip,
        charge,
    })
}

/// How one carrier's CSV export maps onto the partner record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvMapping {
    /// Field delimiter (one character).
    #[serde(default = "default_delim")]
    pub delimiter: String,
    /// Record field name → CSV column name. Fields not listed are taken from
    /// a column of the same name if present.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Record field name → fixed value for every row (e.g. direction).
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// Record field name → (CSV value → record value), e.g. phase "S" → "start".
    #[serde(default)]
    pub values: BTreeMap<String, BTreeMap<String, String>>,
    /// IANA time zone of naive timestamps, e.g. "Europe/Amsterdam".
    #[serde(default = "default_tz")]
    pub time_zone: String,
    /// chrono format of naive timestamps, e.g. "%Y-%m-%d %H:%M:%S"; when
    /// absent, timestamps must be RFC 3339.
    #[serde(default)]
    pub time_format: Option<String>,
}

fn default_delim() -> String {
    ",".into()
}
fn default_tz() -> String {
    "UTC".into()
}

const CSV_FIELDS: &[&str] = &[
    "provider_id",
    "event_id",
    "call_id",
    "phase",
    "customer_id",
    "line_id",
    "caller",
    "callee",
    "direction",
    "start_time",
    "answer_time",
    "duration_s",
    "disposition",
    "source_ip",
    "charge_amount",
    "charge_currency",
];

impl Default for CsvMapping {
    fn default() -> Self {
        Self {
            delimiter: default_delim(),
            columns: BTreeMap::new(),
            constants: BTreeMap::new(),
            values: BTreeMap::new(),
            time_zone: default_tz(),
            time_format: None,
        }
    }
}

impl CsvMapping {
    /// Validates the mapping; errors are keyed under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.delimiter.len() != 1 {
            return Err(ConfigError::new(
                format!("{prefix}.delimiter"),
                "must be exactly one ASCII character",
            ));
        }
        for (what, keys) in [
            ("columns", self.columns.keys().collect::<Vec<_>>()),
            ("constants", self.constants.keys().collect()),
            ("values", self.values.keys().collect()),
        ] {
            for k in keys {
                if !CSV_FIELDS.contains(&k.as_str()) {
                    return Err(ConfigError::new(
                        format!("{prefix}.{what}.{k}"),
                        "is not a record field",
                    ));
                }
            }
        }
        self.tz()
            .map_err(|e| ConfigError::new(format!("{prefix}.time_zone"), e))?;
        Ok(())
    }

    fn tz(&self) -> Result<chrono_tz::Tz, String> {
        self.time_zone
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("`{}` is not an IANA time zone", self.time_zone))
    }

    /// Builds a row reader for a header row.
    pub fn reader(&self, header: &csv::StringRecord) -> Result<CsvRowMapper, ConfigError> {
        let mut idx = BTreeMap::new();
        for f in CSV_FIELDS {
            let col = self.columns.get(*f).map(String::as_str).unwrap_or(f);
            if let Some(i) = header.iter().position(|h| h.trim() == col) {
                idx.insert(f.to_string(), i);
            } else if self.columns.contains_key(*f) {
                return Err(ConfigError::new(
                    format!("csv.columns.{f}"),
                    format!("column `{col}` is not in the file's header"),
                ));
            }
        }
        Ok(CsvRowMapper {
            idx,
            mapping: self.clone(),
            tz: self
                .tz()
                .map_err(|e| ConfigError::new("csv.time_zone", e))?,
        })
    }
}

/// Maps CSV rows of one file to raw records.
#[derive(Debug, Clone)]
pub struct CsvRowMapper {
    idx: BTreeMap<String, usize>,
    mapping: CsvMapping,
    tz: chrono_tz::Tz,
}

impl CsvRowMapper {
    fn get(&self, row: &csv::StringRecord, field: &str) -> Option<String> {
        let v = self
            .idx
            .get(field)
            .and_then(|i| row.get(*i))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| self.mapping.constants.get(field).cloned())?;
        Some(
            self.mapping
                .values
                .get(field)
                .and_then(|m| m.get(&v))
                .cloned()
                .unwrap_or(v),
        )
    }

    fn time(&self, row: &csv::StringRecord, field: &str) -> Result<Option<String>, FieldError> {
        let Some(v) = self.get(row, field) else {
            return Ok(None);
        };
        let Some(fmt) = &self.mapping.time_format else {
            return Ok(Some(v));
        };
        let naive = NaiveDateTime::parse_from_str(&v, fmt).map_err(|e| {
            FieldError::invalid(
                field,
                format!("`{}` does not match `{fmt}` ({e})", clip(&v)),
            )
        })?;
        let local = self
            .tz
            .from_local_datetime(&naive)
            .earliest()
            .ok_or_else(|| {
                FieldError::invalid(field, format!("`{v}` does not exist in {}", self.tz))
            })?;
        Ok(Some(local.with_timezone(&chrono::Utc).to_rfc3339()))
    }

    /// Maps one row.
    pub fn map(&self, row: &csv::StringRecord) -> Result<RawRecord, FieldError> {
        let duration_s = match self.get(row, "duration_s") {
            None => None,
            Some(s) => Some(s.parse::<f64>().map_err(|_| {
                FieldError::invalid("duration_s", format!("`{}` is not a number", clip(&s)))
            })?),
        };
        Ok(RawRecord {
            provider_id: self.get(row, "provider_id"),
            event_id: self.get(row, "event_id"),
            call_id: self.get(row, "call_id"),
            phase: self.get(row, "phase"),
            customer_id: self.get(row, "customer_id"),
            line_id: self.get(row, "line_id"),
            caller: self.get(row, "caller"),
            callee: self.get(row, "callee"),
            direction: self.get(row, "direction"),
            start_time: self.time(row, "start_time")?,
            answer_time: self.time(row, "answer_time")?,
            duration_s,
            disposition: self.get(row, "disposition"),
            source_ip: self.get(row, "source_ip"),
            charge_amount: self.get(row, "charge_amount"),
            charge_currency: self.get(row, "charge_currency"),
        })
    }
}
