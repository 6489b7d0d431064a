//! Event-time alignment of the carriers' feeds.
//!
//! Carriers' feeds reach the correlator at their own pace. Live, they are
//! seconds apart. Replayed or backfilled history is another matter: four
//! carriers' exports streamed at once and unpaced drift far apart in event
//! time, because the carrier with the smallest file races days ahead of the
//! others. A cross-carrier window (a burst over two carriers, a callback to
//! a number that rang through another carrier) is then judged before the
//! other carriers' part of it has arrived, and caught late, or only by a
//! later event.
//!
//! The [`Aligner`] holds back a historical event until every *active*
//! carrier (one heard from within `idle_ms`) has reached its event time,
//! then releases the held events in event-time order, as one merged feed.
//! Its bounds:
//! - **live events pass at once**: an event newer than `live_window_ms`
//!   behind the wall clock is never held, so the live path keeps its
//!   latency (a lagging live carrier is handled by the windows' lateness,
//!   as before);
//! - **a carrier that goes quiet stops holding the others** after `idle_ms`;
//! - **nothing waits longer than `max_hold_ms`**, and at most `max_events`
//!   are held (the earliest go first);
//! - **flow control before that bound**: from half of `max_events` held,
//!   [`Aligner::paused`] names the partitions whose every lane is ahead of
//!   the slowest one, for the consumer to stop fetching until the slowest
//!   has caught up (or the hold is down to a quarter). Partitions are
//!   fetched independently, so one of them can trail the others by days
//!   of event time in an unpaced replay; pausing the ones ahead keeps the
//!   merge in order where releasing the earliest at the bound would not.
//!   A paused partition's lanes still count as active (they are not
//!   quiet, only not fetched).
//!
//! Offsets: a held event is not processed, so its partition's committed
//! position stays below it ([`Aligner::commit_positions`]); a crash or a
//! rebalance re-delivers it, and the window store's dedupe absorbs what was
//! already applied.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tollguard_core::bus::InRecord;
use tollguard_core::model::{CallEvent, Millis};

/// Bounds of the alignment (`[alignment]` in the correlator's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Events newer than this behind the wall clock are live: never held.
    pub live_window_ms: i64,
    /// A carrier not heard from for this long stops holding the others.
    pub idle_ms: i64,
    /// The longest an event is held.
    pub max_hold_ms: i64,
    /// The most events held at once.
    pub max_events: usize,
}

/// An event waiting for the other carriers, with what its batch needs. It
/// is held encoded (a few hundred bytes, not the decoded event's dozen
/// strings): a replay can hold tens of thousands.
#[derive(Debug)]
pub struct Held {
    /// The encoded event (decoded again when released).
    pub payload: Vec<u8>,
    /// Late on its lane when it arrived.
    pub late: bool,
    /// Traceparent header of its record.
    pub parent: Option<Vec<u8>>,
    partition: i32,
    offset: i64,
    /// Index of its partition in [`Aligner::partitions`].
    part: usize,
    /// Wall time it arrived.
    since: Millis,
}

impl Held {
    /// Partition of its record.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Offset of its record.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The event of record `r` (its payload moved here), late or not.
    pub fn new(r: &mut InRecord, late: bool) -> Self {
        Self {
            parent: r
                .header(tollguard_core::bus::HEADER_TRACEPARENT)
                .map(<[u8]>::to_vec),
            payload: std::mem::take(&mut r.payload),
            late,
            partition: r.partition,
            offset: r.offset,
            part: 0,
            since: 0,
        }
    }
}

/// A partition polled: the highest offset polled and the offsets held.
#[derive(Debug)]
struct PartitionState {
    topic: String,
    partition: i32,
    polled: i64,
    held: BTreeSet<i64>,
}

/// A lane: one carrier's events in one partition (partitions are fetched
/// independently, so each carrier progresses per partition).
#[derive(Debug)]
struct Lane {
    partition: i32,
    carrier: String,
    /// Highest event time.
    time: Millis,
    /// Wall time last heard from.
    heard: Millis,
}

impl Lane {
    /// Active at wall time `now`: heard from within `idle_ms`, or its
    /// partition is paused (not fetched is not quiet).
    fn active(&self, now: Millis, idle_ms: i64, paused: &[i32]) -> bool {
        now - self.heard < idle_ms || paused.contains(&self.partition)
    }
}

