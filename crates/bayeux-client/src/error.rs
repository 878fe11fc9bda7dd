//! The client's one error type, shaped like aiocometd's hierarchy so that callers can ask
//! the same questions: is it my misuse, the network, or the server saying no?
//!
//! | aiocometd | here |
//! |---|---|
//! | `ClientError` | [`Error::NoCommonConnectionType`], [`Error::InvalidOptions`], [`Error::Authentication`] ([`ErrorKind::Client`]) |
//! | `ClientInvalidOperation` | [`Error::InvalidOperation`], [`Error::Closed`] |
//! | `TransportError` | [`Error::Transport`] with a [`TransportErrorKind`], [`Error::BadMessage`] |
//! | `TransportInvalidOperation` | [`TransportErrorKind::InvalidOperation`] |
//! | `TransportTimeoutError` | [`TransportErrorKind::ConnectionTimeout`] (and [`TransportErrorKind::RequestTimeout`]) |
//! | `TransportConnectionClosed` | [`TransportErrorKind::ConnectionClosed`] |
//! | `ServerError` | [`Error::Server`] with a [`ServerError`] |

use std::fmt;

use super::message::{ErrorField, Message};

/// A boxed error from a library underneath (HTTP, websocket, TLS, JSON).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the CometD client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options given to the builder cannot work (a bad URL, an empty list of
    /// connection types...).
    #[error("invalid client options: {0}")]
    InvalidOptions(String),

    /// None of the connection types the server offers is one the client accepts.
    #[error(
        "none of the connection types offered by the server ({offered}) is enabled on the client ({accepted})",
        offered = offered.join(", "),
        accepted = accepted.join(", ")
    )]
    NoCommonConnectionType {
        /// What the server offered.
        offered: Vec<String>,
        /// What the client was configured to use.
        accepted: Vec<String>,
    },

    /// The operation does not fit the client's state (opening an open client, publishing on
    /// a closed one).
    #[error("{0}")]
    InvalidOperation(String),

    /// The client is closed and has no pending messages left to hand out.
    #[error("the client is closed and there are no pending messages")]
    Closed,

    /// The messages could not be carried to or from the server.
    #[error("{kind}")]
    Transport {
        /// What kind of failure.
        kind: TransportErrorKind,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The server answered, and said no.
    #[error(transparent)]
    Server(Box<ServerError>),

    /// The session's task stopped unexpectedly (a panic, in an extension for instance);
    /// the client is closed and may be opened again.
    #[error("the session failed and the client is closed: {0}")]
    SessionFailed(String),

    /// One message of a payload did not fit the Bayeux shape (a repeated key, a field of
    /// the wrong type, nesting too deep) and was skipped; the other messages of the
    /// payload were delivered, in order.
    #[error(
        "skipped a message on {channel} that does not fit the Bayeux shape: {reason}",
        channel = channel.as_deref().unwrap_or("an unknown channel")
    )]
    BadMessage {
        /// The message's channel, when it could be read.
        channel: Option<String>,
        /// Why it does not fit.
        reason: String,
    },

    /// Credentials could not be obtained (an OAuth login failed).
    #[error("authentication failed: {message}")]
    Authentication {
        /// What the login host said, or why it could not be reached.
        message: String,
        /// Whether trying again later may succeed (network errors, 5xx).
        retryable: bool,
    },
}

/// The category of an [`Error`], for callers that decide by kind rather than by variant;
/// it mirrors aiocometd's exception classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `ClientError`: the client cannot work with these options or this server.
    Client,
    /// `ClientInvalidOperation`: misuse, or a closed client.
    ClientInvalidOperation,
    /// `TransportError`: network, HTTP, websocket or malformed replies.
    Transport,
    /// `TransportInvalidOperation`: the transport cannot do this in its state.
    TransportInvalidOperation,
    /// `TransportTimeoutError`: no answer in time, or the link stayed down too long.
    TransportTimeout,
    /// `TransportConnectionClosed`: the connection closed under the request.
    TransportConnectionClosed,
    /// `ServerError`: the server rejected the request.
    Server,
}

/// What went wrong in the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The link to the server stayed down longer than `connection_timeout`. Not final: the
    /// client keeps trying, and a later `receive` succeeds once the server is back.
    ConnectionTimeout,
    /// One request got no answer within its timeout.
    RequestTimeout,
    /// The connection closed before the answer arrived.
    ConnectionClosed,
    /// The server could not be reached (refused, reset, DNS...).
    Connect,
    /// TLS failed (certificate not trusted, fingerprint mismatch...).
    Tls,
    /// The server answered with an HTTP status other than 2xx.
    HttpStatus(u16),
    /// The websocket upgrade was refused or failed.
    WebSocketUpgrade,
    /// The server answered with a redirect, which the client never follows (configured
    /// headers and credentials would go to another host).
    Redirect {
        /// The HTTP status (301, 302, 303, 307, 308...).
        status: u16,
        /// Where it points (the `Location` header, cut to 1 KiB), empty if absent.
        location: String,
    },
    /// The reply was not valid Bayeux: bad JSON, not an array, a missing field, or no reply
    /// to the request at all.
    MalformedReply(String),
    /// The server sent a message, a websocket message, or a response that is not an array
    /// of messages, larger than `max_message_size`; the connection was dropped.
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The proxy named for the websocket (by the environment, or configured) speaks a
    /// scheme the client does not: only `http://` and `https://` proxies are supported.
    UnsupportedProxy {
        /// The proxy's scheme (`socks5`...).
        scheme: String,
        /// The proxy, as `scheme://host:port` (never its credentials).
        proxy: String,
    },
    /// The transport cannot do this in its current state.
    InvalidOperation(String),
    /// Any other I/O failure.
    Io,
}

