//! The correlation engine: plans → one batched store round trip → rules →
//! incidents → alerts.
//!
//! Incidents have stable ids: `inc-` + SHA-256 of (rule, scope, incident key,
//! episode). Repeated evidence updates the incident (at most every
//! `update_interval_s` of event time, and only when it grew materially); a
//! severity rise escalates it; neither opens a duplicate. The incident state
//! is claimed with a compare-and-set *before* the alert is published and
//! confirmed after, so a correlator that crashes in between re-publishes the
//! identical alert (same id and version) on redelivery instead of losing it.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tollguard_proto::v1 as pb;

use crate::codec::ts;
use crate::error::StoreError;
use crate::model::{CallEvent, Millis};
use crate::rules::config::Severity;
use crate::rules::detect::{Detector, Finding, Plan, Rule};
use crate::store::{LaneMark, Scope, StateWrite, Update, WindowStore};

/// Persisted state of one incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentState {
    /// Incident id.
    pub id: String,
    /// Episode number of this (rule, subject).
    pub episode: u32,
    /// Last published version.
    pub version: u32,
    /// Current severity.
    pub severity: Severity,
    /// Event time the incident opened.
    pub opened_at: Millis,
    /// Event time of the last published alert.
    pub last_alert_at: Millis,
    /// Event time of the latest evidence.
    pub last_seen: Millis,
    /// Magnitude at the last published alert.
    pub last_magnitude: i64,
    /// Providers in the last published alert.
    pub providers: Vec<String>,
    /// Hex-encoded alert claimed but not yet confirmed as published.
    pub pending: Option<String>,
    /// Wall time of the claim.
    pub claimed_wall: Millis,
}

/// A batch's plans ([`Engine::plan`]), their store updates gathered in
/// one list (in event order) for [`Engine::run`].
#[derive(Debug, Clone, Default)]
pub struct Planned {
    /// One per event (its updates moved to `updates`).
    plans: Vec<Plan>,
    /// How many of `updates` each event has.
    counts: Vec<usize>,
    /// Every event's updates, in order.
    updates: Vec<Update>,
}

/// Alerts to publish, and the claims to confirm once they are published.
#[derive(Debug, Default)]
pub struct Processed {
    /// Alerts, in order.
    pub alerts: Vec<pb::Alert>,
    /// Confirmations (the claimed state with `pending` cleared).
    confirms: Vec<StateWrite>,
    /// Events that were re-deliveries (every update a duplicate).
    pub duplicates: usize,
    /// Microseconds the batch's store apply took.
    pub store_us: u128,
    /// Events later than the allowed lateness behind the watermark.
    pub late: usize,
    /// Findings not settled yet, in order: their incident is claimed by
    /// another replica that has not confirmed its alert, or other replicas
    /// kept winning the compare-and-set. Hand them to the next
    /// [`Engine::run_with`] or [`Engine::settle`] (after this batch is
    /// confirmed), which decides them first; dropping them would lose, say,
    /// an escalation raised while another replica's opening is in flight.
    pub unsettled: Vec<Finding>,
}

