//! Transports carry payloads (arrays of Bayeux messages) to the server and bring back the
//! replies. Events that arrive with them go straight to the pending queue, in order.
//!
//! Both transports share one cookie jar, one TLS configuration and the extension pipeline,
//! so cookies set at handshake (sticky sessions, `BAYEUX_BROWSER`) follow the session from
//! long-polling to websocket and back.

mod chunked;
pub mod coalesce;
mod long_polling;
mod proxy;
mod websocket;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use bytestring::ByteString;
use reqwest::cookie::Jar;
use reqwest::header::HeaderMap;
use serde_json::value::RawValue;

use super::error::{Error, TransportErrorKind};
use super::message::{Data, Message, WireMessage};
use super::options::{ConnectionType, Proxy, ValidOptions};
use super::pending::PendingQueue;

// The parsing doors the fuzz harnesses go through (public through `crate::fuzzing`).
#[cfg(feature = "fuzzing")]
pub use chunked::{ChunkedPayload, STREAM_AFTER};
pub(crate) use long_polling::LongPolling;
pub(crate) use websocket::WebSocket;
#[cfg(feature = "fuzzing")]
pub use websocket::socket_config;

/// What every transport of one client shares.
pub(crate) struct Shared {
    pub(crate) options: ValidOptions,
    /// The HTTP client, made on first use: a websocket session never needs one, and with
    /// thousands of sessions in a process it would be a good part of their memory.
    http: std::sync::OnceLock<reqwest::Client>,
    pub(crate) jar: Arc<Jar>,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) queue: Arc<PendingQueue>,
    /// Set when the server sent a `/meta/disconnect` of its own (Salesforce does): the
    /// session takes it as advice to handshake again.
    pub(crate) server_disconnected: std::sync::atomic::AtomicBool,
    /// How many times a websocket of this client switched to timed reads (coalescing).
    pub(crate) timed_switches: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    pub(crate) fn new(options: ValidOptions, queue: Arc<PendingQueue>) -> Result<Self, Error> {
        let tls = super::tls::client_config(&options.tls)?;
        let jar = Arc::new(Jar::default());
        Ok(Shared {
            options,
            http: std::sync::OnceLock::new(),
            jar,
            tls,
            queue,
            server_disconnected: std::sync::atomic::AtomicBool::new(false),
            timed_switches: Arc::default(),
        })
    }

    /// Notes a message that answers no request: a `/meta/disconnect` is the server ending
    /// the session on its own.
    pub(crate) fn unsolicited(&self, message: &Message) {
        if message.channel == super::message::META_DISCONNECT {
            tracing::info!("the server sent /meta/disconnect on its own");
            self.server_disconnected.store(true, std::sync::atomic::Ordering::Release);
        } else {
            tracing::debug!(channel = %message.channel, id = ?message.id, "ignoring a reply to no pending request");
        }
    }

    fn build_http(&self) -> Result<reqwest::Client, Error> {
        let builder = reqwest::Client::builder()
            .tls_backend_preconfigured((*self.tls).clone())
            .cookie_provider(self.jar.clone())
            // Never followed: configured headers and cookies would go to another host.
            .redirect(reqwest::redirect::Policy::none());
        // A proxy the client cannot speak (socks) is refused here, clearly, instead of
        // failing every request.
        let uri = self.options.http_url.as_str().parse::<tokio_tungstenite::tungstenite::http::Uri>();
        let proxied = uri.ok().and_then(|uri| self.proxy_for(&uri));
        if let Some(proxy) = &proxied {
            proxy::is_secure(proxy)?;
        }
        let builder = match &self.options.proxy {
            // reqwest reads the environment's proxies by itself.
            Proxy::FromEnvironment => builder,
            Proxy::Direct => builder.no_proxy(),
            Proxy::Url(url) => builder.no_proxy().proxy(
                reqwest::Proxy::all(url.as_str())
                    .map_err(|error| Error::InvalidOptions(format!("proxy: {error}")))?,
            ),
        };
        // A proxy forwarding plain HTTP may close the connection after each answer without
        // saying so (tinyproxy does): the next request on that pooled connection would fail
        // now and then (hyper's IncompleteMessage). Such requests get a connection each.
        let builder = match (&proxied, self.options.http_url.scheme()) {
            (Some(_), "http") => builder.pool_max_idle_per_host(0),
            _ => builder,
        };
        builder.build().map_err(|error| Error::InvalidOptions(format!("HTTP client: {error}")))
    }

    /// The proxy a connection to the server goes through, if any, and its credentials.
    pub(crate) fn proxy_for(
        &self,
        uri: &tokio_tungstenite::tungstenite::http::Uri,
    ) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        use hyper_util::client::proxy::matcher::Matcher;
        match &self.options.proxy {
            Proxy::Direct => None,
            Proxy::FromEnvironment => Matcher::from_env().intercept(uri),
            Proxy::Url(url) => Matcher::builder().all(url.clone()).build().intercept(uri),
        }
    }

    /// The HTTP client for long-polling.
    pub(crate) fn http(&self) -> Result<&reqwest::Client, Error> {
        if let Some(http) = self.http.get() {
            return Ok(http);
        }
        let http = self.build_http()?;
        Ok(self.http.get_or_init(|| http))
    }

    /// Runs the outgoing hooks (extensions, then auth) and returns the headers to send.
    /// They get `request_timeout` together: a hook that logs in somewhere must not stall
    /// the session.
    pub(crate) async fn outgoing(&self, payload: &mut Vec<Message>) -> Result<HeaderMap, Error> {
        let hooks = async {
            let mut headers = self.options.headers.clone();
            for extension in &self.options.extensions {
                extension.outgoing(payload, &mut headers).await?;
            }
            if let Some(auth) = &self.options.auth {
                auth.outgoing(payload, &mut headers).await?;
            }
            Ok(headers)
        };
        self.within_request_timeout("the outgoing extension hooks", hooks).await
    }

    /// Runs the incoming hooks (auth, then extensions) on a received payload, within
    /// `request_timeout`.
    pub(crate) async fn incoming(
        &self,
        payload: &mut Vec<Message>,
        headers: Option<&HeaderMap>,
    ) -> Result<(), Error> {
        if self.options.auth.is_none() && self.options.extensions.is_empty() {
            // Called for every websocket frame: nothing to time when there are no hooks.
            return Ok(());
        }
        let hooks = async {
            if let Some(auth) = &self.options.auth {
                auth.incoming(payload, headers).await?;
            }
            for extension in &self.options.extensions {
                extension.incoming(payload, headers).await?;
            }
            Ok(())
        };
        self.within_request_timeout("the incoming extension hooks", hooks).await
    }

    /// `work`, or a request-timeout error naming `what` if it takes longer than
    /// `request_timeout`.
    pub(crate) async fn within_request_timeout<T>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.options.request_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::transport_from(
                TransportErrorKind::RequestTimeout,
                format!("{what} took longer than request_timeout"),
            )),
        }
    }
}

