//! The Helm chart (`helm/tollguard`) rendered by the real `helm template`:
//! one ingester Deployment, Service and ConfigMap per carrier, probes and a
//! non-root read-only security context on every container, autoscaling/v2
//! HPAs, the topic-creation hook Job, a hard failure without the
//! pseudonymisation key, rendered configs that the service binaries accept,
//! and values that README.md and values.schema.json both cover.
//!
//! helm is found through `$TOLLGUARD_HELM`, else in
//! `${TOLLGUARD_CACHE:-$HOME/.cache/tollguard}/gobin/helm`, where
//! `bash deploy/k8s/validate.sh` installs it. Without helm these tests fail;
//! they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_norway::Value;

const RELEASE: &str = "tg";
const NAMESPACE: &str = "tollguard";

/// Three carriers, one with a dotted provider id and its own gRPC port;
/// autoscaling on so the HPAs render; policies naming a customer by id so
/// the correlator needs the key.
const THREE_CARRIERS: &str = r#"
kafka:
  bootstrap: kafka-0.kafka:9092,kafka-1.kafka:9092
  securityProtocol: SASL_PLAINTEXT
  sasl:
    mechanism: SCRAM-SHA-512
    existingSecret: kafka-user
pseudonymization:
  keyId: k1
  existingSecret: consortium-key
ingester:
  autoscaling:
    enabled: true
    maxReplicas: 4
  carriers:
    - providerId: kpn
      homeCountry: NL
      internationalPrefix: "00"
      nationalPrefix: "0"
    - providerId: bt
      homeCountry: GB
      grpcPort: 50052
      secretEnv:
        TOLLGUARD__LIMITS__MAX_BATCH_RECORDS: "1000"
    - providerId: att.us
      homeCountry: US
      internationalPrefix: "011"
      nationalPrefix: "1"
      stripPrefixes: ["1010"]
      csv:
        delimiter: ";"
        timeZone: America/New_York
        timeFormat: "%Y-%m-%d %H:%M:%S"
        columns:
          event_id: cdr_id
        constants:
          provider_id: att.us
          direction: outbound
correlator:
  autoscaling:
    enabled: true
  policies:
    toml: |
      [[policy]]
      customer_id = "kvk:30123456"
      daily_cap_eur = "500.00"
      hourly_cap_eur = "150.00"
      channels = 10
      label = "asked for a per-day cap after an earlier hack"
metrics:
  serviceMonitor:
    enabled: true
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("helm").join("tollguard")
}

/// The helm binary; fails (never skips) when it is not installed.
fn helm() -> PathBuf {
    if let Ok(p) = std::env::var("TOLLGUARD_HELM") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "TOLLGUARD_HELM={} does not exist; run `bash deploy/k8s/validate.sh` to install helm",
            p.display()
        );
        return p;
    }
    let cache = std::env::var("TOLLGUARD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set"))
                .join(".cache")
                .join("tollguard")
        });
    let p = cache.join("gobin").join("helm");
    assert!(
        p.is_file(),
        "helm not found at {} (nor $TOLLGUARD_HELM): run `bash deploy/k8s/validate.sh` first, \
         which installs the pinned helm there",
        p.display()
    );
    p
}

/// `helm template` with a values file written from `values` plus `args`;
/// Ok(stdout) or Err(stderr).
fn template(values: &str, args: &[&str]) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).expect("write values");
    let out = Command::new(helm())
        .arg("template")
        .arg(RELEASE)
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE, "-f"])
        .arg(&file)
        .args(args)
        .output()
        .expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("utf-8 output"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The non-empty documents of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn render_three() -> Vec<Value> {
    let out = template(
        THREE_CARRIERS,
        &[
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--api-versions",
            "keda.sh/v1alpha1",
        ],
    )
    .unwrap_or_else(|e| panic!("helm template failed:\n{e}"));
    documents(&out)
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path)?.as_str()
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, key| cur.get(*key))
}

fn kind(v: &Value) -> &str {
    s(v, &["kind"]).unwrap_or("")
}

fn name(v: &Value) -> &str {
    s(v, &["metadata", "name"]).unwrap_or("")
}

fn label<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    get(v, &["metadata", "labels", key])?.as_str()
}

fn of_kind<'a>(docs: &'a [Value], k: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind(d) == k).collect()
}

