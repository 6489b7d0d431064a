//! TollGuard's pure domain.
//!
//! Architecture invariant: this crate does no I/O — no sockets, no files
//! (reference data is compiled in or handed over as text), no clocks except
//! where a caller passes the time in. Everything here is plain functions and
//! data, tested without any server. The I/O boundaries are the
//! [`store::WindowStore`] and [`bus::EventBus`] traits; their in-memory
//! implementations live here, the Redis and Kafka ones in
//! `tollguard-runtime`.

pub mod bus;
pub mod codec;
pub mod error;
pub mod ingest;
pub mod model;
pub mod money;
pub mod number;
pub mod pseudo;
pub mod record;
pub mod render;
pub mod rules;
pub mod sim;
pub mod store;
pub mod tables;

pub use error::{BusError, ConfigError, FieldError, StoreError};
pub use model::{CallEvent, Millis};
