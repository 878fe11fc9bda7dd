//! Websocket: one socket per session, opened under a lock (so two sends after a failure
//! never open two sockets), with one reader task that hands replies to their senders and
//! events to the pending queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use reqwest::cookie::CookieStore;
use reqwest::header::{COOKIE, HeaderMap, SET_COOKIE};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message as Frame};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use super::coalesce::Coalescing;
use super::proxy::Link;
use super::{Received, Shared, is_tls, parse_received};
use crate::error::{Error, TransportErrorKind};
use crate::message::{META_CONNECT, Message};

type Socket = WebSocketStream<MaybeTlsStream<Link>>;

/// The websocket read buffer per session.
const READ_BUFFER_SIZE: usize = 4 * 1024;

/// The longest a close frame may take to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct WebSocket {
    shared: Arc<Shared>,
    /// The open socket, if any; the async mutex serialises opening.
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl WebSocket {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        WebSocket { shared, connection: tokio::sync::Mutex::new(None) }
    }

    pub(crate) async fn prepare(&self) -> Result<(), Error> {
        let mut payload = Vec::new();
        let headers = self.shared.outgoing(&mut payload).await?;
        self.connection(headers).await.map(drop)
    }

    pub(crate) async fn reset(&self) {
        // Taken out under the lock, shut down after it: closing may wait on the network,
        // and sends that need a new socket must not wait for that.
        let connection = self.connection.lock().await.take();
        if let Some(connection) = connection {
            connection.shut_down(self.shared.options.request_timeout).await;
        }
    }

    pub(crate) async fn close(&self) {
        self.reset().await;
    }

    /// Closes the socket as the protocol asks: a close frame, then what the server sent
    /// before its own close frame is still read (its events queued), for at most `wait`.
    /// A session handed to another client thus loses nothing in flight.
    pub(crate) async fn close_gracefully(&self, wait: Duration) {
        let connection = self.connection.lock().await.take();
        let Some(connection) = connection else { return };
        let mut ended = connection.reader_ended.clone();
        let close = async {
            if let Err(error) = connection.writer.lock().await.close().await {
                tracing::debug!(error = %error, "the socket did not take the close frame");
            }
            // Resolves (with an error) once the reader stopped at the server's close.
            let _ = ended.changed().await;
        };
        if tokio::time::timeout(wait, close).await.is_err() {
            tracing::debug!(waited = ?wait, "the server did not close the socket in time; dropping it");
        }
        connection.reader.abort();
        connection.waiting.fail_all(TransportErrorKind::ConnectionClosed);
    }

    /// The open connection, or a new one opened with `headers`.
    async fn connection(&self, headers: HeaderMap) -> Result<Arc<Connection>, Error> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.waiting.is_alive()
        {
            return Ok(connection.clone());
        }
        // Boxed: opening a socket (TCP, TLS, HTTP upgrade) is a large future that every
        // send would otherwise carry, though it rarely runs.
        let connection = Arc::new(Box::pin(Connection::open(self.shared.clone(), headers)).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    pub(crate) async fn send(
        &self,
        mut payload: Vec<Message>,
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let headers = self.shared.outgoing(&mut payload).await?;
        let connection = self.connection(headers.clone()).await?;
        let result = self.send_on(&connection, &payload, timeout).await;
        // A held /meta/connect is cut when the socket is replaced (after re-authentication)
        // or closed by the server: send it once more on a fresh socket. Other requests are
        // not resent, since the server may have acted on them.
        let only_connects = payload.iter().all(|message| message.channel == META_CONNECT);
        match result {
            Err(error)
                if only_connects && error.transport_kind() == Some(&TransportErrorKind::ConnectionClosed) =>
            {
                tracing::debug!("the socket closed under /meta/connect; resending it on a new socket");
                let connection = self.connection(headers).await?;
                self.send_on(&connection, &payload, timeout).await
            }
            result => result,
        }
    }

    async fn send_on(
        &self,
        connection: &Arc<Connection>,
        payload: &[Message],
        timeout: Duration,
    ) -> Result<Vec<Message>, Error> {
        let receivers = connection.waiting.register(payload)?;
        let frame = serde_json::to_string(payload)
            .map_err(|error| Error::transport_from(TransportErrorKind::Io, error))?;
        // A peer that stops reading fills the socket's buffers and the write never ends:
        // it gets the request's timeout, waiting for the writer lock included.
        let write = async { connection.writer.lock().await.send(Frame::text(frame)).await };
        let written = match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(socket_error(error)),
            Err(_) => Err(Error::transport_from(
                TransportErrorKind::RequestTimeout,
                "the socket did not take the frame within the request timeout",
            )),
        };
        if let Err(error) = written {
            connection.waiting.forget(payload);
            connection.waiting.fail_all(TransportErrorKind::ConnectionClosed);
            self.reset_if_current(connection).await;
            return Err(error);
        }
        let replies = async {
            let mut replies = Vec::with_capacity(receivers.len());
            for receiver in receivers {
                match receiver.await {
                    Ok(reply) => replies.push(reply?),
                    Err(_) => return Err(Error::transport(TransportErrorKind::ConnectionClosed)),
                }
            }
            Ok(replies)
        };
        tokio::pin!(replies);
        // A `/meta/connect`'s reply can sit behind events the reader holds back while the
        // pending queue is full: its clock stops while the reader waits for the
        // application, else the socket would be reset with those events in it. (Other
        // requests are read for, up to one batch past the limit, then time out.)
        let patient = payload.iter().all(|message| message.channel == META_CONNECT);
        let mut pauses = connection.waiting.pauses();
        loop {
            match tokio::time::timeout(timeout, replies.as_mut()).await {
                Ok(result) => return result,
                Err(_) if patient && connection.waiting.paused_since(pauses) => {
                    pauses = connection.waiting.pauses();
                    tracing::debug!("the reader waits for the application; the /meta/connect waits on");
                }
                Err(_) => {
                    connection.waiting.forget(payload);
                    // A socket that answers nothing in time is not trusted again.
                    self.reset_if_current(connection).await;
                    return Err(Error::transport(TransportErrorKind::RequestTimeout));
                }
            }
        }
    }

    async fn reset_if_current(&self, connection: &Arc<Connection>) {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, connection)) {
            slot.take();
            drop(slot);
            connection.shut_down(self.shared.options.request_timeout).await;
        }
    }
}

