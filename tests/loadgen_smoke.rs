//! Smoke test of the end-to-end load generator (`benches/loadgen`): a
//! 5-second run against the real Kafka and Redis with the built (debug)
//! service binaries exits 0 and reports a nonzero throughput. Not a timed
//! test: no figure is asserted beyond "something flowed end to end".

use std::process::Command;

use tollguard_tests::*;

#[test]
fn loadgen_runs_briefly_and_reports_throughput() {
    let out = Command::new(bin("loadgen"))
        .args([
            "--duration",
            "5",
            "--baseline-duration",
            "2",
            "--drain",
            "20",
            "--rate",
            "2000",
            "--carriers",
            "2",
            "--json",
            "--bin-dir",
            bin_dir().to_str().unwrap(),
            "--kafka",
            &kafka(),
            "--redis",
            &redis(),
        ])
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON: {e}: {stderr}"));
    let p = &report["pipeline"];
    assert!(p["accepted"].as_u64().unwrap() > 0, "{report}");
    assert!(p["correlated_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(p["rejected"].as_u64(), Some(0), "{report}");
    assert!(
        report["baseline"]["events_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["ack_latency_ms"]["count"].as_u64().unwrap() > 0,
        "{report}"
    );
    let services = report["services"].as_array().unwrap();
    let ours = services
        .iter()
        .filter(|s| s["infrastructure"] == false)
        .count();
    assert_eq!(ours, 3, "two ingesters and the correlator: {report}");
    assert!(stderr.contains("cleaning up"), "{stderr}");
}
