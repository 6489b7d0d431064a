//! The load generator's report: figures, derived verdicts against the
//! issue's targets, a plain-text table and JSON.

use std::collections::BTreeMap;
use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Args;
use crate::baseline::BaselineResult;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    fn show(&self) -> String {
        if self.count == 0 {
            return "n/a (nothing recorded)".into();
        }
        format!(
            "{:.1} / {:.1} / {:.1} ms (max {:.1}, n = {})",
            self.p50, self.p99, self.p999, self.max, self.count
        )
    }
}

/// The run's parameters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// Seconds of load.
    pub duration_s: u64,
    /// Target rate (0 = flat out).
    pub rate: u64,
    /// Carrier ids.
    pub carrier_ids: Vec<String>,
    /// Partitions.
    pub partitions: i32,
    /// Records per gRPC batch.
    pub batch: u64,
    /// Batches in flight per carrier.
    pub inflight: u64,
    /// Scenario preset.
    pub preset: String,
    /// Records per pass of the scenario.
    pub records_per_pass: usize,
    /// Extra ingester environment.
    pub ingester_env: Vec<String>,
    /// Extra correlator environment.
    pub correlator_env: Vec<String>,
}

/// The machine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// CPUs available.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Memory in GiB.
    pub mem_gib: f64,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
            mem_gib: mem_kb / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// Pipeline figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pipeline {
    /// Seconds of load.
    pub seconds: f64,
    /// Records handed to gRPC.
    pub sent: u64,
    /// Records acknowledged as accepted (whole run).
    pub accepted: u64,
    /// Records rejected by the ingesters.
    pub rejected: u64,
    /// Batches refused after retries.
    pub failed_batches: u64,
    /// Retries after RESOURCE_EXHAUSTED / UNAVAILABLE.
    pub retries: u64,
    /// First error seen.
    pub first_error: Option<String>,
    /// Records acknowledged within the load window.
    pub accepted_in_window: u64,
    /// Of them, per second.
    pub accepted_per_s: f64,
    /// Events the correlator processed within the load window.
    pub correlated_in_window: u64,
    /// Of them, per second: the end-to-end throughput.
    pub correlated_per_s: f64,
    /// Events the correlator processed in all (window + drain).
    pub correlated_total: u64,
    /// Whether the correlator caught up with every acknowledged event.
    pub drained: bool,
    /// Seconds after the load until it caught up (or gave up).
    pub drain_s: f64,
    /// Correlated ÷ baseline pass-through.
    pub ratio_to_baseline: Option<f64>,
    /// Records dead-lettered by the correlator.
    pub dead_letters: u64,
    /// Re-delivered events.
    pub duplicates: u64,
    /// Events past the allowed lateness.
    pub late: u64,
    /// Alerts that could not be decoded.
    pub undecodable_alerts: u64,
}

/// One sample over time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t_s: f64,
    /// Records acknowledged so far.
    pub accepted: u64,
    /// Events correlated so far.
    pub correlated: u64,
    /// Committed lag of the correlator's group.
    pub lag: Option<i64>,
    /// Redis `used_memory`.
    pub redis_used_bytes: Option<u64>,
    /// RSS of each service (same order as `services`).
    pub rss_bytes: Vec<u64>,
}

/// Resource use of one service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceUsage {
    /// Name.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// Peak RSS.
    pub rss_max_bytes: u64,
    /// RSS at the end.
    pub rss_end_bytes: u64,
    /// Shared infrastructure or the load generator (not a TollGuard service).
    pub infrastructure: bool,
    /// CPU seconds used before the load.
    pub cpu_start_s: f64,
    /// CPU seconds used at the end.
    pub cpu_end_s: f64,
}

/// Lag verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lag {
    /// Lag when the load stopped.
    pub at_end_of_load: Option<i64>,
    /// Largest lag seen during the load.
    pub max_during_load: Option<i64>,
    /// Least-squares slope over the second half of the load, records/s.
    pub slope_per_s: Option<f64>,
    /// Whether it grows (slope above 2 % of the accepted rate).
    pub growing: bool,
}

