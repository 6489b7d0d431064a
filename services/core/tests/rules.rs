//! Scenario tests of individual rules through the whole core path: partner
//! record → ingestor → engine over the memory store → alerts.

use std::sync::Arc;

use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::number::DialPlan;
use tollguard_core::pseudo::{Key, Pseudonymizer};
use tollguard_core::record::RawRecord;
use tollguard_core::render::rfc3339;
use tollguard_core::rules::{Detector, Engine, HotList, Policies, Policy, RulesConfig};
use tollguard_core::store::{MemoryStore, WindowStore};
use tollguard_proto::v1 as pb;

const T0: i64 = 1_307_746_020_000; // 2011-06-10T22:47:00Z (Saturday 00:47 in Amsterdam)

fn key() -> Key {
    Key::new("k1", &[3u8; 32]).unwrap()
}

/// An ingestor for `provider` with the test key and the shipped reference data.
fn ingestor(provider: &str) -> Ingestor {
    Ingestor::new(
        provider,
        DialPlan::new("NL"),
        2,
        Pseudonymizer::new(key()),
        Arc::new(ReferenceData::default()),
    )
    .unwrap()
}

struct Rig {
    engine: Engine,
    ingestors: Vec<Ingestor>,
    n: u64,
    watermarks: tollguard_core::rules::Watermarks,
}

impl Rig {
    fn new(rules: RulesConfig, policies: &str) -> Self {
        let th = rules.validate().unwrap();
        let defaults = Policy {
            daily_cap: th.daily_cap,
            hourly_cap: th.hourly_cap,
            channels: rules.concurrency.default_channels,
            ..Default::default()
        };
        let policies = Policies::parse("p.toml", policies, Some(&key()), &defaults).unwrap();
        let det = Detector::new(rules, policies, HotList::default()).unwrap();
        let store: Arc<dyn WindowStore> = Arc::new(MemoryStore::new("tg:"));
        let ingestors = ["kpn", "bt", "odido"].map(ingestor).into();
        Self {
            engine: Engine::new(store, det),
            ingestors,
            n: 0,
            watermarks: Default::default(),
        }
    }

    /// Sends one record; returns the alerts it produced.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &mut self,
        carrier: usize,
        customer: &str,
        direction: &str,
        caller: &str,
        callee: &str,
        phase: &str,
        at_s: i64,
        duration: f64,
        call: Option<&str>,
    ) -> Vec<pb::Alert> {
        let (ev, late) = self.event(
            carrier, customer, direction, caller, callee, phase, at_s, duration, call,
        );
        let p = self.engine.process(&[ev], &[late], 0).await.unwrap();
        let alerts = p.alerts.clone();
        self.engine.confirm(p).await.unwrap();
        alerts
    }

    /// Ingests one record; returns its event and whether it is late.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        carrier: usize,
        customer: &str,
        direction: &str,
        caller: &str,
        callee: &str,
        phase: &str,
        at_s: i64,
        duration: f64,
        call: Option<&str>,
    ) -> (tollguard_core::model::CallEvent, bool) {
        self.n += 1;
        let ing = &self.ingestors[carrier];
        let call_id = call
            .map(str::to_string)
            .unwrap_or_else(|| format!("c{}", self.n));
        let raw = RawRecord {
            provider_id: Some(ing.provider_id().to_string()),
            event_id: Some(format!("e{}", self.n)),
            call_id: Some(call_id),
            phase: Some(phase.into()),
            customer_id: Some(customer.into()),
            line_id: Some(format!("{customer}-line")),
            caller: Some(caller.into()),
            callee: Some(callee.into()),
            direction: Some(direction.into()),
            start_time: Some(rfc3339(T0 + at_s * 1000)),
            duration_s: Some(duration),
            ..Default::default()
        };
        // Ingested within a day of the call (the tests span several days).
        let ev = ing
            .ingest(&raw, T0 + 86_400_000.max(at_s * 1000 + 3_600_000))
            .unwrap();
        let late = self.watermarks.observe(0, &ev, 300_000);
        (ev, late)
    }

    /// The `i`-th call of a burst to East Timor from `customer` at `at_s`,
    /// lasting `duration` seconds.
    fn burst_call(
        &mut self,
        i: i64,
        customer: &str,
        at_s: i64,
        duration: f64,
    ) -> tollguard_core::model::CallEvent {
        self.event(
            (i % 2) as usize,
            customer,
            "outbound",
            "+31201234567",
            &format!("+670771234{:02}", i % 100),
            "end",
            at_s,
            duration,
            None,
        )
        .0
    }
}

