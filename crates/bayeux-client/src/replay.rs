//! The replay extension (Salesforce's Streaming API and servers like it): the handshake
//! says `ext.replay = true`, and every `/meta/subscribe`, including the automatic ones
//! after a new handshake, carries `ext.replay = {channel: id}` from positions the caller
//! supplies. A refused position (expired, unknown) falls back as configured, and says so.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde_json::{Map, Value};

use super::error::Error;
use super::extension::Extension;
use super::message::{META_HANDSHAKE, META_SUBSCRIBE, Message};

/// Where a channel's events start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplayPosition {
    /// Only events published from now on (`-1`).
    New,
    /// Every event the server still retains (`-2`).
    All,
    /// Events after this replay id.
    After(i64),
}

impl ReplayPosition {
    /// The id sent in `ext.replay`.
    pub fn as_id(self) -> i64 {
        match self {
            ReplayPosition::New => -1,
            ReplayPosition::All => -2,
            ReplayPosition::After(id) => id,
        }
    }

    /// The position an id stands for (`-1`, `-2`, or an event's replay id).
    pub fn from_id(id: i64) -> Self {
        match id {
            -1 => ReplayPosition::New,
            -2 => ReplayPosition::All,
            id => ReplayPosition::After(id),
        }
    }
}

impl fmt::Display for ReplayPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayPosition::New => f.write_str("new"),
            ReplayPosition::All => f.write_str("all"),
            ReplayPosition::After(id) => write!(f, "{id}"),
        }
    }
}

/// What to do when the server refuses a channel's replay position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayFallback {
    /// Subscribe again from new events (`-1`): nothing old is replayed.
    New,
    /// Subscribe again from everything retained (`-2`): duplicates rather than gaps.
    All,
    /// Leave the subscription failed; the error reaches the caller.
    Fail,
}

/// The caller's positions, asked at every subscribe.
pub trait ReplayPositions: Send + Sync + 'static {
    /// Where `channel` should start.
    fn position(&self, channel: &str) -> ReplayPosition;
}

impl<F: Fn(&str) -> ReplayPosition + Send + Sync + 'static> ReplayPositions for F {
    fn position(&self, channel: &str) -> ReplayPosition {
        self(channel)
    }
}

/// A fallback the extension applied, for logs, metrics and alerts.
#[derive(Clone, Debug)]
pub struct FallbackApplied {
    /// The channel.
    pub channel: String,
    /// The position the server refused.
    pub refused: Option<i64>,
    /// The position subscribed from instead.
    pub fallback: ReplayPosition,
    /// The server's `error` field.
    pub error: String,
}

type FallbackCallback = Arc<dyn Fn(&FallbackApplied) + Send + Sync>;

/// The replay extension. Add it with [`ClientOptions::extension`](super::ClientOptions::extension).
///
/// ```no_run
/// use bayeux_client::{Client, ReplayExtension, ReplayFallback, ReplayPosition};
///
/// # fn main() -> Result<(), bayeux_client::Error> {
/// let replay = ReplayExtension::new(|_channel: &str| ReplayPosition::All, ReplayFallback::New);
/// let client = Client::builder("https://example.my.salesforce.com/cometd/62.0").extension(replay).build()?;
/// # Ok(()) }
/// ```
pub struct ReplayExtension {
    positions: Arc<dyn ReplayPositions>,
    fallback: ReplayFallback,
    /// Fallback positions in force until the server accepts a subscribe of the channel.
    overrides: Mutex<HashMap<String, ReplayPosition>>,
    on_fallback: Option<FallbackCallback>,
}

impl ReplayExtension {
    /// A replay extension asking `positions` where each channel starts, and applying
    /// `fallback` when the server refuses a position.
    pub fn new(positions: impl ReplayPositions, fallback: ReplayFallback) -> Self {
        ReplayExtension {
            positions: Arc::new(positions),
            fallback,
            overrides: Mutex::default(),
            on_fallback: None,
        }
    }