/// Redis memory verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisMemory {
    /// `used_memory` at the first sample.
    pub start_bytes: u64,
    /// Half-way through the load.
    pub half_way_bytes: u64,
    /// At the end of the load.
    pub end_of_load_bytes: u64,
    /// Peak.
    pub peak_bytes: u64,
    /// Growth per accepted event (bytes).
    pub bytes_per_event: f64,
}

/// One target of issue #8.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub target: String,
    /// Measured.
    pub measured: String,
    /// Met, not met, or not applicable to this run (`None`).
    pub met: Option<bool>,
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Run id (topics `tgbench.<id>.*`).
    pub run_id: String,
    /// Start time.
    pub started_at: String,
    /// Machine.
    pub machine: Machine,
    /// Parameters.
    pub config: Config,
    /// Raw Kafka baseline.
    pub baseline: Option<BaselineResult>,
    /// Pipeline figures.
    pub pipeline: Pipeline,
    /// Ingest-ack latency per gRPC batch.
    pub ack_latency_ms: Percentiles,
    /// Event-to-alert latency (trigger's batch ack → alert on the topic).
    pub alert_latency_ms: Percentiles,
    /// Alerts seen.
    pub alerts: u64,
    /// Alerts by rule.
    pub alerts_by_rule: BTreeMap<String, u64>,
    /// Alerts seen before their trigger's ack arrived (latency counted 0).
    pub alerts_before_ack: u64,
    /// Alerts whose trigger batch was not found.
    pub alerts_unmatched: u64,
    /// Lag.
    pub lag: Lag,
    /// Service resource use.
    pub services: Vec<ServiceUsage>,
    /// Redis memory.
    pub redis: RedisMemory,
    /// Keys under the run's prefix deleted at the end.
    pub redis_keys_at_end: u64,
    /// Samples over time.
    pub samples: Vec<Sample>,
    /// Targets of issue #8.
    pub targets: Vec<Target>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

