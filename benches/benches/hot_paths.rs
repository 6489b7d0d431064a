//! Criterion benchmarks of the hot functions: record parsing, number
//! normalisation, pseudonymisation, the whole ingest of one record, rule
//! evaluation over the memory store, and a Redis store batch update (when
//! `TOLLGUARD_REDIS_URL` is set).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tollguard_core::ingest::{Ingestor, ReferenceData};
use tollguard_core::number::{DialPlan, Normalizer};
use tollguard_core::pseudo::{Key, Kind, Pseudonymizer};
use tollguard_core::record::RawRecord;
use tollguard_core::rules::{Detector, Engine, HotList, Policies, RulesConfig};
use tollguard_core::sim::{self, Scenario};
use tollguard_core::store::{MemoryStore, WindowStore};
use tollguard_core::tables::RiskTable;

const LINE: &str = r#"{"provider_id":"kpn","event_id":"e1","call_id":"c1","phase":"end","customer_id":"kvk:30123456","line_id":"trunk-1","caller":"0302001000","callee":"0067077123456","direction":"outbound","start_time":"2011-06-11T00:47:00+02:00","duration_s":605,"disposition":"answered"}"#;

fn key() -> Key {
    Key::new("k1", &[7u8; 32]).unwrap()
}

fn ingestor() -> Ingestor {
    Ingestor::new(
        "kpn",
        DialPlan::new("NL"),
        2,
        Pseudonymizer::new(key()),
        Arc::new(ReferenceData::default()),
    )
    .unwrap()
}

fn events(n: usize) -> Vec<tollguard_core::CallEvent> {
    let mut sc = Scenario::pbx2011(7);
    sc.enterprises = 60;
    let out = sim::generate(&sc);
    let ings: Vec<Ingestor> = sim::default_carriers()
        .iter()
        .map(|c| {
            Ingestor::new(
                &c.id,
                DialPlan::new(&c.home_country),
                2,
                Pseudonymizer::new(key()),
                Arc::new(ReferenceData::default()),
            )
            .unwrap()
        })
        .collect();
    out.records
        .iter()
        .take(n)
        .map(|r| {
            let ing = ings.iter().find(|i| i.provider_id() == r.provider).unwrap();
            ing.ingest(&r.record, 1_800_000_000_000).unwrap()
        })
        .collect()
}

fn parsing(c: &mut Criterion) {
    c.bench_function("parse_jsonl_record", |b| {
        b.iter(|| RawRecord::from_json_line(black_box(LINE)).unwrap())
    });
    let n = Normalizer::new(DialPlan::new("NL"), 2).unwrap();
    let risk = RiskTable::default_table();
    c.bench_function("normalize_classify_number", |b| {
        b.iter(|| {
            n.normalize("callee", black_box("0067077123456"), &risk)
                .unwrap()
        })
    });
    let k = key();
    c.bench_function("pseudonymize_token", |b| {
        b.iter(|| k.token(Kind::Number, black_box("+67077123456")))
    });
    let ing = ingestor();
    let raw = RawRecord::from_json_line(LINE).unwrap();
    c.bench_function("ingest_record_cached", |b| {
        b.iter(|| ing.ingest(black_box(&raw), 1_800_000_000_000).unwrap())
    });
}

fn rules(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let evs = events(2000);
    let mut g = c.benchmark_group("engine");
    g.throughput(criterion::Throughput::Elements(evs.len() as u64));
    g.sample_size(10);
    g.bench_function("memory_store_2000_events", |b| {
        b.iter_batched(
            || {
                let det = Detector::new(
                    RulesConfig::default(),
                    Policies::default(),
                    HotList::default(),
                )
                .unwrap();
                Engine::new(
                    Arc::new(MemoryStore::new("tg:")) as Arc<dyn WindowStore>,
                    det,
                )
            },
            |engine| rt.block_on(engine.process(&evs, &[], 0)).unwrap(),
            BatchSize::LargeInput,
        )
    });
    if let Ok(url) = std::env::var("TOLLGUARD_REDIS_URL") {
        let mut run = 0u32;
        g.bench_function("redis_store_2000_events", |b| {
            b.iter_batched(
                || {
                    // A fresh key prefix per iteration: no event is a duplicate.
                    run += 1;
                    let prefix = format!("tgbench:{}:{run}:", std::process::id());
                    let store = rt
                        .block_on(tollguard_runtime::redis_store::RedisStore::connect(
                            &url, &prefix,
                        ))
                        .unwrap();
                    Engine::new(
                        Arc::new(store) as Arc<dyn WindowStore>,
                        Detector::new(
                            RulesConfig::default(),
                            Policies::default(),
                            HotList::default(),
                        )
                        .unwrap(),
                    )
                },
                |engine| rt.block_on(engine.process(&evs, &[], 0)).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, parsing, rules);
criterion_main!(benches);
