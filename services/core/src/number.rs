//! E.164 normalisation and destination classification.
//!
//! Numbers are checked for *shape*, not allocation (DESIGN §3): a number is
//! refused only if it has no known country code, more than 15 digits, or
//! characters that are not digits. A well-formed number that libphonenumber's
//! metadata does not list as allocated is accepted and flagged `unallocated`,
//! because IRSF hides exactly there.

use std::str::FromStr;

use phonenumber::metadata::DATABASE;
use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, FieldError};
use crate::model::{NumberInfo, NumberType, RiskTier};
use crate::money::clip;
use crate::tables::RiskTable;

/// A carrier's numbering conventions: its home country and dialling
/// prefixes, used to read national and international dialled forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialPlan {
    /// ISO 3166-1 alpha-2 home country, e.g. "NL".
    pub home_country: String,
    /// International call prefix, e.g. "00" (Europe) or "011" (NANP).
    #[serde(default = "default_intl")]
    pub international_prefix: String,
    /// National trunk prefix, e.g. "0"; empty where there is none.
    #[serde(default = "default_national")]
    pub national_prefix: String,
    /// Carrier-select or routing prefixes the carrier's switches put in front
    /// of dialled numbers, stripped before anything else (e.g. "1601").
    #[serde(default)]
    pub strip_prefixes: Vec<String>,
}

fn default_intl() -> String {
    "00".into()
}
fn default_national() -> String {
    "0".into()
}

impl DialPlan {
    /// A plan with the European defaults for `home_country`.
    pub fn new(home_country: &str) -> Self {
        Self {
            home_country: home_country.to_string(),
            international_prefix: default_intl(),
            national_prefix: default_national(),
            strip_prefixes: Vec::new(),
        }
    }

    /// Validates the plan; errors are keyed under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<u16, ConfigError> {
        let id = phonenumber::country::Id::from_str(&self.home_country).map_err(|_| {
            ConfigError::new(
                format!("{prefix}.home_country"),
                format!(
                    "`{}` is not an ISO 3166-1 alpha-2 country",
                    self.home_country
                ),
            )
        })?;
        let meta = DATABASE.by_id(id.as_ref()).ok_or_else(|| {
            ConfigError::new(
                format!("{prefix}.home_country"),
                format!("no numbering metadata for `{}`", self.home_country),
            )
        })?;
        for (k, v) in [
            ("international_prefix", &self.international_prefix),
            ("national_prefix", &self.national_prefix),
        ] {
            if !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 4 {
                return Err(ConfigError::new(
                    format!("{prefix}.{k}"),
                    format!("`{v}` must be up to four digits"),
                ));
            }
        }
        if self.international_prefix.is_empty() {
            return Err(ConfigError::new(
                format!("{prefix}.international_prefix"),
                "must not be empty",
            ));
        }
        for (i, s) in self.strip_prefixes.iter().enumerate() {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 8 {
                return Err(ConfigError::new(
                    format!("{prefix}.strip_prefixes[{i}]"),
                    format!("`{s}` must be 1-8 digits"),
                ));
            }
        }
        Ok(meta.country_code())
    }
}

/// A normalised number: its E.164 form (which never leaves the ingester)
/// and its classification (which does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// `+` and up to 15 digits.
    pub e164: String,
    /// Classification in clear.
    pub info: NumberInfo,
}

impl Normalized {
    /// The number without its last two digits, and those two digits.
    pub fn block(&self) -> (&str, u32) {
        let cut = self.e164.len().saturating_sub(2).max(1);
        let (head, tail) = self.e164.split_at(cut);
        (head, tail.parse().unwrap_or(0))
    }
}

/// Normalises and classifies numbers for one carrier.
#[derive(Debug, Clone)]
pub struct Normalizer {
    plan: DialPlan,
    home_cc: u16,
    range_digits: usize,
}

/// Visual separators tolerated (and removed) in dialled numbers.
const SEPARATORS: &[char] = &[' ', '-', '.', '(', ')', '/'];

impl Normalizer {
    /// Builds a normaliser. `range_digits` is the number of national digits
    /// kept in the clear range prefix (DESIGN §3; default 2).
    pub fn new(plan: DialPlan, range_digits: usize) -> Result<Self, ConfigError> {
        let home_cc = plan.validate("dial_plan")?;
        if !(1..=6).contains(&range_digits) {
            return Err(ConfigError::new("range_digits", "must be between 1 and 6"));
        }
        Ok(Self {
            plan,
            home_cc,
            range_digits,
        })
    }

    /// The carrier's home country calling code.
    pub fn home_cc(&self) -> u16 {
        self.home_cc
    }

    /// Normalises `raw` (reported as `field` on error) and classifies it
    /// against `risk`.
    pub fn normalize(
        &self,
        field: &str,
        raw: &str,
        risk: &RiskTable,
    ) -> Result<Normalized, FieldError> {
        let e164 = self.to_e164(field, raw)?;
        Ok(Normalized {
            info: classify(&e164, self.range_digits, risk),
            e164,
        })
    }

