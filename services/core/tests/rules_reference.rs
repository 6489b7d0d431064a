//! Property test: the rules over the in-memory window store agree with a
//! naive reference computation over the set of distinct events seen so far,
//! on random event sequences shuffled within the allowed lateness and with
//! duplicates re-sent. (`services/runtime/tests/rules_reference_redis.rs`
//! runs the same cases over the Redis store.)

mod common;

use common::rules_ref::{call_spec, run_case};
use proptest::prelude::*;
use tollguard_core::store::MemoryStore;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_rules_agree_with_reference(
        calls in prop::collection::vec(call_spec(), 1..14),
        jitter_seed in any::<u64>(),
        dup_every in 2usize..7,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        run_case(&MemoryStore::new("tg:"), &rt, &calls, jitter_seed, dup_every)?;
    }
}
