//! Abuse limits of the ingest API: a token bucket of records per carrier
//! (principal) and a bound on concurrent `Publish` streams per carrier.
//! Pure bookkeeping over explicit instants, so it is tested without a clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now.max(self.last);
    }

    /// Takes `n` tokens, or says how long to wait until `n` are available
    /// (nothing is taken then). `n` above the burst can never be served:
    /// the wait is `None`.
    pub fn try_take(&mut self, n: f64, now: Instant) -> Result<(), Option<Duration>> {
        self.refill(now);
        if n > self.burst {
            return Err(None);
        }
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            let wait = (n - self.tokens) / self.rate;
            Err(Some(Duration::from_secs_f64(wait.max(0.001))))
        }
    }
}

/// One token bucket per principal.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl RateLimiter {
    /// `rate` records per second, `burst` records at once, per principal.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Admits `n` records of `principal` at `now`, or returns the advised
    /// wait (`None`: never, the batch exceeds the burst).
    pub fn admit(&self, principal: &str, n: usize, now: Instant) -> Result<(), Option<Duration>> {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = b
            .entry(principal.to_string())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now));
        bucket.try_take(n as f64, now)
    }
}

/// Bounded concurrent streams per principal.
#[derive(Debug, Clone)]
pub struct StreamSlots {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// An open stream's slot; released on drop.
#[derive(Debug)]
pub struct StreamSlot {
    principal: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.principal);
            }
        }
    }
}

impl StreamSlots {
    /// At most `max` streams per principal.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// The most streams a principal may hold.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for `principal`, or `None` if it holds `max` already.
    pub fn acquire(&self, principal: &str) -> Option<StreamSlot> {
        let mut m = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(principal.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            principal: principal.to_string(),
            open: self.open.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_the_rate_and_caps_at_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 50.0, t0);
        assert!(b.try_take(50.0, t0).is_ok());
        let wait = b.try_take(10.0, t0).unwrap_err().unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // 100 ms later 10 tokens are back.
        assert!(b.try_take(10.0, t0 + Duration::from_millis(100)).is_ok());
        // An hour later the bucket holds the burst, not more.
        let later = t0 + Duration::from_secs(3600);
        assert!(b.try_take(50.0, later).is_ok());
        assert!(b.try_take(1.0, later).is_err());
        // More than the burst: never.
        assert_eq!(b.try_take(51.0, later), Err(None));
    }

    #[test]
    fn one_principal_exhausting_its_bucket_leaves_another_untouched() {
        let t0 = Instant::now();
        let l = RateLimiter::new(10.0, 20.0);
        assert!(l.admit("kpn", 20, t0).is_ok());
        assert!(l.admit("kpn", 1, t0).is_err());
        assert!(l.admit("bt", 20, t0).is_ok());
    }

    #[test]
    fn stream_slots_are_bounded_per_principal_and_released_on_drop() {
        let s = StreamSlots::new(2);
        let a = s.acquire("kpn").unwrap();
        let _b = s.acquire("kpn").unwrap();
        assert!(s.acquire("kpn").is_none());
        assert!(s.acquire("bt").is_some());
        drop(a);
        assert!(s.acquire("kpn").is_some());
    }
}
