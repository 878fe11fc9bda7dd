//! Bayeux messages, advice, and the meta channel names, as they travel on the wire.
//!
//! Knows nothing of transports or sessions: it is the vocabulary the rest of the client
//! speaks.

use bytes::Bytes;
use bytestring::ByteString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// `/meta/handshake`: opens a session and negotiates the connection type.
pub const META_HANDSHAKE: &str = "/meta/handshake";
/// `/meta/connect`: the long poll that carries events and keeps the session alive.
pub const META_CONNECT: &str = "/meta/connect";
/// `/meta/disconnect`: ends the session.
pub const META_DISCONNECT: &str = "/meta/disconnect";
/// `/meta/subscribe`: asks for the events of a channel.
pub const META_SUBSCRIBE: &str = "/meta/subscribe";
/// `/meta/unsubscribe`: stops the events of a channel.
pub const META_UNSUBSCRIBE: &str = "/meta/unsubscribe";

/// The Bayeux protocol version this client speaks.
pub const BAYEUX_VERSION: &str = "1.0";

/// One Bayeux message: a request, a reply, or an event published on a channel.
///
/// Every field of the Bayeux specification is here; fields a server adds beyond the
/// specification are not kept. `id` is accepted as a string or a number and always
/// written as a string.
///
/// The fields an event carries are inline; those only the protocol's own exchanges carry
/// (advice, versions, subscriptions, errors) are in [`Protocol`], boxed and absent from a
/// plain event, so that an event stays small while thousands of them wait in the queue.
/// Read them with [`protocol`](Message::protocol) and set them with
/// [`protocol_mut`](Message::protocol_mut).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "WireMessage<Data>")]
pub struct Message {
    /// The channel the message belongs to, e.g. `/meta/connect` or `/orders/new`.
    pub channel: String,
    /// The message id; a reply carries the id of its request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The session id the server assigned at handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The application payload of a publish or an event, as the JSON text it came in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Data>,
    /// Present on replies: whether the request succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successful: Option<bool>,
    /// Extension data, read and written by [`Extension`](super::Extension)s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ext: Option<Map<String, Value>>,
    /// The protocol's own fields, `None` when the message has none of them.
    #[serde(flatten)]
    pub protocol: Option<Box<Protocol>>,
}

/// The fields of a [`Message`] that the protocol's own exchanges carry (handshake,
/// connect, subscribe and their replies) and events do not.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Protocol {
    /// Present on failed replies: `code:args:message` (see [`ErrorField`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How the server wants the client to behave next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<Advice>,
    /// The channel (or, from some servers, channels) of a subscribe or unsubscribe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<Value>,
    /// The connection type of a `/meta/connect`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_type: Option<String>,
    /// The protocol version of a handshake.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The lowest protocol version a handshake accepts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_version: Option<String>,
    /// The connection types offered in a handshake or its reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supported_connection_types: Option<Vec<String>>,
    /// When the message was sent, as the server wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// What [`Message::protocol`] lends for a message without protocol fields.
static NO_PROTOCOL: Protocol = Protocol::NONE;

impl Protocol {
    /// No protocol fields: what [`Message::protocol`] shows for a message without them.
    const NONE: Protocol = Protocol {
        error: None,
        advice: None,
        subscription: None,
        connection_type: None,
        version: None,
        minimum_version: None,
        supported_connection_types: None,
        timestamp: None,
    };

    fn is_empty(&self) -> bool {
        *self == Protocol::NONE
    }
}

/// A message as it is parsed, its data not yet made a [`Data`]. `D` is how `data` is read:
/// as a [`Data`] of its own, or borrowed from the payload being parsed, to share the
/// payload's buffer.
pub(crate) struct WireMessage<D> {
    channel: String,
    id: Option<String>,
    client_id: Option<String>,
    data: Option<D>,
    successful: Option<bool>,
    ext: Option<Map<String, Value>>,
    protocol: Option<Box<Protocol>>,
}

impl From<WireMessage<Data>> for Message {
    fn from(wire: WireMessage<Data>) -> Self {
        wire.into_message(|data| data)
    }
}

