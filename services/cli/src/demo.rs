//! `tollguard demo`: the 2011 PBX hack, caught.

use std::collections::BTreeMap;
use std::io::Write;

use tollguard_core::codec::from_ts;
use tollguard_core::money::format_eur;
use tollguard_core::pseudo::Kind;
use tollguard_core::render::{alert_json, rfc3339, rule_name, severity_name};
use tollguard_core::rules::RulesConfig;
use tollguard_core::sim::{self, Scenario, SimOutput};
use tollguard_core::tables::RateDeck;
use tollguard_proto::v1 as pb;

use crate::common::PipelineOpts;
use crate::embedded::{Embedded, EmbeddedConfig, Providers};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Print the alerts as JSON lines instead of the timeline.
    #[arg(long)]
    pub json: bool,
    /// Scenario seed.
    #[arg(long, default_value_t = 2011)]
    pub seed: u64,
    /// Benign enterprises in the scenario.
    #[arg(long, default_value_t = 300)]
    pub enterprises: usize,
}

/// The policy the enterprise asked for after the first hack: a per-day cap.
pub const VICTIM_POLICY: &str = "[[policy]]\ncustomer_id = \"kvk:30123456\"\ndaily_cap_eur = \"500.00\"\nhourly_cap_eur = \"150.00\"\nchannels = 10\nlabel = \"the enterprise of the 2011 case (asked for a per-day cap)\"\n";

/// What the demo found.
#[derive(Debug)]
pub struct DemoOutcome {
    /// All alerts.
    pub alerts: Vec<pb::Alert>,
    /// The victim's token (compact).
    pub victim: String,
    /// First fraudulent call, event time.
    pub first_fraud: i64,
    /// First critical alert about the victim.
    pub first_critical: Option<pb::Alert>,
    /// Estimated loss at the first critical alert, micro-EUR.
    pub loss_at_detection: i64,
    /// Estimated total loss of the scenario, micro-EUR.
    pub total_loss: i64,
    /// Per carrier: (calls before detection, calls in total, loss in total).
    pub carriers: BTreeMap<String, (u64, u64, i64)>,
    /// Records generated.
    pub records: usize,
    /// Benign customers with a critical incident (should be none).
    pub benign_critical: Vec<String>,
}

struct FraudCall {
    provider: String,
    start: i64,
    duration: f64,
    rate: i64,
}

fn fraud_calls(out: &SimOutput, rates: &RateDeck) -> Vec<FraudCall> {
    out.records
        .iter()
        .filter(|r| {
            r.record.customer_id.as_deref() == Some(sim::PBX2011_CUSTOMER)
                && r.record.phase.as_deref() == Some("end")
        })
        .filter_map(|r| {
            let start =
                tollguard_core::record::parse_time("start_time", r.record.start_time.as_deref()?)
                    .ok()?;
            Some(FraudCall {
                provider: r.provider.clone(),
                start,
                duration: r.record.duration_s.unwrap_or(0.0),
                rate: rates.per_minute(sim::PBX2011_RANGE),
            })
        })
        .collect()
}

fn loss_until(calls: &[FraudCall], t: i64) -> i64 {
    calls
        .iter()
        .map(|c| {
            let secs = ((t - c.start) as f64 / 1000.0).clamp(0.0, c.duration);
            (c.rate as f64 * secs / 60.0).round() as i64
        })
        .sum()
}

/// Runs the scenario through the embedded pipeline.
pub async fn simulate_and_detect(
    args: &DemoArgs,
    pipeline: &PipelineOpts,
) -> anyhow::Result<DemoOutcome> {
    let mut sc = Scenario::pbx2011(args.seed);
    sc.enterprises = args.enterprises;
    let out = sim::generate(&sc);
    let (key, _) = pipeline.key()?;
    let victim = key.token(Kind::Customer, sim::PBX2011_CUSTOMER).compact();
    let refdata = pipeline.refdata()?;
    let rates = refdata.rates.clone();
    let policies = match pipeline.policies()? {
        Some(p) => Some(p),
        None => Some((
            "built-in demo policy".to_string(),
            VICTIM_POLICY.to_string(),
        )),
    };
    let rules = match &pipeline.rules {
        Some(_) => pipeline.rules()?,
        None => RulesConfig::default(),
    };
    let mut emb = Embedded::new(EmbeddedConfig {
        rules,
        policies,
        key,
        providers: Providers::simulated("NL"),
        range_digits: pipeline.range_digits,
        refdata,
    })
    .await?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut alerts = Vec::new();
    for chunk in out.records.chunks(2000) {
        let recs: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u64, r.record.clone()))
            .collect();
        let errs = emb.ingest(&recs, now).await;
        if let Some(e) = errs.first() {
            anyhow::bail!("scenario record refused: {}", e.error);
        }
        alerts.extend(emb.drain().await?);
    }
    let label = out
        .labels
        .iter()
        .find(|l| l.campaign == "pbx-hack-2011")
        .ok_or_else(|| anyhow::anyhow!("scenario has no 2011 campaign"))?;
    let calls = fraud_calls(&out, &rates);
    let about_victim = |a: &pb::Alert| is_about(a, &victim);
    let first_critical = alerts
        .iter()
        .filter(|a| about_victim(a) && a.severity == pb::Severity::Critical as i32)
        .min_by_key(|a| a.detected_at.as_ref().map(from_ts).unwrap_or(i64::MAX))
        .cloned();
    let t_detect = first_critical
        .as_ref()
        .and_then(|a| a.detected_at.as_ref().map(from_ts))
        .unwrap_or(i64::MAX);
    let mut carriers: BTreeMap<String, (u64, u64, i64)> = BTreeMap::new();
    for c in &calls {
        let e = carriers.entry(c.provider.clone()).or_default();
        e.1 += 1;
        e.2 += (c.rate as f64 * c.duration / 60.0).round() as i64;
        if c.start <= t_detect {
            e.0 += 1;
        }
    }
    let mut benign_critical: Vec<String> = alerts
        .iter()
        .filter(|a| a.severity == pb::Severity::Critical as i32 && !about_victim(a))
        .filter(|a| a.subject.as_ref().is_some_and(|s| s.customer.is_some()))
        .map(|a| a.incident_id.clone())
        .collect();
    benign_critical.dedup();
    Ok(DemoOutcome {
        victim,
        first_fraud: label.start_ms,
        loss_at_detection: if t_detect == i64::MAX {
            0
        } else {
            loss_until(&calls, t_detect)
        },
        total_loss: loss_until(&calls, i64::MAX / 2),
        first_critical,
        carriers,
        records: out.records.len(),
        benign_critical,
        alerts,
    })
}