/// One open socket: its write half and the reader task that owns the read half.
struct Connection {
    writer: tokio::sync::Mutex<SplitSink<Socket, Frame>>,
    waiting: Arc<Waiting>,
    reader: JoinHandle<()>,
    /// Never changes: its sender goes with the reader task, which tells when it ended.
    reader_ended: tokio::sync::watch::Receiver<()>,
}

impl Connection {
    async fn open(shared: Arc<Shared>, headers: HeaderMap) -> Result<Connection, Error> {
        let options = &shared.options;
        let mut request = options
            .ws_url
            .as_str()
            .into_client_request()
            .map_err(|error| Error::transport_from(TransportErrorKind::WebSocketUpgrade, error))?;
        request.headers_mut().extend(headers);
        if let Some(cookies) = shared.jar.cookies(&options.http_url) {
            request.headers_mut().insert(COOKIE, cookies);
        }
        let connector = Connector::Rustls(shared.tls.clone());
        // tungstenite reads through a buffer allocated up front (128 KiB by default): with
        // thousands of sessions in one process that is most of their memory. Bayeux frames
        // are small; a larger one still fits, as the buffer grows on demand.
        let config = socket_config(options.max_message_size);
        let coalescing =
            Coalescing { policy: options.read_coalescing, switches: shared.timed_switches.clone() };
        // The proxy is chosen by the http(s) form of the URL, as for long-polling.
        let proxy = options
            .http_url
            .as_str()
            .parse::<tungstenite::http::Uri>()
            .ok()
            .and_then(|uri| shared.proxy_for(&uri));
        let tls = shared.tls.clone();
        let connect = async move {
            let stream = match &proxy {
                Some(proxy) => Link::through(proxy, request.uri(), &coalescing, &tls).await?,
                None => Link::direct(request.uri(), &coalescing).await?,
            };
            tokio_tungstenite::client_async_tls_with_config(request, stream, Some(config), Some(connector))
                .await
                .map_err(upgrade_error)
        };
        let (socket, response) = tokio::time::timeout(options.request_timeout, connect)
            .await
            .map_err(|_| Error::transport(TransportErrorKind::RequestTimeout))??;
        shared.jar.set_cookies(&mut response.headers().get_all(SET_COOKIE).iter(), &options.http_url);
        let (writer, reader) = socket.split();
        let waiting = Arc::new(Waiting::default());
        let waiting_for_reader = waiting.clone();
        let (ended, reader_ended) = tokio::sync::watch::channel(());
        let reader = tokio::spawn(async move {
            watched_reader(reader, shared, waiting_for_reader).await;
            drop(ended);
        });
        Ok(Connection { writer: tokio::sync::Mutex::new(writer), waiting, reader, reader_ended })
    }

