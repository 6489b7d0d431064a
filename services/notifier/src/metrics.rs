//! Notifier metrics (`tollguard_notifier_*`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a delivery outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `webhook` or `email`.
    pub channel: String,
    /// `delivered`, `retrying`, `failed`, `refused`.
    pub outcome: String,
}

/// The notifier's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Delivery attempts by channel and outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Duration of one delivery attempt.
    pub delivery_seconds: Histogram,
    /// Open `Watch` streams.
    pub watch_subscribers: Gauge,
    /// Notifications written to the dead-letter topic.
    pub dlq: Counter,
    /// Alerts consumed (new incident versions).
    pub alerts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            deliveries: Family::default(),
            delivery_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            watch_subscribers: Gauge::default(),
            dlq: Counter::default(),
            alerts: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers the metrics.
    pub fn register(reg: &mut Registry) -> Self {
        let m = Self::default();
        reg.register(
            "notifier_deliveries",
            "Delivery attempts by channel and outcome",
            m.deliveries.clone(),
        );
        reg.register(
            "notifier_delivery_seconds",
            "Duration of one delivery attempt",
            m.delivery_seconds.clone(),
        );
        reg.register(
            "notifier_watch_subscribers",
            "Open Alerts.Watch streams",
            m.watch_subscribers.clone(),
        );
        reg.register(
            "notifier_dead_letters",
            "Notifications written to the dead-letter topic",
            m.dlq.clone(),
        );
        reg.register(
            "notifier_alerts",
            "Alerts consumed (new incident versions)",
            m.alerts.clone(),
        );
        m
    }

    /// Counts one attempt.
    pub fn attempt(&self, channel: &str, outcome: &str, seconds: f64) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                channel: channel.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.delivery_seconds.observe(seconds);
    }
}
