//! The partner `Alerts` gRPC API of the real notifier binary, against the
//! real broker and Redis: `Watch` in order, resumable from a cursor on
//! another replica with no gap and no duplicate, scoped to the caller; a
//! slow subscriber disconnected with RESOURCE_EXHAUSTED while another keeps
//! receiving; `List`, `Acknowledge` and `Resolve` (the hot list), and the
//! refusals: UNAUTHENTICATED, NOT_FOUND, INVALID_ARGUMENT,
//! FAILED_PRECONDITION.

#[path = "notifier_support.rs"]
mod support;

#[path = "../services/cli/src/audit.rs"]
mod audit;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use support::*;
use tollguard_core::store::WindowStore;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::alerts_client::AlertsClient;
use tollguard_runtime::redis_store::RedisStore;
use tollguard_tests::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Streaming};

const KPN: &str = "tok-kpn-0123456789abcdef";
const BT: &str = "tok-bt-0123456789abcdef";
const OPERATOR: &str = "tok-operator-0123456789abcdef";
const KPN_CUSTOMER: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BT_CUSTOMER: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// `api.tokens_file` with the three identities, written to `dir`.
fn tokens(dir: &std::path::Path) -> (&'static str, String) {
    let p = dir.join("tokens.toml");
    std::fs::write(
        &p,
        format!("\"{KPN}\" = \"kpn\"\n\"{BT}\" = \"bt\"\n\"{OPERATOR}\" = \"operator\"\n"),
    )
    .unwrap();
    ("TOLLGUARD__API__TOKENS_FILE", p.display().to_string())
}

fn req<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("x-tollguard-identity", token.parse().unwrap());
    r
}

async fn client(n: &Notifier) -> AlertsClient<Channel> {
    AlertsClient::connect(n.endpoint()).await.unwrap()
}

async fn watch(
    c: &mut AlertsClient<Channel>,
    token: &str,
    cursor: &str,
) -> Streaming<pb::AlertEnvelope> {
    c.watch(req(
        pb::WatchRequest {
            cursor: cursor.into(),
            min_severity: 0,
            from_beginning: cursor.is_empty(),
        },
        token,
    ))
    .await
    .unwrap()
    .into_inner()
}

async fn next(s: &mut Streaming<pb::AlertEnvelope>, within: Duration) -> Option<pb::AlertEnvelope> {
    match tokio::time::timeout(within, s.message()).await {
        Ok(Ok(Some(e))) => Some(e),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => panic!("stream error: {e}"),
        Err(_) => None,
    }
}

