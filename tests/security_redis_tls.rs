//! TLS to Redis (`rediss://`, `[redis.tls]`) against a real TLS-enabled
//! `redis-server` that each test starts itself on a free loopback port,
//! with a throw-away PKI (`security_pki.rs`), data in a temporary directory,
//! killed on drop: the shared Redis of `deploy/local/services.sh` is not
//! touched.
//!
//! * the window store works over TLS with a client certificate, and a
//!   plaintext client is not served on the TLS port;
//! * a server certificate from a CA the client does not trust, or for
//!   another name, is refused, as is a client without a certificate when
//!   the server requires one;
//! * the correlator and the notifier become ready over TLS from their
//!   configuration, a notifier trusting another CA stays unready and says
//!   why;
//! * bad `[redis.tls]` settings exit 64 naming the key.

#[path = "security_pki.rs"]
mod pki;
#[path = "notifier_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pki::{Ca, Pem};
use tollguard_core::store::{Scope, StateWrite, WindowStore};
use tollguard_runtime::redis_store::RedisStore;
use tollguard_runtime::redis_tls::{RedisTls, RedisTlsCerts};
use tollguard_tests::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A `redis-server` serving only TLS on `port` (`--port 0`), requiring
/// client certificates from `ca` (`--tls-auth-clients yes`).
struct TlsRedis {
    _proc: Proc,
    port: u16,
}

impl TlsRedis {
    async fn start(dir: &Path, name: &str, ca: &Ca, server: &Pem) -> Self {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let cert = write(&sub, "server.pem", &server.cert);
        let key = write(&sub, "server.key", &server.key);
        let ca_file = write(&sub, "ca.pem", &ca.pem());
        let port = free_port();
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &cert.display().to_string(),
            "--tls-key-file",
            &key.display().to_string(),
            "--tls-ca-cert-file",
            &ca_file.display().to_string(),
            "--tls-auth-clients",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &sub.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn(&sub, "redis", Path::new("redis-server"), &args, &[]);
        let what = format!(
            "TLS redis-server on 127.0.0.1:{port} (log {})",
            p.log.display()
        );
        wait_for(&what, Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Self { _proc: p, port }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }
}

/// `[redis.tls]` with `ca` trusted and (optionally) `client` presented,
/// loaded as the services load it.
fn tls_for(dir: &Path, tag: &str, ca: &Ca, client: Option<&Pem>, url: &str) -> RedisTlsCerts {
    let cfg = RedisTls {
        ca_file: Some(write(dir, &format!("{tag}-ca.pem"), &ca.pem())),
        cert_file: client.map(|c| write(dir, &format!("{tag}-client.pem"), &c.cert)),
        key_file: client.map(|c| write(dir, &format!("{tag}-client.key"), &c.key)),
    };
    cfg.load("redis.tls", &[("redis.url".to_string(), url)])
        .unwrap()
        .expect("certificates")
}

async fn connect(url: &str, tls: Option<&RedisTlsCerts>) -> Result<RedisStore, String> {
    let prefix = format!("tgtest:{}:", unique("tls"));
    match tokio::time::timeout(
        Duration::from_secs(30),
        RedisStore::connect_tls(url, &prefix, tls),
    )
    .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("connect timed out after 30 s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_over_tls_and_refuses_an_untrusted_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("TollGuard Redis test CA");
    let server = ca.server_for(&["127.0.0.1", "localhost"]);
    let client = ca.client(&["tollguard-correlator"], "tollguard-correlator");
    let redis = TlsRedis::start(dir.path(), "good", &ca, &server).await;
    let url = redis.url();

    // Trusted CA and a client certificate: the store works (scripts load,
    // compare-and-set, reads, sets).
    let tls = tls_for(dir.path(), "good", &ca, Some(&client), &url);
    let store = connect(&url, Some(&tls)).await.expect("store over TLS");
    store.ping().await.unwrap();
    let scope = Scope::Customer("k1:tls".into());
    let w = StateWrite {
        scope: scope.clone(),
        name: "inc:tls".into(),
        expect: None,
        value: "v1".into(),
        ttl_ms: 60_000,
    };
    assert!(store.cas_state(&w).await.unwrap());
    assert!(!store.cas_state(&w).await.unwrap(), "CAS must see v1");
    assert_eq!(
        store
            .get_states(&[(scope, "inc:tls".into())])
            .await
            .unwrap(),
        vec![Some("v1".to_string())]
    );
    assert!(store.set_add("hot", "range:+67077").await.unwrap());
    assert_eq!(store.set_members("hot").await.unwrap(), ["range:+67077"]);

    // The port speaks only TLS: a plaintext client gets nowhere.
    let plain = url.replacen("rediss://", "redis://", 1);
    assert!(connect(&plain, None).await.is_err(), "plaintext was served");

    // A client trusting another CA refuses the server's certificate.
    let other = Ca::new("Some other CA");
    let untrusting = tls_for(dir.path(), "other", &other, Some(&client), &url);
    let e = connect(&url, Some(&untrusting)).await.unwrap_err();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "untrusted server accepted or unclear error: {e}"
    );
    // So does one on the system trust store (a rediss:// URL without
    // [redis.tls]).
    let e = connect(&url, None).await.unwrap_err();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "untrusted server accepted by the system store or unclear error: {e}"
    );
    // The server requires a client certificate.
    let anonymous = tls_for(dir.path(), "anon", &ca, None, &url);
    assert!(
        connect(&url, Some(&anonymous)).await.is_err(),
        "a client without a certificate was served"
    );

