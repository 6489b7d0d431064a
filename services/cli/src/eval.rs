//! `tollguard eval`: runs the labelled scenario suite through the embedded
//! pipeline and scores detection: per campaign whether and how fast it was
//! caught, and false-positive incidents per million benign calls.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use tollguard_core::codec::from_ts;
use tollguard_core::money::format_amount;
use tollguard_core::number::{DialPlan, Normalizer};
use tollguard_core::pseudo::{Key, Kind};
use tollguard_core::render::{rfc3339, rule_name, severity_name};
use tollguard_core::sim::{self, Label, Scenario};
use tollguard_proto::v1 as pb;

use crate::common::PipelineOpts;
use crate::embedded::{BackendOpts, Embedded, EmbeddedConfig, Providers};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Scenario seed.
    #[arg(long, default_value_t = 2011)]
    pub seed: u64,
    /// Benign enterprises.
    #[arg(long, default_value_t = 300)]
    pub enterprises: usize,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a detection timeline picture (SVG) to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Run over this Kafka broker (with --redis) instead of in process:
    /// the same ingest, correlator and notifier code on topics
    /// `tgeval.<run>.*`.
    #[arg(long, value_name = "BOOTSTRAP", requires = "redis")]
    pub kafka: Option<String>,
    /// Redis URL for the window store (with --kafka), keys under
    /// `tgeval:<run>:`.
    #[arg(long, value_name = "URL", requires = "kafka")]
    pub redis: Option<String>,
    /// Detection options.
    #[command(flatten)]
    pub pipeline: PipelineOpts,
}

/// Score of one campaign.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignScore {
    /// Campaign id.
    pub campaign: String,
    /// Kind.
    pub kind: String,
    /// Start (event time).
    pub start: String,
    /// Detected at warning level or above.
    pub detected: bool,
    /// Rules that fired on it.
    pub rules: Vec<String>,
    /// Event-time delay from campaign start to the first alert, seconds.
    pub first_alert_s: Option<i64>,
    /// ... and to the first critical alert, seconds.
    pub first_critical_s: Option<i64>,
    /// Incidents opened about it.
    pub incidents: usize,
    /// Estimated cost of the campaign's calls up to its first alert,
    /// micro-EUR (rate deck × connected seconds before detection).
    pub loss_at_detection: Option<i64>,
    /// Estimated cost of all its calls, micro-EUR.
    pub loss_total: i64,
}

/// A campaign call: start, connected seconds, rate per minute (micro-EUR).
struct CostedCall {
    start: i64,
    duration: f64,
    rate: i64,
}

fn cost_until(calls: &[CostedCall], t: i64) -> i64 {
    calls
        .iter()
        .map(|c| {
            let secs = ((t - c.start) as f64 / 1000.0).clamp(0.0, c.duration);
            (c.rate as f64 * secs / 60.0).round() as i64
        })
        .sum()
}

/// The campaign's outbound calls (ended, from its customers, to its ranges
/// if it names any), costed with the rate deck.
fn campaign_calls(
    out: &sim::SimOutput,
    l: &Label,
    normalizers: &BTreeMap<String, Normalizer>,
    rates: &tollguard_core::tables::RateDeck,
) -> Vec<CostedCall> {
    out.records
        .iter()
        .filter(|r| {
            r.record.phase.as_deref() == Some("end")
                && r.record.direction.as_deref() == Some("outbound")
                && r.record
                    .customer_id
                    .as_deref()
                    .is_some_and(|c| l.customers.iter().any(|x| x == c))
        })
        .filter_map(|r| {
            let n = normalizers.get(&r.provider)?;
            let e164 = n.to_e164("callee", r.record.callee.as_deref()?).ok()?;
            if !l.ranges.is_empty() && !l.ranges.iter().any(|x| e164.starts_with(x.as_str())) {
                return None;
            }
            let start =
                tollguard_core::record::parse_time("start_time", r.record.start_time.as_deref()?)
                    .ok()?;
            Some(CostedCall {
                start,
                duration: r.record.duration_s.unwrap_or(0.0),
                rate: rates.per_minute(&e164),
            })
        })
        .collect()
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Per campaign (attacks).
    pub campaigns: Vec<CampaignScore>,
    /// Incidents at warning or above matching no attack campaign.
    pub false_positive_incidents: Vec<String>,
    /// ... of which critical.
    pub false_critical_incidents: usize,
    /// Benign calls in the scenario.
    pub benign_calls: u64,
    /// False-positive incidents per million benign calls.
    pub fp_per_million: f64,
    /// Records in the scenario.
    pub records: usize,
}

