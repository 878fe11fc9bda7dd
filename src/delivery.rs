//! What a sink delivers: one Bayeux message on its way to one subscription's sink, with
//! where it came from and when; and its form in a spool. Both the bridge and the sinks use
//! it, so it sits below them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
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
    pub received_at: SystemTime,
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

    /// The message as a spool keeps it.
    pub fn to_record(&self) -> Vec<u8> {
        serde_json::to_vec(&RecordRef {
            source: &self.source,
            subscription: &self.subscription,
            session: &self.session,
            sequence: self.sequence,
            replay_id: self.replay_id,
            received_at_ms: unix_millis(self.received_at),
            message: &self.message,
        })
        .expect("messages serialize")
    }

    /// A message read back from a spool.
    ///
    /// # Errors
    /// The parse error of a record that is not a spooled message.
    pub fn from_record(record: &[u8]) -> Result<Envelope, serde_json::Error> {
        let record: Record = serde_json::from_slice(record)?;
        Ok(Envelope {
            source: record.source.into(),
            subscription: record.subscription.into(),
            session: record.session.into(),
            sequence: record.sequence,
            replay_id: record.replay_id,
            message: Arc::new(record.message),
            received_at: UNIX_EPOCH + Duration::from_millis(record.received_at_ms),
        })
    }

    /// The webhook body: `source`, `subscription`, `channel`, `id`, `data`, `ext` (the
    /// keys of [`to_json`](Envelope::to_json), in the same order), with `data` written as
    /// the exact JSON text it came in (big numbers, key order and deep nesting as the
    /// publisher sent them).
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            channel: &self.message.channel,
            data: self.message.data.as_ref(),
            ext: self.message.ext.as_ref(),
            id: self.message.id.as_deref(),
            source: &self.source,
            subscription: &self.subscription,
        })
        .expect("messages serialize")
    }

    /// The message as the dead-letter listing shows it: `source`, `subscription`,
    /// `channel`, `id`, `data`, `ext`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "source": &*self.source,
            "subscription": &*self.subscription,
            "channel": self.message.channel,
            "id": self.message.id,
            // As a value; data nested deeper than serde_json builds values (128 levels: a
            // publisher can send that) comes as its JSON text instead of panicking here.
            "data": self.message.data.as_ref().map(crate::cometd::Data::value),
            "ext": self.message.ext,
        })
    }
}

/// `text` fit for a header value of any protocol: characters outside visible ASCII
/// become `_`. Values that come from a server or a publisher (ids, channels, sessions)
/// go through it, so a crafted value can never split or break a header.
pub fn visible_ascii(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect()
}

/// `text` without control characters (each becomes `_`), for NATS headers, which carry
/// UTF-8 but no line breaks.
pub fn without_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if text.chars().any(char::is_control) {
        text.chars().map(|c| if c.is_control() { '_' } else { c }).collect::<String>().into()
    } else {
        text.into()
    }
}

/// The webhook body, its keys in the order of a [`serde_json::Map`] (sorted).
#[derive(Serialize)]
struct Body<'a> {
    channel: &'a str,
    data: Option<&'a crate::cometd::Data>,
    ext: Option<&'a serde_json::Map<String, serde_json::Value>>,
    id: Option<&'a str>,
    source: &'a str,
    subscription: &'a str,
}

/// The spooled form, written from borrowed fields.
#[derive(Serialize)]
struct RecordRef<'a> {
    source: &'a str,
    subscription: &'a str,
    session: &'a str,
    sequence: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_id: Option<i64>,
    received_at_ms: u64,
    message: &'a Message,
}

/// The spooled form, read back.
#[derive(Deserialize)]
struct Record {
    source: String,
    subscription: String,
    session: String,
    sequence: u64,
    #[serde(default)]
    replay_id: Option<i64>,
    received_at_ms: u64,
    message: Message,
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cometd::Data;

    #[test]
    fn deeply_nested_data_neither_panics_nor_is_lost() {
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        let message: Message = serde_json::from_str(&format!(r#"{{"channel":"/deep","data":{deep}}}"#))
            .expect("the client takes it");
        let envelope = Envelope {
            source: "demo".into(),
            subscription: "deep".into(),
            session: "s".into(),
            sequence: 1,
            replay_id: None,
            message: Arc::new(message),
            received_at: SystemTime::now(),
        };
        let back = Envelope::from_record(&envelope.to_record()).expect("spooled and read back");
        assert_eq!(back.message.data.as_ref().map(Data::json), Some(deep.as_str()));
        let shown = envelope.to_json();
        assert_eq!(shown["data"], serde_json::Value::String(deep.clone()), "shown as its text");
        let body = String::from_utf8(envelope.to_body()).expect("UTF-8");
        assert!(body.contains(&format!(r#""data":{deep}"#)), "sent as it came: {body}");
    }

    #[test]
    fn the_webhook_body_carries_the_data_as_it_came_in() {
        let data = r#"{"n":12345678901234567890123,"b":1,"a":2}"#;
        let message: Message =
            serde_json::from_str(&format!(r#"{{"channel":"/orders","data":{data},"ext":{{"k":1}}}}"#))
                .expect("the client takes it");
        let envelope = Envelope {
            source: "demo".into(),
            subscription: "orders".into(),
            session: "s".into(),
            sequence: 1,
            replay_id: None,
            message: Arc::new(message),
            received_at: SystemTime::now(),
        };
        let body = String::from_utf8(envelope.to_body()).expect("UTF-8");
        assert_eq!(
            body,
            format!(
                r#"{{"channel":"/orders","data":{data},"ext":{{"k":1}},"id":null,"source":"demo","subscription":"orders"}}"#
            )
        );
        // The same keys and values as before, where serde_json can tell.
        let mut expected = envelope.to_json();
        expected["data"] = serde_json::from_str(data).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap(), expected);
    }

    #[test]
    fn a_spooled_message_reads_back_as_it_was_written() {
        let envelope = Envelope {
            source: "demo".into(),
            subscription: "orders".into(),
            session: "abc".into(),
            sequence: 7,
            replay_id: Some(42),
            message: Arc::new(Message {
                id: Some("m\r\n1".into()),
                data: Some(Data::from(json!({"b": 1, "a": "é"}))),
                ..Message::new("/orders/eu")
            }),
            received_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        };
        let back = Envelope::from_record(&envelope.to_record()).expect("parses");
        assert_eq!(back.delivery_id(), envelope.delivery_id());
        assert_eq!(back.to_json(), envelope.to_json());
        assert_eq!(back.received_at, envelope.received_at);
        assert_eq!(
            back.message.data.as_ref().map(Data::json),
            envelope.message.data.as_ref().map(Data::json)
        );
    }
}