/// Event-time watermarks per input lane: a lane is one carrier's events in
/// one partition (each carrier's feed is ordered by its own clock and
/// partitions progress independently, so lateness is judged per lane).
///
/// They also give the *low watermark* below which window state may be
/// pruned: the event time of the slowest lane. A carrier that backfills
/// hours behind the others (a bulk `tollguard send`) must still find their
/// calls in its windows, so pruning waits for it. Carriers listed as
/// expected but not seen yet hold pruning back entirely, and so does a
/// partition of the calls topic no lane was seen on yet (its owner has not
/// started, or a carrier's history waits there); lanes silent for
/// `STALE_MS` of wall time stop holding it.
///
/// With several correlator replicas each sees only the lanes of the
/// partitions it owns, and the replicas drift apart in event time; range
/// state is shared by all of them. So each replica merges its lanes into a
/// table shared through the window store ([`Watermarks::marks`] →
/// [`WindowStore::merge_lanes`] → [`Watermarks::set_shared`]) and the low
/// watermark is taken over every replica's lanes: the replica ahead does
/// not prune what the one behind still needs.
#[derive(Debug, Default, Clone)]
pub struct Watermarks {
    /// This replica's lanes: highest event time, wall time last seen.
    lanes: HashMap<(i32, String), (Millis, Millis)>,
    /// Every replica's lanes, as of the last merge.
    shared: HashMap<(i32, String), (Millis, Millis)>,
    expected: Vec<String>,
    /// Partitions `0..partitions` of the calls topic must each have a lane,
    /// counted from wall time `partitions_since` (a partition still without
    /// one after `STALE_MS` is idle, like a stale lane).
    partitions: i32,
    partitions_since: Millis,
}

/// A lane silent for this long (wall time) no longer holds pruning back.
pub const STALE_MS: Millis = 15 * 60_000;

/// Name of the lane table shared by the correlator replicas (global scope).
pub const LANE_TABLE: &str = "lanes";

impl Watermarks {
    /// Watermarks that wait for `expected` carriers before pruning.
    pub fn expecting(expected: Vec<String>) -> Self {
        Self {
            expected,
            ..Default::default()
        }
    }

    /// Waits for a lane on each of the calls topic's `partitions` before
    /// pruning (0: no such wait), for at most `STALE_MS` from wall time
    /// `wall` (a partition no event is keyed to stays empty).
    pub fn expect_partitions(&mut self, partitions: usize, wall: Millis) {
        self.partitions = i32::try_from(partitions).unwrap_or(i32::MAX);
        self.partitions_since = wall;
    }

    /// The low watermark at wall time `wall`, over this replica's lanes and
    /// the shared ones.
    pub fn horizon(&self, wall: Millis) -> Millis {
        let mut all: HashMap<(i32, &str), (Millis, Millis)> =
            HashMap::with_capacity(self.lanes.len() + self.shared.len());
        for ((p, c), (t, seen)) in self.shared.iter().chain(&self.lanes) {
            let e = all.entry((*p, c.as_str())).or_insert((*t, *seen));
            e.0 = e.0.max(*t);
            e.1 = e.1.max(*seen);
        }
        if self
            .expected
            .iter()
            .any(|p| !all.keys().any(|(_, c)| *c == p.as_str()))
        {
            return Millis::MIN;
        }
        if self.partitions > 0 && wall.saturating_sub(self.partitions_since) < STALE_MS {
            let mut seen = vec![false; self.partitions as usize];
            for (p, _) in all.keys() {
                if let Some(s) = usize::try_from(*p).ok().and_then(|p| seen.get_mut(p)) {
                    *s = true;
                }
            }
            if seen.contains(&false) {
                return Millis::MIN;
            }
        }
        all.values()
            .filter(|(_, seen)| wall.saturating_sub(*seen) < STALE_MS)
            .map(|(t, _)| *t)
            .min()
            .unwrap_or(Millis::MAX)
    }

    /// This replica's lanes (seen at a known wall time), to merge into the
    /// shared table.
    pub fn marks(&self) -> Vec<LaneMark> {
        self.lanes
            .iter()
            .filter(|(_, (_, seen))| *seen != Millis::MIN)
            .map(|((p, c), (t, seen))| LaneMark {
                lane: format!("{p}|{c}"),
                event_time: *t,
                seen: *seen,
            })
            .collect()
    }

    /// Takes the shared table (the merge's answer); lanes that are not
    /// `<partition>|<carrier>` are ignored.
    pub fn set_shared(&mut self, table: &[LaneMark]) {
        self.shared = table
            .iter()
            .filter_map(|m| {
                let (p, c) = m.lane.split_once('|')?;
                Some(((p.parse().ok()?, c.to_string()), (m.event_time, m.seen)))
            })
            .collect();
    }

