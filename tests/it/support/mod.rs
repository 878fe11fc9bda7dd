//! The test harness: real servers on free loopback ports, started and probed by the test,
//! stopped when it ends (also on panic).

#![allow(dead_code)] // Each test uses only part of the harness.

pub mod app;
pub mod bayeux;
pub mod browser;
pub mod daemon;
pub mod fake;
pub mod fault_proxy;
pub mod nats;
pub mod nats_cluster;
pub mod peer;
pub mod process;
pub mod scenario;
pub mod scripted;
pub mod stunnel;
pub mod tinyproxy;
pub mod webhook;

use std::path::PathBuf;

/// The project's root directory.
pub fn project_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A plain HTTP client for tests. reqwest is built without a default TLS provider (the
/// library hands it a preconfigured rustls), so the test process installs ring once.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}