fn seq(v: Option<&Value>) -> Vec<&Value> {
    v.and_then(Value::as_sequence)
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

/// Pod specs of every workload: (object description, pod spec).
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Deployment" | "Job" | "StatefulSet" | "DaemonSet"))
        .map(|d| {
            let spec = get(d, &["spec", "template", "spec"])
                .unwrap_or_else(|| panic!("{} {} has no pod spec", kind(d), name(d)));
            (format!("{} {}", kind(d), name(d)), spec)
        })
        .collect()
}

const CARRIERS: [&str; 3] = ["kpn", "bt", "att.us"];

#[test]
fn one_ingester_deployment_service_and_configmap_per_carrier() {
    let docs = render_three();
    let per_carrier = |k: &str| -> BTreeMap<String, Vec<&Value>> {
        let mut m: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for d in of_kind(&docs, k) {
            if let Some(c) = label(d, "tollguard.io/carrier") {
                m.entry(c.to_string()).or_default().push(d);
            }
        }
        m
    };
    let want: BTreeSet<String> = CARRIERS.iter().map(|c| c.to_string()).collect();
    for k in ["Deployment", "Service", "ConfigMap"] {
        let m = per_carrier(k);
        assert_eq!(
            m.keys().cloned().collect::<BTreeSet<_>>(),
            want,
            "one {k} per carrier"
        );
        for (c, objs) in &m {
            assert_eq!(
                objs.len(),
                1,
                "carrier {c}: exactly one {k}, got {}",
                objs.len()
            );
        }
    }
    // Every ingester Deployment belongs to a carrier.
    let ingesters: Vec<_> = of_kind(&docs, "Deployment")
        .into_iter()
        .filter(|d| label(d, "app.kubernetes.io/component") == Some("ingester"))
        .collect();
    assert_eq!(ingesters.len(), CARRIERS.len(), "ingester Deployments");

    let configmaps = per_carrier("ConfigMap");
    let services = per_carrier("Service");
    for d in ingesters {
        let carrier = label(d, "tollguard.io/carrier").expect("carrier label");
        // The Deployment mounts its own carrier's ConfigMap ...
        let pod = get(d, &["spec", "template", "spec"]).expect("pod spec");
        let cm_name = seq(pod.get("volumes"))
            .into_iter()
            .find(|v| s(v, &["name"]) == Some("config"))
            .and_then(|v| s(v, &["configMap", "name"]))
            .expect("config volume");
        let cm = configmaps[carrier][0];
        assert_eq!(name(cm), cm_name, "{carrier}: mounted ConfigMap");
        // ... whose config names that carrier.
        let text = s(cm, &["data", "config.toml"]).expect("config.toml");
        let config: toml::Table = toml::from_str(text)
            .unwrap_or_else(|e| panic!("{carrier}: config.toml is not TOML: {e}\n{text}"));
        assert_eq!(
            config["provider_id"].as_str(),
            Some(carrier),
            "{carrier}: provider_id in config.toml"
        );
        // The Service selects exactly this carrier's pods, on its gRPC port.
        let svc = services[carrier][0];
        let selector = get(svc, &["spec", "selector"]).expect("selector");
        let pod_labels = get(d, &["spec", "template", "metadata", "labels"]).expect("labels");
        for (k, v) in selector.as_mapping().expect("selector map") {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "{carrier}: Service selector {k:?}"
            );
        }
        assert_eq!(
            selector.get("tollguard.io/carrier").and_then(Value::as_str),
            Some(carrier)
        );
        let grpc = config["listen"]["grpc"].as_str().expect("listen.grpc");
        let port = seq(get(svc, &["spec", "ports"]))
            .into_iter()
            .find(|p| s(p, &["name"]) == Some("grpc"))
            .and_then(|p| p.get("port")?.as_u64())
            .expect("grpc port");
        assert!(
            grpc.ends_with(&format!(":{port}")),
            "{carrier}: Service port {port} is the listen port {grpc}"
        );
    }
    let bt: toml::Table =
        toml::from_str(s(configmaps["bt"][0], &["data", "config.toml"]).unwrap()).unwrap();
    assert_eq!(bt["listen"]["grpc"].as_str(), Some("0.0.0.0:50052"));
    let att: toml::Table =
        toml::from_str(s(configmaps["att.us"][0], &["data", "config.toml"]).unwrap()).unwrap();
    assert_eq!(
        att["dial_plan"]["international_prefix"].as_str(),
        Some("011")
    );
    assert_eq!(att["dial_plan"]["national_prefix"].as_str(), Some("1"));
    assert_eq!(att["csv"]["time_zone"].as_str(), Some("America/New_York"));
}