    /// Observes an event of `partition` at wall time `wall`; true if it is
    /// later than `lateness_ms` behind its lane's watermark.
    pub fn observe_at(
        &mut self,
        partition: i32,
        e: &CallEvent,
        lateness_ms: i64,
        wall: Millis,
    ) -> bool {
        self.lane(partition, e, lateness_ms, Some(wall))
    }

    /// Observes an event of `partition` (at no known wall time: the lane
    /// holds pruning back only once seen through [`Watermarks::observe_at`]);
    /// true if it is later than `lateness_ms` behind its lane's watermark.
    pub fn observe(&mut self, partition: i32, e: &CallEvent, lateness_ms: i64) -> bool {
        self.lane(partition, e, lateness_ms, None)
    }

    fn lane(
        &mut self,
        partition: i32,
        e: &CallEvent,
        lateness_ms: i64,
        wall: Option<Millis>,
    ) -> bool {
        let t = e.phase_time();
        let wm = self
            .lanes
            .entry((partition, e.provider_id.clone()))
            .or_insert((t, Millis::MIN));
        let late = t < wm.0 - lateness_ms;
        wm.0 = wm.0.max(t);
        if let Some(w) = wall {
            wm.1 = w;
        }
        late
    }
}

/// How long a pending claim of another replica is respected before this
/// replica re-publishes it.
const PENDING_GRACE_MS: i64 = 15_000;

/// The engine over a window store.
#[derive(Debug, Clone)]
pub struct Engine {
    store: Arc<dyn WindowStore>,
    detector: Detector,
}

fn rule_pb(r: Rule) -> pb::Rule {
    match r {
        Rule::SpendCap => pb::Rule::SpendCap,
        Rule::MultiCarrierBurst => pb::Rule::MultiCarrierBurst,
        Rule::DestinationConvergence => pb::Rule::DestinationConvergence,
        Rule::Concurrency => pb::Rule::Concurrency,
        Rule::SequentialProbe => pb::Rule::SequentialProbe,
        Rule::HotNumber => pb::Rule::HotNumber,
        Rule::Wangiri => pb::Rule::Wangiri,
        Rule::LongDuration => pb::Rule::LongDuration,
        Rule::BlockedDestination => pb::Rule::BlockedDestination,
    }
}

/// Domain severity → protobuf.
pub fn severity_pb(s: Severity) -> pb::Severity {
    match s {
        Severity::Info => pb::Severity::Info,
        Severity::Warning => pb::Severity::Warning,
        Severity::Critical => pb::Severity::Critical,
    }
}

fn money(micros: i64) -> Option<pb::Money> {
    Some(pb::Money {
        currency: "EUR".into(),
        micros,
    })
}

fn token(t: &crate::model::Token) -> pb::Token {
    pb::Token {
        key_id: t.key_id.clone(),
        value: t.value.clone(),
    }
}

/// Incident id of (rule, scope, key, episode).
pub fn incident_id(f: &Finding, episode: u32) -> String {
    let mut h = Sha256::new();
    h.update(f.rule.as_str().as_bytes());
    h.update([0x1f]);
    h.update(f.scope.tag().as_bytes());
    h.update([0x1f]);
    h.update(f.incident_key.as_bytes());
    h.update([0x1f]);
    h.update(episode.to_be_bytes());
    format!("inc-{}", &hex::encode(h.finalize())[..20])
}

