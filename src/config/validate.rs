//! Turns the raw configuration into domain types, collecting every problem with its key
//! path instead of stopping at the first. The admin API validates posted subscriptions
//! with [`validate_subscription`], so both paths name fields the same way.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use super::raw::RawRetry;
use super::raw::{RawConfig, RawNats, RawSalesforce, RawSink, RawSource, RawSubscription, RawTls};
use super::{
    AdminConfig, BridgeConfig, Config, Env, Fingerprint, NatsConfig, NatsSinkConfig, Payload, Problem,
    RetryConfig, Secret, SectionFingerprints, SinkConfig, SourceConfig, StateBackend, StateConfig,
    SubscriptionConfig, WebhookSinkConfig,
};
use crate::cometd::{
    ChannelPattern, ConnectionType, ReplayFallback, ReplayPosition, SalesforceAuth, SalesforceCredentials,
    SalesforceFlow, Tls,
};
use crate::sink::subject::SubjectTemplate;

/// Collects problems while values are converted.
pub(super) struct Checker<'a> {
    problems: Vec<Problem>,
    env: &'a Env,
}

impl Checker<'_> {
    pub(super) fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(key, message));
    }

    pub(super) fn duration(&mut self, key: &str, text: &str) -> Duration {
        humantime::parse_duration(text).unwrap_or_else(|error| {
            self.problem(
                key,
                format!("{text:?} is not a duration ({error}); write e.g. \"10s\" or \"250ms\""),
            );
            Duration::ZERO
        })
    }

    fn positive_duration(&mut self, key: &str, text: &str) -> Duration {
        let duration = self.duration(key, text);
        if duration.is_zero() && humantime::parse_duration(text).is_ok() {
            self.problem(key, "must be more than zero");
        }
        duration
    }

    fn secret(&mut self, key: &str, spec: &str) -> Option<Secret> {
        let env = |name: &str| self.env.get(name).cloned();
        match Secret::resolve(spec, &env) {
            Ok(secret) => Some(secret),
            Err(message) => {
                self.problem(key, message);
                None
            }
        }
    }

    fn name(&mut self, key: &str, name: &str) {
        if name.is_empty() {
            self.problem(key, "must not be empty");
        } else if name.chars().all(|c| c == '.') {
            self.problem(key, format!("{name:?} is not a usable name"));
        } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            self.problem(key, format!("{name:?} may only contain letters, digits, '-', '_' and '.'"));
        }
    }

    fn positive(&mut self, key: &str, value: i64) -> u32 {
        match u32::try_from(value) {
            Ok(value) if value > 0 => value,
            _ => {
                self.problem(key, format!("must be a positive number, not {value}"));
                1
            }
        }
    }
}

