//! `tollguard` — catch cross-carrier toll fraud. See `tollguard --help`.

#![allow(clippy::print_stdout)] // a command-line program prints its results

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollguard_cli::{audit, common::PipelineOpts, demo, eval, hotlist, replay, send, simulate};
use tollguard_core::number::{DialPlan, Normalizer};
use tollguard_core::pseudo::{Key, Kind};
use tollguard_core::tables::RiskTable;

/// TollGuard joins call events of several carriers and detects, within
/// minutes, the toll fraud that no single carrier can see.
#[derive(Debug, Parser)]
#[command(name = "tollguard", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay the 2011 PBX hack through the embedded pipeline and show it caught.
    Demo {
        #[command(flatten)]
        args: demo::DemoArgs,
        #[command(flatten)]
        pipeline: PipelineOpts,
    },
    /// Run partner exports (JSONL or mapped CSV) through the embedded
    /// pipeline and print the alerts: "would TollGuard have caught this?"
    Replay(replay::ReplayArgs),
    /// Run the labelled scenario suite and score detection (campaigns
    /// caught, time to detect, false alarms per million benign calls).
    Eval(eval::EvalArgs),
    /// Verify the proof-of-warning ledger, or show who was warned of an
    /// incident and when.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Manage the consortium hot list used by the `hot_number` rule.
    #[command(subcommand)]
    Hotlist(hotlist::HotlistCmd),
    /// Generate labelled consortium traffic (one JSONL file per carrier).
    Simulate(simulate::SimulateArgs),
    /// Stream a partner file to an ingester over gRPC.
    Send(send::SendArgs),
    /// Print the pseudonym of a value, to re-identify your own customers in
    /// alerts.
    Pseudonymize {
        /// What the value is.
        #[arg(value_enum)]
        kind: PseudoKind,
        /// The value (a customer id, `provider/line_id`, a number, an IP).
        value: String,
        /// Key file (hex or text, ≥ 32 bytes).
        #[arg(long, env = "TOLLGUARD_KEY_FILE")]
        key_file: PathBuf,
        /// Key id.
        #[arg(long, default_value = "k1", env = "TOLLGUARD_KEY_ID")]
        key_id: String,
        /// Home country used to normalise national number forms.
        #[arg(long, default_value = "NL")]
        home_country: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PseudoKind {
    Customer,
    Line,
    Number,
    Ip,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let res: anyhow::Result<ExitCode> = rt.block_on(async {
        match cli.command {
            Command::Demo { args, pipeline } => {
                let o = demo::run(&args, &pipeline, &mut out).await?;
                Ok(if o.first_critical.is_some() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Replay(args) => {
                let s = replay::run(&args, &mut out, &mut err).await?;
                Ok(if s.rejected > 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                })
            }
            Command::Eval(args) => {
                let r = eval::run(&args, &mut out).await?;
                let all = r.campaigns.iter().all(|c| c.detected);
                Ok(if all && r.false_critical_incidents == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Audit(cmd) => {
                let code = audit::run(&cmd, &mut out).await?;
                Ok(ExitCode::from(code.clamp(0, 255) as u8))
            }
            Command::Hotlist(cmd) => {
                hotlist::run(&cmd, &mut out).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Simulate(args) => {
                simulate::run(&args, &mut err)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Send(args) => {
                let s = send::run(&args, &mut err).await?;
                Ok(if s.rejected > 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                })
            }
            Command::Pseudonymize {
                kind,
                value,
                key_file,
                key_id,
                home_country,
            } => {
                let text = std::fs::read_to_string(&key_file)
                    .map_err(|e| anyhow::anyhow!("--key-file {}: {e}", key_file.display()))?;
                let key = Key::from_text(&key_id, &text)?;
                let (kind, value) = match kind {
                    PseudoKind::Customer => (Kind::Customer, value),
                    PseudoKind::Line => (Kind::Line, value),
                    PseudoKind::Ip => (Kind::Ip, value),
                    PseudoKind::Number => {
                        let n = Normalizer::new(DialPlan::new(&home_country), 2)?;
                        let norm = n.normalize("value", &value, &RiskTable::default_table())?;
                        (Kind::Number, norm.e164)
                    }
                };
                writeln!(out, "{}", key.token(kind, &value).compact())?;
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<tollguard_core::ConfigError>() {
                let _ = writeln!(err, "configuration error: {c}");
                return ExitCode::from(64);
            }
            let _ = writeln!(err, "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
