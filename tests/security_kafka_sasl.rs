//! Kafka SASL/SCRAM against a real broker: the test starts its OWN
//! single-node KRaft broker (the jars `deploy/local/services.sh` installed,
//! `TOLLGUARD_KAFKA_HOME`) with only a `SASL_PLAINTEXT` SCRAM-SHA-512
//! listener on loopback, its users created by `kafka-storage.sh format
//! --add-scram`, its data in a temporary directory, killed on drop. The
//! shared broker is not touched.
//!
//! One test covers both cases (a second broker start costs 15-30 s):
//! an ingester with the right SCRAM credentials becomes ready and publishes
//! (the events are read back over SASL), one with a wrong password never
//! becomes ready, refuses the batch, logs the SASL authentication failure,
//! and neither logs its password.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use tollguard_proto::v1 as pb;
use tollguard_proto::v1::ingest_client::IngestClient;
use tollguard_tests::*;
use tonic::Code;

const ADMIN: (&str, &str) = ("tg-admin", "admin-5cram-0123456789");
const INGESTER: &str = "tollguard-ingester-kpn";
const INGESTER_PASSWORD: &str = "ingest-5cram-abcdef0123";
const WRONG_PASSWORD: &str = "wrong-5cram-9876543210";

/// A private KRaft broker with one SASL_PLAINTEXT SCRAM-SHA-512 listener.
struct SaslBroker {
    proc: Proc,
    port: u16,
}

impl SaslBroker {
    fn start(dir: &Path, users: &[(&str, &str)]) -> Self {
        let home = PathBuf::from(env("TOLLGUARD_KAFKA_HOME"));
        let java = std::env::var("JAVA_HOME")
            .map(|h| PathBuf::from(h).join("bin/java"))
            .unwrap_or_else(|_| PathBuf::from("java"));
        let (port, cport) = (free_port(), free_port());
        let data = dir.join("data");
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let props = dir.join("server.properties");
        let (admin, admin_pw) = ADMIN;
        std::fs::write(
            &props,
            format!(
                "process.roles=broker,controller\n\
                 node.id=1\n\
                 controller.quorum.voters=1@127.0.0.1:{cport}\n\
                 listeners=SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
                 advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{port}\n\
                 listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 inter.broker.listener.name=SASL_PLAINTEXT\n\
                 controller.listener.names=CONTROLLER\n\
                 sasl.enabled.mechanisms=SCRAM-SHA-512\n\
                 sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512\n\
                 listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=\
                 org.apache.kafka.common.security.scram.ScramLoginModule required \
                 username=\"{admin}\" password=\"{admin_pw}\";\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 default.replication.factor=1\n\
                 min.insync.replicas=1\n\
                 auto.create.topics.enable=true\n\
                 offsets.topic.replication.factor=1\n\
                 offsets.topic.num.partitions=1\n\
                 transaction.state.log.replication.factor=1\n\
                 transaction.state.log.min.isr=1\n\
                 share.coordinator.state.topic.replication.factor=1\n\
                 share.coordinator.state.topic.min.isr=1\n\
                 group.initial.rebalance.delay.ms=0\n\
                 num.network.threads=1\n\
                 num.io.threads=2\n",
                data = data.display()
            ),
        )
        .unwrap();
        // Format the storage with the SCRAM users (KRaft: no ZooKeeper to
        // create them in later).
        let mut format = Command::new(home.join("bin/kafka-storage.sh"));
        format
            .args(["format", "-t", &kafka_cluster_id(), "-c"])
            .arg(&props)
            .env("KAFKA_TOOLS_HEAP", "-Xmx128m");
        for (u, p) in std::iter::once(&ADMIN).chain(users) {
            format
                .arg("--add-scram")
                .arg(format!("SCRAM-SHA-512=[name={u},password={p}]"));
        }
        let out = format.output().expect("kafka-storage.sh");
        assert!(
            out.status.success(),
            "kafka-storage.sh format failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let args = [
            "-Xmx384m".to_string(),
            "-Xms128m".into(),
            "-XX:+UseSerialGC".into(),
            "-XX:TieredStopAtLevel=1".into(),
            "-Djava.awt.headless=true".into(),
            format!("-Dkafka.logs.dir={}", logs.display()),
            format!(
                "-Dlog4j2.configurationFile={}",
                home.join("config/log4j2.properties").display()
            ),
            "-cp".into(),
            format!("{}/*", home.join("libs").display()),
            "kafka.Kafka".into(),
            props.display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn(dir, "kafka-sasl", &java, &args, &[]);
        // Drop kills the broker; should the test process itself be killed,
        // this detached watchdog does (no broker left behind).
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; kill -9 {} 2>/dev/null",
                std::process::id(),
                proc.child.id()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        Self { proc, port }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn client(&self, user: &str, password: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap())
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", user)
            .set("sasl.password", password);
        c
    }

    /// Waits until the broker answers an authenticated metadata request.
    fn wait_ready(&self, timeout: Duration) {
        let (u, p) = ADMIN;
        let consumer: BaseConsumer = self
            .client(u, p)
            .set("group.id", "tgtest-probe")
            .create()
            .unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(2))
                && !md.brokers().is_empty()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the SASL broker was not ready after {timeout:?} (log {}, server.log in {})",
                self.proc.log.display(),
                self.proc.log.parent().unwrap().join("logs").display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Every event on `topic`, read over SASL as the admin user.
    fn events(&self, topic: &str, want: usize, timeout: Duration) -> Vec<pb::CallEvent> {
        let (u, p) = ADMIN;
        let consumer: BaseConsumer = self
            .client(u, p)
            .set("group.id", format!("tgtest-read-{}", unique("g")))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
                out.push(pb::CallEvent::decode(m.payload().unwrap_or_default()).unwrap());
            }
        }
        out
    }
}

