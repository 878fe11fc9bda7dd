//! The handshake and connection-type negotiation: each accepted connection type is tried
//! in turn, and the session moves to the best type both sides support.

use std::sync::Arc;

use super::error::{CLIENT_ID_LIMIT, Error, TransportErrorKind};
use super::exchange::{Context, check};
use super::message::{Advice, BAYEUX_VERSION, META_HANDSHAKE, Message, Protocol};
use super::options::ConnectionType;
use super::transport::Transport;

/// A negotiated transport and the session the server opened on it.
pub(crate) struct Handshaken {
    pub(crate) transport: Arc<Transport>,
    pub(crate) client_id: String,
    pub(crate) advice: Option<Advice>,
}

/// Handshakes over each accepted connection type in turn (so websocket-only servers work,
/// and a refused upgrade falls back), then moves to the best type both sides support.
pub(crate) async fn handshake(ctx: Context) -> Result<Handshaken, Error> {
    let options = &ctx.shared.options;
    let accepted: Vec<String> =
        options.connection_types.iter().map(|kind| kind.as_str().to_string()).collect();
    let mut last_error = None;
    for (index, kind) in options.connection_types.iter().enumerate() {
        let is_last = index + 1 == options.connection_types.len();
        let transport = Transport::new(*kind, ctx.shared.clone());
        let request = Message::new(META_HANDSHAKE).with_protocol(Protocol {
            version: Some(BAYEUX_VERSION.into()),
            minimum_version: Some(BAYEUX_VERSION.into()),
            supported_connection_types: Some(accepted.clone()),
            ..Protocol::default()
        });
        let sent = match transport.prepare().await {
            Ok(()) => ctx.exchange(&transport, vec![request], options.request_timeout).await,
            Err(error) => Err(error),
        };
        let reply = match sent {
            Ok(mut replies) => replies.remove(0),
            Err(error) if !is_last && matches!(error, Error::Transport { .. }) => {
                tracing::debug!(connection_type = %kind, error = %error, "handshake failed; trying the next connection type");
                transport.close().await;
                last_error = Some(error);
                continue;
            }
            Err(error) => return Err(error),
        };
        let reply = check(reply)?;
        let client_id = reply.client_id.clone().ok_or_else(|| {
            Error::transport(TransportErrorKind::InvalidOperation(
                "the server accepted the handshake but sent no clientId".into(),
            ))
        })?;
        if client_id.len() > CLIENT_ID_LIMIT {
            transport.close().await;
            return Err(Error::transport(TransportErrorKind::InvalidOperation(format!(
                "the server sent a clientId of {} bytes, over the {CLIENT_ID_LIMIT}-byte limit",
                client_id.len()
            ))));
        }
        let offered =
            reply.protocol().supported_connection_types.clone().unwrap_or_else(|| vec![kind.as_str().into()]);
        let common: Vec<ConnectionType> = options
            .connection_types
            .iter()
            .copied()
            .filter(|candidate| offered.iter().any(|name| name == candidate.as_str()))
            .collect();
        if common.is_empty() {
            transport.close().await;
            return Err(Error::NoCommonConnectionType { offered, accepted });
        }
        let mut chosen = None;
        for candidate in common {
            if candidate == *kind {
                chosen = Some(transport);
                break;
            }
            let other = Transport::new(candidate, ctx.shared.clone());
            match other.prepare().await {
                Ok(()) => {
                    transport.close().await;
                    chosen = Some(other);
                    break;
                }
                Err(error) => {
                    tracing::info!(connection_type = %candidate, error = %error, "cannot use the negotiated connection type; falling back")
                }
            }
        }
        let Some(transport) = chosen else {
            return Err(last_error.unwrap_or_else(|| Error::transport(TransportErrorKind::Connect)));
        };
        return Ok(Handshaken {
            transport: Arc::new(transport),
            client_id,
            advice: reply.protocol().advice.clone(),
        });
    }
    Err(last_error.unwrap_or_else(|| Error::transport(TransportErrorKind::Connect)))
}