impl Report {
    /// An empty report for this run.
    pub fn new(id: &str, args: &Args) -> Self {
        Self {
            run_id: id.to_string(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            machine: Machine::detect(),
            config: Config {
                duration_s: args.duration,
                rate: args.rate,
                partitions: args.partitions,
                batch: args.batch,
                inflight: args.inflight,
                preset: format!("{:?}", args.preset).to_lowercase(),
                ingester_env: args.ingester_env.clone(),
                correlator_env: args.correlator_env.clone(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Derives ratios and verdicts.
    pub fn finish(&mut self) {
        let dur = self.config.duration_s as f64;
        if let Some(b) = &self.baseline
            && b.events_per_s > 0.0
        {
            self.pipeline.ratio_to_baseline = Some(self.pipeline.correlated_per_s / b.events_per_s);
        }
        let during: Vec<&Sample> = self.samples.iter().filter(|s| s.t_s <= dur + 0.5).collect();
        self.lag.at_end_of_load = during.last().and_then(|s| s.lag);
        self.lag.max_during_load = during.iter().filter_map(|s| s.lag).max();
        let second_half: Vec<(f64, f64)> = during
            .iter()
            .filter(|s| s.t_s >= dur / 2.0)
            .filter_map(|s| Some((s.t_s, s.lag? as f64)))
            .collect();
        self.lag.slope_per_s = slope(&second_half);
        self.lag.growing = self
            .lag
            .slope_per_s
            .is_some_and(|s| s > 0.02 * self.pipeline.accepted_per_s.max(1.0));
        let mem: Vec<u64> = during.iter().filter_map(|s| s.redis_used_bytes).collect();
        if let (Some(first), Some(last)) = (mem.first(), mem.last()) {
            self.redis.start_bytes = *first;
            self.redis.half_way_bytes = during
                .iter()
                .filter(|s| s.t_s >= dur / 2.0)
                .find_map(|s| s.redis_used_bytes)
                .unwrap_or(*last);
            self.redis.end_of_load_bytes = *last;
            self.redis.peak_bytes = self
                .samples
                .iter()
                .filter_map(|s| s.redis_used_bytes)
                .max()
                .unwrap_or(0);
            self.redis.bytes_per_event =
                (*last as f64 - *first as f64) / self.pipeline.accepted_in_window.max(1) as f64;
        }
        self.targets = self.evaluate();
    }

    fn evaluate(&self) -> Vec<Target> {
        let pl = &self.pipeline;
        let mut t = Vec::new();
        let full = self.config.duration_s >= 60;
        t.push(Target {
            target: "≥ 25,000 events/s end to end, sustained 60 s, lag not growing".into(),
            measured: format!(
                "{:.0} events/s over {} s, lag {}",
                pl.correlated_per_s,
                self.config.duration_s,
                if self.lag.growing { "growing" } else { "flat" }
            ),
            met: full.then_some(pl.correlated_per_s >= 25_000.0 && !self.lag.growing),
        });
        t.push(Target {
            target: "≥ 50 % of the raw Kafka pass-through (same run)".into(),
            measured: pl
                .ratio_to_baseline
                .map_or("no baseline".into(), |r| format!("{:.0} %", r * 100.0)),
            met: pl.ratio_to_baseline.map(|r| r >= 0.5),
        });
        let at_10k = self.config.rate > 0 && self.config.rate <= 10_000;
        t.push(Target {
            target: "p99 event-to-alert ≤ 100 ms at 10,000 events/s".into(),
            measured: if self.alert_latency_ms.count == 0 {
                "no alert seen".into()
            } else {
                format!(
                    "p99 {:.1} ms at {}",
                    self.alert_latency_ms.p99,
                    if self.config.rate == 0 {
                        "flat out".to_string()
                    } else {
                        format!("{} events/s", self.config.rate)
                    }
                )
            },
            met: (at_10k && self.alert_latency_ms.count > 0)
                .then_some(self.alert_latency_ms.p99 <= 100.0),
        });
        let worst = self
            .services
            .iter()
            .filter(|s| !s.infrastructure)
            .max_by_key(|s| s.rss_max_bytes);
        t.push(Target {
            target: "each service ≤ 256 MiB RSS".into(),
            measured: worst.map_or("?".into(), |s| {
                format!("largest: {} {:.0} MiB", s.name, mib(s.rss_max_bytes))
            }),
            met: worst.map(|s| s.rss_max_bytes <= 256 << 20),
        });
        t.push(Target {
            target: "Redis memory flat (TTLs bound it; judged over 10 min)".into(),
            measured: format!(
                "{:.0} → {:.0} MiB at half-way → {:.0} MiB at the end",
                mib(self.redis.start_bytes),
                mib(self.redis.half_way_bytes),
                mib(self.redis.end_of_load_bytes),
            ),
            // Per-event state lives at most 5 min by default (dedupe
            // markers, an ended call's state): in a run of 10 min or more,
            // memory must stop growing by the second half.
            met: (self.config.duration_s >= 600).then_some(
                self.redis.end_of_load_bytes as f64 <= self.redis.half_way_bytes as f64 * 1.1,
            ),
        });
        t
    }

    /// The plain-text summary.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let c = &self.config;
        let pl = &self.pipeline;
        let m = &self.machine;
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "TollGuard load test {} ({}), {} CPUs {}, {:.0} GiB, Linux {}",
            self.run_id, self.started_at, m.cpus, m.cpu_model, m.mem_gib, m.kernel
        );
        let _ = writeln!(
            o,
            "  {} s at {}, {} carriers ({}), {} partitions, batches of {} × {} in flight per carrier, {} scenario ({} records per pass)",
            c.duration_s,
            if c.rate == 0 {
                "flat out".to_string()
            } else {
                format!("{} events/s", c.rate)
            },
            c.carrier_ids.len(),
            c.carrier_ids.join(", "),
            c.partitions,
            c.batch,
            c.inflight,
            c.preset,
            c.records_per_pass
        );
        for e in c.ingester_env.iter().chain(&c.correlator_env) {
            let _ = writeln!(o, "  with {e}");
        }
        let _ = writeln!(o);
        let row = |o: &mut String, k: &str, v: String| {
            let _ = writeln!(o, "  {k:<38} {v}");
        };
        if let Some(b) = &self.baseline {
            row(
                &mut o,
                "raw Kafka pass-through (baseline)",
                format!(
                    "{:.0} events/s ({:.0} s, {:.0}-byte payloads)",
                    b.events_per_s, b.seconds, b.mean_payload_bytes
                ),
            );
        }
        row(
            &mut o,
            "ingest acknowledged",
            format!(
                "{:.0} events/s ({} in the window; {} rejected, {} retries, {} failed batches)",
                pl.accepted_per_s,
                pl.accepted_in_window,
                pl.rejected,
                pl.retries,
                pl.failed_batches
            ),
        );
        row(
            &mut o,
            "end to end (correlated) sustained",
            format!(
                "{:.0} events/s{}",
                pl.correlated_per_s,
                pl.ratio_to_baseline
                    .map_or(String::new(), |r| format!("  = {:.2} × baseline", r))
            ),
        );
        row(
            &mut o,
            "drain after the load",
            format!(
                "{} in {:.1} s ({} correlated in all; {} late, {} duplicates, {} dead letters)",
                if pl.drained {
                    "caught up"
                } else {
                    "NOT caught up"
                },
                pl.drain_s,
                pl.correlated_total,
                pl.late,
                pl.duplicates,
                pl.dead_letters
            ),
        );
        row(
            &mut o,
            "consumer lag (committed)",
            format!(
                "{} at end of load, max {}, slope {} → {}",
                self.lag
                    .at_end_of_load
                    .map_or("?".into(), |v| v.to_string()),
                self.lag
                    .max_during_load
                    .map_or("?".into(), |v| v.to_string()),
                self.lag
                    .slope_per_s
                    .map_or("?".into(), |v| format!("{v:+.0}/s")),
                if self.lag.growing { "GROWING" } else { "flat" }
            ),
        );
        row(
            &mut o,
            "ingest-ack p50/p99/p999 (per batch)",
            self.ack_latency_ms.show(),
        );
        row(
            &mut o,
            "event-to-alert p50/p99/p999",
            self.alert_latency_ms.show(),
        );
        let rules: Vec<String> = self
            .alerts_by_rule
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        row(
            &mut o,
            "alerts",
            format!(
                "{} ({}){}",
                self.alerts,
                rules.join(", "),
                if self.alerts_unmatched > 0 {
                    format!(", {} without a matching batch", self.alerts_unmatched)
                } else {
                    String::new()
                }
            ),
        );
        let events = pl.correlated_total.max(1) as f64;
        for s in &self.services {
            let cpu = s.cpu_end_s - s.cpu_start_s;
            row(
                &mut o,
                &format!("{} RSS max / end, CPU", s.name),
                format!(
                    "{:.0} / {:.0} MiB, {:.1} CPU-s ({:.0} % of a core, {:.0} µs per correlated event)",
                    mib(s.rss_max_bytes),
                    mib(s.rss_end_bytes),
                    cpu,
                    cpu / (pl.seconds + pl.drain_s).max(1.0) * 100.0,
                    cpu * 1e6 / events
                ),
            );
        }
        let series: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| Some(format!("{:.0}s {:.0}", s.t_s, mib(s.redis_used_bytes?))))
            .collect();
        row(
            &mut o,
            "Redis used_memory (MiB over time)",
            series.join(", "),
        );
        row(
            &mut o,
            "Redis growth",
            format!(
                "{:.0} bytes per event; {} keys under the run's prefix at the end",
                self.redis.bytes_per_event, self.redis_keys_at_end
            ),
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "  targets (issue #8):");
        for t in &self.targets {
            let v = match t.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "n/a in this run",
            };
            let _ = writeln!(o, "    [{v:^15}] {} — {}", t.target, t.measured);
        }
        o
    }
}
