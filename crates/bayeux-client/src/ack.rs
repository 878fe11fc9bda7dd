//! The CometD acknowledgement extension (`ext.ack`): the server numbers each batch of
//! events it sends on a `/meta/connect` reply and keeps the batch until the client's next
//! connect acknowledges it; a batch that is not acknowledged (its reply was lost with a
//! dropped connection) is sent again. The handshake asks for it and it applies when the
//! server's handshake reply says `ext.ack: true`.
//!
//! By default a batch is acknowledged once the client has received it, as the CometD
//! JavaScript client does. With [`AckExtension::confirmed`], it is acknowledged only once
//! the application said it has processed the batch's events ([`AckConfirmer::confirm`]),
//! so that what the server drops has been made durable first: the next connect waits for
//! that, up to a limit, after which it acknowledges only the batches already processed and
//! the server sends the others again.
//!
//! A batch the server sends again comes at the head of the next connect reply, before the
//! new events (the server keeps unacknowledged events in order, under their first batch
//! number). Those the client already handed out are recognised (channel, id and data, in
//! order) and dropped, so the application gets each event once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::error::Error;
use super::extension::Extension;
use super::message::{META_CONNECT, META_HANDSHAKE, Message};

/// How long a connect waits by default for the application to process the last batch;
/// the client caps any wait at `min(1 s, connection_timeout / 4)`, so that a stalled
/// application never makes the server drop the session.
pub const DEFAULT_CONFIRM_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct State {
    /// Batches received since the handshake: (batch number, events received in total
    /// once it had arrived, events it held).
    batches: VecDeque<(i64, u64, u64)>,
    /// The batch acknowledged last (0 after a handshake).
    acknowledged: i64,
    /// The events of the unacknowledged batches, in order: what the server sends again.
    unacknowledged: VecDeque<u64>,
    /// What the reply to the connect in flight starts with, sent again: dropped.
    resent: VecDeque<u64>,
    /// The events received since the last connect reply: the next batch's. A long answer
    /// is handed over in parts (see the long-polling transport), so a batch's events can
    /// come before its connect reply, and what is sent again can span several parts.
    unbatched: Vec<u64>,
}

/// The most events remembered between two connect replies (8 bytes each).
const UNBATCHED_LIMIT: usize = 1 << 20;

/// What tells a sent-again event from a new one: its channel, id and data.
fn fingerprint(message: &Message) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    message.channel.hash(&mut hasher);
    message.id.hash(&mut hasher);
    message.data.as_ref().map(super::Data::json).hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug)]
struct Shared {
    /// Whether the server agreed, in the current session.
    enabled: AtomicBool,
    /// Events received over the extension's life.
    received: AtomicU64,
    /// Events the application processed over the extension's life.
    confirmed: AtomicU64,
    /// Events the server sent again that had been handed out already, dropped.
    resent_dropped: AtomicU64,
    confirmations: Notify,
    state: Mutex<State>,
    /// `None`: acknowledge what was received; else wait for confirmations this long.
    confirm_wait: Option<Duration>,
}

/// The client side of the CometD acknowledgement extension; add it with
/// [`ClientOptions::extension`](super::ClientOptions::extension).
#[derive(Clone, Debug)]
pub struct AckExtension {
    shared: Arc<Shared>,
}

/// Tells an [`AckExtension::confirmed`] extension how many events the application has
/// processed (made durable, forwarded...). Cheap to clone.
#[derive(Clone, Debug)]
pub struct AckConfirmer {
    shared: Arc<Shared>,
}

impl AckConfirmer {
    /// `count` more events, taken from [`Client::receive`](super::Client::receive) in
    /// order, are processed.
    pub fn confirm(&self, count: u64) {
        self.shared.confirmed.fetch_add(count, Ordering::AcqRel);
        self.shared.confirmations.notify_waiters();
    }
}

impl Default for AckExtension {
    fn default() -> Self {
        Self::new()
    }
}

impl AckExtension {
    fn with_wait(confirm_wait: Option<Duration>) -> Self {
        AckExtension {
            shared: Arc::new(Shared {
                enabled: AtomicBool::new(false),
                received: AtomicU64::new(0),
                confirmed: AtomicU64::new(0),
                resent_dropped: AtomicU64::new(0),
                confirmations: Notify::new(),
                state: Mutex::new(State::default()),
                confirm_wait,
            }),
        }
    }

    /// Acknowledges each batch once it has been received.
    pub fn new() -> Self {
        Self::with_wait(None)
    }

