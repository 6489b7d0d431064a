//! Conversion between the domain types and the protobuf contracts of
//! `tollguard.v1` (the Kafka wire format).

use prost::Message;
use tollguard_proto::v1 as pb;

use crate::model::{
    CallEvent, Direction, Disposition, Millis, NumberInfo, NumberType, Phase, RiskTier, Token,
};

/// Millis → protobuf timestamp.
pub fn ts(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Protobuf timestamp → millis.
pub fn from_ts(t: &prost_types::Timestamp) -> Millis {
    t.seconds * 1000 + (t.nanos / 1_000_000) as i64
}

fn tok(t: &Token) -> pb::Token {
    pb::Token {
        key_id: t.key_id.clone(),
        value: t.value.clone(),
    }
}

fn from_tok(t: Option<&pb::Token>) -> Option<Token> {
    t.map(|t| Token {
        key_id: t.key_id.clone(),
        value: t.value.clone(),
    })
}

fn number_type(t: NumberType) -> pb::NumberType {
    use pb::NumberType as P;
    match t {
        NumberType::Unknown => P::Unknown,
        NumberType::Fixed => P::Fixed,
        NumberType::Mobile => P::Mobile,
        NumberType::FixedOrMobile => P::FixedOrMobile,
        NumberType::Premium => P::Premium,
        NumberType::TollFree => P::TollFree,
        NumberType::SharedCost => P::SharedCost,
        NumberType::Personal => P::Personal,
        NumberType::Voip => P::Voip,
        NumberType::Special => P::Special,
        NumberType::InternationalNetwork => P::InternationalNetwork,
    }
}

fn from_number_type(t: i32) -> NumberType {
    use pb::NumberType as P;
    match P::try_from(t).unwrap_or(P::Unknown) {
        P::Unknown => NumberType::Unknown,
        P::Fixed => NumberType::Fixed,
        P::Mobile => NumberType::Mobile,
        P::FixedOrMobile => NumberType::FixedOrMobile,
        P::Premium => NumberType::Premium,
        P::TollFree => NumberType::TollFree,
        P::SharedCost => NumberType::SharedCost,
        P::Personal => NumberType::Personal,
        P::Voip => NumberType::Voip,
        P::Special => NumberType::Special,
        P::InternationalNetwork => NumberType::InternationalNetwork,
    }
}

/// Domain risk tier → protobuf.
pub fn risk(t: RiskTier) -> pb::RiskTier {
    match t {
        RiskTier::Low => pb::RiskTier::Low,
        RiskTier::Elevated => pb::RiskTier::Elevated,
        RiskTier::High => pb::RiskTier::High,
        RiskTier::Critical => pb::RiskTier::Critical,
    }
}

fn from_risk(t: i32) -> RiskTier {
    match pb::RiskTier::try_from(t).unwrap_or(pb::RiskTier::Low) {
        pb::RiskTier::Elevated => RiskTier::Elevated,
        pb::RiskTier::High => RiskTier::High,
        pb::RiskTier::Critical => RiskTier::Critical,
        _ => RiskTier::Low,
    }
}

fn info(i: &NumberInfo) -> pb::NumberInfo {
    pb::NumberInfo {
        country: i.country.clone(),
        country_code: i.country_code as u32,
        range: i.range.clone(),
        number_type: number_type(i.number_type) as i32,
        risk_tier: risk(i.risk_tier) as i32,
        unallocated: i.unallocated,
    }
}

fn from_info(i: Option<&pb::NumberInfo>) -> NumberInfo {
    let d = pb::NumberInfo::default();
    let i = i.unwrap_or(&d);
    NumberInfo {
        country: i.country.clone(),
        country_code: i.country_code as u16,
        range: i.range.clone(),
        number_type: from_number_type(i.number_type),
        risk_tier: from_risk(i.risk_tier),
        unallocated: i.unallocated,
    }
}

/// Domain event → protobuf message.
pub fn to_proto(e: &CallEvent) -> pb::CallEvent {
    pb::CallEvent {
        schema_version: tollguard_proto::CALL_EVENT_SCHEMA_VERSION,
        provider_id: e.provider_id.clone(),
        event_id: e.event_id.clone(),
        call_id: e.call_id.clone(),
        phase: match e.phase {
            Phase::Start => pb::Phase::Start,
            Phase::Interim => pb::Phase::Interim,
            Phase::End => pb::Phase::End,
        } as i32,
        customer: e.customer.as_ref().map(tok),
        line: Some(tok(&e.line)),
        caller: Some(tok(&e.caller)),
        callee: Some(tok(&e.callee)),
        callee_info: Some(info(&e.callee_info)),
        caller_info: Some(info(&e.caller_info)),
        direction: match e.direction {
            Direction::Outbound => pb::Direction::Outbound,
            Direction::Inbound => pb::Direction::Inbound,
        } as i32,
        start_time: Some(ts(e.start_time)),
        answer_time: e.answer_time.map(ts),
        duration_s: e.duration_s,
        disposition: match e.disposition {
            None => pb::Disposition::Unspecified,
            Some(Disposition::Answered) => pb::Disposition::Answered,
            Some(Disposition::Busy) => pb::Disposition::Busy,
            Some(Disposition::NoAnswer) => pb::Disposition::NoAnswer,
            Some(Disposition::Failed) => pb::Disposition::Failed,
        } as i32,
        source_ip: e.source_ip.as_ref().map(tok),
        charge: e.charge.as_ref().map(|(c, m)| pb::Money {
            currency: c.clone(),
            micros: *m,
        }),
        estimated_charge: Some(pb::Money {
            currency: "EUR".into(),
            micros: e.estimated_charge,
        }),
        callee_block: Some(tok(&e.callee_block)),
        callee_block_offset: e.callee_block_offset,
        ingested_at: Some(ts(e.ingested_at)),
    }
}

/// Encodes an event for the bus.
pub fn encode_event(e: &CallEvent) -> Vec<u8> {
    to_proto(e).encode_to_vec()
}

/// Why a bus record could not be decoded (it goes to the DLQ with this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable call event: {0}")]
pub struct DecodeError(pub String);

/// Decodes and checks a bus record.
pub fn decode_event(bytes: &[u8]) -> Result<CallEvent, DecodeError> {
    let p = pb::CallEvent::decode(bytes).map_err(|e| DecodeError(e.to_string()))?;
    from_proto(&p)
}

/// Protobuf message → domain event, checking required fields.
pub fn from_proto(p: &pb::CallEvent) -> Result<CallEvent, DecodeError> {
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(DecodeError(format!("{what} is missing")))
        }
    };
    need(!p.provider_id.is_empty(), "provider_id")?;
    need(!p.event_id.is_empty(), "event_id")?;
    need(p.line.is_some(), "line")?;
    need(p.start_time.is_some(), "start_time")?;
    if p.schema_version != tollguard_proto::CALL_EVENT_SCHEMA_VERSION {
        return Err(DecodeError(format!(
            "unsupported schema_version {}",
            p.schema_version
        )));
    }
    let phase = match pb::Phase::try_from(p.phase) {
        Ok(pb::Phase::Start) => Phase::Start,
        Ok(pb::Phase::Interim) => Phase::Interim,
        Ok(pb::Phase::End) => Phase::End,
        _ => return Err(DecodeError("phase is unspecified".into())),
    };
    let direction = match pb::Direction::try_from(p.direction) {
        Ok(pb::Direction::Outbound) => Direction::Outbound,
        Ok(pb::Direction::Inbound) => Direction::Inbound,
        _ => return Err(DecodeError("direction is unspecified".into())),
    };
    if !p.duration_s.is_finite() || p.duration_s < 0.0 {
        return Err(DecodeError("duration_s is not a finite number >= 0".into()));
    }
    let empty = Token {
        key_id: String::new(),
        value: String::new(),
    };
    Ok(CallEvent {
        provider_id: p.provider_id.clone(),
        event_id: p.event_id.clone(),
        call_id: p.call_id.clone(),
        phase,
        customer: from_tok(p.customer.as_ref()),
        line: from_tok(p.line.as_ref()).unwrap_or_else(|| empty.clone()),
        caller: from_tok(p.caller.as_ref()).unwrap_or_else(|| empty.clone()),
        callee: from_tok(p.callee.as_ref()).unwrap_or_else(|| empty.clone()),
        callee_info: from_info(p.callee_info.as_ref()),
        caller_info: from_info(p.caller_info.as_ref()),
        direction,
        start_time: p.start_time.as_ref().map(from_ts).unwrap_or(0),
        answer_time: p.answer_time.as_ref().map(from_ts),
        duration_s: p.duration_s,
        disposition: match pb::Disposition::try_from(p.disposition) {
            Ok(pb::Disposition::Answered) => Some(Disposition::Answered),
            Ok(pb::Disposition::Busy) => Some(Disposition::Busy),
            Ok(pb::Disposition::NoAnswer) => Some(Disposition::NoAnswer),
            Ok(pb::Disposition::Failed) => Some(Disposition::Failed),
            _ => None,
        },
        source_ip: from_tok(p.source_ip.as_ref()),
        charge: p.charge.as_ref().map(|m| (m.currency.clone(), m.micros)),
        estimated_charge: p.estimated_charge.as_ref().map(|m| m.micros).unwrap_or(0),
        callee_block: from_tok(p.callee_block.as_ref()).unwrap_or(empty),
        callee_block_offset: p.callee_block_offset,
        ingested_at: p.ingested_at.as_ref().map(from_ts).unwrap_or(0),
    })
}
