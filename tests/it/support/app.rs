//! `TestApp`: the whole daemon in-process, admin server on port 0, configured from TOML
//! text through the same loader as the binary.

use std::net::SocketAddr;
use std::time::Duration;

use cometd_bridge::app::App;
use cometd_bridge::config::{self, Config, Env};
use cometd_bridge::sink::destination::FixedNames;
use cometd_bridge::store::DeadLetter;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Ends the `[admin]` and `[state]` sections the harness writes.
const HEADER_END: &str = "# end of the harness' sections\n";

/// A running bridge.
pub struct TestApp {
    pub admin: SocketAddr,
    pub state: TempDir,
    /// The `[admin]` and `[state]` sections the configuration file starts with.
    header: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestApp {
    /// Starts the daemon with `toml` (its `[state]` and `[admin]` sections are added here).
    pub async fn spawn(toml: &str) -> Self {
        Self::spawn_in(toml, tempfile::tempdir().expect("state dir"), None).await
    }

    /// Starts the daemon on an existing state directory, optionally with an admin token.
    pub async fn spawn_in(toml: &str, state: TempDir, token: Option<&str>) -> Self {
        Self::spawn_with_state(toml, state, token, "").await
    }

    /// Starts the daemon with more `[admin]` keys than its address.
    pub async fn spawn_with_admin(toml: &str, admin_keys: &str) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let config = Self::config_with(toml, &state, admin_keys, "");
        Self::start(config, state).await
    }

    /// Starts the daemon with more `[state]` keys than its path (`backend`, `bucket`).
    pub async fn spawn_with_state(toml: &str, state: TempDir, token: Option<&str>, state_keys: &str) -> Self {
        let config = Self::config(toml, &state, token, state_keys);
        Self::start(config, state).await
    }

    /// [`TestApp::spawn_with_admin`], the API's webhook client resolving the names in
    /// `names` (which the test may change, as DNS rebinding would) without DNS.
    pub async fn spawn_resolving(toml: &str, admin_keys: &str, names: FixedNames) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let config = Self::config_with(toml, &state, admin_keys, "");
        Self::start_resolving(config, state, Some(names)).await
    }

    async fn start(config: Config, state: TempDir) -> Self {
        Self::start_resolving(config, state, None).await
    }

    async fn start_resolving(config: Config, state: TempDir, names: Option<FixedNames>) -> Self {
        let file = state.path().join("config.toml");
        let written = std::fs::read_to_string(&file).expect("the configuration file");
        let header = written[..written.find(HEADER_END).expect("the header") + HEADER_END.len()].to_string();
        let mut app = App::build(config).await.expect("the app builds").reloadable(file, Env::new());
        if let Some(names) = names {
            app = app.resolve_posted_webhooks(names);
        }
        let admin = app.admin_address();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until(async {
                let _ = stopped.await;
            })
            .await
            .expect("the app runs and stops cleanly");
        });
        TestApp { admin, state, header, stop: Some(stop), task: Some(task) }
    }

    /// Writes `toml` (its `[admin]` and `[state]` sections kept as they were) over the
    /// configuration file, for a reload to read.
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(self.state.path().join("config.toml"), format!("{}{toml}", self.header))
            .expect("write config");
    }

    /// The daemon's configuration: `toml` with `[admin]` on port 0 (webhooks to loopback
    /// allowed) and `[state]` in `state` (plus `state_keys`), written to `state/config.toml` and loaded as the binary
    /// loads it.
    pub fn config(toml: &str, state: &TempDir, token: Option<&str>, state_keys: &str) -> Config {
        let token = token.map(|token| format!("token = \"{token}\"\n")).unwrap_or_default();
        // The harness' webhook receivers listen on loopback.
        Self::config_with(toml, state, &format!("{token}allow_private_webhooks = true\n"), state_keys)
    }

    /// [`TestApp::config`] with `admin_keys` in `[admin]`.
    pub fn config_with(toml: &str, state: &TempDir, admin_keys: &str, state_keys: &str) -> Config {
        let full = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{admin_keys}[state]\npath = \"{}\"\n{state_keys}{HEADER_END}{toml}",
            state.path().display()
        );
        let file = state.path().join("config.toml");
        std::fs::write(&file, full).expect("write config");
        config::load(&file, &Env::new()).unwrap_or_else(|error| panic!("invalid test config:\n{error}"))
    }

    /// Lists the dead letters through the API until there are `count`, failing the test
    /// after the wait.
    pub async fn wait_for_dead_letters(&self, count: usize) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + super::peer::WAIT;
        loop {
            let (status, page) = self.call("GET", "/api/v1/dead-letters", None).await;
            assert_eq!(status, 200, "{page}");
            let letters = page["dead_letters"].clone();
            if letters.as_array().is_some_and(|letters| letters.len() == count) {
                return letters;
            }
            assert!(tokio::time::Instant::now() < deadline, "not {count} dead letters: {letters}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Probes `/readyz` until it answers 200, failing the test after the wait.
    pub async fn wait_ready(&self) {
        let client = super::http_client();
        let deadline = tokio::time::Instant::now() + super::peer::WAIT;
        loop {
            let response = client.get(self.url("/readyz")).send().await.expect("admin answers");
            if response.status() == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready: {}",
                response.text().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        super::http_client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// Calls the API; returns the status and the JSON body (`Null` when empty).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let client = super::http_client();
        let mut request = client.request(method.parse().expect("method"), self.url(path));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        let response = request.send().await.expect("the admin server answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {bytes:?}"))
        };
        (status, body)
    }

    /// The dead letters (the first page), through the API (the daemon holds its database
    /// open).
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let (status, page) = self.call("GET", "/api/v1/dead-letters", None).await;
        assert_eq!(status, 200, "{page}");
        serde_json::from_value(page["dead_letters"].clone()).expect("dead letters")
    }

    /// Stops the daemon as SIGTERM would, and waits until it has.
    pub async fn stop(mut self) -> TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(super::peer::WAIT * 2, task)
                .await
                .expect("stops in time")
                .expect("stops cleanly");
        }
        std::mem::replace(&mut self.state, tempfile::tempdir().expect("temp dir"))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
