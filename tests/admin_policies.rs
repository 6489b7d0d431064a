//! The operator sets a customer's policy through the notifier's `Admin`
//! gRPC API; a running correlator applies it on its refresh without a
//! restart. Carriers are refused, invalid policies are refused naming the
//! field, and nothing is stored for a refused call.

#[path = "notifier_support.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use support::{Names, Notifier};
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_core::codec::encode_event;
use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::number::DialPlan;
use tollguard_core::pseudo::{Key, Kind, Pseudonymizer};
use tollguard_core::record::RawRecord;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::admin_client::AdminClient;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings, consume_all};
use tollguard_tests::*;
use tonic::{Code, Request};

const OPERATOR: &str = "tok-operator-0123456789abcdef";
const KPN: &str = "tok-kpn-0123456789abcdef";

fn req<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("x-tollguard-identity", token.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sets_a_policy_and_running_correlators_apply_it() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = key_file(dir.path());
    let key = Key::from_text("k1", &std::fs::read_to_string(&keyfile).unwrap()).unwrap();
    let customer = key.token(Kind::Customer, "kvk:7700").compact();
    let names = Names::new("admin");
    let (calls, alerts) = (format!("tgtest.{}.calls", names.id), names.alerts.clone());
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!("\"{OPERATOR}\" = \"operator\"\n\"{KPN}\" = \"kpn\"\n"),
    )
    .unwrap();
    let notifier = Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[("TOLLGUARD__API__TOKENS_FILE", tokens.display().to_string())],
    )
    .await;
    let http = free_port();
    let correlator = Proc::spawn(
        dir.path(),
        "correlator",
        &bin("tollguard-correlator"),
        &[],
        &[
            ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
            (
                "TOLLGUARD__LISTEN__HTTP".into(),
                format!("127.0.0.1:{http}"),
            ),
            ("TOLLGUARD__REDIS__URL".into(), redis()),
            // The notifier's prefix: one shared store.
            ("TOLLGUARD__REDIS__KEY_PREFIX".into(), names.prefix.clone()),
            ("TOLLGUARD__TOPICS__CALLS".into(), calls.clone()),
            ("TOLLGUARD__TOPICS__ALERTS".into(), alerts.clone()),
            (
                "TOLLGUARD__GROUP".into(),
                format!("{}-correlator", names.id),
            ),
            ("TOLLGUARD__HOT_LIST_REFRESH_S".into(), "1".into()),
        ],
    );
    wait_ready(&correlator, http, Duration::from_secs(60)).await;
    let mut c = AdminClient::connect(notifier.endpoint()).await.unwrap();
    let policy = pb::CustomerPolicy {
        customer_token: customer.clone(),
        blocked_ranges: vec!["+670".into()],
        channels: Some(8),
        label: Some("asked to block East Timor".into()),
        ..Default::default()
    };

    // Refusals first: nothing may be stored by them.
    let e = c
        .set_policy(Request::new(pb::SetPolicyRequest {
            policy: Some(policy.clone()),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = c
        .set_policy(req(
            pb::SetPolicyRequest {
                policy: Some(policy.clone()),
            },
            KPN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let bad = pb::CustomerPolicy {
        channels: Some(-3),
        ..policy.clone()
    };
    let e = c
        .set_policy(req(pb::SetPolicyRequest { policy: Some(bad) }, OPERATOR))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with("policy.channels:"), "{e}");
    let bad = pb::CustomerPolicy {
        blocked_ranges: vec!["670".into()],
        ..policy.clone()
    };
    let e = c
        .set_policy(req(pb::SetPolicyRequest { policy: Some(bad) }, OPERATOR))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with("policy.blocked_ranges"), "{e}");
    let e = c
        .set_policy(req(
            pb::SetPolicyRequest {
                policy: Some(pb::CustomerPolicy {
                    customer_token: "kvk:7700".into(),
                    ..policy.clone()
                }),
            },
            OPERATOR,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("customer_token"), "{e}");
    let listed = c
        .list_policies(req(pb::ListPoliciesRequest {}, OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.policies.is_empty(),
        "a refused call stored something"
    );
    let e = c
        .list_policies(req(pb::ListPoliciesRequest {}, KPN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The operator sets it.
    let set = c
        .set_policy(req(
            pb::SetPolicyRequest {
                policy: Some(policy.clone()),
            },
            OPERATOR,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.revision, 1);
    let listed = c
        .list_policies(req(pb::ListPoliciesRequest {}, OPERATOR))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.policies, vec![policy.clone()]);
    assert_eq!(listed.revision, 1);

    // Past one refresh, the customer calls East Timor.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ing = Ingestor::new(
        "kpn",
        DialPlan::new("NL"),
        2,
        Pseudonymizer::new(key),
        Arc::new(ReferenceData::default()),
    )
    .unwrap();
    let raw = RawRecord {
        provider_id: Some("kpn".into()),
        event_id: Some("adm-1".into()),
        call_id: Some("adm-1".into()),
        phase: Some("start".into()),
        customer_id: Some("kvk:7700".into()),
        line_id: Some("l1".into()),
        caller: Some("+31201234567".into()),
        callee: Some("+67077123456".into()),
        direction: Some("outbound".into()),
        start_time: Some("2026-11-01T10:00:00Z".into()),
        ..Default::default()
    };
    let ev = ing.ingest(&raw, 1_800_000_000_000).unwrap();
    let bus = KafkaBus::new(KafkaSettings::new(kafka())).unwrap();
    bus.publish(vec![OutRecord {
        topic: calls,
        key: ev.subject().compact().into_bytes(),
        payload: encode_event(&ev),
        headers: vec![],
    }])
    .await
    .unwrap();
    let found = wait_for(
        "the blocked_destination alert",
        Duration::from_secs(30),
        || {
            let topic = alerts.clone();
            async move {
                let recs = consume_all(&kafka(), &topic, Duration::from_secs(5))
                    .await
                    .ok()?;
                recs.iter()
                    .map(|r| pb::Alert::decode(r.payload.as_slice()).unwrap())
                    .find(|a| a.rule == pb::Rule::BlockedDestination as i32)
            }
        },
    )
    .await;
    assert_eq!(found.subject.unwrap().country, "TL");
    assert!(
        correlator
            .log_text()
            .contains("operator policy overlay applied"),
        "{}",
        correlator.log_text()
    );

    // Deleting it: gone from the list; deleting again is NOT_FOUND.
    let del = c
        .delete_policy(req(
            pb::DeletePolicyRequest {
                customer_token: customer.clone(),
            },
            OPERATOR,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.revision, 2);
    let e = c
        .delete_policy(req(
            pb::DeletePolicyRequest {
                customer_token: customer,
            },
            OPERATOR,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}
