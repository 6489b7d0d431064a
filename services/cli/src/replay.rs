//! `tollguard replay`: partner exports through the embedded pipeline.

use std::io::Write;
use std::path::PathBuf;

use tollguard_core::record::CsvMapping;
use tollguard_core::render::{alert_json, alert_line};
use tollguard_proto::v1 as pb;

use crate::common::{PipelineOpts, progress};
use crate::embedded::{Embedded, EmbeddedConfig, Providers};
use crate::input::{Format, Merge, RecordReader};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Partner files (JSON Lines, or CSV with --csv-mapping); several files
    /// are merged by event time.
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
    let mut emb = Embedded::new(EmbeddedConfig {
        rules: args.pipeline.rules()?,
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
    let bar = progress(None, "replaying");
    let mut s = ReplaySummary::default();
    let mut chunk = Vec::with_capacity(args.chunk);
    let mut origin: Vec<(usize, u64)> = Vec::with_capacity(args.chunk);
    let now = chrono::Utc::now().timestamp_millis();
    let mut merge = merge.peekable();
    loop {
        let next = merge.next();
        let done = next.is_none();
        if let Some((file, (line, item))) = next {
            s.read += 1;
            match item {
                Ok(r) => {
                    origin.push((file, line));
                    chunk.push(((origin.len() - 1) as u64, r));
                }
                Err(e) => {
                    s.rejected += 1;
                    writeln!(err, "{}:{line}: {e}", paths[file].display())?;
                }
            }
        }
        if chunk.len() >= args.chunk || (done && !chunk.is_empty()) {
            for e in emb.ingest(&chunk, now).await {
                let (file, line) = origin[e.position as usize];
                s.rejected += 1;
                writeln!(err, "{}:{line}: {}", paths[file].display(), e.error)?;
            }
            for a in emb.drain().await? {
                if args.json {
                    writeln!(out, "{}", alert_json(&a))?;
                } else {
                    writeln!(out, "{}\n", alert_line(&a))?;
                }
                s.alerts.push(a);
            }
            bar.set_position(s.read);
            bar.set_message(format!("{} alerts", s.alerts.len()));
            chunk.clear();
            origin.clear();
        }
        if done {
            break;
        }
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
