//! E-mail through the real SMTP sink (`TOLLGUARD_SMTP_ADDR`, one `.eml` per
//! message in `TOLLGUARD_SMTP_MAILDIR`): the customer's contact gets a
//! plain-language warning, the carrier its scoped version, each at the right
//! envelope recipient, and both deliveries are in the ledger with
//! domain-masked targets.

#[path = "notifier_support.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use support::*;
use tollguard_core::pseudo::{Key, Kind};
use tollguard_proto::v1 as pb;
use tollguard_tests::*;

/// The messages in the sink's maildir that mention `needle`:
/// (envelope recipient, whole text with folded headers unfolded).
fn mails(maildir: &Path, needle: &str) -> Vec<(String, String)> {
    support::mails(maildir, needle)
        .into_iter()
        .map(|(to, _, text)| (to, text))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_reaches_the_smtp_sink_with_the_right_recipient_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::new("nmail");
    create_topic(&names.alerts, 3).await;
    let keyfile = key_file(dir.path());
    let key = Key::from_text("k1", &std::fs::read_to_string(&keyfile).unwrap()).unwrap();
    let customer = key.token(Kind::Customer, "kvk:30123456");
    let tag = names.id.replace(['-', '.'], "");
    let desk = format!("servicedesk+{tag}@nec.example");
    let fraud = format!("fraud+{tag}@kpn.example");
    let cfile = contacts(
        dir.path(),
        &format!(
            r#"
[pseudonymization]
key_id = "k1"
key_file = "{}"

[[carriers]]
provider_id = "kpn"
emails = ["{fraud}"]

[[customers]]
customer_id = "kvk:30123456"
name = "NEC service desk"
emails = ["{desk}"]
"#,
            keyfile.display()
        ),
    );
    let smtp = tollguard_tests::env("TOLLGUARD_SMTP_ADDR");
    let (host, port) = smtp.rsplit_once(':').unwrap();
    let maildir = std::path::PathBuf::from(tollguard_tests::env("TOLLGUARD_SMTP_MAILDIR"));
    let _n = Notifier::start(
        dir.path(),
        "notifier",
        &names,
        &[
            ("TOLLGUARD__CONTACTS_FILE", cfile.display().to_string()),
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
    let incident = format!("inc-mail-{tag}");
    publish(
        &names.alerts,
        &[alert(
            &incident,
            1,
            pb::Severity::Critical,
            &["kpn", "bt"],
            &customer.value,
        )],
    )
    .await;
    let got = wait_for(
        "two e-mails at the SMTP sink",
        Duration::from_secs(60),
        || {
            let (m, i) = (maildir.clone(), incident.clone());
            async move {
                let v = mails(&m, &i);
                (v.len() >= 2).then_some(v)
            }
        },
    )
    .await;
    assert_eq!(got.len(), 2, "{got:?}");
    let (to, cust) = got
        .iter()
        .find(|(to, _)| to.contains("servicedesk"))
        .unwrap();
    assert_eq!(to, &desk);
    assert!(
        cust.contains("X-Envelope-From: alerts@tollguard.test"),
        "{cust}"
    );
    let subject = cust.lines().find(|l| l.starts_with("Subject: ")).unwrap();
    assert!(
        subject.contains(&incident) && subject.contains("CRITICAL"),
        "{subject}"
    );
    assert!(
        cust.contains(
            "Calls from your phone system to East Timor (+670 77) through 2 carriers: an estimated EUR 30.00 in the last 15 minutes."
        ),
        "{cust}"
    );
    assert!(
        cust.contains("Recommended action: Check your phone system"),
        "{cust}"
    );
    assert!(
        !cust.contains(&customer.value),
        "no tokens in the customer's mail"
    );
    let (to, carrier) = got.iter().find(|(to, _)| to.contains("fraud")).unwrap();
    assert_eq!(to, &fraud);
    assert!(carrier.contains("other carriers (1)"), "{carrier}");
    assert!(!carrier.contains(" bt"), "{carrier}");
    assert!(
        carrier.contains(&format!("X-TollGuard-Incident: {incident}")),
        "{carrier}"
    );

    // Both deliveries are in the ledger, with masked addresses.
    let recs = wait_for(
        "two e-mail deliveries in the ledger",
        Duration::from_secs(30),
        || {
            let t = names.deliveries.clone();
            async move {
                let r: Vec<pb::DeliveryRecord> =
                    ledger(&t).await.into_iter().map(|x| x.2).collect();
                (r.len() >= 2).then_some(r)
            }
        },
    )
    .await;
    let mut targets: Vec<(String, String, i32, u32)> = recs
        .iter()
        .map(|r| {
            (
                r.audience.clone(),
                r.target.clone(),
                r.status,
                r.response_code,
            )
        })
        .collect();
    targets.sort();
    let delivered = pb::DeliveryStatus::Delivered as i32;
    assert_eq!(
        targets,
        [
            (
                "carrier:kpn".to_string(),
                "f***@k***.example".to_string(),
                delivered,
                250
            ),
            (
                "customer:NEC service desk".to_string(),
                "s***@n***.example".to_string(),
                delivered,
                250
            ),
        ]
    );
    assert!(
        recs.iter()
            .all(|r| r.channel == pb::DeliveryChannel::Email as i32)
    );
}
