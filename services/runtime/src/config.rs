//! Configuration loading: a TOML file plus `TOLLGUARD__SECTION__KEY`
//! environment overrides, deserialised with the path of any bad key, and
//! validated before any port is bound. A bad configuration exits with code
//! 64 (`EX_USAGE`) and a message naming the key.

use std::path::Path;

use serde::de::DeserializeOwned;
use tollguard_core::ConfigError;

/// Exit code for bad configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: i32 = 64;

/// Environment prefix of overrides.
pub const ENV_PREFIX: &str = "TOLLGUARD__";

/// Parses an override value: a TOML integer, float, boolean or array when
/// the text is exactly such a literal (its canonical form round-trips:
/// `5`, `true`, `1.5`, `["a","b"]`), else the plain string. So secrets such
/// as `1e3`, `0x1F`, `007` or `1_000` arrive unchanged.
fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    let parsed = toml::from_str::<toml::Table>(&doc)
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v @ toml::Value::Array(_)) if raw.trim_start().starts_with('[') => v,
        Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)))
            if v.to_string() == raw && v.as_float().is_none_or(f64::is_finite) =>
        {
            v
        }
        _ => toml::Value::String(raw.to_string()),
    }
}

/// Applies `TOLLGUARD__A__B=v` overrides (lower-cased path `a.b`) to `table`.
pub fn apply_env(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (k, v) in vars {
        let Some(path) = k.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(String::is_empty) {
            return Err(ConfigError::new(k.clone(), "malformed override name"));
        }
        let mut cur = &mut *table;
        for p in &parts[..parts.len() - 1] {
            let entry = cur
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cur = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::new(
                        parts.join("."),
                        format!("{k} overrides a value that is not a section"),
                    ));
                }
            };
        }
        cur.insert(parts[parts.len() - 1].clone(), parse_value(&v));
    }
    Ok(())
}

/// Loads `T` from an optional TOML file and the process environment.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, ConfigError> {
    load_with_env(file, std::env::vars())
}

/// Loads `T` from an optional TOML file and the given environment.
pub fn load_with_env<T: DeserializeOwned>(
    file: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let name = file
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "<defaults>".into());
    let mut table = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| ConfigError::new("--config", format!("cannot read {name}: {e}")))?;
            toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::from_toml(&name, &e))?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut table, vars)?;
    from_table(&name, table)
}

/// Deserialises a table, reporting the dotted path of a bad key.
pub fn from_table<T: DeserializeOwned>(name: &str, table: toml::Table) -> Result<T, ConfigError> {
    let de = toml::Value::Table(table);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let inner = inner.trim().to_string();
        // Unknown fields are reported by the parent path; name the field.
        let key = match inner.split('`').nth(1) {
            Some(f) if inner.starts_with("unknown field") => {
                if path == "." || path == f || path.ends_with(&format!(".{f}")) {
                    if path == "." { f.to_string() } else { path }
                } else if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            }
            _ => path,
        };
        ConfigError::new(key, format!("{inner} (in {name})"))
    })
}

/// Reads a configuration file (rules, policies, tables); errors name `key`.
pub fn read_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// Reads a secret from a file (trailing newline trimmed); errors name `key`
/// but never include the content.
pub fn read_secret(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

/// An optional consortium pseudonymisation key (`[pseudonymization]`),
/// used by services that resolve customer ids in policies or contacts.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id.
    #[serde(default)]
    pub key_id: String,
    /// Key file (relative paths resolve against `base` in [`KeyConfig::load`]).
    #[serde(default)]
    pub key_file: Option<std::path::PathBuf>,
    /// Key (e.g. from the environment); never logged.
    #[serde(default)]
    pub key: Option<String>,
}

impl KeyConfig {
    /// The key, if one is configured; a relative `key_file` is taken
    /// relative to `base`.
    pub fn load(
        &self,
        base: Option<&Path>,
    ) -> Result<Option<tollguard_core::pseudo::Key>, ConfigError> {
        use tollguard_core::pseudo::Key;
        match (&self.key_file, &self.key) {
            (Some(f), _) => {
                let path = match base {
                    Some(b) if f.is_relative() => b.join(f),
                    _ => f.clone(),
                };
                let secret = read_secret("pseudonymization.key_file", &path)?;
                Ok(Some(Key::from_text(&self.key_id, &secret)?))
            }
            (None, Some(k)) => Ok(Some(Key::from_text(&self.key_id, k)?)),
            (None, None) => Ok(None),
        }
    }
}

/// Prints a configuration error and exits with [`EXIT_CONFIG`].
pub fn exit_config(err: &ConfigError) -> ! {
    eprintln!("configuration error: {err}");
    tracing::error!(key = %err.key, reason = %err.reason, "configuration error");
    std::process::exit(EXIT_CONFIG);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        kafka: Kafka,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        #[serde(default)]
        bootstrap: String,
        #[serde(default)]
        partitions: u32,
    }

    #[test]
    fn env_overrides_and_key_paths() {
        let c: Cfg = load_with_env(
            None,
            vec![
                ("TOLLGUARD__KAFKA__BOOTSTRAP".into(), "h:9092".into()),
                ("TOLLGUARD__KAFKA__PARTITIONS".into(), "12".into()),
                ("OTHER".into(), "x".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.bootstrap, "h:9092");
        assert_eq!(c.kafka.partitions, 12);
        let e = load_with_env::<Cfg>(
            None,
            vec![("TOLLGUARD__KAFKA__PARTITIONS".into(), "many".into())],
        )
        .unwrap_err();
        assert_eq!(e.key, "kafka.partitions");
        let e = load_with_env::<Cfg>(None, vec![("TOLLGUARD__KAFKA__BOGUS".into(), "1".into())])
            .unwrap_err();
        assert_eq!(e.key, "kafka.bogus");
    }

    #[test]
    fn override_values_that_only_look_numeric_stay_strings() {
        for raw in [
            "1e3", "0x1F", "007", "1_000", "1.50", "+5", "inf", "nan", "hunter2",
        ] {
            assert_eq!(parse_value(raw), toml::Value::String(raw.into()), "{raw}");
        }
        assert_eq!(parse_value("12"), toml::Value::Integer(12));
        assert_eq!(parse_value("-3"), toml::Value::Integer(-3));
        assert_eq!(parse_value("1.5"), toml::Value::Float(1.5));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert!(matches!(
            parse_value("[\"a\", \"b\"]"),
            toml::Value::Array(_)
        ));
    }
}
