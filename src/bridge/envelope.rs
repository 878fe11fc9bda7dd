//! What a sink receives: one Bayeux message on its way to one subscription's sink, with
//! where it came from and when.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use crate::cometd::Message;

/// One message routed to one subscription.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The source's name.
    pub source: Arc<str>,
    /// The subscription's id.
    pub subscription: Arc<str>,
    /// The CometD session the message arrived on.
    pub session: Arc<str>,
    /// Arrival order within the source, over the process's life.
    pub sequence: u64,
    /// The message, shared by every subscription it was routed to.
    pub message: Arc<Message>,
    /// When it was received.
    pub received_at: Instant,
}

impl Envelope {
    /// A key for this delivery: the same on every attempt (so a redelivery can be
    /// de-duplicated, as `Nats-Msg-Id` and `webhook-id`), never shared by two different
    /// messages, nor by two subscriptions that forward the same message.
    pub fn delivery_id(&self) -> String {
        format!("{}.{}.{}.{}", self.source, self.subscription, self.session, self.sequence)
    }

    /// The webhook body, and what the dead-letter store keeps: `source`, `subscription`,
    /// `channel`, `id`, `data`, `ext`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "source": &*self.source,
            "subscription": &*self.subscription,
            "channel": self.message.channel,
            "id": self.message.id,
            "data": self.message.data,
            "ext": self.message.ext,
        })
    }
}
