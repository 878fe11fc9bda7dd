//! The daemon's configuration: loaded from TOML, YAML or JSON (by file extension) with
//! `COMETD_BRIDGE__SECTION__KEY` environment overrides, parsed strictly, then validated
//! into domain types with **every** problem reported under its key.

mod cluster;
#[cfg(test)]
mod documented;
mod paths;
mod raw;
mod validate;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use paths::deserialize_named;
pub use raw::{RawConfig, RawNats, RawRetry, RawSink, RawSubscription};
// The sinks own their settings; the configuration builds them.
pub use crate::secret::Secret;
pub use crate::sink::RetryConfig;
pub use crate::sink::settings::{NatsSinkConfig, Payload, SinkConfig, WebhookSinkConfig};
pub use validate::{
    parse_replay_from, private_destination, reserved_subject_prefix, reserved_subject_problem, validate,
    validate_subscription,
};

use crate::cometd::{
    ChannelPattern, ClientOptions, ConnectionType, Proxy, ReadCoalescing, ReplayFallback, ReplayPosition,
    SalesforceCredentials, Tls,
};

/// The environment, as a map, so tests pass their own instead of changing the process's.
pub type Env = BTreeMap<String, String>;

/// A configuration that passed validation.
#[derive(Clone, Debug)]
pub struct Config {
    /// The admin HTTP server.
    pub admin: AdminConfig,
    /// Runtime state.
    pub state: StateConfig,
    /// The NATS connection.
    pub nats: NatsConfig,
    /// Queues and shutdown.
    pub bridge: BridgeConfig,
    /// Leases among replicas: set with the `nats` state backend (whether or not the file
    /// has a `[cluster]` section), so that two bridges on one state never both forward.
    pub cluster: Option<ClusterConfig>,
    /// CometD servers.
    pub sources: Vec<SourceConfig>,
    /// Routes from channels to sinks.
    pub subscriptions: Vec<SubscriptionConfig>,
    /// What the sections a reload cannot apply say, to tell whether they changed.
    pub fingerprints: SectionFingerprints,
}

/// A digest of what part of the configuration says, secrets resolved (the values, not
/// the `env:`/`file:` references), so that a reload can tell what changed. A SHA-256
/// digest: it shows nothing of the secrets, even if printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The digest of `parts`, in order.
    pub(crate) fn of<'p>(parts: impl IntoIterator<Item = &'p str>) -> Self {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for part in parts {
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.finish().as_ref());
        Fingerprint(bytes)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// The fingerprints of the sections a running bridge cannot change: a reload that
/// changes one of them is refused (restart required).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SectionFingerprints {
    /// `[admin]`.
    pub admin: Fingerprint,
    /// `[state]`.
    pub state: Fingerprint,
    /// `[nats]` (the connection is made at start).
    pub nats: Fingerprint,
    /// `[cluster]`.
    pub cluster: Fingerprint,
}

/// `[admin]`
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Where the admin server listens.
    pub listen: SocketAddr,
    /// Bearer token for `/api/*`.
    pub token: Option<Secret>,
    /// Whether webhooks posted through the API may target loopback, link-local and
    /// private addresses.
    pub allow_private_webhooks: bool,
    /// Whether the API may listen beyond loopback without a token.
    pub allow_unauthenticated: bool,
    /// Host names a tokenless API answers to besides its address and `localhost`, lower
    /// case, without port.
    pub allowed_hosts: Vec<String>,
    /// The most subscriptions the API lets exist (a POST past it is 409).
    pub max_subscriptions: usize,
}

impl Config {
    /// Why `run` refuses this configuration although it is valid: an API that other
    /// machines can reach, without a token. `check` only warns, since the token may come
    /// from the environment `run` gets (`COMETD_BRIDGE__ADMIN__TOKEN`).
    pub fn unprotected_api(&self) -> Option<Problem> {
        let admin = &self.admin;
        (admin.token.is_none() && !admin.listen.ip().is_loopback() && !admin.allow_unauthenticated).then(|| {
            Problem::new(
                "admin.token",
                format!(
                    "required when admin.listen ({}) is not a loopback address: without it anyone who reaches the port can add subscriptions; set a token (or COMETD_BRIDGE__ADMIN__TOKEN), or admin.allow_unauthenticated = true",
                    admin.listen
                ),
            )
        })
    }
}

