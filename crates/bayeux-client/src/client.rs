//! [`Client`]: the handle applications hold. Cloning it is cheap; every clone talks to the
//! same session. The session task does the work; the handle sends it commands and reads
//! its published state.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt, Stream};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::error::{Error, TransportErrorKind};
use super::exchange::Context;
use super::message::Message;
use super::options::{ClientOptions, ConnectionType, ValidOptions};
use super::pending::PendingQueue;
use super::session::{Command, Session};
use super::status::{SessionState, SessionStatus};
use super::ticket::{Resumed, SessionTicket};
use super::transport::Shared;

/// How many commands may wait for the session task before senders wait.
const COMMAND_CAPACITY: usize = 64;

/// A CometD client: open a session, subscribe, publish, and receive messages.
///
/// ```no_run
/// use bayeux_client::Client;
/// use serde_json::json;
///
/// # async fn example() -> Result<(), bayeux_client::Error> {
/// let client = Client::builder("http://127.0.0.1:8000/bayeux").build()?;
/// client.open().await?;
/// client.subscribe("/chat/demo").await?;
/// client.publish("/chat/demo", json!({"text": "hello"})).await?;
/// let message = client.receive().await?;
/// println!("{}: {:?}", message.channel, message.data);
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: Context,
    session: Mutex<Option<SessionHandle>>,
    /// When `receive` last reported a lost connection.
    timeout_reported: Mutex<Option<Instant>>,
}

/// The current session's command channel and published state.
#[derive(Clone)]
struct SessionHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<SessionStatus>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.status();
        f.debug_struct("Client")
            .field("url", &self.inner.ctx.shared.options.http_url.as_str())
            .field("state", &status.state)
            .field("connection_type", &status.connection_type)
            .finish()
    }
}

/// Runs the session task and watches it: if it panics (an extension's bug, say), the
/// client says so instead of looking connected, and `receive` returns the cause.
async fn supervised(
    session: impl Future<Output = ()>,
    status: watch::Sender<SessionStatus>,
    queue: Arc<PendingQueue>,
) {
    let Err(panic) = std::panic::AssertUnwindSafe(session).catch_unwind().await else {
        return;
    };
    let cause = super::error::panic_cause(&*panic);
    tracing::error!(cause = %cause, "the CometD session task failed; the client is closed");
    let error = Error::SessionFailed(cause);
    status.send_modify(|status| {
        status.state = SessionState::Closed;
        status.since = Instant::now();
        status.open = false;
        status.last_error = Some(error.to_string());
    });
    queue.push(Err(error));
}

/// Stops the session of an `open` whose future is dropped before it finishes.
struct CancelOpen<'c> {
    inner: &'c Inner,
    /// Cleared once `open` has its answer.
    task: Option<tokio::task::AbortHandle>,
    commands: mpsc::Sender<Command>,
}

impl Drop for CancelOpen<'_> {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        task.abort();
        let mut slot = self.inner.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.as_ref().is_some_and(|handle| handle.commands.same_channel(&self.commands)) {
            *slot = None;
        }
    }
}

impl Client {
    /// Starts building a client for the CometD endpoint at `url`.
    pub fn builder(url: impl Into<String>) -> ClientOptions {
        ClientOptions::new(url)
    }

    pub(crate) fn from_options(options: ValidOptions) -> Result<Client, Error> {
        let queue = Arc::new(PendingQueue::new(options.max_pending));
        let shared = Arc::new(Shared::new(options, queue)?);
        let ctx = Context { shared, ids: Arc::new(AtomicU64::new(1)), advice: Default::default() };
        Ok(Client {
            inner: Arc::new(Inner { ctx, session: Mutex::new(None), timeout_reported: Mutex::new(None) }),
        })
    }

    fn handle(&self) -> Option<SessionHandle> {
        self.inner.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Handshakes, negotiates the connection type and sends the first `/meta/connect`;
    /// from then on messages are received in the background. An unreachable server is
    /// retried with backoff until `connection_timeout`.
    ///
    /// # Errors
    /// - [`Error::InvalidOperation`] if the client is already open;
    /// - [`Error::NoCommonConnectionType`] if the server offers none of the accepted types;
    /// - [`Error::Server`] if the server rejects the handshake or the first connect;
    /// - [`Error::Transport`] if the server stays unreachable.
    ///
    /// On error nothing keeps running in the background, and dropping the future before it
    /// finishes stops the attempt.
    pub async fn open(&self) -> Result<(), Error> {
        self.open_session(None).await
    }

    /// Opens the client by continuing the session of `ticket` (from
    /// [`ticket`](Self::ticket) or [`detach`](Self::detach) of another client of the same
    /// URL): the first request is a `/meta/connect` with the ticket's client id, and the
    /// server delivers what it queued for the session meanwhile. If the server no longer
    /// knows the session (or the ticket is for another URL), the client handshakes and
    /// subscribes to the ticket's channels again, as after any lost session.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub async fn resume(&self, ticket: SessionTicket) -> Result<Resumed, Error> {
        let client_id = ticket.client_id.clone();
        self.open_session(Some(ticket)).await?;
        Ok(if self.status().client_id.as_deref() == Some(client_id.as_str()) {
            Resumed::Continued
        } else {
            Resumed::Handshaken
        })
    }

