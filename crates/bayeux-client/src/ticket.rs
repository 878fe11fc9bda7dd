//! Session tickets: what another process needs to continue a CometD session instead of
//! opening a new one (its client id, connection type, subscriptions, cookies and what the
//! extensions keep). A server keeps a session, and queues its messages, for a while after
//! its connection is gone; a process that takes over within that time and sends
//! `/meta/connect` with the same client id loses nothing of what was queued. A replica
//! handing a subscription over to another, or taking over from one that died, uses it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::options::ConnectionType;

/// What continues a session in another [`Client`](super::Client) (see
/// [`Client::ticket`](super::Client::ticket), [`Client::detach`](super::Client::detach)
/// and [`Client::resume`](super::Client::resume)). It holds the session's cookies: keep it
/// where the credentials are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionTicket {
    /// The server's endpoint: a ticket is used only by a client of the same URL.
    pub url: String,
    /// The server-assigned session id.
    pub client_id: String,
    /// The connection type the session negotiated.
    pub connection_type: ConnectionType,
    /// The channels the server confirmed for the session.
    pub subscriptions: BTreeSet<String>,
    /// The cookies the server set for the endpoint (`name=value`), e.g. a load balancer's
    /// sticky-session cookie or `BAYEUX_BROWSER`.
    #[serde(default)]
    pub cookies: Vec<String>,
    /// What each extension keeps of the session, in the order the extensions were added
    /// (see [`Extension::session_state`](super::Extension::session_state)).
    #[serde(default)]
    pub extensions: Vec<Option<Value>>,
}

/// How [`Client::resume`](super::Client::resume) opened the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// The server knew the session: it goes on with the same client id and
    /// subscriptions, and delivers what it queued meanwhile.
    Continued,
    /// The server no longer knew it (or the ticket was for another URL): a new session
    /// was handshaken and the ticket's channels subscribed again.
    Handshaken,
}

/// The ticket of the session `status` describes (`None` before it has a client id).
pub(crate) fn ticket_of(
    shared: &super::transport::Shared,
    status: &super::status::SessionStatus,
) -> Option<SessionTicket> {
    let client_id = status.client_id.clone()?;
    let connection_type = status.connection_type?;
    let url = &shared.options.http_url;
    let cookies = reqwest::cookie::CookieStore::cookies(&*shared.jar, url)
        .and_then(|header| header.to_str().ok().map(str::to_owned))
        .map(|header| header.split("; ").filter(|cookie| !cookie.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    Some(SessionTicket {
        url: url.to_string(),
        client_id,
        connection_type,
        subscriptions: status.subscriptions.clone(),
        cookies,
        extensions: shared.options.extensions.iter().map(|extension| extension.session_state()).collect(),
    })
}