/// The transport of a session.
pub(crate) enum Transport {
    LongPolling(LongPolling),
    WebSocket(WebSocket),
}

impl Transport {
    /// Makes a transport of `kind`; a websocket connects lazily on its first send.
    pub(crate) fn new(kind: ConnectionType, shared: Arc<Shared>) -> Self {
        match kind {
            ConnectionType::LongPolling => Transport::LongPolling(LongPolling::new(shared)),
            ConnectionType::WebSocket => Transport::WebSocket(WebSocket::new(shared)),
        }
    }

    pub(crate) fn connection_type(&self) -> ConnectionType {
        match self {
            Transport::LongPolling(_) => ConnectionType::LongPolling,
            Transport::WebSocket(_) => ConnectionType::WebSocket,
        }
    }

    /// Sends `payload` and returns the reply to each of its messages, in order.
    ///
    /// Each transport's future is boxed: the two differ a lot in size (an HTTP request
    /// against a send on an open socket), and a future of this enum would otherwise
    /// reserve the larger one for every idle session.
    pub(crate) async fn send(&self, payload: Vec<Message>, timeout: Duration) -> Result<Vec<Message>, Error> {
        match self {
            Transport::LongPolling(transport) => Box::pin(transport.send(payload, timeout)).await,
            Transport::WebSocket(transport) => Box::pin(transport.send(payload, timeout)).await,
        }
    }