/// Incidents A0..A5 (even: kpn and bt, two versions; odd: bt only, about
/// bt's own customer).
fn batch(prefix: &str) -> Vec<pb::Alert> {
    let mut out = Vec::new();
    for i in 0..6 {
        let id = format!("inc-{prefix}{i}");
        if i % 2 == 0 {
            out.push(alert(
                &id,
                1,
                pb::Severity::Warning,
                &["kpn", "bt"],
                KPN_CUSTOMER,
            ));
            out.push(alert(
                &id,
                2,
                pb::Severity::Critical,
                &["kpn", "bt"],
                KPN_CUSTOMER,
            ));
        } else {
            out.push(alert(&id, 1, pb::Severity::Critical, &["bt"], BT_CUSTOMER));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_on_another_replica_without_gaps_or_duplicates_and_is_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("nwatch");
    create_topic(&names.alerts, 3).await;
    let n1 = Notifier::start(dir.path(), "notifier-1", &names, &[tokens(dir.path())]).await;
    let n2 = Notifier::start(dir.path(), "notifier-2", &names, &[tokens(dir.path())]).await;
    publish(&names.alerts, &batch("a")).await;

    // kpn reads part of the stream from replica 1, then disconnects.
    let mut c1 = client(&n1).await;
    let mut s = watch(&mut c1, KPN, "").await;
    let mut got: Vec<pb::AlertEnvelope> = Vec::new();
    for _ in 0..4 {
        got.push(
            next(&mut s, Duration::from_secs(30))
                .await
                .expect("an envelope"),
        );
    }
    drop(s);
    let cursor = got.last().unwrap().cursor.clone();
    publish(&names.alerts, &batch("b")).await;

    // It resumes on replica 2 from its last cursor.
    let mut c2 = client(&n2).await;
    let mut s = watch(&mut c2, KPN, &cursor).await;
    while got.len() < 12 {
        match next(&mut s, Duration::from_secs(30)).await {
            Some(e) => got.push(e),
            None => break,
        }
    }
    assert!(
        next(&mut s, Duration::from_secs(2)).await.is_none(),
        "nothing beyond the visible alerts"
    );
    let seen: Vec<(String, u32)> = got
        .iter()
        .map(|e| {
            let a = e.alert.as_ref().unwrap();
            (a.incident_id.clone(), a.version)
        })
        .collect();
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "duplicates: {seen:?}");
    let expected: BTreeSet<(String, u32)> = ["a", "b"]
        .iter()
        .flat_map(|p| {
            [0, 2, 4]
                .iter()
                .flat_map(move |i| [(format!("inc-{p}{i}"), 1), (format!("inc-{p}{i}"), 2)])
        })
        .collect();
    assert_eq!(unique, expected, "gaps or foreign incidents");
    // In order: per incident (one partition each) versions ascend.
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    for (id, v) in &seen {
        assert!(last.get(id).is_none_or(|p| p < v), "out of order: {seen:?}");
        last.insert(id.clone(), *v);
    }
    // Scoping: kpn never sees bt's customers, names, or bt-only incidents.
    for e in &got {
        let a = e.alert.as_ref().unwrap();
        assert_eq!(a.providers, ["kpn", "other carriers (1)"]);
        let text = format!("{a:?}");
        assert!(!text.contains(BT_CUSTOMER), "{text}");
        assert!(!text.contains("\"bt\""), "{text}");
        let ev = a.evidence.as_ref().unwrap();
        assert_eq!(
            ev.carriers
                .iter()
                .map(|c| c.provider_id.as_str())
                .collect::<Vec<_>>(),
            ["kpn", "other carriers (1)"]
        );
    }
    // bt and the operator see everything of theirs.
    let mut s = watch(&mut c1, OPERATOR, "").await;
    let mut n_op = 0;
    while next(&mut s, Duration::from_secs(5)).await.is_some() {
        n_op += 1;
    }
    assert_eq!(n_op, 18);
    let mut s = watch(&mut c2, BT, "").await;
    let first = next(&mut s, Duration::from_secs(30)).await.unwrap();
    assert!(first.alert.unwrap().providers.contains(&"bt".to_string()));

    // Bad cursors and missing credentials.
    let e = c1
        .watch(req(
            pb::WatchRequest {
                cursor: "garbage".into(),
                ..Default::default()
            },
            KPN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c1
        .watch(Request::new(pb::WatchRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(metric(n1.http, "tollguard_notifier_watch_subscribers").await >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_is_disconnected_while_another_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("nslow");
    create_topic(&names.alerts, 1).await;
    let n = Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[
            tokens(dir.path()),
            ("TOLLGUARD__API__WATCH_BUFFER", "8".into()),
            ("TOLLGUARD__API__WATCH_STALL_MS", "1000".into()),
        ],
    )
    .await;
    // The slow client reads with a small HTTP/2 window and then stops.
    let slow_channel = Endpoint::from_shared(n.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(64 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow_client = AlertsClient::new(slow_channel);
    let mut slow = watch(&mut slow_client, OPERATOR, "").await;
    let mut fast_client = client(&n).await;
    let mut fast = watch(&mut fast_client, OPERATOR, "").await;
    let total = 400;
    let padding = "x".repeat(4_000);
    let alerts: Vec<pb::Alert> = (0..total)
        .map(|i| {
            let mut a = alert(
                &format!("inc-{i:04}"),
                1,
                pb::Severity::Critical,
                &["kpn"],
                KPN_CUSTOMER,
            );
            a.summary = format!("{i} {padding}");
            a
        })
        .collect();
    publish(&names.alerts, &alerts).await;
    // The fast subscriber gets everything, in order.
    let mut ids = Vec::new();
    while ids.len() < total {
        match next(&mut fast, Duration::from_secs(30)).await {
            Some(e) => ids.push(e.alert.unwrap().incident_id),
            None => break,
        }
    }
    let want: Vec<String> = (0..total).map(|i| format!("inc-{i:04}")).collect();
    assert_eq!(ids, want);
    // The slow one, whose buffer stayed full, is cut off (the fast stream
    // is still open): the subscriber gauge drops to 1.
    let port = n.http;
    wait_for(
        "the slow subscriber to be cut off",
        Duration::from_secs(30),
        || async move {
            (metric(port, "tollguard_notifier_watch_subscribers").await == 1.0).then_some(())
        },
    )
    .await;
    // It gets RESOURCE_EXHAUSTED after what it could hold, and can resume
    // from its last cursor.
    let mut slow_got: Vec<pb::AlertEnvelope> = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.message()).await {
            Ok(Ok(Some(e))) => slow_got.push(e),
            Ok(Ok(None)) => panic!("the slow stream ended without an error"),
            Ok(Err(s)) => break s,
            Err(_) => panic!(
                "the slow stream neither delivered nor failed after {} envelopes: {}",
                slow_got.len(),
                n.proc
                    .log_text()
                    .lines()
                    .filter(|l| l.contains("watch"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("resume from your last cursor"),
        "{status}"
    );
    assert!(slow_got.len() < total, "{}", slow_got.len());
    let mut rest = watch(
        &mut slow_client,
        OPERATOR,
        &slow_got
            .last()
            .map(|e| e.cursor.clone())
            .unwrap_or_else(|| "c1:0.0".into()),
    )
    .await;
    let mut all: Vec<String> = slow_got
        .iter()
        .map(|e| e.alert.as_ref().unwrap().incident_id.clone())
        .collect();
    while all.len() < total {
        match next(&mut rest, Duration::from_secs(30)).await {
            Some(e) => all.push(e.alert.unwrap().incident_id),
            None => break,
        }
    }
    assert_eq!(all, want, "resumed without gaps or duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_acknowledge_and_resolve_are_scoped_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("nlist");
    create_topic(&names.alerts, 3).await;
    let n = Notifier::start(dir.path(), "notifier", &names, &[tokens(dir.path())]).await;
    let mut x = alert(
        "inc-x",
        1,
        pb::Severity::Critical,
        &["kpn", "bt"],
        KPN_CUSTOMER,
    );
    x.subject.as_mut().unwrap().number = Some(pb::Token {
        key_id: "k1".into(),
        value: "cccccccccccccccccccccccccccccccc".into(),
    });
    let y = alert("inc-y", 1, pb::Severity::Critical, &["bt"], BT_CUSTOMER);
    let mut z = alert("inc-z", 1, pb::Severity::Warning, &["kpn"], KPN_CUSTOMER);
    z.rule = pb::Rule::SpendCap as i32;
    publish(&names.alerts, &[x, y, z]).await;
    let mut c = client(&n).await;

    // Unauthenticated calls.
    let e = c
        .list(Request::new(pb::ListRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .list(req(
            pb::ListRequest::default(),
            "tok-nobody-0123456789abcdef",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .acknowledge(Request::new(pb::AcknowledgeRequest {
            incident_id: "inc-x".into(),
            note: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let lc = c.clone();
    let list = move |token: &'static str, r: pb::ListRequest| {
        let mut c = lc.clone();
        async move { c.list(req(r, token)).await.unwrap().into_inner() }
    };
    let ids = |l: &pb::ListResponse| -> Vec<String> {
        l.incidents
            .iter()
            .map(|i| i.latest.as_ref().unwrap().incident_id.clone())
            .collect()
    };
    wait_for("three incidents", Duration::from_secs(60), || async {
        (list(OPERATOR, pb::ListRequest::default())
            .await
            .incidents
            .len()
            == 3)
            .then_some(())
    })
    .await;
    let mut kpn = ids(&list(KPN, pb::ListRequest::default()).await);
    kpn.sort();
    assert_eq!(kpn, ["inc-x", "inc-z"]);
    let l = list(
        KPN,
        pb::ListRequest {
            min_severity: pb::Severity::Critical as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&l), ["inc-x"]);
    let latest = l.incidents[0].latest.as_ref().unwrap();
    assert_eq!(latest.providers, ["kpn", "other carriers (1)"]);
    assert_eq!(l.incidents[0].state, pb::IncidentState::Open as i32);
    let l = list(
        KPN,
        pb::ListRequest {
            rules: vec![pb::Rule::SpendCap as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&l), ["inc-z"]);
    // Paging: 2 + 1, no duplicates.
    let p1 = list(
        OPERATOR,
        pb::ListRequest {
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(p1.incidents.len(), 2);
    assert!(!p1.next_page_token.is_empty());
    let p2 = list(
        OPERATOR,
        pb::ListRequest {
            page_size: 2,
            page_token: p1.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(p2.incidents.len(), 1);
    assert!(p2.next_page_token.is_empty());
    let mut all = ids(&p1);
    all.extend(ids(&p2));
    all.sort();
    assert_eq!(all, ["inc-x", "inc-y", "inc-z"]);

    // Acknowledge: unknown and invisible incidents are NOT_FOUND.
    for (id, token) in [("inc-nope", KPN), ("inc-y", KPN), ("inc-nope", OPERATOR)] {
        let e = c
            .acknowledge(req(
                pb::AcknowledgeRequest {
                    incident_id: id.into(),
                    note: String::new(),
                },
                token,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}: {e}");
    }
    let e = c
        .acknowledge(req(
            pb::AcknowledgeRequest {
                incident_id: "inc-x".into(),
                note: "n".repeat(1001),
            },
            KPN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let acked = c
        .acknowledge(req(
            pb::AcknowledgeRequest {
                incident_id: "inc-x".into(),
                note: "blocking +670 77 for the customer".into(),
            },
            KPN,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    assert_eq!(acked.state, pb::IncidentState::Acknowledged as i32);
    assert_eq!(acked.acknowledgements.len(), 1);
    assert_eq!(acked.acknowledgements[0].by, "kpn");
    assert!(acked.acknowledgements[0].at.is_some());
    assert_eq!(ids(&list(KPN, pb::ListRequest::default()).await), ["inc-z"]);
    let mut with_closed = ids(&list(
        KPN,
        pb::ListRequest {
            include_closed: true,
            ..Default::default()
        },
    )
    .await);
    with_closed.sort();
    assert_eq!(with_closed, ["inc-x", "inc-z"]);

    // Resolve as confirmed fraud: the range and number join the hot list.
    let e = c
        .resolve(req(
            pb::ResolveRequest {
                incident_id: "inc-x".into(),
                resolution: 0,
                note: String::new(),
            },
            OPERATOR,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let resolved = c
        .resolve(req(
            pb::ResolveRequest {
                incident_id: "inc-x".into(),
                resolution: pb::Resolution::ConfirmedFraud as i32,
                note: "customer confirmed the PBX was hacked".into(),
            },
            OPERATOR,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    assert_eq!(resolved.state, pb::IncidentState::ConfirmedFraud as i32);
    assert_eq!(resolved.resolved_by, "operator");
    assert_eq!(resolved.resolution, pb::Resolution::ConfirmedFraud as i32);
    let store = RedisStore::connect(&redis(), &names.prefix).await.unwrap();
    let hot = store.set_members("hot").await.unwrap();
    assert!(hot.contains(&"range:+67077".to_string()), "{hot:?}");
    assert!(
        hot.contains(&"number:cccccccccccccccccccccccccccccccc".to_string()),
        "{hot:?}"
    );
    let e = c
        .resolve(req(
            pb::ResolveRequest {
                incident_id: "inc-x".into(),
                resolution: pb::Resolution::FalsePositive as i32,
                note: String::new(),
            },
            KPN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = c
        .resolve(req(
            pb::ResolveRequest {
                incident_id: "inc-y".into(),
                resolution: pb::Resolution::FalsePositive as i32,
                note: String::new(),
            },
            KPN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let fp = c
        .resolve(req(
            pb::ResolveRequest {
                incident_id: "inc-z".into(),
                resolution: pb::Resolution::FalsePositive as i32,
                note: "month-end batch".into(),
            },
            KPN,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap();
    assert_eq!(fp.state, pb::IncidentState::FalsePositive as i32);

    // The ledger records who acknowledged and resolved, and verifies.
    let mut out = Vec::new();
    let code = audit::run(
        &audit::AuditCmd::Show {
            incident: "inc-x".into(),
            kafka: kafka(),
            topic: names.deliveries.clone(),
            timeout_s: 60,
        },
        &mut out,
    )
    .await
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kpn acknowledged: \"blocking +670 77 for the customer\""),
        "{out}"
    );
    assert!(
        out.contains("operator resolved: \"confirmed_fraud: customer confirmed"),
        "{out}"
    );
    let mut out = Vec::new();
    let code = audit::run(
        &audit::AuditCmd::Verify {
            kafka: kafka(),
            topic: names.deliveries.clone(),
            timeout_s: 60,
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out));
}
