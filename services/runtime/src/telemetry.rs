//! Structured logging and traces. JSON lines by default (one object per
//! event, with the span fields), `TOLLGUARD_LOG_FORMAT=text` for humans,
//! filter from `RUST_LOG` (default `info`). Traces go to an OpenTelemetry
//! collector over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see
//! [`crate::otel`]); [`shutdown`] flushes them.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::otel;

/// Initialises the global subscriber for service `service`. Safe to call
/// twice (the second call is ignored). A bad `OTEL_*` variable is a
/// configuration error: logged with the variable's name, exit code 64.
pub fn init(service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("TOLLGUARD_LOG_FORMAT").is_ok_and(|v| v == "text");
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(true);
    let fmt = if text {
        fmt.with_filter(filter).boxed()
    } else {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(filter)
            .boxed()
    };
    let settings = otel::settings(|k| std::env::var(k).ok());
    let traces = match &settings {
        Ok(s) => otel::layer(service, s),
        Err(e) => Err(e.to_string()),
    };
    let (traces, problem) = match traces {
        Ok(l) => (l, None),
        Err(e) => (None, Some(e)),
    };
    let res = tracing_subscriber::registry()
        .with(fmt)
        .with(traces)
        .try_init();
    if let Some(reason) = problem {
        let key = settings
            .as_ref()
            .err()
            .map_or("OTEL_EXPORTER_OTLP_ENDPOINT", |e| e.var);
        eprintln!("configuration error: {reason}");
        tracing::error!(key, reason = %reason, "configuration error");
        std::process::exit(crate::config::EXIT_CONFIG);
    }
    if res.is_ok() {
        let traces = match &settings {
            Ok(otel::Settings::Otlp { endpoint }) => endpoint.clone(),
            Ok(otel::Settings::Off(why)) => format!("off ({why})"),
            Err(_) => String::new(),
        };
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            traces = %traces,
            "starting"
        );
    }
}

/// Flushes and stops the trace exporter (end of `main`, after the graceful
/// stop). Does nothing when traces are off.
pub fn shutdown() {
    otel::shutdown();
}
