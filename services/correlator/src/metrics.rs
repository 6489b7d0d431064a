//! Correlator metrics (`tollguard_correlator_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tollguard_proto::v1 as pb;

/// Alert labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// Rule.
    pub rule: String,
    /// Severity.
    pub severity: String,
}

/// The correlator's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Events processed.
    pub events: Counter,
    /// Records sent to the DLQ.
    pub dead_letters: Counter,
    /// Re-delivered events.
    pub duplicates: Counter,
    /// Events later than the allowed lateness.
    pub late: Counter,
    /// Alerts by rule and severity.
    pub alerts: Family<AlertLabels, Counter>,
    /// Engine time per batch (window store round trips and rules).
    pub store_seconds: Histogram,
    /// Events held back to align the carriers' feeds in event time.
    pub held: Gauge,
    /// Partitions not fetched while the slowest carrier lane catches up.
    pub paused: Gauge,
    /// Held events released at the `max_events` bound, out of order.
    pub forced: Counter,
    /// The low watermark window state is pruned behind, over every
    /// replica's lanes (event time, Unix seconds).
    pub low_watermark: Gauge,
    /// Findings waiting for another replica's claim on their incident.
    pub unsettled: Gauge,
}

impl Metrics {
    /// Registers the metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self {
            events: Counter::default(),
            dead_letters: Counter::default(),
            duplicates: Counter::default(),
            late: Counter::default(),
            alerts: Family::default(),
            store_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            held: Gauge::default(),
            paused: Gauge::default(),
            forced: Counter::default(),
            low_watermark: Gauge::default(),
            unsettled: Gauge::default(),
        };
        reg.register(
            "correlator_low_watermark_seconds",
            "Event time (Unix seconds) of the slowest carrier lane over all correlator replicas; window state is pruned only behind it",
            m.low_watermark.clone(),
        );
        reg.register(
            "correlator_unsettled_findings",
            "Findings waiting for another correlator replica to confirm its claim on their incident (decided once it does, or after the claim's grace period)",
            m.unsettled.clone(),
        );
        reg.register(
            "correlator_held_events",
            "Historical events held back until every active carrier's feed reached their event time (alignment)",
            m.held.clone(),
        );
        reg.register(
            "correlator_paused_partitions",
            "Partitions of the calls topic not fetched while the slowest carrier lane catches up (alignment flow control, from half of alignment.max_events held)",
            m.paused.clone(),
        );
        reg.register(
            "correlator_alignment_forced_releases",
            "Held events released at alignment.max_events before every active carrier lane reached them (a replay skewed by more than the bound: raise it)",
            m.forced.clone(),
        );
        reg.register(
            "correlator_events",
            "Call events processed",
            m.events.clone(),
        );
        reg.register(
            "correlator_dead_letters",
            "Records sent to the DLQ",
            m.dead_letters.clone(),
        );
        reg.register(
            "correlator_duplicate_events",
            "Re-delivered events that changed nothing",
            m.duplicates.clone(),
        );
        reg.register(
            "correlator_late_events",
            "Events later than the allowed lateness (counted toward spend, not toward closed windows)",
            m.late.clone(),
        );
        reg.register(
            "correlator_alerts",
            "Alerts published, by rule and severity",
            m.alerts.clone(),
        );
        reg.register(
            "correlator_batch_seconds",
            "Engine time per batch: window store round trips and rule evaluation (per call: window_store_request_seconds)",
            m.store_seconds.clone(),
        );
        m
    }

    /// Counts an alert.
    pub fn alert(&self, a: &pb::Alert) {
        self.alerts
            .get_or_create(&AlertLabels {
                rule: tollguard_core::render::rule_name(a),
                severity: tollguard_core::render::severity_name(a),
            })
            .inc();
    }
}