#[test]
fn every_container_has_probes() {
    let docs = render_three();
    let mut seen = 0;
    for d in of_kind(&docs, "Deployment") {
        let pod = get(d, &["spec", "template", "spec"]).expect("pod spec");
        for c in seq(pod.get("containers")) {
            let cname = s(c, &["name"]).unwrap_or("?");
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                let p = c
                    .get(probe)
                    .unwrap_or_else(|| panic!("{} container {cname}: no {probe}", name(d)));
                assert!(
                    p.get("httpGet").is_some() || p.get("grpc").is_some(),
                    "{} container {cname}: {probe} probes nothing",
                    name(d)
                );
            }
            assert_eq!(
                s(c, &["livenessProbe", "httpGet", "path"]),
                Some("/livez"),
                "{}: liveness on /livez",
                name(d)
            );
            assert_eq!(
                s(c, &["readinessProbe", "httpGet", "path"]),
                Some("/readyz"),
                "{}: readiness on /readyz",
                name(d)
            );
            seen += 1;
        }
    }
    // three ingesters, the correlator and the notifier (the topics Job's
    // container runs to completion; probes do not apply to it)
    assert_eq!(seen, 5, "containers checked");
    // With mutual TLS (the default) ingesters start up on HTTP /livez:
    // kubelet gRPC probes do not speak TLS.
    for d in of_kind(&docs, "Deployment")
        .into_iter()
        .filter(|d| label(d, "app.kubernetes.io/component") == Some("ingester"))
    {
        let c = &seq(get(d, &["spec", "template", "spec", "containers"]))[0];
        assert_eq!(
            s(c, &["startupProbe", "httpGet", "path"]),
            Some("/livez"),
            "{}: startup probe on /livez under mTLS",
            name(d)
        );
    }
    // In plaintext mode they start up on the gRPC health service of their
    // gRPC port.
    let plain = documents(
        &template(THREE_CARRIERS, &["--set", "ingester.tls.enabled=false"])
            .unwrap_or_else(|e| panic!("helm template failed:\n{e}")),
    );
    for d in of_kind(&plain, "Deployment")
        .into_iter()
        .filter(|d| label(d, "app.kubernetes.io/component") == Some("ingester"))
    {
        let c = &seq(get(d, &["spec", "template", "spec", "containers"]))[0];
        let grpc_port = seq(c.get("ports"))
            .into_iter()
            .find(|p| s(p, &["name"]) == Some("grpc"))
            .and_then(|p| p.get("containerPort")?.as_u64())
            .expect("grpc containerPort");
        assert_eq!(
            get(c, &["startupProbe", "grpc", "port"]).and_then(Value::as_u64),
            Some(grpc_port),
            "{}: startup probe on the gRPC port",
            name(d)
        );
    }
}

#[test]
fn nothing_runs_as_root_or_writes_its_root_filesystem() {
    let docs = render_three();
    let specs = pod_specs(&docs);
    assert!(specs.len() >= 6, "5 Deployments and the topics Job");
    for (what, pod) in specs {
        let psc = pod.get("securityContext");
        let pod_non_root = psc
            .and_then(|p| p.get("runAsNonRoot"))
            .and_then(Value::as_bool);
        let pod_user = psc.and_then(|p| p.get("runAsUser")).and_then(Value::as_i64);
        assert_eq!(pod_non_root, Some(true), "{what}: pod runAsNonRoot");
        assert!(
            matches!(pod_user, Some(u) if u != 0),
            "{what}: pod runAsUser {pod_user:?}"
        );
        assert_eq!(
            psc.and_then(|p| s(p, &["seccompProfile", "type"])),
            Some("RuntimeDefault"),
            "{what}: pod seccomp profile"
        );
        let containers = seq(pod.get("containers"))
            .into_iter()
            .chain(seq(pod.get("initContainers")));
        for c in containers {
            let cname = format!("{what} container {}", s(c, &["name"]).unwrap_or("?"));
            let sc = c
                .get("securityContext")
                .unwrap_or_else(|| panic!("{cname}: no securityContext"));
            let non_root = sc
                .get("runAsNonRoot")
                .and_then(Value::as_bool)
                .or(pod_non_root);
            let user = sc.get("runAsUser").and_then(Value::as_i64).or(pod_user);
            assert_eq!(non_root, Some(true), "{cname}: runAsNonRoot");
            assert!(
                matches!(user, Some(u) if u != 0),
                "{cname}: runAsUser {user:?}"
            );
            assert_eq!(
                sc.get("readOnlyRootFilesystem").and_then(Value::as_bool),
                Some(true),
                "{cname}: readOnlyRootFilesystem"
            );
            assert_eq!(
                sc.get("allowPrivilegeEscalation").and_then(Value::as_bool),
                Some(false),
                "{cname}: allowPrivilegeEscalation"
            );
            assert_ne!(
                sc.get("privileged").and_then(Value::as_bool),
                Some(true),
                "{cname}: privileged"
            );
            let drops: Vec<&str> = seq(get(sc, &["capabilities", "drop"]))
                .into_iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(drops.contains(&"ALL"), "{cname}: capabilities drop ALL");
            // The only writable path is an emptyDir on /tmp.
            let tmp = seq(c.get("volumeMounts"))
                .into_iter()
                .find(|m| s(m, &["mountPath"]) == Some("/tmp"))
                .and_then(|m| s(m, &["name"]))
                .unwrap_or_else(|| panic!("{cname}: no /tmp mount"));
            let vol = seq(pod.get("volumes"))
                .into_iter()
                .find(|v| s(v, &["name"]) == Some(tmp))
                .expect("tmp volume");
            assert!(
                vol.get("emptyDir").is_some(),
                "{cname}: /tmp is an emptyDir"
            );
        }
    }
}

