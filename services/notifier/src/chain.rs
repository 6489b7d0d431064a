//! The proof-of-warning hash chain, pure: canonical encoding and hashing of
//! [`pb::DeliveryRecord`]s, sealing a record onto its chain, verifying a
//! whole topic's worth of records, and summarising one incident's chain
//! ("who was warned, when, how, and did they acknowledge?").
//!
//! The canonical encoding is specified in `proto/tollguard/v1/delivery.proto`
//! (and docs/alerts.md, with a Python version): for every field but `hash`,
//! in field-number order, `name ":" len ":" value "\n"`, after the line
//! `tollguard.v1.DeliveryRecord`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use sha2::{Digest, Sha256};
use tollguard_proto::v1 as pb;

/// First line of every canonical encoding.
pub const CANONICAL_HEADER: &str = "tollguard.v1.DeliveryRecord\n";

fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    out.extend_from_slice(value.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| format!("{}.{:09}", t.seconds, t.nanos))
        .unwrap_or_default()
}

/// The canonical encoding of `r` (every field except `hash`).
pub fn canonical(r: &pb::DeliveryRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(CANONICAL_HEADER.as_bytes());
    field(&mut out, "incident_id", &r.incident_id);
    field(&mut out, "seq", &r.seq.to_string());
    field(&mut out, "prev_hash", &r.prev_hash);
    field(&mut out, "alert_version", &r.alert_version.to_string());
    field(&mut out, "severity", &r.severity.to_string());
    field(&mut out, "audience", &r.audience);
    field(&mut out, "channel", &r.channel.to_string());
    field(&mut out, "target", &r.target);
    field(&mut out, "attempt", &r.attempt.to_string());
    field(&mut out, "at", &ts(&r.at));
    field(&mut out, "status", &r.status.to_string());
    field(&mut out, "response_code", &r.response_code.to_string());
    field(&mut out, "error", &r.error);
    field(&mut out, "delivery_id", &r.delivery_id);
    field(&mut out, "actor", &r.actor);
    field(&mut out, "note", &r.note);
    field(&mut out, "replica", &r.replica);
    out
}

/// SHA-256 (lower-case hex) of the canonical encoding.
pub fn compute_hash(r: &pb::DeliveryRecord) -> String {
    hex::encode(Sha256::digest(canonical(r)))
}

/// Puts `r` on its chain after the record `(seq, hash)` (`None` for the
/// first record) and sets its `hash`.
pub fn seal(mut r: pb::DeliveryRecord, prev: Option<(u64, &str)>) -> pb::DeliveryRecord {
    match prev {
        Some((seq, hash)) => {
            r.seq = seq + 1;
            r.prev_hash = hash.to_string();
        }
        None => {
            r.seq = 1;
            r.prev_hash = String::new();
        }
    }
    r.hash = compute_hash(&r);
    r
}

/// Where a record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "partition {} offset {}", self.partition, self.offset)
    }
}

/// What is wrong with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// Its content does not match its hash, or the next record does not
    /// link to it: it was changed after it was written.
    Altered,
    /// One or more records before it are missing (a gap in `seq`).
    Missing,
    /// It appears before a record that should precede it.
    Reordered,
    /// Two different records claim the same position of one chain.
    Forked,
    /// It cannot be decoded as a `DeliveryRecord`.
    Undecodable,
}

impl ProblemKind {
    /// Short name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Altered => "altered",
            ProblemKind::Missing => "missing",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Forked => "forked",
            ProblemKind::Undecodable => "undecodable",
        }
    }
}

/// The first bad record of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Incident (the Kafka key for undecodable records).
    pub incident_id: String,
    /// `seq` of the bad record (0 when undecodable).
    pub seq: u64,
    /// Where it was read.
    pub position: Position,
    /// What is wrong.
    pub kind: ProblemKind,
    /// Explanation.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "incident {} seq {} at {}: {}: {}",
            self.incident_id,
            self.seq,
            self.position,
            self.kind.as_str(),
            self.detail
        )
    }
}

