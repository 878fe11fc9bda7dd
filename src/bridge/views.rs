//! What the bridge shows and answers: the API's views of sources and subscriptions (the
//! types and how they are built), why the bridge is not ready, and why a runtime change
//! was refused.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::Serialize;

use super::registry::SubscriptionEntry;
use super::{Bridge, spool};
use crate::cometd::{Error, SessionState};
use crate::config::{Problem, RawSink};
use crate::store::StoreError;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The subscription is not valid.
    #[error("invalid subscription")]
    Invalid(Vec<Problem>),
    /// No such source.
    #[error("no source is named {0:?}")]
    UnknownSource(String),
    /// No such subscription or dead letter.
    #[error("{0} not found")]
    NotFound(String),
    /// The id is taken, or the record cannot be changed this way.
    #[error("{0}")]
    Conflict(String),
    /// The CometD server refused the subscription.
    #[error("the CometD server refused the subscription: {0}")]
    Upstream(Error),
    /// As many subscriptions as `admin.max_subscriptions` allows exist.
    #[error(
        "there are {0} subscriptions, the most admin.max_subscriptions allows; remove one or raise the limit"
    )]
    TooMany(usize),
    /// A webhook posted through the API points at a loopback, link-local or private
    /// address.
    #[error("{0}")]
    Forbidden(String),
    /// NATS is needed but not configured.
    #[error("{0}")]
    Unavailable(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A reloaded configuration is not valid, or cannot be applied as it is; nothing
    /// changed.
    #[error("the configuration cannot be applied; nothing changed")]
    InvalidConfig(Vec<Problem>),
    /// A reloaded configuration changes what only a restart can change; nothing changed.
    #[error("{0}")]
    RestartRequired(String),
}

/// What a reload changed: subscription ids and source names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Added by the new configuration.
    pub added: Vec<String>,
    /// Gone from it.
    pub removed: Vec<String>,
    /// Changed, or restarted because their source changed.
    pub changed: Vec<String>,
}

/// Where a subscription was defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// In the configuration file: read-only through the API.
    Config,
    /// Added through the API: stored in the state store.
    Api,
}

/// A source as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SourceView {
    /// Its name.
    pub name: String,
    /// Its CometD endpoint.
    pub url: String,
    /// `connected`, `connecting` or `disconnected`.
    pub state: &'static str,
    /// `websocket` or `long-polling`, once negotiated.
    pub connection_type: Option<&'static str>,
    /// The session id the server assigned.
    pub client_id: Option<String>,
    /// The last failure.
    pub last_error: Option<String>,
    /// The channels the server confirmed.
    pub subscriptions: Vec<String>,
    /// With several replicas (the `nats` state backend): the replica that owns the
    /// source, as this one last saw the leases; `null` while nobody does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A subscription as the API shows it (secrets masked).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionView {
    /// Its id.
    pub id: String,
    /// Its source.
    pub source: String,
    /// Its channel or pattern.
    pub channel: String,
    /// Where its messages go, as configured; secrets are shown as `***`.
    #[schema(value_type = Object)]
    pub sink: RawSink,
    /// Where it was defined.
    pub origin: Origin,
    /// `active` when the server confirmed the channel, else `pending`.
    pub state: &'static str,
    /// Messages routed to it.
    pub received: u64,
    /// Messages its sink acknowledged.
    pub forwarded: u64,
    /// Messages stored as dead letters.
    pub dead_letters: u64,
    /// Messages dropped because it was full (without replay).
    pub dropped: u64,
    /// Whether it cannot take messages now (its spool quota, all spools' bound, the disk
    /// or the store).
    pub full: bool,
    /// What its spool holds: received, not yet delivered or dead-lettered.
    pub backlog: BacklogView,
    /// With replay: the committed position per channel (everything up to it was delivered
    /// or dead-lettered); `-1`/`-2` after a reset to new/all.
    #[schema(value_type = Object)]
    pub positions: Option<crate::store::Positions>,
}