    /// Stops the reader, fails what waits, and sends a close frame if the socket takes it
    /// within `timeout` (a peer that reads nothing never does).
    async fn shut_down(&self, timeout: Duration) {
        self.reader.abort();
        self.waiting.fail_all(TransportErrorKind::ConnectionClosed);
        let close = async { self.writer.lock().await.close().await };
        if tokio::time::timeout(timeout.min(CLOSE_TIMEOUT), close).await.is_err() {
            tracing::debug!("the socket did not take the close frame in time; dropping it");
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Senders waiting for replies, by message id.
#[derive(Default)]
struct Waiting {
    state: Mutex<WaitingState>,
    /// Signalled when a request other than `/meta/connect` starts waiting, so a reader
    /// paused by a full pending queue resumes and lets its reply through.
    request_registered: Notify,
    /// Counts the reader's pauses for a full pending queue: odd while it is paused.
    pauses: AtomicU64,
}

#[derive(Default)]
struct WaitingState {
    dead: Option<TransportErrorKind>,
    by_id: HashMap<String, Waiter>,
}

struct Waiter {
    channel: String,
    reply: oneshot::Sender<Result<Message, Error>>,
}

type ReplyReceiver = oneshot::Receiver<Result<Message, Error>>;

impl Waiting {
    fn state(&self) -> std::sync::MutexGuard<'_, WaitingState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_alive(&self) -> bool {
        self.state().dead.is_none()
    }

    fn register(&self, payload: &[Message]) -> Result<Vec<ReplyReceiver>, Error> {
        let mut state = self.state();
        if let Some(kind) = &state.dead {
            return Err(Error::transport(kind.clone()));
        }
        let mut receivers = Vec::with_capacity(payload.len());
        let mut wakes_reader = false;
        for message in payload {
            let id = message.id.clone().ok_or_else(|| {
                Error::transport(TransportErrorKind::InvalidOperation("a request without an id".into()))
            })?;
            let (reply, receiver) = oneshot::channel();
            wakes_reader |= message.channel != META_CONNECT;
            state.by_id.insert(id, Waiter { channel: message.channel.clone(), reply });
            receivers.push(receiver);
        }
        drop(state);
        if wakes_reader {
            self.request_registered.notify_waiters();
        }
        Ok(receivers)
    }

    fn forget(&self, payload: &[Message]) {
        let mut state = self.state();
        for id in payload.iter().filter_map(|message| message.id.as_ref()) {
            state.by_id.remove(id);
        }
    }

    /// Hands `message` to the sender waiting for it; gives it back when nobody waits.
    fn resolve(&self, message: Message) -> Option<Message> {
        if !message.is_reply() {
            return Some(message);
        }
        let mut state = self.state();
        let matches = message
            .id
            .as_ref()
            .and_then(|id| state.by_id.get(id))
            .is_some_and(|waiter| waiter.channel == message.channel);
        if !matches {
            return Some(message);
        }
        let waiter = message.id.as_ref().and_then(|id| state.by_id.remove(id))?;
        let _ = waiter.reply.send(Ok(message));
        None
    }

    /// The pause count, to pass to [`paused_since`](Self::paused_since) later.
    fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Acquire)
    }

    /// Whether the reader is paused now, or paused at some point since `pauses` was read.
    fn paused_since(&self, pauses: u64) -> bool {
        let now = self.pauses();
        now != pauses || now % 2 == 1
    }

    fn has_requests_besides_connect(&self) -> bool {
        self.state().by_id.values().any(|waiter| waiter.channel != META_CONNECT)
    }

    fn fail_all(&self, kind: TransportErrorKind) {
        let mut state = self.state();
        state.dead.get_or_insert(kind.clone());
        for (_, waiter) in state.by_id.drain() {
            let _ = waiter.reply.send(Err(Error::transport(kind.clone())));
        }
    }
}

/// Runs the reader; if it panics (in an incoming extension, say), the requests waiting on
/// the socket fail with the cause instead of waiting for their timeouts.
async fn watched_reader(reader: SplitStream<Socket>, shared: Arc<Shared>, waiting: Arc<Waiting>) {
    let read = std::panic::AssertUnwindSafe(read_frames(reader, shared, waiting.clone()));
    if let Err(panic) = futures_util::FutureExt::catch_unwind(read).await {
        let cause = crate::error::panic_cause(&*panic);
        tracing::error!(cause = %cause, "the websocket reader failed; dropping the socket");
        waiting
            .fail_all(TransportErrorKind::InvalidOperation(format!("the websocket reader failed: {cause}")));
    }
}

