//! Options shared by the embedded commands.

use std::path::PathBuf;

use tollguard_core::ConfigError;
use tollguard_core::ingest::ReferenceData;
use tollguard_core::pseudo::Key;
use tollguard_core::rules::RulesConfig;
use tollguard_core::tables::{RateDeck, RiskTable};

/// Detection and key options.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineOpts {
    /// Rules file (TOML); the shipped defaults when absent.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Customer policies file (TOML).
    #[arg(long, value_name = "FILE")]
    pub policies: Option<PathBuf>,
    /// File holding the consortium pseudonymisation key (hex or text, ≥ 32
    /// bytes). Without it an ephemeral random key is used, so tokens are
    /// only comparable within this run.
    #[arg(long, value_name = "FILE", env = "TOLLGUARD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Id of that key.
    #[arg(long, default_value = "k1", env = "TOLLGUARD_KEY_ID")]
    pub key_id: String,
    /// Range-risk table CSV replacing the shipped one.
    #[arg(long, value_name = "FILE")]
    pub risk_table: Option<PathBuf>,
    /// Rate deck CSV replacing the shipped one.
    #[arg(long, value_name = "FILE")]
    pub rate_deck: Option<PathBuf>,
    /// National digits kept in the clear range prefix.
    #[arg(long, default_value_t = 2)]
    pub range_digits: usize,
}

fn read(key: &str, p: &PathBuf) -> Result<String, ConfigError> {
    std::fs::read_to_string(p)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", p.display())))
}

impl PipelineOpts {
    /// The key (ephemeral if no file).
    pub fn key(&self) -> Result<(Key, bool), ConfigError> {
        match &self.key_file {
            Some(p) => Ok((
                Key::from_text(&self.key_id, &read("--key-file", p)?)?,
                false,
            )),
            None => {
                let bytes: [u8; 32] = rand::random();
                Ok((Key::new("ephemeral", &bytes)?, true))
            }
        }
    }

    /// Rules.
    pub fn rules(&self) -> Result<RulesConfig, ConfigError> {
        match &self.rules {
            Some(p) => RulesConfig::parse(&p.display().to_string(), &read("--rules", p)?),
            None => Ok(RulesConfig::default()),
        }
    }

    /// Policies text.
    pub fn policies(&self) -> Result<Option<(String, String)>, ConfigError> {
        self.policies
            .as_ref()
            .map(|p| Ok((p.display().to_string(), read("--policies", p)?)))
            .transpose()
    }

    /// Reference data.
    pub fn refdata(&self) -> Result<ReferenceData, ConfigError> {
        let mut r = ReferenceData::default();
        if let Some(p) = &self.risk_table {
            r.risk = RiskTable::parse(&p.display().to_string(), &read("--risk-table", p)?)?;
        }
        if let Some(p) = &self.rate_deck {
            r.rates = RateDeck::parse(&p.display().to_string(), &read("--rate-deck", p)?)?;
        }
        Ok(r)
    }
}

/// A progress bar on a terminal, hidden otherwise.
pub fn progress(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {what} {{pos}} records [{{elapsed_precise}}] {{per_sec}} {{msg}}"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    pb.set_style(style);
    pb
}
