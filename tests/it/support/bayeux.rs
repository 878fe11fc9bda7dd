//! Real Bayeux servers from npm, started through the launchers in `tests/peers/`.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::process::{PortReport, Recipe, ServerProcess};
use super::project_dir;

/// Options for a faye server; `Default` gives faye's own defaults.
#[derive(Clone, Debug, Default)]
pub struct FayeOptions {
    /// Seconds faye holds a `/meta/connect` (its `timeout` option).
    pub timeout: Option<u64>,
    /// Seconds between websocket pings (its `ping` option).
    pub ping: Option<u64>,
    /// Server-side extensions: a module name in `tests/peers/extensions/` and its options.
    pub extensions: Vec<(String, Value)>,
    /// Serve HTTPS/WSS with this PEM certificate and key file.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A Salesforce-like OAuth token endpoint (see `faye-server.js`).
    pub oauth: Option<Value>,
}

/// Options for the official cometd-nodejs-server.
#[derive(Clone, Debug, Default)]
pub struct CometdOptions {
    /// Milliseconds a `/meta/connect` is held.
    pub timeout: Option<u64>,
    /// Milliseconds before a silent session expires.
    pub max_interval: Option<u64>,
    /// Enable the server-side ack extension.
    pub ack: bool,
    /// A file that gets a line (the time in milliseconds) for every `/meta/connect` the
    /// server receives.
    pub connect_log: Option<PathBuf>,
}

/// Which Bayeux server implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// npm `faye`: websocket and long-polling.
    Faye,
    /// npm `cometd-nodejs-server`: long-polling only.
    Cometd,
}

/// A running Bayeux server on loopback.
pub struct BayeuxServer {
    flavor: Flavor,
    process: ServerProcess,
    tls: bool,
}

impl BayeuxServer {
    /// Starts faye with websocket and long-polling at `/bayeux`.
    pub async fn faye(options: FayeOptions) -> Self {
        let mut config = json!({ "port": "{port}" });
        if let Some(timeout) = options.timeout {
            config["timeout"] = json!(timeout);
        }
        if let Some(ping) = options.ping {
            config["ping"] = json!(ping);
        }
        if let Some(oauth) = &options.oauth {
            config["oauth"] = oauth.clone();
        }
        let tls = options.tls.is_some();
        if let Some((cert, key)) = &options.tls {
            config["tls"] = json!({ "cert": cert, "key": key });
        }
        config["extensions"] = options
            .extensions
            .into_iter()
            .map(|(module, options)| json!({ "module": module, "options": options }))
            .collect();
        let mut server = Self::start(Flavor::Faye, "faye-server.js", config).await;
        server.tls = tls;
        server
    }

    /// Starts cometd-nodejs-server (long-polling) at `/cometd`.
    pub async fn cometd(options: CometdOptions) -> Self {
        let mut config = json!({ "port": "{port}", "ack": options.ack });
        if let Some(timeout) = options.timeout {
            config["timeout"] = json!(timeout);
        }
        if let Some(max_interval) = options.max_interval {
            config["maxInterval"] = json!(max_interval);
        }
        if let Some(log) = options.connect_log {
            config["connectLog"] = json!(log);
        }
        Self::start(Flavor::Cometd, "cometd-server.js", config).await
    }

    async fn start(flavor: Flavor, script: &str, config: Value) -> Self {
        let peers = peers_dir();
        // The port is a placeholder the process module fills in (0 first, then the same
        // port on restarts); JSON wants it as a number.
        let config = config.to_string().replace("\"{port}\"", "{port}");
        let recipe = Recipe {
            name: match flavor {
                Flavor::Faye => "faye",
                Flavor::Cometd => "cometd-nodejs-server",
            },
            program: PathBuf::from("node"),
            args: vec![peers.join(script).display().to_string(), config],
            port_report: PortReport::StdoutLine,
        };
        BayeuxServer { flavor, tls: false, process: ServerProcess::start(recipe).await }
    }

    /// The server implementation.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The `http://` endpoint (long-polling, and websocket upgrade on faye); `https://`
    /// at `localhost` when serving TLS.
    pub fn url(&self) -> String {
        let path = match self.flavor {
            Flavor::Faye => "/bayeux",
            Flavor::Cometd => "/cometd",
        };
        match self.tls {
            true => format!("https://localhost:{}{path}", self.process.port()),
            false => format!("http://127.0.0.1:{}{path}", self.process.port()),
        }
    }

    /// The same endpoint as a `ws://` (or `wss://`) URL.
    pub fn ws_url(&self) -> String {
        self.url().replacen("http", "ws", 1)
    }

    /// The process, to stop, restart, freeze or thaw it.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}

/// `tests/peers`, after checking that its npm packages are installed.
fn peers_dir() -> PathBuf {
    let peers = project_dir().join("tests/peers");
    for package in ["faye", "cometd-nodejs-server"] {
        assert!(
            peers.join("node_modules").join(package).is_dir(),
            "the npm package `{package}` is missing from tests/peers/node_modules; \
             run `scripts/setup.sh` (it runs `npm ci` there)"
        );
    }
    peers
}
