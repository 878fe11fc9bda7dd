//! The daemon put together: [`App::build`] binds the admin listener and connects what the
//! configuration needs (port 0 works, for tests); [`App::run_until`] runs the bridge until
//! the shutdown future resolves, then stops it in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::bridge::BridgeError;
use crate::bridge::{Bridge, Parts};
use crate::config::{Config, NatsConfig, SinkConfig, StateBackend};
use crate::reload::Reloader;
use crate::sink::destination::{FixedNames, WebhookClients};
use crate::store::{EmbeddedStore, MemoryStore, NatsKvStore, Store, StoreError};
use crate::telemetry::metrics::Metrics;

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The admin address cannot be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state store cannot be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The NATS options cannot work.
    #[error("NATS: {0}")]
    Nats(String),
    /// The bridge cannot start.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Serve(std::io::Error),
}

/// The daemon, bound and connected, not yet running.
pub struct App {
    config: Config,
    /// The file to read again on SIGHUP and `POST /api/v1/reload`, and its environment.
    reload_from: Option<(std::path::PathBuf, crate::config::Env)>,
    /// SIGHUP, listened to from the moment the app is reloadable (its default action
    /// would end the process).
    hangups: Option<tokio::signal::unix::Signal>,
    listener: TcpListener,
    store: Arc<dyn Store>,
    nats: Option<async_nats::Client>,
    metrics: Metrics,
    /// Names the API's webhook client resolves without DNS (see [`App::resolve_posted_webhooks`]).
    fixed_names: FixedNames,
}

impl App {
    /// Binds the admin address, starts connecting to NATS (in the background: a NATS
    /// outage is waited out, not fatal) and opens the store (with the `nats-kv` backend,
    /// that needs the NATS server: the bridge does not start without its state).
    ///
    /// # Errors
    /// [`AppError`] when the store, the address or the NATS options do not work.
    pub async fn build(config: Config) -> Result<App, AppError> {
        // reqwest is built without a default TLS provider; the process uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| AppError::Bind { address: config.admin.listen, source })?;
        let uses_nats = config.nats.configured
            || matches!(config.state.backend, StateBackend::NatsKv { .. })
            || config
                .subscriptions
                .iter()
                .any(|subscription| matches!(subscription.sink, SinkConfig::Nats(_)));
        let nats = if uses_nats { Some(connect_nats(&config.nats).await?) } else { None };
        let store: Arc<dyn Store> = match &config.state.backend {
            StateBackend::Embedded => Arc::new(EmbeddedStore::open(&config.state.path)?),
            StateBackend::Memory => {
                tracing::warn!(
                    "state.backend = \"memory\": subscriptions added through the API, dead letters and the backlog are lost when the bridge stops"
                );
                MemoryStore::new()
            }
            StateBackend::NatsKv { bucket } => {
                let client = nats.clone().expect("the nats-kv backend counts as a use of NATS");
                Arc::new(NatsKvStore::open(client, bucket).await?)
            }
        };
        Ok(App {
            config,
            reload_from: None,
            hangups: None,
            listener,
            store,
            nats,
            metrics: Metrics::new(),
            fixed_names: FixedNames::default(),
        })
    }

    /// Makes the running bridge reloadable from the file at `path` (read with `env`), on
    /// SIGHUP and `POST /api/v1/reload`.
    pub fn reloadable(mut self, path: std::path::PathBuf, env: crate::config::Env) -> Self {
        self.reload_from = Some((path, env));
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangups) => self.hangups = Some(hangups),
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGHUP; reload through the API only")
            }
        }
        self
    }

    /// Resolves the names in `names` (which may change while the bridge runs) for webhooks
    /// posted through the API, instead of asking DNS; the private-destination check still
    /// applies to them. For tests, which cannot make a real name resolve to loopback or
    /// rebind it; nothing in the configuration sets it.
    pub fn resolve_posted_webhooks(mut self, names: FixedNames) -> Self {
        self.fixed_names = names;
        self
    }

    /// The admin server's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Runs until `shutdown` resolves, then stops in the contract's order and returns.
    ///
    /// # Errors
    /// [`AppError`] when a source cannot be started or the admin server fails.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        let http = WebhookClients::build(self.config.admin.allow_private_webhooks, self.fixed_names)
            .map_err(|error| AppError::Nats(format!("HTTP client: {error}")))?;
        let token = self.config.admin.token.clone();
        let allowed_hosts = self.config.admin.allowed_hosts.clone();
        let address = self.listener.local_addr().map_err(AppError::Serve)?;
        let bridge = Bridge::start(Parts {
            config: self.config,
            store: self.store,
            nats: self.nats,
            metrics: self.metrics.clone(),
            http,
        })
        .await?;
        let admin_stop = CancellationToken::new();
        let reloader = self
            .reload_from
            .map(|(path, env)| Arc::new(Reloader::new(path, env, bridge.clone(), self.metrics.clone())));
        if let (Some(reloader), Some(hangups)) = (&reloader, self.hangups) {
            tokio::spawn(reload_on_hangup(reloader.clone(), hangups, admin_stop.clone()));
        }
        let hosts = token.is_none().then(|| Arc::new(admin::HostCheck::new(address, &allowed_hosts)));
        let router = admin::router(AdminState {
            bridge: bridge.clone(),
            metrics: self.metrics,
            token,
            reloader,
            hosts,
        });
        let server = {
            let admin_stop = admin_stop.clone();
            tokio::spawn(async move {
                axum::serve(self.listener, router)
                    .with_graceful_shutdown(async move { admin_stop.cancelled().await })
                    .await
            })
        };
        tracing::info!("running");
        shutdown.await;
        // The admin server stays up while draining, so /metrics shows it; it stops last.
        bridge.shut_down().await;
        admin_stop.cancel();
        match server.await {
            Ok(result) => result.map_err(AppError::Serve),
            Err(error) => Err(AppError::Serve(std::io::Error::other(error))),
        }
    }
}

/// Reloads on every SIGHUP until `stop`.
async fn reload_on_hangup(
    reloader: Arc<Reloader>,
    mut hangups: tokio::signal::unix::Signal,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            received = hangups.recv() => match received {
                // The outcome is logged and counted by the reloader.
                Some(()) => drop(reloader.reload().await),
                None => return,
            },
        }
    }
}

async fn connect_nats(config: &NatsConfig) -> Result<async_nats::Client, AppError> {
    let mut options = async_nats::ConnectOptions::new().retry_on_initial_connect().max_reconnects(None);
    if let Some((user, password)) = &config.user_password {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(file) = &config.credentials_file {
        options = options.credentials_file(file).await.map_err(|error| AppError::Nats(error.to_string()))?;
    }
    if let Some(file) = &config.ca_file {
        options = options.add_root_certificates(file.clone());
    }
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    let urls: Vec<async_nats::ServerAddr> = config
        .url
        .split(',')
        .map(|url| url.trim().parse().map_err(|error: std::io::Error| AppError::Nats(error.to_string())))
        .collect::<Result<_, _>>()?;
    options.connect(urls).await.map_err(|error| AppError::Nats(error.to_string()))
}