/// The reader task: parses frames, runs the incoming hooks, resolves replies and queues
/// events, until the socket fails or closes.
async fn read_frames(mut reader: SplitStream<Socket>, shared: Arc<Shared>, waiting: Arc<Waiting>) {
    // Bytes of frames read while the pending queue was full: memory stays bounded by
    // max_pending_count plus one server batch (at most max_message_size) whatever the
    // server sends while requests wait.
    let mut overflow = 0usize;
    let budget = shared.options.max_message_size;
    let failure = loop {
        // Backpressure: with the pending queue full, stop reading events (TCP pushes back),
        // unless a request other than /meta/connect is waiting for its reply behind them
        // and less than one batch's worth was read past the limit.
        let mut paused = false;
        let may_read = |overflow: usize| overflow < budget && waiting.has_requests_besides_connect();
        if !shared.queue.is_full() {
            overflow = 0;
        }
        while shared.queue.is_full() && !may_read(overflow) {
            // Listening, then checking again, so that a registration between the first
            // check and here is not missed (the common case, a queue with room, stays a
            // single check per frame).
            let registered = waiting.request_registered.notified();
            tokio::pin!(registered);
            registered.as_mut().enable();
            if !shared.queue.is_full() || may_read(overflow) {
                break;
            }
            if !paused {
                paused = true;
                waiting.pauses.fetch_add(1, Ordering::AcqRel);
            }
            tokio::select! {
                _ = shared.queue.wait_for_space() => {}
                _ = registered => {}
            }
        }
        if paused {
            waiting.pauses.fetch_add(1, Ordering::AcqRel);
        }
        let bytes = match reader.next().await {
            Some(Ok(Frame::Text(text))) => bytes::Bytes::from(text),
            Some(Ok(Frame::Binary(bytes))) => bytes,
            Some(Ok(Frame::Close(_))) | None => break TransportErrorKind::ConnectionClosed,
            Some(Ok(_)) => continue, // ping, pong: handled by tungstenite
            Some(Err(tungstenite::Error::Capacity(error))) => {
                let limit = shared.options.max_message_size;
                tracing::warn!(error = %error, limit, "the server sent a websocket message over max_message_size; closing the socket");
                break TransportErrorKind::TooLarge { limit };
            }
            Some(Err(error)) => {
                tracing::debug!(error = %error, "websocket read failed");
                break TransportErrorKind::ConnectionClosed;
            }
        };
        // Parsed in place: the frame's bytes are not copied, and the messages' data share
        // them. A text frame's UTF-8 was checked as it was read; that check cannot be
        // handed on, so it is made again, once for the whole frame.
        if shared.queue.is_full() {
            overflow = overflow.saturating_add(bytes.len());
        }
        let parsed = parse_received(bytes);
        let Received { messages: mut received, rejected } = match parsed {
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(error = %error, "malformed websocket frame; closing the socket");
                break error.transport_kind().cloned().unwrap_or(TransportErrorKind::Io);
            }
        };
        if let Err(error) = shared.incoming(&mut received, None).await {
            tracing::warn!(error = %error, "an extension rejected an incoming payload");
            break error.transport_kind().cloned().unwrap_or(TransportErrorKind::Io);
        }
        let events = received.into_iter().filter_map(|message| waiting.resolve(message));
        let events: Vec<Message> = events
            .filter(|message| {
                let keep = message.is_event();
                if !keep {
                    shared.unsolicited(message);
                }
                keep
            })
            .collect();
        shared.queue.extend(events);
        // A message that did not fit is told after the events of its frame.
        for error in rejected {
            shared.queue.push(Err(error));
        }
    };
    waiting.fail_all(failure);
}

/// The socket's settings: a small read buffer, and no message or frame over `max_message_size`.
pub fn socket_config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

fn upgrade_error(error: tungstenite::Error) -> Error {
    if let tungstenite::Error::Http(response) = &error
        && response.status().is_redirection()
    {
        let location =
            response.headers().get(tungstenite::http::header::LOCATION).map(|value| value.as_bytes());
        return Error::redirect(response.status().as_u16(), location);
    }
    let kind = match &error {
        tungstenite::Error::Http(_) | tungstenite::Error::Protocol(_) | tungstenite::Error::Url(_) => {
            TransportErrorKind::WebSocketUpgrade
        }
        tungstenite::Error::Tls(_) => TransportErrorKind::Tls,
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            TransportErrorKind::Connect
        }
        other if is_tls(other) => TransportErrorKind::Tls,
        _ => TransportErrorKind::Connect,
    };
    Error::transport_from(kind, error)
}

fn socket_error(error: tungstenite::Error) -> Error {
    Error::transport_from(TransportErrorKind::ConnectionClosed, error)
}