fn rule(a: &pb::Alert) -> String {
    tollguard_core::render::rule_name(a)
}

#[tokio::test]
async fn wangiri_wave_then_callbacks_escalate() {
    let mut r = Rig::new(RulesConfig::default(), "");
    let mut alerts = Vec::new();
    // One-ring calls from an Ivory Coast range to six customers at two carriers.
    for i in 0..6 {
        let caller = format!("+2250701234{i:02}");
        alerts.extend(
            r.call(
                i % 2,
                &format!("kvk:{i}"),
                "inbound",
                &caller,
                "+31201234567",
                "end",
                i as i64 * 60,
                2.0,
                None,
            )
            .await,
        );
    }
    let wave: Vec<_> = alerts.iter().filter(|a| rule(a) == "wangiri").collect();
    assert_eq!(wave.len(), 1, "{alerts:#?}");
    assert_eq!(wave[0].severity, pb::Severity::Warning as i32);
    assert_eq!(wave[0].subject.as_ref().unwrap().range, "+22507");
    // Two customers call back.
    let mut later = Vec::new();
    for i in 0..2 {
        let callee = format!("+2250701234{i:02}");
        later.extend(
            r.call(
                i,
                &format!("kvk:{i}"),
                "outbound",
                "+31201234567",
                &callee,
                "end",
                900 + i as i64 * 60,
                95.0,
                None,
            )
            .await,
        );
    }
    let esc: Vec<_> = later.iter().filter(|a| rule(a) == "wangiri").collect();
    assert!(!esc.is_empty(), "{later:#?}");
    let last = esc.last().unwrap();
    assert_eq!(last.severity, pb::Severity::Critical as i32);
    assert_eq!(
        last.incident_id, wave[0].incident_id,
        "callbacks escalate the same incident"
    );
    assert_eq!(last.evidence.as_ref().unwrap().calls, 2);
    // A call back to a number that never rang is nothing.
    let none = r
        .call(
            2,
            "kvk:9",
            "outbound",
            "+31201234567",
            "+22507999999",
            "end",
            2000,
            30.0,
            None,
        )
        .await;
    assert!(
        none.iter()
            .all(|a| rule(a) != "wangiri" || a.incident_id == wave[0].incident_id),
        "{none:#?}"
    );
}

#[tokio::test]
async fn blocked_and_allowed_destinations_from_the_policy() {
    let policies = "[[policy]]\ncustomer_id = \"kvk:1\"\nblocked_ranges = [\"+670\"]\n\
                    [[policy]]\ncustomer_id = \"kvk:2\"\nallowed_ranges = [\"+32\", \"+49\"]\n";
    let mut r = Rig::new(RulesConfig::default(), policies);
    let a = r
        .call(
            0,
            "kvk:1",
            "outbound",
            "+31201234567",
            "+67077123456",
            "start",
            0,
            0.0,
            None,
        )
        .await;
    let b: Vec<_> = a
        .iter()
        .filter(|a| rule(a) == "blocked_destination")
        .collect();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].severity, pb::Severity::Critical as i32);
    // Allowed destination and domestic calls are fine; others are not.
    assert!(
        r.call(
            0,
            "kvk:2",
            "outbound",
            "+31201234567",
            "+3221234567",
            "end",
            10,
            60.0,
            None
        )
        .await
        .is_empty()
    );
    assert!(
        r.call(
            0,
            "kvk:2",
            "outbound",
            "+31201234567",
            "+31301234567",
            "end",
            20,
            60.0,
            None
        )
        .await
        .is_empty()
    );
    let c = r
        .call(
            0,
            "kvk:2",
            "outbound",
            "+31201234567",
            "+442079460958",
            "end",
            30,
            60.0,
            None,
        )
        .await;
    assert!(c.iter().any(|a| rule(a) == "blocked_destination"), "{c:#?}");
    // A customer without a policy may call anywhere.
    assert!(
        r.call(
            0,
            "kvk:3",
            "outbound",
            "+31201234567",
            "+67077123456",
            "end",
            40,
            60.0,
            None
        )
        .await
        .is_empty()
    );
}