fn build_alert(f: &Finding, st: &IncidentState, kind: pb::AlertKind, wall: Millis) -> pb::Alert {
    let ev = &f.evidence;
    let mut providers: Vec<String> = ev
        .calls
        .keys()
        .chain(ev.spend.keys())
        .chain(ev.customers.keys())
        .cloned()
        .collect();
    providers.sort();
    providers.dedup();
    let carriers = providers
        .iter()
        .map(|p| pb::CarrierEvidence {
            provider_id: p.clone(),
            calls: ev.calls.get(p).copied().unwrap_or(0).max(0) as u64,
            spend: money(ev.spend.get(p).copied().unwrap_or(0)),
            distinct_customers: ev.customers.get(p).copied().unwrap_or(0).max(0) as u64,
        })
        .collect();
    pb::Alert {
        incident_id: st.id.clone(),
        version: st.version,
        rule: rule_pb(f.rule) as i32,
        severity: severity_pb(st.severity) as i32,
        kind: kind as i32,
        subject: Some(pb::Subject {
            customer: f.subject.customer.as_ref().map(token),
            range: f.subject.range.clone().unwrap_or_default(),
            country: f.subject.country.clone().unwrap_or_default(),
            number: f.subject.number.as_ref().map(token),
        }),
        providers: f.providers.clone(),
        evidence: Some(pb::Evidence {
            carriers,
            distinct_origins: ev.distinct_origins.max(0) as u64,
            estimated_spend: money(ev.total_spend),
            calls: ev.total_calls.max(0) as u64,
            first_event_time: Some(ts(st.opened_at.min(f.at))),
            last_event_time: Some(ts(f.at)),
            window_start: Some(ts(ev.window.0)),
            window_end: Some(ts(ev.window.1)),
            thresholds: ev.thresholds.clone().into_iter().collect(),
            ranges: ev.ranges.clone(),
            concurrent_calls: ev.concurrent.max(0) as u64,
        }),
        summary: f.summary.clone(),
        recommended_action: f.action.clone(),
        detected_at: Some(ts(f.at)),
        published_at: Some(ts(wall)),
        opened_at: Some(ts(st.opened_at)),
        trigger_provider_id: f.trigger.0.clone(),
        trigger_event_id: f.trigger.1.clone(),
    }
}

impl Engine {
    /// An engine over `store`.
    pub fn new(store: Arc<dyn WindowStore>, detector: Detector) -> Self {
        Self { store, detector }
    }

    /// Replaces rules and policies (e.g. on SIGHUP), keeping the hot list;
    /// window state lives in the store and is untouched.
    pub fn set_detector(&mut self, mut detector: Detector) {
        detector.set_hot_list_from(&self.detector);
        self.detector = detector;
    }

    /// The detector (to refresh hot list or policies).
    pub fn detector_mut(&mut self) -> &mut Detector {
        &mut self.detector
    }

    /// The detector.
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn WindowStore> {
        &self.store
    }

    /// Processes a batch of events (in order). `late[i]` marks events that
    /// arrived later than the allowed lateness (see [`Watermarks`]); they
    /// update state but open no window incident. `wall` is the wall clock in
    /// millis, used only for `published_at` and claim ages.
    pub async fn process(
        &self,
        events: &[CallEvent],
        late: &[bool],
        wall: Millis,
    ) -> Result<Processed, StoreError> {
        self.process_at(events, late, Millis::MAX, wall).await
    }

    /// As [`Engine::process`], pruning window state only below `horizon`
    /// (the input's low watermark, see [`Watermarks::horizon`]).
    pub async fn process_at(
        &self,
        events: &[CallEvent],
        late: &[bool],
        horizon: Millis,
        wall: Millis,
    ) -> Result<Processed, StoreError> {
        let planned = self.plan(events, late, horizon);
        self.run(events, &planned, wall).await
    }

    /// The pure first half of [`Engine::process_at`]: each event's plan
    /// (its store updates), `late[i]` marking late events. It reads no
    /// state, so a caller may plan the next batch while the store still
    /// works on this one.
    pub fn plan(&self, events: &[CallEvent], late: &[bool], horizon: Millis) -> Planned {
        let mut out = Planned {
            plans: Vec::with_capacity(events.len()),
            counts: Vec::with_capacity(events.len()),
            updates: Vec::with_capacity(events.len() * 2),
        };
        for (i, e) in events.iter().enumerate() {
            let mut p = self.detector.plan_at(e, horizon);
            p.late = late.get(i).copied().unwrap_or(false);
            out.counts.push(p.updates.len());
            out.updates.append(&mut p.updates);
            out.plans.push(p);
        }
        out
    }

