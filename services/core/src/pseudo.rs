//! Keyed pseudonymisation: HMAC-SHA256 under the consortium key.
//!
//! `token = hex(HMAC-SHA256(key, kind || 0x1f || value)[..16])`. The kind
//! separates domains (a customer id and a phone number with the same digits
//! never collide); phone numbers share one kind, `number`, so a caller and a
//! callee that are the same number join (Wangiri callbacks). The key never
//! appears in `Debug` output, logs or errors.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::ConfigError;
use crate::model::Token;

type HmacSha256 = Hmac<Sha256>;

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Consortium-wide enterprise account (`customer_id`).
    Customer,
    /// Trunk/PBX/line at one provider (value is `provider/line_id`).
    Line,
    /// An E.164 number (caller or callee).
    Number,
    /// A number without its last two digits (sequential-probe blocks).
    Block,
    /// A source IP address.
    Ip,
}

impl Kind {
    /// Name used in the HMAC input and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Customer => "customer",
            Kind::Line => "line",
            Kind::Number => "number",
            Kind::Block => "block",
            Kind::Ip => "ip",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "customer" => Some(Kind::Customer),
            "line" => Some(Kind::Line),
            "number" => Some(Kind::Number),
            "block" => Some(Kind::Block),
            "ip" => Some(Kind::Ip),
            _ => None,
        }
    }
}

/// A consortium pseudonymisation key.
#[derive(Clone)]
pub struct Key {
    id: String,
    mac: HmacSha256,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Key {
    /// Builds a key from its id and secret bytes (at least 32 bytes).
    pub fn new(id: &str, secret: &[u8]) -> Result<Self, ConfigError> {
        if id.is_empty()
            || id.len() > 32
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                "pseudonymization.key_id",
                "must be 1-32 characters of [A-Za-z0-9_-]",
            ));
        }
        if secret.len() < 32 {
            return Err(ConfigError::new(
                "pseudonymization.key",
                format!(
                    "the key must be at least 32 bytes (got {}); generate one with `openssl rand -hex 32`",
                    secret.len()
                ),
            ));
        }
        let mac = HmacSha256::new_from_slice(secret)
            .map_err(|e| ConfigError::new("pseudonymization.key", e))?;
        Ok(Self {
            id: id.to_string(),
            mac,
        })
    }

    /// Parses a secret given as hex (64+ hex digits) or as raw text.
    pub fn from_text(id: &str, text: &str) -> Result<Self, ConfigError> {
        let t = text.trim();
        match hex::decode(t) {
            Ok(bytes) if t.len() >= 64 => Self::new(id, &bytes),
            _ => Self::new(id, t.as_bytes()),
        }
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Token of `value` of `kind`.
    pub fn token(&self, kind: Kind, value: &str) -> Token {
        let mut mac = self.mac.clone();
        mac.update(kind.as_str().as_bytes());
        mac.update(&[0x1f]);
        mac.update(value.as_bytes());
        let out = mac.finalize().into_bytes();
        Token {
            key_id: self.id.clone(),
            value: hex::encode(&out[..16]),
        }
    }
}

/// The pseudonymiser used by ingesters: the active key and, during a
/// rotation, the next key with the **event time** from which it applies.
///
/// Key rotation is a schedule on event time, the same at every ingester:
/// an event whose `start_time` is before `rotate_at` is pseudonymised with
/// the current key, from `rotate_at` on with the next key. Tokens are thus a
/// pure function of (value, event time): two carriers' ingesters give the
/// same token for the same customer at the same event time whichever of them
/// received the new configuration first, and a late event from before the
/// switch still gets the old key and joins the other events of its window.
/// See SECURITY.md, "Key rotation".
#[derive(Debug, Clone)]
pub struct Pseudonymizer {
    active: Key,
    next: Option<(Key, i64)>,
}

impl Pseudonymizer {
    /// A pseudonymiser with one active key.
    pub fn new(active: Key) -> Self {
        Self { active, next: None }
    }

    /// A pseudonymiser rotating from `active` to `next` at event time
    /// `rotate_at_ms` (Unix milliseconds).
    pub fn with_rotation(active: Key, next: Key, rotate_at_ms: i64) -> Self {
        Self {
            active,
            next: Some((next, rotate_at_ms)),
        }
    }

    /// The active key id.
    pub fn key_id(&self) -> &str {
        self.active.id()
    }

    /// The key for an event at `event_ms`.
    pub fn key_at(&self, event_ms: i64) -> &Key {
        match &self.next {
            Some((k, at)) if event_ms >= *at => k,
            _ => &self.active,
        }
    }

    /// Token of a value (under the active key).
    pub fn token(&self, kind: Kind, value: &str) -> Token {
        self.active.token(kind, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new("k1", &[7u8; 32]).unwrap()
    }

    #[test]
    fn deterministic_and_domain_separated() {
        let k = key();
        let a = k.token(Kind::Number, "+67077123456");
        assert_eq!(a, k.token(Kind::Number, "+67077123456"));
        assert_ne!(a, k.token(Kind::Customer, "+67077123456"));
        assert_eq!(a.key_id, "k1");
        assert_eq!(a.value.len(), 32);
        let other = Key::new("k2", &[8u8; 32]).unwrap();
        assert_ne!(a.value, other.token(Kind::Number, "+67077123456").value);
    }

    #[test]
    fn rotation_follows_event_time() {
        let k1 = key();
        let k2 = Key::new("k2", &[8u8; 32]).unwrap();
        let p = Pseudonymizer::with_rotation(k1.clone(), k2.clone(), 1_000);
        assert_eq!(p.key_at(999).id(), "k1");
        assert_eq!(p.key_at(1_000).id(), "k2");
        // Two ingesters with the same schedule agree on every event time.
        let q = Pseudonymizer::with_rotation(k1, k2, 1_000);
        for t in [0, 999, 1_000, 5_000] {
            assert_eq!(
                p.key_at(t).token(Kind::Customer, "kvk:1"),
                q.key_at(t).token(Kind::Customer, "kvk:1")
            );
        }
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("[8, 8"), "{dbg}");
    }

    #[test]
    fn short_keys_refused_and_secret_not_in_debug() {
        assert_eq!(
            Key::new("k1", b"short").unwrap_err().key,
            "pseudonymization.key"
        );
        let dbg = format!(
            "{:?}",
            Key::from_text("k1", "supersecretsupersecretsupersecret!!").unwrap()
        );
        assert!(!dbg.contains("supersecret"));
    }
}