#[tokio::test]
async fn outside_business_hours_less_evidence_is_needed() {
    let policies = "[[policy]]\ncustomer_id = \"kvk:night\"\nbusiness_hours = \"08:00-18:00\"\n";
    let mut r = Rig::new(RulesConfig::default(), policies);
    // Three high-risk calls over two carriers at 00:47 local: factor 0.5 → warning at 2, critical at 3.
    let mut night = Vec::new();
    for i in 0..3 {
        night.extend(
            r.call(
                i % 2,
                "kvk:night",
                "outbound",
                "+31201234567",
                "+67077123456",
                "start",
                i as i64 * 20,
                0.0,
                None,
            )
            .await,
        );
    }
    let burst: Vec<_> = night
        .iter()
        .filter(|a| rule(a) == "multi_carrier_burst")
        .collect();
    assert_eq!(
        burst.last().map(|a| a.severity),
        Some(pb::Severity::Critical as i32),
        "{night:#?}"
    );
    // The same three calls from a customer without business hours raise nothing.
    let mut plain = Vec::new();
    for i in 0..3 {
        plain.extend(
            r.call(
                i % 2,
                "kvk:day",
                "outbound",
                "+31201234567",
                "+67077123456",
                "start",
                i as i64 * 20,
                0.0,
                None,
            )
            .await,
        );
    }
    assert!(
        plain.iter().all(|a| rule(a) != "multi_carrier_burst"),
        "{plain:#?}"
    );
}

#[tokio::test]
async fn long_calls_to_high_risk_ranges_warn_then_escalate_while_running() {
    let mut r = Rig::new(RulesConfig::default(), "");
    let mut out = Vec::new();
    for (i, el) in [600.0, 2760.0, 4000.0, 5460.0].iter().enumerate() {
        out.extend(
            r.call(
                0,
                "kvk:7",
                "outbound",
                "+31201234567",
                "+67077123456",
                "interim",
                0,
                *el,
                Some("long-1"),
            )
            .await
            .into_iter()
            .map(|a| (i, a)),
        );
    }
    let ld: Vec<_> = out
        .iter()
        .filter(|(_, a)| rule(a) == "long_duration")
        .collect();
    assert_eq!(ld.len(), 2, "{ld:#?}");
    assert_eq!(
        (ld[0].0, ld[0].1.severity),
        (1, pb::Severity::Warning as i32)
    );
    assert_eq!(
        (ld[1].0, ld[1].1.severity),
        (3, pb::Severity::Critical as i32)
    );
    assert_eq!(ld[0].1.incident_id, ld[1].1.incident_id);
    assert!(
        ld[1].1.summary.contains("still running"),
        "{}",
        ld[1].1.summary
    );
}

/// Five customers at three carriers each call one high-risk range
/// (`+67571`, Papua New Guinea) within the hour, lasting `duration` s.
async fn five_customers_call_one_range(r: &mut Rig, duration: f64) -> Vec<pb::Alert> {
    let mut out = Vec::new();
    for i in 0..5 {
        out.extend(
            r.call(
                i % 3,
                &format!("kvk:conv{i}"),
                "outbound",
                "+31201234567",
                &format!("+67571{:06}", 100 + i),
                "end",
                i as i64 * 300,
                duration,
                None,
            )
            .await,
        );
    }
    out
}

#[tokio::test]
async fn destination_convergence_needs_customers_carriers_and_the_spend_floor() {
    let conv = |out: &[pb::Alert]| -> Vec<pb::Alert> {
        out.iter()
            .filter(|a| rule(a) == "destination_convergence")
            .cloned()
            .collect()
    };
    // Short calls: five customers through three carriers, but a few euros
    // in all: ordinary traffic to a popular destination.
    let mut r = Rig::new(RulesConfig::default(), "");
    let out = five_customers_call_one_range(&mut r, 60.0).await;
    assert!(conv(&out).is_empty(), "{out:#?}");
    // The same customers pumping 20-minute calls: a distributed IRSF
    // campaign, raised on the fifth customer.
    let mut r = Rig::new(RulesConfig::default(), "");
    let out = five_customers_call_one_range(&mut r, 1200.0).await;
    let c = conv(&out);
    assert_eq!(c.len(), 1, "{out:#?}");
    assert_eq!(c[0].severity, pb::Severity::Warning as i32);
    // With the floor off, the short calls are raised too.
    let mut rules = RulesConfig::default();
    rules.destination_convergence.min_spend_eur = "0.00".into();
    let mut r = Rig::new(rules, "");
    let out = five_customers_call_one_range(&mut r, 60.0).await;
    assert_eq!(conv(&out).len(), 1, "{out:#?}");
    // A floor that is not an amount is refused, naming the key.
    let mut bad = RulesConfig::default();
    bad.destination_convergence.min_spend_eur = "-5".into();
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("destination_convergence.min_spend_eur"), "{e}");
    assert!(e.contains("negative"), "{e}");
}

