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
    /// The event's replay id, on a source with replay.
    pub replay_id: Option<i64>,
    /// The message, shared by every subscription it was routed to.
    pub message: Arc<Message>,
    /// When it was received.
    pub received_at: Instant,
}

impl Envelope {
    /// A key for this delivery: the same on every attempt (so a redelivery can be
    /// de-duplicated, as `Nats-Msg-Id` and `webhook-id`), never shared by two different
    /// messages, nor by two subscriptions that forward the same message. With replay it
    /// derives from the replay id, so an event replayed after a restart keeps its key.
    pub fn delivery_id(&self) -> String {
        match self.replay_id {
            Some(replay_id) => {
                format!("{}.{}.{}.{replay_id}", self.source, self.subscription, self.message.channel)
            }
            None => format!("{}.{}.{}.{}", self.source, self.subscription, self.session, self.sequence),
        }
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
