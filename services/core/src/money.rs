//! Money as integer micro-units (EUR 12.34 = 12_340_000), so sums in windows
//! are exact and identical in every store.

use crate::error::FieldError;

/// Micro-units per currency unit.
pub const MICROS: i64 = 1_000_000;

/// Parses a decimal amount such as `"12.34"` into micro-units.
/// At most six decimals; negative amounts are refused.
pub fn parse_amount(field: &str, s: &str) -> Result<i64, FieldError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(FieldError::invalid(field, "empty amount"));
    }
    if s.len() > 24 {
        return Err(FieldError::invalid(field, "amount too long"));
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.starts_with('-') {
        return Err(FieldError::invalid(field, "amount must not be negative"));
    }
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FieldError::invalid(
            field,
            format!("`{}` is not a decimal amount like \"12.34\"", clip(s)),
        ));
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 6 {
        return Err(FieldError::invalid(
            field,
            "at most six decimal digits are allowed",
        ));
    }
    let whole: i64 = int
        .parse()
        .map_err(|_| FieldError::invalid(field, "amount out of range"))?;
    let mut f = frac.to_string();
    while f.len() < 6 {
        f.push('0');
    }
    let fraction: i64 = f.parse().unwrap_or(0);
    whole
        .checked_mul(MICROS)
        .and_then(|w| w.checked_add(fraction))
        .filter(|v| *v <= 1_000_000_000 * MICROS)
        .ok_or_else(|| FieldError::invalid(field, "amount out of range (max 1e9)"))
}

/// Formats micro-units as a decimal with two places: `12.34`.
pub fn format_amount(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let cents = (m + 5_000) / 10_000;
    format!("{sign}{}.{:02}", cents / 100, cents % 100)
}

/// Formats with a currency: `EUR 12.34`.
pub fn format_eur(micros: i64) -> String {
    format!("EUR {}", format_amount(micros))
}

pub(crate) fn clip(s: &str) -> String {
    if s.chars().count() > 32 {
        let mut t: String = s.chars().take(32).collect();
        t.push('…');
        t
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_amount("charge", "12.34").unwrap(), 12_340_000);
        assert_eq!(parse_amount("charge", "0").unwrap(), 0);
        assert_eq!(parse_amount("charge", "1.000001").unwrap(), 1_000_001);
        assert_eq!(format_amount(12_340_000), "12.34");
        assert_eq!(format_amount(5_000), "0.01");
        assert_eq!(format_eur(176_895_050_000), "EUR 176895.05");
    }

    #[test]
    fn refuses_bad_amounts() {
        for bad in [
            "",
            "-1",
            "1.2.3",
            "abc",
            "1.1234567",
            "NaN",
            "1e9",
            "99999999999",
        ] {
            let e = parse_amount("charge.amount", bad).unwrap_err();
            assert_eq!(e.field, "charge.amount", "{bad}");
        }
    }
}
