//! The whole chain the 2011 case needed and did not have: the scenario sent
//! through every carrier's real ingester, joined by the correlator over the
//! real Kafka broker and Redis, and turned by the notifier into warnings —
//! a signed webhook at each involved carrier, a plain-language e-mail to the
//! customer through the real SMTP sink, a `Watch` event on each involved
//! carrier's stream — within seconds of the incident, and an intact
//! proof-of-warning ledger that `tollguard audit show` explains.

#[path = "pipeline_support.rs"]
mod pipeline;

#[path = "notifier_support.rs"]
mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use pipeline::*;
use support::{Behaviour, Names, Notifier, Receiver, SECRET, mails, wall_ms};
use tollguard_cli::simulate::Preset;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::alerts_client::AlertsClient;
use tollguard_tests::*;
use tonic::Request;

/// Largest accepted delay from the alert's publication to each warning.
const WITHIN_MS: i64 = 10_000;

const VICTIM: &str = "kvk:30123456";

fn token(provider: &str) -> String {
    format!("tok-{provider}-0123456789abcdef")
}

fn req<T>(msg: T, provider: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("x-tollguard-identity", token(provider).parse().unwrap());
    r
}

/// Collects a carrier's `Watch` stream in the background: (wall-clock
/// receive millis, alert).
fn watch(
    endpoint: String,
    provider: &'static str,
) -> std::sync::Arc<std::sync::Mutex<Vec<(i64, pb::Alert)>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut c = AlertsClient::connect(endpoint).await.unwrap();
        let mut s = c
            .watch(req(
                pb::WatchRequest {
                    cursor: String::new(),
                    min_severity: 0,
                    from_beginning: true,
                },
                provider,
            ))
            .await
            .unwrap()
            .into_inner();
        while let Ok(Some(env)) = s.message().await {
            if let Some(a) = env.alert {
                out.lock().unwrap().push((wall_ms(), a));
            }
        }
    });
    seen
}