#[tokio::test]
async fn sequential_probing_of_one_block() {
    let mut r = Rig::new(RulesConfig::default(), "");
    let mut out = Vec::new();
    for i in 0..16 {
        let callee = format!("+6757123450{:01}", i % 10);
        let callee = if i < 10 {
            callee
        } else {
            format!("+675712345{i}")
        };
        out.extend(
            r.call(
                i % 2,
                "kvk:scan",
                "outbound",
                "+31201234567",
                &callee,
                "end",
                i as i64 * 20,
                3.0,
                None,
            )
            .await,
        );
    }
    let sp: Vec<_> = out
        .iter()
        .filter(|a| rule(a) == "sequential_probe")
        .collect();
    assert!(!sp.is_empty(), "{out:#?}");
    assert_eq!(sp[0].severity, pb::Severity::Warning as i32);
    assert_eq!(sp.last().unwrap().severity, pb::Severity::Critical as i32);
}

#[tokio::test]
async fn events_later_than_the_allowed_lateness_count_for_spend_but_open_no_window_incident() {
    let mut rules = RulesConfig::default();
    rules.spend_cap.hourly_cap_eur = "20.00".into();
    let mut r = Rig::new(rules, "");
    // Move both carriers' watermarks an hour ahead with unrelated calls.
    for c in 0..2 {
        r.call(
            c,
            "kvk:other",
            "outbound",
            "+31201234567",
            "+31301234567",
            "end",
            3600,
            30.0,
            None,
        )
        .await;
    }
    // Another carrier's clock is independent: an early event there is not late.
    let odido = r
        .call(
            2,
            "kvk:x",
            "outbound",
            "+31201234567",
            "+31301234567",
            "end",
            0,
            30.0,
            None,
        )
        .await;
    assert!(odido.is_empty());
    // Now a burst from an hour ago arrives: late (lateness is 5 min).
    let mut out = Vec::new();
    for i in 0..8 {
        out.extend(
            r.call(
                i % 2,
                "kvk:late",
                "outbound",
                "+31201234567",
                "+67077123456",
                "end",
                i as i64 * 30,
                120.0,
                None,
            )
            .await,
        );
    }
    assert!(
        out.iter().all(|a| rule(a) != "multi_carrier_burst"),
        "{out:#?}"
    );
    // ... but its spend still counts: 8 × 2 min × EUR 1.45 = EUR 23.20 > the EUR 20 hourly cap.
    assert!(
        out.iter()
            .any(|a| rule(a) == "spend_cap" && a.severity == pb::Severity::Critical as i32),
        "{out:#?}"
    );
}

#[tokio::test]
async fn an_alert_claimed_but_never_published_is_republished_when_its_event_comes_back() {
    let rules = RulesConfig::default();
    let th = rules.validate().unwrap();
    let defaults = Policy {
        daily_cap: th.daily_cap,
        hourly_cap: th.hourly_cap,
        channels: rules.concurrency.default_channels,
        ..Default::default()
    };
    let det = Detector::new(
        rules,
        Policies::resolve(&Default::default(), None, &defaults).unwrap(),
        HotList::default(),
    )
    .unwrap();
    let store = Arc::new(MemoryStore::new("tg:"));
    let engine = Engine::new(store.clone() as Arc<dyn WindowStore>, det);
    let ing = ingestor("kpn");
    let ev = ing
        .ingest(
            &RawRecord {
                provider_id: Some("kpn".into()),
                event_id: Some("x1".into()),
                call_id: Some("x1".into()),
                phase: Some("interim".into()),
                customer_id: Some("kvk:7".into()),
                line_id: Some("l".into()),
                caller: Some("+31201234567".into()),
                callee: Some("+67077123456".into()),
                direction: Some("outbound".into()),
                start_time: Some(rfc3339(T0)),
                duration_s: Some(6000.0),
                ..Default::default()
            },
            T0 + 86_400_000,
        )
        .unwrap();
    // First processing claims the incident; the process "crashes" before
    // publishing or confirming.
    let first = engine
        .process(std::slice::from_ref(&ev), &[false], 1_000)
        .await
        .unwrap();
    assert!(first.alerts.iter().any(|a| rule(a) == "long_duration"));
    let claimed = first.alerts.clone();
    drop(first);
    // The same event is redelivered a second later (well inside the grace
    // period): the identical alert is published, not lost.
    let again = engine
        .process(std::slice::from_ref(&ev), &[false], 2_000)
        .await
        .unwrap();
    assert_eq!(again.alerts, claimed);
    engine.confirm(again).await.unwrap();
    // Once confirmed, a third delivery publishes nothing.
    let third = engine
        .process(std::slice::from_ref(&ev), &[false], 3_000)
        .await
        .unwrap();
    assert!(third.alerts.is_empty());
}