/// Holds events until the carriers' feeds are aligned (see the module
/// documentation). Without [`Alignment`], every event passes at once.
#[derive(Debug, Default)]
pub struct Aligner {
    cfg: Option<Alignment>,
    /// Held events by (event time, arrival sequence).
    held: BTreeMap<(Millis, u64), Held>,
    /// Arrival order of held events: (wall time, key).
    arrivals: VecDeque<(Millis, (Millis, u64))>,
    /// Few (partitions × carriers): searched linearly, no key allocated
    /// per event.
    lanes: Vec<Lane>,
    partitions: Vec<PartitionState>,
    seq: u64,
    /// Wall time the feeds (re)started: the first event after every lane
    /// was idle. Lanes show up one by one, so for `idle_ms` after it
    /// nothing is released on the lanes' progress alone.
    started: Millis,
    /// Every held event at or before this event time was held
    /// `max_hold_ms` (or is before one that was): it goes, in the next
    /// releases if one release's limit stops short of it.
    overdue: Millis,
    /// The last release stopped at its limit with more events ready.
    backlog: bool,
    /// Partitions [`Self::paused`] last asked to stop fetching.
    paused: Vec<i32>,
    /// Events released at the `max_events` bound before every active lane
    /// had reached them, since [`Self::take_forced`].
    forced: u64,
}

impl Aligner {
    /// An aligner with these bounds (`None`: pass everything at once).
    pub fn new(cfg: Option<Alignment>) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Events held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// True when the last [`Self::release`] stopped at its limit with more
    /// events ready to go: the caller should release again without waiting
    /// for new records.
    pub fn backlogged(&self) -> bool {
        self.backlog && !self.held.is_empty()
    }

    /// Events released at the `max_events` bound before every active lane
    /// had reached them (out of event-time order), since the last call: a
    /// replay skewed by more than `max_events` between carriers.
    pub fn take_forced(&mut self) -> u64 {
        std::mem::take(&mut self.forced)
    }

    /// Records that record `r` was polled (decoded or not: a dead letter's
    /// offset is committable too); returns its partition's index, for
    /// [`Self::push`].
    pub fn polled(&mut self, r: &InRecord) -> usize {
        if let Some(i) = self
            .partitions
            .iter()
            .position(|p| p.partition == r.partition && p.topic == r.topic)
        {
            let p = &mut self.partitions[i];
            p.polled = p.polled.max(r.offset);
            return i;
        }
        self.partitions.push(PartitionState {
            topic: r.topic.clone(),
            partition: r.partition,
            polled: r.offset,
            held: BTreeSet::new(),
        });
        self.partitions.len() - 1
    }

    /// Adds event `e`, held as `h`, of the partition [`Self::polled`]
    /// returned as `part`, that arrived at wall time `now`.
    pub fn push(&mut self, part: usize, e: &CallEvent, mut h: Held, now: Millis) {
        let t = e.phase_time();
        self.seq += 1;
        let key = (t, self.seq);
        let Some(cfg) = self.cfg else {
            // Released by the same batch: only the order is needed.
            self.held.insert(key, h);
            return;
        };
        if !self
            .lanes
            .iter()
            .any(|l| l.active(now, cfg.idle_ms, &self.paused))
        {
            self.started = now;
        }
        let carrier = e.provider_id.as_str();
        match self
            .lanes
            .iter_mut()
            .find(|l| l.partition == h.partition && l.carrier == carrier)
        {
            Some(l) => {
                l.time = l.time.max(t);
                l.heard = now;
            }
            None => self.lanes.push(Lane {
                partition: h.partition,
                carrier: carrier.to_string(),
                time: t,
                heard: now,
            }),
        }
        h.since = now;
        h.part = part;
        self.partitions[part].held.insert(h.offset);
        self.arrivals.push_back((now, key));
        self.held.insert(key, h);
        // Entries of released events leave the arrival queue only from its
        // front: one event held long at the front would let the queue grow
        // with every event behind it. Compact it now and then (amortised
        // O(1) per event).
        if self.arrivals.len() > 2 * self.held.len() + 1024 {
            let held = &self.held;
            self.arrivals.retain(|(_, k)| held.contains_key(k));
        }
    }