    /// Shape checks and prefix handling; returns `+` and digits.
    pub fn to_e164(&self, field: &str, raw: &str) -> Result<String, FieldError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(FieldError::invalid(field, "is empty"));
        }
        if s.chars().count() > 40 {
            return Err(FieldError::invalid(
                field,
                "is too long to be a telephone number (more than 15 digits)",
            ));
        }
        let mut digits = String::with_capacity(16);
        for (i, c) in s.chars().enumerate() {
            match c {
                '0'..='9' => digits.push(c),
                '+' if i == 0 => {}
                c if SEPARATORS.contains(&c) => {}
                c if c.is_alphabetic() => {
                    return Err(FieldError::invalid(
                        field,
                        format!("`{}` contains letters; only digits are allowed", clip(s)),
                    ));
                }
                c if c.is_control() => {
                    return Err(FieldError::invalid(
                        field,
                        "contains control characters; only digits are allowed",
                    ));
                }
                c => {
                    return Err(FieldError::invalid(
                        field,
                        format!("contains `{}`, which is not a digit", c.escape_default()),
                    ));
                }
            }
        }
        if digits.is_empty() {
            return Err(FieldError::invalid(field, "contains no digits"));
        }
        let international = if s.starts_with('+') {
            digits
        } else {
            let mut d = digits.as_str();
            for p in &self.plan.strip_prefixes {
                if let Some(rest) = d.strip_prefix(p.as_str()) {
                    d = rest;
                    break;
                }
            }
            if let Some(rest) = d.strip_prefix(self.plan.international_prefix.as_str()) {
                rest.to_string()
            } else if !self.plan.national_prefix.is_empty()
                && d.starts_with(self.plan.national_prefix.as_str())
            {
                format!("{}{}", self.home_cc, &d[self.plan.national_prefix.len()..])
            } else {
                format!("{}{}", self.home_cc, d)
            }
        };
        if international.len() > 15 {
            return Err(FieldError::invalid(
                field,
                format!(
                    "has {} digits; E.164 allows at most 15",
                    international.len()
                ),
            ));
        }
        let Some(cc) = country_code_of(&international) else {
            return Err(FieldError::invalid(
                field,
                format!("+{} has no known country code", clip(&international)),
            ));
        };
        let national_len = international.len() - cc.to_string().len();
        if national_len < 4 {
            return Err(FieldError::invalid(
                field,
                "is too short to be a telephone number",
            ));
        }
        Ok(format!("+{international}"))
    }
}

/// The ITU country calling code that `digits` (without `+`) starts with, if
/// any is known to the numbering metadata.
pub fn country_code_of(digits: &str) -> Option<u16> {
    if digits.starts_with('0') {
        return None;
    }
    (1..=3).find_map(|n| {
        let cc: u16 = digits.get(..n)?.parse().ok()?;
        DATABASE.by_code(&cc).map(|_| cc)
    })
}

/// Classifies an E.164 number (`+` and digits, already shape-checked).
pub fn classify(e164: &str, range_digits: usize, risk: &RiskTable) -> NumberInfo {
    let digits = &e164[1..];
    let cc = country_code_of(digits).unwrap_or(0);
    let cc_len = if cc == 0 { 0 } else { cc.to_string().len() };
    let national = &digits[cc_len..];
    let range = format!(
        "+{}{}",
        &digits[..cc_len],
        &national[..national.len().min(range_digits)]
    );
    let parsed = phonenumber::parse(None, e164).ok();
    let valid = parsed.as_ref().is_some_and(|p| p.is_valid());
    let meta_region = parsed
        .as_ref()
        .and_then(|p| p.metadata(&DATABASE))
        .map(|m| m.id().to_string())
        .or_else(|| {
            DATABASE.by_code(&cc).and_then(|ms| {
                ms.into_iter()
                    .find(|m| m.is_main_country_for_code())
                    .map(|m| m.id().to_string())
            })
        })
        .unwrap_or_else(|| "ZZ".to_string());
    let mut number_type = match parsed.as_ref().map(|p| p.number_type(&DATABASE)) {
        Some(t) if valid => map_type(t),
        _ => NumberType::Unknown,
    };
    if matches!(cc, 881..=883) || meta_region == "001" && matches!(cc, 870 | 808 | 979) {
        number_type = match cc {
            979 => NumberType::Premium,
            808 => NumberType::SharedCost,
            _ => NumberType::InternationalNetwork,
        };
    }
    let country = if meta_region == "001" || matches!(cc, 881..=883) {
        "001".to_string()
    } else {
        meta_region
    };
    let mut tier = risk.tier(e164);
    match number_type {
        NumberType::InternationalNetwork => tier = tier.max(RiskTier::Critical),
        NumberType::Premium | NumberType::Personal => tier = tier.max(RiskTier::Elevated),
        _ => {}
    }
    if !valid && tier < RiskTier::Critical {
        tier = tier.raised();
    }
    NumberInfo {
        country,
        country_code: cc,
        range,
        number_type,
        risk_tier: tier,
        unallocated: !valid,
    }
}

fn map_type(t: phonenumber::Type) -> NumberType {
    use phonenumber::Type as T;
    match t {
        T::FixedLine => NumberType::Fixed,
        T::Mobile => NumberType::Mobile,
        T::FixedLineOrMobile => NumberType::FixedOrMobile,
        T::TollFree => NumberType::TollFree,
        T::PremiumRate => NumberType::Premium,
        T::SharedCost => NumberType::SharedCost,
        T::PersonalNumber => NumberType::Personal,
        T::Voip => NumberType::Voip,
        T::Unknown => NumberType::Unknown,
        _ => NumberType::Special,
    }
}