    /// Calls `callback` whenever a fallback is applied (it is logged at WARN as well).
    pub fn on_fallback(mut self, callback: impl Fn(&FallbackApplied) + Send + Sync + 'static) -> Self {
        self.on_fallback = Some(Arc::new(callback));
        self
    }

    fn overrides(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplayPosition>> {
        self.overrides.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether a refused subscribe is about its replay position: Salesforce answers
/// `400::The replayId {x} you provided was invalid…` or `400::The replayId for channel …
/// wasn't found…`.
fn is_replay_error(reply: &Message) -> bool {
    let Some(field) = reply.error_field() else { return false };
    field.code == Some(400)
        && reply
            .protocol()
            .error
            .as_deref()
            .is_some_and(|error| error.to_ascii_lowercase().contains("replay"))
}

/// The replay id of an event: `data.event.replayId` (PushTopic, generic events, platform
/// events and change data capture all carry it there), as a number or a numeric string.
/// `None` for any other shape; nothing fails on an unknown shape.
pub fn replay_id(message: &Message) -> Option<i64> {
    /// Just the part of the data that holds the replay id; the rest is skipped unparsed.
    #[derive(serde::Deserialize)]
    struct Shape {
        event: Option<Event>,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(rename = "replayId")]
        replay_id: Option<Value>,
    }
    let shape: Shape = message.data.as_ref()?.parse().ok()?;
    match shape.event?.replay_id? {
        Value::Number(id) => id.as_i64(),
        Value::String(id) => id.parse().ok(),
        _ => None,
    }
}

#[async_trait]
impl Extension for ReplayExtension {
    async fn outgoing(&self, payload: &mut Vec<Message>, _headers: &mut HeaderMap) -> Result<(), Error> {
        for message in payload.iter_mut() {
            match message.channel.as_str() {
                META_HANDSHAKE => {
                    message.ext.get_or_insert_with(Map::new).insert("replay".into(), Value::Bool(true));
                }
                META_SUBSCRIBE => {
                    let Some(channel) =
                        message.protocol().subscription.as_ref().and_then(Value::as_str).map(str::to_owned)
                    else {
                        continue;
                    };
                    let position = self
                        .overrides()
                        .get(&channel)
                        .copied()
                        .unwrap_or_else(|| self.positions.position(&channel));
                    let mut replay = Map::new();
                    replay.insert(channel, Value::from(position.as_id()));
                    message.ext.get_or_insert_with(Map::new).insert("replay".into(), Value::Object(replay));
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn incoming(&self, payload: &mut Vec<Message>, _headers: Option<&HeaderMap>) -> Result<(), Error> {
        for message in payload.iter() {
            if message.channel == META_SUBSCRIBE && message.successful == Some(true) {
                let mut overrides = self.overrides();
                for channel in message.subscriptions() {
                    overrides.remove(&channel);
                }
            }
        }
        Ok(())
    }

    fn subscription_refused(&self, channel: &str, reply: &Message) -> bool {
        if !is_replay_error(reply) {
            return false;
        }
        let error = reply.protocol().error.clone().unwrap_or_default();
        let fallback = match self.fallback {
            ReplayFallback::Fail => {
                tracing::error!(channel, error = %error, "the server refused the replay position; no fallback is configured");
                return false;
            }
            ReplayFallback::New => ReplayPosition::New,
            ReplayFallback::All => ReplayPosition::All,
        };
        let refused = {
            let mut overrides = self.overrides();
            if overrides.get(channel) == Some(&fallback) {
                return false; // the fallback itself was refused: give up
            }
            let refused = overrides.get(channel).copied().unwrap_or_else(|| self.positions.position(channel));
            overrides.insert(channel.to_string(), fallback);
            refused
        };
        let applied =
            FallbackApplied { channel: channel.into(), refused: Some(refused.as_id()), fallback, error };
        tracing::warn!(channel, refused = ?applied.refused, fallback = %fallback, error = %applied.error, "replay position refused; falling back");
        if let Some(callback) = &self.on_fallback {
            callback(&applied);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Protocol;
    use serde_json::json;

    fn message(value: Value) -> Message {
        serde_json::from_value(value).expect("message")
    }

    #[test]
    fn replay_ids_come_from_every_known_shape_and_unknown_shapes_give_none() {
        let push_topic = json!({"channel": "/topic/X", "data": {"event": {"createdDate": "2026-01-01T00:00:00Z", "replayId": 7, "type": "created"}, "sobject": {"Id": "1"}}});
        let platform_event = json!({"channel": "/event/E__e", "data": {"schema": "s", "payload": {"CreatedDate": "2026-01-01"}, "event": {"replayId": 8, "EventUuid": "u"}}});
        let change_event = json!({"channel": "/data/ChangeEvents", "data": {"schema": "s", "payload": {"ChangeEventHeader": {"commitTimestamp": 1}}, "event": {"replayId": "9"}}});
        assert_eq!(replay_id(&message(push_topic)), Some(7));
        assert_eq!(replay_id(&message(platform_event)), Some(8));
        assert_eq!(replay_id(&message(change_event)), Some(9));
        for unknown in [
            json!({"channel": "/a", "data": 1}),
            json!({"channel": "/a"}),
            json!({"channel": "/a", "data": {"event": {"replayId": "x"}}}),
        ] {
            assert_eq!(replay_id(&message(unknown)), None);
        }
    }

    #[tokio::test]
    async fn handshakes_and_subscribes_carry_replay_positions_and_fallbacks_apply_once() {
        let extension = ReplayExtension::new(
            |channel: &str| if channel == "/a" { ReplayPosition::After(41) } else { ReplayPosition::New },
            ReplayFallback::All,
        );
        let subscribe = |channel: &str| {
            Message::new(META_SUBSCRIBE)
                .with_protocol(Protocol { subscription: Some(json!(channel)), ..Protocol::default() })
        };
        let mut payload = vec![Message::new(META_HANDSHAKE), subscribe("/a"), subscribe("/b")];
        extension.outgoing(&mut payload, &mut HeaderMap::new()).await.unwrap();
        assert_eq!(payload[0].ext.as_ref().unwrap()["replay"], json!(true));
        assert_eq!(payload[1].ext.as_ref().unwrap()["replay"], json!({"/a": 41}));
        assert_eq!(payload[2].ext.as_ref().unwrap()["replay"], json!({"/b": -1}));

        let refused = message(json!({"channel": META_SUBSCRIBE, "successful": false, "subscription": "/a",
            "error": "400::The replayId {41} you provided was invalid.  Please provide a valid ID, -2 to replay all events, or -1 to replay only new events."}));
        assert!(extension.subscription_refused("/a", &refused), "falls back");
        let mut payload = vec![subscribe("/a")];
        extension.outgoing(&mut payload, &mut HeaderMap::new()).await.unwrap();
        assert_eq!(payload[0].ext.as_ref().unwrap()["replay"], json!({"/a": -2}));
        assert!(!extension.subscription_refused("/a", &refused), "the fallback itself refused: give up");
        let other =
            message(json!({"channel": META_SUBSCRIBE, "successful": false, "error": "403:/a:Forbidden"}));
        assert!(!extension.subscription_refused("/a", &other), "not a replay error");

        let mut accepted =
            vec![message(json!({"channel": META_SUBSCRIBE, "successful": true, "subscription": "/a"}))];
        extension.incoming(&mut accepted, None).await.unwrap();
        let mut payload = vec![subscribe("/a")];
        extension.outgoing(&mut payload, &mut HeaderMap::new()).await.unwrap();
        assert_eq!(
            payload[0].ext.as_ref().unwrap()["replay"],
            json!({"/a": 41}),
            "back to the caller's positions"
        );
    }
}