    /// The second half of [`Engine::process_at`]: applies a batch's
    /// [`Planned`] updates in one store call, evaluates the rules and claims
    /// incidents. `events` are the ones it was planned from.
    pub async fn run(
        &self,
        events: &[CallEvent],
        planned: &Planned,
        wall: Millis,
    ) -> Result<Processed, StoreError> {
        self.run_with(events, planned, Vec::new(), wall).await
    }

    /// As [`Engine::run`], deciding `carried` (an earlier batch's
    /// [`Processed::unsettled`] findings) before this batch's.
    pub async fn run_with(
        &self,
        events: &[CallEvent],
        planned: &Planned,
        carried: Vec<Finding>,
        wall: Millis,
    ) -> Result<Processed, StoreError> {
        if planned.plans.len() != events.len() {
            return Err(StoreError::Protocol(format!(
                "{} plans for {} events",
                planned.plans.len(),
                events.len()
            )));
        }
        let late = planned.plans.iter().filter(|p| p.late).count();
        let started = std::time::Instant::now();
        let outcomes = self.store.apply(&planned.updates).await?;
        let store_us = started.elapsed().as_micros();
        if outcomes.len() != planned.updates.len() {
            return Err(StoreError::Protocol(format!(
                "{} outcomes for {} updates",
                outcomes.len(),
                planned.updates.len()
            )));
        }
        let mut findings = carried;
        let mut duplicates = 0;
        let mut i = 0;
        for ((e, p), &n) in events.iter().zip(&planned.plans).zip(&planned.counts) {
            let oc = &outcomes[i..i + n];
            i += n;
            if n > 0 && oc.iter().all(|o| o.duplicate) {
                duplicates += 1;
            }
            findings.extend(self.detector.evaluate(e, p, oc));
        }
        let mut out = self.incidents(findings, wall).await?;
        out.duplicates = duplicates;
        out.late = late;
        out.store_us = store_us;
        Ok(out)
    }

    /// Decides findings left unsettled by an earlier batch, with no new
    /// events (an idle step). Confirm the result like any other.
    pub async fn settle(
        &self,
        carried: Vec<Finding>,
        wall: Millis,
    ) -> Result<Processed, StoreError> {
        self.incidents(carried, wall).await
    }

