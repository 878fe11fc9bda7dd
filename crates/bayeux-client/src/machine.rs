//! The session's decisions, without I/O: after each step (a handshake, a resubscription,
//! a `/meta/connect`) what to do next, after how long, in which state, and whether `open`
//! or the session ends. The session task (`session.rs`) carries the decisions out; here
//! every rule of the server's advice and of reconnection can be tested by table.

use std::time::Duration;

use tokio::time::Instant;

use super::error::Error;
use super::message::{Advice, META_CONNECT, META_HANDSHAKE, Message, Reconnect};
use super::refused::Refused;
use super::status::SessionState;

/// The longest advised hold (`advice.timeout`) followed; Salesforce advises 110 s.
pub(crate) const MAX_ADVISED_HOLD: Duration = Duration::from_secs(600);

/// The longest advised pause between connects (`advice.interval`) followed: a server that
/// advises more would park the session for as long as it likes.
pub(crate) const MAX_ADVISED_INTERVAL: Duration = Duration::from_secs(60);

/// What the session does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// A new handshake (closing the old transport first).
    Handshake,
    /// Subscribe again to every channel, after a new handshake.
    Resubscribe,
    /// A `/meta/connect`. A probe asks the server not to hold it: the first after a
    /// handshake (so `open` returns at once) and the first after a failure (so the session
    /// learns at once that the link is back, instead of after a whole hold).
    Connect { probe: bool },
}

/// How long to wait before the next step. Backoff delays are jittered by the session, so
/// that the decisions stay deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// At once.
    Now,
    /// The advised interval, in milliseconds.
    Interval(u64),
    /// The backoff after this many consecutive failures.
    Backoff(u32),
    /// The backoff after this many consecutive failures, plus the advised interval (in
    /// milliseconds).
    BackoffAndInterval(u32, u64),
    /// The longest backoff: the server reports a limit, and retrying soon makes it worse.
    Longest,
}

