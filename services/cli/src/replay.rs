//! `tollguard replay`: partner exports through the embedded pipeline.

use std::io::Write;
use std::path::PathBuf;

use tollguard_core::record::{CsvMapping, RawRecord};
use tollguard_core::render::{alert_json, alert_line};
use tollguard_proto::v1 as pb;

use crate::common::{PipelineOpts, progress};
use crate::embedded::{Embedded, EmbeddedConfig, Providers};
use crate::input::{Format, Merge, RecordReader};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Partner files (JSON Lines, or CSV with --csv-mapping), replayed in
    /// event-time order: files are merged, and an input that is out of order
    /// by more than the allowed lateness (e.g. carriers one after another in
    /// one file) is read into memory and sorted first.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Print alerts as JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Input format.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// CSV mapping (TOML, the `[csv]` table of an ingester config).
    #[arg(long, value_name = "FILE")]
    pub csv_mapping: Option<PathBuf>,
    /// Home country of providers the replay does not know (ISO code).
    #[arg(long, default_value = "NL")]
    pub home_country: String,
    /// Records per processing chunk.
    #[arg(long, default_value_t = 5000, hide = true)]
    pub chunk: usize,
    /// Detection options.
    #[command(flatten)]
    pub pipeline: PipelineOpts,
}

/// Result of a replay.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    /// Records read.
    pub read: u64,
    /// Records accepted.
    pub accepted: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Alerts.
    pub alerts: Vec<pb::Alert>,
}

/// Loads a CSV mapping file: either a bare mapping or one under `[csv]`.
pub fn load_mapping(p: &PathBuf) -> anyhow::Result<CsvMapping> {
    let text = std::fs::read_to_string(p)?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let t = match table.get("csv") {
        Some(toml::Value::Table(t)) => t.clone(),
        _ => table,
    };
    let m: CsvMapping = t
        .try_into()
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    m.validate("csv")
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    Ok(m)
}

/// "2 h 05 min", "3 min 20 s": a span for a note.
fn human_span(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        s if s >= 3600 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min {:02} s", s / 60, s % 60),
        s => format!("{s} s"),
    }
}

/// Runs a replay, writing alerts to `out` as they are produced.
pub async fn run(
    args: &ReplayArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<ReplaySummary> {
    let (key, ephemeral) = args.pipeline.key()?;
    if ephemeral {
        writeln!(
            err,
            "note: no --key-file given; using an ephemeral key (tokens differ from production)"
        )?;
    }
    let mapping = args.csv_mapping.as_ref().map(load_mapping).transpose()?;
    let rules = args.pipeline.rules()?;
    let mut emb = Embedded::new(EmbeddedConfig {
        rules: rules.clone(),
        policies: args.pipeline.policies()?,
        key,
        providers: Providers::simulated(&args.home_country),
        range_digits: args.pipeline.range_digits,
        refdata: args.pipeline.refdata()?,
    })
    .await?;
    let readers = args
        .files
        .iter()
        .map(|p| RecordReader::open(p, args.format, mapping.as_ref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let merge = Merge::new(readers);
    let paths = merge.paths();
    let mut s = ReplaySummary::default();
    // A replay answers "would TollGuard have caught this": records go in
    // event-time order, as live feeds deliver them. Files are merged by
    // event time; a file that is itself out of order (one carrier's export
    // after another's in one file, a file sorted by customer) would make a
    // carrier's calls arrive hours after the others' and miss every
    // cross-carrier join, so the input is read first and, if anything is
    // further behind than the allowed lateness, sorted (stable) by event
    // time.
    let lateness = rules.general.allowed_lateness_s as i64 * 1000;
    let reading = progress(None, "reading");
    let mut records: Vec<(i64, usize, u64, RawRecord)> = Vec::new();
    let (mut newest, mut behind) = (i64::MIN, 0i64);
    for (file, (line, item)) in merge {
        s.read += 1;
        match item {
            Ok(r) => {
                let t = crate::input::phase_time(&r);
                newest = newest.max(t);
                behind = behind.max(newest.saturating_sub(t));
                records.push((t, file, line, r));
            }
            Err(e) => {
                s.rejected += 1;
                writeln!(err, "{}:{line}: {e}", paths[file].display())?;
            }
        }
        if s.read % 10_000 == 0 {
            reading.set_position(s.read);
        }
    }
    reading.finish_and_clear();
    if behind > lateness {
        writeln!(
            err,
            "note: the input is not in event-time order (a record {} behind an earlier one, more than the allowed lateness of {} s); replaying its {} records sorted by event time",
            human_span(behind),
            rules.general.allowed_lateness_s,
            records.len()
        )?;
        records.sort_by_key(|(t, ..)| *t);
    }
    let bar = progress(Some(records.len() as u64), "replaying");
    let now = chrono::Utc::now().timestamp_millis();
    let mut done = 0u64;
    for part in records.chunks(args.chunk.max(1)) {
        let chunk: Vec<(u64, RawRecord)> = part
            .iter()
            .enumerate()
            .map(|(i, (_, _, _, r))| (i as u64, r.clone()))
            .collect();
        for e in emb.ingest(&chunk, now).await {
            let (_, file, line, _) = &part[e.position as usize];
            s.rejected += 1;
            writeln!(err, "{}:{line}: {}", paths[*file].display(), e.error)?;
        }
        for a in emb.drain().await? {
            if args.json {
                writeln!(out, "{}", alert_json(&a))?;
            } else {
                writeln!(out, "{}\n", alert_line(&a))?;
            }
            s.alerts.push(a);
        }
        done += part.len() as u64;
        bar.set_position(done);
        bar.set_message(format!("{} alerts", s.alerts.len()));
    }
    bar.finish_and_clear();
    s.accepted = emb.accepted;
    writeln!(
        err,
        "replayed {} records from {} file(s): {} accepted, {} rejected; {} alerts",
        s.read,
        paths.len(),
        s.accepted,
        s.rejected,
        s.alerts.len()
    )?;
    Ok(s)
}
