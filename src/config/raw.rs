//! The configuration as written: serde structs that reject unknown keys. Values stay as
//! written (durations and secrets as strings) until `validate` turns them into domain
//! types, so that every bad value is reported with its key, not just the first.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawConfig {
    /// The admin HTTP server (health, metrics, API).
    #[serde(default)]
    pub admin: RawAdmin,
    /// Where runtime state (dead letters, ...) is kept.
    #[serde(default)]
    pub state: RawState,
    /// The NATS server messages are forwarded to; when the section is present the bridge
    /// connects even before a subscription uses NATS (so the API can add NATS sinks).
    #[serde(default)]
    pub nats: Option<RawNats>,
    /// Queues and shutdown.
    #[serde(default)]
    pub bridge: RawBridge,
    /// Several replicas on one NATS state: who this replica is and how long a source's
    /// lease lasts.
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    /// The CometD servers to connect to.
    #[serde(default)]
    pub sources: Vec<RawSource>,
    /// What to forward where.
    #[serde(default)]
    pub subscriptions: Vec<RawSubscription>,
}

/// `[cluster]`: several replicas sharing the `nats` state backend.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawCluster {
    /// This replica's name among the others (default: the host name).
    pub replica: Option<String>,
    /// How long a source's lease lasts without renewal, e.g. `"5s"`.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: String,
    /// How long a stopping replica waits for another to take each of its sources.
    #[serde(default = "default_handover_wait")]
    pub handover_wait: String,
}

impl Default for RawCluster {
    fn default() -> Self {
        RawCluster { replica: None, lease_ttl: default_lease_ttl(), handover_wait: default_handover_wait() }
    }
}

fn default_lease_ttl() -> String {
    "5s".into()
}

fn default_handover_wait() -> String {
    "5s".into()
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawAdmin {
    /// Address of the admin HTTP server.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token required on `/api/*`; a secret.
    pub token: Option<String>,
    /// Lets `run` serve the API without a token on an address other than loopback.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Lets subscriptions posted through the API send webhooks to loopback, link-local and
    /// private addresses.
    #[serde(default)]
    pub allow_private_webhooks: bool,
    /// Host names the API answers to without a token, besides its listen address and
    /// `localhost` (a name it is reached by through a proxy or DNS).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// The most subscriptions (configured and posted) the API lets exist.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
}

fn default_max_subscriptions() -> usize {
    1000
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token: None,
            allow_unauthenticated: false,
            allow_private_webhooks: false,
            allowed_hosts: Vec::new(),
            max_subscriptions: default_max_subscriptions(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:8080".into()
}

/// `[state]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawState {
    /// `embedded` (the default), `nats`; `file` and `nats-kv` are their first-release names.
    #[serde(default = "default_state_backend")]
    pub backend: String,
    /// Directory of the embedded database.
    #[serde(default = "default_state_path")]
    pub path: String,
    /// Name the `nats` backend's buckets start with.
    #[serde(default = "default_state_bucket")]
    pub bucket: String,
    /// The `nats` backend's replication factor: how many servers of the NATS cluster keep
    /// each bucket and spool stream the bridge creates (1 to 5).
    #[serde(default = "default_state_replicas")]
    pub replicas: i64,
    /// The most all spools together may hold, e.g. `"1GiB"`; beyond it every subscription
    /// that receives a message is full.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: String,
    /// The free disk space under which the embedded store takes no more messages, e.g.
    /// `"256MiB"`.
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: String,
    /// The most the dead letters together may hold before the oldest are evicted, e.g.
    /// `"256MiB"`.
    #[serde(default = "default_dead_letters_max_bytes")]
    pub dead_letters_max_bytes: String,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            backend: default_state_backend(),
            path: default_state_path(),
            bucket: default_state_bucket(),
            replicas: default_state_replicas(),
            spool_max_bytes: default_spool_max_bytes(),
            min_free_bytes: default_min_free_bytes(),
            dead_letters_max_bytes: default_dead_letters_max_bytes(),
        }
    }
}

fn default_state_backend() -> String {
    "embedded".into()
}

fn default_spool_max_bytes() -> String {
    "1GiB".into()
}

fn default_min_free_bytes() -> String {
    "256MiB".into()
}

fn default_dead_letters_max_bytes() -> String {
    "256MiB".into()
}

fn default_state_path() -> String {
    "data/state".into()
}

fn default_state_replicas() -> i64 {
    1
}

fn default_state_bucket() -> String {
    "cometd-bridge".into()
}

/// `[nats]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawNats {
    /// Server URL(s), comma-separated.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// User name, with `password`.
    pub user: Option<String>,
    /// Password; a secret.
    pub password: Option<String>,
    /// Token authentication; a secret.
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey).
    pub credentials_file: Option<String>,
    /// CA certificate (PEM) to verify the server.
    pub ca_file: Option<String>,
    /// Connection name shown by the server.
    pub name: Option<String>,
}