fn published_ms(a: &pb::Alert) -> i64 {
    let t = a.published_at.as_ref().expect("published_at");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_2011_case_warns_every_carrier_and_the_customer_within_seconds_with_proof() {
    let dir = tempfile::tempdir().unwrap();
    let (files, n) = scenario_of(dir.path(), Preset::Pbx2011);
    let stack = Stack::start_without_notifier(dir.path()).await;

    // One webhook receiver per carrier, one for the operations team.
    let mut hooks = BTreeMap::new();
    for (provider, _) in CARRIERS {
        hooks.insert(provider, Receiver::start(Behaviour::Ok).await);
    }
    let ops = Receiver::start(Behaviour::Ok).await;
    let mut names = Names::new("warn");
    names.alerts = stack.alerts.clone();
    let tag = names.id.replace(['-', '.'], "");
    let desk = format!("servicedesk+{tag}@nec.example");
    let mut contacts = format!(
        "[pseudonymization]\nkey_id = \"k1\"\nkey_file = \"{}\"\n",
        stack.key.display()
    );
    for (provider, hook) in &hooks {
        contacts += &format!(
            "\n[[carriers]]\nprovider_id = \"{provider}\"\n[[carriers.webhooks]]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
            hook.url()
        );
    }
    contacts += &format!(
        "\n[[customers]]\ncustomer_id = \"{VICTIM}\"\nname = \"NEC service desk\"\nemails = [\"{desk}\"]\n\n[ops]\n[[ops.webhooks]]\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        ops.url()
    );
    let cfile = dir.path().join("contacts.toml");
    std::fs::write(&cfile, contacts).unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        CARRIERS
            .iter()
            .map(|(p, _)| format!("\"{}\" = \"{p}\"\n", token(p)))
            .collect::<String>(),
    )
    .unwrap();
    let smtp = env("TOLLGUARD_SMTP_ADDR");
    let (host, port) = smtp.rsplit_once(':').unwrap();
    let maildir = std::path::PathBuf::from(env("TOLLGUARD_SMTP_MAILDIR"));
    let notifier = Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[
            ("TOLLGUARD__CONTACTS_FILE", cfile.display().to_string()),
            ("TOLLGUARD__API__TOKENS_FILE", tokens.display().to_string()),
            ("TOLLGUARD__EMAIL__HOST", host.to_string()),
            ("TOLLGUARD__EMAIL__PORT", port.to_string()),
            ("TOLLGUARD__EMAIL__TLS", "none".to_string()),
            (
                "TOLLGUARD__EMAIL__FROM",
                "TollGuard <alerts@tollguard.test>".to_string(),
            ),
        ],
    )
    .await;
    // The topic exists before anyone watches it (the chart's topic job).
    support::create_topic(&stack.alerts, 3).await;
    let watches: BTreeMap<&str, _> = CARRIERS
        .iter()
        .map(|(p, _)| (*p, watch(notifier.endpoint(), p)))
        .collect();

    stack.send_all(&files);
    stack.wait_processed(n as f64).await;

    // The incident: the cross-carrier burst to East Timor via bt and kpn.
    let alerts = stack.alerts().await;
    let burst = alerts
        .iter()
        .find(|a| {
            a.rule == pb::Rule::MultiCarrierBurst as i32
                && a.severity == pb::Severity::Critical as i32
        })
        .unwrap_or_else(|| panic!("no critical burst among {} alerts", alerts.len()))
        .clone();
    let incident = burst.incident_id.clone();
    assert_eq!(burst.subject.as_ref().unwrap().range, "+67077");
    let mut involved = burst.providers.clone();
    involved.sort();
    assert_eq!(involved, ["bt", "kpn"]);
    let published = published_ms(&burst);

    // A signed webhook at each involved carrier, within seconds.
    for p in &involved {
        let hook = &hooks[p.as_str()];
        let got = wait_for(
            &format!("the webhook at {p}"),
            Duration::from_secs(60),
            || async {
                let v = hook.for_incident(&incident);
                v.iter().any(|r| r.finished).then_some(v)
            },
        )
        .await;
        let first = &got[0];
        assert_eq!(first.signature_ok, Ok(()), "{p}: bad signature");
        assert_eq!(first.status, 200);
        let body: serde_json::Value = serde_json::from_str(&first.body).unwrap();
        assert_eq!(body["incident_id"], incident.as_str(), "{}", first.body);
        let delay = first.wall_ms - published;
        assert!(
            (0..=WITHIN_MS).contains(&delay),
            "webhook at {p} {delay} ms after the alert"
        );
    }
    // Carriers whose traffic is not part of it hear nothing of it.
    for (p, hook) in &hooks {
        if !involved.iter().any(|i| i == p) {
            assert!(
                hook.for_incident(&incident).is_empty(),
                "{p} was warned of an incident it is not part of"
            );
        }
    }
    // The operations team sees every incident.
    wait_for("the ops webhook", Duration::from_secs(30), || async {
        (!ops.for_incident(&incident).is_empty()).then_some(())
    })
    .await;

    // The customer's e-mail: plain language, to the right address.
    let mail = wait_for("the customer's e-mail", Duration::from_secs(60), || async {
        mails(&maildir, &incident)
            .into_iter()
            .find(|(to, _, _)| to == &desk)
    })
    .await;
    let (_, at, text) = mail;
    assert!(
        text.contains("East Timor") || text.contains("Timor-Leste"),
        "{text}"
    );
    assert!(text.contains("EUR"), "{text}");
    assert!(
        (0..=WITHIN_MS).contains(&(at - published)),
        "e-mail {} ms after the alert",
        at - published
    );

    // A Watch event on each involved carrier's stream; none elsewhere.
    for p in &involved {
        let seen = watches[p.as_str()].clone();
        let (got_at, _) = wait_for(
            &format!("the Watch event at {p}"),
            Duration::from_secs(30),
            || {
                let seen = seen.clone();
                let incident = incident.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .iter()
                        .find(|(_, a)| a.incident_id == incident)
                        .cloned()
                }
            },
        )
        .await;
        assert!(
            got_at - published <= WITHIN_MS,
            "Watch at {p} {} ms after the alert",
            got_at - published
        );
    }
    for (p, seen) in &watches {
        if !involved.iter().any(|i| i == p) {
            assert!(
                !seen
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(_, a)| a.incident_id == incident),
                "{p} watched an incident it is not part of"
            );
        }
    }

    // kpn acknowledges; the ledger explains who was warned and when.
    let mut c = AlertsClient::connect(notifier.endpoint()).await.unwrap();
    c.acknowledge(req(
        pb::AcknowledgeRequest {
            incident_id: incident.clone(),
            note: "blocked +670 for the customer".into(),
        },
        "kpn",
    ))
    .await
    .unwrap();
    let show = |args: Vec<String>| {
        let out = Command::new(bin("tollguard"))
            .args(&args)
            .env("TOLLGUARD_KAFKA_BOOTSTRAP", kafka())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let out = wait_for(
        "the acknowledgement in the ledger",
        Duration::from_secs(60),
        || {
            let args: Vec<String> = [
                "audit",
                "show",
                &incident,
                "--topic",
                &names.deliveries,
                "--timeout-s",
                "20",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let (code, out) = show(args);
            async move { (code == Some(0) && out.contains("kpn acknowledged")).then_some(out) }
        },
    )
    .await;
    assert!(out.contains("chain intact"), "{out}");
    for needle in [
        "carrier:bt",
        "carrier:kpn",
        "customer:NEC service desk",
        "ops",
        "webhook",
        "email",
        "delivered",
        "blocked +670 for the customer",
    ] {
        assert!(
            out.contains(needle),
            "`audit show` lacks {needle:?}:\n{out}"
        );
    }
    for (p, _) in CARRIERS {
        if !involved.iter().any(|i| i == p) {
            assert!(!out.contains(&format!("carrier:{p}")), "{out}");
        }
    }
    let (code, verify) = show(
        [
            "audit",
            "verify",
            "--topic",
            &names.deliveries,
            "--timeout-s",
            "20",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    assert_eq!(code, Some(0), "{verify}");
}