    /// Acknowledges each batch only once the application confirmed its events through the
    /// returned [`AckConfirmer`], waiting up to `wait` before each connect.
    pub fn confirmed(wait: Duration) -> (Self, AckConfirmer) {
        let extension = Self::with_wait(Some(wait));
        let confirmer = AckConfirmer { shared: extension.shared.clone() };
        (extension, confirmer)
    }

    /// Events the server sent again (a batch acknowledged late) that had already been
    /// handed out, and were dropped rather than handed out twice.
    pub fn resent_dropped(&self) -> u64 {
        self.shared.resent_dropped.load(Ordering::Acquire)
    }

    /// Whether the server acknowledges batches in the current session.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::Acquire)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The newest batch whose events are all processed (all received, without
    /// confirmations), forgetting the batches it covers.
    fn processed_batch(&self) -> i64 {
        let confirmed = match self.shared.confirm_wait {
            None => u64::MAX,
            Some(_) => self.shared.confirmed.load(Ordering::Acquire),
        };
        let mut state = self.state();
        while let Some((batch, events, count)) = state.batches.front().copied() {
            if events > confirmed {
                break;
            }
            state.acknowledged = batch;
            state.batches.pop_front();
            let count = usize::try_from(count).unwrap_or(usize::MAX).min(state.unacknowledged.len());
            state.unacknowledged.drain(..count);
        }
        // The reply to this connect starts with the unacknowledged events, sent again.
        state.resent = state.unacknowledged.clone();
        state.acknowledged
    }