/// An event of `provider` at `at_s` seconds after T0 (for the watermarks).
fn wm_event(provider: &str, at_s: i64) -> tollguard_core::model::CallEvent {
    let mut e = ingestor("kpn")
        .ingest(
            &RawRecord {
                provider_id: Some("kpn".into()),
                event_id: Some("w".into()),
                call_id: Some("w".into()),
                phase: Some("start".into()),
                line_id: Some("l".into()),
                caller: Some("+31201234567".into()),
                callee: Some("+31301234567".into()),
                direction: Some("outbound".into()),
                start_time: Some(rfc3339(T0 + at_s * 1000)),
                ..Default::default()
            },
            T0 + 86_400_000,
        )
        .unwrap();
    e.provider_id = provider.into();
    e
}

#[test]
fn the_low_watermark_waits_for_expected_and_lagging_lanes() {
    use tollguard_core::rules::Watermarks;
    let ev = wm_event;
    let mut w = Watermarks::expecting(vec!["kpn".into(), "bt".into()]);
    w.observe_at(0, &ev("kpn", 7200), 300_000, 0);
    assert_eq!(w.horizon(1), i64::MIN, "bt not seen yet: prune nothing");
    w.observe_at(1, &ev("bt", 600), 300_000, 2);
    assert_eq!(
        w.horizon(3),
        T0 + 600_000,
        "the lagging carrier holds the horizon"
    );
    // One partition of a carrier lagging holds it too, whatever the
    // carrier's other partitions reached.
    w.observe_at(1, &ev("kpn", 1200), 300_000, 4);
    w.observe_at(2, &ev("bt", 9000), 300_000, 4);
    assert_eq!(w.horizon(5), T0 + 600_000);
    w.observe_at(1, &ev("bt", 8000), 300_000, 6);
    assert_eq!(w.horizon(7), T0 + 1_200_000, "kpn's partition 1");
    // The lanes quiet for longer than the staleness bound stop holding
    // pruning back.
    w.observe_at(0, &ev("kpn", 9000), 300_000, 20 * 60_000);
    w.observe_at(2, &ev("bt", 9100), 300_000, 20 * 60_000);
    assert_eq!(w.horizon(20 * 60_000), T0 + 9_000_000);
}

/// Two correlator replicas, each owning some partitions, share their lanes
/// through the window store: the replica ahead prunes only behind the one
/// behind, and a replica that lost a partition to the other in a rebalance
/// does not lower it.
#[tokio::test]
async fn replicas_prune_behind_the_slowest_lane_of_any_replica() {
    use tollguard_core::rules::{LANE_TABLE, STALE_MS, Watermarks};
    let store = MemoryStore::new("tg:");
    let expected = || Watermarks::expecting(vec!["kpn".into(), "bt".into()]);
    let (mut a, mut b) = (expected(), expected());
    // A owns partition 0 and is hours ahead; B owns partition 1.
    a.observe_at(0, &wm_event("kpn", 36_000), 300_000, 10);
    a.observe_at(0, &wm_event("bt", 35_000), 300_000, 10);
    b.observe_at(1, &wm_event("kpn", 600), 300_000, 10);
    assert_eq!(b.horizon(10), i64::MIN, "B has not seen bt");
    assert_eq!(a.horizon(10), T0 + 35_000_000, "alone, A prunes far ahead");
    let sync = |w: &mut Watermarks, now: i64| {
        let marks = w.marks();
        let store = &store;
        async move {
            store
                .merge_lanes(LANE_TABLE, &marks, now, 2 * STALE_MS)
                .await
                .unwrap()
        }
    };
    let t = sync(&mut a, 11).await;
    a.set_shared(&t);
    let t = sync(&mut b, 12).await;
    b.set_shared(&t);
    assert_eq!(b.horizon(12), T0 + 600_000, "B sees A's bt lane");
    assert_eq!(a.horizon(12), T0 + 35_000_000, "A has not merged B's yet");
    let t = sync(&mut a, 13).await;
    a.set_shared(&t);
    assert_eq!(a.horizon(13), T0 + 600_000, "A waits for B's partition");
    // B catches up; A knows at its next merge.
    b.observe_at(1, &wm_event("kpn", 34_000), 300_000, 20);
    let t = sync(&mut b, 20).await;
    b.set_shared(&t);
    let t = sync(&mut a, 21).await;
    a.set_shared(&t);
    assert_eq!(a.horizon(21), T0 + 34_000_000);
    // A rebalance moves partition 1 to A, which resumes at B's committed
    // position: its own older view of the lane lowers nothing.
    a.observe_at(1, &wm_event("kpn", 33_990), 300_000, 22);
    let t = sync(&mut a, 22).await;
    a.set_shared(&t);
    assert_eq!(a.horizon(22), T0 + 34_000_000);
    // A third partition appears (the topic grew): nothing is pruned until a
    // lane was seen on it.
    a.expect_partitions(3, 23);
    assert_eq!(a.horizon(23), i64::MIN, "partition 2 not seen yet");
    a.observe_at(2, &wm_event("bt", 34_500), 300_000, 24);
    assert_eq!(a.horizon(24), T0 + 34_000_000);
    // A fourth stays empty (no subscriber is keyed to it): after STALE_MS
    // it holds nothing back, like an idle lane.
    let mut idle = a.clone();
    idle.expect_partitions(4, 25);
    assert_eq!(idle.horizon(26), i64::MIN, "partition 3 not seen yet");
    idle.observe_at(0, &wm_event("kpn", 40_000), 300_000, STALE_MS + 25);
    assert_eq!(
        idle.horizon(STALE_MS + 25),
        T0 + 40_000_000,
        "partition 3 idle"
    );
    // A, owning every partition now, moves the horizon on by itself.
    a.observe_at(0, &wm_event("kpn", 40_000), 300_000, STALE_MS + 30);
    a.observe_at(0, &wm_event("bt", 40_000), 300_000, STALE_MS + 30);
    a.observe_at(1, &wm_event("kpn", 40_000), 300_000, STALE_MS + 30);
    a.observe_at(2, &wm_event("bt", 40_000), 300_000, STALE_MS + 30);
    let t = sync(&mut a, STALE_MS + 30).await;
    a.set_shared(&t);
    assert_eq!(a.horizon(STALE_MS + 30), T0 + 40_000_000);
}

