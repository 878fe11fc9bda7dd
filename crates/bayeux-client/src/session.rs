//! The session task: one per open client. It owns the transport, the client id and the
//! set of subscriptions, runs the steps (handshake, resubscription, `/meta/connect`) and
//! the client's requests, and carries out what the machine decides after each step.
//! [`Client`](super::Client) handles talk to it through commands and read its state from a
//! `watch`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::clock::{deadline, sleep_until_some};
use super::connect::connect;
use super::error::{Error, TransportErrorKind};
use super::exchange::{Context, check, failure_name};
use super::machine::{Action, Event, Machine, Next, Note, Wait};
use super::message::{Advice, Data, META_CONNECT, META_DISCONNECT, META_UNSUBSCRIBE, Message};
use super::negotiation::{Handshaken, handshake};
use super::status::{SessionState, SessionStatus};
use super::subscribe::{Resubscription, resubscribe, subscribe_all, subscription_request};
use super::ticket::SessionTicket;
use super::transport::Transport;

/// A request from a [`Client`](super::Client) handle.
pub(crate) enum Command {
    Publish {
        channel: String,
        data: Value,
        reply: oneshot::Sender<Result<Message, Error>>,
    },
    Subscribe {
        channel: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        channel: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Stop without `/meta/disconnect`, for another client to continue the session.
    Detach {
        wait: Duration,
        reply: oneshot::Sender<Option<SessionTicket>>,
    },
}

/// What a finished step of the session's own work produced. One exists at a time, so
/// its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Handshaken(Result<Handshaken, Error>),
    Resubscribed(Result<Resubscription, Error>),
    Connected(Result<Message, Error>),
}

/// A finished client request, ready to be answered; short-lived.
#[allow(clippy::large_enum_variant)]
enum Done {
    Publish(oneshot::Sender<Result<Message, Error>>, Result<Message, Error>),
    Subscribe(oneshot::Sender<Result<(), Error>>, String, Result<(), Error>),
    Unsubscribe(oneshot::Sender<Result<(), Error>>, String, Result<(), Error>),
    /// A refused resubscription tried again.
    Resubscribed(String, Result<(), Error>),
}

/// The session task's state.
pub(crate) struct Session {
    ctx: Context,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<SessionStatus>,
    /// `open`'s answer, until the first `/meta/connect` settles it.
    opened: Option<oneshot::Sender<Result<(), Error>>>,
    /// The decisions after each step, and the state they depend on.
    machine: Machine,
    /// The last error while opening, for `open` to report at its deadline.
    open_error: Option<Error>,
    /// Whether `open` failed (its session, if it got a client id, is disconnected).
    open_failed: bool,
    transport: Option<Arc<Transport>>,
    client_id: Option<String>,
    subscriptions: BTreeSet<String>,
    /// Requests that arrived while the session was not connected, with when they give up.
    deferred: VecDeque<(Instant, Command)>,
}

impl Session {
    pub(crate) fn new(
        ctx: Context,
        commands: mpsc::Receiver<Command>,
        status: watch::Sender<SessionStatus>,
        opened: oneshot::Sender<Result<(), Error>>,
        resume: Option<SessionTicket>,
    ) -> Self {
        let open_deadline =
            ctx.shared.options.connection_timeout.map(|timeout| deadline(Instant::now(), timeout));
        let machine = Machine::new(open_deadline, ctx.shared.options.auth.is_some());
        let mut session = Session {
            ctx,
            commands,
            status,
            opened: Some(opened),
            machine,
            open_error: None,
            open_failed: false,
            transport: None,
            client_id: None,
            subscriptions: BTreeSet::new(),
            deferred: VecDeque::new(),
        };
        if let Some(ticket) = resume {
            session.take_up(ticket);
        }
        session
    }

    /// `open`'s answer, to send: from now on the pending limit holds again (it is lifted
    /// while a session taken up from a ticket opens).
    fn take_opened(&mut self) -> Option<oneshot::Sender<Result<(), Error>>> {
        self.ctx.shared.queue.lift(false);
        self.opened.take()
    }