/// Result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Records read.
    pub records: usize,
    /// Chains (incidents).
    pub chains: usize,
    /// Identical re-publications skipped.
    pub duplicates: usize,
    /// The first problem of every bad chain, in topic order.
    pub problems: Vec<Problem>,
}

impl Report {
    /// True when every chain is intact.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One record as read from the topic: its position, its key, and its value
/// decoded (or why not).
#[derive(Debug, Clone)]
pub struct Located {
    /// Where it was read.
    pub position: Position,
    /// Kafka key (the incident id).
    pub key: String,
    /// The decoded record.
    pub record: Result<pb::DeliveryRecord, String>,
}

impl Located {
    /// Decodes a raw record.
    pub fn decode(partition: i32, offset: i64, key: &[u8], payload: &[u8]) -> Self {
        use prost::Message;
        Self {
            position: Position { partition, offset },
            key: String::from_utf8_lossy(key).to_string(),
            record: pb::DeliveryRecord::decode(payload).map_err(|e| e.to_string()),
        }
    }
}

/// Verifies every chain in `records` (in topic order per partition):
/// `seq` continuity from 1, `prev_hash` links, and every hash. Identical
/// copies of a record already seen are skipped (re-publications).
pub fn verify(records: &[Located]) -> Report {
    let mut report = Report {
        records: records.len(),
        ..Report::default()
    };
    let mut order: Vec<&Located> = records.iter().collect();
    order.sort_by_key(|l| l.position);
    let mut chains: BTreeMap<String, Vec<(Position, &pb::DeliveryRecord)>> = BTreeMap::new();
    for l in &order {
        match &l.record {
            Ok(r) => chains
                .entry(r.incident_id.clone())
                .or_default()
                .push((l.position, r)),
            Err(e) => report.problems.push(Problem {
                incident_id: l.key.clone(),
                seq: 0,
                position: l.position,
                kind: ProblemKind::Undecodable,
                detail: format!("not a DeliveryRecord: {e}"),
            }),
        }
    }
    report.chains = chains.len();
    for (incident, chain) in &chains {
        let (dups, problem) = verify_chain(incident, chain);
        report.duplicates += dups;
        if let Some(p) = problem {
            report.problems.push(p);
        }
    }
    report.problems.sort_by_key(|p| p.position);
    report
}

fn verify_chain(
    incident: &str,
    chain: &[(Position, &pb::DeliveryRecord)],
) -> (usize, Option<Problem>) {
    let mut dups = 0;
    let mut seen: HashMap<u64, (String, Position)> = HashMap::new();
    let mut expected = 1u64;
    let mut last: Option<(Position, u64, String)> = None;
    let problem = |seq: u64, position: Position, kind: ProblemKind, detail: String| Problem {
        incident_id: incident.to_string(),
        seq,
        position,
        kind,
        detail,
    };
    for (i, (pos, r)) in chain.iter().enumerate() {
        let actual = compute_hash(r);
        if actual != r.hash {
            return (
                dups,
                Some(problem(
                    r.seq,
                    *pos,
                    ProblemKind::Altered,
                    format!(
                        "its content does not match its hash (stored {}, computed {})",
                        short(&r.hash),
                        short(&actual)
                    ),
                )),
            );
        }
        if let Some((h, first)) = seen.get(&r.seq) {
            if *h == r.hash {
                dups += 1;
                continue;
            }
            return (
                dups,
                Some(problem(
                    r.seq,
                    *pos,
                    ProblemKind::Forked,
                    format!(
                        "a different record with seq {} was already read at {first}",
                        r.seq
                    ),
                )),
            );
        }
        if r.seq != expected {
            let later = chain[i + 1..]
                .iter()
                .find(|(_, x)| x.seq == expected)
                .map(|(p, _)| *p);
            return (
                dups,
                Some(match later {
                    Some(at) if r.seq > expected => problem(
                        r.seq,
                        *pos,
                        ProblemKind::Reordered,
                        format!(
                            "seq {} appears before seq {expected}, which is at {at}",
                            r.seq
                        ),
                    ),
                    _ if r.seq > expected => problem(
                        r.seq,
                        *pos,
                        ProblemKind::Missing,
                        if r.seq == expected + 1 {
                            format!("seq {expected} is missing (gap before seq {})", r.seq)
                        } else {
                            format!(
                                "seqs {expected}..={} are missing (gap before seq {})",
                                r.seq - 1,
                                r.seq
                            )
                        },
                    ),
                    _ => problem(
                        r.seq,
                        *pos,
                        ProblemKind::Reordered,
                        format!("seq {} appears where seq {expected} was expected", r.seq),
                    ),
                }),
            );
        }
        let prev_hash = last.as_ref().map(|(_, _, h)| h.as_str()).unwrap_or("");
        if r.prev_hash != prev_hash {
            // This record is intact (its hash matches) but does not link to
            // the record before it: that one was replaced by a record with
            // a recomputed hash.
            let (ppos, pseq, _) = last.clone().unwrap_or((*pos, 0, String::new()));
            return (
                dups,
                Some(if pseq == 0 {
                    problem(
                        r.seq,
                        *pos,
                        ProblemKind::Altered,
                        "the first record of the chain has a non-empty prev_hash".into(),
                    )
                } else {
                    problem(
                        pseq,
                        ppos,
                        ProblemKind::Altered,
                        format!(
                            "seq {} (at {pos}) links to prev_hash {}, but this record hashes to {}: it was altered or replaced",
                            r.seq,
                            short(&r.prev_hash),
                            short(prev_hash)
                        ),
                    )
                }),
            );
        }
        seen.insert(r.seq, (r.hash.clone(), *pos));
        last = Some((*pos, r.seq, r.hash.clone()));
        expected += 1;
    }
    (dups, None)
}

fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

/// Names of the enums, for people.
pub fn channel_name(c: i32) -> &'static str {
    match pb::DeliveryChannel::try_from(c) {
        Ok(pb::DeliveryChannel::Webhook) => "webhook",
        Ok(pb::DeliveryChannel::Email) => "email",
        Ok(pb::DeliveryChannel::Api) => "api",
        _ => "unspecified",
    }
}

