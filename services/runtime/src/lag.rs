//! Consumer lag of a group, measured the way `kafka-consumer-groups.sh
//! --describe` does: the partition's high watermark minus the group's
//! committed offset, asked of the broker every few seconds by a client that
//! does not join the group. Exported as
//! `tollguard_kafka_consumer_lag_records{group,topic,partition}`.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaSettings;

/// Labels of the lag gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition number.
    pub partition: String,
}

/// The lag gauge family.
pub type LagGauge = Family<LagLabels, Gauge>;

/// Registers `kafka_consumer_lag_records` (prefix added by the registry).
pub fn register(reg: &mut Registry) -> LagGauge {
    let g = LagGauge::default();
    reg.register(
        "kafka_consumer_lag_records",
        "Records not yet committed by the consumer group, per partition (high watermark minus committed offset)",
        g.clone(),
    );
    g
}

/// Lag per (topic, partition) of `group` on `topics`, asked of the broker.
/// A partition with no committed offset counts from its low watermark.
pub fn measure(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<BTreeMap<(String, i32), i64>, rdkafka::error::KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.bootstrap)
        .set("client.id", format!("{}-lag", settings.client_id));
    for (k, v) in &settings.extra {
        c.set(k, v);
    }
    c.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create()?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), timeout)?;
        for mt in md.topics() {
            for p in mt.partitions() {
                tpl.add_partition(mt.name(), p.id());
            }
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut out = BTreeMap::new();
    for e in committed.elements() {
        let (lo, hi) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let from = match e.offset() {
            Offset::Offset(o) => o,
            _ => lo,
        };
        out.insert((e.topic().to_string(), e.partition()), (hi - from).max(0));
    }
    Ok(out)
}

/// Measures every `every` until `stop`, updating `gauge`.
pub fn spawn(
    settings: KafkaSettings,
    group: String,
    topics: Vec<String>,
    gauge: LagGauge,
    every: Duration,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            let (s, g, t) = (settings.clone(), group.clone(), topics.clone());
            let res =
                tokio::task::spawn_blocking(move || measure(&s, &g, &t, Duration::from_secs(5)))
                    .await;
            match res {
                Ok(Ok(lags)) => {
                    failing = false;
                    for ((topic, partition), lag) in lags {
                        gauge
                            .get_or_create(&LagLabels {
                                group: group.clone(),
                                topic,
                                partition: partition.to_string(),
                            })
                            .set(lag);
                    }
                }
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(group = %group, error = %e, "consumer lag not measurable (kafka_consumer_lag_records keeps its last values)");
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::warn!(error = %e, "consumer lag task failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
