//! What a subscription's sink is told to do: its destination and options, as validated
//! from the configuration file or an API body. The sinks own these types; the
//! configuration builds them.

use std::time::Duration;

use super::subject::SubjectTemplate;
use crate::secret::Secret;

/// Where a subscription's messages go.
#[derive(Clone, Debug)]
pub enum SinkConfig {
    /// NATS, core or JetStream.
    Nats(NatsSinkConfig),
    /// An HTTP endpoint.
    Webhook(WebhookSinkConfig),
}

impl SinkConfig {
    /// `nats`, `jetstream` or `webhook`, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Nats(nats) if nats.jetstream => "jetstream",
            SinkConfig::Nats(_) => "nats",
            SinkConfig::Webhook(_) => "webhook",
        }
    }
}

/// `sink = { type = "nats", ... }`
#[derive(Clone, Debug)]
pub struct NatsSinkConfig {
    /// Where to publish.
    pub subject: SubjectTemplate,
    /// Through JetStream, waiting for acks.
    pub jetstream: bool,
    /// What to send.
    pub payload: Payload,
}

/// The NATS message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// The Bayeux message's `data`.
    Data,
    /// The whole Bayeux message.
    Envelope,
}

/// `sink = { type = "webhook", ... }`
#[derive(Clone, Debug)]
pub struct WebhookSinkConfig {
    /// The endpoint.
    pub url: reqwest::Url,
    /// Standard Webhooks signing key (decoded).
    pub secret: Option<Secret>,
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Requests in flight at once (1 keeps the order).
    pub max_in_flight: usize,
}
