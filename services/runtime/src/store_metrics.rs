//! Latency and errors of every window store call, by operation:
//! `tollguard_window_store_request_seconds{op}` and
//! `tollguard_window_store_errors_total{op}`. A decorator over any
//! [`WindowStore`], so the Redis store itself stays free of metrics.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tollguard_core::error::StoreError;
use tollguard_core::store::{LaneMark, Outcome, Scope, StateWrite, Update, WindowStore};

/// Label of the store metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `apply`, `get_states`, `cas_state`, `cas_states`, `set_members`,
    /// `set_add`, `ping`.
    pub op: &'static str,
}

type Seconds = Family<OpLabels, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 0.1 ms .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A [`WindowStore`] that times every call.
#[derive(Debug, Clone)]
pub struct MeteredStore {
    inner: Arc<dyn WindowStore>,
    seconds: Seconds,
    errors: Family<OpLabels, Counter>,
}

impl MeteredStore {
    /// Wraps `inner`, registering the metrics in `reg`.
    pub fn wrap(inner: Arc<dyn WindowStore>, reg: &mut Registry) -> Arc<dyn WindowStore> {
        let seconds = Seconds::new_with_constructor(seconds_histogram);
        let errors = Family::<OpLabels, Counter>::default();
        reg.register(
            "window_store_request_seconds",
            "Duration of one window store call (one Redis round trip or script), by operation",
            seconds.clone(),
        );
        reg.register(
            "window_store_errors",
            "Window store calls that failed, by operation",
            errors.clone(),
        );
        Arc::new(Self {
            inner,
            seconds,
            errors,
        })
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let t0 = Instant::now();
        let r = f.await;
        let l = OpLabels { op };
        self.seconds
            .get_or_create(&l)
            .observe(t0.elapsed().as_secs_f64());
        if r.is_err() {
            self.errors.get_or_create(&l).inc();
        }
        r
    }
}

#[async_trait]
impl WindowStore for MeteredStore {
    async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError> {
        self.timed("apply", self.inner.apply(updates)).await
    }

    async fn get_states(
        &self,
        keys: &[(Scope, String)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        self.timed("get_states", self.inner.get_states(keys)).await
    }

    async fn cas_state(&self, write: &StateWrite) -> Result<bool, StoreError> {
        self.timed("cas_state", self.inner.cas_state(write)).await
    }

    async fn cas_states(&self, writes: &[StateWrite]) -> Result<Vec<bool>, StoreError> {
        self.timed("cas_states", self.inner.cas_states(writes))
            .await
    }

    async fn set_members(&self, name: &str) -> Result<Vec<String>, StoreError> {
        self.timed("set_members", self.inner.set_members(name))
            .await
    }

    async fn set_add(&self, name: &str, member: &str) -> Result<bool, StoreError> {
        self.timed("set_add", self.inner.set_add(name, member))
            .await
    }

    async fn merge_lanes(
        &self,
        name: &str,
        lanes: &[LaneMark],
        now: i64,
        retain_ms: i64,
    ) -> Result<Vec<LaneMark>, StoreError> {
        self.timed(
            "merge_lanes",
            self.inner.merge_lanes(name, lanes, now, retain_ms),
        )
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollguard_core::store::MemoryStore;

    #[tokio::test]
    async fn every_call_is_timed_by_operation() {
        let mut reg = Registry::with_prefix("tollguard");
        let s = MeteredStore::wrap(Arc::new(MemoryStore::new("t:")), &mut reg);
        s.ping().await.unwrap();
        assert!(s.set_add("hot", "range:+1").await.unwrap());
        assert_eq!(s.set_members("hot").await.unwrap(), vec!["range:+1"]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for op in ["ping", "set_add", "set_members"] {
            assert!(
                text.contains(&format!(
                    "tollguard_window_store_request_seconds_count{{op=\"{op}\"}} 1"
                )),
                "{text}"
            );
        }
        assert!(
            !text.contains("tollguard_window_store_errors_total{"),
            "{text}"
        );
    }
}