fn matches(a: &pb::Alert, l: &Label, tokens: &BTreeSet<String>) -> bool {
    let s = a.subject.clone().unwrap_or_default();
    if let Some(c) = &s.customer
        && tokens.contains(&format!("{}:{}", c.key_id, c.value))
    {
        return true;
    }
    s.customer.is_none()
        && !s.range.is_empty()
        && l.ranges
            .iter()
            .any(|r| s.range.starts_with(r.as_str()) || r.starts_with(s.range.as_str()))
}

/// What an evaluation produced.
#[derive(Debug)]
pub struct Evaluation {
    /// The report.
    pub report: EvalReport,
    /// Every alert, in order.
    pub alerts: Vec<pb::Alert>,
    /// The scenario's labels.
    pub labels: Vec<Label>,
    /// Customer tokens of each campaign.
    pub tokens: BTreeMap<String, BTreeSet<String>>,
}

/// The labelled suite of `seed` among `enterprises` benign enterprises
/// (what `tollguard simulate --preset suite` writes for the same values).
pub fn suite(seed: u64, enterprises: usize) -> sim::SimOutput {
    let mut sc = Scenario::suite(seed);
    sc.enterprises = enterprises;
    sim::generate(&sc)
}

/// Runs the suite and scores it.
pub async fn evaluate(args: &EvalArgs) -> anyhow::Result<Evaluation> {
    let out = suite(args.seed, args.enterprises);
    let (key, _) = args.pipeline.key()?;
    let refdata = args.pipeline.refdata()?;
    let backend = match (&args.kafka, &args.redis) {
        (Some(kafka), Some(redis)) => BackendOpts::Real {
            kafka: kafka.clone(),
            redis: redis.clone(),
        },
        _ => BackendOpts::Memory,
    };
    let mut emb = Embedded::with_backend(
        EmbeddedConfig {
            rules: args.pipeline.rules()?,
            policies: args.pipeline.policies()?,
            key: key.clone(),
            providers: Providers::simulated("NL"),
            range_digits: args.pipeline.range_digits,
            refdata,
        },
        &backend,
    )
    .await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut alerts = Vec::new();
    // Over Kafka the partitions of one chunk are consumed in any order, so
    // a chunk must span little event time (as a live feed would), else a
    // carrier's events can be processed hours ahead of another's.
    let span = match backend {
        BackendOpts::Memory => i64::MAX,
        BackendOpts::Real { .. } => 30 * 60_000,
    };
    let mut bounds = vec![0];
    for (i, r) in out.records.iter().enumerate() {
        let first = &out.records[*bounds.last().unwrap_or(&0)];
        if i - bounds.last().unwrap_or(&0) >= 5000 || r.at - first.at >= span {
            bounds.push(i);
        }
    }
    bounds.push(out.records.len());
    for chunk in bounds.windows(2).map(|w| &out.records[w[0]..w[1]]) {
        let recs: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r.record.clone()))
            .collect();
        if let Some(e) = emb.ingest(&recs, now).await.first() {
            anyhow::bail!("scenario record refused: {}", e.error);
        }
        alerts.extend(emb.drain().await?);
    }
    score(out, alerts, &key, &args.pipeline)
}