    /// Waits, up to the configured time and `max_wait`, until the events of the current
    /// session's unacknowledged batches are confirmed. Without such a batch (after a new
    /// handshake, say) it returns at once: events of an earlier session never hold a
    /// connect back.
    async fn wait_for_confirmations(&self, max_wait: Duration) {
        let Some(wait) = self.shared.confirm_wait else { return };
        let Some(target) = self.state().batches.back().map(|(_, events, _)| *events) else { return };
        let all_confirmed = async {
            loop {
                let notified = self.shared.confirmations.notified();
                if self.shared.confirmed.load(Ordering::Acquire) >= target {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(wait.min(max_wait), all_confirmed).await;
    }
}

#[async_trait]
impl Extension for AckExtension {
    /// Whether the server agreed, and the newest batch whose events are all processed:
    /// the next holder of the session acknowledges it, and the server sends the later
    /// ones again.
    fn session_state(&self) -> Option<Value> {
        let confirmed = match self.shared.confirm_wait {
            None => u64::MAX,
            Some(_) => self.shared.confirmed.load(Ordering::Acquire),
        };
        let state = self.state();
        let processed = state.batches.iter().take_while(|(_, events, _)| *events <= confirmed).last();
        let acknowledged = processed.map_or(state.acknowledged, |(batch, _, _)| *batch);
        Some(serde_json::json!({ "enabled": self.is_enabled(), "acknowledged": acknowledged }))
    }

    /// A continued session acknowledges what its previous holder acknowledged (the server
    /// sends again every batch after it, so nothing unacknowledged is lost); the events
    /// of those batches are unknown here, so each is handed out as new.
    fn resume_session(&self, state: Option<&Value>) {
        let enabled = state.and_then(|state| state.get("enabled")).and_then(Value::as_bool).unwrap_or(false);
        let acknowledged =
            state.and_then(|state| state.get("acknowledged")).and_then(Value::as_i64).unwrap_or(0);
        *self.state() = State { acknowledged, ..State::default() };
        self.shared.enabled.store(enabled, Ordering::Release);
    }

    async fn before_connect(&self, max_wait: Duration) {
        if self.is_enabled() {
            self.wait_for_confirmations(max_wait).await;
        }
    }

    async fn outgoing(&self, payload: &mut Vec<Message>, _headers: &mut HeaderMap) -> Result<(), Error> {
        for message in payload.iter_mut() {
            match message.channel.as_str() {
                META_HANDSHAKE => {
                    self.shared.enabled.store(false, Ordering::Release);
                    *self.state() = State::default();
                    message.ext.get_or_insert_with(Map::new).insert("ack".into(), Value::Bool(true));
                }
                META_CONNECT if self.is_enabled() => {
                    let batch = self.processed_batch();
                    message.ext.get_or_insert_with(Map::new).insert("ack".into(), Value::from(batch));
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn incoming(&self, payload: &mut Vec<Message>, _headers: Option<&HeaderMap>) -> Result<(), Error> {
        let connect_reply =
            payload.iter().any(|message| message.channel == META_CONNECT && message.successful == Some(true));
        if self.is_enabled() {
            let mut state = self.state();
            let State { resent, unbatched, .. } = &mut *state;
            let mut dropped = 0;
            payload.retain(|message| {
                if !message.is_event() {
                    return true;
                }
                let print = fingerprint(message);
                if resent.front() == Some(&print) {
                    resent.pop_front();
                    dropped += 1;
                    return false;
                }
                // The first new event ends what was sent again.
                resent.clear();
                // Bounded: a server that floods events and never answers a connect must not
                // grow this without end (past it, a batch sent again is not recognised).
                if unbatched.len() < UNBATCHED_LIMIT {
                    unbatched.push(print);
                }
                true
            });
            if connect_reply {
                resent.clear();
            }
            if dropped > 0 {
                self.shared.resent_dropped.fetch_add(dropped, Ordering::AcqRel);
                tracing::debug!(
                    dropped,
                    "events sent again by the server after a partial acknowledgement, dropped"
                );
            }
        }
        let events = payload.iter().filter(|message| message.is_event()).count() as u64;
        let received = self.shared.received.fetch_add(events, Ordering::AcqRel) + events;
        for message in payload.iter() {
            let ack = message.ext.as_ref().and_then(|ext| ext.get("ack"));
            match message.channel.as_str() {
                META_HANDSHAKE if message.successful == Some(true) => {
                    let enabled = match ack {
                        Some(Value::Bool(enabled)) => *enabled,
                        Some(Value::Object(fields)) => fields.get("enabled") == Some(&Value::Bool(true)),
                        _ => false,
                    };
                    self.shared.enabled.store(enabled, Ordering::Release);
                }
                META_CONNECT if message.successful == Some(true) && self.is_enabled() => {
                    let mut state = self.state();
                    let events = std::mem::take(&mut state.unbatched);
                    if let Some(batch) = ack.and_then(Value::as_i64) {
                        state.batches.push_back((batch, received, events.len() as u64));
                        state.unacknowledged.extend(events);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(value: Value) -> Message {
        serde_json::from_value(value).expect("a message")
    }

    async fn handshake(extension: &AckExtension) {
        let mut request = vec![Message::new(META_HANDSHAKE)];
        extension.outgoing(&mut request, &mut HeaderMap::new()).await.unwrap();
        assert_eq!(request[0].ext.as_ref().unwrap()["ack"], json!(true));
        let mut reply =
            vec![message(json!({"channel": "/meta/handshake", "successful": true, "ext": {"ack": true}}))];
        extension.incoming(&mut reply, None).await.unwrap();
        assert!(extension.is_enabled());
    }

    async fn batch(extension: &AckExtension, number: i64, events: usize) {
        let mut payload: Vec<Message> =
            (0..events).map(|n| message(json!({"channel": "/a", "data": n}))).collect();
        payload
            .push(message(json!({"channel": "/meta/connect", "successful": true, "ext": {"ack": number}})));
        extension.incoming(&mut payload, None).await.unwrap();
    }

    async fn next_ack(extension: &AckExtension) -> Value {
        extension.before_connect(Duration::from_secs(60)).await;
        let mut request = vec![Message::new(META_CONNECT)];
        extension.outgoing(&mut request, &mut HeaderMap::new()).await.unwrap();
        request[0].ext.as_ref().map_or(Value::Null, |ext| ext["ack"].clone())
    }

    #[tokio::test]
    async fn received_batches_are_acknowledged_by_the_next_connect() {
        let extension = AckExtension::new();
        handshake(&extension).await;
        assert_eq!(next_ack(&extension).await, json!(0));
        batch(&extension, 1, 3).await;
        assert_eq!(next_ack(&extension).await, json!(1));
    }

    #[tokio::test]
    async fn with_confirmations_only_processed_batches_are_acknowledged() {
        let (extension, confirmer) = AckExtension::confirmed(Duration::from_millis(50));
        handshake(&extension).await;
        batch(&extension, 1, 2).await;
        batch(&extension, 2, 3).await;
        confirmer.confirm(2);
        assert_eq!(next_ack(&extension).await, json!(1), "batch 2 is not processed: sent again");
        confirmer.confirm(3);
        assert_eq!(next_ack(&extension).await, json!(2));
    }

    #[tokio::test]
    async fn a_connect_waits_for_the_confirmation() {
        let (extension, confirmer) = AckExtension::confirmed(Duration::from_secs(60));
        handshake(&extension).await;
        batch(&extension, 7, 1).await;
        let later = tokio::spawn(async move {
            tokio::task::yield_now().await;
            confirmer.confirm(1);
        });
        assert_eq!(next_ack(&extension).await, json!(7));
        later.await.unwrap();
    }

    /// The wait is bounded by what the client allows, and only batches of the current
    /// session count: after a new handshake, earlier events never hold a connect back.
    #[tokio::test]
    async fn the_wait_is_bounded_and_only_for_the_current_sessions_batches() {
        let (extension, _never_confirms) = AckExtension::confirmed(Duration::from_secs(60));
        handshake(&extension).await;
        batch(&extension, 1, 1).await;
        let started = std::time::Instant::now();
        extension.before_connect(Duration::from_millis(200)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(5), "{waited:?}");
        handshake(&extension).await;
        let started = std::time::Instant::now();
        extension.before_connect(Duration::from_secs(30)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "no wait for an earlier session's events");
    }

    /// A batch not yet confirmed when the next connect goes is sent again by the server at
    /// the head of its reply: the events already handed out are dropped, the new ones kept,
    /// and the counts the confirmations refer to stay right.
    #[tokio::test]
    async fn a_batch_sent_again_is_handed_out_once() {
        let (extension, confirmer) = AckExtension::confirmed(Duration::from_millis(20));
        handshake(&extension).await;
        batch(&extension, 1, 3).await;
        assert_eq!(next_ack(&extension).await, json!(0), "nothing confirmed: batch 1 comes again");
        // The reply: events 0..3 again (the server keeps them), then a new one.
        let mut payload: Vec<Message> =
            (0..4).map(|n| message(json!({"channel": "/a", "data": n}))).collect();
        payload.push(message(json!({"channel": "/meta/connect", "successful": true, "ext": {"ack": 2}})));
        extension.incoming(&mut payload, None).await.unwrap();
        let data: Vec<Value> =
            payload.iter().filter(|m| m.is_event()).map(|m| m.data.as_ref().unwrap().value()).collect();
        assert_eq!(data, [json!(3)], "only the new event");
        confirmer.confirm(3);
        assert_eq!(next_ack(&extension).await, json!(1));
        confirmer.confirm(1);
        assert_eq!(next_ack(&extension).await, json!(2));
        // Nothing unacknowledged: a reply with the same data again is new data.
        let mut payload = vec![
            message(json!({"channel": "/a", "data": 3})),
            message(json!({"channel": "/meta/connect", "successful": true, "ext": {"ack": 3}})),
        ];
        extension.incoming(&mut payload, None).await.unwrap();
        assert_eq!(payload.len(), 2, "kept");
    }

    /// A long answer handed over in parts: the batch's events come before its connect
    /// reply, and what the server sends again spans two parts; each event is still handed
    /// out once and counted in its batch.
    #[tokio::test]
    async fn a_batch_in_parts_is_counted_whole_and_sent_again_once() {
        let (extension, confirmer) = AckExtension::confirmed(Duration::from_millis(20));
        handshake(&extension).await;
        let events = |range: std::ops::Range<i32>| -> Vec<Message> {
            range.map(|n| message(json!({"channel": "/a", "data": n}))).collect()
        };
        let connect = |number: i64| {
            message(json!({"channel": "/meta/connect", "successful": true, "ext": {"ack": number}}))
        };
        let mut first = events(0..3);
        extension.incoming(&mut first, None).await.unwrap();
        let mut second = events(3..5);
        second.push(connect(1));
        extension.incoming(&mut second, None).await.unwrap();
        confirmer.confirm(2);
        assert_eq!(next_ack(&extension).await, json!(0), "batch 1 (5 events) is not processed");
        // Sent again in two parts (0..2, then 2..5 and a new one), then the reply.
        let mut again = events(0..2);
        extension.incoming(&mut again, None).await.unwrap();
        assert!(again.is_empty(), "already handed out: {again:?}");
        let mut rest = events(2..6);
        rest.push(connect(2));
        extension.incoming(&mut rest, None).await.unwrap();
        let data: Vec<Value> =
            rest.iter().filter(|m| m.is_event()).map(|m| m.data.as_ref().unwrap().value()).collect();
        assert_eq!(data, [json!(5)], "only the new event");
        assert_eq!(extension.resent_dropped(), 5);
        confirmer.confirm(3);
        assert_eq!(next_ack(&extension).await, json!(1));
        confirmer.confirm(1);
        assert_eq!(next_ack(&extension).await, json!(2));
    }

    #[tokio::test]
    async fn a_server_without_acks_gets_none() {
        let extension = AckExtension::new();
        let mut reply = vec![message(json!({"channel": "/meta/handshake", "successful": true}))];
        extension.incoming(&mut reply, None).await.unwrap();
        assert!(!extension.is_enabled());
        assert_eq!(next_ack(&extension).await, Value::Null);
    }
}
