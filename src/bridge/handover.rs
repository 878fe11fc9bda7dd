//! Session hand-over among replicas: the owner of a source keeps its CometD session's
//! ticket in the shared store (whenever the session or its subscriptions change), and a
//! replica that gives the source up detaches the session instead of disconnecting it,
//! spools what the session still held and leaves the ticket for the next owner. The next
//! owner continues that session (a `/meta/connect` with the same client id), so what the
//! server queued for it meanwhile is delivered even without replay; a session the server
//! forgot is replaced by a new one, counted as a lost session.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use super::source::Source;
use crate::cometd::{Client, Error, Resumed, SessionTicket};

/// Among replicas, the first extension of a source's client: nothing is sent to the
/// CometD server while this replica does not hold the source's lease. A replica that
/// wakes from a pause (SIGSTOP, a stalled VM) after another took the source over would
/// otherwise send a `/meta/connect` on the session the other continues, before it learns
/// it lost the lease; servers attach a session to the connection it was last heard on
/// (faye), so that would take the session's messages away from its owner.
pub struct LeaseFence(pub Arc<super::gate::LeaseClock>);

#[crate::cometd::async_trait]
impl crate::cometd::Extension for LeaseFence {
    async fn outgoing(
        &self,
        _payload: &mut Vec<crate::cometd::Message>,
        _headers: &mut crate::cometd::HeaderMap,
    ) -> Result<(), Error> {
        if self.0.may_write() {
            Ok(())
        } else {
            Err(Error::Transport {
                kind: crate::cometd::TransportErrorKind::ConnectionClosed,
                source: Some(
                    "this replica does not hold the source's lease: nothing is sent to its server".into(),
                ),
            })
        }
    }
}

/// The session a source's next run continues, when it has one.
pub type TicketSlot = Arc<std::sync::Mutex<Option<SessionTicket>>>;

/// How long a replica handing a source over waits for what its session still has on the
/// way (a held long-polling `/meta/connect`, a websocket's close handshake).
pub const DETACH_WAIT: Duration = Duration::from_secs(2);

/// What a hand-over keeps of the lease's remaining time for spooling what the session
/// held and writing its ticket.
const DETACH_RESERVE: Duration = Duration::from_millis(500);

/// What decides a ticket worth saving again: the session and its channels.
pub type SavedSession = Option<(String, std::collections::BTreeSet<String>)>;

impl Source {
    /// Opens the client: continues the session left by the previous owner if there is
    /// one, else handshakes.
    pub(super) async fn open_session(&self) -> Result<(), Error> {
        let ticket = self.ticket.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(ticket) = ticket else { return self.client.open().await };
        let client_id = ticket.client_id.clone();
        match self.client.resume(ticket).await? {
            Resumed::Continued => {
                tracing::info!(source = %self.name, session = %client_id, "continued the session the previous owner handed over");
            }
            Resumed::Handshaken => {
                self.metrics.session_lost(&self.name);
                tracing::warn!(source = %self.name, previous = %client_id, "the CometD server no longer knew the session the previous owner handed over; a new one started: messages published meanwhile may be lost unless the source uses replay");
            }
        }
        Ok(())
    }

    /// Keeps the session's ticket in the shared store when its session or channels
    /// changed since `saved`, while this replica may still write for the source.
    pub(super) async fn save_ticket(&self, saved: &mut SavedSession) {
        if !self.hands_over || !self.spooler.lease.may_write() {
            return;
        }
        let Some(ticket) = self.client.ticket() else { return };
        let now = Some((ticket.client_id.clone(), ticket.subscriptions.clone()));
        if *saved == now {
            return;
        }
        if self.store_ticket(&ticket).await {
            *saved = now;
        }
    }

    async fn store_ticket(&self, ticket: &SessionTicket) -> bool {
        let value = match serde_json::to_value(ticket) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(source = %self.name, error = %error, "cannot encode the session ticket");
                return false;
            }
        };
        match self.spooler.store.put_session(&self.name, &value).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(source = %self.name, error = %error, "cannot keep the session for the next owner; it will open a new one");
                false
            }
        }
    }

    /// Gives the session up for another replica: detached (not disconnected), what it
    /// still held spooled, its ticket left for the next owner while this replica's lease
    /// still holds. A replica whose lease lapsed writes nothing: the next owner may use
    /// the session already, and disconnecting it would end that.
    pub(super) async fn hand_over(&self, stop: &CancellationToken) {
        let lease_holds = self.spooler.lease.may_write();
        // Within what the lease still allows, keeping some of it for spooling and for the
        // ticket: a ticket not written leaves the next owner a new session.
        let wait = if lease_holds {
            DETACH_WAIT.min(self.spooler.lease.remaining().saturating_sub(DETACH_RESERVE))
        } else {
            Duration::ZERO
        };
        let ticket = self.client.detach(wait).await;
        let held = drain(&self.client);
        if !held.is_empty() && lease_holds {
            tracing::info!(source = %self.name, messages = held.len(), "spooling what the session still held before handing it over");
            let session: Arc<str> =
                ticket.as_ref().map(|ticket| ticket.client_id.as_str()).unwrap_or_default().into();
            let _ = self.spooler.spool(held, &session, stop).await;
        }
        match ticket {
            Some(mut ticket) if self.spooler.lease.may_write() => {
                // What was spooled just now counts as processed for the next owner.
                ticket.extensions = self.client.extension_states();
                if self.store_ticket(&ticket).await {
                    tracing::info!(source = %self.name, session = %ticket.client_id, "handed the session over for the next owner");
                }
            }
            _ => tracing::info!(source = %self.name, "left the session to the next owner"),
        }
    }
}

/// What a closed client still held, handed out.
pub fn drain(client: &Client) -> Vec<crate::cometd::Message> {
    let mut held = Vec::new();
    while let Some(item) = client.receive().now_or_never() {
        match item {
            Ok(message) => held.push(message),
            Err(Error::Closed) => break,
            Err(_) => continue,
        }
    }
    held
}
