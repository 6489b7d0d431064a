//! TollGuard runtime plumbing shared by the service binaries.
//!
//! Architecture invariant: this is the only crate that talks to Kafka and
//! Redis, and it holds no business rules — it implements the core's
//! [`tollguard_core::bus::EventBus`] and [`tollguard_core::store::WindowStore`]
//! traits, and provides configuration loading, telemetry, the health/metrics
//! HTTP endpoint and signal handling.

pub mod config;
pub mod health;
pub mod kafka;
pub mod lag;
pub mod otel;
pub mod redis_store;
pub mod redis_tls;
pub mod shutdown;
pub mod store_metrics;
pub mod telemetry;
pub mod tls;
