//! Live reload: the configuration file read again and applied to the running bridge, all
//! or nothing, on SIGHUP or `POST /api/v1/reload`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::bridge::{Bridge, BridgeError, ReloadReport};
use crate::config::{self, Env};
use crate::telemetry::metrics::Metrics;

/// Reads the configuration file again and applies it.
pub struct Reloader {
    path: PathBuf,
    env: Env,
    bridge: Arc<Bridge>,
    metrics: Metrics,
}

impl Reloader {
    /// A reloader of the file at `path`, read with `env` (overrides and `env:` secrets).
    pub fn new(path: PathBuf, env: Env, bridge: Arc<Bridge>, metrics: Metrics) -> Self {
        Reloader { path, env, bridge, metrics }
    }

    /// Reads, validates and applies the file; logs and counts the outcome.
    ///
    /// # Errors
    /// [`BridgeError::InvalidConfig`] with every problem (the lines `check` prints),
    /// [`BridgeError::RestartRequired`], [`BridgeError::Store`]; nothing changed then.
    pub async fn reload(&self) -> Result<ReloadReport, BridgeError> {
        tracing::info!(config = %self.path.display(), "reloading the configuration");
        let result = match config::load(&self.path, &self.env) {
            Ok(config) => self.bridge.reload(config).await,
            Err(error) => Err(BridgeError::InvalidConfig(error.problems().to_vec())),
        };
        self.metrics.config_reloaded(result.is_ok());
        match &result {
            Ok(_) => {}
            Err(BridgeError::InvalidConfig(problems)) => {
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                tracing::error!(problems = ?problems, "reload refused; nothing changed");
            }
            Err(error) => tracing::error!(error = %error, "reload refused; nothing changed"),
        }
        result
    }
}