/// Scores `alerts` (from any pipeline: in process, over Kafka, or the
/// deployed services fed with `tollguard send`) against the labelled
/// scenario `out`: customers pseudonymised with `key` (the pipeline's), the
/// reference data and range digits of `pipeline`.
pub fn score(
    out: sim::SimOutput,
    alerts: Vec<pb::Alert>,
    key: &Key,
    pipeline: &PipelineOpts,
) -> anyhow::Result<Evaluation> {
    let rates = pipeline.refdata()?.rates.clone();
    let normalizers: BTreeMap<String, Normalizer> = sim::default_carriers()
        .into_iter()
        .filter_map(|c| {
            let n = Normalizer::new(DialPlan::new(&c.home_country), pipeline.range_digits);
            Some((c.id, n.ok()?))
        })
        .collect();
    let attacks: Vec<&Label> = out
        .labels
        .iter()
        .filter(|l| l.kind != "benign_lookalike")
        .collect();
    let attack_customers: BTreeSet<&str> = attacks
        .iter()
        .flat_map(|l| l.customers.iter().map(String::as_str))
        .collect();
    let benign_calls = out
        .records
        .iter()
        .filter(|r| r.record.phase.as_deref() == Some("end"))
        .filter(|r| {
            !r.record
                .customer_id
                .as_deref()
                .is_some_and(|c| attack_customers.contains(c))
        })
        .count() as u64;
    let mut matched: BTreeSet<String> = BTreeSet::new();
    let mut campaigns = Vec::new();
    let mut by_campaign = BTreeMap::new();
    for l in &attacks {
        let tokens: BTreeSet<String> = l
            .customers
            .iter()
            .map(|c| key.token(Kind::Customer, c).compact())
            .collect();
        by_campaign.insert(l.campaign.clone(), tokens.clone());
        let mine: Vec<&pb::Alert> = alerts.iter().filter(|a| matches(a, l, &tokens)).collect();
        matched.extend(mine.iter().map(|a| a.incident_id.clone()));
        let at = |a: &&pb::Alert| a.detected_at.as_ref().map(from_ts).unwrap_or(i64::MAX);
        let first = mine.iter().map(at).min();
        let crit = mine
            .iter()
            .filter(|a| a.severity == pb::Severity::Critical as i32)
            .map(at)
            .min();
        let rules: BTreeSet<String> = mine.iter().map(|a| rule_name(a)).collect();
        let incidents: BTreeSet<&str> = mine.iter().map(|a| a.incident_id.as_str()).collect();
        let costed = campaign_calls(&out, l, &normalizers, &rates);
        campaigns.push(CampaignScore {
            loss_at_detection: first.map(|t| cost_until(&costed, t)),
            loss_total: cost_until(&costed, i64::MAX / 2),
            campaign: l.campaign.clone(),
            kind: l.kind.clone(),
            start: l.start.clone(),
            detected: first.is_some(),
            rules: rules.into_iter().collect(),
            first_alert_s: first.map(|t| (t - l.start_ms) / 1000),
            first_critical_s: crit.map(|t| (t - l.start_ms) / 1000),
            incidents: incidents.len(),
        });
    }
    let mut fp: BTreeMap<String, i32> = BTreeMap::new();
    for a in alerts.iter().filter(|a| !matched.contains(&a.incident_id)) {
        let e = fp.entry(a.incident_id.clone()).or_insert(a.severity);
        *e = (*e).max(a.severity);
    }
    let report = EvalReport {
        false_critical_incidents: fp
            .values()
            .filter(|s| **s == pb::Severity::Critical as i32)
            .count(),
        fp_per_million: fp.len() as f64 * 1e6 / benign_calls.max(1) as f64,
        false_positive_incidents: fp.keys().cloned().collect(),
        benign_calls,
        campaigns,
        records: out.records.len(),
    };
    Ok(Evaluation {
        report,
        alerts,
        labels: out.labels,
        tokens: by_campaign,
    })
}

