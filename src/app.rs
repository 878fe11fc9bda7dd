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
            StateBackend::Embedded => {
                Arc::new(EmbeddedStore::open_with(&config.state.path, config.state.min_free_bytes)?)
            }
            StateBackend::Memory => {
                tracing::warn!(
                    "state.backend = \"memory\": subscriptions added through the API, dead letters and the backlog are lost when the bridge stops"
                );
                MemoryStore::new()
            }
            StateBackend::NatsKv { bucket, replicas } => {
                let client = nats.clone().expect("the nats-kv backend counts as a use of NATS");
                Arc::new(NatsKvStore::open_with(client, bucket, usize::from(*replicas)).await?)
            }
        };
        store.limit_dead_letters(config.state.dead_letters_max_bytes);
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
        let deadline = bridge.shut_down().await;
        admin_stop.cancel();
        // Open keep-alive connections must not hold the exit past the grace period.
        let until = deadline.max(std::time::Instant::now() + std::time::Duration::from_millis(100));
        match tokio::time::timeout_at(until.into(), server).await {
            Ok(Ok(result)) => result.map_err(AppError::Serve),
            Ok(Err(error)) => Err(AppError::Serve(std::io::Error::other(error))),
            Err(_) => {
                tracing::warn!(
                    "admin connections were still open at the end of the grace period; closing them"
                );
                Ok(())
            }
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

#[cfg(test)]
mod tests {
    use crate::store::Spools;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::store::SpoolAppend;

    /// `/readyz` and `cometd_bridge_store_healthy`, over HTTP, while the embedded store fails
    /// (its file refuses writes as a full disk does) and after it healed by itself.
    #[tokio::test]
    async fn readyz_and_the_store_gauge_say_the_store_fails_until_it_heals() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        let toml =
            format!("[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n", dir.path().display());
        std::fs::write(&file, toml).unwrap();
        let config = crate::config::load(&file, &crate::config::Env::new()).unwrap();
        let full = Arc::new(AtomicBool::new(false));
        let store = EmbeddedStore::open_failing(&config.state.path, full.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shared: Arc<dyn Store> = Arc::new(store.clone());
        let app = App {
            config,
            reload_from: None,
            hangups: None,
            listener,
            store: shared,
            nats: None,
            metrics: Metrics::new(),
            fixed_names: FixedNames::default(),
        };
        let admin = app.admin_address();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();
        let get = |path: &'static str| {
            let request = http.get(format!("http://{admin}{path}"));
            async move {
                let response = request.send().await.expect("the admin server answers");
                (response.status().as_u16(), response.text().await.expect("a body"))
            }
        };
        let healthy = |metrics: &str| {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix("cometd_bridge_store_healthy "))
                .map(str::to_string)
        };
        let wait_ready = |ready: bool| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (status, body) = get("/readyz").await;
                if (status == 200) == ready {
                    return body;
                }
                assert!(tokio::time::Instant::now() < deadline, "/readyz still answers {status}: {body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        wait_ready(true).await;
        assert_eq!(healthy(&get("/metrics").await.1).as_deref(), Some("1"));

        full.store(true, Ordering::SeqCst);
        let append = SpoolAppend { subscription: "a".into(), record: b"m".to_vec() };
        assert!(store.spool_append(vec![append.clone()].into()).await.is_err());
        let body = wait_ready(false).await;
        assert!(
            body.contains("the state store is failing: ") && body.contains("No space left on device"),
            "{body}"
        );
        assert_eq!(healthy(&get("/metrics").await.1).as_deref(), Some("0"));

        full.store(false, Ordering::SeqCst);
        wait_ready(true).await;
        assert_eq!(healthy(&get("/metrics").await.1).as_deref(), Some("1"));
        assert_eq!(store.spool_append(vec![append].into()).await.unwrap(), [Some(1)]);
        drop(stop);
        task.await.unwrap().unwrap();
    }
}