/// Name of a status.
pub fn status_name(s: i32) -> &'static str {
    match pb::DeliveryStatus::try_from(s) {
        Ok(pb::DeliveryStatus::Delivered) => "delivered",
        Ok(pb::DeliveryStatus::Retrying) => "retrying",
        Ok(pb::DeliveryStatus::Failed) => "failed",
        Ok(pb::DeliveryStatus::Refused) => "refused",
        Ok(pb::DeliveryStatus::DeadLettered) => "dead_lettered",
        Ok(pb::DeliveryStatus::Acknowledged) => "acknowledged",
        Ok(pb::DeliveryStatus::Resolved) => "resolved",
        Ok(pb::DeliveryStatus::Suppressed) => "suppressed",
        _ => "unspecified",
    }
}

/// One notification (delivery id) of an incident, summarised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Audience.
    pub audience: String,
    /// Channel name.
    pub channel: &'static str,
    /// Redacted target.
    pub target: String,
    /// Alert version.
    pub alert_version: u32,
    /// First attempt time (ms).
    pub first_at_ms: i64,
    /// Attempts made.
    pub attempts: u32,
    /// Final status so far (`delivered`, `dead_lettered`, `retrying`, ...).
    pub outcome: &'static str,
    /// When the outcome was recorded (ms).
    pub outcome_at_ms: i64,
    /// Last response code.
    pub response_code: u32,
    /// Last error.
    pub error: String,
}

/// An acknowledgement or resolution event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiEvent {
    /// `acknowledged` or `resolved`.
    pub what: &'static str,
    /// Who.
    pub actor: String,
    /// When (ms).
    pub at_ms: i64,
    /// Note.
    pub note: String,
}

/// Who was warned of one incident, and who acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Notifications in order of their first attempt.
    pub warnings: Vec<Warning>,
    /// Acknowledgements and resolutions in order.
    pub events: Vec<ApiEvent>,
    /// Records of the chain.
    pub records: usize,
}

fn ms(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or(0)
}