    async fn incidents(
        &self,
        findings: Vec<Finding>,
        wall: Millis,
    ) -> Result<Processed, StoreError> {
        let mut out = Processed::default();
        if findings.is_empty() {
            return Ok(out);
        }
        let mut keys: Vec<(Scope, String)> = findings
            .iter()
            .map(|f| (f.scope.clone(), format!("inc:{}", f.incident_key)))
            .collect();
        keys.sort();
        keys.dedup();
        let loaded = self.store.get_states(&keys).await?;
        // Current stored value (raw) per key, advanced as this batch claims.
        let mut cur: HashMap<(Scope, String), Option<String>> =
            keys.into_iter().zip(loaded).collect();
        let cfg = self.detector.config().incidents.clone();
        // Keys this batch has claimed: their pending marker is ours, not a
        // crashed replica's.
        let mut own: std::collections::HashSet<(Scope, String)> = Default::default();
        // Findings per incident key, in order. Keys are independent (each
        // finding reads and compare-and-sets only its own key), so the
        // findings advance in rounds: each round takes the next finding of
        // every key that needs a write and sends all those compare-and-sets
        // in one call; within a key the order — and every decision — is the
        // one a finding-by-finding loop would make.
        let mut lanes: Vec<Lane> = Vec::new();
        let mut lane_of: HashMap<(Scope, String), usize> = HashMap::new();
        for (i, f) in findings.iter().enumerate() {
            let key = (f.scope.clone(), format!("inc:{}", f.incident_key));
            let l = *lane_of.entry(key.clone()).or_insert_with(|| {
                lanes.push(Lane {
                    key,
                    queue: Default::default(),
                    attempt: 0,
                });
                lanes.len() - 1
            });
            lanes[l].queue.push_back(i);
        }
        let mut alerts: Vec<(usize, pb::Alert)> = Vec::new();
        loop {
            let mut writes: Vec<StateWrite> = Vec::new();
            let mut steps: Vec<(usize, Step)> = Vec::new();
            for (l, lane) in lanes.iter_mut().enumerate() {
                while let Some(&fi) = lane.queue.front() {
                    let f = &findings[fi];
                    let key = &lane.key;
                    let raw = cur.get(key).cloned().flatten();
                    let mut prev: Option<IncidentState> =
                        raw.as_deref().and_then(|s| serde_json::from_str(s).ok());
                    if own.contains(key)
                        && let Some(p) = prev.as_mut()
                    {
                        p.pending = None;
                    }
                    let (next, alert, consumes) = match decide(f, prev.as_ref(), &cfg, wall) {
                        Decision::Nothing => {
                            lane.next();
                            continue;
                        }
                        Decision::Blocked => {
                            // Another replica's claim is in flight.
                            lane.defer(&findings, &mut out.unsettled);
                            break;
                        }
                        Decision::Write {
                            next,
                            alert,
                            consumes,
                        } => (next, alert, consumes),
                    };
                    let Some(alert) = alert else {
                        // Only last_seen moved: persist without an alert
                        // (keeping our own pending claim, if any, for the
                        // confirm).
                        let mut next = next;
                        if own.contains(key) {
                            next.pending = raw
                                .as_deref()
                                .and_then(|s| serde_json::from_str::<IncidentState>(s).ok())
                                .and_then(|p| p.pending);
                        }
                        let value = serde_json::to_string(&next).unwrap_or_default();
                        writes.push(StateWrite {
                            scope: key.0.clone(),
                            name: key.1.clone(),
                            expect: raw,
                            value: value.clone(),
                            ttl_ms: ttl(&cfg),
                        });
                        steps.push((l, Step::Touch { next, value }));
                        break;
                    };
                    let mut claimed = next;
                    claimed.pending = Some(hex::encode(alert.encode_to_vec()));
                    claimed.claimed_wall = wall;
                    let value = serde_json::to_string(&claimed).unwrap_or_default();
                    writes.push(StateWrite {
                        scope: key.0.clone(),
                        name: key.1.clone(),
                        expect: raw,
                        value: value.clone(),
                        ttl_ms: ttl(&cfg),
                    });
                    steps.push((
                        l,
                        Step::Claim {
                            claimed,
                            value,
                            alert,
                            consumes,
                        },
                    ));
                    break;
                }
            }
            if writes.is_empty() {
                break;
            }
            let written = self.store.cas_states(&writes).await?;
            if written.len() != writes.len() {
                return Err(StoreError::Protocol(format!(
                    "cas_states returned {} results for {} writes",
                    written.len(),
                    writes.len()
                )));
            }
            let mut reload: Vec<usize> = Vec::new();
            for ((l, step), ok) in steps.into_iter().zip(written) {
                let lane = &mut lanes[l];
                let key = &lane.key;
                match step {
                    Step::Touch { mut next, value } => {
                        if ok {
                            if own.contains(key)
                                && let Some(c) = out
                                    .confirms
                                    .iter_mut()
                                    .rev()
                                    .find(|c| c.scope == key.0 && c.name == key.1)
                            {
                                next.pending = None;
                                c.expect = Some(value.clone());
                                c.value = serde_json::to_string(&next).unwrap_or_default();
                            }
                            cur.insert(key.clone(), Some(value));
                        }
                        // A lost silent write is not retried.
                        lane.next();
                    }
                    Step::Claim {
                        claimed,
                        value,
                        alert,
                        consumes,
                    } => {
                        if ok {
                            let mut confirmed = claimed;
                            confirmed.pending = None;
                            let cvalue = serde_json::to_string(&confirmed).unwrap_or_default();
                            out.confirms.push(StateWrite {
                                scope: key.0.clone(),
                                name: key.1.clone(),
                                expect: Some(value.clone()),
                                value: cvalue,
                                ttl_ms: ttl(&cfg),
                            });
                            cur.insert(key.clone(), Some(value));
                            own.insert(key.clone());
                            let fi = lane.queue.front().copied().unwrap_or_default();
                            alerts.push((fi, alert));
                            if consumes {
                                lane.next();
                            } else {
                                // A stale claim re-published: the finding
                                // itself is decided next round.
                                lane.attempt = 0;
                            }
                        } else {
                            // Another replica changed it: reload and decide
                            // again; after three attempts the key's
                            // findings wait for a later batch.
                            reload.push(l);
                            lane.attempt += 1;
                            if lane.attempt == CLAIM_ATTEMPTS {
                                lane.defer(&findings, &mut out.unsettled);
                            }
                        }
                    }
                }
            }
            if !reload.is_empty() {
                let keys: Vec<(Scope, String)> =
                    reload.iter().map(|&l| lanes[l].key.clone()).collect();
                let fresh = self.store.get_states(&keys).await?;
                for (key, v) in keys.into_iter().zip(fresh) {
                    cur.insert(key, v);
                }
            }
        }
        // Alerts in the order of their findings, as published before.
        alerts.sort_by_key(|(fi, _)| *fi);
        out.alerts = alerts.into_iter().map(|(_, a)| a).collect();
        Ok(out)
    }

