//! Prefix tables: the range-risk table and the rate deck. Both are CSV
//! (`prefix,value,comment`), longest prefix wins, and a default is shipped in
//! `services/core/data/`. Carriers and the consortium replace them in
//! configuration.

use std::collections::HashMap;

use crate::error::ConfigError;
use crate::model::RiskTier;
use crate::money::{MICROS, parse_amount};

const DEFAULT_RISK: &str = include_str!("../data/range_risk.csv");
const DEFAULT_RATES: &str = include_str!("../data/rate_deck.csv");

/// A longest-prefix-match table over E.164 strings (`+` and digits).
#[derive(Debug, Clone)]
pub struct PrefixTable<T> {
    entries: HashMap<String, T>,
    max_len: usize,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            max_len: 0,
        }
    }
}

impl<T: Clone> PrefixTable<T> {
    /// Inserts or replaces an entry.
    pub fn insert(&mut self, prefix: String, value: T) {
        self.max_len = self.max_len.max(prefix.len());
        self.entries.insert(prefix, value);
    }

    /// The entry with the longest prefix of `number`, if any.
    pub fn lookup(&self, number: &str) -> Option<&T> {
        let mut n = number.len().min(self.max_len);
        loop {
            if let Some(v) = number.get(..n).and_then(|p| self.entries.get(p)) {
                return Some(v);
            }
            if n == 0 {
                return None;
            }
            n -= 1;
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn check_prefix(
    file: &str,
    line: usize,
    prefix: &str,
    allow_empty: bool,
) -> Result<(), ConfigError> {
    let ok = (allow_empty && prefix.is_empty())
        || (prefix.starts_with('+')
            && prefix.len() >= 2
            && prefix.len() <= 16
            && prefix[1..].bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            format!("{file}:{line}: prefix"),
            format!("`{prefix}` is not a range like \"+67077\""),
        ))
    }
}

/// Iterates CSV data rows as (line number, fields), skipping `#` comments,
/// blank lines and the header row.
fn rows(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .filter(|(_, l)| !l.starts_with("prefix,"))
        .map(|(i, l)| (i, l.splitn(3, ',').map(str::trim).collect()))
}

/// The range-risk table.
#[derive(Debug, Clone)]
pub struct RiskTable {
    table: PrefixTable<RiskTier>,
}

impl RiskTable {
    /// The shipped default table.
    pub fn default_table() -> Self {
        Self::parse("range_risk.csv", DEFAULT_RISK).expect("shipped risk table is valid")
    }

    /// Parses `prefix,tier,source` CSV. Errors name the line and field.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let mut table = PrefixTable::default();
        for (line, f) in rows(text) {
            let prefix = f[0];
            check_prefix(file, line, prefix, false)?;
            let tier = f.get(1).copied().unwrap_or("");
            let tier = RiskTier::parse(tier).ok_or_else(|| {
                ConfigError::new(
                    format!("{file}:{line}: tier"),
                    format!("`{tier}` is not one of low, elevated, high, critical"),
                )
            })?;
            if table.lookup(prefix).is_some() && table.entries.contains_key(prefix) {
                return Err(ConfigError::new(
                    format!("{file}:{line}: prefix"),
                    format!("`{prefix}` is listed twice"),
                ));
            }
            table.insert(prefix.to_string(), tier);
        }
        Ok(Self { table })
    }

    /// Adds or overrides entries (e.g. from an import).
    pub fn merge(&mut self, other: &RiskTable) {
        for (k, v) in &other.table.entries {
            self.table.insert(k.clone(), *v);
        }
    }

