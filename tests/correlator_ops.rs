//! Operating the correlator: SIGHUP reloads rules and policies without losing
//! window state, and keeps the running configuration when the new one is bad.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tollguard_core::bus::{EventBus, OutRecord};
use tollguard_core::codec::encode_event;
use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::number::DialPlan;
use tollguard_core::pseudo::{Key, Pseudonymizer};
use tollguard_core::record::RawRecord;
use tollguard_core::store::WindowStore;
use tollguard_proto::v1 as pb;
use tollguard_runtime::kafka::{KafkaBus, KafkaSettings, consume_all};
use tollguard_runtime::redis_store::RedisStore;
use tollguard_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_added_to_the_hot_list_is_picked_up_by_running_correlators() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let id = unique("hot");
    let prefix = format!("tgtest:{id}:");
    let (calls, alerts) = (format!("tgtest.{id}.calls"), format!("tgtest.{id}.alerts"));
    let http = free_port();
    let env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{http}"),
        ),
        ("TOLLGUARD__REDIS__URL".into(), redis()),
        ("TOLLGUARD__REDIS__KEY_PREFIX".into(), prefix.clone()),
        ("TOLLGUARD__TOPICS__CALLS".into(), calls.clone()),
        ("TOLLGUARD__TOPICS__ALERTS".into(), alerts.clone()),
        ("TOLLGUARD__GROUP".into(), format!("{id}-correlator")),
        ("TOLLGUARD__HOT_LIST_REFRESH_S".into(), "1".into()),
    ];
    let p = Proc::spawn(
        dir.path(),
        "correlator",
        &bin("tollguard-correlator"),
        &[],
        &env,
    );
    wait_ready(&p, http, Duration::from_secs(60)).await;
    // The operator adds the range with the CLI.
    let st = Command::new(bin("tollguard"))
        .args([
            "hotlist",
            "add",
            "--range",
            "+67571",
            "--redis",
            &redis(),
            "--prefix",
            &prefix,
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let store = RedisStore::connect(&redis(), &prefix).await.unwrap();
    assert_eq!(
        store.set_members("hot").await.unwrap(),
        vec!["range:+67571".to_string()]
    );
    // Wait past one refresh, then a call to that range arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let k = Key::from_text("k1", &std::fs::read_to_string(&key).unwrap()).unwrap();
    let ing = Ingestor::new(
        "kpn",
        DialPlan::new("NL"),
        2,
        Pseudonymizer::new(k),
        Arc::new(ReferenceData::default()),
    )
    .unwrap();
    let raw = RawRecord {
        provider_id: Some("kpn".into()),
        event_id: Some("hot-1".into()),
        call_id: Some("hot-1".into()),
        phase: Some("start".into()),
        customer_id: Some("kvk:1".into()),
        line_id: Some("l1".into()),
        caller: Some("+31201234567".into()),
        callee: Some("+67571234567".into()),
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
    let found = wait_for("the hot_number alert", Duration::from_secs(30), || {
        let topic = alerts.clone();
        async move {
            let recs = consume_all(&kafka(), &topic, Duration::from_secs(5))
                .await
                .ok()?;
            recs.iter()
                .map(|r| pb::Alert::decode(r.payload.as_slice()).unwrap())
                .find(|a| a.rule == pb::Rule::HotNumber as i32)
        }
    })
    .await;
    assert_eq!(found.subject.unwrap().range, "+67571");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies_and_keeps_the_old_ones_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let policies = dir.path().join("policies.toml");
    std::fs::write(
        &policies,
        "[[policy]]\ncustomer_id = \"kvk:1\"\nchannels = 5\n",
    )
    .unwrap();
    let id = unique("ops");
    let http = free_port();
    let env = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{http}"),
        ),
        ("TOLLGUARD__REDIS__URL".into(), redis()),
        (
            "TOLLGUARD__REDIS__KEY_PREFIX".into(),
            format!("tgtest:{id}:"),
        ),
        (
            "TOLLGUARD__TOPICS__CALLS".into(),
            format!("tgtest.{id}.calls"),
        ),
        (
            "TOLLGUARD__TOPICS__ALERTS".into(),
            format!("tgtest.{id}.alerts"),
        ),
        ("TOLLGUARD__GROUP".into(), format!("{id}-correlator")),
        (
            "TOLLGUARD__POLICIES_FILE".into(),
            policies.display().to_string(),
        ),
        ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID".into(), "k1".into()),
        (
            "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE".into(),
            key.display().to_string(),
        ),
    ];
    let mut p = Proc::spawn(
        dir.path(),
        "correlator",
        &bin("tollguard-correlator"),
        &[],
        &env,
    );
    wait_ready(&p, http, Duration::from_secs(60)).await;
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    // A bad policy file: reload refused, the service keeps running and ready.
    std::fs::write(
        &policies,
        "[[policy]]\ncustomer_id = \"kvk:1\"\nchannels = -3\n",
    )
    .unwrap();
    hup(p.child.id());
    let log = wait_for(
        "the failed reload to be logged",
        Duration::from_secs(20),
        || {
            let t = p.log_text();
            async move { t.contains("reload failed").then_some(t) }
        },
    )
    .await;
    assert!(log.contains("policy[0].channels"), "{log}");
    assert!(matches!(http_get(http, "/readyz").await, Some((200, _))));
    // A good one is taken.
    std::fs::write(
        &policies,
        "[[policy]]\ncustomer_id = \"kvk:1\"\nchannels = 7\n",
    )
    .unwrap();
    hup(p.child.id());
    wait_for("the reload", Duration::from_secs(20), || {
        let t = p.log_text();
        async move { t.contains("rules and policies reloaded").then_some(()) }
    })
    .await;
    assert_eq!(p.child.try_wait().unwrap(), None, "still running");
    assert_eq!(p.terminate(Duration::from_secs(30)), Some(0));
}