impl<D> WireMessage<D> {
    /// The message, with its data made a [`Data`] by `data`.
    pub(crate) fn into_message(self, data: impl FnOnce(D) -> Data) -> Message {
        Message {
            channel: self.channel,
            id: self.id,
            client_id: self.client_id,
            data: self.data.map(data),
            successful: self.successful,
            ext: self.ext,
            protocol: self.protocol,
        }
    }
}

/// The fields of a message on the wire; any other is skipped.
#[derive(Clone, Copy, Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum Field {
    Channel,
    Id,
    ClientId,
    Data,
    Successful,
    Ext,
    Error,
    Advice,
    Subscription,
    ConnectionType,
    Version,
    MinimumVersion,
    SupportedConnectionTypes,
    Timestamp,
    #[serde(other)]
    Other,
}

/// The wire names of [`Field`], in its order.
const FIELDS: &[&str] = &[
    "channel",
    "id",
    "clientId",
    "data",
    "successful",
    "ext",
    "error",
    "advice",
    "subscription",
    "connectionType",
    "version",
    "minimumVersion",
    "supportedConnectionTypes",
    "timestamp",
];

/// Read by hand rather than derived so that the message is built in place: the protocol
/// fields go straight into their box, allocated only when one of them is there, and no
/// flat intermediate of every field is moved around for each event. A field given twice
/// is an error; `null` is the same as absent.
impl<'de, D: Deserialize<'de>> Deserialize<'de> for WireMessage<D> {
    fn deserialize<De: Deserializer<'de>>(deserializer: De) -> Result<Self, De::Error> {
        struct Fields<D>(std::marker::PhantomData<D>);
        impl<'de, D: Deserialize<'de>> serde::de::Visitor<'de> for Fields<D> {
            type Value = WireMessage<D>;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a Bayeux message")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut channel = None;
                let mut wire = WireMessage {
                    channel: String::new(),
                    id: None,
                    client_id: None,
                    data: None,
                    successful: None,
                    ext: None,
                    protocol: None,
                };
                let mut seen = 0u16;
                while let Some(field) = map.next_key::<Field>()? {
                    if let Field::Other = field {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let bit = 1 << field as u16;
                    if seen & bit != 0 {
                        return Err(serde::de::Error::duplicate_field(FIELDS[field as usize]));
                    }
                    seen |= bit;
                    let protocol = &mut wire.protocol;
                    match field {
                        Field::Channel => channel = Some(map.next_value()?),
                        Field::Id => wire.id = map.next_value::<Id>()?.0,
                        Field::ClientId => wire.client_id = map.next_value()?,
                        Field::Data => wire.data = map.next_value()?,
                        Field::Successful => wire.successful = map.next_value()?,
                        Field::Ext => wire.ext = map.next_value()?,
                        Field::Error => set(&mut map, protocol, |fields| &mut fields.error)?,
                        Field::Advice => set(&mut map, protocol, |fields| &mut fields.advice)?,
                        Field::Subscription => set(&mut map, protocol, |fields| &mut fields.subscription)?,
                        Field::ConnectionType => {
                            set(&mut map, protocol, |fields| &mut fields.connection_type)?
                        }
                        Field::Version => set(&mut map, protocol, |fields| &mut fields.version)?,
                        Field::MinimumVersion => {
                            set(&mut map, protocol, |fields| &mut fields.minimum_version)?
                        }
                        Field::SupportedConnectionTypes => {
                            set(&mut map, protocol, |fields| &mut fields.supported_connection_types)?
                        }
                        Field::Timestamp => set(&mut map, protocol, |fields| &mut fields.timestamp)?,
                        Field::Other => unreachable!("skipped above"),
                    }
                }
                wire.channel = channel.ok_or_else(|| serde::de::Error::missing_field("channel"))?;
                Ok(wire)
            }
        }

        /// Reads a protocol field's value and, unless it is `null`, stores it in `field`
        /// of the protocol fields, boxing them if it is the first.
        fn set<'de, A: serde::de::MapAccess<'de>, T: Deserialize<'de>>(
            map: &mut A,
            protocol: &mut Option<Box<Protocol>>,
            field: impl FnOnce(&mut Protocol) -> &mut Option<T>,
        ) -> Result<(), A::Error> {
            if let Some(value) = map.next_value::<Option<T>>()? {
                *field(protocol.get_or_insert_with(Box::default)) = Some(value);
            }
            Ok(())
        }

        deserializer.deserialize_struct("Message", FIELDS, Fields(std::marker::PhantomData))
    }
}

