//! `tollguard simulate`: labelled consortium traffic as per-carrier JSONL.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use tollguard_core::sim::{self, Scenario};

/// Scenario presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The 2011 multi-carrier PBX hack among benign enterprises (the demo).
    Pbx2011,
    /// The 2011 case plus a distributed IRSF campaign.
    Consortium,
    /// Benign traffic only.
    Benign,
    /// Every labelled campaign kind and benign look-alikes over a week.
    Suite,
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Output directory (created); one `<carrier>.jsonl` per carrier plus
    /// `labels.json`.
    #[arg(long, short, value_name = "DIR")]
    pub out: PathBuf,
    /// Scenario preset.
    #[arg(long, value_enum, default_value = "pbx2011")]
    pub preset: Preset,
    /// Seed (same seed, same output).
    #[arg(long, default_value_t = 2011)]
    pub seed: u64,
    /// Days of benign traffic.
    #[arg(long)]
    pub days: Option<u32>,
    /// Benign enterprises.
    #[arg(long)]
    pub enterprises: Option<usize>,
}

/// Writes the scenario; returns (records, files).
pub fn run(args: &SimulateArgs, err: &mut dyn Write) -> anyhow::Result<(usize, Vec<PathBuf>)> {
    let mut sc = match args.preset {
        Preset::Pbx2011 => Scenario::pbx2011(args.seed),
        Preset::Consortium => Scenario::consortium(args.seed),
        Preset::Suite => Scenario::suite(args.seed),
        Preset::Benign => Scenario {
            pbx_hack: false,
            ..Scenario::pbx2011(args.seed)
        },
    };
    if let Some(d) = args.days {
        anyhow::ensure!((1..=366).contains(&d), "--days must be between 1 and 366");
        sc.days = d;
    }
    if let Some(e) = args.enterprises {
        anyhow::ensure!(e >= 1, "--enterprises must be at least 1");
        sc.enterprises = e;
    }
    let out = sim::generate(&sc);
    std::fs::create_dir_all(&args.out)?;
    let mut writers: BTreeMap<String, BufWriter<File>> = BTreeMap::new();
    let mut files = Vec::new();
    for r in &out.records {
        if !writers.contains_key(&r.provider) {
            let p = args.out.join(format!("{}.jsonl", r.provider));
            files.push(p.clone());
            writers.insert(r.provider.clone(), BufWriter::new(File::create(&p)?));
        }
        let w = writers.get_mut(&r.provider).expect("inserted");
        serde_json::to_writer(&mut *w, &r.record.to_json())?;
        w.write_all(b"\n")?;
    }
    for (_, mut w) in writers {
        w.flush()?;
    }
    let labels = args.out.join("labels.json");
    std::fs::write(&labels, serde_json::to_string_pretty(&out.labels)?)?;
    files.push(labels);
    writeln!(
        err,
        "wrote {} records for {} carriers and {} labelled campaign(s) to {}",
        out.records.len(),
        files.len() - 1,
        out.labels.len(),
        args.out.display()
    )?;
    Ok((out.records.len(), files))
}