/// Validates the whole configuration.
///
/// # Errors
/// Every problem found.
pub fn validate(raw: RawConfig, env: &Env) -> Result<Config, Vec<Problem>> {
    let mut check = Checker { problems: Vec::new(), env };

    let listen = raw.admin.listen.parse::<SocketAddr>().unwrap_or_else(|_| {
        check
            .problem("admin.listen", format!("{:?} is not an address like 127.0.0.1:8080", raw.admin.listen));
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    let token = raw.admin.token.as_deref().and_then(|spec| check.secret("admin.token", spec));
    let mut allowed_hosts = Vec::new();
    for (index, host) in raw.admin.allowed_hosts.iter().enumerate() {
        let name = host.trim().trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.contains(|c: char| c == '/' || c == ':' || c == '@' || c.is_whitespace()) {
            check.problem(
                format!("admin.allowed_hosts[{index}]"),
                format!("{host:?} is not a host name like \"bridge.internal\" (no scheme, port or path)"),
            );
        } else {
            allowed_hosts.push(name);
        }
    }
    if raw.admin.max_subscriptions == 0 {
        check.problem("admin.max_subscriptions", "must be at least 1");
    }
    if token.as_ref().is_some_and(|token| token.expose().is_empty()) {
        check.problem("admin.token", "must not be empty");
    }

    let backend = match raw.state.backend.as_str() {
        "embedded" | "file" => StateBackend::Embedded,
        "memory" => StateBackend::Memory,
        "nats" | "nats-kv" => {
            // The bucket names derived from it must be valid: letters, digits, `-`, `_`.
            let bucket = &raw.state.bucket;
            if bucket.is_empty() || !bucket.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                check.problem("state.bucket", "must be letters, digits, `-` and `_` only, and not empty");
            }
            let replicas =
                u8::try_from(raw.state.replicas).ok().filter(|replicas| (1..=5).contains(replicas));
            if replicas.is_none() {
                check.problem(
                    "state.replicas",
                    format!("{} is not a replication factor: JetStream takes 1 to 5", raw.state.replicas),
                );
            }
            StateBackend::NatsKv { bucket: bucket.clone(), replicas: replicas.unwrap_or(1) }
        }
        other => {
            check.problem(
                "state.backend",
                format!("{other:?} is not a backend: \"embedded\", \"nats\" or \"memory\""),
            );
            StateBackend::Embedded
        }
    };
    if raw.state.path.is_empty() {
        check.problem("state.path", "must not be empty");
    }
    let spool_max_bytes = match parse_size(&raw.state.spool_max_bytes) {
        Some(bytes) if bytes > 0 => bytes,
        _ => {
            check.problem(
                "state.spool_max_bytes",
                format!(
                    "{:?} is not a size; write e.g. \"1GiB\", \"512MiB\" or \"100MB\"",
                    raw.state.spool_max_bytes
                ),
            );
            1
        }
    };
    let min_free_bytes = parse_size(&raw.state.min_free_bytes).unwrap_or_else(|| {
        check.problem(
            "state.min_free_bytes",
            format!(
                "{:?} is not a size; write e.g. \"256MiB\", \"1GiB\" or \"0\" (no guard)",
                raw.state.min_free_bytes
            ),
        );
        0
    });
    let dead_letters_max_bytes = match parse_size(&raw.state.dead_letters_max_bytes) {
        Some(bytes) if bytes > 0 => bytes,
        _ => {
            check.problem(
                "state.dead_letters_max_bytes",
                format!(
                    "{:?} is not a size; write e.g. \"256MiB\", \"1GiB\" or \"100MB\"",
                    raw.state.dead_letters_max_bytes
                ),
            );
            1
        }
    };

    let nats = nats_config(&mut check, &raw);

    let queue_capacity =
        usize::try_from(check.positive("bridge.queue_capacity", raw.bridge.queue_capacity)).unwrap_or(1);
    let shutdown_grace = check.duration("bridge.shutdown_grace", &raw.bridge.shutdown_grace);

    let mut sources = Vec::new();
    let mut names = BTreeSet::new();
    for (index, source) in raw.sources.iter().enumerate() {
        let key = format!("sources[{index}]");
        if !names.insert(source.name.clone()) {
            check.problem(format!("{key}.name"), format!("{:?} is used by another source", source.name));
        }
        sources.push(source_config(&mut check, &key, source));
    }

    let mut subscriptions = Vec::new();
    let mut ids = BTreeSet::new();
    for (index, subscription) in raw.subscriptions.iter().enumerate() {
        let key = format!("subscriptions[{index}]");
        if !ids.insert(subscription.id.clone()) {
            check.problem(
                format!("{key}.id"),
                format!("{:?} is used by another subscription", subscription.id),
            );
        }
        match validate_subscription(subscription, &key, &names, env) {
            Ok(subscription) => {
                if let Some(prefix) = reserved_subject_prefix(&backend)
                    && let Some(problem) = reserved_subject_problem(&subscription, &prefix, &key)
                {
                    check.problems.push(problem);
                }
                subscriptions.push(subscription);
            }
            Err(problems) => check.problems.extend(problems),
        }
    }

    let cluster = super::cluster::cluster_config(&mut check, &raw, &backend);
    if !check.problems.is_empty() {
        return Err(check.problems);
    }
    let fingerprints = SectionFingerprints {
        admin: Fingerprint::of([
            format!("{:?}", raw.admin).as_str(),
            token.as_ref().map_or("", |token| token.expose()),
        ]),
        state: Fingerprint::of([format!("{:?}", raw.state).as_str()]),
        cluster: Fingerprint::of([format!("{:?}", raw.cluster).as_str()]),
        nats: Fingerprint::of([
            format!("{:?}", raw.nats).as_str(),
            nats.user_password.as_ref().map_or("", |(_, password)| password.expose()),
            nats.token.as_ref().map_or("", |token| token.expose()),
        ]),
    };
    Ok(Config {
        fingerprints,
        admin: AdminConfig {
            listen,
            token,
            allow_private_webhooks: raw.admin.allow_private_webhooks,
            allow_unauthenticated: raw.admin.allow_unauthenticated,
            allowed_hosts,
            max_subscriptions: raw.admin.max_subscriptions,
        },
        state: StateConfig {
            backend,
            path: PathBuf::from(&raw.state.path),
            spool_max_bytes,
            min_free_bytes,
            dead_letters_max_bytes,
        },
        nats,
        bridge: BridgeConfig { queue_capacity, shutdown_grace },
        cluster,
        sources,
        subscriptions,
    })
}

fn nats_config(check: &mut Checker<'_>, raw: &RawConfig) -> NatsConfig {
    let configured = raw.nats.is_some();
    let default = RawNats::default();
    let nats = raw.nats.as_ref().unwrap_or(&default);
    for (index, url) in nats.url.split(',').enumerate() {
        let url = url.trim();
        let valid = reqwest::Url::parse(url).is_ok_and(|parsed| {
            ["nats", "tls", "ws", "wss"].contains(&parsed.scheme()) && parsed.host_str().is_some()
        });
        if !valid {
            let which = if nats.url.contains(',') { format!(" (URL {})", index + 1) } else { String::new() };
            check.problem("nats.url", format!("{url:?} is not a nats:// URL{which}"));
        }
    }
    let user_password = match (&nats.user, &nats.password) {
        (Some(user), Some(password)) => {
            check.secret("nats.password", password).map(|password| (user.clone(), password))
        }
        (None, None) => None,
        _ => {
            check.problem("nats.user", "user and password go together");
            None
        }
    };
    let token = nats.token.as_deref().and_then(|spec| check.secret("nats.token", spec));
    for (key, file) in [("nats.credentials_file", &nats.credentials_file), ("nats.ca_file", &nats.ca_file)] {
        if let Some(file) = file
            && !std::path::Path::new(file).is_file()
        {
            check.problem(key, format!("{file}: no such file"));
        }
    }
    NatsConfig {
        configured,
        url: nats.url.clone(),
        user_password,
        token,
        credentials_file: nats.credentials_file.as_ref().map(PathBuf::from),
        ca_file: nats.ca_file.as_ref().map(PathBuf::from),
        name: nats.name.clone(),
    }
}

fn source_config(check: &mut Checker<'_>, key: &str, source: &RawSource) -> SourceConfig {
    check.name(&format!("{key}.name"), &source.name);
    match reqwest::Url::parse(&source.url) {
        Ok(url) if ["http", "https", "ws", "wss"].contains(&url.scheme()) => {}
        Ok(url) => check.problem(
            format!("{key}.url"),
            format!("scheme {:?} is not http, https, ws or wss", url.scheme()),
        ),
        Err(error) => check.problem(format!("{key}.url"), format!("{:?}: {error}", source.url)),
    }
    let mut connection_types = Vec::new();
    for (index, name) in source.connection_types.iter().enumerate() {
        match name.parse::<ConnectionType>() {
            Ok(kind) => connection_types.push(kind),
            Err(_) => check.problem(
                format!("{key}.connection_types[{index}]"),
                format!("{name:?} is not \"websocket\" or \"long-polling\""),
            ),
        }
    }
    if source.connection_types.is_empty() {
        check.problem(format!("{key}.connection_types"), "must name at least one connection type");
    }
    let connection_timeout = check.duration(&format!("{key}.connection_timeout"), &source.connection_timeout);
    let request_timeout = check.positive_duration(&format!("{key}.request_timeout"), &source.request_timeout);
    let max_message_size = match parse_size(&source.max_message_size).map(usize::try_from) {
        Some(Ok(bytes)) if bytes >= 1024 => bytes,
        _ => {
            check.problem(
                format!("{key}.max_message_size"),
                format!(
                    "{:?} is not a size of at least 1KiB; write e.g. \"16MiB\" or \"64MB\"",
                    source.max_message_size
                ),
            );
            crate::cometd::DEFAULT_MAX_MESSAGE_SIZE
        }
    };
    let mut headers = Vec::new();
    for (name, value) in &source.headers {
        let header_key = format!("{key}.headers.{name}");
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            check.problem(&header_key, "is not a valid HTTP header name");
        }
        if let Some(secret) = check.secret(&header_key, value) {
            if reqwest::header::HeaderValue::from_str(secret.expose()).is_err() {
                check.problem(&header_key, "the value is not a valid HTTP header value");
            }
            headers.push((name.clone(), secret));
        }
    }
    let tls = tls_config(check, &format!("{key}.tls"), &source.tls);
    let replay = match source.replay_fallback.as_str() {
        "all" => ReplayFallback::All,
        "new" => ReplayFallback::New,
        "fail" => ReplayFallback::Fail,
        other => {
            check.problem(
                format!("{key}.replay_fallback"),
                format!("{other:?} is not \"all\", \"new\" or \"fail\""),
            );
            ReplayFallback::Fail
        }
    };
    let salesforce = source
        .salesforce
        .as_ref()
        .and_then(|salesforce| salesforce_config(check, &format!("{key}.salesforce"), salesforce));
    let proxy = source.proxy.as_deref().and_then(|spec| check.secret(&format!("{key}.proxy"), spec));
    if let Some(proxy) = &proxy {
        match reqwest::Url::parse(proxy.expose()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
            // The value may hold credentials: only its scheme is repeated.
            Ok(url) if url.host_str().is_some() => check.problem(
                format!("{key}.proxy"),
                format!(
                    "{}:// proxies are not supported: use an http:// or https://[user:password@]host:port URL",
                    url.scheme()
                ),
            ),
            _ => check.problem(format!("{key}.proxy"), "is not an http:// or https://[user:password@]host:port URL"),
        }
    }
    let described = format!("{source:?}");
    let mut parts: Vec<&str> = vec![&described];
    parts.extend(proxy.as_ref().map(Secret::expose));
    parts.extend(headers.iter().map(|(_, value)| value.expose()));
    if let Some(credentials) = &salesforce {
        parts.extend(credentials.client_secret.as_deref());
        match &credentials.flow {
            SalesforceFlow::Password { password, .. } => parts.push(password),
            SalesforceFlow::RefreshToken { refresh_token } => parts.push(refresh_token),
            SalesforceFlow::JwtBearer { private_key_pem, .. } => parts.push(private_key_pem),
            SalesforceFlow::ClientCredentials => {}
        }
    }
    let fingerprint = Fingerprint::of(parts);
    SourceConfig {
        fingerprint,
        proxy,
        name: source.name.clone(),
        url: source.url.clone(),
        connection_types,
        connection_timeout: Some(connection_timeout).filter(|timeout| !timeout.is_zero()),
        request_timeout,
        max_message_size,
        max_pending_count: source.max_pending_count,
        read_coalescing: source.read_coalescing,
        headers,
        tls,
        replay: source.replay.then_some(replay),
        ack: source.ack,
        salesforce,
    }
}

