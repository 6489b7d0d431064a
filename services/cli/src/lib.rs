//! The `tollguard` command: the embedded pipeline (`demo`, `replay`), the
//! simulator, the gRPC client (`send`) and operator tools.
//!
//! Architecture invariant: commands compose the service libraries; no rule,
//! normalisation or incident logic lives here.

pub mod audit;
pub mod common;
pub mod demo;
pub mod embedded;
pub mod eval;
pub mod hotlist;
pub mod input;
pub mod replay;
pub mod send;
pub mod simulate;
