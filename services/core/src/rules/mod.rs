//! Detection: configuration, the detector (plans and rules) and the
//! incident engine.

pub mod config;
pub mod detect;
pub mod engine;

pub use config::{Policies, Policy, RulesConfig, Severity};
pub use detect::{Detector, Finding, HotList, Plan, Rule};
pub use engine::{Engine, LANE_TABLE, Planned, Processed, STALE_MS, Watermarks};
