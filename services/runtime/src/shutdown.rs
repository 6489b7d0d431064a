//! Signal handling: SIGTERM/SIGINT start a graceful shutdown; a grace period
//! bounds it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Default grace period: services must exit within 30 s of SIGTERM.
pub const GRACE: Duration = Duration::from_secs(25);

/// Returns a token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; stopping intake");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A future resolving on SIGHUP (reload), forever pending where unsupported.
pub async fn hangup() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut s) = signal(SignalKind::hangup()) {
            s.recv().await;
            return;
        }
    }
    std::future::pending::<()>().await
}
