//! OpenTelemetry traces over OTLP/gRPC, and W3C trace context carried in
//! Kafka headers.
//!
//! Configured by the standard variables only:
//!
//! | variable | effect |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | the collector (`http://host:4317`); **unset: traces are off** |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` / `..._TRACES_PROTOCOL` | only `grpc` is built in; anything else is a configuration error |
//! | `OTEL_TRACES_EXPORTER` | `otlp` (default) or `none` |
//! | `OTEL_SDK_DISABLED` | `true` turns traces off |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | resource (default `service.name` = `tollguard-<service>`) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampling (default `parentbased_always_on`) |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._COMPRESSION` | exporter |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, ... | batching |
//!
//! The exporter runs on a small runtime of its own (one thread): the SDK's
//! batch processor exports from a plain thread, and tonic needs a Tokio
//! reactor. [`shutdown`] flushes what is queued (graceful stop).
//!
//! Spans are `tracing` spans (the `tracing-opentelemetry` layer turns the
//! spans of the `tollguard*` crates into OpenTelemetry spans, whatever
//! `RUST_LOG` says). The helpers here join them to a trace carried in a
//! `traceparent` header and read a span's own `traceparent` to write into
//! the next Kafka record. With traces off they do nothing and return `None`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

static ENABLED: AtomicBool = AtomicBool::new(false);
static PIPELINE: Mutex<Option<Pipeline>> = Mutex::new(None);

/// What [`settings`] decided from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settings {
    /// No endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    Off(&'static str),
    /// Export over OTLP/gRPC to this endpoint.
    Otlp {
        /// Collector endpoint.
        endpoint: String,
    },
}

/// A bad `OTEL_*` variable: its name and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct OtelError {
    /// The variable.
    pub var: &'static str,
    /// Why it is refused.
    pub reason: String,
}

fn var(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Decides from the `OTEL_*` variables (read through `lookup`) whether and
/// where traces are exported.
pub fn settings(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, OtelError> {
    if var(&lookup, "OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(Settings::Off("OTEL_SDK_DISABLED=true"));
    }
    match var(&lookup, "OTEL_TRACES_EXPORTER").as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(Settings::Off("OTEL_TRACES_EXPORTER=none")),
        Some(other) => {
            return Err(OtelError {
                var: "OTEL_TRACES_EXPORTER",
                reason: format!("'{other}' is not supported; use 'otlp' or 'none'"),
            });
        }
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = var(&lookup, name) {
            if p != "grpc" {
                return Err(OtelError {
                    var: if name.contains("TRACES") {
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                    } else {
                        "OTEL_EXPORTER_OTLP_PROTOCOL"
                    },
                    reason: format!(
                        "'{p}' is not supported; TollGuard exports OTLP over 'grpc' (collector port 4317)"
                    ),
                });
            }
            break;
        }
    }
    let (name, endpoint) = match (
        var(&lookup, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        var(&lookup, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(e), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e),
        (None, Some(e)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", e),
        (None, None) => return Ok(Settings::Off("no OTEL_EXPORTER_OTLP_ENDPOINT")),
    };
    if endpoint.starts_with("https://") {
        return Err(OtelError {
            var: if name.contains("TRACES") {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            } else {
                "OTEL_EXPORTER_OTLP_ENDPOINT"
            },
            reason: format!(
                "'{endpoint}': TLS to the collector is not built in; export in plain gRPC to a collector \
                 in the cluster or on the node (http://...:4317) and let it forward over TLS"
            ),
        });
    }
    Ok(Settings::Otlp { endpoint })
}

/// The running export pipeline.
struct Pipeline {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
}

/// Runs the wrapped exporter's calls on the pipeline's own runtime.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: std::sync::Arc<E>,
    handle: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.handle.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = std::sync::Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The resource: `OTEL_SERVICE_NAME`/`OTEL_RESOURCE_ATTRIBUTES` when given,
/// else `service.name` = `tollguard-<service>`; `service.version` always.
fn resource(service: &str) -> Resource {
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let mut b = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if !named_by_env {
        b = b.with_service_name(format!("tollguard-{service}"));
    }
    b.build()
}

/// Builds the tracer provider for `endpoint`; `Err` names what failed.
fn pipeline(
    service: &str,
    endpoint: &str,
) -> Result<(Pipeline, opentelemetry_sdk::trace::SdkTracer), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the export runtime: {e}"))?;
    let exporter = {
        let _enter = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?
    };
    let exporter = OnRuntime {
        inner: std::sync::Arc::new(exporter),
        handle: runtime.handle().clone(),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service))
        .build();
    let tracer = provider.tracer("tollguard");
    Ok((Pipeline { provider, runtime }, tracer))
}

/// The `tracing` layer exporting spans, or `None` when traces are off.
/// Called once by [`crate::telemetry::init`].
pub(crate) fn layer<S>(
    service: &str,
    settings: &Settings,
) -> Result<Option<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>, String>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer as _;
    let Settings::Otlp { endpoint } = settings else {
        return Ok(None);
    };
    let (p, tracer) = pipeline(service, endpoint)?;
    *PIPELINE.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    ENABLED.store(true, Ordering::Release);
    // Our spans only (and the events inside them), whatever RUST_LOG says.
    let only_ours = tracing_subscriber::filter::filter_fn(|m| {
        m.target().starts_with("tollguard") && *m.level() <= tracing::Level::INFO
    });
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_ours)
            .boxed(),
    ))
}

