//! The session's status as handles and operators see it: what the session is doing
//! ([`SessionState`]) and a snapshot of it ([`SessionStatus`]), published by the session
//! task on a `watch` and read by the machine, the client and the bridge.

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::options::ConnectionType;

/// What a session can be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Not opened yet.
    Unconnected,
    /// Handshaking, at open or after the server forgot the session.
    Handshaking,
    /// The last `/meta/connect` succeeded.
    Connected,
    /// The link failed; the session retries with backoff.
    Reconnecting,
    /// Closing: `/meta/disconnect` is on its way.
    Disconnecting,
    /// Closed by the application, by a failed open, or by the server (`reconnect: none`).
    Closed,
}

/// A snapshot of the session, published on every change.
#[derive(Clone, Debug)]
pub struct SessionStatus {
    /// What the session is doing.
    pub state: SessionState,
    /// When it started doing it.
    pub since: Instant,
    /// Whether `open` succeeded and the client has not been closed since.
    pub open: bool,
    /// The negotiated connection type.
    pub connection_type: Option<ConnectionType>,
    /// The server-assigned session id.
    pub client_id: Option<String>,
    /// The channels the server confirmed.
    pub subscriptions: BTreeSet<String>,
    /// The last failure, for operators.
    pub last_error: Option<String>,
    /// When the server last carried a request through (a handshake, a resubscription, a
    /// connect or a client request that succeeded). An outage is reported once
    /// `connection_timeout` has passed since both this and the outage's start.
    pub last_exchange: Instant,
}

impl SessionStatus {
    pub(crate) fn new() -> Self {
        SessionStatus {
            state: SessionState::Unconnected,
            since: Instant::now(),
            open: false,
            connection_type: None,
            client_id: None,
            subscriptions: BTreeSet::new(),
            last_error: None,
            last_exchange: Instant::now(),
        }
    }
}
