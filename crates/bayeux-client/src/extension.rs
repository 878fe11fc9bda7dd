//! Extensions: code that sees every payload going out and coming in, to add or read `ext`
//! fields and HTTP headers (authentication, acknowledgements, replay positions...).

use async_trait::async_trait;
use reqwest::header::HeaderMap;

use super::error::Error;
use super::message::Message;

/// A protocol extension, called with the **whole payload** of each send and receive.
///
/// Both hooks default to doing nothing. Implement them with the re-exported [`macro@async_trait`]:
///
/// ```no_run
/// use bayeux_client::{async_trait, Error, Extension, HeaderMap, Message};
///
/// struct Tagger;
///
/// #[async_trait]
/// impl Extension for Tagger {
///     async fn outgoing(&self, payload: &mut Vec<Message>, _headers: &mut HeaderMap) -> Result<(), Error> {
///         for message in payload {
///             message.ext.get_or_insert_with(Default::default).insert("tag".into(), "x".into());
///         }
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Extension: Send + Sync + 'static {
    /// Called just before a payload is sent, after ids and client id are filled in.
    /// `headers` start as the client's configured headers; on websocket they are used only
    /// when a socket is opened.
    ///
    /// # Errors
    /// An error stops the send and is returned to whoever sent it.
    async fn outgoing(&self, payload: &mut Vec<Message>, headers: &mut HeaderMap) -> Result<(), Error> {
        let _ = (payload, headers);
        Ok(())
    }

    /// Called just after a payload is received, before anything else looks at it. `headers`
    /// are the HTTP response headers on long-polling, `None` on websocket.
    ///
    /// # Errors
    /// An error fails the exchange the payload belongs to.
    async fn incoming(&self, payload: &mut Vec<Message>, headers: Option<&HeaderMap>) -> Result<(), Error> {
        let _ = (payload, headers);
        Ok(())
    }

    /// Called before each `/meta/connect` is sent, outside the outgoing hooks' deadline:
    /// an extension that holds the connect back until the application has caught up (the
    /// acknowledgement extension) waits here, at most `max_wait` (the client gives
    /// `min(1 s, connection_timeout / 4)`). The default returns at once.
    async fn before_connect(&self, max_wait: std::time::Duration) {
        let _ = max_wait;
    }

    /// Called when the server refused a subscription to `channel` with `reply` (also for
    /// the automatic resubscriptions after a new handshake). Return `true` after changing
    /// what the next subscribe sends (a replay extension falling back to another
    /// position), and the client sends it once more. The default declines.
    fn subscription_refused(&self, channel: &str, reply: &Message) -> bool {
        let _ = (channel, reply);
        false
    }

    /// What this extension keeps of the current session, for a
    /// [`SessionTicket`](super::SessionTicket) that another client continues the session
    /// with. The default keeps nothing.
    fn session_state(&self) -> Option<serde_json::Value> {
        None
    }

    /// The client continues a session from a ticket: `state` is what
    /// [`session_state`](Self::session_state) gave then (`None` if nothing). Called before
    /// the first `/meta/connect` of the continued session. The default does nothing.
    fn resume_session(&self, state: Option<&serde_json::Value>) {
        let _ = state;
    }
}

/// An extension that carries credentials and can renew them.
///
/// When the reply to a handshake or a connect is a `401` or `403` error, or the reply to
/// any request a `401` (other than an unknown-session error, which a new handshake cures,
/// and a server limit; a `403` refusing a channel is that channel's error), the client
/// calls [`authenticate`](Self::authenticate)
/// and sends the request once more, with fresh ids and the headers the outgoing hook sets
/// now. On websocket the socket is reopened, so new headers reach the server.
#[async_trait]
pub trait AuthExtension: Extension {
    /// Renews the credentials (fetch a new OAuth token, ...). The default does nothing,
    /// which suits static credentials.
    ///
    /// # Errors
    /// An error is returned to the caller of the rejected request.
    async fn authenticate(&self) -> Result<(), Error> {
        Ok(())
    }
}