impl fmt::Display for TransportErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConnectionTimeout => write!(f, "lost connection with the server"),
            Self::RequestTimeout => write!(f, "the server did not answer in time"),
            Self::ConnectionClosed => write!(f, "the connection closed unexpectedly"),
            Self::Connect => write!(f, "could not connect to the server"),
            Self::Tls => write!(f, "TLS failed"),
            Self::HttpStatus(status) => write!(f, "the server answered with HTTP status {status}"),
            Self::WebSocketUpgrade => write!(f, "the websocket upgrade failed"),
            Self::Redirect { status, location } => write!(
                f,
                "the server answered HTTP {status} redirecting to {location:?}; redirects are not followed (use the final URL)"
            ),
            Self::MalformedReply(what) => write!(f, "malformed reply from the server: {what}"),
            Self::TooLarge { limit } => {
                write!(f, "the server sent a message larger than the {limit}-byte limit (max_message_size)")
            }
            Self::UnsupportedProxy { scheme, proxy } => write!(
                f,
                "proxy {proxy}: the {scheme}:// scheme is not supported; use an http:// or https:// proxy"
            ),
            Self::InvalidOperation(what) => write!(f, "{what}"),
            Self::Io => write!(f, "I/O error"),
        }
    }
}

impl Error {
    /// The aiocometd-style category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidOptions(_)
            | Error::NoCommonConnectionType { .. }
            | Error::Authentication { .. } => ErrorKind::Client,
            Error::InvalidOperation(_) | Error::Closed | Error::SessionFailed(_) => {
                ErrorKind::ClientInvalidOperation
            }
            Error::Transport { kind, .. } => match kind {
                TransportErrorKind::ConnectionTimeout | TransportErrorKind::RequestTimeout => {
                    ErrorKind::TransportTimeout
                }
                TransportErrorKind::ConnectionClosed => ErrorKind::TransportConnectionClosed,
                TransportErrorKind::InvalidOperation(_) => ErrorKind::TransportInvalidOperation,
                _ => ErrorKind::Transport,
            },
            Error::Server(_) => ErrorKind::Server,
            Error::BadMessage { .. } => ErrorKind::Transport,
        }
    }

    /// Whether trying again later may succeed: transport failures are (except a TLS
    /// failure, which needs a new certificate or new settings), server rejections and
    /// misuse are not (a server's `5xx` code is the exception).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { kind, .. } => !matches!(
                kind,
                TransportErrorKind::InvalidOperation(_)
                    | TransportErrorKind::Tls
                    | TransportErrorKind::Redirect { .. }
                    | TransportErrorKind::UnsupportedProxy { .. }
            ),
            Error::Server(error) => error.error_code().is_some_and(|code| code >= 500),
            Error::Authentication { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// The server error, when this is one.
    pub fn as_server_error(&self) -> Option<&ServerError> {
        match self {
            Error::Server(error) => Some(error),
            _ => None,
        }
    }

    /// The transport error kind, when this is a transport error.
    pub fn transport_kind(&self) -> Option<&TransportErrorKind> {
        match self {
            Error::Transport { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// A copy, for reporting the same failure twice (the source only as text).
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::InvalidOptions(text) => Error::InvalidOptions(text.clone()),
            Error::NoCommonConnectionType { offered, accepted } => {
                Error::NoCommonConnectionType { offered: offered.clone(), accepted: accepted.clone() }
            }
            Error::InvalidOperation(text) => Error::InvalidOperation(text.clone()),
            Error::Closed => Error::Closed,
            Error::Transport { kind, source } => Error::Transport {
                kind: kind.clone(),
                source: source.as_ref().map(|source| source.to_string().into()),
            },
            Error::Server(error) => Error::Server(error.clone()),
            Error::SessionFailed(text) => Error::SessionFailed(text.clone()),
            Error::BadMessage { channel, reason } => {
                Error::BadMessage { channel: channel.clone(), reason: reason.clone() }
            }
            Error::Authentication { message, retryable } => {
                Error::Authentication { message: message.clone(), retryable: *retryable }
            }
        }
    }

    pub(crate) fn transport(kind: TransportErrorKind) -> Self {
        Error::Transport { kind, source: None }
    }

    pub(crate) fn transport_from(kind: TransportErrorKind, source: impl Into<BoxError>) -> Self {
        Error::Transport { kind, source: Some(source.into()) }
    }

    /// The error for a redirect answer: `status` and where its `Location` points.
    pub(crate) fn redirect(status: u16, location: Option<&[u8]>) -> Self {
        let location = location.map(|bytes| String::from_utf8_lossy(bytes).into_owned()).unwrap_or_default();
        Error::transport(TransportErrorKind::Redirect { status, location: bounded(location, 1024) })
    }

    pub(crate) fn malformed(what: impl Into<String>) -> Self {
        Error::transport(TransportErrorKind::MalformedReply(what.into()))
    }

    /// The server's refusal. Its `error` text is kept up to [`ERROR_TEXT_LIMIT`] (cut with
    /// a marker): it goes into `last_error` and every log line that reports it.
    pub(crate) fn server(message: impl Into<String>, mut response: Option<Message>) -> Self {
        if let Some(protocol) = response.as_mut().and_then(|reply| reply.protocol.as_deref_mut())
            && let Some(error) = protocol.error.take()
        {
            protocol.error = Some(bounded(error, ERROR_TEXT_LIMIT));
        }
        Error::Server(Box::new(ServerError { message: message.into(), response }))
    }
}

/// The server rejected a request; carries its reply and the parsed `error` field.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerError {
    message: String,
    response: Option<Message>,
}

