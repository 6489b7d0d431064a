//! `tollguard hotlist`: the consortium hot list in the shared window store
//! (entries `range:<range>` and `number:<callee token>`), read by every
//! correlator within `hot_list_refresh_s`. Incidents resolved as confirmed
//! fraud add to it too.

use std::io::Write;
use std::path::PathBuf;

use tollguard_core::number::{DialPlan, Normalizer};
use tollguard_core::pseudo::{Key, Kind};
use tollguard_core::rules::HotList;
use tollguard_core::store::WindowStore;
use tollguard_core::tables::RiskTable;
use tollguard_runtime::redis_store::RedisStore;

/// Where the hot list lives.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreOpts {
    /// Redis URL of the window store.
    #[arg(
        long,
        env = "TOLLGUARD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis: String,
    /// Key prefix of the correlators' store.
    #[arg(long, default_value = "tg:")]
    pub prefix: String,
}

/// Hot-list commands.
#[derive(Debug, clap::Subcommand)]
pub enum HotlistCmd {
    /// Print the entries.
    List {
        /// Store.
        #[command(flatten)]
        store: StoreOpts,
    },
    /// Add a range (`+67077`) or a number (pseudonymised with the consortium key).
    Add {
        /// A range prefix like +67077.
        #[arg(long, conflicts_with = "number")]
        range: Option<String>,
        /// A full number (any dialled form; see --home-country).
        #[arg(long, requires = "key_file")]
        number: Option<String>,
        /// Key file (for --number).
        #[arg(long, env = "TOLLGUARD_KEY_FILE")]
        key_file: Option<PathBuf>,
        /// Key id.
        #[arg(long, default_value = "k1", env = "TOLLGUARD_KEY_ID")]
        key_id: String,
        /// Home country for national number forms.
        #[arg(long, default_value = "NL")]
        home_country: String,
        /// Store.
        #[command(flatten)]
        store: StoreOpts,
    },
    /// Import ranges from a CSV file (`range[,reason]` per line, `#` comments).
    Import {
        /// The file.
        file: PathBuf,
        /// Store.
        #[command(flatten)]
        store: StoreOpts,
    },
}

fn check_range(r: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        r.starts_with('+')
            && r.len() >= 3
            && r.len() <= 16
            && r[1..].bytes().all(|b| b.is_ascii_digit()),
        "`{r}` is not a range like +67077"
    );
    Ok(HotList::range_entry(r))
}

async fn store(o: &StoreOpts) -> anyhow::Result<RedisStore> {
    RedisStore::connect(&o.redis, &o.prefix)
        .await
        .map_err(|e| anyhow::anyhow!("--redis {}: {e}", o.redis))
}

/// Runs a hot-list command.
pub async fn run(cmd: &HotlistCmd, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        HotlistCmd::List { store: o } => {
            for e in store(o).await?.set_members("hot").await? {
                writeln!(out, "{e}")?;
            }
        }
        HotlistCmd::Add {
            range,
            number,
            key_file,
            key_id,
            home_country,
            store: o,
        } => {
            let entry = match (range, number, key_file) {
                (Some(r), _, _) => check_range(r)?,
                (None, Some(n), Some(kf)) => {
                    let key = Key::from_text(key_id, &std::fs::read_to_string(kf)?)?;
                    let norm = Normalizer::new(DialPlan::new(home_country), 2)?.normalize(
                        "number",
                        n,
                        &RiskTable::default_table(),
                    )?;
                    HotList::number_entry(&key.token(Kind::Number, &norm.e164).value)
                }
                _ => anyhow::bail!("give --range, or --number with --key-file"),
            };
            let new = store(o).await?.set_add("hot", &entry).await?;
            writeln!(
                out,
                "{entry} {}",
                if new { "added" } else { "already listed" }
            )?;
        }
        HotlistCmd::Import { file, store: o } => {
            let text = std::fs::read_to_string(file)?;
            let mut entries = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let l = line.trim();
                if l.is_empty() || l.starts_with('#') || l.starts_with("range") {
                    continue;
                }
                let r = l.split(',').next().unwrap_or("").trim();
                entries.push(
                    check_range(r)
                        .map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), i + 1))?,
                );
            }
            let s = store(o).await?;
            let mut added = 0;
            for e in &entries {
                added += s.set_add("hot", e).await? as usize;
            }
            writeln!(out, "imported {} ranges ({added} new)", entries.len())?;
        }
    }
    Ok(())
}