    /// Confirms that the alerts of `p` were published.
    pub async fn confirm(&self, p: Processed) -> Result<(), StoreError> {
        // Several claims on one key in a batch chain onto each other; the
        // stored value is the last claim, so confirm only that one.
        let mut last: HashMap<(Scope, String), StateWrite> = HashMap::new();
        for w in p.confirms {
            last.insert((w.scope.clone(), w.name.clone()), w);
        }
        // One call for all of them. If a later claim replaced ours, its CAS
        // fails harmlessly.
        let writes: Vec<StateWrite> = last.into_values().collect();
        if !writes.is_empty() {
            self.store.cas_states(&writes).await?;
        }
        Ok(())
    }
}

/// Compare-and-set attempts of one finding's claim before it gives way.
const CLAIM_ATTEMPTS: u32 = 3;

/// The findings of one incident key, taken in order by [`Engine::incidents`].
struct Lane {
    key: (Scope, String),
    /// Indices of its findings still to decide.
    queue: std::collections::VecDeque<usize>,
    /// Failed claims of the finding at the front.
    attempt: u32,
}

impl Lane {
    /// On to the next finding.
    fn next(&mut self) {
        self.queue.pop_front();
        self.attempt = 0;
    }

    /// Moves the findings still to decide, in order, to `unsettled`: they
    /// wait for a later batch.
    fn defer(&mut self, findings: &[Finding], unsettled: &mut Vec<Finding>) {
        unsettled.extend(self.queue.drain(..).map(|i| findings[i].clone()));
        self.attempt = 0;
    }
}

/// A compare-and-set of one round of [`Engine::incidents`], and what to do
/// with its result.
enum Step {
    /// Persist the state without an alert.
    Touch { next: IncidentState, value: String },
    /// Claim the incident for `alert`; `consumes`: the finding is done
    /// once it is claimed.
    Claim {
        claimed: IncidentState,
        value: String,
        alert: pb::Alert,
        consumes: bool,
    },
}