/// `[state]`
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// Where the state is kept.
    pub backend: StateBackend,
    /// Directory of the embedded database.
    pub path: PathBuf,
    /// The most all spools together may hold.
    pub spool_max_bytes: u64,
    /// The free disk space under which the embedded store takes no more messages.
    pub min_free_bytes: u64,
    /// The most the dead letters together may hold (their stored size); beyond it the
    /// oldest are evicted, counted and logged.
    pub dead_letters_max_bytes: u64,
}

/// `state.backend`: where runtime subscriptions, replay positions, dead letters and spools
/// are kept.
#[derive(Clone, Debug, PartialEq)]
pub enum StateBackend {
    /// One embedded database file under `state.path` (the default): no server needed.
    Embedded,
    /// In memory only: nothing survives a restart.
    Memory,
    /// NATS JetStream key-value buckets named `<bucket>-subscriptions`,
    /// `<bucket>-dead-letters` and `<bucket>-positions`, on the `[nats]` connection.
    NatsKv {
        /// `state.bucket`.
        bucket: String,
        /// `state.replicas`: the replication factor of the buckets and streams it creates.
        replicas: u8,
    },
}

/// `[nats]`
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Whether the file (or the environment) has a `[nats]` section.
    pub configured: bool,
    /// Server URL(s), comma-separated.
    pub url: String,
    /// User and password.
    pub user_password: Option<(String, Secret)>,
    /// Token.
    pub token: Option<Secret>,
    /// `.creds` file.
    pub credentials_file: Option<PathBuf>,
    /// CA certificate to trust.
    pub ca_file: Option<PathBuf>,
    /// Connection name.
    pub name: Option<String>,
}

/// `[cluster]`
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    /// This replica's name; unique among the replicas of one state.
    pub replica: String,
    /// How long a source's lease lasts without renewal.
    pub lease_ttl: Duration,
    /// How long a stopping replica waits for another to take each of its sources.
    pub handover_wait: Duration,
}

/// `[bridge]`
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// First release: messages buffered per subscription; unused since the spool.
    pub queue_capacity: usize,
    /// How long shutdown waits for deliveries.
    pub shutdown_grace: Duration,
}

/// One `[[sources]]` entry.
#[derive(Clone)]
pub struct SourceConfig {
    /// Unique name.
    pub name: String,
    /// The CometD endpoint.
    pub url: String,
    /// Connection types in order of preference.
    pub connection_types: Vec<ConnectionType>,
    /// How long the link may stay down before it counts as lost (`None`: never).
    pub connection_timeout: Option<Duration>,
    /// Timeout of requests other than `/meta/connect`.
    pub request_timeout: Duration,
    /// The largest response or websocket message read from the server, in bytes.
    pub max_message_size: usize,
    /// Prefetch limit.
    pub max_pending_count: i64,
    /// Whether a busy websocket reads on a timer.
    pub read_coalescing: bool,
    /// Extra HTTP headers.
    pub headers: Vec<(String, Secret)>,
    /// Certificate checks.
    pub tls: Tls,
    /// The replay extension, when enabled.
    pub replay: Option<ReplayFallback>,
    /// Whether the handshake asks for the ack extension.
    pub ack: bool,
    /// Salesforce OAuth login, when configured.
    pub salesforce: Option<SalesforceCredentials>,
    /// Its HTTP proxy, when set (else the environment's).
    pub proxy: Option<Secret>,
    /// What the entry says, secrets resolved: a reload restarts the source when it changes.
    pub fingerprint: Fingerprint,
}

impl std::fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("connection_types", &self.connection_types)
            .field("replay", &self.replay)
            .field("salesforce", &self.salesforce.as_ref().map(|credentials| &credentials.login_url))
            .finish_non_exhaustive()
    }
}

