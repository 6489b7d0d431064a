//! Operating the correlator: SIGHUP reloads rules and policies without losing
//! window state, and keeps the running configuration when the new one is bad.

use std::process::Command;
use std::time::Duration;

use tollguard_tests::*;

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