fn dur(s: Option<i64>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        Some(s) => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

/// An SVG timeline: one row per campaign, a bar from start to end, dots for
/// alerts (orange warning, red critical).
pub fn svg(
    report: &EvalReport,
    alerts: &[pb::Alert],
    labels: &[Label],
    key_tokens: &BTreeMap<String, BTreeSet<String>>,
) -> String {
    let attacks: Vec<&Label> = labels
        .iter()
        .filter(|l| l.kind != "benign_lookalike")
        .collect();
    let t_min = attacks.iter().map(|l| l.start_ms).min().unwrap_or(0) - 3_600_000;
    let t_max = attacks
        .iter()
        .filter_map(|l| tollguard_core::record::parse_time("end", &l.end).ok())
        .max()
        .unwrap_or(t_min + 1)
        + 3_600_000;
    let w = 1000.0;
    let x = |t: i64| 220.0 + (t - t_min) as f64 / (t_max - t_min) as f64 * (w - 240.0);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{}' font-family='sans-serif' font-size='12'>\n<text x='10' y='20' font-size='14'>TollGuard detection timeline (event time)</text>\n",
        60 + 30 * attacks.len()
    );
    for (i, l) in attacks.iter().enumerate() {
        let y = 50.0 + 30.0 * i as f64;
        let end = tollguard_core::record::parse_time("end", &l.end).unwrap_or(l.start_ms);
        s += &format!("<text x='10' y='{}'>{}</text>\n", y + 4.0, l.campaign);
        s += &format!(
            "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='8' fill='#bbb'/>\n",
            x(l.start_ms),
            y - 4.0,
            (x(end) - x(l.start_ms)).max(2.0)
        );
        let tokens = key_tokens.get(&l.campaign).cloned().unwrap_or_default();
        for a in alerts.iter().filter(|a| matches(a, l, &tokens)) {
            let t = a.detected_at.as_ref().map(from_ts).unwrap_or(0);
            let color = if a.severity == pb::Severity::Critical as i32 {
                "#d00"
            } else {
                "#f90"
            };
            s += &format!(
                "<circle cx='{:.1}' cy='{y:.1}' r='4' fill='{color}'><title>{} {} {}</title></circle>\n",
                x(t),
                severity_name(a),
                rule_name(a),
                rfc3339(t)
            );
        }
    }
    s += &format!(
        "<text x='10' y='{}'>false-positive incidents: {} ({:.2} per million benign calls)</text>\n</svg>\n",
        40 + 30 * attacks.len() + 10,
        report.false_positive_incidents.len(),
        report.fp_per_million
    );
    s
}

/// Runs the evaluation and prints the report.
pub async fn run(args: &EvalArgs, out: &mut dyn Write) -> anyhow::Result<EvalReport> {
    let Evaluation {
        report,
        alerts,
        labels,
        tokens,
    } = evaluate(args).await?;
    writeln!(
        out,
        "TollGuard evaluation: {} records, {} benign calls\n",
        report.records, report.benign_calls
    )?;
    writeln!(
        out,
        "{:<24} {:<24} {:<9} {:>12} {:>14} {:>22}  rules",
        "campaign",
        "kind",
        "detected",
        "first alert",
        "first critical",
        "EUR lost at alert / total"
    )?;
    for c in &report.campaigns {
        let loss = format!(
            "{} / {}",
            c.loss_at_detection
                .map_or_else(|| "—".to_string(), format_amount),
            format_amount(c.loss_total)
        );
        writeln!(
            out,
            "{:<24} {:<24} {:<9} {:>12} {:>14} {:>22}  {}",
            c.campaign,
            c.kind,
            if c.detected { "yes" } else { "NO" },
            dur(c.first_alert_s),
            dur(c.first_critical_s),
            loss,
            c.rules.join(", ")
        )?;
    }
    writeln!(
        out,
        "\nfalse-positive incidents (warning or above): {} ({:.2} per million benign calls), of which critical: {}",
        report.false_positive_incidents.len(),
        report.fp_per_million,
        report.false_critical_incidents
    )?;
    for id in &report.false_positive_incidents {
        if let Some(a) = alerts.iter().rev().find(|a| &a.incident_id == id) {
            writeln!(
                out,
                "  {id} {} {}: {}",
                severity_name(a),
                rule_name(a),
                a.summary
            )?;
        }
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, svg(&report, &alerts, &labels, &tokens))?;
    }
    Ok(report)
}