impl Default for RawNats {
    fn default() -> Self {
        RawNats {
            url: default_nats_url(),
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            ca_file: None,
            name: None,
        }
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}

/// `[bridge]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawBridge {
    /// Messages buffered per subscription between the source and its sink.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: i64,
    /// How long shutdown waits for in-flight deliveries before dead-lettering them.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: String,
}

impl Default for RawBridge {
    fn default() -> Self {
        RawBridge { queue_capacity: default_queue_capacity(), shutdown_grace: default_shutdown_grace() }
    }
}

fn default_queue_capacity() -> i64 {
    1000
}

fn default_shutdown_grace() -> String {
    "8s".into()
}

/// `[[sources]]`
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawSource {
    /// Unique name, used in subjects, headers and metrics.
    pub name: String,
    /// The CometD endpoint.
    pub url: String,
    /// Connection types in order of preference.
    #[serde(default = "default_connection_types")]
    pub connection_types: Vec<String>,
    /// How long the link may stay down before it counts as lost.
    #[serde(default = "default_connection_timeout")]
    pub connection_timeout: String,
    /// Request timeout for everything but `/meta/connect`.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: String,
    /// The largest response or websocket message read from the server, e.g. `"16MiB"`.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: String,
    /// Messages the client prefetches before it stops polling.
    #[serde(default = "default_max_pending_count")]
    pub max_pending_count: i64,
    /// Whether a busy websocket reads on a timer (see `ClientOptions::read_coalescing`).
    #[serde(default = "default_read_coalescing")]
    pub read_coalescing: bool,
    /// Extra HTTP headers; values may be secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// TLS settings.
    #[serde(default)]
    pub tls: RawTls,
    /// Salesforce-style replay extension.
    #[serde(default)]
    pub replay: bool,
    /// The CometD ack extension, used when the server offers it.
    #[serde(default = "default_ack")]
    pub ack: bool,
    /// When the server refuses a replay position: `all`, `new` or `fail`.
    #[serde(default = "default_replay_fallback")]
    pub replay_fallback: String,
    /// Salesforce OAuth login.
    pub salesforce: Option<RawSalesforce>,
    /// An HTTP proxy for this source, `http(s)://[user:password@]host:port`; may be a secret
    /// reference. Without it, `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` apply.
    pub proxy: Option<String>,
}

fn default_ack() -> bool {
    true
}

fn default_replay_fallback() -> String {
    "all".into()
}

/// `salesforce = { ... }` of a source.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawSalesforce {
    /// `password`, `refresh_token`, `client_credentials` or `jwt`.
    pub flow: String,
    /// Login host: production (default), `https://test.salesforce.com`, or My Domain.
    #[serde(default = "default_login_url")]
    pub login_url: String,
    /// Connected app consumer key.
    pub client_id: String,
    /// Connected app consumer secret; a secret.
    pub client_secret: Option<String>,
    /// User name (password and JWT flows).
    pub username: Option<String>,
    /// Password (with security token); a secret.
    pub password: Option<String>,
    /// Refresh token; a secret.
    pub refresh_token: Option<String>,
    /// RSA private key PEM for the JWT flow.
    pub private_key_file: Option<String>,
}

fn default_login_url() -> String {
    "https://login.salesforce.com".into()
}

fn default_connection_types() -> Vec<String> {
    vec!["websocket".into(), "long-polling".into()]
}

fn default_connection_timeout() -> String {
    "10s".into()
}

fn default_max_message_size() -> String {
    "16MiB".into()
}

fn default_request_timeout() -> String {
    "30s".into()
}

fn default_read_coalescing() -> bool {
    true
}

fn default_max_pending_count() -> i64 {
    100
}

/// `tls = { ... }` of a source.
#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct RawTls {
    /// Accept any certificate (test servers only).
    #[serde(default)]
    pub insecure: bool,
    /// Trust this CA certificate (PEM) instead of the Mozilla roots.
    pub ca_file: Option<String>,
    /// Accept only the certificate with this SHA-256 fingerprint.
    pub fingerprint: Option<String>,
}

/// `[[subscriptions]]`, also the body of `POST /api/v1/subscriptions`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct RawSubscription {
    /// Unique id.
    pub id: String,
    /// The source's name.
    pub source: String,
    /// Channel or pattern (`/*`, `/**`).
    pub channel: String,
    /// Where messages go.
    pub sink: RawSink,
    /// With replay: where to start when no position is committed yet: `new`, `all` or a
    /// replay id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub replay_from: Option<serde_json::Value>,
    /// How long transient failures are retried before a message is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RawRetry>,
    /// The most this subscription's spool may hold, e.g. `"64MiB"` (default `"1GiB"`);
    /// beyond it the subscription is full (see the contract's "Outages of any length").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spool_max_bytes: Option<String>,
}