/// Summarises the chain of `incident` (records in topic order; copies are
/// counted once).
pub fn summarize(records: &[Located], incident: &str) -> Summary {
    let mut s = Summary::default();
    let mut by_delivery: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut order: Vec<&Located> = records.iter().collect();
    order.sort_by_key(|l| l.position);
    for l in order {
        let Ok(r) = &l.record else { continue };
        if r.incident_id != incident || !seen.insert((r.seq, r.hash.clone())) {
            continue;
        }
        s.records += 1;
        let at = ms(&r.at);
        let status = status_name(r.status);
        match pb::DeliveryStatus::try_from(r.status) {
            Ok(pb::DeliveryStatus::Acknowledged) | Ok(pb::DeliveryStatus::Resolved) => {
                s.events.push(ApiEvent {
                    what: status,
                    actor: r.actor.clone(),
                    at_ms: at,
                    note: r.note.clone(),
                });
            }
            _ => {
                let i = *by_delivery.entry(r.delivery_id.clone()).or_insert_with(|| {
                    s.warnings.push(Warning {
                        audience: r.audience.clone(),
                        channel: channel_name(r.channel),
                        target: r.target.clone(),
                        alert_version: r.alert_version,
                        first_at_ms: at,
                        attempts: 0,
                        outcome: status,
                        outcome_at_ms: at,
                        response_code: 0,
                        error: String::new(),
                    });
                    s.warnings.len() - 1
                });
                let w = &mut s.warnings[i];
                w.attempts = w.attempts.max(r.attempt);
                if r.status != pb::DeliveryStatus::DeadLettered as i32 || w.outcome != "delivered" {
                    w.outcome = status;
                    w.outcome_at_ms = at;
                }
                if r.response_code != 0 {
                    w.response_code = r.response_code;
                }
                if !r.error.is_empty() {
                    w.error = r.error.clone();
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(incident: &str, status: pb::DeliveryStatus, attempt: u32) -> pb::DeliveryRecord {
        pb::DeliveryRecord {
            incident_id: incident.into(),
            alert_version: 1,
            severity: pb::Severity::Critical as i32,
            audience: "carrier:kpn".into(),
            channel: pb::DeliveryChannel::Webhook as i32,
            target: "hooks.kpn.example".into(),
            attempt,
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + i64::from(attempt),
                nanos: 5,
            }),
            status: status as i32,
            response_code: 503,
            error: "HTTP 503\nwith a newline".into(),
            delivery_id: "dlv-1".into(),
            ..Default::default()
        }
    }

    fn chain(incident: &str, n: u32) -> Vec<pb::DeliveryRecord> {
        let mut out: Vec<pb::DeliveryRecord> = Vec::new();
        for i in 1..=n {
            let prev = out.last().map(|r| (r.seq, r.hash.clone()));
            out.push(seal(
                rec(incident, pb::DeliveryStatus::Retrying, i),
                prev.as_ref().map(|(s, h)| (*s, h.as_str())),
            ));
        }
        out
    }

    fn located(rs: &[pb::DeliveryRecord]) -> Vec<Located> {
        use prost::Message;
        rs.iter()
            .enumerate()
            .map(|(i, r)| {
                Located::decode(0, i as i64, r.incident_id.as_bytes(), &r.encode_to_vec())
            })
            .collect()
    }

    #[test]
    fn canonical_encoding_is_length_prefixed_and_stable() {
        let r = rec("inc-1", pb::DeliveryStatus::Delivered, 1);
        let text = String::from_utf8(canonical(&r)).unwrap();
        assert!(text.starts_with("tollguard.v1.DeliveryRecord\nincident_id:5:inc-1\nseq:1:0\n"));
        assert!(
            text.contains("error:23:HTTP 503\nwith a newline\n"),
            "{text}"
        );
        assert!(text.contains("at:20:1700000001.000000005\n"), "{text}");
        assert!(!text.contains("\nhash:"));
        // A known vector, so other implementations can check themselves.
        // (docs/alerts.md's Python check computes the same value.)
        let sealed = seal(r, None);
        assert_eq!(sealed.hash, compute_hash(&sealed));
        assert_eq!(
            sealed.hash,
            "fdfcb2bab4c269ea468cf669f095cb0ff2fdbec5e9313b7b76115b9c89637010"
        );
    }

    #[test]
    fn intact_chains_verify() {
        let mut all = chain("inc-a", 4);
        all.extend(chain("inc-b", 2));
        let rep = verify(&located(&all));
        assert!(rep.ok(), "{:?}", rep.problems);
        assert_eq!((rep.records, rep.chains, rep.duplicates), (6, 2, 0));
    }

    #[test]
    fn identical_copies_are_skipped() {
        let mut all = chain("inc-a", 3);
        all.insert(2, all[1].clone());
        all.push(all[2].clone());
        let rep = verify(&located(&all));
        assert!(rep.ok(), "{:?}", rep.problems);
        assert_eq!(rep.duplicates, 2);
    }

    #[test]
    fn an_altered_record_is_named() {
        let mut all = chain("inc-a", 4);
        all[2].status = pb::DeliveryStatus::Delivered as i32;
        let rep = verify(&located(&all));
        assert_eq!(rep.problems.len(), 1);
        let p = &rep.problems[0];
        assert_eq!(
            (p.seq, p.kind, p.position.offset),
            (3, ProblemKind::Altered, 2)
        );
    }

    #[test]
    fn an_altered_record_with_a_recomputed_hash_is_named() {
        let mut all = chain("inc-a", 4);
        all[1].error = "nothing happened".into();
        all[1].hash = compute_hash(&all[1]);
        let rep = verify(&located(&all));
        let p = &rep.problems[0];
        assert_eq!((p.seq, p.kind), (2, ProblemKind::Altered), "{p}");
        assert!(p.detail.contains("seq 3"), "{p}");
    }

    #[test]
    fn a_removed_record_is_a_gap() {
        let mut all = chain("inc-a", 4);
        all.remove(1);
        let rep = verify(&located(&all));
        let p = &rep.problems[0];
        assert_eq!((p.seq, p.kind), (3, ProblemKind::Missing), "{p}");
        assert!(p.detail.contains("seq 2 is missing"), "{p}");
    }

    #[test]
    fn swapped_records_are_reordered() {
        let mut all = chain("inc-a", 4);
        all.swap(1, 2);
        let rep = verify(&located(&all));
        let p = &rep.problems[0];
        assert_eq!((p.seq, p.kind), (3, ProblemKind::Reordered), "{p}");
    }

    #[test]
    fn a_fork_and_garbage_are_reported() {
        let mut all = chain("inc-a", 2);
        let mut other = all[1].clone();
        other.error = "other".into();
        other.hash = compute_hash(&other);
        all.push(other);
        let mut loc = located(&all);
        loc.push(Located::decode(0, 99, b"inc-z", b"\xff\xff\xff"));
        let rep = verify(&loc);
        assert_eq!(rep.problems.len(), 2);
        assert_eq!(rep.problems[0].kind, ProblemKind::Forked);
        assert_eq!(rep.problems[1].kind, ProblemKind::Undecodable);
    }

    #[test]
    fn summary_groups_attempts_per_delivery() {
        let mut rs = vec![
            rec("inc-a", pb::DeliveryStatus::Retrying, 1),
            rec("inc-a", pb::DeliveryStatus::Delivered, 2),
            pb::DeliveryRecord {
                incident_id: "inc-a".into(),
                channel: pb::DeliveryChannel::Api as i32,
                status: pb::DeliveryStatus::Acknowledged as i32,
                actor: "kpn".into(),
                note: "blocked".into(),
                ..Default::default()
            },
        ];
        let mut prev: Option<(u64, String)> = None;
        for r in rs.iter_mut() {
            *r = seal(r.clone(), prev.as_ref().map(|(s, h)| (*s, h.as_str())));
            prev = Some((r.seq, r.hash.clone()));
        }
        let s = summarize(&located(&rs), "inc-a");
        assert_eq!(s.records, 3);
        assert_eq!(s.warnings.len(), 1);
        assert_eq!(s.warnings[0].attempts, 2);
        assert_eq!(s.warnings[0].outcome, "delivered");
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.events[0].actor, "kpn");
    }
}
