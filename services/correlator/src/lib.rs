//! The correlator: consumes `tollguard.calls.v1`, joins every carrier's
//! events in the shared window store, evaluates the rules and publishes
//! alerts to `tollguard.alerts.v1`.
//!
//! Architecture invariant: offsets are committed only after the window
//! store update and the alert publication succeeded (at-least-once), and
//! every effect is idempotent (event ids dedupe window updates, incident
//! claims dedupe alerts), so a crash loses nothing and duplicates nothing.
//! A record that cannot be decoded goes to the DLQ and never blocks its
//! partition.

pub mod align;
pub mod config;
pub mod metrics;
pub mod overlay;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tollguard_core::bus::{
    EventBus, HEADER_DLQ_REASON, HEADER_TRACEPARENT, InRecord, OutRecord, Subscription,
};
use tollguard_core::codec::decode_event;
use tollguard_core::error::{BusError, StoreError};
use tollguard_core::model::CallEvent;
use tollguard_core::rules::{Engine, Finding, Planned};
use tollguard_proto::v1 as pb;

use crate::align::{Aligner, Alignment, Held};
use crate::metrics::Metrics;

/// Topic names the worker uses.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Input.
    pub calls: String,
    /// Output.
    pub alerts: String,
    /// Dead letters.
    pub dlq: String,
}

