//! The embedded demo catches the 2011 case; replay and simulate behave.

use tollguard_cli::common::PipelineOpts;
use tollguard_cli::demo::{DemoArgs, simulate_and_detect};
use tollguard_cli::input::Format;
use tollguard_cli::replay::{ReplayArgs, run as replay};
use tollguard_cli::simulate::{Preset, SimulateArgs, run as simulate};
use tollguard_core::codec::from_ts;
use tollguard_core::money::MICROS;
use tollguard_proto::v1 as pb;

fn pipeline() -> PipelineOpts {
    PipelineOpts {
        rules: None,
        policies: None,
        key_file: None,
        key_id: "k1".into(),
        risk_table: None,
        rate_deck: None,
        range_digits: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_detects_the_2011_hack_within_five_minutes_and_no_benign_critical() {
    let args = DemoArgs {
        json: false,
        seed: 2011,
        enterprises: 300,
    };
    let o = simulate_and_detect(&args, &pipeline()).await.unwrap();
    let first = o
        .first_critical
        .as_ref()
        .expect("the hack is detected as critical");
    let at = from_ts(first.detected_at.as_ref().unwrap());
    let delay = at - o.first_fraud;
    assert!(
        (0..=5 * 60_000).contains(&delay),
        "detected {delay} ms after the first fraudulent call"
    );
    assert!(
        o.loss_at_detection < 500 * MICROS,
        "loss at detection {}",
        o.loss_at_detection
    );
    let mut providers = first.providers.clone();
    providers.sort();
    assert_eq!(
        providers,
        vec!["bt".to_string(), "kpn".to_string()],
        "via both carriers"
    );
    let subject = first.subject.as_ref().unwrap();
    assert_eq!(subject.range, "+67077");
    assert_eq!(subject.country, "TL");
    assert_eq!(first.rule, pb::Rule::MultiCarrierBurst as i32);
    assert!(
        o.benign_critical.is_empty(),
        "benign critical incidents: {:?}",
        o.benign_critical
    );
    // No single carrier alone crossed the burst threshold at detection.
    for (p, (before, _, _)) in &o.carriers {
        assert!(*before < 6, "{p} saw {before} calls before detection");
    }
    // One incident per rule for the victim: updates and escalations, no duplicates.
    let mut by_rule = std::collections::BTreeMap::new();
    for a in o.alerts.iter().filter(|a| {
        a.subject
            .as_ref()
            .and_then(|s| s.customer.as_ref())
            .is_some_and(|c| format!("{}:{}", c.key_id, c.value) == o.victim)
    }) {
        by_rule
            .entry(a.rule)
            .or_insert_with(std::collections::BTreeSet::new)
            .insert(a.incident_id.clone());
    }
    assert!(by_rule.values().all(|ids| ids.len() == 1), "{by_rule:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reports_bad_lines_by_number_and_processes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimulateArgs {
        out: dir.path().to_path_buf(),
        preset: Preset::Pbx2011,
        seed: 7,
        days: Some(4),
        enterprises: Some(20),
    };
    let mut err = Vec::new();
    let (n, files) = simulate(&sim, &mut err).unwrap();
    assert!(n > 1000);
    // Deterministic: same seed, same bytes.
    let dir2 = tempfile::tempdir().unwrap();
    simulate(
        &SimulateArgs {
            out: dir2.path().to_path_buf(),
            ..sim
        },
        &mut Vec::new(),
    )
    .unwrap();
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(dir2.path().join(name)).unwrap(),
            "{name:?}"
        );
    }
    // Corrupt two lines of the kpn file.
    let kpn = dir.path().join("kpn.jsonl");
    let text = std::fs::read_to_string(&kpn).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let total = lines.len() as u64;
    lines[2] = "{\"provider_id\": \"kpn\", \"event_id\": 5".into();
    lines[9] = lines[9]
        .replace("\"phase\":\"end\"", "\"phase\":\"later\"")
        .replace("\"phase\":\"start\"", "\"phase\":\"later\"")
        .replace("\"phase\":\"interim\"", "\"phase\":\"later\"");
    std::fs::write(&kpn, lines.join("\n") + "\n").unwrap();
    let args = ReplayArgs {
        files: vec![kpn.clone(), dir.path().join("bt.jsonl")],
        json: true,
        format: Format::Auto,
        csv_mapping: None,
        home_country: "NL".into(),
        chunk: 1000,
        pipeline: pipeline(),
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let s = replay(&args, &mut out, &mut err).await.unwrap();
    let err = String::from_utf8(err).unwrap();
    assert!(err.contains("kpn.jsonl:3: record: not valid JSON"), "{err}");
    assert!(
        err.contains("kpn.jsonl:10: phase: `later` is not one of start, interim, end"),
        "{err}"
    );
    assert_eq!(s.rejected, 2);
    let bt_lines = std::fs::read_to_string(dir.path().join("bt.jsonl"))
        .unwrap()
        .lines()
        .count() as u64;
    assert_eq!(s.read, total + bt_lines);
    assert_eq!(s.accepted, total + bt_lines - 2);
    // The hack is still found, and the JSON output is one alert per line.
    let out = String::from_utf8(out).unwrap();
    let alerts: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        alerts
            .iter()
            .any(|a| a["rule"] == "multi_carrier_burst" && a["severity"] == "critical")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_suite_catches_every_campaign_without_false_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let args = tollguard_cli::eval::EvalArgs {
        seed: 2011,
        enterprises: 300,
        json: Some(dir.path().join("report.json")),
        svg: Some(dir.path().join("timeline.svg")),
        kafka: None,
        redis: None,
        pipeline: pipeline(),
    };
    let mut out = Vec::new();
    let r = tollguard_cli::eval::run(&args, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let kinds: Vec<&str> = r.campaigns.iter().map(|c| c.kind.as_str()).collect();
    for k in [
        "multi_carrier_pbx_hack",
        "distributed_irsf",
        "probe_then_pump",
        "wangiri",
        "concurrency_burst",
        "slow_burn",
    ] {
        assert!(kinds.contains(&k), "suite lacks {k}");
    }
    for c in &r.campaigns {
        assert!(c.detected, "{} not detected:\n{text}", c.campaign);
    }
    let pbx = r
        .campaigns
        .iter()
        .find(|c| c.kind == "multi_carrier_pbx_hack")
        .unwrap();
    assert!(pbx.first_critical_s.unwrap() <= 300, "{text}");
    let lost = pbx.loss_at_detection.unwrap();
    assert!(
        lost > 0 && lost < 500 * MICROS && pbx.loss_total > 100 * lost,
        "{text}"
    );
    assert_eq!(r.false_critical_incidents, 0, "{text}");
    assert!(r.fp_per_million <= 1.0, "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["campaigns"].as_array().unwrap().len(),
        r.campaigns.len()
    );
    let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<circle"),
        "timeline has alert marks"
    );
}

/// Shifts `start_time` and `answer_time` of every record in `file` by
/// `secs` (a carrier whose clock is off).
fn skew(file: &std::path::Path, secs: i64) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        for f in ["start_time", "answer_time"] {
            if let Some(t) = v.get(f).and_then(|t| t.as_str()) {
                let t = chrono::DateTime::parse_from_rfc3339(t).unwrap()
                    + chrono::Duration::seconds(secs);
                v[f] =
                    serde_json::Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            }
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    std::fs::write(file, out).unwrap();
}

/// Critical incidents as (rule, customer, range) with how many distinct
/// incident ids each has, and the first critical burst's detection time.
async fn critical_incidents(
    files: Vec<std::path::PathBuf>,
    key: &std::path::Path,
) -> (
    std::collections::BTreeMap<(i32, String, String), std::collections::BTreeSet<String>>,
    i64,
) {
    let args = ReplayArgs {
        files,
        json: true,
        format: Format::Auto,
        csv_mapping: None,
        home_country: "NL".into(),
        chunk: 1000,
        pipeline: PipelineOpts {
            key_file: Some(key.to_path_buf()),
            ..pipeline()
        },
    };
    let s = replay(&args, &mut Vec::new(), &mut Vec::new())
        .await
        .unwrap();
    let mut m = std::collections::BTreeMap::new();
    let mut first_burst = i64::MAX;
    for a in &s.alerts {
        if a.severity != pb::Severity::Critical as i32 {
            continue;
        }
        let sub = a.subject.clone().unwrap_or_default();
        let cust = sub.customer.map(|c| c.value).unwrap_or_default();
        m.entry((a.rule, cust, sub.range.clone()))
            .or_insert_with(std::collections::BTreeSet::new)
            .insert(a.incident_id.clone());
        if a.rule == pb::Rule::MultiCarrierBurst as i32 && sub.range == "+67077" {
            first_burst = first_burst.min(from_ts(a.detected_at.as_ref().unwrap()));
        }
    }
    (m, first_burst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carriers_clocks_minutes_apart_or_exports_in_one_file_neither_miss_nor_duplicate_incidents()
{
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef-skew-test").unwrap();
    let sim = |name: &str| {
        let out = dir.path().join(name);
        simulate(
            &SimulateArgs {
                out: out.clone(),
                preset: Preset::Consortium,
                seed: 2011,
                days: Some(3),
                enterprises: Some(60),
            },
            &mut Vec::new(),
        )
        .unwrap();
        out
    };
    let files = |d: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        v.sort();
        v
    };
    let exact = sim("exact");
    let skewed = sim("skewed");
    // bt's clock runs three minutes fast, kpn's two minutes slow.
    skew(&skewed.join("bt.jsonl"), 180);
    skew(&skewed.join("kpn.jsonl"), -120);
    let (want, t_exact) = critical_incidents(files(&exact), &key).await;
    let (got, t_skewed) = critical_incidents(files(&skewed), &key).await;
    assert!(
        t_exact < i64::MAX,
        "the 2011 burst is critical with exact clocks: {want:?}"
    );
    assert!(
        t_skewed < i64::MAX,
        "the 2011 burst was missed with skewed clocks: {got:?}"
    );
    // Detected within the skew of the exact-clock detection.
    assert!(
        (t_skewed - t_exact).abs() <= 5 * 60_000,
        "detection moved by {} s",
        (t_skewed - t_exact) / 1000
    );
    // Same critical incidents, one incident each (no duplicates).
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "skew changed which incidents are critical"
    );
    for (k, ids) in &got {
        assert_eq!(
            ids.len(),
            1,
            "{k:?} became {} incidents: {ids:?}",
            ids.len()
        );
    }
    // One file holding every carrier's export one after another (3 days of
    // bt, then 3 days of kpn, …): replay puts it in event-time order, so the
    // cross-carrier joins are the same as from the per-carrier files.
    let all = dir.path().join("all.jsonl");
    let mut text = String::new();
    for f in files(&exact) {
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    std::fs::write(&all, text).unwrap();
    let (got, t_all) = critical_incidents(vec![all], &key).await;
    assert_eq!(t_all, t_exact, "one concatenated file: {got:?}");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "one concatenated file changed which incidents are critical"
    );
}