struct Ingester {
    proc: Proc,
    grpc: u16,
    http: u16,
}

fn ingester(dir: &Path, name: &str, broker: &SaslBroker, topic: &str, password: &str) -> Ingester {
    let (grpc, http) = (free_port(), free_port());
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&key, hex::encode(rand::random::<[u8; 32]>())).unwrap();
    let env: Vec<(String, String)> = [
        ("TOLLGUARD__KAFKA__BOOTSTRAP", broker.bootstrap()),
        (
            "TOLLGUARD__KAFKA__EXTRA__SECURITY__PROTOCOL",
            "SASL_PLAINTEXT".into(),
        ),
        (
            "TOLLGUARD__KAFKA__EXTRA__SASL__MECHANISM",
            "SCRAM-SHA-512".into(),
        ),
        ("TOLLGUARD__KAFKA__EXTRA__SASL__USERNAME", INGESTER.into()),
        ("TOLLGUARD__KAFKA__EXTRA__SASL__PASSWORD", password.into()),
        ("TOLLGUARD__PROVIDER_ID", "kpn".into()),
        ("TOLLGUARD__DIAL_PLAN__HOME_COUNTRY", "NL".into()),
        ("TOLLGUARD__LISTEN__GRPC", format!("127.0.0.1:{grpc}")),
        ("TOLLGUARD__LISTEN__HTTP", format!("127.0.0.1:{http}")),
        ("TOLLGUARD__PSEUDONYMIZATION__KEY_ID", "k1".into()),
        (
            "TOLLGUARD__PSEUDONYMIZATION__KEY_FILE",
            key.display().to_string(),
        ),
        ("TOLLGUARD__TOPIC", topic.into()),
        ("TOLLGUARD__TLS__ENABLED", "false".into()),
        ("TOLLGUARD__LIMITS__REQUEST_TIMEOUT_MS", "8000".into()),
        ("RUST_LOG", "debug".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let proc = Proc::spawn(dir, name, &bin("tollguard-ingester"), &[], &env);
    Ingester { proc, grpc, http }
}

fn record(event_id: &str) -> pb::CallRecord {
    pb::CallRecord {
        provider_id: "kpn".into(),
        event_id: event_id.into(),
        call_id: format!("call-{event_id}"),
        phase: "end".into(),
        customer_id: "kvk:30123456".into(),
        line_id: "trunk-1".into(),
        caller: "0302001000".into(),
        callee: "0067077123456".into(),
        direction: "outbound".into(),
        start_time: "2011-06-11T00:47:00+02:00".into(),
        duration_s: 60.0,
        ..Default::default()
    }
}

async fn publish(port: u16, ids: &[&str]) -> Result<pb::PublishAck, tonic::Status> {
    let mut c = IngestClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    c.publish_batch(pb::PublishRequest {
        batch_id: 1,
        records: ids.iter().map(|i| record(i)).collect(),
    })
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_credentials_publish_and_a_wrong_password_fails_clearly() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let broker = SaslBroker::start(dir.path(), &[(INGESTER, INGESTER_PASSWORD)]);
    tokio::task::block_in_place(|| broker.wait_ready(Duration::from_secs(90)));
    let broker_up = started.elapsed();
    let topic = format!("tgtest.{}.calls", unique("sasl"));

    // The right credentials: ready, every record acknowledged and on the
    // topic (read back over SASL).
    let good = ingester(
        dir.path(),
        "ingester-good",
        &broker,
        &topic,
        INGESTER_PASSWORD,
    );
    // The wrong password, started at the same time.
    let bad = ingester(dir.path(), "ingester-bad", &broker, &topic, WRONG_PASSWORD);
    wait_ready(&good.proc, good.http, Duration::from_secs(60)).await;
    let ack = publish(good.grpc, &["sasl-1", "sasl-2", "sasl-3"])
        .await
        .expect("publish with SCRAM credentials");
    assert_eq!(ack.accepted, 3, "{ack:?}");
    let events = tokio::task::block_in_place(|| broker.events(&topic, 3, Duration::from_secs(30)));
    let mut ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["sasl-1", "sasl-2", "sasl-3"]);

    // The wrong password: not ready, with the SASL failure as the reason; a batch
    // is refused (never acknowledged); the log names the SASL failure.
    let body = wait_for(
        "the wrong-password ingester's readiness to name the SASL failure",
        Duration::from_secs(30),
        || async {
            match http_get(bad.http, "/readyz").await {
                Some((503, body)) if body.contains("kafka") && body.contains("SASL") => Some(body),
                Some((200, body)) => panic!("ready with a wrong SASL password: {body}"),
                _ => None,
            }
        },
    )
    .await;
    let st = publish(bad.grpc, &["bad-1"])
        .await
        .expect_err("a batch acknowledged with a wrong SASL password");
    assert!(
        matches!(
            st.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Cancelled
        ),
        "{st:?}"
    );
    let log = wait_for(
        "the SASL authentication failure in the wrong-password ingester's log",
        Duration::from_secs(20),
        || async {
            let log = bad.proc.log_text();
            (log.contains("SASL") && log.contains("uthentication")).then_some(log)
        },
    )
    .await;
    assert_eq!(ready_status(bad.http).await, Some(503), "{body}");
    assert!(body.contains("uthentication"), "{body}");
    assert!(!body.contains(WRONG_PASSWORD), "the password in /readyz");
    // Nothing of the refused batch is on the topic.
    let events = tokio::task::block_in_place(|| broker.events(&topic, 4, Duration::from_secs(5)));
    assert_eq!(events.len(), 3, "the refused batch reached the topic");

    // Neither password appears in any log (both ran at debug level).
    for (what, text) in [("good", good.proc.log_text()), ("bad", log)] {
        assert!(text.len() > 500, "{what}'s debug log is empty?");
        for pw in [INGESTER_PASSWORD, WRONG_PASSWORD, "5cram"] {
            assert!(
                !text.contains(pw),
                "a SASL password appears in the {what} ingester's log"
            );
        }
    }
    eprintln!(
        "wrong password: /readyz {body:?}; PublishBatch {:?}: {}",
        st.code(),
        st.message()
    );
    eprintln!(
        "SASL broker ready after {:.1} s, whole test {:.1} s",
        broker_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
