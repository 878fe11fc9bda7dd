//! Long-polling: each payload is one HTTP POST whose response body holds the replies and
//! any events the server had queued.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};

use super::chunked::ChunkedPayload;
use super::{Received, Shared, http_error, require_replies, sort_replies};
use crate::cometd::error::{Error, TransportErrorKind};
use crate::cometd::message::Message;

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
        let response = shared
            .http()?
            .post(shared.options.http_url.clone())
            .headers(headers)
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(http_error)?;
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
        // Dropping the response on an error closes the connection, so the rest of an
        // over-limit body is never read.
        let mut parser = ChunkedPayload::new(response.content_length(), shared.options.max_message_size)?;
        let mut response = response;
        while let Some(chunk) = response.chunk().await.map_err(http_error)? {
            parser.feed(chunk)?;
        }
        let Received { messages: mut received, rejected } = parser.finish()?;
        shared.incoming(&mut received, Some(&response_headers)).await?;
        let (replies, events) = sort_replies(&payload, received, |message| shared.unsolicited(message));
        // Events are the application's whatever happens to the replies; a message that did
        // not fit is told after the events of its payload.
        shared.queue.extend(events);
        let replies = require_replies(&payload, replies, &rejected);
        for error in rejected {
            shared.queue.push(Err(error));
        }
        replies
    }
}
