//! Correlator configuration.