    /// The events that may go at wall time `now`, in event-time order: at
    /// most `limit` historical ones (live events always go). A replay's
    /// warm-up can make tens of thousands ready at once; released whole,
    /// they would be planned and applied as one batch whose updates, store
    /// pipeline and outcomes cost several KB per event. The rest stay held
    /// (in order, still counted in [`Self::len`]) and [`Self::backlogged`]
    /// says so.
    pub fn release(&mut self, now: Millis, limit: usize) -> Vec<Held> {
        let Some(cfg) = self.cfg else {
            return std::mem::take(&mut self.held).into_values().collect();
        };
        // Every held event at or before the slowest active lane.
        let mut cut = self
            .lanes
            .iter()
            .filter(|l| l.active(now, cfg.idle_ms, &self.paused))
            .map(|l| l.time)
            .min()
            .unwrap_or(Millis::MAX);
        if now - self.started < cfg.idle_ms {
            // Warming up: lanes not heard from yet may still show up.
            cut = Millis::MIN;
        }
        // Held too long: it goes, with everything before it.
        while let Some(&(since, key)) = self.arrivals.front() {
            if !self.held.contains_key(&key) {
                self.arrivals.pop_front();
            } else if now - since >= cfg.max_hold_ms {
                self.overdue = self.overdue.max(key.0);
                self.arrivals.pop_front();
            } else {
                break;
            }
        }
        let cut = cut.max(self.overdue);
        let mut out: Vec<Held> = Vec::new();
        self.backlog = false;
        loop {
            let over = self.held.len() > cfg.max_events;
            let Some(entry) = self.held.first_entry() else {
                break;
            };
            let (t, _) = *entry.key();
            let live = now - t < cfg.live_window_ms;
            let ready = t <= cut || live;
            if ready || over {
                if out.len() >= limit && !live {
                    self.backlog = true;
                    break;
                }
                out.push(entry.remove());
                self.forced += u64::from(!ready);
            } else {
                break;
            }
        }
        // Live events later than a held historical one pass too (they are
        // never held; the historical one before them still waits).
        let live: Vec<(Millis, u64)> = self
            .held
            .range((now - cfg.live_window_ms, 0)..)
            .map(|(k, _)| *k)
            .collect();
        out.extend(live.iter().filter_map(|k| self.held.remove(k)));
        self.unhold(out)
    }

    /// The partitions the consumer should not fetch from at wall time `now`
    /// (sorted; empty unless half of `max_events` are held): every
    /// partition whose slowest active lane is ahead of the slowest active
    /// lane of all. Pausing starts at half of `max_events` held and stops
    /// at a quarter; in between the set follows the slowest lane. A
    /// partition leaving the set has its lanes marked heard now: fetching
    /// resumes, and its next events must not find the others released
    /// past it meanwhile.
    pub fn paused(&mut self, now: Millis) -> &[i32] {
        let Some(cfg) = self.cfg else {
            return &[];
        };
        let held = self.held.len();
        let pausing = if self.paused.is_empty() {
            held >= (cfg.max_events / 2).max(1)
        } else {
            held > cfg.max_events / 4
        };
        let mut next = Vec::new();
        if pausing {
            let mut slowest: Vec<(i32, Millis)> = Vec::new();
            for l in self
                .lanes
                .iter()
                .filter(|l| l.active(now, cfg.idle_ms, &self.paused))
            {
                match slowest.iter_mut().find(|(p, _)| *p == l.partition) {
                    Some((_, t)) => *t = (*t).min(l.time),
                    None => slowest.push((l.partition, l.time)),
                }
            }
            if let Some(cut) = slowest.iter().map(|&(_, t)| t).min() {
                next = slowest
                    .iter()
                    .filter(|&&(_, t)| t > cut)
                    .map(|&(p, _)| p)
                    .collect();
                next.sort_unstable();
            }
        }
        for l in &mut self.lanes {
            if self.paused.contains(&l.partition) && !next.contains(&l.partition) {
                l.heard = now;
            }
        }
        self.paused = next;
        &self.paused
    }

    fn unhold(&mut self, out: Vec<Held>) -> Vec<Held> {
        for h in &out {
            self.partitions[h.part].held.remove(&h.offset);
        }
        out
    }