fn salesforce_config(
    check: &mut Checker<'_>,
    key: &str,
    raw: &RawSalesforce,
) -> Option<SalesforceCredentials> {
    let problems = check.problems.len();
    let required = |check: &mut Checker<'_>, name: &str, value: &Option<String>, secret: bool| -> String {
        match value {
            None => {
                check.problem(format!("{key}.{name}"), format!("is required by the {} flow", raw.flow));
                String::new()
            }
            Some(value) if secret => check
                .secret(&format!("{key}.{name}"), value)
                .map(|secret| secret.expose().to_string())
                .unwrap_or_default(),
            Some(value) => value.clone(),
        }
    };
    let flow = match raw.flow.as_str() {
        "password" => SalesforceFlow::Password {
            username: required(check, "username", &raw.username, false),
            password: required(check, "password", &raw.password, true),
        },
        "refresh_token" => SalesforceFlow::RefreshToken {
            refresh_token: required(check, "refresh_token", &raw.refresh_token, true),
        },
        "client_credentials" => SalesforceFlow::ClientCredentials,
        "jwt" => {
            let username = required(check, "username", &raw.username, false);
            let file = required(check, "private_key_file", &raw.private_key_file, false);
            let private_key_pem =
                crate::files::read_text_bounded(std::path::Path::new(&file), crate::files::SECRET_FILE_BYTES)
                    .unwrap_or_else(|error| {
                        if !file.is_empty() {
                            check.problem(format!("{key}.private_key_file"), error);
                        }
                        String::new()
                    });
            SalesforceFlow::JwtBearer { username, private_key_pem }
        }
        other => {
            check.problem(
                format!("{key}.flow"),
                format!(
                    "{other:?} is not \"password\", \"refresh_token\", \"client_credentials\" or \"jwt\""
                ),
            );
            SalesforceFlow::ClientCredentials
        }
    };
    let client_secret = match (&raw.client_secret, &flow) {
        (Some(secret), _) => {
            check.secret(&format!("{key}.client_secret"), secret).map(|s| s.expose().to_string())
        }
        (None, SalesforceFlow::JwtBearer { .. }) => None,
        (None, _) => {
            check.problem(format!("{key}.client_secret"), format!("is required by the {} flow", raw.flow));
            None
        }
    };
    if reqwest::Url::parse(&raw.login_url).is_err() {
        check.problem(format!("{key}.login_url"), format!("{:?} is not a URL", raw.login_url));
    }
    let credentials = SalesforceCredentials {
        login_url: raw.login_url.clone(),
        client_id: raw.client_id.clone(),
        client_secret,
        flow,
    };
    if check.problems.len() > problems {
        return None;
    }
    if let Err(error) = SalesforceAuth::new(credentials.clone()) {
        check.problem(key, error.to_string());
        return None;
    }
    Some(credentials)
}