    /// What another client needs to continue this session (`None` unless the client has
    /// a session). Keep it up to date where the other client will look for it: it changes
    /// when the session or its subscriptions change ([`watch_status`](Self::watch_status)).
    pub fn ticket(&self) -> Option<SessionTicket> {
        let handle = self.handle()?;
        let status = handle.status.borrow();
        if status.state == SessionState::Closed {
            return None;
        }
        super::ticket::ticket_of(&self.inner.ctx.shared, &status)
    }

    /// Stops the client without ending its session on the server, and returns what
    /// continues it in another client ([`resume`](Self::resume)); `None` if it was not
    /// connected. What the server sent the session meanwhile is taken in first, for at
    /// most `wait`, and stays available to [`receive`](Self::receive) until it returns
    /// [`Error::Closed`]: hand it on as well.
    pub async fn detach(&self, wait: std::time::Duration) -> Option<SessionTicket> {
        let handle = self.handle()?;
        let (reply, done) = oneshot::channel();
        handle.commands.send(Command::Detach { wait, reply }).await.ok()?;
        done.await.ok().flatten()
    }

    /// What each extension keeps of the session now, as in a ticket's
    /// [`extensions`](SessionTicket::extensions): for a ticket from
    /// [`detach`](Self::detach) brought up to date once the application processed what
    /// the session still held (the acknowledgement extension then has the next holder
    /// acknowledge it, so the server does not send it again).
    pub fn extension_states(&self) -> Vec<Option<Value>> {
        self.inner.ctx.shared.options.extensions.iter().map(|extension| extension.session_state()).collect()
    }

    async fn open_session(&self, resume: Option<SessionTicket>) -> Result<(), Error> {
        let (opened, mut cancel) = {
            let mut slot = self.inner.session.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(handle) = slot.as_ref()
                && handle.status.borrow().state != SessionState::Closed
            {
                return Err(Error::InvalidOperation("the client is already open".into()));
            }
            let (commands, receiver) = mpsc::channel(COMMAND_CAPACITY);
            let (status, watch) = watch::channel(SessionStatus::new());
            let (opened, opened_receiver) = oneshot::channel();
            let session =
                Session::new(self.inner.ctx.clone(), receiver, status.clone(), opened, resume).run();
            let task = tokio::spawn(supervised(session, status, self.inner.ctx.shared.queue.clone()));
            let cancel = CancelOpen {
                inner: &self.inner,
                task: Some(task.abort_handle()),
                commands: commands.clone(),
            };
            *slot = Some(SessionHandle { commands, status: watch });
            (opened_receiver, cancel)
        };
        let result = opened.await;
        cancel.task = None;
        result.unwrap_or_else(|_| {
            let cause = self.status().last_error.unwrap_or_else(|| "no cause known".into());
            Err(Error::SessionFailed(format!("the session stopped while opening ({cause})")))
        })
    }

