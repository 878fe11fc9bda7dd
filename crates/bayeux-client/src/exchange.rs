//! The request/reply plumbing of a session: numbering requests, matching each reply to
//! its request, keeping advice the machine does not see, and renewing credentials once
//! after an authentication failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::error::Error;
use super::machine::needs_new_credentials;
use super::message::{
    Advice, META_CONNECT, META_DISCONNECT, META_HANDSHAKE, META_SUBSCRIBE, META_UNSUBSCRIBE, Message,
};
use super::transport::{Shared, Transport};

/// What the session needs to build requests; cheap to clone into request futures.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) shared: Arc<Shared>,
    /// Message ids, increasing over the client's whole life (never reset by a handshake).
    pub(crate) ids: Arc<AtomicU64>,
    /// The latest advice on a reply other than a handshake's or a connect's (which the
    /// machine reads itself), for the machine to take in after its next step.
    pub(crate) advice: Arc<std::sync::Mutex<Option<Advice>>>,
}

impl Context {
    fn with_ids(&self, mut messages: Vec<Message>) -> Vec<Message> {
        for message in &mut messages {
            message.id = Some(self.ids.fetch_add(1, Ordering::Relaxed).to_string());
        }
        messages
    }

    /// Sends `messages` and returns their replies, one per message and in their order.
    /// After an authentication failure of the first message ([`needs_new_credentials`]:
    /// not a refused channel), asks the auth extension to re-authenticate and sends them
    /// once more.
    pub(crate) async fn exchange(
        &self,
        transport: &Transport,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let replies = self.send(transport, messages.clone(), timeout).await?;
        self.keep_advice(&replies);
        let Some(auth) = &self.shared.options.auth else {
            return Ok(replies);
        };
        if !replies.first().is_some_and(|reply| needs_new_credentials(&messages[0].channel, reply)) {
            return Ok(replies);
        }
        tracing::info!(channel = %messages[0].channel, "the server rejected the credentials; re-authenticating");
        self.shared.within_request_timeout("re-authentication", auth.authenticate()).await?;
        // A websocket sends headers only when it opens: reopen it so the new ones apply.
        transport.reset().await;
        self.send(transport, messages, timeout).await
    }

    /// Keeps the advice of replies the machine does not see (subscribe, publish...): the
    /// latest advice from any reply is followed.
    fn keep_advice(&self, replies: &[Message]) {
        let advised = replies.iter().rev().find(|reply| {
            reply.protocol.is_some() && !matches!(reply.channel.as_str(), META_CONNECT | META_HANDSHAKE)
        });
        if let Some(advice) = advised.and_then(|reply| reply.protocol().advice.clone()) {
            *self.advice.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(advice);
        }
    }

    /// The advice kept by [`keep_advice`](Self::keep_advice) since it was last taken.
    pub(crate) fn take_advice(&self) -> Option<Advice> {
        self.advice.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Numbers `messages`, sends them, and picks each one's reply from what came back.
    async fn send(
        &self,
        transport: &Transport,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let requests = self.with_ids(messages);
        let keys: Vec<(String, Option<String>)> =
            requests.iter().map(|request| (request.channel.clone(), request.id.clone())).collect();
        let replies = transport.send(requests, timeout).await?;
        replies_in_order(&keys, replies)
    }
}

/// The reply to each request (by channel and id), in the requests' order. The outgoing
/// extensions may have added, dropped or reordered messages in the payload: a request left
/// without a reply is the extension's error, reported, never a reply shifted onto the
/// wrong request.
fn replies_in_order(
    keys: &[(String, Option<String>)],
    mut replies: Vec<Message>,
) -> Result<Vec<Message>, Error> {
    let in_place = replies.len() == keys.len()
        && keys
            .iter()
            .zip(&replies)
            .all(|((channel, id), reply)| reply.channel == *channel && reply.id == *id);
    if in_place {
        return Ok(replies);
    }
    keys.iter()
        .map(|(channel, id)| {
            let position = replies.iter().position(|reply| reply.channel == *channel && reply.id == *id);
            match position {
                Some(position) => Ok(replies.swap_remove(position)),
                None => Err(Error::InvalidOperation(format!(
                    "an outgoing extension removed or changed the {channel} request (id {}), so it has no reply",
                    id.as_deref().unwrap_or("none")
                ))),
            }
        })
        .collect()
}

pub(crate) fn failure_name(channel: &str) -> &'static str {
    match channel {
        META_HANDSHAKE => "handshake request failed",
        META_CONNECT => "connect request failed",
        META_DISCONNECT => "disconnect request failed",
        META_SUBSCRIBE => "subscribe request failed",
        META_UNSUBSCRIBE => "unsubscribe request failed",
        channel if channel.starts_with("/service/") => "service request failed",
        _ => "publish request failed",
    }
}

/// The reply, or a server error if it says the request failed.
pub(crate) fn check(reply: Message) -> Result<Message, Error> {
    if reply.successful == Some(true) {
        Ok(reply)
    } else {
        Err(Error::server(failure_name(&reply.channel), Some(reply)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn reply(value: Value) -> Message {
        serde_json::from_value(value).expect("message")
    }

    #[test]
    fn replies_are_matched_to_requests_whatever_an_extension_did_to_the_payload() {
        let key = |channel: &str, id: &str| (channel.to_string(), Some(id.to_string()));
        let answer =
            |channel: &str, id: &str| reply(json!({"channel": channel, "id": id, "successful": true}));
        let keys = [key("/meta/subscribe", "1"), key("/meta/subscribe", "2")];
        let swapped = vec![answer("/meta/subscribe", "2"), answer("/meta/subscribe", "1")];
        let ids: Vec<_> = replies_in_order(&keys, swapped)
            .expect("all answered")
            .into_iter()
            .map(|reply| reply.id)
            .collect();
        assert_eq!(ids, [Some("1".to_string()), Some("2".to_string())]);
        let added =
            vec![answer("/meta/subscribe", "1"), answer("/extra", "9"), answer("/meta/subscribe", "2")];
        assert_eq!(replies_in_order(&keys, added).expect("extra ignored").len(), 2);
        let dropped = replies_in_order(&keys, vec![answer("/meta/subscribe", "1")]).expect_err("one missing");
        assert!(
            dropped.to_string().contains("extension removed or changed the /meta/subscribe request (id 2)"),
            "{dropped}"
        );
    }

    #[test]
    fn failure_messages_name_the_request() {
        assert_eq!(failure_name(META_SUBSCRIBE), "subscribe request failed");
        assert_eq!(failure_name("/service/echo"), "service request failed");
        assert_eq!(failure_name("/chat"), "publish request failed");
    }
}
