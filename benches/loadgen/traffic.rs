//! Simulated consortium traffic, looped for as long as the run lasts, paced
//! and batched per carrier, and sent over gRPC with several batches in
//! flight per carrier.
//!
//! Every pass over the scenario ("loop") shifts event times by the
//! scenario's span and gives every call and event a fresh id, so the
//! correlator sees new calls continuing in event time (not duplicates and
//! not late events). An event id ends in `.l<loop>b<batch>`: the batch
//! number names the gRPC batch that carried it, so an alert's trigger event
//! leads back to the instant that batch was acknowledged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tollguard_core::sim::{Scenario, SimCarrier, generate};
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;

/// One record of the scenario, with its times parsed.
#[derive(Debug, Clone)]
struct Template {
    carrier: usize,
    rec: pb::CallRecord,
    start: Option<i64>,
    answer: Option<i64>,
}

/// The scenario, ready to loop.
#[derive(Debug)]
pub struct Traffic {
    /// The carriers sent to (in order).
    pub carriers: Vec<SimCarrier>,
    templates: Vec<Template>,
    /// Event-time span of one pass (ms): the shift between passes.
    span_ms: i64,
}

fn parse_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl Traffic {
    /// Generates `sc` and keeps the records of its first `carriers`
    /// carriers, in event-time order.
    pub fn new(sc: &Scenario, carriers: usize) -> Self {
        let out = generate(sc);
        let keep: Vec<SimCarrier> = sc.carriers.iter().take(carriers).cloned().collect();
        let index: HashMap<&str, usize> = keep
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.as_str(), i))
            .collect();
        let templates = out
            .records
            .iter()
            .filter_map(|r| {
                let carrier = *index.get(r.provider.as_str())?;
                let rec = tollguard_ingester::service::raw_to_proto(&r.record);
                Some(Template {
                    carrier,
                    start: parse_ms(&rec.start_time),
                    answer: parse_ms(&rec.answer_time),
                    rec,
                })
            })
            .collect();
        Self {
            carriers: keep,
            templates,
            // One extra day between passes keeps them apart.
            span_ms: (i64::from(sc.days) + 1) * 86_400_000,
        }
    }

    /// Records per pass.
    pub fn len(&self) -> usize {
        self.templates.len()
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    /// Record `i` of pass `pass`, carried by batch `batch`.
    fn record(&self, i: usize, pass: u64, batch: u64) -> (usize, pb::CallRecord) {
        let t = &self.templates[i];
        let shift = self.span_ms * pass as i64;
        let mut r = t.rec.clone();
        let tag = format!(".l{pass}b{batch}");
        r.event_id.push_str(&tag);
        r.call_id.push_str(&format!(".l{pass}"));
        if let Some(s) = t.start {
            r.start_time = tollguard_core::render::rfc3339(s + shift);
        }
        if let Some(a) = t.answer {
            r.answer_time = tollguard_core::render::rfc3339(a + shift);
        }
        (t.carrier, r)
    }

    /// The first `n` records of pass 0 of each carrier (for the baseline's
    /// payloads).
    pub fn sample(&self, n: usize) -> Vec<(usize, pb::CallRecord)> {
        (0..self.templates.len().min(n))
            .map(|i| self.record(i, 0, 0))
            .collect()
    }
}

/// Batch number carried by an event id (`….l<pass>b<batch>`).
pub fn batch_of(event_id: &str) -> Option<u64> {
    let (_, tail) = event_id.rsplit_once(".l")?;
    tail.split_once('b')?.1.parse().ok()
}

/// How the traffic is sent.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// Events per second over all carriers; 0 = as fast as acknowledged.
    pub rate: u64,
    /// Records per gRPC batch.
    pub batch: usize,
    /// Batches in flight per carrier.
    pub inflight: usize,
    /// A partly filled batch is sent after this long (paced runs).
    pub linger: Duration,
    /// How long to send.
    pub duration: Duration,
}

/// Counters and histograms shared by the senders and the reporter.
#[derive(Debug)]
pub struct SendStats {
    /// Records handed to a gRPC call.
    pub sent: AtomicU64,
    /// Records the ingesters acknowledged as accepted.
    pub accepted: AtomicU64,
    /// Records the ingesters rejected.
    pub rejected: AtomicU64,
    /// Batches refused after all retries.
    pub failed_batches: AtomicU64,
    /// Retries after RESOURCE_EXHAUSTED / UNAVAILABLE.
    pub retries: AtomicU64,
    /// Ingest-ack latency per batch, microseconds.
    pub ack_us: Mutex<Histogram<u64>>,
    /// Ack instant per (carrier, batch).
    pub acked_at: Mutex<HashMap<(usize, u64), Instant>>,
    /// First error message of a failed batch.
    pub first_error: Mutex<Option<String>>,
}

/// A latency histogram: 1 µs .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds")
}

impl Default for SendStats {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ack_us: Mutex::new(histogram()),
            acked_at: Mutex::new(HashMap::new()),
            first_error: Mutex::new(None),
        }
    }
}

/// Locks a mutex, ignoring poisoning (the data is plain counters).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Batch {
    no: u64,
    records: Vec<pb::CallRecord>,
}