    /// Makes sure the transport can carry messages now: opens the websocket. Used while
    /// negotiating, so that a refused upgrade falls back to the next connection type.
    pub(crate) async fn prepare(&self) -> Result<(), Error> {
        match self {
            Transport::LongPolling(_) => Ok(()),
            Transport::WebSocket(transport) => transport.prepare().await,
        }
    }

    /// Drops the current connection, so the next send opens a new one with the headers the
    /// extensions give then (after re-authentication).
    pub(crate) async fn reset(&self) {
        if let Transport::WebSocket(transport) = self {
            transport.reset().await;
        }
    }

    /// Closes the connection for good.
    pub(crate) async fn close(&self) {
        if let Transport::WebSocket(transport) = self {
            transport.close().await;
        }
    }

    /// Closes a websocket as the protocol asks, reading what the server sent before its
    /// own close frame, for at most `wait` (nothing to do on long-polling).
    pub(crate) async fn close_gracefully(&self, wait: std::time::Duration) {
        if let Transport::WebSocket(transport) = self {
            transport.close_gracefully(wait).await;
        }
    }
}

/// A received payload: the messages that fit, and an [`Error::BadMessage`] for each one
/// that did not (empty unless the payload had such a message).
#[derive(Debug)]
pub struct Received {
    /// The messages that fit, in order.
    pub messages: Vec<Message>,
    /// One error for each message that did not fit.
    pub rejected: Vec<Error>,
}

impl Received {
    fn all(messages: Vec<Message>) -> Self {
        Received { messages, rejected: Vec::new() }
    }
}

/// Parses a received payload strictly: any message that does not fit fails it all. For
/// the fuzz harness and tests; the transports use [`parse_received`].
#[cfg(any(test, feature = "fuzzing"))]
pub fn parse_payload(bytes: Bytes) -> Result<Vec<Message>, Error> {
    let received = parse_received(bytes)?;
    match received.rejected.into_iter().next() {
        None => Ok(received.messages),
        Some(error) => Err(Error::malformed(format!("not an array of Bayeux messages ({error})"))),
    }
}

/// Parses a received payload: a JSON array of messages (a single object is accepted too).
/// Its UTF-8 is checked once, here; the messages' data are then slices of it. A message
/// that does not fit costs only itself (see [`one_by_one`]).
pub(crate) fn parse_received(bytes: Bytes) -> Result<Received, Error> {
    match ByteString::try_from(bytes) {
        Ok(text) => parse_text(text),
        Err(error) => Err(Error::malformed(format!("not JSON ({error})"))),
    }
}

/// Parses a payload known to be UTF-8.
fn parse_text(text: ByteString) -> Result<Received, Error> {
    let capacity = message_count_estimate(text.as_bytes(), text.len());
    match messages_from(&text, capacity) {
        Ok(messages) => Ok(Received::all(messages)),
        Err(array_error) => {
            if let Some(received) = one_by_one(&text) {
                return Ok(received);
            }
            match serde_json::from_str::<Message>(&text) {
                Ok(message) => Ok(Received::all(vec![message])),
                Err(_) => {
                    let what = if text.is_empty() {
                        "empty body".to_string()
                    } else if serde_json::from_str::<serde_json::Value>(&text).is_ok() {
                        format!("not an array of Bayeux messages ({array_error})")
                    } else {
                        format!("not JSON ({array_error})")
                    };
                    Err(Error::malformed(what))
                }
            }
        }
    }
}

