//! Errors of the pure core. Every validation error names the field and the
//! reason, so a partner gets `INVALID_ARGUMENT: callee: no known country code`
//! rather than a generic failure.

use std::fmt;

/// A partner record failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The offending field, e.g. `callee` or `start_time`.
    pub field: String,
    /// What is wrong with it, in words.
    pub reason: String,
    /// Whether the record was refused because it names another carrier
    /// (maps to `PERMISSION_DENIED` rather than `INVALID_ARGUMENT`).
    pub kind: FieldErrorKind,
}

/// Class of a [`FieldError`], mapped to a gRPC status code by the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// The value is malformed or out of range.
    Invalid,
    /// The record claims an identity the caller does not have.
    PermissionDenied,
}

impl FieldErrorKind {
    /// gRPC status code name.
    pub fn code(self) -> &'static str {
        match self {
            FieldErrorKind::Invalid => "INVALID_ARGUMENT",
            FieldErrorKind::PermissionDenied => "PERMISSION_DENIED",
        }
    }
}

impl FieldError {
    /// An `INVALID_ARGUMENT` error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
            kind: FieldErrorKind::Invalid,
        }
    }

    /// A `PERMISSION_DENIED` error for `field`.
    pub fn denied(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
            kind: FieldErrorKind::PermissionDenied,
        }
    }
}

/// A configuration file or value is invalid. `key` is the dotted path of the
/// offending entry (e.g. `spend_cap.warning_ratio` or `policies[3].customer_id`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// Dotted path of the offending key.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// Builds a config error.
    pub fn new(key: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    /// Converts a `toml` deserialisation error, keeping the key path it names.
    pub fn from_toml(file: &str, err: &toml::de::Error) -> Self {
        let msg = err.message().to_string();
        // toml reports unknown fields as "unknown field `x`, expected ..."
        let key = msg
            .split('`')
            .nth(1)
            .filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"))
            .map(|k| format!("{file}: {k}"))
            .unwrap_or_else(|| file.to_string());
        let at = err
            .span()
            .map(|s| format!(" (at byte {})", s.start))
            .unwrap_or_default();
        Self::new(key, format!("{msg}{at}"))
    }
}

/// Errors of window stores and event buses (their I/O lives in other crates;
/// they report through this type so the core can stay generic).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend is unreachable or failed; the operation may be retried.
    #[error("window store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something the store cannot interpret.
    #[error("window store protocol error: {0}")]
    Protocol(String),
}

/// Errors of an [`crate::bus::EventBus`].
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The producer queue is full: back off and retry after the given delay.
    #[error("bus backpressure: producer queue full, retry after {retry_after_ms} ms")]
    Backpressure {
        /// Suggested delay before retrying.
        retry_after_ms: u64,
    },
    /// The bus is unreachable or failed.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The subscription was closed.
    #[error("bus subscription closed")]
    Closed,
}
