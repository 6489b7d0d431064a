//! The fuzz targets (`fuzz/src/targets.rs`) on the stable toolchain: every
//! kept crash or regression input in `fuzz/regressions/<target>/`, the seed
//! corpus in `fuzz/seeds/<target>/`, and a bounded proptest run of random
//! and mutated inputs per target (`TOLLGUARD_FUZZ_CASES`, default 2000).
//! The open-ended fuzzing runs with `cargo fuzz` (fuzz/README.md).

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("jsonl_record", targets::jsonl_record),
    ("csv_mapping", targets::csv_mapping),
    ("number", targets::number),
    ("config", targets::config),
];

fn dir(kind: &str, target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target)
}

fn files(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir(kind, target)) else {
        return Vec::new();
    };
    let mut v: Vec<(String, Vec<u8>)> = rd
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .filter(|e| e.file_name() != ".gitkeep")
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn kept_regression_and_seed_inputs_pass() {
    let mut n = 0;
    for (t, f) in TARGETS {
        let seeds = files("seeds", t);
        assert!(!seeds.is_empty(), "no seeds for {t}");
        for (name, data) in files("regressions", t).into_iter().chain(seeds) {
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{t}: {name} panics");
            n += 1;
        }
    }
    assert!(n >= TARGETS.len());
}

/// Bytes from a seed with random byte-level mutations (flip, insert,
/// delete, splice of interesting tokens).
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    const TOKENS: &[&str] = &[
        "\u{0}",
        "\u{7f}",
        "\u{202e}",
        "\n",
        "\"",
        "\\",
        "{",
        "}",
        "[",
        "]",
        ":",
        ";",
        ",",
        "1e999",
        "-0",
        "NaN",
        "+",
        "00",
        "0",
        "9999999999999999999999",
        "null",
        "true",
        "2999-01-01T00:00:00Z",
        "\u{ff10}",
        "é",
    ];
    (
        0..seeds.len(),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0u8..4,
                0..TOKENS.len(),
                any::<u8>(),
            ),
            0..12,
        ),
    )
        .prop_map(move |(i, edits)| {
            let mut b = seeds[i].clone();
            for (at, kind, tok, byte) in edits {
                let pos = if b.is_empty() {
                    0
                } else {
                    at.index(b.len() + 1)
                };
                match kind {
                    0 if pos < b.len() => b[pos] ^= byte,
                    1 => b.insert(pos.min(b.len()), byte),
                    2 if pos < b.len() => {
                        b.remove(pos);
                    }
                    _ => {
                        let at = pos.min(b.len());
                        b.splice(at..at, TOKENS[tok].bytes());
                    }
                }
            }
            b
        })
}

#[test]
fn bounded_random_and_mutated_inputs_never_panic() {
    let cases: u32 = std::env::var("TOLLGUARD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for (t, f) in TARGETS {
        let seeds: Vec<Vec<u8>> = files("seeds", t).into_iter().map(|(_, d)| d).collect();
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = prop_oneof![prop::collection::vec(any::<u8>(), 0..256), mutated(seeds),];
        runner
            .run(&strategy, |data| {
                f(&data);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{t}: {e}"));
    }
}