/// The longest channel name an error about a skipped message repeats.
const REJECTED_CHANNEL_LIMIT: usize = 1024;

/// A JSON array whose messages did not all parse, read again message by message (only
/// then, so the usual payload is scanned once): each is a raw JSON value first (read
/// without recursion, whatever its nesting), then a message, or an error naming its
/// channel and why it does not fit. `None` if the payload is not a JSON array at all.
fn one_by_one(text: &ByteString) -> Option<Received> {
    let raws: Vec<&RawValue> = serde_json::from_str(text).ok()?;
    let mut received = Received::all(Vec::with_capacity(raws.len()));
    for raw in raws {
        match serde_json::from_str::<WireMessage<&RawValue>>(raw.get()) {
            Ok(wire) => received.messages.push(wire.into_message(|data| Data::shared(text, data))),
            Err(error) => received.rejected.push(rejected_message(raw, &error)),
        }
    }
    Some(received)
}

/// The error for a message of the server's payload that is JSON but not a Bayeux
/// message: it names the message's channel (if it has one) and why it does not fit, and
/// is logged, since the message is skipped.
pub(crate) fn rejected_message(raw: &RawValue, error: &serde_json::Error) -> Error {
    #[derive(serde::Deserialize)]
    struct ChannelOnly {
        channel: Option<String>,
    }
    let channel = serde_json::from_str::<ChannelOnly>(raw.get())
        .ok()
        .and_then(|only| only.channel)
        .map(|channel| super::error::bounded(channel, REJECTED_CHANNEL_LIMIT));
    let error = Error::BadMessage { channel, reason: error.to_string() };
    tracing::warn!(error = %error, "skipping a message of the server's payload");
    error
}

/// About how many messages a payload of `len` bytes that starts with `start` holds, so
/// that the vector they go into is sized up front: a long-polling response can hold tens
/// of thousands, and a vector that grows is copied each time. Every message has a
/// `"channel"` key: they are counted in the first [`SAMPLE`] bytes and the count scaled to
/// the whole payload (a server's batch is mostly alike messages; a wrong guess only costs
/// a reallocation). It is capped at one message per 24 bytes (an event is rarely smaller),
/// so that data full of `"channel"` strings cannot make the reservation outgrow the parse.
/// A payload of a few kilobytes (a websocket frame, usually one message) is not scanned:
/// its vector grows a few times at little cost.
fn message_count_estimate(start: &[u8], len: usize) -> usize {
    const SAMPLE: usize = 64 * 1024;
    static CHANNEL_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"channel\""));
    if len < 4096 || start.is_empty() {
        return 1;
    }
    let sample = &start[..start.len().min(SAMPLE)];
    let in_sample = CHANNEL_KEY.find_iter(sample).count();
    let scaled = in_sample.saturating_mul(len).div_ceil(sample.len());
    scaled.min(len / 24)
}

/// A JSON array of messages read into a vector of `capacity`, with nothing after it. Each
/// message's data is a slice of `payload`, not a copy.
fn messages_from(payload: &ByteString, capacity: usize) -> serde_json::Result<Vec<Message>> {
    struct Messages<'p> {
        payload: &'p ByteString,
        capacity: usize,
    }
    impl<'de> serde::de::Visitor<'de> for Messages<'_> {
        type Value = Vec<Message>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("an array of Bayeux messages")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Message>, A::Error> {
            let mut messages = Vec::with_capacity(self.capacity);
            while let Some(wire) = seq.next_element::<WireMessage<&'de RawValue>>()? {
                messages.push(wire.into_message(|raw| Data::shared(self.payload, raw)));
            }
            Ok(messages)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(payload);
    let messages = serde::Deserializer::deserialize_seq(&mut deserializer, Messages { payload, capacity })?;
    deserializer.end()?;
    Ok(messages)
}

