//! Subscribing: many channels in one payload or in several under the request body limit,
//! and the second try an extension asks for when the server refuses a channel.

use std::sync::Arc;

use serde_json::Value;

use super::error::Error;
use super::exchange::{Context, check};
use super::message::{META_SUBSCRIBE, Message, Protocol};
use super::transport::Transport;

/// Each channel resubscribed after a new handshake, with the server's verdict.
pub(crate) type Resubscription = Vec<(String, Result<(), Error>)>;

/// Subscribes again to every channel after a new handshake, in one payload. A transport
/// failure fails the whole batch; server rejections come back per channel.
pub(crate) async fn resubscribe(
    ctx: Context,
    transport: Arc<Transport>,
    client_id: String,
    channels: Vec<String>,
) -> Result<Resubscription, Error> {
    subscribe_all(&ctx, &transport, &client_id, channels).await
}

/// Subscribes to `channels` in one payload. A channel the server refuses is offered to the
/// extensions ([`Extension::subscription_refused`](super::Extension::subscription_refused));
/// if one of them adjusted its state (e.g. a replay fallback), that channel is sent once
/// more. A transport failure fails the whole batch.
pub(crate) async fn subscribe_all(
    ctx: &Context,
    transport: &Transport,
    client_id: &str,
    channels: Vec<String>,
) -> Result<Resubscription, Error> {
    if channels.len() > 1 {
        let batches = subscription_batches(&channels, client_id);
        if batches.len() > 1 {
            let mut results = Vec::with_capacity(channels.len());
            for batch in batches {
                results.extend(
                    Box::pin(subscribe_batch(ctx, transport, client_id, channels[batch].to_vec())).await?,
                );
            }
            return Ok(results);
        }
    }
    subscribe_batch(ctx, transport, client_id, channels).await
}

/// The request body Salesforce takes at most (it answers 413 above it).
const MAX_REQUEST_BODY: usize = 32 * 1024;

/// `channels` cut into runs whose subscribe payload stays well under
/// [`MAX_REQUEST_BODY`]: each message is estimated from its fields, twice its channel (an
/// extension such as replay repeats it), and a run is kept to half the limit, leaving room
/// for what extensions add.
fn subscription_batches(channels: &[String], client_id: &str) -> Vec<std::ops::Range<usize>> {
    const FIELDS: usize = 160;
    let mut batches = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (index, channel) in channels.iter().enumerate() {
        let estimate = FIELDS + client_id.len() + 2 * channel.len();
        if index > start && size + estimate > MAX_REQUEST_BODY / 2 {
            batches.push(start..index);
            (start, size) = (index, 0);
        }
        size += estimate;
    }
    batches.push(start..channels.len());
    batches
}

/// One payload of [`subscribe_all`].
async fn subscribe_batch(
    ctx: &Context,
    transport: &Transport,
    client_id: &str,
    channels: Vec<String>,
) -> Result<Resubscription, Error> {
    let timeout = ctx.shared.options.request_timeout;
    let requests =
        channels.iter().map(|channel| subscription_request(META_SUBSCRIBE, client_id, channel)).collect();
    let replies = ctx.exchange(transport, requests, timeout).await?;
    let mut results: Resubscription =
        channels.into_iter().zip(replies).map(|(channel, reply)| (channel, check(reply).map(drop))).collect();
    let retry: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, (channel, result))| {
            let reply =
                result.as_ref().err().and_then(Error::as_server_error).and_then(|error| error.response());
            reply.is_some_and(|reply| {
                ctx.shared
                    .options
                    .extensions
                    .iter()
                    .any(|extension| extension.subscription_refused(channel, reply))
            })
        })
        .map(|(index, _)| index)
        .collect();
    if retry.is_empty() {
        return Ok(results);
    }
    let requests = retry
        .iter()
        .map(|index| subscription_request(META_SUBSCRIBE, client_id, &results[*index].0))
        .collect();
    let replies = ctx.exchange(transport, requests, timeout).await?;
    for (index, reply) in retry.into_iter().zip(replies) {
        results[index].1 = check(reply).map(drop);
    }
    Ok(results)
}

pub(crate) fn subscription_request(meta: &str, client_id: &str, channel: &str) -> Message {
    Message { client_id: Some(client_id.into()), ..Message::new(meta) }
        .with_protocol(Protocol { subscription: Some(Value::String(channel.into())), ..Protocol::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_subscriptions_go_out_in_payloads_under_the_body_limit() {
        let channels: Vec<String> =
            (0..300).map(|n| format!("/event/Order_Change_Number_{n:04}__e")).collect();
        let batches = subscription_batches(&channels, "client-id-of-some-length");
        assert!(batches.len() > 1, "{batches:?}");
        assert_eq!(batches.iter().map(|batch| batch.len()).sum::<usize>(), 300, "every channel once");
        for batch in &batches {
            let payload: Vec<Message> = channels[batch.clone()]
                .iter()
                .map(|channel| subscription_request(META_SUBSCRIBE, "client-id-of-some-length", channel))
                .collect();
            assert!(serde_json::to_vec(&payload).unwrap().len() < MAX_REQUEST_BODY / 2);
        }
        assert_eq!(subscription_batches(&channels[..3], "c"), vec![0..3]);
    }
}
