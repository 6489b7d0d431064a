//! Signed webhook requests and the retry policy shared with e-mail.
//!
//! A webhook is a `POST` of the scoped alert as JSON with
//!
//! * `TollGuard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//!   (a fresh `t` per attempt; receivers should refuse a `t` too far from
//!   their clock, e.g. ±5 minutes, and compare in constant time),
//! * `TollGuard-Delivery: <id>` — the same for every attempt of one
//!   notification to one endpoint (deduplicate on it),
//! * `TollGuard-Incident: <incident id>` and `TollGuard-Attempt: <n>`.
//!
//! 2xx is delivered; 408, 429 and 5xx (and timeouts, connection errors) are
//! retried; any other status is a permanent failure. Redirects are not
//! followed and no proxy is used.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

use crate::config::{Endpoint, RetrySettings};
use crate::ssrf::{Guard, GuardedResolver};

/// Header names.
pub const HEADER_SIGNATURE: &str = "TollGuard-Signature";
/// Delivery id header.
pub const HEADER_DELIVERY: &str = "TollGuard-Delivery";
/// Incident header.
pub const HEADER_INCIDENT: &str = "TollGuard-Incident";
/// Attempt header.
pub const HEADER_ATTEMPT: &str = "TollGuard-Attempt";

/// `t=<t>,v1=<hex>` for `body` at unix time `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Verifies a signature header (for receivers and tests): the MAC matches
/// and `t` is within `tolerance` of `now`.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), String> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.push(v.to_string()),
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    if (now - t).unsigned_abs() > tolerance.as_secs() {
        return Err(format!("timestamp {t} is outside the tolerance"));
    }
    for s in sigs {
        let Ok(bytes) = hex::decode(&s) else { continue };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|e| e.to_string())?;
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&bytes).is_ok() {
            return Ok(());
        }
    }
    Err("no matching v1 signature".into())
}

/// Outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Accepted (2xx / SMTP 2xx).
    Delivered {
        /// Status code.
        code: u32,
    },
    /// Failed, may succeed later.
    Transient {
        /// Status code, 0 when none.
        code: u32,
        /// Why.
        error: String,
        /// The receiver's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Failed for good.
    Permanent {
        /// Status code, 0 when none.
        code: u32,
        /// Why.
        error: String,
    },
    /// Refused by the SSRF guard; never contacted.
    Refused {
        /// Why.
        error: String,
    },
}

/// Parses `Retry-After`: delta seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Classifies an HTTP status.
pub fn classify_status(code: u16, retry_after: Option<Duration>) -> Attempt {
    let c = u32::from(code);
    match code {
        200..=299 => Attempt::Delivered { code: c },
        408 | 429 | 500..=599 => Attempt::Transient {
            code: c,
            error: format!("HTTP {code}"),
            retry_after,
        },
        _ => Attempt::Permanent {
            code: c,
            error: format!("HTTP {code}"),
        },
    }
}

/// The delay before attempt `next` (2, 3, …): full jitter over
/// `min(max, initial · 2^(next-2))`, but never less than `retry_after`.
pub fn backoff(p: &RetrySettings, next: u32, retry_after: Option<Duration>) -> Duration {
    let exp = next.saturating_sub(2).min(30);
    let cap = p
        .initial_backoff_ms
        .saturating_mul(1u64 << exp)
        .min(p.max_backoff_ms);
    let jitter = rand::rng().random_range(0..=cap);
    let d = Duration::from_millis(jitter);
    match retry_after {
        Some(r) if r > d => r,
        _ => d,
    }
}

/// The webhook HTTP client: no redirects, no proxy, timeouts, and the
/// SSRF guard in its resolver.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    guard: Arc<Guard>,
}

impl WebhookClient {
    /// Builds the client.
    pub fn new(
        guard: Arc<Guard>,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            .dns_resolver(Arc::new(GuardedResolver::new(guard.clone())))
            .user_agent(concat!("TollGuard-Notifier/", env!("CARGO_PKG_VERSION")))
            .https_only(!guard.allows_insecure_http())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http, guard })
    }

    /// One attempt: checks the target, signs, posts.
    pub async fn attempt(
        &self,
        ep: &Endpoint,
        body: &str,
        delivery_id: &str,
        incident: &str,
        attempt: u32,
    ) -> Attempt {
        match self.guard.check_target(&ep.url).await {
            Err(refusal) => {
                return Attempt::Refused {
                    error: format!("refused by the SSRF guard: {refusal}"),
                };
            }
            Ok(Err(dns)) => {
                return Attempt::Transient {
                    code: 0,
                    error: dns,
                    retry_after: None,
                };
            }
            Ok(Ok(())) => {}
        }
        let t = chrono::Utc::now().timestamp();
        let sig = signature(ep.secret(), t, body.as_bytes());
        let res = self
            .http
            .post(ep.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_SIGNATURE, sig)
            .header(HEADER_DELIVERY, delivery_id)
            .header(HEADER_INCIDENT, incident)
            .header(HEADER_ATTEMPT, attempt.to_string())
            .body(body.to_string())
            .send()
            .await;
        match res {
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                // Drain a little of the body so the connection can be reused.
                let _ = tokio::time::timeout(Duration::from_millis(200), r.bytes()).await;
                classify_status(status, retry_after)
            }
            Err(e) => {
                let mut msg = e.to_string();
                let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    if s.downcast_ref::<crate::ssrf::Refusal>().is_some() {
                        return Attempt::Refused {
                            error: format!("refused by the SSRF guard: {s}"),
                        };
                    }
                    src = s.source();
                }
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                Attempt::Transient {
                    code: 0,
                    error: format!("{kind}: {msg}"),
                    retry_after: None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_round_trip_and_expire() {
        let s = signature(b"0123456789abcdef", 1_700_000_000, b"{\"a\":1}");
        assert!(s.starts_with("t=1700000000,v1="));
        let tol = Duration::from_secs(300);
        verify_signature(b"0123456789abcdef", &s, b"{\"a\":1}", 1_700_000_100, tol).unwrap();
        assert!(
            verify_signature(b"0123456789abcdef", &s, b"{\"a\":2}", 1_700_000_100, tol).is_err()
        );
        assert!(
            verify_signature(b"other-secret-xxxx", &s, b"{\"a\":1}", 1_700_000_100, tol).is_err()
        );
        assert!(
            verify_signature(b"0123456789abcdef", &s, b"{\"a\":1}", 1_700_001_000, tol).is_err()
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(
            classify_status(204, None),
            Attempt::Delivered { code: 204 }
        ));
        for c in [408, 429, 500, 503] {
            assert!(
                matches!(classify_status(c, None), Attempt::Transient { .. }),
                "{c}"
            );
        }
        for c in [301, 400, 401, 404, 410] {
            assert!(
                matches!(classify_status(c, None), Attempt::Permanent { .. }),
                "{c}"
            );
        }
    }

    #[test]
    fn retry_after_in_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_has_full_jitter_under_a_growing_cap() {
        let p = RetrySettings {
            max_attempts: 6,
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            horizon_ms: 60_000,
        };
        for _ in 0..200 {
            assert!(backoff(&p, 2, None) <= Duration::from_millis(100));
            assert!(backoff(&p, 4, None) <= Duration::from_millis(400));
            assert!(backoff(&p, 20, None) <= Duration::from_millis(1_000));
        }
        assert!(backoff(&p, 2, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }
}