async fn publish(
    mut client: IngestClient<tonic::transport::Channel>,
    carrier: usize,
    batch: Batch,
    stats: Arc<SendStats>,
) {
    let n = batch.records.len() as u64;
    let req = pb::PublishRequest {
        batch_id: batch.no,
        records: batch.records,
    };
    stats.sent.fetch_add(n, Ordering::Relaxed);
    let started = Instant::now();
    let mut attempt = 0u64;
    loop {
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(Duration::from_secs(30));
        match client.publish_batch(r).await {
            Ok(ack) => {
                let now = Instant::now();
                let ack = ack.into_inner();
                stats
                    .accepted
                    .fetch_add(u64::from(ack.accepted), Ordering::Relaxed);
                stats
                    .rejected
                    .fetch_add(u64::from(ack.rejected), Ordering::Relaxed);
                if ack.rejected > 0 {
                    let mut first = lock(&stats.first_error);
                    if first.is_none()
                        && let Some(e) = ack.errors.first()
                    {
                        *first = Some(format!("record rejected: {} {}", e.field, e.reason));
                    }
                }
                let us = now.duration_since(started).as_micros().max(1) as u64;
                let _ = lock(&stats.ack_us).record(us.min(600_000_000));
                lock(&stats.acked_at).insert((carrier, batch.no), now);
                return;
            }
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                ) && attempt < 50 =>
            {
                attempt += 1;
                stats.retries.fetch_add(1, Ordering::Relaxed);
                let wait = s
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(50 * attempt)
                    .min(2_000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(s) => {
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                lock(&stats.first_error).get_or_insert_with(|| {
                    format!("batch refused: {:?}: {}", s.code(), s.message())
                });
                return;
            }
        }
    }
}

/// Per carrier: receives batches and keeps up to `inflight` of them in
/// flight on one HTTP/2 connection.
async fn sender(
    client: IngestClient<tonic::transport::Channel>,
    carrier: usize,
    inflight: usize,
    mut rx: tokio::sync::mpsc::Receiver<Batch>,
    stats: Arc<SendStats>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(inflight));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(b) = rx.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (client, stats) = (client.clone(), stats.clone());
        tasks.spawn(async move {
            publish(client, carrier, b, stats).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Connects to the ingesters (`http://127.0.0.1:<port>`, one per carrier).
pub async fn connect(
    ports: &[u16],
) -> anyhow::Result<Vec<IngestClient<tonic::transport::Channel>>> {
    let mut out = Vec::new();
    for p in ports {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{p}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_connection_window_size(Some(8 << 20))
            .initial_stream_window_size(Some(4 << 20))
            .connect()
            .await?;
        out.push(
            IngestClient::new(ch)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        );
    }
    Ok(out)
}

/// Sends the looped scenario to the carriers' ingesters until
/// `plan.duration` has passed or `stop` is set; returns when every batch
/// is acknowledged (or failed).
pub async fn run(
    traffic: Arc<Traffic>,
    clients: Vec<IngestClient<tonic::transport::Channel>>,
    plan: SendPlan,
    stats: Arc<SendStats>,
    stop: Arc<AtomicBool>,
) {
    let nc = traffic.carriers.len();
    let mut txs = Vec::with_capacity(nc);
    let mut senders = Vec::with_capacity(nc);
    for (c, client) in clients.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(plan.inflight.max(1));
        txs.push(tx);
        senders.push(tokio::spawn(sender(
            client,
            c,
            plan.inflight,
            rx,
            stats.clone(),
        )));
    }
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut open: Vec<Vec<pb::CallRecord>> =
        (0..nc).map(|_| Vec::with_capacity(plan.batch)).collect();
    let mut opened_at: Vec<Instant> = vec![started; nc];
    let mut next_no: Vec<u64> = vec![0; nc];
    let mut emitted: u64 = 0;
    let n = traffic.len();
    let mut i = 0usize;
    let mut pass = 0u64;
    'send: loop {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        // Pacing: emit what is due, then flush batches that lingered.
        let due = if plan.rate == 0 {
            emitted + plan.batch as u64
        } else {
            (plan.rate as f64 * started.elapsed().as_secs_f64()) as u64
        };
        while emitted < due {
            let (c, r) = traffic.record(i, pass, next_no[c_of(&traffic, i)]);
            if open[c].is_empty() {
                opened_at[c] = Instant::now();
            }
            open[c].push(r);
            emitted += 1;
            i += 1;
            if i == n {
                i = 0;
                pass += 1;
            }
            if open[c].len() >= plan.batch {
                let records = std::mem::replace(&mut open[c], Vec::with_capacity(plan.batch));
                let no = next_no[c];
                next_no[c] += 1;
                if txs[c].send(Batch { no, records }).await.is_err() {
                    break 'send;
                }
                if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                    break 'send;
                }
            }
        }
        if plan.rate > 0 {
            for c in 0..nc {
                if !open[c].is_empty() && opened_at[c].elapsed() >= plan.linger {
                    let records = std::mem::replace(&mut open[c], Vec::with_capacity(plan.batch));
                    let no = next_no[c];
                    next_no[c] += 1;
                    if txs[c].send(Batch { no, records }).await.is_err() {
                        break 'send;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Records already numbered into an open batch still go out.
    for c in 0..nc {
        if !open[c].is_empty() {
            let records = std::mem::take(&mut open[c]);
            let _ = txs[c]
                .send(Batch {
                    no: next_no[c],
                    records,
                })
                .await;
        }
    }
    drop(txs);
    for s in senders {
        let _ = s.await;
    }
}

fn c_of(t: &Traffic, i: usize) -> usize {
    t.templates[i].carrier
}