/// Seconds from T0 to 10:00 UTC on day `d` after T0's day.
fn ten_am(d: i64) -> i64 {
    // T0 is 22:47 UTC; the next 10:00 UTC is 11h13m later.
    40_380 + 86_400 * d
}

/// `n` high-risk calls from `customer` evenly over the hour from `from_s`,
/// alternating two carriers; returns the burst alerts.
async fn calls_to_east_timor(
    r: &mut Rig,
    customer: &str,
    from_s: i64,
    n: i64,
    over_s: i64,
) -> Vec<pb::Alert> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(
            r.call(
                (i % 2) as usize,
                customer,
                "outbound",
                "+31201234567",
                &format!("+670771234{:02}", i % 100),
                "end",
                from_s + i * over_s / n,
                30.0,
                None,
            )
            .await
            .into_iter()
            .filter(|a| rule(a) == "multi_carrier_burst"),
        );
    }
    out
}

fn baseline_rules() -> RulesConfig {
    let mut rules = RulesConfig::default();
    // Only the baseline adapts the thresholds here.
    rules.multi_carrier_burst.familiar_factor = 1.0;
    rules.multi_carrier_burst.baseline.enabled = true;
    rules
}

#[tokio::test]
async fn a_customers_usual_high_risk_traffic_raises_its_thresholds_and_a_deviation_still_alerts() {
    let mut r = Rig::new(baseline_rules(), "");
    // A call centre: 40 calls an hour to East Timor via two carriers, every
    // day 10:00-11:00 UTC. Without history that is a burst (10 per 15 min
    // against the constants 4/6).
    let first = calls_to_east_timor(&mut r, "kvk:cc", ten_am(0), 40, 3600).await;
    assert!(!first.is_empty(), "no history: the constants apply");
    let ev = first.last().unwrap();
    let th = &ev.evidence.as_ref().unwrap().thresholds;
    assert_eq!(th["baseline"], "no history: consortium defaults", "{th:?}");
    for d in 1..3 {
        calls_to_east_timor(&mut r, "kvk:cc", ten_am(d), 40, 3600).await;
    }
    // From the fourth day its own hour-of-day profile says this is normal.
    for d in 3..8 {
        let a = calls_to_east_timor(&mut r, "kvk:cc", ten_am(d), 40, 3600).await;
        assert!(a.is_empty(), "day {d}: its normal traffic alerted: {a:#?}");
    }
    // After a week, the hour-of-week profile: still normal.
    let a = calls_to_east_timor(&mut r, "kvk:cc", ten_am(8), 40, 3600).await;
    assert!(a.is_empty(), "day 8: {a:#?}");
    // The same traffic at an hour it never calls: nothing normal about it.
    let night = calls_to_east_timor(&mut r, "kvk:cc", ten_am(8) + 12 * 3600, 40, 3600).await;
    assert!(!night.is_empty(), "traffic at an unusual hour must alert");
    // A pump of 60 calls in 15 minutes is far outside its normal.
    let pump = calls_to_east_timor(&mut r, "kvk:cc", ten_am(9), 60, 900).await;
    let crit = pump
        .iter()
        .find(|a| a.severity == pb::Severity::Critical as i32)
        .unwrap_or_else(|| panic!("the pump was missed: {pump:#?}"));
    let th = &crit.evidence.as_ref().unwrap().thresholds;
    assert!(
        th["baseline"].starts_with("hour-of-week profile over 1 week"),
        "{th:?}"
    );
    let expected: f64 = th["expected_calls_in_window"].parse().unwrap();
    assert!((3.0..4.0).contains(&expected), "{th:?}");
    assert!(th["warning_calls"].parse::<i64>().unwrap() > 10, "{th:?}");
}

