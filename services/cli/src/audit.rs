//! `tollguard audit`: the proof-of-warning ledger (`tollguard.deliveries.v1`).
//!
//! * `tollguard audit verify` reads the whole topic from the beginning (a
//!   fresh consumer group, nothing committed) and checks every incident's
//!   hash chain: `seq` continuity, `prev_hash` links, and every record's hash.
//!   It prints `OK` with counts and exits 0, or names the first bad record
//!   (incident, seq, partition/offset, and whether it was altered, is missing,
//!   or is out of order) and exits 1.
//! * `tollguard audit show INCIDENT` answers "who was warned of incident X,
//!   when, over which channel, with what outcome — and did they
//!   acknowledge?".
//!
//! The chain logic lives in `tollguard_notifier::chain` (pure, unit-tested);
//! this module only reads Kafka and prints.

use std::io::Write;
use std::time::Duration;

use tollguard_core::render::rfc3339;
use tollguard_notifier::chain::{Located, summarize, verify};
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings, consume_all};

/// The ledger topic.
const DELIVERIES: &str = tollguard_core::bus::topics::DELIVERIES;

/// `tollguard audit …`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuditCmd {
    /// Verify every hash chain of the ledger; exit 0 if intact, 1 if not.
    Verify {
        /// Kafka bootstrap servers.
        #[arg(
            long,
            env = "TOLLGUARD_KAFKA_BOOTSTRAP",
            default_value = "127.0.0.1:9092"
        )]
        kafka: String,
        /// The ledger topic.
        #[arg(long, default_value = DELIVERIES)]
        topic: String,
        /// Give up reading after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Show who was warned of an incident, when, how, with what outcome,
    /// and who acknowledged it.
    Show {
        /// The incident id.
        incident: String,
        /// Kafka bootstrap servers.
        #[arg(
            long,
            env = "TOLLGUARD_KAFKA_BOOTSTRAP",
            default_value = "127.0.0.1:9092"
        )]
        kafka: String,
        /// The ledger topic.
        #[arg(long, default_value = DELIVERIES)]
        topic: String,
        /// Give up reading after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
}

async fn read(kafka: &str, topic: &str, timeout_s: u64) -> anyhow::Result<Option<Vec<Located>>> {
    let bus = KafkaBus::new(KafkaSettings::new(kafka))?;
    if bus
        .partition_count(topic, Duration::from_secs(10))
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let records = consume_all(kafka, topic, Duration::from_secs(timeout_s)).await?;
    Ok(Some(
        records
            .iter()
            .map(|r| Located::decode(r.partition, r.offset, &r.key, &r.payload))
            .collect(),
    ))
}

fn when(ms: i64) -> String {
    let s = rfc3339(ms);
    if s.is_empty() { "?".into() } else { s }
}

/// Runs an audit command; returns the process exit code.
pub async fn run(cmd: &AuditCmd, out: &mut dyn Write) -> anyhow::Result<i32> {
    match cmd {
        AuditCmd::Verify {
            kafka,
            topic,
            timeout_s,
        } => {
            let Some(records) = read(kafka, topic, *timeout_s).await? else {
                writeln!(out, "FAILED: topic {topic} does not exist")?;
                return Ok(1);
            };
            let rep = verify(&records);
            if rep.ok() {
                writeln!(
                    out,
                    "OK: {} records in {} incident chains verified ({} identical re-publications skipped); every seq, prev_hash and hash checks out",
                    rep.records, rep.chains, rep.duplicates
                )?;
                return Ok(0);
            }
            let first = &rep.problems[0];
            writeln!(
                out,
                "FAILED: {} of {} incident chains are broken ({} records read)",
                rep.problems.len(),
                rep.chains,
                rep.records
            )?;
            writeln!(
                out,
                "first bad record: incident {} seq {} at {}/{}: {}: {}",
                first.incident_id,
                first.seq,
                topic,
                first.position,
                first.kind.as_str(),
                first.detail
            )?;
            for p in rep.problems.iter().skip(1) {
                writeln!(out, "also: {p}")?;
            }
            Ok(1)
        }
        AuditCmd::Show {
            incident,
            kafka,
            topic,
            timeout_s,
        } => {
            let Some(records) = read(kafka, topic, *timeout_s).await? else {
                writeln!(out, "topic {topic} does not exist")?;
                return Ok(1);
            };
            let s = summarize(&records, incident);
            if s.records == 0 {
                writeln!(out, "no ledger records for incident {incident} in {topic}")?;
                return Ok(1);
            }
            let chain: Vec<Located> = records
                .into_iter()
                .filter(|l| match &l.record {
                    Ok(r) => r.incident_id == *incident,
                    Err(_) => false,
                })
                .collect();
            let rep = verify(&chain);
            writeln!(
                out,
                "incident {incident}: {} ledger records, chain {}",
                s.records,
                if rep.ok() {
                    "intact".to_string()
                } else {
                    format!("BROKEN ({})", rep.problems[0])
                }
            )?;
            writeln!(out, "warned:")?;
            if s.warnings.is_empty() {
                writeln!(out, "  (nobody)")?;
            }
            for w in &s.warnings {
                let code = if w.response_code == 0 {
                    String::new()
                } else {
                    format!(" ({})", w.response_code)
                };
                let err = if w.outcome == "delivered" || w.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", w.error)
                };
                writeln!(
                    out,
                    "  {}  {:<28} {:<8} {:<28} v{:<3} {}{code} at {} after {} attempt(s){err}",
                    when(w.first_at_ms),
                    w.audience,
                    w.channel,
                    w.target,
                    w.alert_version,
                    w.outcome,
                    when(w.outcome_at_ms),
                    w.attempts,
                )?;
            }
            writeln!(out, "acknowledgements and resolutions:")?;
            if s.events.is_empty() {
                writeln!(out, "  (none)")?;
            }
            for e in &s.events {
                let note = if e.note.is_empty() {
                    String::new()
                } else {
                    format!(": {:?}", e.note)
                };
                writeln!(out, "  {}  {} {}{note}", when(e.at_ms), e.actor, e.what)?;
            }
            Ok(if rep.ok() { 0 } else { 1 })
        }
    }
}
