//! Webhook fan-out against real HTTP receivers, the real broker and Redis:
//! signatures and timestamps verified by the receiver; a flaky receiver gets
//! the notification exactly once after retries; permanently failing ones end
//! in the dead-letter topic with their attempt history; a slow endpoint does
//! not delay another; private targets are refused at delivery time; every
//! attempt is in the hash-chained ledger, which `tollguard audit verify`
//! accepts intact and rejects, naming the record, when one record is altered
//! or removed.

#[path = "notifier_support.rs"]
mod support;

#[path = "../services/cli/src/audit.rs"]
mod audit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use support::*;
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_core::store::WindowStore;
use tollguard_notifier::config::{RetrySettings, ThrottleSettings, parse_contacts};
use tollguard_notifier::dispatch::{DispatchSettings, Fanout, FanoutDeps};
use tollguard_notifier::incidents::Incidents;
use tollguard_notifier::ledger::Ledger;
use tollguard_notifier::metrics::Metrics;
use tollguard_notifier::ssrf::Guard;
use tollguard_notifier::webhook::WebhookClient;
use tollguard_proto::v1 as pb;
use tollguard_runtime::redis_store::RedisStore;
use tollguard_tests::*;

fn webhook(provider: &str, rx: &Receiver, conc: usize) -> String {
    format!(
        "[[carriers]]\nprovider_id = \"{provider}\"\n[[carriers.webhooks]]\nurl = \"{}\"\nsecret = \"{SECRET}\"\nmax_concurrency = {conc}\n\n",
        rx.url()
    )
}

fn statuses(recs: &[(i32, i64, pb::DeliveryRecord)], incident: &str) -> Vec<pb::DeliveryStatus> {
    recs.iter()
        .filter(|(_, _, r)| r.incident_id == incident)
        .map(|(_, _, r)| pb::DeliveryStatus::try_from(r.status).unwrap())
        .collect()
}

async fn audit_run(cmd: audit::AuditCmd) -> (i32, String) {
    let mut out = Vec::new();
    let code = audit::run(&cmd, &mut out).await.unwrap();
    (code, String::from_utf8(out).unwrap())
}

fn verify_cmd(topic: &str) -> audit::AuditCmd {
    audit::AuditCmd::Verify {
        kafka: kafka(),
        topic: topic.to_string(),
        timeout_s: 60,
    }
}