#[tokio::test]
async fn a_new_customer_falls_back_to_its_peer_group() {
    let policies = "[[policy]]\ncustomer_id = \"kvk:m1\"\npeer_group = \"call_centre\"\n\
        [[policy]]\ncustomer_id = \"kvk:m2\"\npeer_group = \"call_centre\"\n\
        [[policy]]\ncustomer_id = \"kvk:new\"\npeer_group = \"call_centre\"\n";
    let mut r = Rig::new(baseline_rules(), policies);
    for d in 0..4 {
        for m in ["kvk:m1", "kvk:m2"] {
            calls_to_east_timor(&mut r, m, ten_am(d), 40, 3600).await;
        }
    }
    // A member without history of its own doing what its peers do: normal.
    let a = calls_to_east_timor(&mut r, "kvk:new", ten_am(4), 40, 3600).await;
    assert!(a.is_empty(), "peer baseline ignored: {a:#?}");
    // A customer outside the group doing the same: a burst.
    let b = calls_to_east_timor(&mut r, "kvk:loner", ten_am(4), 40, 3600).await;
    assert!(!b.is_empty(), "no peers, no history: the constants apply");
    // Far above the peers' normal: alerted, with the peer basis explained.
    let c = calls_to_east_timor(&mut r, "kvk:new", ten_am(5), 60, 900).await;
    let last = c.last().unwrap_or_else(|| panic!("pump missed"));
    let th = &last.evidence.as_ref().unwrap().thresholds;
    assert!(
        th["baseline"].starts_with("peer group call_centre"),
        "{th:?}"
    );
}

/// Per-event and per-call state is bounded by what can still need it: an
/// event's dedupe markers live `dedupe_ttl_s` (the re-delivery horizon), a
/// call's state `call_ttl_s` while it runs but only the allowed lateness
/// after its end event, and window state `state_ttl_s`.
#[test]
fn markers_live_the_dedupe_ttl_and_an_ended_calls_state_only_the_lateness() {
    let mut rules = RulesConfig::default();
    rules.general.dedupe_ttl_s = 120;
    let g = rules.general.clone();
    let det = Detector::new(rules, Policies::default(), HotList::default()).unwrap();
    let ing = ingestor("kpn");
    let event = |phase: &str, n: u32| {
        let raw = RawRecord {
            provider_id: Some("kpn".into()),
            event_id: Some(format!("e{n}")),
            call_id: Some("c1".into()),
            phase: Some(phase.into()),
            customer_id: Some("kvk:9".into()),
            line_id: Some("kvk:9-line".into()),
            caller: Some("+31201234567".into()),
            callee: Some("+67077123456".into()),
            direction: Some("outbound".into()),
            start_time: Some(rfc3339(T0)),
            duration_s: Some(600.0),
            ..Default::default()
        };
        ing.ingest(&raw, T0 + 3_600_000).unwrap()
    };
    let call_ttls = |plan: &tollguard_core::rules::Plan| -> Vec<i64> {
        plan.updates
            .iter()
            .flat_map(|u| &u.ops)
            .filter_map(|op| match op {
                tollguard_core::store::Op::CallMax { ttl_ms, .. } => Some(*ttl_ms),
                _ => None,
            })
            .collect()
    };
    for (phase, call_ttl) in [
        ("interim", g.call_ttl_s as i64 * 1000),
        ("end", g.allowed_lateness_s as i64 * 1000),
    ] {
        let plan = det.plan_at(&event(phase, 1), i64::MAX);
        assert!(
            plan.updates.len() >= 2,
            "customer and range scopes: {plan:?}"
        );
        for u in &plan.updates {
            assert_eq!(u.dedupe_ttl_ms, 120_000, "{phase}: {u:?}");
            assert!(u.ttl_ms >= g.state_ttl_s as i64 * 1000, "{phase}: {u:?}");
        }
        let ttls = call_ttls(&plan);
        assert!(!ttls.is_empty(), "{phase}: a call key is written");
        assert!(
            ttls.iter().all(|t| *t == call_ttl),
            "{phase}: call keys' TTL {ttls:?}, want {call_ttl}"
        );
    }
    // Out of range is refused, naming the key.
    let mut bad = RulesConfig::default();
    bad.general.dedupe_ttl_s = 10;
    assert_eq!(bad.validate().unwrap_err().key, "general.dedupe_ttl_s");
    bad.general.dedupe_ttl_s = bad.general.state_ttl_s + 1;
    assert_eq!(bad.validate().unwrap_err().key, "general.dedupe_ttl_s");
}

