//! Bad notifier configuration is refused before anything starts: the built
//! binary with `--check-config` exits 64 naming the offending entry.

use std::path::Path;
use std::process::Command;

use tollguard_tests::*;

const SECRET: &str = "test-webhook-secret-0123456789";

/// Runs `tollguard-notifier --check-config` with `contacts` as the contacts
/// file; returns (exit code, stderr + stdout).
fn check(dir: &Path, contacts: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let p = dir.join("contacts.toml");
    std::fs::write(&p, contacts).unwrap();
    let mut cmd = Command::new(bin("tollguard-notifier"));
    cmd.arg("--check-config")
        .env("TOLLGUARD__CONTACTS_FILE", &p)
        .env("TOLLGUARD_LOG_FORMAT", "text");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.code(), text)
}

#[test]
fn a_bad_email_address_exits_64_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(
        dir.path(),
        r#"
[[customers]]
customer_token = "k1:00112233445566778899aabbccddeeff"
name = "NEC service desk"
emails = ["desk@nec.example"]

[[customers]]
customer_token = "k1:00112233445566778899aabbccddeeff"
name = "NEC CISO"

[[customers]]
customer_token = "k1:00112233445566778899aabbccddeeff"
name = "NEC night shift"
emails = ["bob@"]
"#,
        &[],
    );
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("customers[2].emails[0]: \"bob@\" is not an e-mail address"),
        "{out}"
    );
}

#[test]
fn a_private_webhook_target_exits_64_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    for (url, class, env) in [
        ("https://10.20.30.40/hook", "private", vec![]),
        ("https://[fd12::1]/hook", "unique local", vec![]),
        ("https://100.64.1.1/hook", "CGNAT", vec![]),
        (
            "http://169.254.169.254/latest/meta-data",
            "link-local",
            vec![("TOLLGUARD__WEBHOOKS__ALLOW_INSECURE_HTTP", "true")],
        ),
        (
            "http://127.0.0.1:9/hook",
            "loopback",
            vec![("TOLLGUARD__WEBHOOKS__ALLOW_INSECURE_HTTP", "true")],
        ),
        (
            "http://93.184.216.34/hook",
            "scheme `http` is not allowed",
            vec![],
        ),
    ] {
        let contacts = format!(
            "[[carriers]]\nprovider_id = \"kpn\"\n[[carriers.webhooks]]\nurl = \"https://93.184.216.34/ok\"\nsecret = \"{SECRET}\"\n[[carriers.webhooks]]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
        );
        let (code, out) = check(dir.path(), &contacts, &env);
        assert_eq!(code, Some(64), "{url}: {out}");
        assert!(
            out.contains("carriers[0].webhooks[1].url") && out.contains(class),
            "{url}: {out}"
        );
    }
    // Allow-listed, the loopback target is accepted.
    let contacts = format!(
        "[[carriers]]\nprovider_id = \"kpn\"\nwebhooks = [{{url = \"http://127.0.0.1:9/hook\", secret = \"{SECRET}\"}}]\n"
    );
    let (code, out) = check(
        dir.path(),
        &contacts,
        &[
            ("TOLLGUARD__WEBHOOKS__ALLOW_INSECURE_HTTP", "true"),
            ("TOLLGUARD__WEBHOOKS__ALLOW_CIDRS", "[\"127.0.0.0/8\"]"),
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration ok"), "{out}");
}

#[test]
fn other_bad_values_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ok = "[ops]\nemails = [\"ops@tollguard.example\"]\n";
    for (k, v, key) in [
        (
            "TOLLGUARD__WEBHOOKS__ALLOW_CIDRS",
            "[\"10.0.0.0/40\"]",
            "webhooks.allow_cidrs[0]",
        ),
        ("TOLLGUARD__RETRY__MAX_ATTEMPTS", "0", "retry.max_attempts"),
        ("TOLLGUARD__EMAIL__FROM", "not an address", "email.from"),
        ("TOLLGUARD__REDIS__URL", "http://redis", "redis.url"),
    ] {
        let (code, out) = check(dir.path(), ok, &[(k, v)]);
        assert_eq!(code, Some(64), "{k}: {out}");
        assert!(out.contains(key), "{k}: {out}");
    }
    let (code, out) = check(
        dir.path(),
        "[[customers]]\ncustomer_id = \"kvk:30123456\"\nname = \"NEC\"\n",
        &[],
    );
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("customers[0].customer_id"), "{out}");
    let (code, out) = check(dir.path(), ok, &[]);
    assert_eq!(code, Some(0), "{out}");
}