/// Copies `recs` to a new one-partition topic, applying `f` to each record
/// (None drops it); returns the topic.
async fn tampered_copy(
    recs: &[(i32, i64, pb::DeliveryRecord)],
    f: impl Fn(&pb::DeliveryRecord) -> Option<pb::DeliveryRecord>,
) -> String {
    let topic = format!("tgtest.{}.tampered", unique("audit"));
    create_topic(&topic, 1).await;
    let out: Vec<OutRecord> = recs
        .iter()
        .filter_map(|(_, _, r)| f(r))
        .map(|r| OutRecord {
            topic: topic.clone(),
            key: r.incident_id.as_bytes().to_vec(),
            payload: r.encode_to_vec(),
            headers: vec![],
        })
        .collect();
    bus().publish(out).await.unwrap();
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_are_signed_retried_dead_lettered_isolated_and_ledgered() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("nwh");
    create_topic(&names.alerts, 3).await;
    let flaky = Receiver::start(Behaviour::FailFirst(2, 503)).await;
    let broken = Receiver::start(Behaviour::Always(503)).await;
    let gone = Receiver::start(Behaviour::Always(410)).await;
    let slow = Receiver::start(Behaviour::Slow(Duration::from_secs(6))).await;
    let fast = Receiver::start(Behaviour::Ok).await;
    let text = [
        webhook("kpn", &flaky, 4),
        webhook("bt", &broken, 4),
        webhook("telfort", &gone, 4),
        webhook("odido", &slow, 1),
        webhook("vodafone", &fast, 4),
    ]
    .concat();
    let cfile = contacts(dir.path(), &text);
    let n = Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[("TOLLGUARD__CONTACTS_FILE", cfile.display().to_string())],
    )
    .await;
    let cust = "00112233445566778899aabbccddeeff";
    let crit = pb::Severity::Critical;
    publish(
        &names.alerts,
        &[
            alert("inc-flaky", 1, crit, &["kpn", "bt"], cust),
            alert("inc-gone", 1, crit, &["telfort"], cust),
            alert("inc-slow-1", 1, crit, &["odido"], cust),
            alert("inc-slow-2", 1, crit, &["odido"], cust),
        ],
    )
    .await;
    // A slow endpoint (one request at a time, 6 s each, two queued) does not
    // delay another endpoint's delivery.
    wait_for(
        "the slow receiver to be busy",
        Duration::from_secs(30),
        || {
            let slow = slow.clone();
            async move { (!slow.received().is_empty()).then_some(()) }
        },
    )
    .await;
    let t0 = Instant::now();
    publish(
        &names.alerts,
        &[alert("inc-fast", 1, crit, &["vodafone"], cust)],
    )
    .await;
    wait_for("the fast receiver", Duration::from_secs(10), || {
        let fast = fast.clone();
        async move { (!fast.for_incident("inc-fast").is_empty()).then_some(()) }
    })
    .await;
    let fast_took = t0.elapsed();
    let slow_done = slow.received().iter().filter(|r| r.finished).count();
    assert!(
        fast_took < Duration::from_secs(4),
        "the fast endpoint waited {fast_took:?}"
    );
    assert_eq!(
        slow_done, 0,
        "the slow endpoint must still be pending when the fast one got its notification"
    );
    assert_eq!(
        slow.received().len(),
        1,
        "max_concurrency = 1: one request at a time"
    );

    // The flaky receiver: two 503s, then exactly one delivery.
    let got = wait_for(
        "the flaky receiver's success",
        Duration::from_secs(30),
        || {
            let flaky = flaky.clone();
            async move {
                let r = flaky.for_incident("inc-flaky");
                r.iter().any(|x| x.status == 200).then_some(r)
            }
        },
    )
    .await;
    let codes: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(codes, [503, 503, 200]);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.signature_ok, Ok(()), "signature of attempt {}", i + 1);
        assert_eq!(r.headers["tollguard-attempt"], (i + 1).to_string());
        assert_eq!(
            r.headers["tollguard-delivery"],
            got[0].headers["tollguard-delivery"]
        );
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // A tampered body or a stale timestamp does not verify.
    let sig = &got[2].headers["tollguard-signature"];
    assert!(
        tollguard_notifier::webhook::verify_signature(
            SECRET.as_bytes(),
            sig,
            b"{}",
            chrono_now(),
            Duration::from_secs(300)
        )
        .is_err()
    );
    assert!(
        tollguard_notifier::webhook::verify_signature(
            SECRET.as_bytes(),
            sig,
            got[2].body.as_bytes(),
            chrono_now() + 3600,
            Duration::from_secs(300)
        )
        .is_err()
    );
    // kpn's view: its own figures, bt as an anonymous aggregate.
    let body: serde_json::Value = serde_json::from_str(&got[2].body).unwrap();
    assert_eq!(body["incident_id"], "inc-flaky");
    assert_eq!(body["audience"], "carrier:kpn");
    assert_eq!(
        body["providers"],
        serde_json::json!(["kpn", "other carriers (1)"])
    );
    assert!(!got[2].body.contains("\"bt\""), "{}", got[2].body);
    // No second delivery turns up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(flaky.for_incident("inc-flaky").len(), 3);

    // bt (always 503) and telfort (410) end in the DLQ with their history.
    let dlq = wait_for("two dead letters", Duration::from_secs(60), || {
        let t = names.dlq.clone();
        async move {
            let d = dead_letters(&t).await;
            (d.len() >= 2).then_some(d)
        }
    })
    .await;
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    let bt = dlq.iter().find(|d| d.audience == "carrier:bt").unwrap();
    assert_eq!(bt.incident_id, "inc-flaky");
    assert_eq!(bt.target, broken.url());
    assert_eq!(bt.attempts.len(), 4);
    assert!(bt.attempts.iter().all(|a| a.response_code == 503));
    assert_eq!(
        bt.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(
        bt.reason.contains("giving up after 4 attempts"),
        "{}",
        bt.reason
    );
    assert!(bt.body.contains("inc-flaky"));
    assert_eq!(broken.received().len(), 4);
    let tf = dlq
        .iter()
        .find(|d| d.audience == "carrier:telfort")
        .unwrap();
    assert_eq!(tf.attempts.len(), 1, "410 is permanent: no retry");
    assert_eq!(tf.attempts[0].response_code, 410);
    assert_eq!(tf.attempts[0].status, pb::DeliveryStatus::Failed as i32);
    assert!(metric(n.http, "tollguard_notifier_dead_letters_total").await >= 2.0);

    // Every attempt and outcome is in the ledger, hash-chained.
    let recs = wait_for("the ledger", Duration::from_secs(60), || {
        let t = names.deliveries.clone();
        async move {
            let r = ledger(&t).await;
            let done = r
                .iter()
                .filter(|(_, _, x)| x.status == pb::DeliveryStatus::DeadLettered as i32)
                .count()
                >= 2
                && r.iter()
                    .filter(|(_, _, x)| x.status == pb::DeliveryStatus::Delivered as i32)
                    .count()
                    >= 2;
            done.then_some(r)
        }
    })
    .await;
    use pb::DeliveryStatus as S;
    let flaky_recs: Vec<&pb::DeliveryRecord> = recs
        .iter()
        .map(|(_, _, r)| r)
        .filter(|r| r.incident_id == "inc-flaky" && r.audience == "carrier:kpn")
        .collect();
    assert_eq!(
        flaky_recs.iter().map(|r| r.status).collect::<Vec<_>>(),
        [S::Retrying as i32, S::Retrying as i32, S::Delivered as i32]
    );
    assert!(
        flaky_recs
            .iter()
            .all(|r| r.target == "127.0.0.1" && r.channel == pb::DeliveryChannel::Webhook as i32)
    );
    assert_eq!(statuses(&recs, "inc-gone"), [S::Failed, S::DeadLettered]);
    let inc_flaky: Vec<u64> = recs
        .iter()
        .filter(|(_, _, r)| r.incident_id == "inc-flaky")
        .map(|(_, _, r)| r.seq)
        .collect();
    assert_eq!(inc_flaky, (1..=inc_flaky.len() as u64).collect::<Vec<_>>());

    // audit verify: intact.
    let (code, out) = audit_run(verify_cmd(&names.deliveries)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK:"), "{out}");
    // audit show: who was warned, how, with what outcome.
    let (code, out) = audit_run(audit::AuditCmd::Show {
        incident: "inc-flaky".into(),
        kafka: kafka(),
        topic: names.deliveries.clone(),
        timeout_s: 60,
    })
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("chain intact"), "{out}");
    let kpn_line = out
        .lines()
        .find(|l| l.contains("carrier:kpn"))
        .unwrap_or_default();
    assert!(
        kpn_line.contains("webhook")
            && kpn_line.contains("delivered")
            && kpn_line.contains("after 3 attempt(s)"),
        "{out}"
    );
    let bt_line = out
        .lines()
        .find(|l| l.contains("carrier:bt"))
        .unwrap_or_default();
    assert!(bt_line.contains("dead_lettered"), "{out}");

    // One record altered: named, with its partition/offset.
    let victim = flaky_recs[1].clone();
    let t1 = tampered_copy(&recs, |r| {
        let mut r = r.clone();
        if r.incident_id == victim.incident_id && r.seq == victim.seq {
            r.status = S::Delivered as i32;
        }
        Some(r)
    })
    .await;
    let (code, out) = audit_run(verify_cmd(&t1)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "incident inc-flaky seq {} at {t1}/partition 0 offset",
            victim.seq
        )) && out.contains("altered"),
        "{out}"
    );
    // One record removed: a gap, named.
    let t2 = tampered_copy(&recs, |r| {
        (!(r.incident_id == victim.incident_id && r.seq == victim.seq)).then(|| r.clone())
    })
    .await;
    let (code, out) = audit_run(verify_cmd(&t2)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("incident inc-flaky seq {}", victim.seq + 1))
            && out.contains("missing"),
        "{out}"
    );

    // Dedupe and throttling: an update at the same severity is coalesced,
    // an escalation always goes out, a re-published version is ignored.
    let mut v2 = alert("inc-thr", 2, pb::Severity::Warning, &["vodafone"], cust);
    v2.kind = pb::AlertKind::Updated as i32;
    publish(
        &names.alerts,
        &[
            alert("inc-thr", 1, pb::Severity::Warning, &["vodafone"], cust),
            v2,
            alert("inc-thr", 1, pb::Severity::Warning, &["vodafone"], cust),
            alert("inc-thr", 3, pb::Severity::Critical, &["vodafone"], cust),
        ],
    )
    .await;
    let versions = wait_for("the escalation", Duration::from_secs(30), || {
        let fast = fast.clone();
        async move {
            let v: Vec<u64> = fast
                .for_incident("inc-thr")
                .iter()
                .map(|r| {
                    serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["version"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
            v.contains(&3).then_some(v)
        }
    })
    .await;
    assert_eq!(versions, [1, 3], "v2 coalesced, v1 not repeated");

    // Let the slow endpoint finish; then SIGTERM exits cleanly.
    let mut n = n;
    let code = n.proc.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", n.proc.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_target_is_refused_at_delivery_time() {
    // The routing is built without the load-time check, as if DNS had
    // changed since start-up: the delivery-time check must refuse, without
    // contacting the target.
    let names = Names::new("nssrf");
    let b = Arc::new(bus());
    b.ensure_topics(&[
        (names.deliveries.as_str(), 1, &[]),
        (names.dlq.as_str(), 1, &[]),
    ])
    .await
    .unwrap();
    let store: Arc<dyn WindowStore> =
        Arc::new(RedisStore::connect(&redis(), &names.prefix).await.unwrap());
    let routing = parse_contacts(
        "contacts.toml",
        &format!(
            "[ops]\nwebhooks = [{{url = \"http://10.255.255.1:9/hook\", secret = \"{SECRET}\"}}, {{url = \"http://localhost:9/hook\", secret = \"{SECRET}\"}}]\n"
        ),
        None,
        4,
    )
    .unwrap();
    let guard = Arc::new(Guard::new(true, vec![]));
    let ledger = Ledger::new(
        store.clone(),
        b.clone(),
        &names.deliveries,
        "test",
        3_600_000,
    );
    let fanout = Fanout::new(FanoutDeps {
        routing: Arc::new(routing),
        store: store.clone(),
        bus: b.clone(),
        ledger: ledger.clone(),
        incidents: Incidents::new(store.clone(), 3_600_000),
        webhooks: WebhookClient::new(guard, Duration::from_secs(5), Duration::from_secs(2))
            .unwrap(),
        mailer: None,
        settings: DispatchSettings {
            retry: RetrySettings {
                max_attempts: 3,
                initial_backoff_ms: 10,
                max_backoff_ms: 10,
                horizon_ms: 10_000,
            },
            throttle: ThrottleSettings::default(),
            dlq_topic: names.dlq.clone(),
            max_queue: 10,
            state_ttl_ms: 3_600_000,
            smtp_concurrency: 1,
        },
        metrics: Metrics::default(),
    });
    let a = alert(
        "inc-ssrf",
        1,
        pb::Severity::Critical,
        &["kpn"],
        "00112233445566778899aabbccddeeff",
    );
    let settled = fanout.handle(&a).await.unwrap();
    let ok = tokio::time::timeout(Duration::from_secs(30), settled)
        .await
        .unwrap()
        .unwrap();
    assert!(ok);
    let recs = ledger_of(&names.deliveries).await;
    let refused: Vec<&pb::DeliveryRecord> = recs
        .iter()
        .filter(|r| r.status == pb::DeliveryStatus::Refused as i32)
        .collect();
    assert_eq!(refused.len(), 2, "{recs:?}");
    assert!(
        refused.iter().all(|r| r.attempt == 1),
        "refusals are not retried"
    );
    let private = refused.iter().find(|r| r.target == "10.255.255.1").unwrap();
    assert!(private.error.contains("private"), "{}", private.error);
    let lo = refused.iter().find(|r| r.target == "localhost").unwrap();
    assert!(lo.error.contains("loopback"), "{}", lo.error);
    let dlq = dead_letters(&names.dlq).await;
    assert_eq!(dlq.len(), 2);
    assert!(
        dlq.iter()
            .all(|d| d.reason.contains("refused by the SSRF guard"))
    );
}

async fn ledger_of(topic: &str) -> Vec<pb::DeliveryRecord> {
    ledger(topic).await.into_iter().map(|(_, _, r)| r).collect()
}

/// The outage of the webhook-down test (`TOLLGUARD_TEST_WEBHOOK_OUTAGE_S`,
/// default 60 s; set e.g. 300 for minutes: the retry schedule scales).
fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("TOLLGUARD_TEST_WEBHOOK_OUTAGE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_down_for_minutes_is_served_after_it_returns_and_one_down_past_the_horizon_is_dead_lettered()
 {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("nwdown");
    create_topic(&names.alerts, 1).await;
    // Down for `d`: the first half nothing listens (connection refused),
    // the second half a real HTTP server answers 503; then 200. The other
    // endpoint refuses for the first half, then 503s for ever.
    let d = outage();
    let refuse = d / 2;
    let t0 = Instant::now();
    let back_at = t0 + d;
    let recovering = Receiver::start_down(refuse, Behaviour::FailUntil(back_at, 503)).await;
    let down = Receiver::start_down(refuse, Behaviour::Always(503)).await;
    // Retry schedule matched to the outage: backoff capped at a tenth of
    // it, horizon the outage plus three caps, attempts never the limit.
    let cap = (d / 10).clamp(Duration::from_secs(2), Duration::from_secs(30));
    let horizon = d + 3 * cap;
    let ms = |x: Duration| x.as_millis().to_string();
    let text = [webhook("kpn", &recovering, 1), webhook("bt", &down, 1)].concat();
    let cfile = contacts(dir.path(), &text);
    let n = Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[
            ("TOLLGUARD__CONTACTS_FILE", cfile.display().to_string()),
            ("TOLLGUARD__RETRY__MAX_ATTEMPTS", "100".into()),
            ("TOLLGUARD__RETRY__INITIAL_BACKOFF_MS", "1000".into()),
            ("TOLLGUARD__RETRY__MAX_BACKOFF_MS", ms(cap)),
            ("TOLLGUARD__RETRY__HORIZON_MS", ms(horizon)),
            ("TOLLGUARD__WEBHOOKS__CONNECT_TIMEOUT_MS", "2000".into()),
            ("TOLLGUARD__WEBHOOKS__TIMEOUT_MS", "5000".into()),
        ],
    )
    .await;
    let cust = "00112233445566778899aabbccddeeff";
    publish(
        &names.alerts,
        &[alert(
            "inc-down",
            1,
            pb::Severity::Critical,
            &["kpn", "bt"],
            cust,
        )],
    )
    .await;
    let published = Instant::now();

    // kpn: delivered once, after the endpoint came back, within one backoff
    // cap of it.
    let got = wait_for(
        "the recovering endpoint's delivery",
        d + 2 * cap + Duration::from_secs(30),
        || {
            let r = recovering.clone();
            async move {
                let v = r.for_incident("inc-down");
                v.iter().any(|x| x.status == 200 && x.finished).then_some(v)
            }
        },
    )
    .await;
    let ok: Vec<&Received> = got.iter().filter(|x| x.status == 200).collect();
    assert_eq!(ok.len(), 1, "one delivery");
    assert!(
        ok[0].at >= back_at,
        "delivered before the endpoint was back"
    );
    let delivered_after_back = ok[0].at - back_at;
    assert!(
        delivered_after_back <= cap + Duration::from_secs(5),
        "delivered {delivered_after_back:?} after the endpoint came back (backoff cap {cap:?})"
    );
    let rx_503 = got.iter().filter(|x| x.status == 503).count();
    assert!(rx_503 > 0, "no attempt during the 503 phase: {got:?}");
    let ids: std::collections::BTreeSet<&String> = got
        .iter()
        .map(|x| &x.headers["tollguard-delivery"])
        .collect();
    assert_eq!(ids.len(), 1, "one delivery id over all attempts: {ids:?}");
    assert!(got.iter().all(|x| x.signature_ok.is_ok()));

    // bt: dead-lettered once the next attempt would start past the horizon,
    // with every attempt in its history.
    let dl = wait_for(
        "the dead letter of the endpoint that stays down",
        horizon + Duration::from_secs(60),
        || {
            let t = names.dlq.clone();
            async move {
                let v = dead_letters(&t).await;
                (!v.is_empty()).then_some(v)
            }
        },
    )
    .await;
    let dead_lettered_after = published.elapsed();
    assert_eq!(dl.len(), 1, "{dl:?}");
    let bt = &dl[0];
    assert_eq!(
        (bt.incident_id.as_str(), bt.audience.as_str()),
        ("inc-down", "carrier:bt")
    );
    assert_eq!(bt.target, down.url());
    assert!(bt.reason.contains("retry horizon"), "{}", bt.reason);
    assert_eq!(
        bt.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        (1..=bt.attempts.len() as u32).collect::<Vec<_>>()
    );
    let refused = bt
        .attempts
        .iter()
        .filter(|a| a.response_code == 0 && a.error.contains("connection failed"))
        .count();
    let dl_503 = bt
        .attempts
        .iter()
        .filter(|a| a.response_code == 503)
        .count();
    assert!(refused > 0 && dl_503 > 0, "{:?}", bt.attempts);
    assert_eq!(refused + dl_503, bt.attempts.len(), "{:?}", bt.attempts);
    assert_eq!(
        dl_503,
        down.for_incident("inc-down").len(),
        "the dead letter's 503s are the requests the endpoint saw"
    );
    let first = bt.attempts[0].at.unwrap();
    let last = bt.attempts.last().unwrap().at.unwrap();
    let span_ms =
        (last.seconds - first.seconds) * 1000 + i64::from(last.nanos - first.nanos) / 1_000_000;
    assert!(
        span_ms <= horizon.as_millis() as i64,
        "an attempt started {span_ms} ms after the first (horizon {horizon:?})"
    );
    assert!(metric(n.http, "tollguard_notifier_dead_letters_total").await >= 1.0);

    // The ledger holds every attempt of both; nothing is left unsettled.
    use pb::DeliveryStatus as S;
    let recs = wait_for("the ledger", Duration::from_secs(30), || {
        let t = names.deliveries.clone();
        async move {
            let r = ledger_of(&t).await;
            (r.iter().any(|x| x.status == S::DeadLettered as i32)
                && r.iter().any(|x| x.status == S::Delivered as i32))
            .then_some(r)
        }
    })
    .await;
    let of = |aud: &str| -> Vec<&pb::DeliveryRecord> {
        recs.iter()
            .filter(|r| r.incident_id == "inc-down" && r.audience == aud)
            .collect()
    };
    let kpn = of("carrier:kpn");
    let kpn_attempts = kpn.len();
    assert_eq!(
        kpn.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        (1..=kpn_attempts as u32).collect::<Vec<_>>(),
        "one ledger record per attempt"
    );
    assert_eq!(kpn.last().unwrap().status, S::Delivered as i32);
    assert!(
        kpn[..kpn_attempts - 1]
            .iter()
            .all(|r| r.status == S::Retrying as i32)
    );
    let kpn_refused = kpn.iter().filter(|r| r.response_code == 0).count();
    let kpn_503 = kpn.iter().filter(|r| r.response_code == 503).count();
    assert!(kpn_refused > 0, "no refused connection in the ledger");
    assert_eq!(kpn_503, rx_503, "the ledger's 503s are the endpoint's");
    assert_eq!(kpn_refused + kpn_503 + 1, kpn_attempts);
    let btl = of("carrier:bt");
    assert_eq!(btl.len(), bt.attempts.len() + 1, "attempts + dead letter");
    assert_eq!(btl.last().unwrap().status, S::DeadLettered as i32);
    assert_eq!(
        btl[btl.len() - 2].status,
        S::Failed as i32,
        "the last attempt is marked failed"
    );
    // audit show: every attempt counted, both outcomes, chain intact.
    let (code, out) = audit_run(audit::AuditCmd::Show {
        incident: "inc-down".into(),
        kafka: kafka(),
        topic: names.deliveries.clone(),
        timeout_s: 60,
    })
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("chain intact"), "{out}");
    let line = |aud: &str| {
        out.lines()
            .find(|l| l.contains(aud))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("carrier:kpn").contains("delivered")
            && line("carrier:kpn").contains(&format!("after {kpn_attempts} attempt(s)")),
        "{out}"
    );
    assert!(
        line("carrier:bt").contains("dead_lettered")
            && line("carrier:bt").contains(&format!("after {} attempt(s)", bt.attempts.len())),
        "{out}"
    );
    let (code, out) = audit_run(verify_cmd(&names.deliveries)).await;
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "RELIABILITY webhook-down-{}s: recovering endpoint delivered once {delivered_after_back:?} after it came back, \
         after {kpn_attempts} attempts ({kpn_refused} refused connections, {kpn_503} × 503); endpoint down past the \
         {horizon:?} horizon dead-lettered {dead_lettered_after:?} after publication with {} attempts ({refused} refused, \
         {dl_503} × 503); backoff cap {cap:?}; ledger intact, every attempt in it",
        d.as_secs(),
        bt.attempts.len(),
    );
}