    /// Sends `/meta/disconnect` and stops every background task. Messages already
    /// received stay available to [`receive`](Self::receive). Closing a closed client does
    /// nothing; a closed client can be opened again.
    pub async fn close(&self) {
        let Some(handle) = self.handle() else { return };
        let (reply, done) = oneshot::channel();
        if handle.commands.send(Command::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn command<T>(
        &self,
        what: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let closed = || Error::InvalidOperation(format!("cannot {what}: the client is closed"));
        let handle = self.handle().filter(|handle| handle.status.borrow().open).ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        handle.commands.send(make(reply)).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Publishes `data` on `channel` and returns the server's reply.
    ///
    /// # Errors
    /// [`Error::Server`] if the server rejects it, [`Error::Transport`] if it could not be
    /// carried, [`Error::InvalidOperation`] if the client is closed.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<Message, Error> {
        let channel = channel.to_string();
        self.command("publish", |reply| Command::Publish { channel, data, reply }).await
    }

    /// Subscribes to `channel` (wildcards `/*` and `/**` allowed). After a new handshake the
    /// client subscribes again by itself.
    ///
    /// # Errors
    /// As [`publish`](Self::publish).
    pub async fn subscribe(&self, channel: &str) -> Result<(), Error> {
        let channel = channel.to_string();
        self.command("subscribe", |reply| Command::Subscribe { channel, reply }).await
    }

    /// Unsubscribes from `channel`.
    ///
    /// # Errors
    /// As [`publish`](Self::publish).
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        let channel = channel.to_string();
        self.command("unsubscribe", |reply| Command::Unsubscribe { channel, reply }).await
    }

    /// Waits for the next message (or error) from the server.
    ///
    /// # Errors
    /// - [`TransportErrorKind::ConnectionTimeout`] when the link has been down for
    ///   `connection_timeout` without one successful exchange (a server restarting every
    ///   few seconds is not reported), after every pending message was handed out. The
    ///   client keeps reconnecting; call `receive` again to wait on;
    /// - [`Error::Server`] when a resubscription failed after a new handshake, or when the
    ///   server closed the session (after the messages received before it);
    /// - [`Error::Closed`] once the client is closed and nothing is pending.
    pub async fn receive(&self) -> Result<Message, Error> {
        let queue = &self.inner.ctx.shared.queue;
        if let Some(item) = queue.pop() {
            return item;
        }
        let Some(mut handle) = self.handle() else {
            return Err(Error::Closed);
        };
        loop {
            let pushed = queue.pushed();
            if let Some(item) = queue.pop() {
                return item;
            }
            // Only what decides the wait is read; the status is not cloned.
            let deadline = {
                let status = handle.status.borrow_and_update();
                if matches!(status.state, SessionState::Closed | SessionState::Disconnecting) {
                    return Err(Error::Closed);
                }
                self.outage_deadline(&status)
            };
            tokio::select! {
                _ = pushed => {}
                changed = handle.status.changed() => if changed.is_err() {
                    // The session task is gone without saying it closed.
                    return queue.pop().unwrap_or(Err(Error::Closed));
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    // A successful exchange since (it wakes no one) moves the deadline on.
                    let deadline = self.outage_deadline(&handle.status.borrow());
                    if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
                        *self.inner.timeout_reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(Instant::now());
                        return Err(Error::transport(TransportErrorKind::ConnectionTimeout));
                    }
                }
            }
        }
    }

    /// While the session is in an outage: when `receive` reports it, `connection_timeout`
    /// after the latest of the outage's start, the last successful exchange and the last
    /// report (so that it is reported once a period, however often `receive` is called,
    /// and however many other items it hands out meanwhile).
    fn outage_deadline(&self, status: &SessionStatus) -> Option<Instant> {
        match status.state {
            SessionState::Reconnecting | SessionState::Handshaking if status.open => {
                let timeout = self.inner.ctx.shared.options.connection_timeout?;
                let reported =
                    *self.inner.timeout_reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let from = status.since.max(status.last_exchange);
                Some(super::clock::deadline(reported.map_or(from, |reported| from.max(reported)), timeout))
            }
            _ => None,
        }
    }

    /// The received messages as a stream; it ends once the client is closed and drained.
    /// Errors other than [`Error::Closed`] are yielded and the stream goes on.
    pub fn messages(&self) -> impl Stream<Item = Result<Message, Error>> + Send + Unpin + 'static {
        Box::pin(futures_util::stream::unfold(self.clone(), |client| async move {
            match client.receive().await {
                Err(Error::Closed) => None,
                item => Some((item, client)),
            }
        }))
    }

    /// Whether the client is closed: not opened yet, closed, or closed by the server.
    pub fn is_closed(&self) -> bool {
        !self.status().open
    }

    /// The channels the server confirmed.
    pub fn subscriptions(&self) -> BTreeSet<String> {
        self.status().subscriptions
    }

    /// The negotiated connection type, once a handshake succeeded.
    pub fn connection_type(&self) -> Option<ConnectionType> {
        self.status().connection_type
    }

    /// How many received messages wait for [`receive`](Self::receive).
    pub fn pending_count(&self) -> usize {
        self.inner.ctx.shared.queue.len()
    }

    /// Whether any received message waits for [`receive`](Self::receive).
    pub fn has_pending_messages(&self) -> bool {
        self.pending_count() > 0
    }

    /// How many times a websocket of this client, busy enough, switched to reading on a
    /// timer ([`ClientOptions::read_coalescing`](crate::ClientOptions::read_coalescing)),
    /// over its whole life: 0 with coalescing off, on long-polling, or while the stream
    /// stays quiet. For metrics and for checking that a policy takes effect.
    pub fn timed_read_switches(&self) -> u64 {
        self.inner.ctx.shared.timed_switches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A snapshot of the session's state.
    pub fn status(&self) -> SessionStatus {
        self.handle().map_or_else(SessionStatus::new, |handle| handle.status.borrow().clone())
    }

    /// A receiver that sees every change of the session's state, for health checks and
    /// dashboards; `None` before the first `open`.
    pub fn watch_status(&self) -> Option<watch::Receiver<SessionStatus>> {
        self.handle().map(|handle| handle.status)
    }
}