/// True when the alert's subject is the customer with compact token `who`.
pub fn is_about(a: &pb::Alert, who: &str) -> bool {
    let token = a.subject.as_ref().and_then(|s| s.customer.as_ref());
    token.is_some_and(|c| format!("{}:{}", c.key_id, c.value) == who)
}

fn mmss(ms: i64) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let s = ms.abs() / 1000;
    if s >= 3600 {
        format!("{sign}{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{sign}{:02}:{:02}", s / 60, s % 60)
    }
}

/// Runs the demo and prints the timeline and summary.
pub async fn run(
    args: &DemoArgs,
    pipeline: &PipelineOpts,
    out: &mut dyn Write,
) -> anyhow::Result<DemoOutcome> {
    if !args.json {
        writeln!(
            out,
            "TollGuard demo — the 2011 PBX hack (ECLI:NL:RBMNE:2014:2617), replayed\n"
        )?;
        writeln!(
            out,
            "An enterprise's PBX is hacked on a night in June 2011 and pumps calls to East Timor (+670 77)\n\
             over both of its carriers — voice at kpn, the data line at bt — among {} benign enterprises\n\
             at four carriers over four days. Each carrier sees only its own slice.\n",
            args.enterprises
        )?;
    }
    let o = simulate_and_detect(args, pipeline).await?;
    if args.json {
        for a in &o.alerts {
            writeln!(out, "{}", alert_json(a))?;
        }
        return Ok(o);
    }
    writeln!(
        out,
        "Scenario: {} call records through ingest → in-process bus → correlator → notifier.",
        o.records
    )?;
    writeln!(
        out,
        "First fraudulent call: {} (event time)\n",
        rfc3339(o.first_fraud)
    )?;
    writeln!(
        out,
        "Timeline (event time, relative to the first fraudulent call):"
    )?;
    for a in o.alerts.iter().filter(|a| is_about(a, &o.victim)) {
        let at = a.detected_at.as_ref().map(from_ts).unwrap_or(0);
        writeln!(
            out,
            "  T{}  {:<8} {:<20} {} v{} ({})\n           {}\n           → {}",
            mmss(at - o.first_fraud),
            severity_name(a).to_uppercase(),
            rule_name(a),
            a.incident_id,
            a.version,
            tollguard_core::render::kind_name(a),
            a.summary,
            a.recommended_action
        )?;
    }
    let other: Vec<_> = o
        .alerts
        .iter()
        .filter(|a| !is_about(a, &o.victim))
        .collect();
    writeln!(
        out,
        "\nOther alerts in the consortium traffic: {}",
        other.len()
    )?;
    for a in other.iter().take(10) {
        writeln!(
            out,
            "  {} {} {}: {}",
            severity_name(a),
            rule_name(a),
            a.incident_id,
            a.summary
        )?;
    }
    writeln!(out, "\nSummary")?;
    match &o.first_critical {
        Some(a) => {
            let at = a.detected_at.as_ref().map(from_ts).unwrap_or(0);
            writeln!(
                out,
                "  First critical alert: {} after the first fraudulent call ({}, rule {}).",
                mmss(at - o.first_fraud).trim_start_matches('+'),
                rfc3339(at),
                rule_name(a)
            )?;
            writeln!(
                out,
                "  Estimated loss at detection: {} of {} for the whole scenario ({:.2} %).",
                format_eur(o.loss_at_detection),
                format_eur(o.total_loss),
                100.0 * o.loss_at_detection as f64 / o.total_loss.max(1) as f64
            )?;
            writeln!(
                out,
                "  In 2011 the enterprise was told after 17 days; the bill was EUR 176,895.05."
            )?;
        }
        None => writeln!(out, "  The hack was NOT detected as critical.")?,
    }
    let th = RulesConfig::default().multi_carrier_burst;
    writeln!(
        out,
        "  Each carrier's share of the fraud traffic (calls before detection / total calls / est. loss):"
    )?;
    for (p, (before, total, loss)) in &o.carriers {
        writeln!(
            out,
            "    {p:<9} {before:>3} / {total:>4} calls, {}  — alone below the {}-call threshold at detection: {}",
            format_eur(*loss),
            th.critical_calls,
            if (*before as i64) < th.critical_calls {
                "yes"
            } else {
                "no"
            }
        )?;
    }
    writeln!(
        out,
        "  Benign enterprises with a critical incident: {}",
        o.benign_critical.len()
    )?;
    Ok(o)
}