#[test]
fn autoscalers_are_autoscaling_v2() {
    let docs = render_three();
    let hpas = of_kind(&docs, "HorizontalPodAutoscaler");
    // one per carrier and the correlator
    assert_eq!(hpas.len(), CARRIERS.len() + 1, "HPAs");
    let deployments: BTreeSet<&str> = of_kind(&docs, "Deployment").into_iter().map(name).collect();
    for h in hpas {
        assert_eq!(
            s(h, &["apiVersion"]),
            Some("autoscaling/v2"),
            "HPA {}",
            name(h)
        );
        let target = s(h, &["spec", "scaleTargetRef", "name"]).expect("scaleTargetRef");
        assert!(
            deployments.contains(target),
            "HPA {} targets {target}",
            name(h)
        );
        // An autoscaled Deployment leaves the replica count to the HPA.
        let d = of_kind(&docs, "Deployment")
            .into_iter()
            .find(|d| name(d) == target)
            .unwrap();
        assert!(
            get(d, &["spec", "replicas"]).is_none(),
            "{target}: replicas set although autoscaled"
        );
    }
    // The ServiceMonitors render when their API exists.
    assert_eq!(of_kind(&docs, "ServiceMonitor").len(), 3, "ServiceMonitors");
    // Every PDB selects pods of a Deployment.
    assert_eq!(
        of_kind(&docs, "PodDisruptionBudget").len(),
        CARRIERS.len() + 2
    );
}

#[test]
fn topics_are_created_by_a_pre_install_pre_upgrade_hook_job() {
    let docs = render_three();
    let jobs = of_kind(&docs, "Job");
    assert_eq!(jobs.len(), 1, "one Job");
    let job = jobs[0];
    let hook = s(job, &["metadata", "annotations", "helm.sh/hook"]).expect("helm.sh/hook");
    let hooks: BTreeSet<&str> = hook.split(',').map(str::trim).collect();
    assert!(
        hooks.contains("pre-install") && hooks.contains("pre-upgrade"),
        "hook phases: {hook}"
    );
    let c = &seq(get(job, &["spec", "template", "spec", "containers"]))[0];
    let script: String = seq(c.get("args"))
        .into_iter()
        .chain(seq(c.get("command")))
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("kafka-topics.sh"), "uses kafka-topics.sh");
    for (topic, partitions) in [
        ("tollguard.calls.v1", 24),
        ("tollguard.alerts.v1", 6),
        ("tollguard.deliveries.v1", 6),
        ("tollguard.calls.dlq.v1", 3),
    ] {
        assert!(
            script.contains(&format!("ensure '{topic}' {partitions} 3 ")),
            "Job creates {topic} with {partitions} partitions:\n{script}"
        );
    }
    // The SASL credentials of the Job come from the existing Secret.
    let env = seq(c.get("env"));
    assert!(env.iter().any(|e| {
        s(e, &["name"]) == Some("KAFKA_SASL_PASSWORD")
            && s(e, &["valueFrom", "secretKeyRef", "name"]) == Some("kafka-user")
    }));
}