impl SourceConfig {
    /// The CometD client options for this source.
    pub fn client_options(&self) -> ClientOptions {
        let mut options = ClientOptions::new(self.url.clone())
            .connection_types(self.connection_types.iter().copied())
            .connection_timeout(self.connection_timeout)
            .request_timeout(self.request_timeout)
            .max_pending_count(self.max_pending_count)
            .max_message_size(self.max_message_size)
            .read_coalescing(self.read_coalescing.then(ReadCoalescing::default))
            .tls(self.tls.clone())
            .proxy(match &self.proxy {
                Some(proxy) => Proxy::Url(proxy.expose().to_string()),
                None => Proxy::FromEnvironment,
            });
        for (name, value) in &self.headers {
            options = options.header(name.clone(), value.expose());
        }
        options
    }
}

/// One `[[subscriptions]]` entry.
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// Unique id.
    pub id: String,
    /// The source's name.
    pub source: String,
    /// Channel or pattern.
    pub channel: ChannelPattern,
    /// Where its messages go.
    pub sink: SinkConfig,
    /// With replay: where to start when no position is committed.
    pub replay_from: ReplayPosition,
    /// How transient failures are retried.
    pub retry: RetryConfig,
    /// The most its spool may hold before the subscription is full.
    pub spool_max_bytes: u64,
    /// The entry as written, for the API.
    pub raw: RawSubscription,
    /// What the entry says, secrets resolved: a reload restarts the subscription when it
    /// changes.
    pub fingerprint: Fingerprint,
}

/// One thing wrong with the configuration, under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where, e.g. `subscriptions[2].sink.url`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem { key: key.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Every problem found, one per line.
    #[error("{}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The problems.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems, for printing one per line.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems } => problems,
        }
    }
}

impl From<Vec<Problem>> for ConfigError {
    fn from(problems: Vec<Problem>) -> Self {
        ConfigError::Invalid { problems }
    }
}

/// Loads and validates the configuration at `path`, with overrides and `env:` secrets
/// taken from `env`.
///
/// # Errors
/// [`ConfigError::Invalid`] listing every problem.
pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
    let (raw, problems) = parse_lenient(path, env)?;
    validate_parsed(raw, problems, env)
}

/// Validates what [`parse_text`] read, adding validation's problems to the unknown keys it
/// found.
pub(crate) fn validate_parsed(
    raw: RawConfig,
    mut problems: Vec<Problem>,
    env: &Env,
) -> Result<Config, ConfigError> {
    match validate(raw, env) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(problems.into()),
        Err(more) => {
            problems.extend(more);
            Err(problems.into())
        }
    }
}

/// Reads the file and the environment overrides into the raw structs.
///
/// # Errors
/// The problems: the file is missing, unreadable or not shaped like the configuration,
/// or it has keys the configuration does not know (each named by its path).
pub fn parse(path: &Path, env: &Env) -> Result<RawConfig, ConfigError> {
    match parse_lenient(path, env)? {
        (raw, problems) if problems.is_empty() => Ok(raw),
        (_, problems) => Err(problems.into()),
    }
}

/// The formats a configuration file may be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// `.toml`
    Toml,
    /// `.yaml` or `.yml`
    Yaml,
    /// `.json`
    Json,
}

impl Format {
    /// The format a file's extension names, if any.
    pub(crate) fn of(path: &Path) -> Option<Format> {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some("toml") => Some(Format::Toml),
            Some("yaml" | "yml") => Some(Format::Yaml),
            Some("json") => Some(Format::Json),
            _ => None,
        }
    }
}

/// [`parse`], returning the unknown keys as problems beside what could be read, so that
/// validation can report its problems too.
fn parse_lenient(path: &Path, env: &Env) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
    let one = |message: String| ConfigError::from(vec![Problem::new("", message)]);
    let Some(format) = Format::of(path) else {
        return Err(one(format!(
            "{}: unknown configuration format (use .toml, .yaml, .yml or .json)",
            path.display()
        )));
    };
    if !path.is_file() {
        return Err(one(format!("{}: no such file", path.display())));
    }
    let text = crate::files::read_text_bounded(path, crate::files::CONFIG_FILE_BYTES).map_err(one)?;
    parse_text(&text, format, &path.display().to_string(), env)
}