fn tls_config(check: &mut Checker<'_>, key: &str, tls: &RawTls) -> Tls {
    let chosen =
        [tls.insecure, tls.ca_file.is_some(), tls.fingerprint.is_some()].iter().filter(|set| **set).count();
    if chosen > 1 {
        check.problem(key, "set only one of insecure, ca_file and fingerprint");
        return Tls::Verify;
    }
    if tls.insecure {
        return Tls::Insecure;
    }
    if let Some(fingerprint) = &tls.fingerprint {
        return Tls::fingerprint(fingerprint).unwrap_or_else(|_| {
            check.problem(
                format!("{key}.fingerprint"),
                "is not a SHA-256 fingerprint (64 hex digits, optionally sha256:)",
            );
            Tls::Verify
        });
    }
    if let Some(file) = &tls.ca_file {
        return match ca_config(file) {
            Ok(config) => Tls::Config(config),
            Err(message) => {
                check.problem(format!("{key}.ca_file"), message);
                Tls::Verify
            }
        };
    }
    Tls::Verify
}

/// A rustls configuration trusting the certificates in the PEM file `file`.
fn ca_config(file: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let bytes = crate::files::read_bounded(std::path::Path::new(file), crate::files::CONFIG_FILE_BYTES)?;
    for certificate in CertificateDer::pem_slice_iter(&bytes) {
        let certificate = certificate.map_err(|error| format!("{file}: {error}"))?;
        roots.add(certificate).map_err(|error| format!("{file}: {error}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{file}: no certificate found"));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Validates one subscription, as in the file or posted to the API, naming problems under
/// `key` (e.g. `subscriptions[2]`, or `` for an API body).
///
/// # Errors
/// Every problem found.
pub fn validate_subscription(
    raw: &RawSubscription,
    key: &str,
    sources: &BTreeSet<String>,
    env: &Env,
) -> Result<SubscriptionConfig, Vec<Problem>> {
    let mut check = Checker { problems: Vec::new(), env };
    let field = |name: &str| {
        if key.is_empty() { name.to_string() } else { format!("{key}.{name}") }
    };
    check.name(&field("id"), &raw.id);
    if !sources.contains(&raw.source) {
        check.problem(field("source"), format!("no source is named {:?}", raw.source));
    }
    let channel = ChannelPattern::new(&raw.channel).map_err(|error| {
        let message = error.to_string();
        check.problem(field("channel"), message.trim_start_matches("invalid client options: ").to_string());
    });
    if raw.channel.starts_with("/meta/") {
        check.problem(field("channel"), "meta channels cannot be subscribed to");
    }
    let sink = match &raw.sink {
        RawSink::Nats { subject, jetstream, payload } => {
            let subject = SubjectTemplate::parse(subject)
                .map_err(|message| check.problem(field("sink.subject"), message));
            let payload = match payload.as_str() {
                "data" => Payload::Data,
                "envelope" => Payload::Envelope,
                other => {
                    check
                        .problem(field("sink.payload"), format!("{other:?} is not \"data\" or \"envelope\""));
                    Payload::Data
                }
            };
            subject
                .ok()
                .map(|subject| SinkConfig::Nats(NatsSinkConfig { subject, jetstream: *jetstream, payload }))
        }
        RawSink::Webhook { url, secret, timeout, max_in_flight, .. } => {
            let url = match reqwest::Url::parse(url) {
                Ok(url) if ["http", "https"].contains(&url.scheme()) => Some(url),
                Ok(url) => {
                    check.problem(
                        field("sink.url"),
                        format!("scheme {:?} is not http or https", url.scheme()),
                    );
                    None
                }
                Err(error) => {
                    check.problem(field("sink.url"), format!("{url:?}: {error}"));
                    None
                }
            };
            let secret = secret.as_deref().and_then(|spec| check.secret(&field("sink.secret"), spec));
            if let Some(secret) = &secret
                && let Some(encoded) = secret.expose().strip_prefix("whsec_")
                && base64::engine::general_purpose::STANDARD.decode(encoded).is_err()
            {
                check.problem(field("sink.secret"), "a whsec_ secret must be base64 after the prefix");
            }
            let timeout = check.positive_duration(&field("sink.timeout"), timeout);
            let max_in_flight = check.positive(&field("sink.max_in_flight"), *max_in_flight) as usize;
            url.map(|url| SinkConfig::Webhook(WebhookSinkConfig { url, secret, timeout, max_in_flight }))
        }
    };
    let replay_from = match &raw.replay_from {
        None => ReplayPosition::New,
        Some(value) => parse_replay_from(value).unwrap_or_else(|| {
            check.problem(field("replay_from"), format!("{value} is not \"new\", \"all\" or a replay id"));
            ReplayPosition::New
        }),
    };
    let retry = retry_config(&mut check, &field, raw);
    let spool_max_bytes = match raw.spool_max_bytes.as_deref() {
        None => DEFAULT_SUBSCRIPTION_SPOOL_BYTES,
        Some(text) => match parse_size(text) {
            Some(bytes) if bytes > 0 => bytes,
            _ => {
                check.problem(
                    field("spool_max_bytes"),
                    format!("{text:?} is not a size; write e.g. \"1GiB\", \"64MiB\" or \"100MB\""),
                );
                1
            }
        },
    };
    match (channel, sink) {
        (Ok(channel), Some(sink)) if check.problems.is_empty() => Ok(SubscriptionConfig {
            fingerprint: Fingerprint::of([
                format!("{raw:?}").as_str(),
                match &sink {
                    SinkConfig::Webhook(WebhookSinkConfig { secret: Some(secret), .. }) => secret.expose(),
                    _ => "",
                },
            ]),
            id: raw.id.clone(),
            source: raw.source.clone(),
            channel,
            sink,
            replay_from,
            retry,
            spool_max_bytes,
            raw: raw.clone(),
        }),
        _ => Err(check.problems),
    }
}

/// The subscription's `retry`, with the first release's `sink.max_attempts` and
/// `sink.max_elapsed` applied over it when they are set.
fn retry_config(
    check: &mut Checker<'_>,
    field: &dyn Fn(&str) -> String,
    raw: &RawSubscription,
) -> RetryConfig {
    let defaults = RawRetry::default();
    let retry = raw.retry.as_ref().unwrap_or(&defaults);
    let mut max_elapsed = check.positive_duration(&field("retry.max_elapsed"), &retry.max_elapsed);
    let max_backoff = check.positive_duration(&field("retry.max_backoff"), &retry.max_backoff);
    let mut max_attempts = None;
    if let RawSink::Webhook { max_attempts: attempts, max_elapsed: elapsed, .. } = &raw.sink {
        if let Some(attempts) = attempts {
            max_attempts = Some(check.positive(&field("sink.max_attempts"), *attempts));
        }
        if let Some(elapsed) = elapsed {
            max_elapsed = check.positive_duration(&field("sink.max_elapsed"), elapsed);
        }
    }
    RetryConfig { max_elapsed, max_backoff, max_attempts }
}

/// The prefix of the subjects the NATS state backend keeps its spools under
/// (`<state.bucket>.`), which no sink subject may start with; `None` on other backends.
pub fn reserved_subject_prefix(backend: &StateBackend) -> Option<String> {
    match backend {
        StateBackend::NatsKv { bucket, .. } => Some(format!("{bucket}.")),
        StateBackend::Embedded | StateBackend::Memory => None,
    }
}

/// The problem of a NATS sink whose subjects all start with the state's reserved prefix
/// (a message could append forged records to a spool); `key` names the subscription.
pub fn reserved_subject_problem(
    subscription: &SubscriptionConfig,
    prefix: &str,
    key: &str,
) -> Option<Problem> {
    let SinkConfig::Nats(nats) = &subscription.sink else { return None };
    nats.subject.always_starts_with(prefix).then(|| {
        let field = if key.is_empty() { "sink.subject".to_string() } else { format!("{key}.sink.subject") };
        Problem::new(
            field,
            format!(
                "{:?} starts with {prefix:?}, where the state backend keeps the spools (state.bucket)",
                nats.subject.to_string()
            ),
        )
    })
}

/// What kind of address `url` names when it is one a webhook posted by a stranger must not
/// reach (see [`crate::sink::destination::private_address`]: loopback, link-local,
/// private, unique-local, unspecified, and their IPv4-mapped, IPv4-compatible and NAT64
/// forms). Host names other than `localhost` are not resolved here: the API's webhook
/// client checks what they resolve to when it connects.
pub fn private_destination(url: &reqwest::Url) -> Option<&'static str> {
    let host = url.host_str()?;
    match host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        Ok(ip) => crate::sink::destination::private_address(ip),
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost")).then_some("loopback")
        }
    }
}

/// A subscription's `spool_max_bytes` when it gives none: 1 GiB.
pub const DEFAULT_SUBSCRIPTION_SPOOL_BYTES: u64 = 1 << 30;

/// A size in bytes: a number, optionally followed by `B`, `KB`, `MB`, `GB`, `TB` (powers
/// of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// `"new"`, `"all"`, or a replay id (a number, or a string of one).
pub fn parse_replay_from(value: &serde_json::Value) -> Option<ReplayPosition> {
    match value {
        serde_json::Value::String(text) if text == "new" => Some(ReplayPosition::New),
        serde_json::Value::String(text) if text == "all" => Some(ReplayPosition::All),
        serde_json::Value::String(text) => text.parse().ok().map(ReplayPosition::from_id),
        serde_json::Value::Number(number) => number.as_i64().map(ReplayPosition::from_id),
        _ => None,
    }
}
