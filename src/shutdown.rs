//! The shutdown signal: the first SIGTERM or SIGINT starts a graceful stop; a second one
//! ends the process at once.

/// Resolves on the first SIGTERM or SIGINT, and arranges for a second one to exit the
/// process immediately with status 1.
pub async fn signal() {
    wait_for_signal().await;
    tracing::info!("shutdown requested; a second signal exits at once");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(1);
    });
}

async fn wait_for_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