    /// Tier of an E.164 number or range; `Low` if not listed.
    pub fn tier(&self, e164: &str) -> RiskTier {
        self.table.lookup(e164).copied().unwrap_or(RiskTier::Low)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// The rate deck: EUR per minute by longest prefix, in micro-EUR.
#[derive(Debug, Clone)]
pub struct RateDeck {
    table: PrefixTable<i64>,
    fallback: i64,
}

impl RateDeck {
    /// The shipped default deck.
    pub fn default_deck() -> Self {
        Self::parse("rate_deck.csv", DEFAULT_RATES).expect("shipped rate deck is valid")
    }

    /// Parses `prefix,eur_per_min,description` CSV; an empty prefix is the
    /// fallback rate (default EUR 0.50/min if absent).
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let mut table = PrefixTable::default();
        let mut fallback = MICROS / 2;
        for (line, f) in rows(text) {
            let prefix = f[0];
            check_prefix(file, line, prefix, true)?;
            let rate = f.get(1).copied().unwrap_or("");
            let micros = parse_amount("eur_per_min", rate)
                .map_err(|e| ConfigError::new(format!("{file}:{line}: eur_per_min"), e.reason))?;
            if prefix.is_empty() {
                fallback = micros;
            } else {
                table.insert(prefix.to_string(), micros);
            }
        }
        Ok(Self { table, fallback })
    }

    /// Price per minute in micro-EUR for an E.164 number.
    pub fn per_minute(&self, e164: &str) -> i64 {
        self.table.lookup(e164).copied().unwrap_or(self.fallback)
    }

    /// Estimated charge in micro-EUR for `duration_s` seconds (per-second
    /// billing).
    pub fn estimate(&self, e164: &str, duration_s: f64) -> i64 {
        let per_min = self.per_minute(e164) as f64;
        (per_min * duration_s / 60.0).round() as i64
    }
}

/// Currency conversion to EUR for charges given in other currencies.
#[derive(Debug, Clone)]
pub struct FxTable {
    /// Micro-EUR per one unit of the currency.
    rates: HashMap<String, i64>,
}

impl Default for FxTable {
    fn default() -> Self {
        let mut rates = HashMap::new();
        // Indicative reference rates; configuration overrides them.
        for (c, r) in [
            ("EUR", 1_000_000),
            ("USD", 920_000),
            ("GBP", 1_170_000),
            ("CHF", 1_040_000),
            ("SEK", 88_000),
            ("NOK", 86_000),
            ("DKK", 134_000),
            ("PLN", 232_000),
        ] {
            rates.insert(c.to_string(), r);
        }
        Self { rates }
    }
}

impl FxTable {
    /// Sets a rate (micro-EUR per unit).
    pub fn set(&mut self, currency: &str, micro_eur: i64) {
        self.rates.insert(currency.to_ascii_uppercase(), micro_eur);
    }

    /// Converts micro-units of `currency` into micro-EUR, if the currency is
    /// known.
    pub fn to_eur(&self, currency: &str, micros: i64) -> Option<i64> {
        let r = *self.rates.get(currency)?;
        Some(((micros as i128 * r as i128) / MICROS as i128) as i64)
    }

    /// True when the currency is known.
    pub fn knows(&self, currency: &str) -> bool {
        self.rates.contains_key(currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let deck = RateDeck::default_deck();
        assert_eq!(deck.per_minute("+31301234567"), 20_000);
        assert_eq!(deck.per_minute("+31612345678"), 80_000);
        assert_eq!(deck.per_minute("+67077123456"), 1_450_000);
        assert_eq!(deck.per_minute("+999"), 500_000);
        assert_eq!(deck.estimate("+67077123456", 60.0), 1_450_000);
        let risk = RiskTable::default_table();
        assert_eq!(risk.tier("+67077123456"), RiskTier::High);
        assert_eq!(risk.tier("+88213456789"), RiskTier::Critical);
        assert_eq!(risk.tier("+31301234567"), RiskTier::Low);
        assert_eq!(risk.tier("+37190012345"), RiskTier::High);
    }

    #[test]
    fn bad_tables_name_line_and_field() {
        let e = RiskTable::parse("r.csv", "prefix,tier,source\n+670,extreme,x\n").unwrap_err();
        assert_eq!(e.key, "r.csv:2: tier");
        let e = RiskTable::parse("r.csv", "67a,high,x\n").unwrap_err();
        assert_eq!(e.key, "r.csv:1: prefix");
        let e = RiskTable::parse("r.csv", "+670,high,x\n+670,low,y\n").unwrap_err();
        assert!(e.reason.contains("twice"));
        let e = RateDeck::parse("d.csv", "+670,-1,x\n").unwrap_err();
        assert_eq!(e.key, "d.csv:1: eur_per_min");
    }
}