#[test]
fn the_chart_refuses_to_render_without_a_key() {
    // THREE_CARRIERS minus the key secret.
    let without = THREE_CARRIERS.replace("  existingSecret: consortium-key\n", "");
    assert_ne!(without, THREE_CARRIERS);
    let err = template(&without, &[]).expect_err("rendered without a pseudonymisation key");
    assert!(
        err.contains("pseudonymization.existingSecret") && err.contains("pseudonymization.key"),
        "the failure says how to give the key: {err}"
    );
    // With the key inline the chart makes the Secret (and keeps it on uninstall).
    let key = format!("pseudonymization.key={}", "ab".repeat(32));
    let docs =
        documents(&template(&without, &["--set", &key]).expect("renders with an inline key"));
    let secret = of_kind(&docs, "Secret")
        .into_iter()
        .find(|d| name(d) == format!("{RELEASE}-tollguard-pseudonymization"))
        .expect("key Secret");
    assert_eq!(
        s(
            secret,
            &["metadata", "annotations", "helm.sh/resource-policy"]
        ),
        Some("keep")
    );
    // A short key is refused.
    let err = template(&without, &["--set", "pseudonymization.key=tooshort"])
        .expect_err("rendered with a short key");
    assert!(err.contains("at least 32 bytes"), "{err}");
}

/// Runs every Deployment's binary with `--check-config` on its rendered
/// config (mounted paths moved into a temporary directory, environment from
/// the pod spec and from chart-made Secrets, invented values for Secrets made
/// outside the chart); returns how many were checked.
fn check_configs(what: &str, docs: &[Value]) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("etc");
    let key_dir = root.join("secrets/pseudonymization");
    std::fs::create_dir_all(&key_dir).unwrap();
    std::fs::write(key_dir.join("key"), "ab".repeat(32)).unwrap();
    // The ingesters' mTLS Secret (tls.crt, tls.key, ca.crt), made here.
    let tls_dir = root.join("secrets/tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["ingester".to_string()])
        .unwrap()
        .signed_by(&server_key, &rcgen::Issuer::from_params(&ca, &ca_key))
        .unwrap();
    std::fs::write(tls_dir.join("tls.crt"), server.pem()).unwrap();
    std::fs::write(tls_dir.join("tls.key"), server_key.serialize_pem()).unwrap();
    std::fs::write(tls_dir.join("ca.crt"), ca_cert.pem()).unwrap();
    // The Kafka CA mounted from kafka.tls.caSecret.
    std::fs::create_dir_all(root.join("kafka-tls")).unwrap();
    std::fs::write(root.join("kafka-tls/ca.crt"), ca_cert.pem()).unwrap();
    // The Redis CA and client certificate of redis.tls.caSecret/clientSecret.
    std::fs::create_dir_all(root.join("redis-tls/ca")).unwrap();
    std::fs::write(root.join("redis-tls/ca/ca.crt"), ca_cert.pem()).unwrap();
    std::fs::create_dir_all(root.join("redis-tls/client")).unwrap();
    std::fs::write(root.join("redis-tls/client/tls.crt"), server.pem()).unwrap();
    std::fs::write(
        root.join("redis-tls/client/tls.key"),
        server_key.serialize_pem(),
    )
    .unwrap();
    let relocate = |text: &str| text.replace("/etc/tollguard/", &format!("{}/", root.display()));

    // Rules and policies mounted into the correlator: the rendered
    // ConfigMaps, or the examples where they come from existing ConfigMaps.
    let examples = repo_root().join("deploy/examples");
    for (sub, file) in [("rules", "rules.toml"), ("policies", "policies.toml")] {
        let text = of_kind(docs, "ConfigMap")
            .into_iter()
            .find_map(|d| s(d, &["data", file]).map(str::to_string))
            .unwrap_or_else(|| std::fs::read_to_string(examples.join(file)).unwrap());
        std::fs::create_dir_all(root.join(sub)).unwrap();
        std::fs::write(root.join(sub).join(file), text).unwrap();
    }
    // Reference data from an existing ConfigMap: the shipped tables.
    let data = repo_root().join("services/core/data");
    std::fs::create_dir_all(root.join("reference")).unwrap();
    std::fs::copy(
        data.join("range_risk.csv"),
        root.join("reference/risk_table.csv"),
    )
    .unwrap();
    std::fs::copy(
        data.join("rate_deck.csv"),
        root.join("reference/rate_deck.csv"),
    )
    .unwrap();
    let chart_secrets: BTreeMap<&str, &Value> = of_kind(docs, "Secret")
        .into_iter()
        .map(|d| (name(d), d))
        .collect();
    let mut checked = 0;
    for d in of_kind(docs, "Deployment") {
        let pod = get(d, &["spec", "template", "spec"]).unwrap();
        let c = &seq(pod.get("containers"))[0];
        let binary = seq(c.get("command"))[0]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        let cm_name = seq(pod.get("volumes"))
            .into_iter()
            .find(|v| s(v, &["name"]) == Some("config"))
            .and_then(|v| s(v, &["configMap", "name"]))
            .unwrap();
        let cm = of_kind(docs, "ConfigMap")
            .into_iter()
            .find(|m| name(m) == cm_name)
            .unwrap();
        let file = dir.path().join(format!("{}.toml", name(d)));
        std::fs::write(&file, relocate(s(cm, &["data", "config.toml"]).unwrap())).unwrap();
        let mut cmd = Command::new(tollguard_tests::bin(&binary));
        cmd.arg("--check-config")
            .arg("--config")
            .arg(&file)
            .env("TOLLGUARD_LOG_FORMAT", "text");
        // envFrom: chart-made Secrets as rendered; existing ones are opaque.
        for src in seq(c.get("envFrom")) {
            let Some(secret) = s(src, &["secretRef", "name"]).and_then(|n| chart_secrets.get(n))
            else {
                continue;
            };
            if let Some(m) = get(secret, &["stringData"]).and_then(Value::as_mapping) {
                for (k, v) in m {
                    cmd.env(k.as_str().unwrap(), v.as_str().unwrap());
                }
            }
        }
        for e in seq(c.get("env")) {
            let k = s(e, &["name"]).unwrap();
            if !k.starts_with("TOLLGUARD__") {
                continue;
            }
            let v = match (s(e, &["value"]), k) {
                (Some(v), _) => v.to_string(),
                (None, "TOLLGUARD__REDIS__URL") => "redis://:pw@redis:6379/".into(),
                (None, _) => "secret-from-kubernetes".into(),
            };
            cmd.env(k, relocate(&v));
        }
        let out = cmd.output().expect("run --check-config");
        assert!(
            out.status.success(),
            "{what}: {binary} --check-config rejected the config of {}:\n{}{}\n--- config:\n{}",
            name(d),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&file).unwrap()
        );
        checked += 1;
    }
    checked
}

