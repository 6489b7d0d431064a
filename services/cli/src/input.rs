//! Reading partner files lazily: JSON Lines or mapped CSV, one record at a
//! time with its line number, and a k-way merge of several per-carrier files
//! by event time.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use tollguard_core::FieldError;
use tollguard_core::record::{CsvMapping, CsvRowMapper, RawRecord, parse_time};

/// Input format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Decide by extension (.csv → csv, else jsonl).
    Auto,
    /// JSON Lines (DESIGN §3).
    Jsonl,
    /// CSV with a mapping.
    Csv,
}

/// One item read: the line number and the record or why it is unreadable.
pub type Item = (u64, Result<RawRecord, FieldError>);

/// A lazy reader of one file.
pub struct RecordReader {
    path: PathBuf,
    inner: Inner,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader")
            .field("path", &self.path)
            .finish()
    }
}

enum Inner {
    Jsonl {
        lines: std::io::Lines<BufReader<File>>,
        n: u64,
    },
    Csv {
        rows: csv::StringRecordsIntoIter<File>,
        mapper: Box<CsvRowMapper>,
        n: u64,
    },
}

impl RecordReader {
    /// Opens a file.
    pub fn open(path: &Path, format: Format, mapping: Option<&CsvMapping>) -> anyhow::Result<Self> {
        let fmt = match format {
            Format::Auto
                if path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("csv")) =>
            {
                Format::Csv
            }
            Format::Auto => Format::Jsonl,
            f => f,
        };
        let file =
            File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        let inner = match fmt {
            Format::Csv => {
                let default = CsvMapping::default();
                let mapping = mapping.unwrap_or(&default);
                let mut rdr = csv::ReaderBuilder::new()
                    .delimiter(mapping.delimiter.as_bytes()[0])
                    .flexible(true)
                    .from_reader(file);
                let header = rdr
                    .headers()
                    .map_err(|e| {
                        anyhow::anyhow!("{}: cannot read CSV header: {e}", path.display())
                    })?
                    .clone();
                let mapper = mapping
                    .reader(&header)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Inner::Csv {
                    rows: rdr.into_records(),
                    mapper: Box::new(mapper),
                    n: 1,
                }
            }
            _ => Inner::Jsonl {
                lines: BufReader::with_capacity(1 << 16, file).lines(),
                n: 0,
            },
        };
        Ok(Self {
            path: path.to_path_buf(),
            inner,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for RecordReader {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        match &mut self.inner {
            Inner::Jsonl { lines, n } => loop {
                *n += 1;
                match lines.next()? {
                    Ok(l) if l.trim().is_empty() => continue,
                    Ok(l) => return Some((*n, RawRecord::from_json_line(&l))),
                    Err(e) => {
                        return Some((
                            *n,
                            Err(FieldError::invalid(
                                "record",
                                format!("unreadable line: {e}"),
                            )),
                        ));
                    }
                }
            },
            Inner::Csv { rows, mapper, n } => {
                *n += 1;
                match rows.next()? {
                    Ok(row) => Some((*n, mapper.map(&row))),
                    Err(e) => Some((
                        *n,
                        Err(FieldError::invalid("record", format!("bad CSV row: {e}"))),
                    )),
                }
            }
        }
    }
}

/// Event time of a raw record's phase (for merging); unparsable → i64::MIN.
pub fn phase_time(r: &RawRecord) -> i64 {
    let Some(start) = r
        .start_time
        .as_deref()
        .and_then(|s| parse_time("start_time", s).ok())
    else {
        return i64::MIN;
    };
    match r.phase.as_deref() {
        Some("start") | None => start,
        _ => start + (r.duration_s.unwrap_or(0.0).clamp(0.0, 1e9) * 1000.0) as i64,
    }
}

/// Merges readers by phase time (each file is assumed roughly ordered).
/// Yields (file index, line, item).
#[derive(Debug)]
pub struct Merge {
    readers: Vec<RecordReader>,
    heads: Vec<Option<Item>>,
}

impl Merge {
    /// A merge over `readers`.
    pub fn new(mut readers: Vec<RecordReader>) -> Self {
        let heads = readers.iter_mut().map(|r| r.next()).collect();
        Self { readers, heads }
    }

    /// Paths of the files.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.readers
            .iter()
            .map(|r| r.path().to_path_buf())
            .collect()
    }
}

impl Iterator for Merge {
    type Item = (usize, Item);

    fn next(&mut self) -> Option<(usize, Item)> {
        let key = |h: &Item| match &h.1 {
            Ok(r) => phase_time(r),
            Err(_) => i64::MIN,
        };
        let (i, _) = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|h| (i, key(h))))
            .min_by_key(|(i, k)| (*k, *i))?;
        let item = self.heads[i].take()?;
        self.heads[i] = self.readers[i].next();
        Some((i, item))
    }
}
