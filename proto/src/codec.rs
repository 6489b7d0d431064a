//! The gRPC codec of TollGuard's services: tonic-prost's, except that a
//! message that fails to decode is `INVALID_ARGUMENT` naming the field
//! (`records.caller`), not `INTERNAL`.
//!
//! tonic-prost maps every [`prost::DecodeError`] to `INTERNAL`, following
//! gRPC's status-code table for a *server's* parse failure. For a partner's
//! request the cause is the caller's bytes — typically invalid UTF-8 in a
//! `string` field, which prost refuses while decoding — and the caller must
//! be told which field to fix. The wire format and the `.proto` contracts
//! are unchanged: this only changes the status of an undecodable message.
//!
//! The generated clients and servers of `tollguard.v1` use this codec
//! (`proto/build.rs`), so a client built from this crate reports an
//! undecodable *response* the same way.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// [`tonic_prost::ProstCodec`] with decode failures as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct StrictProstCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictProstCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictProstDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; a failure is `INVALID_ARGUMENT` (see [`decode_status`]).
#[derive(Debug, Clone)]
pub struct StrictProstDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| decode_status(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status of an undecodable message: `INVALID_ARGUMENT` with the field
/// path from the root message (`PublishRequest: field records.caller:
/// invalid string value: data is not UTF-8 encoded`).
///
/// prost's error renders its path innermost first
/// (`failed to decode Protobuf message: CallRecord.caller:
/// PublishRequest.records: invalid string value: …`); it has no accessor for
/// it, so the rendering is parsed, and if it ever changes shape the
/// message is passed on whole (still `INVALID_ARGUMENT`).
pub fn decode_status(e: &prost::DecodeError) -> Status {
    let text = e.to_string();
    let Some(rest) = text.strip_prefix("failed to decode Protobuf message: ") else {
        return Status::invalid_argument(format!("malformed request: {text}"));
    };
    let mut frames = Vec::new();
    let mut tail = rest;
    while let Some((head, more)) = tail.split_once(": ") {
        match head.split_once('.') {
            Some((msg, field)) if is_ident(msg) && is_ident(field) => {
                frames.push((msg, field));
                tail = more;
            }
            _ => break,
        }
    }
    let Some(&(root, _)) = frames.last() else {
        return Status::invalid_argument(format!("malformed request: {tail}"));
    };
    let path: Vec<&str> = frames.iter().rev().map(|(_, f)| *f).collect();
    Status::invalid_argument(format!(
        "malformed {root}: field {}: {tail}",
        path.join(".")
    ))
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// `CallRecord` with `caller` (tag 7) as bytes, inside `PublishRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Req {
        #[prost(uint64, tag = "1")]
        batch_id: u64,
        #[prost(message, repeated, tag = "2")]
        records: Vec<Rec>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Rec {
        #[prost(string, tag = "1")]
        provider_id: String,
        #[prost(bytes = "vec", tag = "7")]
        caller: Vec<u8>,
    }

    fn status_of(bytes: &[u8]) -> Status {
        let e = crate::v1::PublishRequest::decode(bytes).unwrap_err();
        decode_status(&e)
    }

    #[test]
    fn invalid_utf8_names_the_field_path() {
        let bytes = Req {
            batch_id: 1,
            records: vec![Rec {
                provider_id: "kpn".into(),
                caller: vec![0x30, 0xff, 0xfe],
            }],
        }
        .encode_to_vec();
        let st = status_of(&bytes);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(
            st.message(),
            "malformed PublishRequest: field records.caller: invalid string value: data is not UTF-8 encoded"
        );
    }

    #[test]
    fn other_failures_are_invalid_argument_too() {
        // A truncated varint at the top level: no field path.
        let st = status_of(&[0x08, 0xff]);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().starts_with("malformed"), "{}", st.message());
        // A length beyond the buffer inside a record.
        let st = status_of(&[0x12, 0x04, 0x0a, 0x09, b'k']);
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().contains("records"), "{}", st.message());
    }
}