    /// Continues the session of `ticket`: its client id, transport, subscriptions, cookies
    /// and extensions' state; the first step is then a `/meta/connect` (a server that no
    /// longer knows the client id answers it with a new handshake).
    fn take_up(&mut self, ticket: SessionTicket) {
        let shared = &self.ctx.shared;
        if ticket.url != shared.options.http_url.as_str() {
            tracing::info!(ticket = %ticket.url, "the session ticket is for another URL; handshaking");
            return;
        }
        for cookie in &ticket.cookies {
            shared.jar.add_cookie_str(cookie, &shared.options.http_url);
        }
        for (index, extension) in shared.options.extensions.iter().enumerate() {
            extension.resume_session(ticket.extensions.get(index).and_then(Option::as_ref));
        }
        self.transport = Some(Arc::new(Transport::new(ticket.connection_type, shared.clone())));
        self.client_id = Some(ticket.client_id);
        self.subscriptions = ticket.subscriptions;
        self.machine.resuming = true;
        shared.queue.lift(true);
        self.publish_session();
    }

    /// Runs the session until it is closed by a handle, by the server, by a failed open, or
    /// because every handle was dropped.
    pub(crate) async fn run(mut self) {
        self.set_state(SessionState::Handshaking, None);
        // A session taken up from a ticket starts with its /meta/connect.
        let first = if self.client_id.is_some() { Next::Connect { probe: true } } else { Next::Handshake };
        let mut step: Option<BoxFuture<'static, Step>> = Some(self.start(first));
        let mut scheduled: Option<(Instant, Next)> = None;
        let mut requests: FuturesUnordered<BoxFuture<'static, Done>> = FuturesUnordered::new();
        loop {
            // The timers' deadlines, read before the select borrows the session.
            let deferred_gives_up = self.deferred.front().map(|(at, _)| *at);
            let open_gives_up = self.machine.open_deadline.filter(|_| self.opened.is_some());
            let refused_retry = self.machine.refused.next_at().filter(|_| self.is_connected());
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    None => {
                        Box::pin(self.shut_down(true)).await;
                        return;
                    }
                    Some(Command::Close { reply }) => {
                        drop(step.take());
                        Box::pin(self.shut_down(true)).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::Detach { wait, reply }) => {
                        let ticket = Box::pin(self.detach(step.take(), wait)).await;
                        let _ = reply.send(ticket);
                        return;
                    }
                    Some(command) if self.is_connected() => requests.push(self.request(command)),
                    Some(command) => {
                        let gives_up = deadline(Instant::now(), self.ctx.shared.options.request_timeout);
                        self.deferred.push_back((gives_up, command));
                    }
                },
                Some(done) = requests.next(), if !requests.is_empty() => self.answer(done),
                _ = sleep_until_some(deferred_gives_up), if deferred_gives_up.is_some() => {
                    self.expire_deferred();
                },
                _ = sleep_until_some(open_gives_up), if open_gives_up.is_some() => {
                    drop(step.take());
                    self.give_up_opening();
                    Box::pin(self.shut_down(false)).await;
                    return;
                },
                _ = sleep_until_some(refused_retry), if refused_retry.is_some() => {
                    for channel in self.machine.refused.due(Instant::now()) {
                        requests.push(self.resubscribe_one(channel));
                    }
                },
                finished = async { step.as_mut().expect("guarded by is_some").await }, if step.is_some() => {
                    step = None;
                    match self.apply(finished) {
                        Ok(Some((delay, next))) if delay.is_zero() => step = Some(self.start(next)),
                        Ok(Some((delay, next))) => scheduled = Some((deadline(Instant::now(), delay), next)),
                        Ok(None) => {}
                        Err(()) => {
                            Box::pin(self.shut_down(false)).await;
                            return;
                        }
                    }
                    if self.is_connected() {
                        while let Some((_, command)) = self.deferred.pop_front() {
                            requests.push(self.request(command));
                        }
                    }
                },
                _ = tokio::time::sleep_until(scheduled.map_or_else(Instant::now, |(at, _)| at)), if scheduled.is_some() => {
                    let (_, next) = scheduled.take().expect("guarded by is_some");
                    step = Some(self.start(next));
                },
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.status.borrow().state == SessionState::Connected
    }