/// The rendered config files of the three-carrier install and of every
/// `ci/*-values.yaml` scenario are accepted by the service binaries'
/// `--check-config`: every key known, every value valid.
#[test]
fn rendered_configs_pass_the_services_check_config() {
    let docs = render_three();
    assert_eq!(
        check_configs("three carriers", &docs),
        5,
        "three ingesters, the correlator and the notifier"
    );
    let mut scenarios: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("ci/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    scenarios.sort();
    assert!(scenarios.len() >= 3, "ci scenarios: {scenarios:?}");
    for f in scenarios {
        let values = std::fs::read_to_string(&f).unwrap();
        let out = template(&values, &["--api-versions", "keda.sh/v1alpha1"])
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let n = check_configs(&f.display().to_string(), &documents(&out));
        assert!(n >= 3, "{}: {n} Deployments checked", f.display());
    }
}

/// Dotted paths of the leaves of values.yaml (maps are walked; lists and
/// empty maps are leaves).
fn value_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_mapping() {
        Some(m) if !m.is_empty() => {
            for (k, child) in m {
                let k = k.as_str().expect("string keys");
                let p = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                value_paths(child, &p, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn chart_values() -> Value {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml");
    serde_norway::from_str(&text).expect("values.yaml parses")
}

#[test]
fn readme_documents_every_value() {
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("chart README.md");
    let mut paths = Vec::new();
    value_paths(&chart_values(), "", &mut paths);
    let documented = |q: &str| readme.contains(&format!("`{q}`"));
    // Entries of the free-form topic config maps (`retention.ms`, ...) are
    // documented by their map.
    let topic_config = |p: &str| {
        p.starts_with("topics.")
            && p.find(".config.")
                .is_some_and(|i| documented(&p[..i + ".config".len()]))
    };
    // Label selectors (`matchLabels: {kubernetes.io/metadata.name: …}`) are
    // documented by the selector.
    let label_map = |p: &str| {
        p.match_indices('.')
            .any(|(i, _)| p[i + 1..].contains('/') && documented(&p[..i]))
    };
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !documented(p) && !topic_config(p) && !label_map(p))
        .collect();
    assert!(
        missing.is_empty(),
        "values not documented in helm/tollguard/README.md: {missing:?}"
    );
}

#[test]
fn schema_covers_every_value() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("schema"),
    )
    .expect("schema is JSON");
    let resolve = |node: &serde_json::Value| -> serde_json::Value {
        match node.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => {
                let name = r.strip_prefix("#/$defs/").expect("local $ref");
                schema["$defs"][name].clone()
            }
            None => node.clone(),
        }
    };
    let mut paths = Vec::new();
    value_paths(&chart_values(), "", &mut paths);
    for p in paths {
        let mut node = schema.clone();
        for part in p.split('.') {
            let props = node.get("properties").cloned();
            let next = props.as_ref().and_then(|props| props.get(part)).cloned();
            match next {
                Some(n) => node = resolve(&n),
                None => {
                    // Free-form maps (additionalProperties as a schema) take any key.
                    assert!(
                        node.get("additionalProperties")
                            .is_some_and(|a| a.is_object())
                            || (node.get("type") == Some(&serde_json::json!("object"))
                                && node.get("properties").is_none()),
                        "values.schema.json does not describe `{p}` (at `{part}`)"
                    );
                    break;
                }
            }
        }
    }
}

/// The notifier serves the Alerts API: a `grpc` container and Service port,
/// `listen.grpc` and mutual TLS from a mounted Secret (every carrier's
/// certificate identity mapped to it), its state in the shared Redis with the
/// correlator's key prefix, and a NetworkPolicy admitting the gRPC port from
/// the configured peers and letting it reach Redis.
#[test]
fn the_notifier_serves_the_alerts_api_over_mtls_with_state_in_redis() {
    let values = format!(
        "{THREE_CARRIERS}\nnotifier:\n  networkPolicy:\n    grpcFrom:\n      - ipBlock:\n          cidr: 10.20.0.0/16\n"
    );
    let docs = documents(&template(&values, &[]).unwrap_or_else(|e| panic!("{e}")));
    let deploy = of_kind(&docs, "Deployment")
        .into_iter()
        .find(|d| label(d, "app.kubernetes.io/component") == Some("notifier"))
        .expect("notifier Deployment");
    let pod = get(deploy, &["spec", "template", "spec"]).unwrap();
    let c = &seq(pod.get("containers"))[0];
    let ports: BTreeMap<&str, i64> = seq(c.get("ports"))
        .into_iter()
        .map(|p| {
            (
                s(p, &["name"]).unwrap(),
                get(p, &["containerPort"]).unwrap().as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports.get("grpc"), Some(&50053), "{ports:?}");
    assert!(
        seq(c.get("volumeMounts"))
            .iter()
            .any(|m| s(m, &["mountPath"]) == Some("/etc/tollguard/secrets/tls")),
        "the Alerts API's TLS Secret is mounted"
    );
    assert!(
        seq(pod.get("volumes"))
            .iter()
            .any(|v| s(v, &["secret", "secretName"]) == Some("tg-tollguard-notifier-tls")),
        "default Secret name: {:?}",
        pod.get("volumes")
    );
    let svc = of_kind(&docs, "Service")
        .into_iter()
        .find(|d| label(d, "app.kubernetes.io/component") == Some("notifier"))
        .expect("notifier Service");
    assert!(
        seq(get(svc, &["spec", "ports"]))
            .iter()
            .any(|p| s(p, &["name"]) == Some("grpc") && s(p, &["targetPort"]) == Some("grpc")),
        "the Service exposes the Alerts API"
    );
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|d| name(d) == name(deploy))
        .expect("notifier ConfigMap");
    let config: toml::Table = s(cm, &["data", "config.toml"]).unwrap().parse().unwrap();
    assert_eq!(config["listen"]["grpc"].as_str(), Some("0.0.0.0:50053"));
    assert_eq!(
        config["redis"]["url"].as_str(),
        Some("redis://redis-master:6379/")
    );
    assert_eq!(config["redis"]["key_prefix"].as_str(), Some("tg:"));
    assert_eq!(
        config["tls"]["client_ca_file"].as_str(),
        Some("/etc/tollguard/secrets/tls/ca.crt")
    );
    for carrier in CARRIERS {
        assert_eq!(
            config["tls"]["clients"][carrier].as_str(),
            Some(carrier),
            "{config:?}"
        );
    }
    let np = of_kind(&docs, "NetworkPolicy")
        .into_iter()
        .find(|d| name(d) == name(deploy))
        .expect("notifier NetworkPolicy");
    let grpc_rule = seq(get(np, &["spec", "ingress"]))
        .into_iter()
        .find(|r| {
            seq(r.get("ports"))
                .iter()
                .any(|p| s(p, &["port"]) == Some("grpc"))
        })
        .expect("an ingress rule for the Alerts API");
    assert_eq!(
        s(seq(grpc_rule.get("from"))[0], &["ipBlock", "cidr"]),
        Some("10.20.0.0/16")
    );
    assert!(
        seq(get(np, &["spec", "egress"]))
            .iter()
            .any(|r| seq(r.get("ports"))
                .iter()
                .any(|p| get(p, &["port"]).and_then(Value::as_i64) == Some(6379))),
        "the notifier may reach Redis"
    );

    // Plaintext development mode and no API at all.
    let docs = documents(
        &template(&values, &["--set", "notifier.tls.enabled=false"])
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|d| name(d) == "tg-tollguard-notifier")
        .unwrap();
    let config: toml::Table = s(cm, &["data", "config.toml"]).unwrap().parse().unwrap();
    assert_eq!(config["tls"]["enabled"].as_bool(), Some(false));
    let docs = documents(
        &template(&values, &["--set", "notifier.grpcPort=0"]).unwrap_or_else(|e| panic!("{e}")),
    );
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|d| name(d) == "tg-tollguard-notifier")
        .unwrap();
    let config: toml::Table = s(cm, &["data", "config.toml"]).unwrap().parse().unwrap();
    assert!(
        config["listen"].get("grpc").is_none() && config.get("tls").is_none(),
        "{config:?}"
    );
}

/// With a collector endpoint every service gets the standard OTEL_*
/// variables (its own service name) and may reach the collector; without
/// one, none of them is set.
#[test]
fn tracing_sets_the_standard_otel_variables_and_opens_the_collector_port() {
    let values = format!(
        "{THREE_CARRIERS}\ntracing:\n  otlpEndpoint: http://otel-collector.monitoring:4317\n  samplerRatio: 0.25\n  resourceAttributes:\n    deployment.environment: prod\n"
    );
    let docs = documents(&template(&values, &[]).unwrap_or_else(|e| panic!("{e}")));
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(
        deployments.len(),
        5,
        "three ingesters, correlator, notifier"
    );
    for d in &deployments {
        let c = &seq(get(d, &["spec", "template", "spec", "containers"]))[0];
        let env: BTreeMap<&str, &str> = seq(c.get("env"))
            .into_iter()
            .filter_map(|e| Some((s(e, &["name"])?, s(e, &["value"])?)))
            .collect();
        let component = label(d, "app.kubernetes.io/component").unwrap();
        assert_eq!(
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            Some(&"http://otel-collector.monitoring:4317"),
            "{}",
            name(d)
        );
        assert_eq!(
            env.get("OTEL_SERVICE_NAME").copied(),
            Some(format!("tollguard-{component}").as_str())
        );
        assert_eq!(
            env.get("OTEL_TRACES_SAMPLER"),
            Some(&"parentbased_traceidratio")
        );
        assert_eq!(env.get("OTEL_TRACES_SAMPLER_ARG"), Some(&"0.25"));
        let attrs = env["OTEL_RESOURCE_ATTRIBUTES"];
        assert!(
            attrs.contains("deployment.environment=prod")
                && attrs.contains("k8s.namespace.name=tollguard")
                && attrs.contains("k8s.pod.name=$(POD_NAME)"),
            "{attrs}"
        );
    }
    for np in of_kind(&docs, "NetworkPolicy") {
        assert!(
            seq(get(np, &["spec", "egress"]))
                .iter()
                .any(|r| seq(r.get("ports"))
                    .iter()
                    .any(|p| get(p, &["port"]).and_then(Value::as_i64) == Some(4317))),
            "{} may not reach the collector",
            name(np)
        );
    }
    // Without an endpoint: no OTEL_* variable at all (traces off).
    for d in of_kind(&render_three(), "Deployment") {
        let c = &seq(get(d, &["spec", "template", "spec", "containers"]))[0];
        assert!(
            !seq(c.get("env"))
                .iter()
                .any(|e| s(e, &["name"]).is_some_and(|n| n.starts_with("OTEL_"))),
            "{}",
            name(d)
        );
    }
}