/// A message id, sent by some servers as a number: kept as the string it would be. Any
/// other type is taken for no id.
struct Id(Option<String>);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Id(match Value::deserialize(deserializer)? {
            Value::String(id) => Some(id),
            Value::Number(id) => Some(id.to_string()),
            _ => None,
        }))
    }
}

/// Equal when every field is; a message whose protocol fields are boxed but all absent
/// equals one without the box.
impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.channel == other.channel
            && self.id == other.id
            && self.client_id == other.client_id
            && self.data == other.data
            && self.successful == other.successful
            && self.ext == other.ext
            && self.protocol() == other.protocol()
    }
}

impl Message {
    /// A message on `channel` with nothing else set.
    pub fn new(channel: impl Into<String>) -> Self {
        Message { channel: channel.into(), ..Message::default() }
    }

    /// The protocol's own fields; all `None` for a message without them, such as an event.
    pub fn protocol(&self) -> &Protocol {
        self.protocol.as_deref().unwrap_or(&NO_PROTOCOL)
    }

    /// The message with these protocol fields, to build a request.
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = (!protocol.is_empty()).then(|| Box::new(protocol));
        self
    }

    /// The protocol's own fields, to set them.
    pub fn protocol_mut(&mut self) -> &mut Protocol {
        self.protocol.get_or_insert_with(Box::default)
    }

    /// Whether the channel is a `/meta/` channel.
    pub fn is_meta(&self) -> bool {
        self.channel.starts_with("/meta/")
    }

    /// Whether the channel is a `/service/` channel.
    pub fn is_service(&self) -> bool {
        self.channel.starts_with("/service/")
    }

    /// Whether this is a reply to a request (it says whether the request succeeded).
    pub fn is_reply(&self) -> bool {
        self.successful.is_some()
    }

    /// Whether this is an event for the application: data on a non-meta channel that is
    /// not a reply.
    pub fn is_event(&self) -> bool {
        !self.is_meta() && !self.is_reply() && self.data.is_some()
    }

    /// Whether this message is the reply to `request`: same channel, same id, and it
    /// carries `successful`. Matching on all three keeps a broadcast that echoes the
    /// publisher's id (faye does that) from being taken for the publish reply.
    pub fn answers(&self, request: &Message) -> bool {
        self.is_reply() && self.channel == request.channel && self.id == request.id
    }

    /// The parsed `error` field, if the message has one.
    pub fn error_field(&self) -> Option<ErrorField> {
        self.protocol().error.as_deref().map(ErrorField::parse)
    }

    /// The channels named by `subscription`, whether it is a string or an array.
    pub fn subscriptions(&self) -> Vec<String> {
        match &self.protocol().subscription {
            Some(Value::String(channel)) => vec![channel.clone()],
            Some(Value::Array(channels)) => {
                channels.iter().filter_map(|channel| channel.as_str().map(str::to_owned)).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// The `data` of a message, kept as the JSON text the server sent and parsed only when
/// asked: into the application's own type with [`parse`](Data::parse) (which skips what
/// the type does not name), or into a [`Value`] with [`value`](Data::value). A bridge that
/// forwards events never parses them at all, and the server's formatting and key order
/// are kept. Build one from a [`Value`] (`Data::from(json!(...))`) to publish.
///
/// Received data is not copied out of the payload it arrived in: it shares the payload's
/// buffer, and that buffer lives as long as any `Data` from it does. An application that
/// keeps a few events long after the rest are gone can [`detach`](Data::detach) them.
///
/// Two `Data` are equal when they hold the same JSON, however it is spaced or ordered.
#[derive(Clone)]
pub struct Data(ByteString);

impl Data {
    /// The data `raw` of a payload being parsed, sharing `payload`'s buffer.
    #[cfg(not(feature = "fuzzing"))]
    pub(crate) fn shared(payload: &ByteString, raw: &RawValue) -> Data {
        Data(payload.slice_ref(raw.get()))
    }

    /// The data `raw` of a payload being parsed, sharing `payload`'s buffer (panics if
    /// `raw` is not a slice of it). Public with the `fuzzing` feature only, for
    /// cometd-bridge's tests of what its spools keep: not an API.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn shared(payload: &ByteString, raw: &RawValue) -> Data {
        Data(payload.slice_ref(raw.get()))
    }

    /// The JSON text, exactly as received.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// The JSON text as shared bytes, to send on without copying it.
    pub fn json_bytes(&self) -> Bytes {
        self.0.as_bytes().clone()
    }

    /// Parses the data into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.json())
    }

    /// Parses the data into a [`Value`]. Data that serde_json cannot make a `Value` of
    /// (nested deeper than 128 levels, say, which it accepts as raw text but will not
    /// parse) comes back as its JSON text in a [`Value::String`]; [`parse`](Data::parse)
    /// gives the error instead.
    pub fn value(&self) -> Value {
        self.parse().unwrap_or_else(|_| Value::String(self.json().to_owned()))
    }

    /// [`value`](Data::value), by value: handy as `message.data.map(Data::into_value)`.
    pub fn into_value(self) -> Value {
        self.value()
    }

    /// The same data in a buffer of its own, so that keeping it does not keep the rest of
    /// the payload it arrived in.
    pub fn detach(&self) -> Data {
        Data(ByteString::from(self.json()))
    }
}

/// Written as the JSON it holds, not as a string.
impl Serialize for Data {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(self.json()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// Read as the JSON text of any value, into a buffer of its own.
impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Ok(Data(ByteString::from(Box::<str>::from(raw))))
    }
}

impl From<Value> for Data {
    fn from(value: Value) -> Self {
        Data::from(&value)
    }
}

impl From<&Value> for Data {
    fn from(value: &Value) -> Self {
        Data(ByteString::from(value.to_string()))
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json() || self.value() == other.value()
    }
}

impl PartialEq<Value> for Data {
    fn eq(&self, other: &Value) -> bool {
        self.value() == *other
    }
}

impl std::fmt::Debug for Data {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.json())
    }
}

