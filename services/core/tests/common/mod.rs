pub mod rules_ref;