    fn set_state(&self, state: SessionState, error: Option<&Error>) {
        self.status.send_modify(|status| {
            if status.state != state {
                // Handshaking again after a lost link is still the same outage.
                let same_outage =
                    matches!(status.state, SessionState::Reconnecting | SessionState::Handshaking)
                        && matches!(state, SessionState::Reconnecting | SessionState::Handshaking);
                if !same_outage {
                    status.since = Instant::now();
                }
                status.state = state;
            }
            if let Some(error) = error {
                status.last_error = Some(error.to_string());
            }
        });
    }

    /// Notes that the server just carried a request through. Receivers are not woken:
    /// `receive` reads it again when its outage deadline comes.
    fn exchanged(&self) {
        self.status.send_if_modified(|status| {
            status.last_exchange = Instant::now();
            false
        });
    }

    fn publish_session(&self) {
        self.status.send_modify(|status| {
            status.connection_type = self.transport.as_ref().map(|transport| transport.connection_type());
            status.client_id = self.client_id.clone();
            status.subscriptions = self.subscriptions.clone();
        });
    }

    fn start(&self, next: Next) -> BoxFuture<'static, Step> {
        let ctx = self.ctx.clone();
        match (next, &self.transport, &self.client_id) {
            (Next::Connect { probe }, Some(transport), Some(client_id)) => {
                let hold = self.machine.advice.timeout.map(Duration::from_millis);
                connect(ctx, transport.clone(), client_id.clone(), hold, probe).map(Step::Connected).boxed()
            }
            (Next::Resubscribe, Some(transport), Some(client_id)) => {
                let channels =
                    self.subscriptions.iter().chain(self.machine.refused.channels()).cloned().collect();
                resubscribe(ctx, transport.clone(), client_id.clone(), channels)
                    .map(Step::Resubscribed)
                    .boxed()
            }
            _ => {
                let previous = self.transport.clone();
                async move {
                    if let Some(previous) = previous {
                        previous.close().await;
                    }
                    Step::Handshaken(handshake(ctx).await)
                }
                .boxed()
            }
        }
    }

    /// Takes in a finished step: keeps what it established, asks the machine what
    /// follows, and carries that out. Returns what to do next and after how long, or
    /// `Err(())` when the session must stop.
    fn apply(&mut self, step: Step) -> Result<Option<(Duration, Next)>, ()> {
        let now = Instant::now();

        if let Some(advice) = self.ctx.take_advice() {
            self.machine.merge_advice(&advice);
        }
        match step {
            Step::Handshaken(Ok(handshaken)) => {
                self.exchanged();
                // A /meta/disconnect of the earlier session is answered by this handshake.
                self.ctx.shared.server_disconnected.store(false, std::sync::atomic::Ordering::Release);
                tracing::debug!(client_id = %handshaken.client_id, connection_type = %handshaken.transport.connection_type(), "handshake succeeded");
                self.transport = Some(handshaken.transport);
                self.client_id = Some(handshaken.client_id);
                self.publish_session();
                let resubscribe = !self.subscriptions.is_empty() || !self.machine.refused.is_empty();
                let event = Event::Handshaken { advice: handshaken.advice.as_ref(), resubscribe };
                let action = self.machine.on_step(event, now);
                self.carry_out(action, None, None)
            }
            Step::Handshaken(Err(error)) => {
                let action = self.machine.on_step(Event::HandshakeFailed(&error), now);
                let reply = error.as_server_error().and_then(|server| server.response()).cloned();
                self.carry_out(action, Some(error), reply)
            }
            Step::Resubscribed(Ok(results)) => {
                self.exchanged();
                for (channel, result) in results {
                    match result {
                        Ok(()) => {
                            self.machine.refused.remove(&channel);
                            self.subscriptions.insert(channel);
                        }
                        Err(error) => {
                            tracing::warn!(channel = %channel, error = %error, "resubscription failed after a new handshake; trying again with backoff");
                            self.subscriptions.remove(&channel);
                            if !self.machine.refused.contains(&channel) {
                                // Told once; the retries are logged, not queued.
                                self.ctx.shared.queue.push(Err(error));
                            }
                            self.refuse(channel);
                        }
                    }
                }
                self.publish_session();
                let action = self.machine.on_step(Event::Resubscribed, now);
                self.carry_out(action, None, None)
            }
            Step::Resubscribed(Err(error)) => {
                let action = self.machine.on_step(Event::ResubscribeFailed, now);
                self.carry_out(action, Some(error), None)
            }
            Step::Connected(Ok(mut reply)) => {
                if reply.successful == Some(true) {
                    self.exchanged();
                }
                if self.ctx.shared.server_disconnected.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    // A /meta/disconnect the server sent on its own: as `reconnect: handshake`.
                    let advice = reply.protocol_mut().advice.get_or_insert_with(Advice::default);
                    advice.reconnect = Some(super::message::Reconnect::Handshake);
                }
                let action = self.machine.on_step(Event::ConnectReply(&reply), now);
                let error = (reply.successful != Some(true))
                    .then(|| Error::server(failure_name(META_CONNECT), Some(reply.clone())));
                self.carry_out(action, error, Some(reply))
            }
            Step::Connected(Err(error)) => {
                let action = self.machine.on_step(Event::ConnectFailed(&error), now);
                self.carry_out(action, Some(error), None)
            }
        }
    }

    /// Does what the machine decided after a step that brought `error` and `reply`.
    fn carry_out(
        &mut self,
        action: Action,
        error: Option<Error>,
        reply: Option<Message>,
    ) -> Result<Option<(Duration, Next)>, ()> {
        let (wait, next, state, note) = match action {
            Action::Go { wait, next, state, note } => (wait, next, state, note),
            Action::FailOpen => {
                self.open_failed = true;
                let error =
                    error.unwrap_or_else(|| Error::InvalidOperation("open failed without an error".into()));
                if let Some(opened) = self.take_opened() {
                    let _ = opened.send(Err(error));
                }
                return Err(());
            }
            Action::ServerClosed => {
                self.server_closed(reply);
                return Err(());
            }
        };
        if let Some(error) = &error {
            match note {
                Note::Quiet => {}
                Note::Debug(what) => tracing::debug!(error = %error, "{what}"),
                Note::Info(what) => tracing::info!(error = %error, "{what}"),
                Note::Warn(what) => tracing::warn!(error = %error, "{what}"),
            }
            if self.opened.is_some() {
                // For `open` to report if it reaches its deadline before a session.
                self.open_error = Some(error.duplicate());
            }
        }
        self.set_state(state, error.as_ref());
        if state == SessionState::Connected
            && let Some(opened) = self.take_opened()
        {
            self.status.send_modify(|status| status.open = true);
            let _ = opened.send(Ok(()));
        }
        let backoff = &self.ctx.shared.options.backoff;
        let delay = match wait {
            Wait::Now => Duration::ZERO,
            Wait::Interval(millis) => Duration::from_millis(millis),
            // Capped so that an outage shorter than `connection_timeout` is always met by
            // a few attempts before `receive` reports it.
            Wait::Backoff(failures) => backoff.delay_within(failures, self.retry_cap()),
            Wait::BackoffAndInterval(failures, interval) => {
                backoff.delay_within(failures, self.retry_cap()) + Duration::from_millis(interval)
            }
            Wait::Longest => {
                let delay = backoff.bound(u32::MAX);
                let error = error.as_ref().map(ToString::to_string).unwrap_or_default();
                // Salesforce says why in `ext.sfdc.failureReason`.
                let reason = reply
                    .as_ref()
                    .and_then(|reply| reply.ext.as_ref())
                    .and_then(|ext| ext.get("sfdc"))
                    .and_then(|sfdc| sfdc.get("failureReason"))
                    .and_then(Value::as_str)
                    .map(|reason| super::error::bounded(reason.to_owned(), super::error::ERROR_TEXT_LIMIT));
                tracing::error!(error = %error, reason = ?reason, delay = ?delay, "the server reports a limit; backing off");
                delay
            }
        };
        Ok(Some((delay, next)))
    }

    /// The longest pause between reconnect attempts: a quarter of `connection_timeout`.
    fn retry_cap(&self) -> Duration {
        self.ctx.shared.options.connection_timeout.map_or(Duration::MAX, |timeout| timeout / 4)
    }

    /// Fails the requests that have waited for a connection longer than `request_timeout`.
    fn expire_deferred(&mut self) {
        let now = Instant::now();
        while self.deferred.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, command)) = self.deferred.pop_front() else { break };
            let timed_out = || {
                Error::transport_from(
                    TransportErrorKind::RequestTimeout,
                    "the session was not connected within request_timeout",
                )
            };
            match command {
                Command::Publish { reply, .. } => drop(reply.send(Err(timed_out()))),
                Command::Subscribe { reply, .. } | Command::Unsubscribe { reply, .. } => {
                    drop(reply.send(Err(timed_out())))
                }
                Command::Close { reply } => drop(reply.send(())),
                Command::Detach { reply, .. } => drop(reply.send(None)),
            }
        }
    }

    /// `open` reached `connection_timeout`: it fails with the last error seen, or a
    /// connection timeout if the server never answered.
    fn give_up_opening(&mut self) {
        let error = self.open_error.take().unwrap_or_else(|| {
            Error::transport_from(
                TransportErrorKind::ConnectionTimeout,
                "the server did not answer within connection_timeout",
            )
        });
        tracing::debug!(error = %error, "giving up opening at connection_timeout");
        self.open_failed = true;
        if let Some(opened) = self.take_opened() {
            let _ = opened.send(Err(error));
        }
    }

    /// Subscribes once more to a channel refused after a new handshake.
    fn resubscribe_one(&self, channel: String) -> BoxFuture<'static, Done> {
        let ctx = self.ctx.clone();
        let transport = self.transport.clone().expect("connected sessions have a transport");
        let client_id = self.client_id.clone().expect("connected sessions have a client id");
        async move {
            let result = subscribe_all(&ctx, &transport, &client_id, vec![channel.clone()]).await;
            Done::Resubscribed(channel, result.and_then(|mut results| results.remove(0).1))
        }
        .boxed()
    }

    /// Records a refused resubscription and when to try it again.
    fn refuse(&mut self, channel: String) {
        let backoff = &self.ctx.shared.options.backoff;
        self.machine.refused.refuse(channel, Instant::now(), |failures| backoff.delay(failures));
    }

    /// The server said `reconnect: none`: hand out what is pending, then the error.
    fn server_closed(&mut self, reply: Option<Message>) {
        let error = Error::server("connection closed by the server", reply);
        let cause = error.as_server_error().and_then(|server| server.error()).map(str::to_owned);
        tracing::warn!(error = ?cause, "the server closed the session (advice reconnect: none)");
        self.status.send_modify(|status| status.last_error = Some(error.to_string()));
        self.ctx.shared.queue.push(Err(error));
    }

    /// Starts a client request.
    fn request(&self, command: Command) -> BoxFuture<'static, Done> {
        let ctx = self.ctx.clone();
        let transport = self.transport.clone().expect("connected sessions have a transport");
        let client_id = self.client_id.clone().expect("connected sessions have a client id");
        let timeout = ctx.shared.options.request_timeout;
        async move {
            match command {
                Command::Publish { channel, data, reply } => {
                    let request = Message {
                        client_id: Some(client_id),
                        data: Some(Data::from(data)),
                        ..Message::new(channel)
                    };
                    let result = ctx.exchange(&transport, vec![request], timeout).await;
                    Done::Publish(reply, result.and_then(|mut replies| check(replies.remove(0))))
                }
                Command::Subscribe { channel, reply } => {
                    let result = subscribe_all(&ctx, &transport, &client_id, vec![channel.clone()]).await;
                    let result = result.and_then(|mut results| results.remove(0).1);
                    Done::Subscribe(reply, channel, result)
                }
                Command::Unsubscribe { channel, reply } => {
                    let request = subscription_request(META_UNSUBSCRIBE, &client_id, &channel);
                    let result = ctx.exchange(&transport, vec![request], timeout).await;
                    Done::Unsubscribe(
                        reply,
                        channel,
                        result.and_then(|mut replies| check(replies.remove(0)).map(drop)),
                    )
                }
                Command::Close { .. } | Command::Detach { .. } => {
                    unreachable!("close and detach are handled by the session loop")
                }
            }
        }
        .boxed()
    }

    /// Records what a finished request changed, then answers it.
    fn answer(&mut self, done: Done) {
        match done {
            Done::Publish(reply, result) => {
                let _ = reply.send(result);
            }
            Done::Subscribe(reply, channel, result) => {
                if result.is_ok() {
                    self.machine.refused.remove(&channel);
                    self.subscriptions.insert(channel);
                    self.publish_session();
                }
                let _ = reply.send(result);
            }
            Done::Unsubscribe(reply, channel, result) => {
                // The application no longer wants it, whatever the server says.
                self.machine.refused.remove(&channel);
                if result.is_ok() {
                    self.subscriptions.remove(&channel);
                    self.publish_session();
                }
                let _ = reply.send(result);
            }
            Done::Resubscribed(channel, result) => {
                if !self.machine.refused.contains(&channel) {
                    return; // unsubscribed meanwhile
                }
                match result {
                    Ok(()) => {
                        tracing::info!(channel = %channel, "resubscribed after an earlier refusal");
                        self.machine.refused.remove(&channel);
                        self.subscriptions.insert(channel);
                        self.publish_session();
                    }
                    Err(error) => {
                        tracing::warn!(channel = %channel, error = %error, "resubscription refused again; trying again with backoff");
                        self.refuse(channel);
                    }
                }
            }
        }
    }

    /// Stops without `/meta/disconnect` and returns what continues the session elsewhere
    /// (`None` unless it was connected). What the server sent for it meanwhile is taken
    /// in first, for at most `wait`: on long-polling the held `/meta/connect` is let finish
    /// (or, cut at `wait`, followed by one the server answers at once, which takes what it
    /// queued for the cut one); a websocket is closed with a close handshake, reading up to
    /// the server's close frame.
    async fn detach(
        &mut self,
        step: Option<BoxFuture<'static, Step>>,
        wait: Duration,
    ) -> Option<SessionTicket> {
        let connected = self.is_connected();
        let (Some(transport), Some(client_id), true) =
            (self.transport.clone(), self.client_id.clone(), connected)
        else {
            drop(step);
            self.shut_down(false).await;
            return None;
        };
        self.set_state(SessionState::Disconnecting, None);
        match transport.connection_type() {
            super::options::ConnectionType::LongPolling => {
                let finished = match step {
                    Some(step) => tokio::time::timeout(wait, step).await.ok(),
                    None => None,
                };
                if !matches!(finished, Some(Step::Connected(Ok(_)))) {
                    let last = connect(self.ctx.clone(), transport.clone(), client_id, None, true);
                    if tokio::time::timeout(wait, last).await.is_err() {
                        tracing::debug!("the last /meta/connect before detaching got no reply in time");
                    }
                }
            }
            super::options::ConnectionType::WebSocket => {
                drop(step);
                transport.close_gracefully(wait).await;
            }
        }
        let ticket = super::ticket::ticket_of(&self.ctx.shared, &self.status.borrow());
        self.shut_down(false).await;
        ticket
    }

    /// Ends the session: `/meta/disconnect` if it is connected and `polite`, then closes the
    /// transport and answers whatever still waits.
    async fn shut_down(&mut self, polite: bool) {
        let was_connected = self.is_connected();
        self.set_state(SessionState::Disconnecting, None);
        // A failed open that got a client id ends that session on the server too, instead
        // of leaving it there until it expires; in the background, so that `open` may be
        // called again at once.
        if self.open_failed
            && let (Some(transport), Some(client_id)) = (self.transport.take(), self.client_id.clone())
        {
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                let request = Message { client_id: Some(client_id), ..Message::new(META_DISCONNECT) };
                let sent = ctx.exchange(&transport, vec![request], ctx.shared.options.request_timeout).await;
                tracing::debug!(replied = sent.is_ok(), "disconnected the session of a failed open");
                transport.close().await;
            });
        }
        if let (true, true, Some(transport), Some(client_id)) =
            (polite, was_connected, &self.transport, &self.client_id)
        {
            let request = Message { client_id: Some(client_id.clone()), ..Message::new(META_DISCONNECT) };
            match self.ctx.exchange(transport, vec![request], self.ctx.shared.options.request_timeout).await {
                Ok(_) => tracing::debug!("disconnected"),
                // faye closes the websocket instead of answering: that is a disconnect too.
                Err(error) => tracing::debug!(error = %error, "disconnect got no reply"),
            }
        }
        if let Some(transport) = &self.transport {
            transport.close().await;
        }
        for (_, command) in self.deferred.drain(..) {
            let closed =
                || Error::InvalidOperation("the client was closed before the request could be sent".into());
            match command {
                Command::Publish { reply, .. } => drop(reply.send(Err(closed()))),
                Command::Subscribe { reply, .. } | Command::Unsubscribe { reply, .. } => {
                    drop(reply.send(Err(closed())))
                }
                Command::Close { reply } => drop(reply.send(())),
                Command::Detach { reply, .. } => drop(reply.send(None)),
            }
        }
        if let Some(opened) = self.take_opened() {
            let _ = opened.send(Err(Error::InvalidOperation("the client was closed while opening".into())));
        }
        self.status.send_modify(|status| {
            status.state = SessionState::Closed;
            status.since = Instant::now();
            status.open = false;
        });
    }
}