/// A spool's backlog as the API shows it.
#[derive(Clone, Copy, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct BacklogView {
    /// Messages waiting.
    pub messages: u64,
    /// Their size in the store.
    pub bytes: u64,
    /// Age of the oldest, in seconds; 0 when there is none.
    pub oldest_age_seconds: f64,
}

impl From<spool::Backlog> for BacklogView {
    fn from(backlog: spool::Backlog) -> Self {
        BacklogView {
            messages: backlog.messages,
            bytes: backlog.bytes,
            oldest_age_seconds: backlog
                .oldest
                .and_then(|oldest| SystemTime::now().duration_since(oldest).ok())
                .map_or(0.0, |age| age.as_secs_f64()),
        }
    }
}

/// One reason the bridge is not ready: in general terms, for anyone who can reach
/// `/readyz`, and in detail (names, channels, errors, panic texts), for the token holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unready {
    /// What kind of thing is wrong, naming nothing (`a source is not connected`).
    pub general: &'static str,
    /// What exactly.
    pub detail: String,
}

impl Unready {
    pub(super) fn new(general: &'static str, detail: String) -> Self {
        Unready { general, detail }
    }
}

/// The general reason of a task that failed recently.
pub(super) const TASK_FAILED: &str = "a task failed in the last minute and was restarted";

impl Bridge {
    /// Every subscription.
    pub fn subscriptions(&self) -> Vec<SubscriptionView> {
        self.subscriptions.all(|entry| self.view(entry))
    }

    /// One subscription.
    pub fn subscription(&self, id: &str) -> Option<SubscriptionView> {
        self.subscriptions.get(id, |entry| self.view(entry))
    }

    pub(super) fn view(&self, entry: &SubscriptionEntry) -> SubscriptionView {
        let config = &entry.config;
        let active = self.source(&config.source).is_some_and(|source| {
            let status = source.client.status();
            status.state == SessionState::Connected && status.subscriptions.contains(config.channel.as_str())
        });
        let mut sink = config.raw.sink.clone();
        if let RawSink::Webhook { url, secret, .. } = &mut sink {
            *url = crate::redact::mask_url(url);
            if let Some(secret) = secret {
                *secret = "***".into();
            }
        }
        SubscriptionView {
            id: config.id.clone(),
            source: config.source.clone(),
            channel: config.channel.to_string(),
            sink,
            origin: entry.origin,
            state: if active { "active" } else { "pending" },
            received: entry.counters.received.load(Ordering::Relaxed),
            forwarded: entry.counters.forwarded.load(Ordering::Relaxed),
            dead_letters: entry.counters.dead_letters.load(Ordering::Relaxed),
            dropped: entry.counters.dropped.load(Ordering::Relaxed),
            full: entry.spool.full().is_some(),
            backlog: entry.spool.backlog().into(),
            positions: self
                .source(&config.source)
                .and_then(|source| source.replay.as_ref().map(|replay| replay.committed(&config.id))),
        }
    }

    /// Every source with its live state.
    pub fn sources(&self) -> Vec<SourceView> {
        self.source_list()
            .iter()
            .map(|source| {
                let status = source.client.status();
                SourceView {
                    name: source.config.name.clone(),
                    url: crate::redact::mask_url(&source.config.url),
                    state: match status.state {
                        SessionState::Connected => "connected",
                        SessionState::Unconnected
                        | SessionState::Handshaking
                        | SessionState::Reconnecting => "connecting",
                        SessionState::Disconnecting | SessionState::Closed => "disconnected",
                    },
                    connection_type: status.connection_type.map(|kind| kind.as_str()),
                    client_id: status.client_id,
                    last_error: status.last_error.map(|error| crate::redact::mask_urls_in(&error)),
                    subscriptions: status.subscriptions.into_iter().collect(),
                    owner: self.ownership.as_ref().and_then(|ownership| ownership.owner(&source.config.name)),
                }
            })
            .collect()
    }
}
