//! `/livez`, `/readyz` and `/metrics` over HTTP.
//!
//! Liveness means the process is serving; readiness means its dependencies
//! (Kafka, Redis) are reachable — a service is ready only once they are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Readiness of named dependencies plus the metrics registry.
#[derive(Debug)]
pub struct Health {
    checks: Mutex<Vec<(String, Option<String>)>>,
    registry: Mutex<Registry>,
}

impl Health {
    /// New health state with a registry prefixed `namespace` (`tollguard`).
    pub fn new(namespace: &str) -> Arc<Self> {
        Arc::new(Self {
            checks: Mutex::new(Vec::new()),
            registry: Mutex::new(Registry::with_prefix(namespace)),
        })
    }

    /// Registers metrics.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut g = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Sets a dependency's state: `None` = ok, `Some(reason)` = not ready.
    pub fn set(&self, dependency: &str, problem: Option<String>) {
        let mut g = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        match g.iter_mut().find(|(n, _)| n == dependency) {
            Some(e) => {
                if e.1 != problem {
                    match &problem {
                        None => tracing::info!(dependency, "dependency ready"),
                        Some(p) => tracing::warn!(dependency, problem = %p, "dependency not ready"),
                    }
                }
                e.1 = problem;
            }
            None => g.push((dependency.to_string(), problem)),
        }
    }

    /// True when every dependency is ready (and at least one is known).
    pub fn ready(&self) -> (bool, String) {
        let g = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let bad: Vec<String> = g
            .iter()
            .filter_map(|(n, p)| p.as_ref().map(|p| format!("{n}: {p}")))
            .collect();
        if g.is_empty() {
            (false, "starting".into())
        } else if bad.is_empty() {
            (true, "ok".into())
        } else {
            (false, bad.join("; "))
        }
    }

    fn metrics_text(&self) -> String {
        let g = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &g);
        out
    }
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let (ok, why) = h.ready();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, format!("{why}\n"))
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.metrics_text(),
    )
}

/// Binds the HTTP endpoint; returns the bound address. Serves until
/// `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(local)
}
