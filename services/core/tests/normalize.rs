//! Golden normalisation tests: every number form, the four carriers' styles,
//! impossible numbers refused with a reason, unallocated numbers accepted and
//! flagged (DESIGN §3).

use tollguard_core::model::{NumberType, RiskTier};
use tollguard_core::number::{DialPlan, Normalizer};
use tollguard_core::tables::RiskTable;

fn nl() -> Normalizer {
    Normalizer::new(DialPlan::new("NL"), 2).unwrap()
}

fn ok(n: &Normalizer, raw: &str) -> (String, String, String, NumberType, RiskTier, bool) {
    let r = n
        .normalize("callee", raw, &RiskTable::default_table())
        .unwrap_or_else(|e| panic!("{raw}: {e}"));
    (
        r.e164,
        r.info.country,
        r.info.range,
        r.info.number_type,
        r.info.risk_tier,
        r.info.unallocated,
    )
}

fn err(n: &Normalizer, raw: &str) -> String {
    let e = n
        .normalize("callee", raw, &RiskTable::default_table())
        .expect_err(raw);
    assert_eq!(e.field, "callee");
    e.reason
}

#[test]
fn all_forms_of_one_number_agree() {
    let n = nl();
    for raw in [
        "+31301234567",
        "0301234567",
        "0031301234567",
        "+31 30 123 4567",
        "030-1234567",
        "(030) 123 45 67",
    ] {
        assert_eq!(ok(&n, raw).0, "+31301234567", "{raw}");
    }
}

#[test]
fn east_timor_in_every_carrier_style() {
    // kpn: national dialling; bt: E.164; vodafone: 00; odido: spaced.
    let kpn = nl();
    let bt = Normalizer::new(DialPlan::new("GB"), 2).unwrap();
    for (n, raw) in [
        (&kpn, "0067077123456"),
        (&bt, "+67077123456"),
        (&kpn, "00670 7712 3456"),
        (&bt, "0067077123456"),
        (&kpn, "+670 77 12 3456"),
    ] {
        assert_eq!(
            ok(n, raw),
            (
                "+67077123456".into(),
                "TL".into(),
                "+67077".into(),
                NumberType::Mobile,
                RiskTier::High,
                false
            ),
            "{raw}"
        );
    }
}

#[test]
fn home_country_decides_national_forms() {
    let gb = Normalizer::new(DialPlan::new("GB"), 2).unwrap();
    assert_eq!(ok(&gb, "02079460958").0, "+442079460958");
    assert_eq!(ok(&nl(), "0201234567").0, "+31201234567");
    let mut us = DialPlan::new("US");
    us.international_prefix = "011".into();
    us.national_prefix = "1".into();
    let us = Normalizer::new(us, 2).unwrap();
    assert_eq!(ok(&us, "2125550123").0, "+12125550123");
    assert_eq!(ok(&us, "12125550123").0, "+12125550123");
    assert_eq!(ok(&us, "011442079460958").0, "+442079460958");
    let mut sel = DialPlan::new("NL");
    sel.strip_prefixes = vec!["1601".into()];
    let sel = Normalizer::new(sel, 2).unwrap();
    assert_eq!(ok(&sel, "16010067077123456").0, "+67077123456");
}

#[test]
fn classification() {
    let n = nl();
    assert_eq!(ok(&n, "0612345678").3, NumberType::Mobile);
    let prem = ok(&n, "09001234567");
    assert_eq!((prem.3, prem.4), (NumberType::Premium, RiskTier::Elevated));
    let sat = ok(&n, "+881612345678");
    assert_eq!(
        (sat.1.as_str(), sat.3, sat.4),
        ("001", NumberType::InternationalNetwork, RiskTier::Critical)
    );
    let intl = ok(&n, "+88212345678");
    assert_eq!(
        (intl.3, intl.4),
        (NumberType::InternationalNetwork, RiskTier::Critical)
    );
    assert_eq!(ok(&n, "+447012345678").3, NumberType::Personal);
    assert_eq!(ok(&n, "+447012345678").2, "+4470");
    let three = Normalizer::new(DialPlan::new("NL"), 3).unwrap();
    assert_eq!(ok(&three, "+67077123456").2, "+670771");
}

#[test]
fn unallocated_numbers_are_accepted_and_flagged() {
    let n = nl();
    // i3forum "+CC 0 xyz" style: valid shape, not allocated.
    let r = ok(&n, "+67001234567");
    assert!(r.5, "unallocated flag");
    assert_eq!(r.1, "TL");
    assert!(
        r.4 >= RiskTier::High,
        "unallocated in a high-risk country is at least high"
    );
    // UK drama range 07700 900xxx is reserved, never allocated.
    let gb = Normalizer::new(DialPlan::new("GB"), 2).unwrap();
    assert!(ok(&gb, "07700900123").5);
}

#[test]
fn impossible_numbers_are_refused_with_a_reason() {
    let n = nl();
    assert!(err(&n, "+999123456").contains("no known country code"));
    assert!(err(&n, "+0 1234").contains("no known country code"));
    assert!(err(&n, "+3130123456789012").contains("at most 15"));
    assert!(err(&n, "+31 30 12a4567").contains("letters"));
    assert!(err(&n, "0800-FLOWERS").contains("letters"));
    assert!(err(&n, "+3130\u{0007}1234567").contains("control"));
    assert!(err(&n, "+31#301234567").contains("not a digit"));
    assert!(err(&n, "").contains("empty"));
    assert!(err(&n, "+-").contains("no digits"));
    assert!(err(&n, "0031 0 30").contains("too short"));
    assert!(err(&n, &"1".repeat(200)).contains("too long"));
}