/// `retry = { max_elapsed = "24h", max_backoff = "5m" }` of a subscription.
#[derive(Clone, Debug, Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct RawRetry {
    /// How long a message is retried before it becomes a dead letter.
    #[serde(default = "default_retry_max_elapsed")]
    pub max_elapsed: String,
    /// The longest wait between two attempts.
    #[serde(default = "default_retry_max_backoff")]
    pub max_backoff: String,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry { max_elapsed: default_retry_max_elapsed(), max_backoff: default_retry_max_backoff() }
    }
}

fn default_retry_max_elapsed() -> String {
    "24h".into()
}

fn default_retry_max_backoff() -> String {
    "5m".into()
}

/// `sink = { type = "nats" | "webhook", ... }`
///
/// Read by hand (see [`RawSink::deserialize`]) so that a field that does not fit is named
/// with its path; written with its `type` tag.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RawSink {
    /// Publish on NATS.
    Nats {
        /// Subject template with `{source}`, `{subscription}`, `{channel}`.
        subject: String,
        /// Publish through JetStream and wait for its ack.
        #[serde(default)]
        jetstream: bool,
        /// `data` (the message's data) or `envelope` (the whole Bayeux message).
        #[serde(default = "default_payload")]
        payload: String,
    },
    /// POST to an HTTP endpoint.
    Webhook {
        /// The endpoint.
        url: String,
        /// Standard Webhooks signing secret (`whsec_...` or raw); a secret.
        secret: Option<String>,
        /// Timeout of one attempt.
        #[serde(default = "default_webhook_timeout")]
        timeout: String,
        /// First release: attempts before the message is dead-lettered; unset by default
        /// (the subscription's `retry` decides).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<i64>,
        /// First release: overrides the subscription's `retry.max_elapsed` when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_elapsed: Option<String>,
        /// Requests in flight at once; 1 (the default) keeps the order.
        #[serde(default = "default_max_in_flight")]
        max_in_flight: i64,
    },
}

/// [`RawSink`] tagged from outside (`{"webhook": {...}}`), which serde reads field by field,
/// keeping the path of what does not fit. The configuration reference's test reads the
/// sink's keys from it.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum ExternallyTagged {
    /// Publish on NATS.
    Nats {
        /// Subject template with `{source}`, `{subscription}`, `{channel}`.
        subject: String,
        /// Publish through JetStream and wait for its ack.
        #[serde(default)]
        jetstream: bool,
        /// `data` (the message's data) or `envelope` (the whole Bayeux message).
        #[serde(default = "default_payload")]
        payload: String,
    },
    /// POST to an HTTP endpoint.
    Webhook {
        /// The endpoint.
        url: String,
        /// Standard Webhooks signing secret (`whsec_...` or raw); a secret.
        secret: Option<String>,
        /// Timeout of one attempt.
        #[serde(default = "default_webhook_timeout")]
        timeout: String,
        /// First release: attempts before the message is dead-lettered; unset by default
        /// (the subscription's `retry` decides).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<i64>,
        /// First release: overrides the subscription's `retry.max_elapsed` when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_elapsed: Option<String>,
        /// Requests in flight at once; 1 (the default) keeps the order.
        #[serde(default = "default_max_in_flight")]
        max_in_flight: i64,
    },
}

impl From<ExternallyTagged> for RawSink {
    fn from(sink: ExternallyTagged) -> Self {
        match sink {
            ExternallyTagged::Nats { subject, jetstream, payload } => {
                RawSink::Nats { subject, jetstream, payload }
            }
            ExternallyTagged::Webhook { url, secret, timeout, max_attempts, max_elapsed, max_in_flight } => {
                RawSink::Webhook { url, secret, timeout, max_attempts, max_elapsed, max_in_flight }
            }
        }
    }
}

impl<'de> Deserialize<'de> for RawSink {
    /// `{ type = "...", ... }`: the `type` picks the variant, whose fields are read with
    /// their path (`url: invalid type`, `colour: unknown key`), handed up in the error.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let serde_json::Value::Object(mut fields) = value else {
            return Err(D::Error::custom(format!(
                "invalid type: {}, expected a table like {{ type = \"webhook\", url = \"...\" }}",
                kind_of(&value)
            )));
        };
        let kind = match fields.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "type{}invalid type: {}, expected \"nats\" or \"webhook\"",
                    super::paths::INNER_PATH,
                    kind_of(&other)
                )));
            }
            None => return Err(D::Error::missing_field("type")),
        };
        if kind != "nats" && kind != "webhook" {
            return Err(D::Error::unknown_variant(&kind, &["nats", "webhook"]));
        }
        let tagged = serde_json::Value::Object(serde_json::Map::from_iter([(kind, fields.into())]));
        serde_path_to_error::deserialize::<_, ExternallyTagged>(tagged)
            .map(RawSink::from)
            .map_err(super::paths::inner_error)
    }
}

/// What a JSON value is, as serde names it in "invalid type" messages.
fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "sequence",
        serde_json::Value::Object(_) => "map",
    }
}

fn default_payload() -> String {
    "data".into()
}

fn default_webhook_timeout() -> String {
    "10s".into()
}

fn default_max_in_flight() -> i64 {
    1
}
