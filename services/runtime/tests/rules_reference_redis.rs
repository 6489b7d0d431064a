//! The rules reference property test over the real Redis store (Redis store
//! ≡ reference model), with the cases of `services/core/tests/rules_reference.rs`.

#[path = "../../core/tests/common/rules_ref.rs"]
mod rules_ref;

use proptest::prelude::*;
use rules_ref::{call_spec, run_case};
use tollguard_runtime::redis_store::RedisStore;

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn redis_store_rules_agree_with_reference(
        calls in prop::collection::vec(call_spec(), 1..14),
        jitter_seed in any::<u64>(),
        dup_every in 2usize..7,
    ) {
        let url = std::env::var("TOLLGUARD_REDIS_URL").expect(
            "TOLLGUARD_REDIS_URL is not set: run `bash deploy/local/services.sh start` and `eval \"$(bash deploy/local/services.sh env)\"`",
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let prefix = format!("tgtest:rules:{:08x}:", rand::random::<u32>());
        let store = rt.block_on(RedisStore::connect(&url, &prefix)).unwrap();
        run_case(&store, &rt, &calls, jitter_seed, dup_every)?;
    }
}