impl ServerError {
    /// What failed, e.g. "subscribe request failed".
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The server's whole reply, when there was one.
    pub fn response(&self) -> Option<&Message> {
        self.response.as_ref()
    }

    /// The reply's raw `error` field.
    pub fn error(&self) -> Option<&str> {
        self.response.as_ref()?.protocol().error.as_deref()
    }

    fn field(&self) -> ErrorField {
        self.error().map(ErrorField::parse).unwrap_or_default()
    }

    /// The numeric code of the `error` field (`402` in `402::Unknown client`).
    pub fn error_code(&self) -> Option<u16> {
        self.field().code
    }

    /// The arguments of the `error` field.
    pub fn error_args(&self) -> Option<Vec<String>> {
        self.field().args
    }

    /// The description part of the `error` field.
    pub fn error_message(&self) -> Option<String> {
        self.field().message
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error() {
            Some(error) => write!(f, "{}: {error}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        // Salesforce says why a handshake was denied here.
        let reason = self
            .response
            .as_ref()
            .and_then(|reply| reply.ext.as_ref())
            .and_then(|ext| ext.get("sfdc"))
            .and_then(|sfdc| sfdc.get("failureReason"))
            .and_then(serde_json::Value::as_str);
        match reason {
            Some(reason) => write!(f, " (failure reason: {})", bounded(reason.to_owned(), ERROR_TEXT_LIMIT)),
            None => Ok(()),
        }
    }
}

impl std::error::Error for ServerError {}

/// The most of a server's `error` text kept and logged.
pub(crate) const ERROR_TEXT_LIMIT: usize = 4 * 1024;

/// The longest `clientId` accepted from a server: it goes into every request, and into
/// every spooled record's and NATS message's id.
pub(crate) const CLIENT_ID_LIMIT: usize = 1024;

/// `text` cut to at most `limit` bytes (at a character boundary) followed by a marker
/// saying how much was left out, so that a server cannot fill logs and status with it.
pub(crate) fn bounded(mut text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… ({cut} more bytes)"));
    text
}

/// What a caught panic says, for the error that reports it.
pub(crate) fn panic_cause(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Protocol;

    fn reply(error: &str) -> Message {
        Message { successful: Some(false), ..Message::new("/meta/subscribe") }
            .with_protocol(Protocol { error: Some(error.into()), ..Protocol::default() })
    }

    #[test]
    fn server_errors_expose_the_parsed_field_and_the_response() {
        let error =
            Error::server("subscribe request failed", Some(reply("403:xj3,/foo:Subscription denied")));
        assert_eq!(error.kind(), ErrorKind::Server);
        assert_eq!(error.to_string(), "subscribe request failed: 403:xj3,/foo:Subscription denied");
        let server = error.as_server_error().expect("a server error");
        assert_eq!(server.error_code(), Some(403));
        assert_eq!(server.error_args(), Some(vec!["xj3".to_string(), "/foo".to_string()]));
        assert_eq!(server.error_message().as_deref(), Some("Subscription denied"));
        assert_eq!(server.response().map(|r| r.channel.as_str()), Some("/meta/subscribe"));
        assert!(!error.is_retryable());
    }

    #[test]
    fn kinds_mirror_the_aiocometd_hierarchy() {
        assert_eq!(Error::Closed.kind(), ErrorKind::ClientInvalidOperation);
        assert_eq!(
            Error::transport(TransportErrorKind::ConnectionTimeout).kind(),
            ErrorKind::TransportTimeout
        );
        assert_eq!(
            Error::transport(TransportErrorKind::ConnectionClosed).kind(),
            ErrorKind::TransportConnectionClosed
        );
        assert_eq!(Error::malformed("not an array").kind(), ErrorKind::Transport);
        assert!(Error::malformed("not an array").is_retryable());
        assert_eq!(
            Error::NoCommonConnectionType { offered: vec!["x".into()], accepted: vec!["y".into()] }.kind(),
            ErrorKind::Client
        );
    }
}