/// Sorts received messages into the replies to `requests` (one slot each, in request
/// order) and the events for the application. Anything else (a reply to nothing we sent)
/// is dropped with a debug log.
pub(crate) fn sort_replies(
    requests: &[Message],
    mut received: Vec<Message>,
    unsolicited: impl Fn(&Message),
) -> (Vec<Option<Message>>, Vec<Message>) {
    let mut replies: Vec<Option<Message>> = vec![None; requests.len()];
    // Replies are few and events many: the replies are taken out, and the events stay
    // where they are, in order, rather than each being moved into a new vector.
    let not_events: Vec<Message> = received.extract_if(.., |message| !message.is_event()).collect();
    for message in not_events {
        let slot = requests
            .iter()
            .zip(replies.iter())
            .position(|(request, reply)| reply.is_none() && message.answers(request));
        match slot {
            Some(index) => replies[index] = Some(message),
            None => unsolicited(&message),
        }
    }
    (replies, received)
}

/// Every request's reply, or a malformed-reply error naming the first one missing (and
/// the first message of the payload that was skipped, which may have been it).
pub(crate) fn require_replies(
    requests: &[Message],
    replies: Vec<Option<Message>>,
    first_skipped: Option<&str>,
) -> Result<Vec<Message>, Error> {
    replies
        .into_iter()
        .zip(requests)
        .map(|(reply, request)| {
            reply.ok_or_else(|| {
                let skipped = first_skipped.map(|error| format!("; {error}")).unwrap_or_default();
                Error::malformed(format!(
                    "no reply to {} (id {}){skipped}",
                    request.channel,
                    request.id.as_deref().unwrap_or("none")
                ))
            })
        })
        .collect()
}

/// Maps an HTTP client error onto the transport error kinds.
pub(crate) fn http_error(error: reqwest::Error) -> Error {
    let kind = if error.is_timeout() {
        TransportErrorKind::RequestTimeout
    } else if is_tls(&error) {
        TransportErrorKind::Tls
    } else if error.is_connect() {
        TransportErrorKind::Connect
    } else {
        TransportErrorKind::Io
    };
    Error::transport_from(kind, error)
}

