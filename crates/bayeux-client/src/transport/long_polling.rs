//! Long-polling: each payload is one HTTP POST whose response body holds the replies and
//! any events the server had queued.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};

use super::chunked::ChunkedPayload;
use super::{Received, Shared, http_error, require_replies, sort_replies};
use crate::error::{Error, TransportErrorKind};
use crate::message::Message;

pub(crate) struct LongPolling {
    shared: Arc<Shared>,
}

impl LongPolling {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        LongPolling { shared }
    }

    pub(crate) async fn send(
        &self,
        mut payload: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let shared = &self.shared;
        let mut headers = shared.outgoing(&mut payload).await?;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json;charset=UTF-8"));
        let body = serde_json::to_vec(&payload)
            .map_err(|error| Error::transport_from(TransportErrorKind::Io, error))?;
        // The timeout bounds the server, not the application: time spent waiting for room
        // in the pending queue (below) moves the deadline on by as much.
        let mut deadline = tokio::time::Instant::now() + timeout;
        let request = shared.http()?.post(shared.options.http_url.clone()).headers(headers).body(body).send();
        let response = match tokio::time::timeout_at(deadline, request).await {
            Ok(response) => response.map_err(http_error)?,
            Err(_) => return Err(Error::transport(TransportErrorKind::RequestTimeout)),
        };
        let status = response.status();
        if status.is_redirection() {
            let location = response.headers().get(reqwest::header::LOCATION).map(|value| value.as_bytes());
            return Err(Error::redirect(status.as_u16(), location));
        }
        if !status.is_success() {
            return Err(Error::transport(TransportErrorKind::HttpStatus(status.as_u16())));
        }
        let response_headers = response.headers().clone();
        // Parsed as it arrives: a response of megabytes is never copied whole.
        // Dropping the response on an error closes the connection, so the rest of a
        // body that breaks the limit is never read.
        let mut parser = ChunkedPayload::new(response.content_length(), shared.options.max_message_size);
        let mut response = response;
        let mut replies = Replies::new(payload.len());
        loop {
            let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(chunk) => chunk.map_err(http_error)?,
                Err(_) => return Err(Error::transport(TransportErrorKind::RequestTimeout)),
            };
            let Some(chunk) = chunk else { break };
            parser.feed(chunk)?;
            // A response over max_message_size is handed on as it is read, and read no
            // faster than the application takes its events: memory stays bounded by the
            // pending queue's limit and one message.
            if let Some(portion) = parser.take_portion() {
                self.hand_on(portion, &payload, &mut replies, &response_headers).await?;
                let waiting = tokio::time::Instant::now();
                shared.queue.wait_for_space().await;
                deadline += waiting.elapsed();
            }
        }
        let rest = parser.finish()?;
        self.hand_on(rest, &payload, &mut replies, &response_headers).await?;
        require_replies(&payload, replies.found, replies.first_skipped.as_deref())
    }

    /// Runs the incoming hooks on received messages, keeps the replies to `payload`'s
    /// requests, and queues the events, then the errors for messages that did not fit.
    async fn hand_on(
        &self,
        received: Received,
        payload: &[Message],
        replies: &mut Replies,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<(), Error> {
        let shared = &self.shared;
        let Received { messages: mut received, rejected } = received;
        shared.incoming(&mut received, Some(headers)).await?;
        let (found, events) = sort_replies(payload, received, |message| shared.unsolicited(message));
        for (slot, reply) in replies.found.iter_mut().zip(found) {
            match (slot.is_none(), reply) {
                (true, reply) => *slot = reply,
                (false, Some(again)) => shared.unsolicited(&again),
                (false, None) => {}
            }
        }
        // Events are the application's whatever happens to the replies; a message that did
        // not fit is told after the events of its payload.
        shared.queue.extend(events);
        for error in rejected {
            replies.first_skipped.get_or_insert_with(|| error.to_string());
            shared.queue.push(Err(error));
        }
        Ok(())
    }
}

/// The replies found so far in a response read in parts, one slot per request, and the
/// first message skipped (named if a reply turns out to be missing).
struct Replies {
    found: Vec<Option<Message>>,
    first_skipped: Option<String>,
}

impl Replies {
    fn new(requests: usize) -> Self {
        Replies { found: vec![None; requests], first_skipped: None }
    }
}
