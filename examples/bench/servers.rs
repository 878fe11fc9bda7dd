//! The servers a scenario starts on loopback: faye, nats-server and the bridge daemon.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Proc, root};

pub fn start_faye(timeout: u64) -> (Proc, String) {
    start_faye_with(&format!("{{\"timeout\": {timeout}}}"))
}

/// faye with the Salesforce-like replay fixture (a retention larger than any flood).
pub fn start_salesforce_like(timeout: u64) -> (Proc, String) {
    start_faye_with(&format!(
        "{{\"timeout\": {timeout}, \"extensions\": [{{\"module\": \"salesforce\", \"options\": {{\"retention\": 100000}}}}]}}"
    ))
}

fn start_faye_with(options: &str) -> (Proc, String) {
    let mut command = Command::new("bash");
    command.args([
        "-c",
        &format!(
            "ulimit -n 20000 2>/dev/null; exec node {} '{options}'",
            root().join("tests/peers/faye-server.js").display()
        ),
    ]);
    let mut faye = Proc::spawn(command);
    let port =
        faye.line().and_then(|line| line.strip_prefix("LISTENING ").map(str::to_owned)).expect("faye port");
    (faye, format!("http://127.0.0.1:{port}/bayeux"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

pub fn start_nats(store: &Path) -> (Proc, String) {
    let port = free_port();
    let mut command = Command::new(root().join(".tools/bin/nats-server"));
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .arg("-l")
        .arg(store.join("log"));
    let nats = Proc::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (nats, format!("nats://127.0.0.1:{port}"))
}

/// A bridge process on a configuration, its state on the embedded store; returns it once
/// `/readyz` answers 200.
pub async fn start_bridge(config: &str, dir: &Path) -> (Proc, u16, Duration) {
    start_bridge_on(config, dir, "embedded").await
}

/// [`start_bridge`] on the state backend `backend`.
pub async fn start_bridge_on(config: &str, dir: &Path, backend: &str) -> (Proc, u16, Duration) {
    let admin = free_port();
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\nbackend = \"{backend}\"\npath = \"{}\"\n{config}",
            dir.join("state").display()
        ),
    )
    .expect("write config");
    let started = Instant::now();
    let mut command = Command::new(bridge_binary());
    command.args(["run", "--config"]).arg(&file).env("RUST_LOG", "warn");
    let bridge = Proc::spawn(command);
    let ready = wait_ready(admin).await;
    (bridge, admin, ready.duration_since(started))
}

/// The daemon under test: `target/release/cometd-bridge`, or `BENCH_BRIDGE` (another
/// build, to compare two in the same run).
pub fn bridge_binary() -> std::path::PathBuf {
    std::env::var_os("BENCH_BRIDGE").map_or_else(|| root().join("target/release/cometd-bridge"), Into::into)
}

pub async fn wait_ready(admin: u16) -> Instant {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = http.get(format!("http://127.0.0.1:{admin}/readyz")).send().await
            && response.status() == 200
        {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the bridge did not become ready");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub fn source(url: &str) -> String {
    format!(
        "[[sources]]\nname = \"bench\"\nurl = \"{url}\"\nconnection_types = [\"websocket\"]\nmax_pending_count = 1000\n"
    )
}