/// Whether a rustls error is somewhere in the chain. `io::Error` hides the error it wraps
/// from `source()`, so it is unwrapped by hand.
pub(crate) fn is_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if error.is::<rustls::Error>() {
            return true;
        }
        current = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Data;
    use serde_json::json;

    fn message(value: serde_json::Value) -> Message {
        serde_json::from_value(value).expect("message")
    }

    #[test]
    fn malformed_payloads_are_named() {
        let parse = |bytes: &[u8]| parse_payload(Bytes::copy_from_slice(bytes));
        let error = |bytes: &[u8]| parse(bytes).expect_err("malformed").to_string();
        assert!(error(b"").contains("empty body"));
        assert!(error(b"<html>").contains("not JSON"));
        assert!(error(b"[{\"channel\":\"/\xff\"}]").contains("not JSON (invalid utf-8"));
        assert!(error(b"42").contains("not an array"));
        assert!(error(b"[{\"id\":\"1\"}]").contains("not an array of Bayeux messages"));
        assert_eq!(parse(b"{\"channel\":\"/a\"}").expect("object").len(), 1);
        assert!(parse(b"[]").expect("empty array").is_empty());
    }

    #[test]
    fn data_share_the_payload_buffer_until_detached() {
        let payload = Bytes::from(r#"[{"channel":"/a","data":{"n":1}},{"channel":"/b","data":[2]}]"#);
        let inside = |data: &Data| payload.as_ptr_range().contains(&data.json_bytes().as_ptr());
        let messages = parse_payload(payload.clone()).expect("parse");
        let data: Vec<&Data> = messages.iter().filter_map(|message| message.data.as_ref()).collect();
        assert_eq!(data.iter().map(|data| data.json()).collect::<Vec<_>>(), [r#"{"n":1}"#, "[2]"]);
        assert!(data.iter().all(|data| inside(data)), "not copied out of the payload");
        let detached = data[0].detach();
        assert_eq!(detached, *data[0]);
        assert!(!inside(&detached), "a buffer of its own");
    }

    #[test]
    fn a_large_payload_parses_whole_and_in_order_whatever_its_data_says() {
        // Past the size where the messages are counted first; data that mentions
        // "channel" over-counts, a message with a long payload under-counts.
        let mut events: Vec<serde_json::Value> = (0..500)
            .map(|n| json!({"channel": "/chat", "id": n.to_string(), "data": {"channel": "/elsewhere", "n": n}}))
            .collect();
        events.push(json!({"channel": "/chat", "id": "500", "data": {"n": 500, "pad": "x".repeat(80_000)}}));
        let text = serde_json::to_string(&events).expect("json");
        assert!(text.len() > 64 * 1024, "past the sampled prefix too");
        let parsed = parse_payload(Bytes::from(text.clone())).expect("parsed");
        let ids: Vec<String> = parsed.into_iter().filter_map(|message| message.id).collect();
        assert_eq!(ids, (0..=500).map(|n| n.to_string()).collect::<Vec<_>>());
        assert!(
            parse_payload(Bytes::from(format!("{text} trailing"))).is_err(),
            "nothing may follow the array"
        );
    }

    #[test]
    fn replies_are_sorted_from_events_in_completion_order() {
        let requests = vec![
            message(json!({"channel": "/meta/connect", "id": "1"})),
            message(json!({"channel": "/chat", "id": "2", "data": 1})),
        ];
        // faye answers in completion order and echoes the publisher's id on the broadcast.
        let received = vec![
            message(json!({"channel": "/chat", "id": "2", "data": 1})),
            message(json!({"channel": "/chat", "id": "2", "successful": true})),
            message(json!({"channel": "/meta/connect", "id": "1", "successful": true})),
            message(json!({"channel": "/meta/subscribe", "id": "99", "successful": true})),
        ];
        let (replies, events) = sort_replies(&requests, received, |_| {});
        assert_eq!(replies[0].as_ref().map(|m| m.channel.as_str()), Some("/meta/connect"));
        assert_eq!(replies[1].as_ref().and_then(|m| m.successful), Some(true));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.as_ref().map(Data::value), Some(json!(1)));
        assert!(require_replies(&requests, replies, None).is_ok());
    }

    #[test]
    fn replies_anywhere_in_a_response_leave_the_events_in_order() {
        let requests = vec![
            message(json!({"channel": "/meta/connect", "id": "1"})),
            message(json!({"channel": "/meta/subscribe", "id": "2"})),
            message(json!({"channel": "/chat", "id": "3", "data": 0})),
        ];
        let event = |n: u32| message(json!({"channel": "/chat", "data": n}));
        // faye's order (replies first), then replies in the middle and at the end.
        let received = vec![
            message(json!({"channel": "/meta/connect", "id": "1", "successful": true})),
            event(1),
            event(2),
            message(json!({"channel": "/meta/subscribe", "id": "2", "successful": true})),
            event(3),
            message(json!({"channel": "/chat", "id": "3", "successful": true})),
        ];
        let (replies, events) = sort_replies(&requests, received, |_| {});
        let order: Vec<serde_json::Value> =
            events.into_iter().filter_map(|event| event.data.map(Data::into_value)).collect();
        assert_eq!(order, [json!(1), json!(2), json!(3)]);
        assert!(require_replies(&requests, replies, None).is_ok(), "every reply found");
    }

    #[test]
    fn a_missing_reply_is_a_malformed_reply_error() {
        let requests = vec![message(json!({"channel": "/meta/connect", "id": "7"}))];
        let (replies, _) = sort_replies(&requests, Vec::new(), |_| {});
        let error = require_replies(&requests, replies, None).expect_err("missing");
        assert_eq!(error.to_string(), "malformed reply from the server: no reply to /meta/connect (id 7)");
    }
}