    // A server with a certificate of the trusted CA but for another name.
    let misnamed = ca.server_for(&["redis.other.example"]);
    let redis2 = TlsRedis::start(dir.path(), "misnamed", &ca, &misnamed).await;
    let url2 = redis2.url();
    let tls2 = tls_for(dir.path(), "misnamed", &ca, Some(&client), &url2);
    let e = connect(&url2, Some(&tls2)).await.unwrap_err();
    assert!(
        e.contains("certificate") || e.contains("NotValidForName"),
        "a certificate for another name was accepted or unclear error: {e}"
    );
}

/// The environment overrides of `[redis.tls]`.
fn tls_env(ca: &Path, cert: &Path, key: &Path) -> Vec<(String, String)> {
    vec![
        (
            "TOLLGUARD__REDIS__TLS__CA_FILE".into(),
            ca.display().to_string(),
        ),
        (
            "TOLLGUARD__REDIS__TLS__CERT_FILE".into(),
            cert.display().to_string(),
        ),
        (
            "TOLLGUARD__REDIS__TLS__KEY_FILE".into(),
            key.display().to_string(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_correlator_and_notifier_use_redis_tls_from_their_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("TollGuard Redis test CA");
    let server = ca.server_for(&["127.0.0.1"]);
    let client = ca.client(&["tollguard-notifier"], "tollguard-notifier");
    let redis = TlsRedis::start(dir.path(), "redis", &ca, &server).await;
    let ca_file = write(dir.path(), "redis-ca.pem", &ca.pem());
    let cert = write(dir.path(), "client.pem", &client.cert);
    let key = write(dir.path(), "client.key", &client.key);

    // The notifier: ready only once Redis answers (scripts loaded over TLS).
    let names = support::Names::new("redistls");
    let http = free_port();
    let mut env = support::env(&names, http, free_port(), &[]);
    // (later entries override the support defaults)
    env.push(("TOLLGUARD__REDIS__URL".into(), redis.url()));
    env.extend(tls_env(&ca_file, &cert, &key));
    let n = Proc::spawn(
        dir.path(),
        "notifier",
        &bin("tollguard-notifier"),
        &[],
        &env,
    );
    wait_ready(&n, http, Duration::from_secs(60)).await;

    // The correlator on the same TLS Redis.
    let id = unique("redistls");
    let chttp = free_port();
    let mut cenv = vec![
        ("TOLLGUARD__KAFKA__BOOTSTRAP".to_string(), kafka()),
        (
            "TOLLGUARD__LISTEN__HTTP".into(),
            format!("127.0.0.1:{chttp}"),
        ),
        ("TOLLGUARD__REDIS__URL".into(), redis.url()),
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
    ];
    cenv.extend(tls_env(&ca_file, &cert, &key));
    let c = Proc::spawn(
        dir.path(),
        "correlator",
        &bin("tollguard-correlator"),
        &[],
        &cenv,
    );
    wait_ready(&c, chttp, Duration::from_secs(60)).await;

    // A notifier that trusts another CA never becomes ready, and its
    // readiness says why; the client key never appears in its log.
    let other = Ca::new("Some other CA");
    let other_file = write(dir.path(), "other-ca.pem", &other.pem());
    let bhttp = free_port();
    let mut bad_env = support::env(&names, bhttp, free_port(), &[]);
    bad_env.push(("TOLLGUARD__REDIS__URL".into(), redis.url()));
    bad_env.extend(tls_env(&other_file, &cert, &key));
    let bad = Proc::spawn(
        dir.path(),
        "notifier-untrusting",
        &bin("tollguard-notifier"),
        &[],
        &bad_env,
    );
    let why = wait_for(
        "the untrusting notifier's readiness to name the certificate",
        Duration::from_secs(30),
        || async move {
            match http_get(bhttp, "/readyz").await {
                Some((503, body)) if body.contains("redis") && body.contains("certificate") => {
                    Some(body)
                }
                Some((200, body)) => panic!("ready against an untrusted Redis: {body}"),
                _ => None,
            }
        },
    )
    .await;
    assert!(!why.contains("PRIVATE KEY"), "{why}");
    // Still unready a little later (it keeps retrying, never trusts).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ready_status(bhttp).await, Some(503));
    let key_body = client.key.lines().nth(1).unwrap().to_string();
    for (what, p) in [("notifier", &n), ("correlator", &c), ("untrusting", &bad)] {
        assert!(
            !p.log_text().contains(&key_body),
            "the client key appears in the {what}'s log"
        );
    }
}

#[test]
fn bad_redis_tls_settings_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("TollGuard Redis test CA");
    let client = ca.client(&["tollguard-correlator"], "tollguard-correlator");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let cert = write(dir.path(), "client.pem", &client.cert);
    let key = write(dir.path(), "client.key", &client.key);
    let missing = dir.path().join("missing.pem");
    let run = |binary: &str, env: &[(&str, &Path)], url: &str| {
        let mut cmd = Command::new(bin(binary));
        cmd.arg("--check-config")
            .env("TOLLGUARD__REDIS__URL", url)
            .env("TOLLGUARD_LOG_FORMAT", "text");
        if binary == "tollguard-notifier" {
            // (the Alerts API's own mTLS is not what is tested here)
            cmd.env("TOLLGUARD__TLS__ENABLED", "false");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        )
    };
    let good = [
        ("TOLLGUARD__REDIS__TLS__CA_FILE", ca_file.as_path()),
        ("TOLLGUARD__REDIS__TLS__CERT_FILE", cert.as_path()),
        ("TOLLGUARD__REDIS__TLS__KEY_FILE", key.as_path()),
    ];
    let tls_url = "rediss://tollguard:s3cretpw@127.0.0.1:6380/";
    for binary in ["tollguard-correlator", "tollguard-notifier"] {
        let (code, out) = run(binary, &good, tls_url);
        assert_eq!(code, Some(0), "{binary}: {out}");
        // (what, overrides, redis.url, the key the error must name)
        type Case<'a> = (&'a str, Vec<(&'a str, &'a Path)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (
                "a missing CA file",
                vec![("TOLLGUARD__REDIS__TLS__CA_FILE", missing.as_path())],
                tls_url,
                "redis.tls.ca_file",
            ),
            (
                "a CA file holding a key",
                vec![("TOLLGUARD__REDIS__TLS__CA_FILE", key.as_path())],
                tls_url,
                "redis.tls.ca_file",
            ),
            (
                "a certificate without its key",
                vec![
                    ("TOLLGUARD__REDIS__TLS__CA_FILE", ca_file.as_path()),
                    ("TOLLGUARD__REDIS__TLS__CERT_FILE", cert.as_path()),
                ],
                tls_url,
                "redis.tls.key_file",
            ),
            (
                "a key file holding a certificate",
                vec![
                    ("TOLLGUARD__REDIS__TLS__CERT_FILE", cert.as_path()),
                    ("TOLLGUARD__REDIS__TLS__KEY_FILE", cert.as_path()),
                ],
                tls_url,
                "redis.tls.key_file",
            ),
            (
                "TLS files with a plaintext URL",
                good.to_vec(),
                "redis://tollguard:s3cretpw@127.0.0.1:6379/",
                "redis.url",
            ),
            (
                "certificate verification turned off",
                vec![],
                "rediss://tollguard:s3cretpw@127.0.0.1:6380/#insecure",
                "redis.url",
            ),
        ];
        for (what, env, url, key_name) in cases {
            let (code, out) = run(binary, &env, url);
            assert_eq!(code, Some(64), "{binary}, {what}: {out}");
            assert!(out.contains(key_name), "{binary}, {what}: {out}");
            assert!(
                !out.contains("s3cretpw"),
                "{binary}, {what}: password shown"
            );
            assert!(!out.contains("PRIVATE KEY"), "{binary}, {what}: key shown");
        }
    }
}