/// True when spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Flushes the queued spans and stops the exporter (waits at most a few
/// seconds for an unreachable collector). Call once, at the end of `main`;
/// later spans are dropped.
pub fn shutdown() {
    let p = PIPELINE.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(p) = p else { return };
    ENABLED.store(false, Ordering::Release);
    if let Err(e) = p.provider.force_flush() {
        tracing::warn!(error = %e, "trace flush incomplete");
    }
    if let Err(e) = p.provider.shutdown_with_timeout(Duration::from_secs(5)) {
        tracing::warn!(error = %e, "trace exporter shutdown incomplete");
    }
    p.runtime.shutdown_background();
}

/// The span context of a W3C `traceparent` value, if it is one.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut carrier = HashMap::with_capacity(1);
    carrier.insert("traceparent".to_string(), value.to_string());
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Makes `span` continue the trace of `traceparent` (a header value). Call
/// right after creating the span, before entering it or creating children.
/// Returns false (and leaves the span alone) when traces are off or the
/// value is not a valid traceparent.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&[u8]>) -> bool {
    if !enabled() {
        return false;
    }
    let Some(sc) = traceparent
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(parse_traceparent)
    else {
        return false;
    };
    span.set_parent(Context::new().with_remote_span_context(sc))
        .is_ok()
}

/// Links `span` to the traces of these `traceparent` values (a batch that
/// serves many traces); at most `max` links. Call right after creating the
/// span.
pub fn add_links<'a>(
    span: &tracing::Span,
    traceparents: impl Iterator<Item = &'a [u8]>,
    max: usize,
) {
    if !enabled() {
        return;
    }
    for sc in traceparents
        .filter_map(|v| std::str::from_utf8(v).ok())
        .filter_map(parse_traceparent)
        .take(max)
    {
        span.add_link(sc);
    }
}

/// The W3C `traceparent` of `span` (to write into the records it
/// produces), or `None` when traces are off.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| format_traceparent(&sc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn off_without_an_endpoint_or_when_disabled() {
        assert!(matches!(settings(env(&[])), Ok(Settings::Off(_))));
        assert!(matches!(
            settings(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "true")
            ])),
            Ok(Settings::Off(_))
        ));
        assert!(matches!(
            settings(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_EXPORTER", "none")
            ])),
            Ok(Settings::Off(_))
        ));
    }

    #[test]
    fn the_traces_endpoint_wins() {
        assert_eq!(
            settings(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317")
            ])),
            Ok(Settings::Otlp {
                endpoint: "http://b:4317".into()
            })
        );
    }

    #[test]
    fn unsupported_settings_name_the_variable() {
        let e = settings(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "OTEL_EXPORTER_OTLP_PROTOCOL");
        assert!(e.reason.contains("grpc"), "{e}");
        let e = settings(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "OTEL_TRACES_EXPORTER");
        let e = settings(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://a:4317")])).unwrap_err();
        assert_eq!(e.var, "OTEL_EXPORTER_OTLP_ENDPOINT");
    }

    #[test]
    fn traceparents_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp).unwrap();
        assert_eq!(format_traceparent(&sc), tp);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }

    #[test]
    fn helpers_do_nothing_when_off() {
        let span = tracing::info_span!("x");
        assert!(!set_parent(
            &span,
            Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        ));
        assert_eq!(traceparent(&span), None);
    }
}