impl Default for Topics {
    fn default() -> Self {
        use tollguard_core::bus::topics;
        Self {
            calls: topics::CALLS.into(),
            alerts: topics::ALERTS.into(),
            dlq: topics::CALLS_DLQ.into(),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Records consumed and committed.
    pub records: usize,
    /// Alerts published.
    pub alerts: usize,
    /// Records sent to the DLQ.
    pub dead_letters: usize,
    /// Re-delivered events (no state change).
    pub duplicates: usize,
    /// Events later than the allowed lateness.
    pub late: usize,
}

/// Why a step failed (the batch is kept and retried).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Window store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bus failure.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// One consumer-group member's processing loop.
///
/// A step processes one batch while it reads the next one ahead: the next
/// batch is polled (without waiting), decoded and planned
/// ([`Engine::plan`], pure) while this one's store writes, alert
/// publication and incident confirmation are in flight, so the correlator
/// computes while Redis and Kafka work. Offsets are still stored only after
/// a batch's effects are done, batch by batch in order.
#[derive(Debug)]
pub struct Worker {
    engine: Engine,
    bus: Arc<dyn EventBus>,
    sub: Box<dyn Subscription>,
    topics: Topics,
    metrics: Option<Metrics>,
    /// Batches polled and planned but not processed yet, oldest first (the
    /// front one is being processed, or failed and is retried with the same
    /// plans).
    queue: VecDeque<Prepared>,
    /// The batch read ahead during the current step.
    ahead: Option<Prepared>,
    /// A poll error met while reading ahead (reported by the next step).
    deferred: Option<BusError>,
    watermarks: tollguard_core::rules::Watermarks,
    /// When this replica's lanes were last merged into the shared table.
    lanes_merged: Option<Instant>,
    aligner: Aligner,
    /// Findings the last batch left unsettled (another replica's claim on
    /// their incident in flight, see [`tollguard_core::rules::Processed::unsettled`]): decided
    /// first by the next batch, or by an idle step.
    unsettled: Vec<Finding>,
}

/// How often a replica merges its lanes into the table shared with the
/// other replicas (and reads theirs): the low watermark it prunes behind
/// knows another replica's lanes as of at most this long (plus the other's
/// own interval) ago. Earlier knowledge is lower, so it only prunes less.
pub const LANE_MERGE_INTERVAL: Duration = Duration::from_millis(100);

/// How long an idle replica with unsettled findings polls before deciding
/// them again.
const UNSETTLED_RETRY: Duration = Duration::from_millis(20);

/// A lane not seen for this long is dropped from the shared table: the
/// state TTL (all its state has expired by then), and at least twice the
/// staleness bound after which it stops holding pruning back (replicas'
/// clocks may differ). Until then an idle partition still counts as one a
/// lane was seen on.
fn lane_retain_ms(engine: &Engine) -> i64 {
    let ttl = engine.detector().config().general.state_ttl_s as i64 * 1000;
    ttl.max(2 * tollguard_core::rules::STALE_MS)
}

/// A polled batch, decoded, aligned and planned.
#[derive(Debug)]
struct Prepared {
    /// The records polled (events of some may still be held).
    records: Vec<InRecord>,
    /// The positions to commit once the batch is processed.
    commit: Vec<InRecord>,
    /// The events released for this batch, in event-time order.
    events: Vec<CallEvent>,
    planned: Planned,
    /// Per event: its key and the traceparent of its record.
    parents: Vec<(String, Option<Vec<u8>>)>,
    /// Dead letters (undecodable records) to publish with the alerts.
    dead: Vec<OutRecord>,
}

fn wall() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Traceparent continuing the trace of `parent` (new span id).
pub fn child_traceparent(parent: Option<&[u8]>) -> Option<String> {
    let p = std::str::from_utf8(parent?).ok()?;
    let parts: Vec<&str> = p.split('-').collect();
    if parts.len() != 4 || parts[1].len() != 32 {
        return None;
    }
    let span: u64 = rand::random();
    Some(format!("00-{}-{:016x}-{}", parts[1], span.max(1), parts[3]))
}

impl Worker {
    /// Builds a worker over a subscription to `topics.calls`.
    pub fn new(
        engine: Engine,
        bus: Arc<dyn EventBus>,
        sub: Box<dyn Subscription>,
        topics: Topics,
        metrics: Option<Metrics>,
    ) -> Self {
        Self {
            engine,
            bus,
            sub,
            topics,
            metrics,
            queue: VecDeque::new(),
            ahead: None,
            deferred: None,
            watermarks: Default::default(),
            lanes_merged: None,
            aligner: Aligner::default(),
            unsettled: Vec::new(),
        }
    }

    /// Aligns the carriers' feeds in event time before processing (see
    /// [`crate::align`]); without it every batch is processed as polled,
    /// sorted by event time.
    pub fn align(&mut self, cfg: Alignment) {
        self.aligner = Aligner::new(Some(cfg));
    }

    /// Waits for these carriers before pruning window state (see
    /// [`tollguard_core::rules::Watermarks`]).
    pub fn expect_carriers(&mut self, carriers: Vec<String>) {
        self.watermarks = tollguard_core::rules::Watermarks::expecting(carriers);
    }

    /// Waits for a lane on each of the calls topic's `partitions` (for at
    /// most the staleness bound) before pruning window state (see
    /// [`tollguard_core::rules::Watermarks`]).
    pub fn expect_partitions(&mut self, partitions: usize) {
        self.watermarks.expect_partitions(partitions, wall());
    }

    /// The engine (to refresh the hot list or policies). A batch already
    /// read ahead keeps the plans it was made with.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Polls up to `max` records (waiting at most `timeout`) and processes
    /// them, reading the next batch ahead meanwhile. On error (or when the
    /// step is dropped) the batch is kept and the next call retries it.
    pub async fn step(&mut self, max: usize, timeout: Duration) -> Result<StepReport, WorkerError> {
        // Cancel-safe (the caller selects on signals): a batch stays queued
        // until its offsets are stored, and a batch read ahead is queued as
        // soon as it is prepared, so a step dropped at any await loses
        // nothing; the next step resumes with the same batches and plans.
        self.queue.extend(self.ahead.take());
        if self
            .lanes_merged
            .is_none_or(|t| t.elapsed() >= LANE_MERGE_INTERVAL)
        {
            self.merge_lanes().await?;
        }
        // Flow control: with many events held, stop fetching the
        // partitions ahead of the slowest lane (see crate::align).
        let paused = self.aligner.paused(wall());
        self.sub.pause_only(&self.topics.calls, paused).await?;
        if let Some(m) = self.metrics.as_ref() {
            m.paused.set(paused.len() as i64);
        }
        if self.queue.is_empty() {
            if let Some(e) = self.deferred.take() {
                return Err(e.into());
            }
            // Unsettled findings wait for another replica's confirm (a
            // few milliseconds): poll briefly, then settle them.
            let timeout = if self.aligner.backlogged() {
                // Held events are ready to go: no waiting for new ones.
                Duration::ZERO
            } else if self.unsettled.is_empty() {
                timeout
            } else {
                timeout.min(UNSETTLED_RETRY)
            };
            let batch = self.sub.poll(max, timeout).await?;
            if batch.is_empty() && self.aligner.is_empty() {
                return self.settle().await;
            }
            let p = prepare(
                &self.engine,
                &mut self.watermarks,
                &mut self.aligner,
                &self.topics,
                batch,
                max,
            );
            if p.records.is_empty() && p.events.is_empty() {
                return Ok(StepReport::default());
            }
            self.queue.push_back(p);
        }
        let read_ahead = self.queue.len() == 1 && self.deferred.is_none();
        let started = Instant::now();
        let mut prepare_us = 0;
        let Self {
            engine,
            bus,
            sub,
            topics,
            metrics,
            queue,
            ahead,
            deferred,
            watermarks,
            aligner,
            unsettled,
            ..
        } = self;
        let (engine, topics): (&Engine, &Topics) = (engine, topics);
        let Some(cur) = queue.front() else {
            return Ok(StepReport::default());
        };
        // The batch's consumer span, linked to the traces of its records.
        let span = tracing::info_span!(
            "process",
            otel.name = format!("{} process", topics.calls),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = %topics.calls,
            messaging.batch.message_count = cur.records.len(),
        );
        tollguard_runtime::otel::add_links(
            &span,
            cur.records
                .iter()
                .filter_map(|r| r.header(HEADER_TRACEPARENT)),
            128,
        );
        let work = tracing::Instrument::instrument(
            process(
                engine,
                bus.as_ref(),
                topics,
                metrics.as_ref(),
                cur,
                unsettled,
            ),
            span,
        );
        let read = async {
            if !read_ahead {
                return;
            }
            // Only what is already fetched: never delay this batch.
            match sub.poll(max, Duration::ZERO).await {
                Ok(batch) if batch.is_empty() && !aligner.backlogged() => {}
                Ok(batch) => {
                    let t = Instant::now();
                    *ahead = Some(prepare(engine, watermarks, aligner, topics, batch, max));
                    prepare_us = t.elapsed().as_micros();
                }
                Err(e) => *deferred = Some(e),
            }
        };
        let (done, ()) = tokio::join!(work, read);
        let (report, timing, left) = done?;
        *unsettled = left;
        let t = Instant::now();
        sub.commit(&cur.commit).await?;
        tracing::debug!(
            records = cur.records.len(),
            total_us = started.elapsed().as_micros(),
            store_us = timing.store_us,
            incidents_us = timing.incidents_us,
            publish_us = timing.publish_us,
            confirm_us = timing.confirm_us,
            commit_us = t.elapsed().as_micros(),
            read_ahead = ahead.as_ref().map_or(0, |p| p.records.len()),
            prepare_us,
            "batch"
        );
        if let Some(m) = metrics.as_ref() {
            m.events.inc_by(cur.events.len() as u64);
            m.dead_letters.inc_by(report.dead_letters as u64);
            m.duplicates.inc_by(report.duplicates as u64);
            m.late.inc_by(report.late as u64);
            m.held.set(aligner.len() as i64);
            m.forced.inc_by(aligner.take_forced());
            m.unsettled.set(unsettled.len() as i64);
        }
        queue.pop_front();
        Ok(report)
    }

    /// An idle step: decides the findings left unsettled, publishes their
    /// alerts and confirms them. Cancel-safe like [`Worker::step`]: the
    /// findings are replaced only once their alerts are confirmed.
    async fn settle(&mut self) -> Result<StepReport, WorkerError> {
        if self.unsettled.is_empty() {
            return Ok(StepReport::default());
        }
        let mut processed = self.engine.settle(self.unsettled.clone(), wall()).await?;
        let report = StepReport {
            alerts: processed.alerts.len(),
            ..Default::default()
        };
        let (out, spans) =
            alert_records(&processed.alerts, &[], &self.topics, self.metrics.as_ref());
        publish(self.bus.as_ref(), &self.topics, out).await?;
        drop(spans);
        let left = std::mem::take(&mut processed.unsettled);
        self.engine.confirm(processed).await?;
        self.unsettled = left;
        if let Some(m) = self.metrics.as_ref() {
            m.unsettled.set(self.unsettled.len() as i64);
        }
        Ok(report)
    }

    /// Merges this replica's lanes into the table shared with the other
    /// replicas and takes theirs, so the low watermark covers every
    /// replica's partitions (see [`tollguard_core::rules::Watermarks`]).
    /// Cancel-safe: a merge dropped half-way is redone by the next step.
    async fn merge_lanes(&mut self) -> Result<(), StoreError> {
        let marks = self.watermarks.marks();
        let table = self
            .engine
            .store()
            .merge_lanes(
                tollguard_core::rules::LANE_TABLE,
                &marks,
                wall(),
                lane_retain_ms(&self.engine),
            )
            .await?;
        self.watermarks.set_shared(&table);
        self.lanes_merged = Some(Instant::now());
        if let Some(m) = self.metrics.as_ref() {
            let h = self.watermarks.horizon(wall());
            if h > 0 && h < i64::MAX {
                m.low_watermark.set(h / 1000);
            }
        }
        Ok(())
    }

    /// Commits what was processed and leaves the group. A batch still
    /// pending (failed) is not committed and will be redelivered.
    pub async fn close(&mut self) -> Result<(), BusError> {
        self.sub.close().await
    }

    /// Decodes alerts (helper for consumers of the alerts topic).
    pub fn decode_alert(r: &InRecord) -> Option<pb::Alert> {
        pb::Alert::decode(r.payload.as_slice()).ok()
    }
}

/// Decodes a polled batch (undecodable records become dead letters),
/// observes the watermarks, passes the events through the aligner and plans
/// the ones it releases, in event-time order.
///
/// A poll returns the partitions' records in whatever order their fetches
/// landed: one partition's next minutes may come before another's. The
/// events a batch releases are applied in event-time order (stable, so
/// each partition keeps its own order among equal times), so a window
/// closed by one carrier's event already holds the other carriers' earlier
/// events of the same batch; with alignment on, of earlier batches too.
/// Lateness is still judged in each lane's arrival order, and the commit
/// positions stop below any event still held. At most twice `max` held
/// events are released (a backlog drains by one batch per step while new
/// batches of up to `max` arrive).
fn prepare(
    engine: &Engine,
    watermarks: &mut tollguard_core::rules::Watermarks,
    aligner: &mut Aligner,
    topics: &Topics,
    mut records: Vec<InRecord>,
    max: usize,
) -> Prepared {
    let lateness = engine.detector().config().general.allowed_lateness_s as i64 * 1000;
    let mut dead = Vec::new();
    let now = wall();
    // This batch's decoded events: the ones released right away (all of
    // them on the live path) are not decoded twice.
    let mut fresh: HashMap<(i32, i64), CallEvent> = HashMap::with_capacity(records.len());
    for r in &mut records {
        let part = aligner.polled(r);
        match decode_event(&r.payload) {
            Ok(e) => {
                let late = watermarks.observe_at(r.partition, &e, lateness, now);
                let h = Held::new(r, late);
                aligner.push(part, &e, h, now);
                fresh.insert((r.partition, r.offset), e);
            }
            Err(err) => {
                tracing::warn!(topic = %r.topic, partition = r.partition, offset = r.offset, reason = %err, "undecodable record sent to the DLQ");
                let mut headers = r.headers.clone();
                headers.push((HEADER_DLQ_REASON.into(), err.to_string().into_bytes()));
                headers.push((
                    "tollguard-dlq-source".into(),
                    format!("{}/{}/{}", r.topic, r.partition, r.offset).into_bytes(),
                ));
                dead.push(OutRecord {
                    topic: topics.dlq.clone(),
                    key: r.key.clone(),
                    payload: r.payload.clone(),
                    headers,
                });
            }
        }
    }
    let released = aligner.release(now, max.saturating_mul(2).max(1));
    let mut events = Vec::with_capacity(released.len());
    let mut late = Vec::with_capacity(released.len());
    let mut parents = Vec::with_capacity(released.len());
    for h in released {
        let e = match fresh.remove(&(h.partition(), h.offset())) {
            Some(e) => e,
            // Held from an earlier batch; it decoded then, so it does now.
            None => match decode_event(&h.payload) {
                Ok(e) => e,
                Err(_) => continue,
            },
        };
        late.push(h.late);
        parents.push((e.event_key(), h.parent));
        events.push(e);
    }
    let planned = engine.plan(&events, &late, watermarks.horizon(now));
    Prepared {
        records,
        commit: aligner.commit_positions(),
        events,
        planned,
        parents,
        dead,
    }
}

/// Applies a prepared batch: store, rules, incidents, then publishes its
/// alerts and dead letters and confirms the incidents. Offsets are the
/// caller's (after this succeeds).
/// `carried` are the previous batch's unsettled findings (decided first);
/// returns this batch's.
async fn process(
    engine: &Engine,
    bus: &dyn EventBus,
    topics: &Topics,
    metrics: Option<&Metrics>,
    batch: &Prepared,
    carried: &[Finding],
) -> Result<(StepReport, Timing, Vec<Finding>), WorkerError> {
    let mut timing = Timing::default();
    let mut report = StepReport {
        records: batch.records.len(),
        dead_letters: batch.dead.len(),
        ..Default::default()
    };
    let mut out = batch.dead.clone();
    let started = Instant::now();
    let mut processed = engine
        .run_with(&batch.events, &batch.planned, carried.to_vec(), wall())
        .await?;
    if let Some(m) = metrics {
        m.store_seconds.observe(started.elapsed().as_secs_f64());
    }
    timing.store_us = processed.store_us;
    timing.incidents_us = (started.elapsed().as_micros()).saturating_sub(processed.store_us);
    let started = Instant::now();
    report.duplicates = processed.duplicates;
    report.late = processed.late;
    let (alerts, alert_spans) = alert_records(&processed.alerts, &batch.parents, topics, metrics);
    out.extend(alerts);
    report.alerts = processed.alerts.len();
    publish(bus, topics, out).await?;
    drop(alert_spans);
    timing.publish_us = started.elapsed().as_micros();
    let started = Instant::now();
    let unsettled = std::mem::take(&mut processed.unsettled);
    engine.confirm(processed).await?;
    timing.confirm_us = started.elapsed().as_micros();
    Ok((report, timing, unsettled))
}

/// Publishes a step's alerts and dead letters (if any) in a producer span.
async fn publish(bus: &dyn EventBus, topics: &Topics, out: Vec<OutRecord>) -> Result<(), BusError> {
    if out.is_empty() {
        return Ok(());
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("{} publish", topics.alerts),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = %topics.alerts,
        messaging.batch.message_count = out.len(),
    );
    tracing::Instrument::instrument(bus.publish(out), span).await
}

/// The alerts' records for the alerts topic, and one span per alert in the
/// trace of the event that triggered it (`parents`: event key → its
/// traceparent), to hold open until the alerts are published.
fn alert_records(
    alerts: &[pb::Alert],
    parents: &[(String, Option<Vec<u8>>)],
    topics: &Topics,
    metrics: Option<&Metrics>,
) -> (Vec<OutRecord>, Vec<tracing::Span>) {
    let mut out = Vec::with_capacity(alerts.len());
    let mut alert_spans = Vec::with_capacity(alerts.len());
    for a in alerts {
        let parent = parents
            .iter()
            .find(|(k, _)| *k == format!("{}/{}", a.trigger_provider_id, a.trigger_event_id))
            .and_then(|(_, p)| p.as_deref());
        let mut headers = vec![(
            tollguard_core::bus::HEADER_SCHEMA.to_string(),
            b"1".to_vec(),
        )];
        let span = tracing::info_span!(
            "alert",
            incident = %a.incident_id,
            version = a.version,
            rule = %tollguard_core::render::rule_name(a),
            severity = %tollguard_core::render::severity_name(a),
        );
        tollguard_runtime::otel::set_parent(&span, parent);
        if let Some(tp) =
            tollguard_runtime::otel::traceparent(&span).or_else(|| child_traceparent(parent))
        {
            headers.push((HEADER_TRACEPARENT.into(), tp.into_bytes()));
        }
        span.in_scope(|| {
            tracing::info!(
                incident = %a.incident_id,
                version = a.version,
                rule = %tollguard_core::render::rule_name(a),
                severity = %tollguard_core::render::severity_name(a),
                "alert"
            )
        });
        alert_spans.push(span);
        if let Some(m) = metrics {
            m.alert(a);
        }
        out.push(OutRecord {
            topic: topics.alerts.clone(),
            key: a.incident_id.clone().into_bytes(),
            payload: a.encode_to_vec(),
            headers,
        });
    }
    (out, alert_spans)
}

/// Where a batch's time went (the debug log `batch`), microseconds.
#[derive(Debug, Default)]
struct Timing {
    /// Store apply (read, run, writes).
    store_us: u128,
    /// Planning aside, the rest of the engine: rules and incident claims.
    incidents_us: u128,
    /// Alerts and dead letters published (acknowledged).
    publish_us: u128,
    /// Incident claims confirmed.
    confirm_us: u128,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use tollguard_core::bus::{EventBus, InRecord, MemoryBus, OutRecord};
    use tollguard_core::codec::encode_event;
    use tollguard_core::error::StoreError;
    use tollguard_core::ingest::{Ingestor, ReferenceData};
    use tollguard_core::number::DialPlan;
    use tollguard_core::pseudo::{Key, Pseudonymizer};
    use tollguard_core::record::RawRecord;
    use tollguard_core::render::rfc3339;
    use tollguard_core::rules::{Detector, Engine, HotList, Policies, RulesConfig};
    use tollguard_core::store::{
        LaneMark, MemoryStore, Outcome, Scope, StateWrite, Update, WindowStore,
    };

    use super::{Topics, Worker, prepare, wall};
    use tollguard_proto::v1 as pb;

    pub(crate) fn ingestor(carrier: &str) -> Ingestor {
        Ingestor::new(
            carrier,
            DialPlan::new("NL"),
            2,
            Pseudonymizer::new(Key::new("k1", &[3u8; 32]).unwrap()),
            Arc::new(ReferenceData::default()),
        )
        .unwrap()
    }

    /// A call of `customer` through `carrier` that ended at `end` (ms).
    pub(crate) fn ended(
        ing: &Ingestor,
        carrier: &str,
        id: &str,
        customer: &str,
        end: i64,
    ) -> Vec<u8> {
        let raw = RawRecord {
            provider_id: Some(carrier.into()),
            event_id: Some(id.into()),
            call_id: Some(id.into()),
            phase: Some("end".into()),
            customer_id: Some(customer.into()),
            line_id: Some("line-1".into()),
            caller: Some("+31201234567".into()),
            callee: Some("+67571123456".into()),
            direction: Some("outbound".into()),
            start_time: Some(rfc3339(end - 60_000)),
            duration_s: Some(60.0),
            ..Default::default()
        };
        encode_event(&ing.ingest(&raw, end).unwrap())
    }

    /// The memory store, but every batch takes a while after it applied:
    /// a step cancelled then has changed state and stored no offset.
    #[derive(Debug)]
    struct SlowStore(MemoryStore);

    #[async_trait]
    impl WindowStore for SlowStore {
        async fn apply(&self, updates: &[Update]) -> Result<Vec<Outcome>, StoreError> {
            let out = self.0.apply(updates).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
            out
        }
        async fn get_states(
            &self,
            keys: &[(Scope, String)],
        ) -> Result<Vec<Option<String>>, StoreError> {
            self.0.get_states(keys).await
        }
        async fn cas_state(&self, write: &StateWrite) -> Result<bool, StoreError> {
            self.0.cas_state(write).await
        }
        async fn set_members(&self, name: &str) -> Result<Vec<String>, StoreError> {
            self.0.set_members(name).await
        }
        async fn set_add(&self, name: &str, member: &str) -> Result<bool, StoreError> {
            self.0.set_add(name, member).await
        }
        async fn merge_lanes(
            &self,
            name: &str,
            lanes: &[LaneMark],
            now: i64,
            retain_ms: i64,
        ) -> Result<Vec<LaneMark>, StoreError> {
            self.0.merge_lanes(name, lanes, now, retain_ms).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.0.ping().await
        }
    }

    /// One poll may hold one partition's later minutes before another's
    /// earlier ones: the batch's events are planned and applied in event
    /// time, lateness is judged in each lane's arrival order, and the
    /// records (whose offsets are committed) stay as polled.
    #[tokio::test]
    async fn a_batch_is_applied_in_event_time_and_judged_late_in_arrival_order() {
        let (kpn, bt) = (ingestor("kpn"), ingestor("bt"));
        let t0 = 1_307_746_020_000;
        let min = 60_000;
        // (partition, carrier, event id, end time), in the order polled:
        // kpn's partition 0 at minutes 10 and 11, then bt's partition 1 at
        // minutes 1 and 2, then kpn's event of minute -60, late on its
        // lane (an hour behind minute 11, beyond the allowed lateness).
        let polled = [
            (0, "kpn", "k1", t0 + 10 * min),
            (0, "kpn", "k2", t0 + 11 * min),
            (1, "bt", "b1", t0 + min),
            (1, "bt", "b2", t0 + 2 * min),
            (0, "kpn", "k0", t0 - 60 * min),
        ];
        let records: Vec<InRecord> = polled
            .iter()
            .enumerate()
            .map(|(i, (p, c, id, end))| InRecord {
                topic: "calls".into(),
                partition: *p,
                offset: i as i64,
                key: Vec::new(),
                payload: ended(if *c == "kpn" { &kpn } else { &bt }, c, id, "kvk:1", *end),
                headers: Vec::new(),
            })
            .collect();
        let det = Detector::new(
            RulesConfig::default(),
            Policies::default(),
            HotList::default(),
        )
        .unwrap();
        let engine = Engine::new(Arc::new(MemoryStore::new("tg:")), det);
        let mut wm = Default::default();
        let p = prepare(
            &engine,
            &mut wm,
            &mut super::Aligner::default(),
            &Topics::default(),
            records,
            usize::MAX,
        );
        let ids: Vec<&str> = p.events.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, ["k0", "b1", "b2", "k1", "k2"], "event-time order");
        let offsets: Vec<i64> = p.records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4], "records stay as polled");
        let parents: Vec<&str> = p.parents.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(parents, ["kpn/k0", "bt/b1", "bt/b2", "kpn/k1", "kpn/k2"]);
        // Only k0 is late: judged in the sorted order, nothing would be.
        let done = engine
            .run(&p.events, &p.planned, t0 + 20 * min)
            .await
            .unwrap();
        assert_eq!(done.late, 1, "k0 is late on its lane");
    }

    /// Steps dropped mid-way (a signal wins the `select!`) lose no batch,
    /// not even one read ahead: every event is applied exactly once and
    /// every offset is committed in the end.
    #[tokio::test]
    async fn a_step_dropped_at_any_point_loses_no_batch() {
        let topics = Topics::default();
        let bus = Arc::new(MemoryBus::new());
        let ing = Ingestor::new(
            "kpn",
            DialPlan::new("NL"),
            2,
            Pseudonymizer::new(Key::new("k1", &[3u8; 32]).unwrap()),
            Arc::new(ReferenceData::default()),
        )
        .unwrap();
        const N: usize = 60;
        let t0 = 1_307_746_020_000;
        let records = (0..N)
            .map(|i| {
                let raw = RawRecord {
                    provider_id: Some("kpn".into()),
                    event_id: Some(format!("e{i}")),
                    call_id: Some(format!("c{i}")),
                    phase: Some("end".into()),
                    customer_id: Some(format!("kvk:{}", i % 7)),
                    line_id: Some(format!("line-{i}")),
                    caller: Some("+31201234567".into()),
                    callee: Some(format!("+316123456{:02}", i)),
                    direction: Some("outbound".into()),
                    start_time: Some(rfc3339(t0 + i as i64 * 1000)),
                    duration_s: Some(30.0),
                    ..Default::default()
                };
                let e = ing.ingest(&raw, t0 + 3_600_000).unwrap();
                OutRecord {
                    topic: topics.calls.clone(),
                    key: e.subject().compact().into_bytes(),
                    payload: encode_event(&e),
                    headers: Vec::new(),
                }
            })
            .collect();
        bus.publish(records).await.unwrap();
        let sub = bus
            .subscribe(&[topics.calls.as_str()], "cor")
            .await
            .unwrap();
        let det = Detector::new(
            RulesConfig::default(),
            Policies::default(),
            HotList::default(),
        )
        .unwrap();
        let store = Arc::new(SlowStore(MemoryStore::new("tg:")));
        let mut w = Worker::new(
            Engine::new(store, det),
            bus.clone(),
            sub,
            topics.clone(),
            None,
        );
        // Records of completed steps: each batch completes once, however
        // often a step working on it was dropped; a lost batch never does.
        let (mut completed, mut cancelled) = (0usize, 0);
        for round in 0.. {
            assert!(round < 200, "did not drain");
            // Every third step is dropped while its batch's store call
            // sleeps (state applied, offsets not stored).
            let step = w.step(8, Duration::ZERO);
            let r = if round % 3 == 0 {
                match tokio::time::timeout(Duration::from_millis(10), step).await {
                    Ok(r) => r.unwrap(),
                    Err(_) => {
                        cancelled += 1;
                        continue;
                    }
                }
            } else {
                step.await.unwrap()
            };
            if r.records == 0 {
                break;
            }
            completed += r.records;
        }
        assert!(cancelled >= 3, "steps were dropped mid-way: {cancelled}");
        assert_eq!(completed, N, "every batch completed exactly once");
        assert_eq!(bus.committed("cor", &topics.calls), N as i64);
    }

    /// Another replica (engine A on the same store) has claimed a burst's
    /// warning and not confirmed it when this worker's event makes the
    /// burst critical: the worker holds the escalation, then publishes it
    /// from an idle step once A confirms.
    #[tokio::test]
    async fn a_held_escalation_is_published_once_the_other_replica_confirms() {
        use prost::Message;
        let topics = Topics::default();
        let bus = Arc::new(MemoryBus::new());
        let (kpn, bt) = (ingestor("kpn"), ingestor("bt"));
        let mut rules = RulesConfig::default();
        rules.multi_carrier_burst.critical_calls = 5;
        let det = Detector::new(rules, Policies::default(), HotList::default()).unwrap();
        let store = Arc::new(MemoryStore::new("tg:"));
        let a = Engine::new(store.clone(), det.clone());
        let t0 = 1_307_746_020_000;
        let call = |i: i64| {
            let (ing, c) = if i % 2 == 0 {
                (&kpn, "kpn")
            } else {
                (&bt, "bt")
            };
            let p = ended(ing, c, &format!("e{i}"), "kvk:pbx", t0 + i * 60_000);
            tollguard_core::codec::decode_event(&p).unwrap()
        };
        for i in 0..3 {
            let p = a.process(&[call(i)], &[false], 1_000).await.unwrap();
            a.confirm(p).await.unwrap();
        }
        let claimed = a.process(&[call(3)], &[false], wall()).await.unwrap();
        let opened = claimed
            .alerts
            .iter()
            .find(|x| x.rule == pb::Rule::MultiCarrierBurst as i32)
            .cloned()
            .expect("A claims the warning");
        let e4 = call(4);
        bus.publish(vec![OutRecord {
            topic: topics.calls.clone(),
            key: Vec::new(),
            payload: encode_event(&e4),
            headers: Vec::new(),
        }])
        .await
        .unwrap();
        let sub = bus
            .subscribe(&[topics.calls.as_str()], "cor")
            .await
            .unwrap();
        let mut w = Worker::new(
            Engine::new(store, det),
            bus.clone(),
            sub,
            topics.clone(),
            None,
        );
        let bursts = || -> Vec<pb::Alert> {
            bus.records(&topics.alerts)
                .iter()
                .map(|r| pb::Alert::decode(r.payload.as_slice()).unwrap())
                .filter(|x| x.rule == pb::Rule::MultiCarrierBurst as i32)
                .collect()
        };
        let r = w.step(8, Duration::ZERO).await.unwrap();
        assert_eq!(r.records, 1);
        assert!(bursts().is_empty(), "A's claim is in flight");
        assert_eq!(w.unsettled.len(), 1, "the escalation is held, not dropped");
        // Still in flight: an idle step keeps holding it.
        w.step(8, Duration::ZERO).await.unwrap();
        assert!(bursts().is_empty());
        a.confirm(claimed).await.unwrap();
        let r = w.step(8, Duration::ZERO).await.unwrap();
        assert_eq!(r.alerts, 1);
        let got = bursts();
        assert_eq!(got.len(), 1, "{got:#?}");
        assert_eq!(got[0].kind, pb::AlertKind::Escalated as i32);
        assert_eq!(got[0].severity, pb::Severity::Critical as i32);
        assert_eq!(got[0].incident_id, opened.incident_id);
        assert!(w.unsettled.is_empty());
    }
}