impl std::fmt::Display for Data {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.json())
    }
}

/// The `advice` field: what the server wants the client to do next.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Advice {
    /// `retry`, `handshake` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<Reconnect>,
    /// Milliseconds to wait before the next `/meta/connect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    /// Milliseconds the server may hold a `/meta/connect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
}

/// The `advice.reconnect` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reconnect {
    /// Send the next `/meta/connect`.
    Retry,
    /// Handshake again: the session is gone.
    Handshake,
    /// Stop: the server does not want this client back.
    None,
    /// A value this client does not know; treated like `retry` (with backoff), so that a
    /// server's invention never ends a session by accident.
    #[serde(other)]
    Unknown,
}

/// The parts of a Bayeux `error` field, `code:args:message`.
///
/// The field is split on its first two colons, so a colon inside the message stays in the
/// message (`403::Handshake denied: bad token` has the message `Handshake denied: bad token`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorField {
    /// The three-digit code, when the field starts with one.
    pub code: Option<u16>,
    /// The comma-separated arguments; `None` when the field has no colon at all.
    pub args: Option<Vec<String>>,
    /// The readable message; `None` when the field has fewer than two colons.
    pub message: Option<String>,
}

impl ErrorField {
    /// Parses an `error` field; never fails, unparsable parts are `None`.
    pub fn parse(field: &str) -> Self {
        let code = field
            .get(..3)
            .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse().ok());
        let mut parts = field.splitn(3, ':');
        let _code_part = parts.next();
        let args = parts.next().map(|args| {
            if args.is_empty() { Vec::new() } else { args.split(',').map(str::to_owned).collect() }
        });
        let message = parts.next().map(str::to_owned);
        match (&args, &message) {
            // "400": a code alone; "400:x": no message part, args are meaningless.
            (_, None) => ErrorField { code, args: None, message: None },
            _ => ErrorField { code, args, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An `error` field and its expected code, args and message.
    type ErrorCase = (&'static str, Option<u16>, Option<Vec<&'static str>>, Option<&'static str>);

    #[test]
    fn error_fields_split_on_the_first_two_colons() {
        let cases: &[ErrorCase] = &[
            ("402::Unknown client", Some(402), Some(vec![]), Some("Unknown client")),
            (
                "403:xj3,/foo/bar:Subscription denied",
                Some(403),
                Some(vec!["xj3", "/foo/bar"]),
                Some("Subscription denied"),
            ),
            ("401:c1:Unknown client", Some(401), Some(vec!["c1"]), Some("Unknown client")),
            ("::", None, Some(vec![]), Some("")),
            ("12::", None, Some(vec![]), Some("")),
            ("4001::x", Some(400), Some(vec![]), Some("x")),
            ("400", Some(400), None, None),
            ("invalid", None, None, None),
            ("", None, None, None),
            (
                "403::Handshake denied: bad token",
                Some(403),
                Some(vec![]),
                Some("Handshake denied: bad token"),
            ),
        ];
        for (field, code, args, message) in cases {
            let parsed = ErrorField::parse(field);
            assert_eq!(parsed.code, *code, "code of {field:?}");
            assert_eq!(
                parsed.args,
                args.as_ref().map(|a| a.iter().map(|s| s.to_string()).collect()),
                "args of {field:?}"
            );
            assert_eq!(parsed.message.as_deref(), *message, "message of {field:?}");
        }
    }

    #[test]
    fn data_is_kept_as_the_server_sent_it_and_parsed_on_demand() {
        let wire = r#"[{"channel":"/orders","data":{"z":1,"a":[1, 2],"name":"caf\u00e9"}}]"#;
        let message = crate::transport::parse_payload(wire.into()).expect("parse").remove(0);
        let data = message.data.as_ref().expect("data");
        assert_eq!(
            data.json(),
            r#"{"z":1,"a":[1, 2],"name":"caf\u00e9"}"#,
            "text, key order and escapes kept"
        );
        assert_eq!(data.value(), json!({"z": 1, "a": [1, 2], "name": "café"}));
        #[derive(Deserialize, Debug, PartialEq)]
        struct Order {
            z: u32,
        }
        assert_eq!(data.parse::<Order>().expect("typed"), Order { z: 1 });
        assert!(data.parse::<Vec<u8>>().is_err(), "a shape that does not fit is an error");
        let serialized = serde_json::to_string(&message).expect("serialize");
        assert!(serialized.contains(r#""data":{"z":1,"a":[1, 2],"name":"caf\u00e9"}"#), "{serialized}");
        // Equality is by JSON content, not by spacing or key order.
        assert_eq!(*data, Data::from(json!({"a": [1, 2], "name": "café", "z": 1})));
        assert_ne!(*data, Data::from(json!({"z": 2})));
        // From a Value, as tests and the dead-letter retry build messages.
        let built: Message =
            serde_json::from_value(json!({"channel": "/a", "data": {"n": 1}})).expect("from value");
        assert_eq!(built.data.map(Data::into_value), Some(json!({"n": 1})));
    }

    #[test]
    fn data_nested_past_the_parse_limit_comes_back_as_text() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let wire = format!(r#"[{{"channel":"/deep","data":{deep}}}]"#);
        // serde_json captures raw JSON without a depth limit, so the message is accepted.
        let data = crate::transport::parse_payload(wire.clone().into())
            .expect("parse")
            .remove(0)
            .data
            .expect("data");
        assert!(data.parse::<Value>().is_err(), "too deep for a Value");
        assert_eq!(data.value(), Value::String(deep));
    }

    #[test]
    fn a_faye_handshake_reply_round_trips() {
        let wire = json!({
            "channel": "/meta/handshake", "successful": true, "version": "1.0",
            "supportedConnectionTypes": ["long-polling", "websocket"],
            "clientId": "abc", "advice": {"reconnect": "retry", "interval": 0, "timeout": 60000}
        });
        let message: Message = serde_json::from_value(wire.clone()).expect("parse");
        assert_eq!(message.client_id.as_deref(), Some("abc"));
        assert_eq!(
            message.protocol().advice,
            Some(Advice { reconnect: Some(Reconnect::Retry), interval: Some(0), timeout: Some(60000) })
        );
        assert_eq!(serde_json::to_value(&message).expect("serialize"), wire);
    }

    #[test]
    fn numeric_ids_and_unknown_advice_are_accepted() {
        let message: Message = serde_json::from_value(json!({
            "channel": "/meta/connect", "id": 7, "successful": false,
            "advice": {"reconnect": "sideways"}
        }))
        .expect("parse");
        assert_eq!(message.id.as_deref(), Some("7"));
        assert_eq!(message.protocol().advice.as_ref().and_then(|a| a.reconnect), Some(Reconnect::Unknown));
    }

    #[test]
    fn replies_match_on_channel_id_and_successful() {
        let mut request = Message::new("/chat");
        request.id = Some("5".into());
        // faye delivers the broadcast with the publisher's id before the ack.
        let broadcast: Message =
            serde_json::from_value(json!({"channel": "/chat", "id": "5", "data": {"x": 1}})).unwrap();
        let ack: Message =
            serde_json::from_value(json!({"channel": "/chat", "id": "5", "successful": true})).unwrap();
        let other_ack: Message =
            serde_json::from_value(json!({"channel": "/chat", "id": "6", "successful": true})).unwrap();
        assert!(!broadcast.answers(&request));
        assert!(broadcast.is_event());
        assert!(ack.answers(&request));
        assert!(!ack.is_event());
        assert!(!other_ack.answers(&request));
    }

    #[test]
    fn events_leave_the_protocol_fields_unboxed_and_requests_write_them_flat() {
        let event: Message =
            serde_json::from_str(r#"{"channel":"/orders","id":"9","data":{"n":1}}"#).expect("event");
        assert!(event.protocol.is_none(), "an event allocates no protocol fields");
        assert_eq!(*event.protocol(), Protocol::default());
        // Thousands of events wait in the queue at a time; the size is what each costs.
        assert!(std::mem::size_of::<Message>() <= 160, "{} bytes", std::mem::size_of::<Message>());
        let request = Message::new(META_CONNECT)
            .with_protocol(Protocol { connection_type: Some("websocket".into()), ..Protocol::default() });
        assert_eq!(
            serde_json::to_value(&request).expect("serialize"),
            json!({"channel": "/meta/connect", "connectionType": "websocket"})
        );
        // A message whose protocol fields were boxed and left empty equals one without.
        let mut touched = event.clone();
        touched.protocol_mut();
        assert_eq!(touched, event);
        assert!(Message::new("/a").with_protocol(Protocol::default()).protocol.is_none());
        // `null` is absent, and allocates nothing either; unknown fields are skipped.
        let nulls: Message =
            serde_json::from_str(r#"{"channel":"/a","advice":null,"error":null,"x":{"y":[1]},"data":null}"#)
                .expect("nulls");
        assert!(nulls.protocol.is_none() && nulls.data.is_none());
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let error = |text: &str| serde_json::from_str::<Message>(text).expect_err(text).to_string();
        assert!(error(r#"{"id":"1"}"#).contains("missing field `channel`"));
        assert!(error(r#"{"channel":"/a","channel":"/b"}"#).contains("duplicate field `channel`"));
        assert!(error(r#"{"channel":"/a","advice":{},"advice":{}}"#).contains("duplicate field `advice`"));
        assert!(error(r#"{"channel":"/a","successful":"yes"}"#).contains("invalid type"));
        assert!(error(r#"["/a"]"#).contains("expected a Bayeux message"));
    }

    #[test]
    fn subscription_may_be_a_string_or_an_array() {
        let mut message = Message::new(META_SUBSCRIBE);
        message.protocol_mut().subscription = Some(json!("/a"));
        assert_eq!(message.subscriptions(), vec!["/a"]);
        message.protocol_mut().subscription = Some(json!(["/a", "/b"]));
        assert_eq!(message.subscriptions(), vec!["/a", "/b"]);
    }
}
