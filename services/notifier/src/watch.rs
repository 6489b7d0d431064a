//! Reading the alerts topic for `Alerts.Watch`: resumable positions
//! (cursors) and the log-reader trait.
//!
//! Every `Watch` stream reads the alerts topic itself, with its own reader
//! assigned every partition (no consumer group), starting from the
//! positions in the caller's cursor. A cursor is the next offset of every
//! partition *after* the alert it came with, so resuming from it — on any
//! replica — continues exactly after that alert: no gap, no duplicate.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tollguard_core::bus::InRecord;

/// Per-partition next offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub BTreeMap<i32, i64>);

/// Prefix of cursors of this format.
const CURSOR_PREFIX: &str = "c1:";

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(CURSOR_PREFIX)?;
        let parts: Vec<String> = self.0.iter().map(|(p, o)| format!("{p}.{o}")).collect();
        f.write_str(&parts.join("-"))
    }
}

impl Cursor {
    /// Parses a cursor produced by [`Cursor`]'s `Display`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let body = s
            .strip_prefix(CURSOR_PREFIX)
            .ok_or_else(|| "not a TollGuard cursor".to_string())?;
        let mut map = BTreeMap::new();
        if body.is_empty() {
            return Ok(Self(map));
        }
        for part in body.split('-') {
            let (p, o) = part
                .split_once('.')
                .ok_or_else(|| format!("malformed position {part:?}"))?;
            let p: i32 = p
                .parse()
                .map_err(|_| format!("malformed partition {p:?}"))?;
            let o: i64 = o.parse().map_err(|_| format!("malformed offset {o:?}"))?;
            if p < 0 || o < 0 || map.insert(p, o).is_some() {
                return Err(format!("invalid position {part:?}"));
            }
        }
        Ok(Self(map))
    }
}

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The oldest retained record of every partition.
    Beginning,
    /// After the newest record of every partition (only new alerts).
    End,
    /// These positions; partitions not named start at their beginning (they
    /// were added after the cursor was made).
    At(Cursor),
}

/// Errors of a log reader.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log is unreachable.
    #[error("alert log unavailable: {0}")]
    Unavailable(String),
    /// The cursor points before the oldest retained record: resuming
    /// would skip alerts.
    #[error(
        "cursor expired: partition {partition} offset {offset} is older than the oldest retained alert ({earliest}); start again without a cursor"
    )]
    Expired {
        /// Partition.
        partition: i32,
        /// Cursor offset.
        offset: i64,
        /// Oldest retained offset.
        earliest: i64,
    },
    /// The cursor does not fit this topic (e.g. an offset past its end).
    #[error("invalid cursor: {0}")]
    Invalid(String),
}

/// A reader of one topic from given positions.
#[async_trait]
pub trait LogReader: Send + fmt::Debug {
    /// The position the reader is at (next offset of every partition).
    fn position(&self) -> Cursor;
    /// Up to `max` records, waiting at most `timeout` for the first; the
    /// position advances past every record returned.
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<InRecord>, LogError>;
}

/// Opens readers of the alerts topic.
#[async_trait]
pub trait AlertLog: Send + Sync + fmt::Debug {
    /// A reader starting at `start`.
    async fn open(&self, start: Start) -> Result<Box<dyn LogReader>, LogError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = Cursor(BTreeMap::from([(0, 12), (1, 0), (7, 99)]));
        let s = c.to_string();
        assert_eq!(s, "c1:0.12-1.0-7.99");
        assert_eq!(Cursor::parse(&s).unwrap(), c);
        assert_eq!(Cursor::parse("c1:").unwrap(), Cursor::default());
        for bad in [
            "",
            "x",
            "c1:0",
            "c1:0.-1",
            "c1:a.1",
            "c1:0.1-0.2",
            "c1:-1.3",
        ] {
            assert!(Cursor::parse(bad).is_err(), "{bad}");
        }
    }
}