    /// Per partition the position that may be committed once the events
    /// released so far are processed: just below its earliest held event,
    /// else its highest offset polled (records carrying only topic,
    /// partition and offset, for [`tollguard_core::bus::Subscription::commit`]).
    pub fn commit_positions(&self) -> Vec<InRecord> {
        self.partitions
            .iter()
            .filter_map(|p| {
                let offset = match p.held.first() {
                    Some(first) => first - 1,
                    None => p.polled,
                };
                (offset >= 0).then(|| InRecord {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    offset,
                    key: Vec::new(),
                    payload: Vec::new(),
                    headers: Vec::new(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tollguard_core::bus::InRecord;
    use tollguard_core::codec::decode_event;
    use tollguard_core::model::Millis;

    use super::{Aligner, Alignment, Held};
    use crate::tests::{ended, ingestor};

    const T0: Millis = 1_307_746_020_000; // 2011: historical
    const MIN: Millis = 60_000;
    /// No release limit.
    const ALL: usize = usize::MAX;
    /// The wall clock of the tests (historical events are years behind it).
    const WALL: Millis = 1_800_000_000_000;

    fn cfg() -> Alignment {
        Alignment {
            live_window_ms: 60_000,
            idle_ms: 2_000,
            max_hold_ms: 60_000,
            max_events: 1_000,
        }
    }

    /// An end event of `carrier` at event time `t` (offset `offset` of
    /// `partition`).
    fn ev(carrier: &str, t: Millis, partition: i32, offset: i64) -> InRecord {
        let id = format!("{carrier}-{t}");
        let payload = ended(&ingestor(carrier), carrier, &id, "kvk:1", t);
        assert_eq!(decode_event(&payload).unwrap().phase_time(), t);
        InRecord {
            topic: "calls".into(),
            partition,
            offset,
            key: Vec::new(),
            payload,
            headers: Vec::new(),
        }
    }

    fn feed(a: &mut Aligner, events: &[(&str, Millis, i32, i64)], now: Millis) {
        for &(c, t, p, o) in events {
            push(a, ev(c, T0 + t * MIN, p, o), now);
        }
    }

    fn push(a: &mut Aligner, mut r: InRecord, now: Millis) {
        let e = decode_event(&r.payload).unwrap();
        let part = a.polled(&r);
        let h = Held::new(&mut r, false);
        a.push(part, &e, h, now);
    }

    fn ids(out: &[Held]) -> Vec<String> {
        out.iter()
            .map(|h| decode_event(&h.payload).unwrap().event_id)
            .collect()
    }

    fn id(c: &str, minute: Millis) -> String {
        format!("{c}-{}", T0 + minute * MIN)
    }

    /// A carrier racing ahead waits for the slower one; the feed comes out
    /// merged in event time, and the offsets committed stop below what is
    /// still held.
    #[test]
    fn a_fast_carrier_waits_for_a_slow_one_and_the_feed_comes_out_merged() {
        let mut a = Aligner::new(Some(cfg()));
        // bt's file is small: minutes 10..13 arrive at once; kpn is at 1, 2.
        feed(
            &mut a,
            &[
                ("bt", 10, 0, 0),
                ("bt", 12, 0, 1),
                ("kpn", 1, 0, 2),
                ("kpn", 2, 0, 3),
            ],
            WALL,
        );
        // Warming up: nothing yet, whatever the lanes say.
        assert!(a.release(WALL + 1_000, ALL).is_empty());
        // kpn keeps sending; bt's file is done (its lane goes idle but its
        // events wait for kpn's).
        feed(&mut a, &[("kpn", 3, 0, 4)], WALL + 1_900);
        let out = a.release(WALL + 2_000, ALL);
        assert_eq!(ids(&out), [id("kpn", 1), id("kpn", 2), id("kpn", 3)]);
        assert_eq!(a.len(), 2);
        // bt's minute 10 (offset 0) is held: nothing of partition 0 is
        // committable yet.
        assert!(a.commit_positions().is_empty());
        // kpn catches up to minute 11: bt's 10 goes, its 12 stays.
        feed(&mut a, &[("kpn", 11, 0, 5)], WALL + 2_500);
        assert_eq!(
            ids(&a.release(WALL + 2_500, ALL)),
            [id("bt", 10), id("kpn", 11)]
        );
        let c = a.commit_positions();
        assert_eq!(
            (c[0].partition, c[0].offset),
            (0, 0),
            "below bt's 12 (offset 1)"
        );
        // kpn goes quiet: after idle_ms it no longer holds bt back.
        assert!(a.release(WALL + 4_000, ALL).is_empty());
        assert_eq!(ids(&a.release(WALL + 4_600, ALL)), [id("bt", 12)]);
        assert!(a.is_empty());
        let c = a.commit_positions();
        assert_eq!((c[0].partition, c[0].offset), (0, 5), "everything polled");
    }

    /// A carrier's events in another partition are a lane of their own: a
    /// partition fetched late holds the others back.
    #[test]
    fn each_partition_of_a_carrier_is_its_own_lane() {
        let mut a = Aligner::new(Some(cfg()));
        feed(
            &mut a,
            &[("kpn", 5, 0, 0), ("kpn", 9, 0, 1), ("kpn", 3, 1, 0)],
            WALL,
        );
        feed(&mut a, &[("kpn", 10, 0, 2), ("kpn", 4, 1, 1)], WALL + 1_900);
        let out = a.release(WALL + 2_000, ALL);
        assert_eq!(
            ids(&out),
            [id("kpn", 3), id("kpn", 4)],
            "partition 1 is at minute 4"
        );
        feed(&mut a, &[("kpn", 9, 1, 2)], WALL + 2_100);
        let out = a.release(WALL + 2_100, ALL);
        assert_eq!(ids(&out), [id("kpn", 5), id("kpn", 9), id("kpn", 9)]);
    }

    /// Live events are never held, and nothing waits beyond max_hold_ms or
    /// max_events (the earliest go first).
    #[test]
    fn live_events_pass_and_holds_are_bounded() {
        let mut a = Aligner::new(Some(cfg()));
        // A live event (event time = wall clock) passes during warm-up.
        push(&mut a, ev("kpn", WALL - 5_000, 0, 0), WALL);
        assert_eq!(a.release(WALL, ALL).len(), 1);

        let mut a = Aligner::new(Some(cfg()));
        feed(&mut a, &[("bt", 50, 0, 0), ("kpn", 1, 1, 0)], WALL);
        // kpn keeps sending (stays active) but never reaches minute 50.
        for s in 1..60 {
            feed(&mut a, &[("kpn", 1, 1, s)], WALL + s * 1_000);
            let out = a.release(WALL + s * 1_000, ALL);
            assert!(!ids(&out).contains(&id("bt", 50)), "held at {s} s");
        }
        feed(&mut a, &[("kpn", 1, 1, 60)], WALL + 60_000);
        let out = a.release(WALL + 60_000, ALL);
        assert!(ids(&out).contains(&id("bt", 50)), "max_hold_ms passed");
        assert_eq!(a.take_forced(), 0, "held out its time: not forced");

        let mut a = Aligner::new(Some(Alignment {
            max_events: 2,
            ..cfg()
        }));
        feed(
            &mut a,
            &[
                ("bt", 30, 0, 0),
                ("bt", 20, 0, 1),
                ("bt", 40, 0, 2),
                ("kpn", 1, 1, 0),
            ],
            WALL,
        );
        assert_eq!(
            ids(&a.release(WALL + 100, ALL)),
            [id("kpn", 1), id("bt", 20)]
        );
        assert_eq!(a.len(), 2);
        assert_eq!(a.take_forced(), 2, "both went at the bound");
        assert_eq!(a.take_forced(), 0, "counted once");
    }

    /// A release gives at most its limit of historical events, earliest
    /// first, and says more are ready; the rest go in later releases, the
    /// ones held too long included (their arrival entries are gone by
    /// then); live events are never limited.
    #[test]
    fn a_release_is_limited_and_the_rest_follow_in_order() {
        let mut a = Aligner::new(Some(cfg()));
        let events: Vec<(&str, Millis, i32, i64)> =
            (0..10).map(|i| ("kpn", 10 - i, 0, i)).collect();
        feed(&mut a, &events, WALL);
        feed(&mut a, &[("bt", 1, 1, 0)], WALL);
        // Warming up: nothing is ready, nothing is backlogged.
        assert!(a.release(WALL + 100, 3).is_empty());
        assert!(!a.backlogged());
        // Held too long (bt never reaches kpn's minutes): all are overdue.
        let late = WALL + 60_000;
        push(&mut a, ev("kpn", late - 1_000, 0, 10), late);
        let out = a.release(late, 3);
        assert_eq!(
            ids(&out),
            [
                id("kpn", 1),
                id("bt", 1),
                id("kpn", 2),
                format!("kpn-{}", late - 1_000)
            ],
            "three historical (ties by partition), the live one too"
        );
        assert!(a.backlogged());
        let mut rest = Vec::new();
        while a.backlogged() {
            let out = a.release(late + 1, 3);
            assert!(out.len() <= 3);
            rest.extend(ids(&out));
        }
        let want: Vec<String> = (3..=10).map(|m| id("kpn", m)).collect();
        assert_eq!(rest, want, "the overdue rest, in event-time order");
        assert!(a.is_empty());
        assert_eq!(a.commit_positions()[0].offset, 10, "everything polled");
    }

    /// From half of `max_events` held, the partitions ahead of the slowest
    /// lane are named for pausing; while paused their lanes still hold the
    /// others back (not fetched is not quiet), and once the hold is down to
    /// a quarter they resume with their lanes heard again, so the others
    /// are not released past them before their next records come in.
    #[test]
    fn partitions_ahead_are_paused_until_the_slowest_lane_catches_up() {
        let mut a = Aligner::new(Some(Alignment {
            max_events: 8,
            ..cfg()
        }));
        assert!(a.paused(WALL).is_empty(), "nothing held");
        feed(
            &mut a,
            &[
                ("kpn", 20, 0, 0),
                ("bt", 21, 0, 1),
                ("kpn", 22, 0, 2),
                ("kpn", 1, 1, 0),
            ],
            WALL,
        );
        // Four held (half of eight): partition 0 is ahead (its slowest
        // lane at minute 21 against partition 1's 1).
        assert_eq!(a.paused(WALL), [0]);
        // Partition 1 goes on (to minute 30); partition 0 has not been
        // heard from for longer than idle_ms, but it is paused: the cut is
        // its bt lane's minute 21, not 30.
        feed(&mut a, &[("kpn", 30, 1, 1)], WALL + 2_500);
        assert_eq!(
            ids(&a.release(WALL + 2_500, ALL)),
            [id("kpn", 1), id("kpn", 20), id("bt", 21)]
        );
        // Two held: a quarter, pausing stops.
        assert!(a.paused(WALL + 2_500).is_empty());
        // Partition 0's lanes count from its resumption: its kpn 22 and
        // partition 1's 30 wait for them.
        assert!(a.release(WALL + 3_000, ALL).is_empty());
        assert_eq!(
            ids(&a.release(WALL + 4_600, ALL)),
            [id("kpn", 22), id("kpn", 30)],
            "every lane quiet"
        );
        // The slowest lane's partition is never paused, whatever is held.
        let mut a = Aligner::new(Some(Alignment {
            max_events: 2,
            ..cfg()
        }));
        feed(&mut a, &[("kpn", 5, 0, 0), ("bt", 5, 1, 0)], WALL);
        assert!(a.paused(WALL).is_empty(), "tied: neither is ahead");
    }

    /// One event held long (its lane raced ahead) does not let the
    /// bookkeeping of the events released meanwhile pile up.
    #[test]
    fn one_long_held_event_keeps_the_bookkeeping_bounded() {
        let mut a = Aligner::new(Some(cfg()));
        feed(&mut a, &[("bt", 100_000, 0, 0)], WALL);
        for i in 1..5_000 {
            feed(&mut a, &[("kpn", i, 1, i)], WALL + 2_000 + i);
            a.release(WALL + 2_000 + i, ALL);
        }
        assert_eq!(a.len(), 1, "only bt's event is held");
        assert!(
            a.arrivals.len() <= 2 * a.len() + 1025,
            "{}",
            a.arrivals.len()
        );
    }

    /// Without alignment every event passes at once, in event-time order.
    #[test]
    fn without_alignment_a_batch_passes_sorted() {
        let mut a = Aligner::new(None);
        feed(
            &mut a,
            &[("bt", 9, 0, 0), ("kpn", 2, 1, 0), ("bt", 5, 0, 1)],
            WALL,
        );
        assert_eq!(
            ids(&a.release(WALL, ALL)),
            [id("kpn", 2), id("bt", 5), id("bt", 9)]
        );
        assert!(a.is_empty());
    }
}