/// How loudly the session reports the step's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Note {
    /// Nothing to report.
    Quiet,
    /// At DEBUG (while `open` waits, it reports the error itself if it gives up).
    Debug(&'static str),
    /// At INFO.
    Info(&'static str),
    /// At WARN.
    Warn(&'static str),
}

/// The decision after a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Carry on: `next` after `wait`, the session being `state` meanwhile. Reaching
    /// `Connected` while `open` waits answers it.
    Go { wait: Wait, next: Next, state: SessionState, note: Note },
    /// `open` fails with the step's error, and the session stops.
    FailOpen,
    /// The server ended the session (`reconnect: none`): reported, and the session stops.
    ServerClosed,
}

/// What a finished step brought.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event<'a> {
    /// The handshake succeeded; `resubscribe` when there are channels to subscribe again.
    Handshaken { advice: Option<&'a Advice>, resubscribe: bool },
    /// The handshake failed.
    HandshakeFailed(&'a Error),
    /// The channels were subscribed again (each channel's verdict is the session's).
    Resubscribed,
    /// The resubscription could not be carried.
    ResubscribeFailed,
    /// The server answered a `/meta/connect`.
    ConnectReply(&'a Message),
    /// A `/meta/connect` got no answer.
    ConnectFailed(&'a Error),
}

/// The state the decisions depend on.
#[derive(Clone, Debug)]
pub(crate) struct Machine {
    /// The advice seen so far, merged field by field and capped; `reconnect` is read from
    /// each reply alone, never from an older one.
    pub(crate) advice: Advice,
    /// Consecutive failures, for the backoff.
    pub(crate) failures: u32,
    /// Whether `open` still waits for its answer.
    pub(crate) opening: bool,
    /// Whether the session was taken up from a ticket and has not handshaken since: a
    /// server that no longer knows it calls for a handshake, not a failed open.
    pub(crate) resuming: bool,
    /// When `open` gives up on errors it could otherwise retry.
    pub(crate) open_deadline: Option<Instant>,
    /// Whether an auth extension is configured.
    pub(crate) has_auth: bool,
    /// The channels refused after a new handshake, each retried with its own backoff.
    pub(crate) refused: Refused,
}

impl Machine {
    pub(crate) fn new(open_deadline: Option<Instant>, has_auth: bool) -> Self {
        Machine {
            advice: Advice::default(),
            failures: 0,
            opening: true,
            resuming: false,
            open_deadline,
            has_auth,
            refused: Refused::default(),
        }
    }

    /// Takes in a finished step at `now` and decides what follows.
    pub(crate) fn on_step(&mut self, event: Event<'_>, now: Instant) -> Action {
        match event {
            Event::Handshaken { advice, resubscribe } => {
                self.resuming = false;
                if let Some(advice) = advice {
                    self.merge_advice(advice);
                }
                let next = if resubscribe { Next::Resubscribe } else { Next::Connect { probe: true } };
                Action::Go { wait: Wait::Now, next, state: SessionState::Handshaking, note: Note::Quiet }
            }
            Event::HandshakeFailed(error) => {
                if self.gives_up(error, now) {
                    return Action::FailOpen;
                }
                if error.as_server_error().and_then(|server| server.response()).is_some_and(|reply| {
                    reply.protocol().advice.as_ref().and_then(|advice| advice.reconnect)
                        == Some(Reconnect::None)
                }) {
                    return Action::ServerClosed;
                }
                let note = if self.opening {
                    Note::Debug("handshake failed; retrying")
                } else {
                    Note::Warn("handshake failed; retrying")
                };
                Action::Go {
                    wait: self.back_off_after(error),
                    next: Next::Handshake,
                    state: SessionState::Handshaking,
                    note,
                }
            }
            Event::Resubscribed => Action::Go {
                wait: Wait::Now,
                next: Next::Connect { probe: true },
                state: SessionState::Handshaking,
                note: Note::Quiet,
            },
            Event::ResubscribeFailed => Action::Go {
                wait: self.back_off(),
                next: Next::Handshake,
                state: SessionState::Reconnecting,
                note: Note::Warn("resubscription failed; handshaking again"),
            },
            Event::ConnectReply(reply) if reply.successful == Some(true) => {
                if let Some(advice) = &reply.protocol().advice {
                    self.merge_advice(advice);
                }
                self.failures = 0;
                self.opening = false;
                match reply.protocol().advice.as_ref().and_then(|advice| advice.reconnect) {
                    // The server ends the session even on a successful connect.
                    Some(Reconnect::None) => return Action::ServerClosed,
                    // ... or asks for a new one.
                    Some(Reconnect::Handshake) => {
                        return Action::Go {
                            wait: Wait::Interval(self.advice.interval.unwrap_or(0)),
                            next: Next::Handshake,
                            state: SessionState::Handshaking,
                            note: Note::Info("the server asks for a new handshake"),
                        };
                    }
                    _ => {}
                }
                Action::Go {
                    wait: Wait::Interval(self.advice.interval.unwrap_or(0)),
                    next: Next::Connect { probe: false },
                    state: SessionState::Connected,
                    note: Note::Quiet,
                }
            }
            Event::ConnectReply(reply) => self.connect_rejected(reply, now),
            Event::ConnectFailed(error) => {
                if self.gives_up(error, now) {
                    return Action::FailOpen;
                }
                Action::Go {
                    wait: self.back_off(),
                    next: Next::Connect { probe: true },
                    state: SessionState::Reconnecting,
                    note: Note::Warn("connect failed; retrying"),
                }
            }
        }
    }

    /// A `/meta/connect` the server answered with `successful: false`.
    fn connect_rejected(&mut self, reply: &Message, now: Instant) -> Action {
        if let Some(advice) = &reply.protocol().advice {
            self.merge_advice(advice);
        }
        let error = Error::server("connect request failed", Some(reply.clone()));
        let reconnect = match reply.protocol().advice.as_ref().and_then(|advice| advice.reconnect) {
            // Salesforce answers an expired token with `401` and `reconnect: none`; with an
            // auth extension (which already tried to re-authenticate) that calls for a new
            // handshake, not the end of the session.
            Some(Reconnect::None) if self.has_auth && is_auth_failure(reply) => Some(Reconnect::Handshake),
            other => other,
        };
        match reconnect {
            Some(Reconnect::None) if self.opening => Action::FailOpen,
            Some(Reconnect::None) => Action::ServerClosed,
            // An unknown session is cured only by a new handshake, whatever the advice
            // says (`retry` would send the dead client id again and again).
            Some(Reconnect::Handshake) | Some(Reconnect::Retry) | None
                if reconnect == Some(Reconnect::Handshake) || is_unknown_session(reply) =>
            {
                // A session taken up from a ticket that the server no longer knows: a
                // new handshake is the expected way on, not a failed open.
                if !std::mem::take(&mut self.resuming) && self.gives_up(&error, now) {
                    return Action::FailOpen;
                }
                let wait = if is_limit_error(reply) {
                    self.back_off_after(&error)
                } else if self.failures == 0 {
                    Wait::Now
                } else {
                    self.back_off()
                };
                self.failures = self.failures.max(1);
                Action::Go {
                    wait,
                    next: Next::Handshake,
                    state: SessionState::Handshaking,
                    note: Note::Info("the server lost the session; handshaking again"),
                }
            }
            // `retry`, no advice, or a value this client does not know.
            _ => {
                if self.gives_up(&error, now) {
                    return Action::FailOpen;
                }
                Action::Go {
                    wait: self.back_off_after(&error),
                    next: Next::Connect { probe: true },
                    state: SessionState::Reconnecting,
                    note: Note::Warn("connect rejected; retrying"),
                }
            }
        }
    }

    /// While `open` waits: whether it gives up on this error.
    fn gives_up(&self, error: &Error, now: Instant) -> bool {
        self.opening && (!error.is_retryable() || self.open_deadline.is_some_and(|deadline| now >= deadline))
    }

    /// The backoff after one more failure, plus the advised interval when there is one
    /// (CometD's rule: the server's interval is honoured after failures too).
    fn back_off(&mut self) -> Wait {
        let wait = match self.advice.interval {
            Some(interval) if interval > 0 => Wait::BackoffAndInterval(self.failures, interval),
            _ => Wait::Backoff(self.failures),
        };
        self.failures = self.failures.saturating_add(1);
        wait
    }

    /// The longest backoff after a server limit, else the usual one.
    fn back_off_after(&mut self, error: &Error) -> Wait {
        if error.as_server_error().and_then(|server| server.response()).is_some_and(is_limit_error) {
            self.failures = self.failures.saturating_add(1);
            return Wait::Longest;
        }
        self.back_off()
    }

    /// Keeps the advised hold and interval, each capped so a server cannot park the
    /// session for ever or make a deadline overflow.
    pub(crate) fn merge_advice(&mut self, advice: &Advice) {
        let capped = |name: &str, millis: u64, cap: Duration| {
            let cap = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
            if millis > cap {
                tracing::warn!(
                    advised_ms = millis,
                    cap_ms = cap,
                    "the server advises an {name} above the cap; using the cap"
                );
            }
            millis.min(cap)
        };
        if let Some(timeout) = advice.timeout {
            self.advice.timeout = Some(capped("advice.timeout", timeout, MAX_ADVISED_HOLD));
        }
        if let Some(interval) = advice.interval {
            self.advice.interval = Some(capped("advice.interval", interval, MAX_ADVISED_INTERVAL));
        }
    }
}

/// A 401 or 403 that new credentials may cure: not an unknown-session error, which a new
/// handshake cures instead.
pub(crate) fn is_auth_failure(reply: &Message) -> bool {
    reply.successful == Some(false)
        && reply.error_field().and_then(|field| field.code).is_some_and(|code| code == 401 || code == 403)
        && !is_unknown_session(reply)
        && !is_limit_error(reply)
}

/// Whether the reply to a request on `channel` calls for new credentials: an
/// authentication failure ([`is_auth_failure`]) of the handshake or a connect, or a `401`
/// (unauthenticated: Salesforce's `401::Authentication invalid` for an expired token) on
/// any request. A `403` on a subscribe or a publish (`403:/ch:subscribe_denied`) is a
/// refusal of that channel, which new credentials do not cure.
pub(crate) fn needs_new_credentials(channel: &str, reply: &Message) -> bool {
    is_auth_failure(reply)
        && (matches!(channel, META_HANDSHAKE | META_CONNECT)
            || reply.error_field().and_then(|field| field.code) == Some(401))
}

/// A server limit: `403::Organization concurrent user limit exceeded`, `…daily limit
/// exceeded`, `503::Server is too busy` (also as Salesforce's `ext.sfdc.failureReason`).
/// Retrying soon only makes it worse: such errors get the longest backoff.
pub(crate) fn is_limit_error(reply: &Message) -> bool {
    let failure_reason = reply
        .ext
        .as_ref()
        .and_then(|ext| ext.get("sfdc"))
        .and_then(|sfdc| sfdc.get("failureReason"))
        .and_then(serde_json::Value::as_str);
    [reply.protocol().error.as_deref(), failure_reason]
        .into_iter()
        .flatten()
        .any(|error| error.to_ascii_lowercase().contains("limit exceeded") || error.starts_with("503:"))
}

/// `401::Unknown client` (faye), `402::session_unknown` (CometD), `403::Unknown client`
/// (Salesforce): the server no longer knows this session.
pub(crate) fn is_unknown_session(reply: &Message) -> bool {
    let Some(field) = reply.error_field() else {
        return false;
    };
    let message = field.message.unwrap_or_default().to_ascii_lowercase();
    field.code == Some(402) || message.contains("unknown client") || message.contains("session_unknown")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TransportErrorKind;
    use serde_json::{Value, json};

    fn reply(value: Value) -> Message {
        serde_json::from_value(value).expect("message")
    }

    fn connect(successful: bool, error: Option<&str>, advice: Value) -> Message {
        let mut value = json!({"channel": "/meta/connect", "successful": successful, "advice": advice});
        if let Some(error) = error {
            value["error"] = json!(error);
        }
        reply(value)
    }

    fn go(wait: Wait, next: Next, state: SessionState) -> impl Fn(&Action) -> bool {
        move |action| matches!(action, Action::Go { wait: w, next: n, state: s, .. } if *w == wait && *n == next && *s == state)
    }

    /// Each row: the machine before, the event, the expected decision, and the machine's
    /// failure count after.
    #[test]
    fn decisions_follow_the_advice_the_errors_and_the_open_deadline() {
        use SessionState::*;
        let now = Instant::now();
        let open =
            |failures| Machine { failures, ..Machine::new(Some(now + Duration::from_secs(10)), false) };
        let opened = |failures| Machine { opening: false, ..open(failures) };
        let expired = Machine { open_deadline: Some(now), ..open(0) };
        let with_auth = Machine { has_auth: true, ..opened(0) };
        let refused = Error::transport(TransportErrorKind::Connect);
        let tls = Error::transport(TransportErrorKind::Tls);
        let handshake_none = Error::server(
            "handshake request failed",
            Some(reply(
                json!({"channel": "/meta/handshake", "successful": false, "error": "403::denied", "advice": {"reconnect": "none"}}),
            )),
        );
        let limit = Error::server(
            "handshake request failed",
            Some(reply(
                json!({"channel": "/meta/handshake", "successful": false, "error": "403::Organization concurrent user limit exceeded"}),
            )),
        );
        let ok = connect(true, None, json!({"interval": 250}));
        let unknown = connect(false, Some("402::session_unknown"), json!({}));
        let rehandshake = connect(false, Some("500::x"), json!({"reconnect": "handshake"}));
        let none = connect(false, Some("500::x"), json!({"reconnect": "none"}));
        let invented = connect(false, Some("500::x"), json!({"reconnect": "sometimes"}));
        let expired_token = connect(false, Some("401::Authentication invalid"), json!({"reconnect": "none"}));
        let ok_but_none = connect(true, None, json!({"reconnect": "none"}));
        let ok_but_handshake = connect(true, None, json!({"reconnect": "handshake", "interval": 0}));
        let unknown_retry = connect(false, Some("401:abc:Unknown client"), json!({"reconnect": "retry"}));
        let advised = |failures| Machine {
            advice: Advice { interval: Some(500), ..Advice::default() },
            ..opened(failures)
        };

        type Check = Box<dyn Fn(&Action) -> bool>;
        let rows: Vec<(&str, Machine, Event<'_>, Check, u32)> = vec![
            (
                "handshake, no channels",
                open(2),
                Event::Handshaken { advice: None, resubscribe: false },
                Box::new(go(Wait::Now, Next::Connect { probe: true }, Handshaking)),
                2,
            ),
            (
                "handshake, channels to restore",
                opened(0),
                Event::Handshaken { advice: None, resubscribe: true },
                Box::new(go(Wait::Now, Next::Resubscribe, Handshaking)),
                0,
            ),
            (
                "handshake refused, retryable",
                open(1),
                Event::HandshakeFailed(&refused),
                Box::new(go(Wait::Backoff(1), Next::Handshake, Handshaking)),
                2,
            ),
            (
                "handshake refused, past the open deadline",
                expired.clone(),
                Event::HandshakeFailed(&refused),
                Box::new(|action| *action == Action::FailOpen),
                0,
            ),
            (
                "handshake refused, not retryable",
                open(0),
                Event::HandshakeFailed(&tls),
                Box::new(|action| *action == Action::FailOpen),
                0,
            ),
            (
                "handshake refused with reconnect none, once open",
                opened(0),
                Event::HandshakeFailed(&handshake_none),
                Box::new(|action| *action == Action::ServerClosed),
                0,
            ),
            (
                "handshake refused for a limit",
                opened(3),
                Event::HandshakeFailed(&limit),
                Box::new(go(Wait::Longest, Next::Handshake, Handshaking)),
                4,
            ),
            (
                "resubscribed",
                opened(0),
                Event::Resubscribed,
                Box::new(go(Wait::Now, Next::Connect { probe: true }, Handshaking)),
                0,
            ),
            (
                "resubscription not carried",
                opened(0),
                Event::ResubscribeFailed,
                Box::new(go(Wait::Backoff(0), Next::Handshake, Reconnecting)),
                1,
            ),
            (
                "connected: the interval, failures reset",
                open(5),
                Event::ConnectReply(&ok),
                Box::new(go(Wait::Interval(250), Next::Connect { probe: false }, Connected)),
                0,
            ),
            (
                "unknown session, first time",
                opened(0),
                Event::ConnectReply(&unknown),
                Box::new(go(Wait::Now, Next::Handshake, Handshaking)),
                1,
            ),
            (
                "unknown session again",
                opened(1),
                Event::ConnectReply(&unknown),
                Box::new(go(Wait::Backoff(1), Next::Handshake, Handshaking)),
                2,
            ),
            (
                "unknown session while opening, past the deadline",
                expired.clone(),
                Event::ConnectReply(&unknown),
                Box::new(|action| *action == Action::FailOpen),
                0,
            ),
            (
                "reconnect handshake",
                opened(0),
                Event::ConnectReply(&rehandshake),
                Box::new(go(Wait::Now, Next::Handshake, Handshaking)),
                1,
            ),
            (
                "reconnect none, once open",
                opened(0),
                Event::ConnectReply(&none),
                Box::new(|action| *action == Action::ServerClosed),
                0,
            ),
            (
                "reconnect none while opening",
                open(0),
                Event::ConnectReply(&none),
                Box::new(|action| *action == Action::FailOpen),
                0,
            ),
            (
                "an invented reconnect value retries",
                opened(0),
                Event::ConnectReply(&invented),
                Box::new(go(Wait::Backoff(0), Next::Connect { probe: true }, Reconnecting)),
                1,
            ),
            (
                "an expired token with an auth extension handshakes",
                with_auth,
                Event::ConnectReply(&expired_token),
                Box::new(go(Wait::Now, Next::Handshake, Handshaking)),
                1,
            ),
            (
                "an expired token without one ends the session",
                opened(0),
                Event::ConnectReply(&expired_token),
                Box::new(|action| *action == Action::ServerClosed),
                0,
            ),
            (
                "connect not carried while opening",
                open(0),
                Event::ConnectFailed(&refused),
                Box::new(go(Wait::Backoff(0), Next::Connect { probe: true }, Reconnecting)),
                1,
            ),
            (
                "connect not carried once open",
                opened(2),
                Event::ConnectFailed(&refused),
                Box::new(go(Wait::Backoff(2), Next::Connect { probe: true }, Reconnecting)),
                3,
            ),
            (
                "a successful connect advising none ends the session",
                opened(0),
                Event::ConnectReply(&ok_but_none),
                Box::new(|action| *action == Action::ServerClosed),
                0,
            ),
            (
                "a successful connect advising handshake handshakes",
                opened(2),
                Event::ConnectReply(&ok_but_handshake),
                Box::new(go(Wait::Interval(0), Next::Handshake, Handshaking)),
                0,
            ),
            (
                "unknown client advising retry handshakes, never retries the dead id",
                opened(0),
                Event::ConnectReply(&unknown_retry),
                Box::new(go(Wait::Now, Next::Handshake, Handshaking)),
                1,
            ),
            (
                "connect not carried: the advised interval on top of the backoff",
                advised(1),
                Event::ConnectFailed(&refused),
                Box::new(go(Wait::BackoffAndInterval(1, 500), Next::Connect { probe: true }, Reconnecting)),
                2,
            ),
            (
                "connect rejected: the advised interval on top of the backoff",
                advised(0),
                Event::ConnectReply(&invented),
                Box::new(go(Wait::BackoffAndInterval(0, 500), Next::Connect { probe: true }, Reconnecting)),
                1,
            ),
            (
                "connect not carried past the open deadline",
                expired,
                Event::ConnectFailed(&refused),
                Box::new(|action| *action == Action::FailOpen),
                0,
            ),
        ];
        for (name, mut machine, event, expected, failures) in rows {
            let action = machine.on_step(event, now);
            assert!(expected(&action), "{name}: got {action:?}");
            assert_eq!(machine.failures, failures, "{name}: failures after");
        }
    }

    #[test]
    fn a_successful_connect_ends_opening_and_keeps_the_capped_advice() {
        let mut machine = Machine::new(None, false);
        let huge = connect(true, None, json!({"timeout": u64::MAX, "interval": u64::MAX}));
        let action = machine.on_step(Event::ConnectReply(&huge), Instant::now());
        assert!(!machine.opening);
        let cap = MAX_ADVISED_INTERVAL.as_millis() as u64;
        assert!(
            go(Wait::Interval(cap), Next::Connect { probe: false }, SessionState::Connected)(&action),
            "{action:?}"
        );
        assert_eq!(machine.advice.timeout, Some(MAX_ADVISED_HOLD.as_millis() as u64));
        machine.merge_advice(&Advice { timeout: Some(45_000), interval: Some(0), reconnect: None });
        machine.merge_advice(&Advice::default());
        assert_eq!(
            (machine.advice.timeout, machine.advice.interval),
            (Some(45_000), Some(0)),
            "kept field by field"
        );
    }

    #[test]
    fn the_latest_advice_of_any_reply_is_kept() {
        let mut machine = Machine { opening: false, ..Machine::new(None, false) };
        let rejected = connect(false, Some("500::x"), json!({"reconnect": "retry", "interval": 700}));
        machine.on_step(Event::ConnectReply(&rejected), Instant::now());
        assert_eq!(machine.advice.interval, Some(700), "advice on a failed connect");
        let action =
            machine.on_step(Event::ConnectFailed(&Error::transport(TransportErrorKind::Io)), Instant::now());
        assert!(
            go(Wait::BackoffAndInterval(1, 700), Next::Connect { probe: true }, SessionState::Reconnecting)(
                &action
            ),
            "{action:?}"
        );
    }

    #[test]
    fn failures_are_told_apart_by_their_error_fields() {
        let expired = reply(
            json!({"channel": "/meta/connect", "successful": false, "error": "401::Authentication invalid"}),
        );
        let denied = reply(
            json!({"channel": "/meta/handshake", "successful": false, "error": "403::Handshake denied",
            "ext": {"sfdc": {"failureReason": "401::Authentication invalid"}}}),
        );
        let faye_unknown = reply(
            json!({"channel": "/meta/connect", "successful": false, "error": "401:abc:Unknown client"}),
        );
        let cometd_unknown =
            reply(json!({"channel": "/meta/connect", "successful": false, "error": "402::session_unknown"}));
        let salesforce_unknown =
            reply(json!({"channel": "/meta/connect", "successful": false, "error": "403::Unknown client"}));
        let concurrent = reply(
            json!({"channel": "/meta/handshake", "successful": false, "error": "403::Organization concurrent user limit exceeded"}),
        );
        let busy = reply(
            json!({"channel": "/meta/handshake", "successful": false, "error": "403::Handshake denied",
            "ext": {"sfdc": {"failureReason": "503::Server is too busy. Please try again later."}}}),
        );

        for auth in [&expired, &denied] {
            assert!(is_auth_failure(auth) && !is_unknown_session(auth) && !is_limit_error(auth), "{auth:?}");
        }
        for unknown in [&faye_unknown, &cometd_unknown, &salesforce_unknown] {
            assert!(is_unknown_session(unknown) && !is_auth_failure(unknown), "{unknown:?}");
        }
        for limit in [&concurrent, &busy] {
            assert!(is_limit_error(limit) && !is_auth_failure(limit), "{limit:?}");
        }

        let refused_channel = reply(
            json!({"channel": "/meta/subscribe", "successful": false, "error": "403:/secret:subscribe_denied"}),
        );
        let expired_on_publish =
            reply(json!({"channel": "/chat", "successful": false, "error": "401::Authentication invalid"}));
        assert!(!needs_new_credentials("/meta/subscribe", &refused_channel), "a refused channel");
        assert!(needs_new_credentials("/chat", &expired_on_publish), "an expired token on any request");
        assert!(needs_new_credentials("/meta/handshake", &denied), "a denied handshake");
        assert!(needs_new_credentials("/meta/connect", &expired));
        assert!(!needs_new_credentials("/meta/connect", &faye_unknown), "a new handshake cures it");
    }
}
