//! TollGuard's protobuf contracts, package `tollguard.v1`.
//!
//! The `.proto` files in `proto/tollguard/v1/` are the partner-facing source
//! of truth; this crate compiles them with tonic/prost.

#![allow(
    missing_docs,
    clippy::large_enum_variant,
    missing_debug_implementations
)]

pub mod codec;

/// Package `tollguard.v1`.
pub mod v1 {
    tonic::include_proto!("tollguard.v1");
}

/// Encoded `FileDescriptorSet` of all TollGuard protos, for gRPC reflection
/// and for downstream consumers that decode the Kafka topics dynamically.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tollguard_descriptor");

/// Schema version carried in `CallEvent.schema_version` and in the
/// `tollguard-schema` Kafka header.
pub const CALL_EVENT_SCHEMA_VERSION: u32 = 1;