/// Two correlator replicas (two engines on one store): replica A claims a
/// burst's warning and has not confirmed it yet when replica B's events
/// take the burst to critical. B's escalation is not dropped: it waits
/// (unsettled) until A's claim is confirmed, then is published; and if A
/// never confirms, B re-publishes A's alert after the grace period and
/// still escalates.
#[tokio::test]
async fn an_escalation_raised_while_another_replica_claims_the_incident_is_not_lost() {
    for a_confirms in [true, false] {
        let mut rules = RulesConfig::default();
        rules.multi_carrier_burst.critical_calls = 5;
        let mut r = Rig::new(rules, "");
        let a = r.engine.clone();
        let b = r.engine.clone();
        let burst = |al: &[pb::Alert]| {
            al.iter()
                .filter(|x| rule(x) == "multi_carrier_burst")
                .cloned()
                .collect::<Vec<_>>()
        };
        let at = |i: i64| ten_am(0) + i * 60;
        // Three calls settle on A with no burst yet.
        for i in 0..3 {
            let ev = r.burst_call(i, "kvk:pbx", at(i), 30.0);
            let p = a.process(&[ev], &[false], 1_000).await.unwrap();
            assert!(burst(&p.alerts).is_empty(), "{:#?}", p.alerts);
            a.confirm(p).await.unwrap();
        }
        // The fourth: A claims the warning (its publish is in flight).
        let ev = r.burst_call(3, "kvk:pbx", at(3), 30.0);
        let claimed = a.process(&[ev], &[false], 2_000).await.unwrap();
        let opened = burst(&claimed.alerts);
        assert_eq!(opened.len(), 1, "{:#?}", claimed.alerts);
        assert_eq!(opened[0].severity, pb::Severity::Warning as i32);
        // B meanwhile sees the fifth, which makes the burst critical; A's
        // claim is pending, so B publishes no burst alert yet and keeps the
        // finding.
        let ev = r.burst_call(4, "kvk:pbx", at(4), 30.0);
        let held = b.process(&[ev], &[false], 2_100).await.unwrap();
        assert!(burst(&held.alerts).is_empty(), "{:#?}", held.alerts);
        assert_eq!(held.unsettled.len(), 1, "the escalation was dropped");
        let carried = held.unsettled.clone();
        b.confirm(held).await.unwrap();
        let wall = if a_confirms {
            a.confirm(claimed).await.unwrap();
            2_200
        } else {
            // A is gone; past the grace period its claim is B's to publish.
            drop(claimed);
            2_000 + 15_000
        };
        let settled = b.settle(carried, wall).await.unwrap();
        assert!(settled.unsettled.is_empty());
        let got = burst(&settled.alerts);
        let kinds: Vec<i32> = got.iter().map(|x| x.kind).collect();
        let mut want = vec![pb::AlertKind::Escalated as i32];
        if !a_confirms {
            want.insert(0, pb::AlertKind::Opened as i32);
            assert_eq!(got[0], opened[0], "A's alert re-published as claimed");
        }
        assert_eq!(kinds, want, "a_confirms {a_confirms}: {got:#?}");
        let last = got.last().unwrap();
        assert_eq!(last.severity, pb::Severity::Critical as i32);
        assert_eq!(last.incident_id, opened[0].incident_id);
        b.confirm(settled).await.unwrap();
    }
}
