//! Ingester metrics (`tollguard_ingest_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of record counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    /// Carrier.
    pub provider: String,
    /// accepted | rejected | denied | backpressure | throttled.
    pub outcome: String,
}

/// The ingester's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Records by outcome.
    pub records: Family<RecordLabels, Counter>,
    /// Batch latency (receive → ack), seconds.
    pub batch_seconds: Histogram,
}

impl Metrics {
    /// Registers the metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            records: Family::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        };
        reg.register(
            "ingest_records",
            "Call records received, by outcome",
            m.records.clone(),
        );
        reg.register(
            "ingest_batch_seconds",
            "Time from receiving a batch to acknowledging it",
            m.batch_seconds.clone(),
        );
        m
    }

    /// Counts records.
    pub fn count(&self, provider: &str, outcome: &str, n: u64) {
        if n > 0 {
            self.records
                .get_or_create(&RecordLabels {
                    provider: provider.to_string(),
                    outcome: outcome.to_string(),
                })
                .inc_by(n);
        }
    }
}