/// What a finding does to its incident ([`decide`]).
#[derive(Debug)]
enum Decision {
    /// Nothing changes.
    Nothing,
    /// Another replica's claim is in flight: decide it later.
    Blocked,
    /// Write `next`: silently (no `alert`) or claiming it for `alert`.
    /// `consumes` is false when the alert re-publishes a stale claim and
    /// the finding itself is still to be decided.
    Write {
        next: IncidentState,
        alert: Option<pb::Alert>,
        consumes: bool,
    },
}

impl Decision {
    fn write(next: IncidentState, alert: Option<pb::Alert>) -> Self {
        Self::Write {
            next,
            alert,
            consumes: true,
        }
    }
}

fn ttl(cfg: &crate::rules::config::Incidents) -> i64 {
    (cfg.quiet_close_s as i64 * 1000) * 2
}

/// Decides what a finding does to its incident.
fn decide(
    f: &Finding,
    prev: Option<&IncidentState>,
    cfg: &crate::rules::config::Incidents,
    wall: Millis,
) -> Decision {
    let quiet = cfg.quiet_close_s as i64 * 1000;
    if let Some(p) = prev
        && let Some(hexed) = &p.pending
    {
        // A claim that was never confirmed. Re-publish the identical alert
        // when this is the claiming event itself coming back (the claimer
        // crashed before committing its offset), or when the claim is older
        // than the grace period (its replica is gone; this finding is then
        // decided against the republished state); otherwise another replica
        // is about to publish it, and this finding waits.
        let Some(alert) = hex::decode(hexed)
            .ok()
            .and_then(|b| pb::Alert::decode(b.as_slice()).ok())
        else {
            return Decision::Nothing;
        };
        let own = alert.trigger_provider_id == f.trigger.0 && alert.trigger_event_id == f.trigger.1;
        if own || wall - p.claimed_wall >= PENDING_GRACE_MS {
            let mut st = p.clone();
            st.pending = None;
            return Decision::Write {
                next: st,
                alert: Some(alert),
                consumes: own,
            };
        }
        return Decision::Blocked;
    }
    match prev {
        Some(p) if p.pending.is_some() => Decision::Nothing,
        Some(p) if f.at - p.last_seen <= quiet => {
            let mut st = p.clone();
            st.last_seen = st.last_seen.max(f.at);
            let mut providers = f.providers.clone();
            providers.sort();
            let new_carrier = providers.iter().any(|x| !p.providers.contains(x));
            if f.severity > p.severity {
                st.severity = f.severity;
                st.version += 1;
                st.last_alert_at = f.at;
                st.last_magnitude = f.magnitude;
                st.providers = providers;
                let a = build_alert(f, &st, pb::AlertKind::Escalated, wall);
                return Decision::write(st, Some(a));
            }
            let grown = f.magnitude as f64 >= p.last_magnitude as f64 * (1.0 + cfg.update_growth)
                && f.magnitude > p.last_magnitude;
            let due = f.at - p.last_alert_at >= cfg.update_interval_s as i64 * 1000;
            if due && (grown || new_carrier) {
                st.version += 1;
                st.last_alert_at = f.at;
                st.last_magnitude = f.magnitude;
                st.providers = providers;
                let a = build_alert(f, &st, pb::AlertKind::Updated, wall);
                return Decision::write(st, Some(a));
            }
            // Persist last_seen at most once a minute of event time.
            if f.at - p.last_seen >= 60_000 {
                Decision::write(st, None)
            } else {
                Decision::Nothing
            }
        }
        _ => {
            let episode = prev.map(|p| p.episode + 1).unwrap_or(1);
            let mut providers = f.providers.clone();
            providers.sort();
            let st = IncidentState {
                id: incident_id(f, episode),
                episode,
                version: 1,
                severity: f.severity,
                opened_at: f.at,
                last_alert_at: f.at,
                last_seen: f.at,
                last_magnitude: f.magnitude,
                providers,
                pending: None,
                claimed_wall: wall,
            };
            let a = build_alert(f, &st, pb::AlertKind::Opened, wall);
            Decision::write(st, Some(a))
        }
    }
}
