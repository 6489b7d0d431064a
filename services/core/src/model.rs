//! Domain types shared by every service: the normalised call event and its
//! enumerations. Times are milliseconds since the Unix epoch (UTC); money is
//! micro-EUR (see [`crate::money`]).

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// Phase of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// At answer.
    Start,
    /// While the call is up.
    Interim,
    /// At the end (a complete CDR).
    End,
}

impl Phase {
    /// Parses the partner spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "start" => Some(Self::Start),
            "interim" => Some(Self::Interim),
            "end" => Some(Self::End),
            _ => None,
        }
    }
}

/// Direction as seen from the customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The customer placed the call.
    Outbound,
    /// The customer received the call.
    Inbound,
}

impl Direction {
    /// Parses the partner spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "outbound" => Some(Self::Outbound),
            "inbound" => Some(Self::Inbound),
            _ => None,
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Answered.
    Answered,
    /// Busy.
    Busy,
    /// Not answered.
    NoAnswer,
    /// Failed.
    Failed,
}

impl Disposition {
    /// Parses the partner spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "answered" => Some(Self::Answered),
            "busy" => Some(Self::Busy),
            "no_answer" => Some(Self::NoAnswer),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// Kind of number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumberType {
    /// Unknown.
    Unknown,
    /// Fixed line.
    Fixed,
    /// Mobile.
    Mobile,
    /// Fixed or mobile.
    FixedOrMobile,
    /// Premium rate.
    Premium,
    /// Toll free.
    TollFree,
    /// Shared cost.
    SharedCost,
    /// Personal number.
    Personal,
    /// VoIP.
    Voip,
    /// Pager, UAN, voicemail and other special services.
    Special,
    /// Satellite and international networks (+881/+882/+883).
    InternationalNetwork,
}

/// Risk tier of a destination range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskTier {
    /// No known fraud association.
    Low,
    /// Some association.
    Elevated,
    /// Frequent IRSF destination.
    High,
    /// International networks, confirmed campaigns.
    Critical,
}

impl RiskTier {
    /// Parses `low|elevated|high|critical`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "low" => Some(Self::Low),
            "elevated" => Some(Self::Elevated),
            "high" => Some(Self::High),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Elevated => "elevated",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// One step up (for unallocated numbers in a listed range).
    pub fn raised(self) -> Self {
        match self {
            Self::Low => Self::Elevated,
            Self::Elevated => Self::High,
            _ => Self::Critical,
        }
    }
}

/// A keyed pseudonym (see [`crate::pseudo`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Token {
    /// Key id.
    pub key_id: String,
    /// Hex token.
    pub value: String,
}

impl Token {
    /// `keyid:value`, the form used in store keys and logs.
    pub fn compact(&self) -> String {
        format!("{}:{}", self.key_id, self.value)
    }

    /// Short form for display (`k1:3f2a9c…`).
    pub fn short(&self) -> String {
        format!(
            "{}:{}",
            self.key_id,
            &self.value[..self.value.len().min(10)]
        )
    }
}

/// Classification of a number, in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberInfo {
    /// ISO region, "001" for international networks, "ZZ" unknown.
    pub country: String,
    /// Country calling code.
    pub country_code: u16,
    /// Range prefix, e.g. "+67077".
    pub range: String,
    /// Kind of number.
    pub number_type: NumberType,
    /// Risk tier.
    pub risk_tier: RiskTier,
    /// Valid shape but not allocated according to the metadata.
    pub unallocated: bool,
}

/// A normalised, pseudonymised call event (the domain form of the protobuf
/// `tollguard.v1.CallEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallEvent {
    /// Carrier.
    pub provider_id: String,
    /// Unique per provider.
    pub event_id: String,
    /// Groups the phases of one call.
    pub call_id: String,
    /// Phase.
    pub phase: Phase,
    /// Customer pseudonym.
    pub customer: Option<Token>,
    /// Line pseudonym.
    pub line: Token,
    /// Caller pseudonym.
    pub caller: Token,
    /// Callee pseudonym.
    pub callee: Token,
    /// Callee classification.
    pub callee_info: NumberInfo,
    /// Caller classification.
    pub caller_info: NumberInfo,
    /// Direction.
    pub direction: Direction,
    /// Start (event) time.
    pub start_time: Millis,
    /// Answer time.
    pub answer_time: Option<Millis>,
    /// Elapsed or total seconds.
    pub duration_s: f64,
    /// End disposition.
    pub disposition: Option<Disposition>,
    /// Source IP pseudonym.
    pub source_ip: Option<Token>,
    /// Carrier-given charge (currency, micros).
    pub charge: Option<(String, i64)>,
    /// Estimated charge in micro-EUR.
    pub estimated_charge: i64,
    /// Callee block pseudonym (number without last two digits).
    pub callee_block: Token,
    /// Last two digits of the callee.
    pub callee_block_offset: u32,
    /// Processing time at the ingester.
    pub ingested_at: Millis,
}

impl CallEvent {
    /// The event time at which this phase happened: start for `start`,
    /// start + elapsed for `interim` and `end`.
    pub fn phase_time(&self) -> Millis {
        match self.phase {
            Phase::Start => self.start_time,
            _ => self.start_time + (self.duration_s * 1000.0) as i64,
        }
    }

    /// The customer key used to join carriers: the customer pseudonym, else
    /// the line pseudonym (DESIGN §4: the Kafka key).
    pub fn subject(&self) -> &Token {
        self.customer.as_ref().unwrap_or(&self.line)
    }

    /// Globally unique event key: provider and event id.
    pub fn event_key(&self) -> String {
        format!("{}/{}", self.provider_id, self.event_id)
    }

    /// Globally unique call key: provider and call id.
    pub fn call_key(&self) -> String {
        format!("{}/{}", self.provider_id, self.call_id)
    }

    /// The remote party's classification: callee for outbound, caller for
    /// inbound.
    pub fn remote(&self) -> &NumberInfo {
        match self.direction {
            Direction::Outbound => &self.callee_info,
            Direction::Inbound => &self.caller_info,
        }
    }
}
