//! The shutdown signal: the first SIGTERM or SIGINT starts a graceful stop; a second one
//! ends the process at once.

use tokio::signal::unix::{Signal, SignalKind, signal as listen};

/// Resolves on the first SIGTERM or SIGINT, and arranges for a second one to exit the
/// process immediately with status 1.
///
/// # Panics
/// If the signal handlers cannot be installed (no signal support at all).
pub async fn signal() {
    let mut terminate = listen(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    let mut interrupt = listen(SignalKind::interrupt()).expect("a SIGINT handler can be installed");
    next(&mut terminate, &mut interrupt).await;
    // The same handlers keep listening, so a second signal sent right away is not missed.
    tokio::spawn(async move {
        next(&mut terminate, &mut interrupt).await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(1);
    });
    tracing::info!("shutdown requested; a second signal exits at once");
}

async fn next(terminate: &mut Signal, interrupt: &mut Signal) {
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