/// The configuration `text`, written in `format`, with the environment overrides of `env`
/// applied, read into the raw structs; `origin` (the file's path) starts the message of a
/// problem with the text itself. The unknown keys are returned as problems beside what
/// could be read.
///
/// # Errors
/// The problems, when the text is not shaped like the configuration.
pub(crate) fn parse_text(
    text: &str,
    format: Format,
    origin: &str,
    env: &Env,
) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
    let one = |message: String| ConfigError::from(vec![Problem::new("", message)]);
    let format = match format {
        Format::Toml => config::FileFormat::Toml,
        Format::Yaml => config::FileFormat::Yaml,
        Format::Json => config::FileFormat::Json,
    };
    // The config crate reads each key of the file's top level, and each override's name,
    // as a path in which `[n]` indexes a list, filling the list up to n: 24 bytes,
    // `"sources[99999999]" = 1`, took gigabytes (found by the config fuzz target). Such
    // keys are refused before the crate sees them.
    if format == config::FileFormat::Yaml
        && let Some(problem) = yaml::expansion_problem(text)
    {
        return Err(one(format!("{origin}: {problem}")));
    }
    let mut problems = Vec::new();
    let mut table = config::Source::collect(&config::File::from_str(text, format))
        .map_err(|error| one(format!("{origin}: {error}")))?;
    table.retain(|key, _| {
        let indexed = key.contains(['[', ']']);
        if indexed {
            problems.push(Problem::new(key.clone(), INDEXED_KEY));
        }
        !indexed
    });
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    let overrides: config::Map<String, String> = env
        .iter()
        .filter(|(name, _)| name.starts_with("COMETD_BRIDGE__"))
        .filter(|(name, _)| {
            let indexed = name.contains(['[', ']']);
            if indexed {
                problems.push(Problem::new("", format!("environment variable {name}: {INDEXED_KEY}")));
            }
            !indexed
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let settings = config::Config::builder()
        .add_source(Table(table))
        .add_source(
            config::Environment::with_prefix("COMETD_BRIDGE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .map_err(|error| one(format!("{origin}: {error}")))?;
    let mut unknown = Vec::new();
    let raw: Result<RawConfig, _> = paths::deserialize_named(settings, |key| unknown.push(key));
    problems.extend(unknown.into_iter().map(|key| Problem::new(key, "unknown key")));
    match raw {
        Ok(raw) => Ok((raw, problems)),
        Err(problem) => {
            problems.insert(0, Problem { message: dotted_keys(&problem.message), ..problem });
            Err(problems.into())
        }
    }
}

/// Why a key with `[n]` in it is refused.
const INDEXED_KEY: &str = "unknown key (a key cannot index a list with [n]; write the list itself)";

/// A file's top-level table, already read, as a source of the configuration.
#[derive(Clone, Debug)]
struct Table(config::Map<String, config::Value>);

impl config::Source for Table {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// A key's path as the configuration writes it: `admin.bogus`, `subscriptions[2].sink`.
pub fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => {
            let parent = key_path(parent);
            if parent.is_empty() { key.clone() } else { format!("{parent}.{key}") }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            key_path(parent)
        }
    }
}

/// The config crate writes nested keys as `subscriptions[0]sink`; add the missing dot.
fn dotted_keys(message: &str) -> String {
    let mut text = String::with_capacity(message.len() + 4);
    let mut previous = ' ';
    for c in message.chars() {
        if previous == ']' && (c.is_alphanumeric() || c == '_') {
            text.push('.');
        }
        text.push(c);
        previous = c;
    }
    text
}

/// The process environment as an [`Env`].
pub fn process_env() -> Env {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_options(extra: &str) -> ClientOptions {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("bridge.toml");
        std::fs::write(
            &file,
            format!("[[sources]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/bayeux\"\n{extra}"),
        )
        .expect("write");
        let config = load(&file, &Env::new()).expect("valid");
        config.sources[0].client_options()
    }

    #[test]
    fn a_key_that_indexes_a_list_is_refused_not_expanded() {
        // Before, the config crate filled `subscriptions` with 100 million empty entries.
        let env = Env::from([("COMETD_BRIDGE__SOURCES[99999999]__NAME".to_string(), "x".to_string())]);
        let text = "\"subscriptions[99999999]\" = 1\n[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n";
        for (text, format) in [
            (text.to_string(), Format::Toml),
            ("{\"subscriptions[-99999999]\": 1, \"admin\": {\"bogus\": 1}}".to_string(), Format::Json),
        ] {
            let (raw, problems) = parse_text(&text, format, "test", &env).expect("the rest is read");
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            assert!(raw.subscriptions.is_empty(), "{format:?}");
            assert!(
                problems[0].starts_with("subscriptions[")
                    && problems[0].contains("]: unknown key (a key cannot index"),
                "{problems:?}"
            );
            assert!(
                problems[1]
                    .starts_with("environment variable COMETD_BRIDGE__SOURCES[99999999]__NAME: unknown key"),
                "{problems:?}"
            );
            assert_eq!(problems[2], "admin.bogus: unknown key");
        }
    }

    #[test]
    fn a_sources_proxy_is_http_or_https_and_other_schemes_are_named_as_unsupported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("bridge.toml");
        let source = |proxy: &str| {
            format!("[[sources]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/bayeux\"\nproxy = \"{proxy}\"\n")
        };
        for good in ["http://u:secret@127.0.0.1:3128", "https://u:secret@127.0.0.1:3129"] {
            std::fs::write(&file, source(good)).expect("write");
            load(&file, &Env::new()).expect(good);
        }
        std::fs::write(&file, source("socks5://u:secret@127.0.0.1:1080")).expect("write");
        let error = load(&file, &Env::new()).expect_err("refused").to_string();
        assert!(
            error.contains(
                "sources[0].proxy: socks5:// proxies are not supported: use an http:// or https://"
            ),
            "{error}"
        );
        assert!(!error.contains("secret"), "{error}");
    }

    #[test]
    fn leases_come_with_the_nats_backend_and_cluster_is_refused_without_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("bridge.toml");
        let load_with = |text: &str| {
            std::fs::write(&file, text).expect("write");
            load(&file, &Env::new())
        };
        let nats = "[state]\nbackend = \"nats\"\n";
        let cluster = load_with(nats).expect("valid").cluster.expect("leases with the nats backend");
        assert_eq!(cluster.lease_ttl, Duration::from_secs(5));
        assert_eq!(cluster.handover_wait, Duration::from_secs(5));
        assert!(!cluster.replica.is_empty(), "the host name by default");
        let named =
            load_with(&format!("{nats}[cluster]\nreplica = \"b-1\"\nlease_ttl = \"2s\"\n")).expect("valid");
        let cluster = named.cluster.expect("set");
        assert_eq!((cluster.replica.as_str(), cluster.lease_ttl), ("b-1", Duration::from_secs(2)));
        assert!(load_with("").expect("valid").cluster.is_none(), "one process alone: no leases");
        let error = load_with("[cluster]\nreplica = \"a\"\n").expect_err("refused").to_string();
        assert!(error.contains("cluster: several replicas share state through NATS"), "{error}");
        let error =
            load_with(&format!("{nats}[cluster]\nlease_ttl = \"200ms\"\n")).expect_err("refused").to_string();
        assert!(error.contains("cluster.lease_ttl: must be at least 1s"), "{error}");
    }

    #[test]
    fn dead_letters_are_bounded_by_a_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("bridge.toml");
        let sources = "[[sources]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/bayeux\"\n";
        std::fs::write(&file, sources).expect("write");
        assert_eq!(load(&file, &Env::new()).expect("valid").state.dead_letters_max_bytes, 256 << 20);
        std::fs::write(&file, format!("[state]\ndead_letters_max_bytes = \"3KiB\"\n{sources}"))
            .expect("write");
        assert_eq!(load(&file, &Env::new()).expect("valid").state.dead_letters_max_bytes, 3 << 10);
        for bad in ["lots", "0"] {
            std::fs::write(&file, format!("[state]\ndead_letters_max_bytes = \"{bad}\"\n{sources}"))
                .expect("write");
            let error = load(&file, &Env::new()).expect_err("refused").to_string();
            assert!(
                error.contains(&format!("state.dead_letters_max_bytes: \"{bad}\" is not a size")),
                "{error}"
            );
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named_with_its_path() {
        let subscription = |fields: &str| {
            format!(
                "[[sources]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\n[[subscriptions]]\nid = \"a\"\nsource = \"s\"\n{fields}"
            )
        };
        for (fields, expected) in [
            (
                "channel = [42]\nsink = { type = \"webhook\", url = \"http://h.example/\" }\n",
                "subscriptions[0].channel: invalid type: sequence, expected a string",
            ),
            (
                "channel = \"/c\"\nsink = { type = \"webhook\", url = \"http://h.example/\", colour = \"red\" }\n",
                "subscriptions[0].sink.colour: unknown key",
            ),
            (
                "channel = \"/c\"\nsink = { type = \"webhook\", url = 42 }\n",
                "subscriptions[0].sink.url: invalid type: integer `42`, expected a string",
            ),
            (
                "channel = \"/c\"\nsink = { type = \"nats\", subject = \"s\", jetstream = [true] }\n",
                "subscriptions[0].sink.jetstream: invalid type: sequence, expected a boolean",
            ),
            (
                "channel = \"/c\"\nsink = { type = \"carrier-pigeon\" }\n",
                "subscriptions[0].sink: unknown variant",
            ),
        ] {
            let problems = parse_text(&subscription(fields), Format::Toml, "test", &Env::new());
            let Err(ConfigError::Invalid { problems }) = problems else { panic!("{fields}: refused") };
            assert!(problems[0].to_string().starts_with(expected), "{fields}: {problems:?}");
        }
    }

    #[test]
    fn allowed_hosts_and_max_subscriptions_are_checked() {
        let text = "[admin]\nallowed_hosts = [\"Bridge.Internal.\", \"http://x\", \"a:80\"]\nmax_subscriptions = 0\n";
        let (raw, problems) = parse_text(text, Format::Toml, "test", &Env::new()).expect("read");
        let Err(ConfigError::Invalid { problems }) = validate_parsed(raw, problems, &Env::new()) else {
            panic!("refused")
        };
        let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            problems.iter().any(|p| p.starts_with("admin.allowed_hosts[1]: \"http://x\" is not a host name")),
            "{problems:?}"
        );
        assert!(problems.iter().any(|p| p.starts_with("admin.allowed_hosts[2]")), "{problems:?}");
        assert!(!problems.iter().any(|p| p.starts_with("admin.allowed_hosts[0]")), "{problems:?}");
        assert!(
            problems.contains(&"admin.max_subscriptions: must be at least 1".to_string()),
            "{problems:?}"
        );
        let text = "[admin]\nallowed_hosts = [\"Bridge.Internal.\"]\n";
        let (raw, problems) = parse_text(text, Format::Toml, "test", &Env::new()).expect("read");
        let config = validate_parsed(raw, problems, &Env::new()).expect("valid");
        assert_eq!(
            (config.admin.allowed_hosts, config.admin.max_subscriptions),
            (vec!["bridge.internal".to_string()], 1000)
        );
    }

    #[test]
    fn the_nats_backend_takes_a_replication_factor_of_1_to_5() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("bridge.toml");
        let rest = "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[[sources]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/bayeux\"\n";
        let backend = |keys: &str| {
            std::fs::write(&file, format!("[state]\nbackend = \"nats\"\n{keys}{rest}")).expect("write");
            load(&file, &Env::new()).map(|config| config.state.backend)
        };
        let replicas = |backend: StateBackend| match backend {
            StateBackend::NatsKv { replicas, .. } => replicas,
            other => panic!("{other:?}"),
        };
        assert_eq!(replicas(backend("").expect("valid")), 1, "the default");
        assert_eq!(replicas(backend("replicas = 3\n").expect("valid")), 3);
        for bad in ["0", "6", "-1"] {
            let error = backend(&format!("replicas = {bad}\n")).expect_err("refused").to_string();
            assert!(error.contains(&format!("state.replicas: {bad} is not a replication factor")), "{error}");
        }
    }

    #[test]
    fn read_coalescing_is_on_unless_turned_off() {
        assert_eq!(source_options("").coalescing(), Some(ReadCoalescing::default()));
        assert_eq!(source_options("read_coalescing = false\n").coalescing(), None);
    }
}