#[cfg(test)]
mod size_tests {
    /// An idle session holds its task and a pending `/meta/connect`; with thousands of
    /// sessions in a process their futures are most of the memory. Large, rarely used
    /// futures (opening a socket, an HTTP request, shutting down) are boxed to keep these
    /// small; this guards against losing that by accident.
    #[test]
    fn an_idle_sessions_futures_stay_small() {
        let options = super::super::options::ClientOptions::new("http://127.0.0.1:1/x").validate().unwrap();
        let queue = std::sync::Arc::new(super::super::pending::PendingQueue::new(None));
        let shared = std::sync::Arc::new(super::super::transport::Shared::new(options, queue).unwrap());
        let ctx =
            super::Context { shared: shared.clone(), ids: Default::default(), advice: Default::default() };
        let transport = std::sync::Arc::new(super::Transport::new(
            super::super::options::ConnectionType::WebSocket,
            shared,
        ));
        let connect = super::connect(ctx.clone(), transport.clone(), "x".into(), None, false);
        assert!(
            std::mem::size_of_val(&connect) <= 1024,
            "connect: {} bytes",
            std::mem::size_of_val(&connect)
        );
        let (_commands, receiver) = tokio::sync::mpsc::channel(1);
        let (status, _) = tokio::sync::watch::channel(super::SessionStatus::new());
        let (opened, _) = tokio::sync::oneshot::channel();
        let run = super::Session::new(ctx, receiver, status, opened, None).run();
        assert!(std::mem::size_of_val(&run) <= 2048, "session task: {} bytes", std::mem::size_of_val(&run));
    }
}
