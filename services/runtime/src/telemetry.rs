//! Structured logging. JSON lines by default (one object per event, with
//! the span fields), `TOLLGUARD_LOG_FORMAT=text` for humans, filter from
//! `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Initialises the global subscriber for service `service`. Safe to call
/// twice (the second call is ignored).
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("TOLLGUARD_LOG_FORMAT").is_ok_and(|v| v == "text");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let res = if text {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
    if res.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}
