//! The client through a faulty network: a [`FaultProxy`] between it and a real server (faye;
//! the official CometD server where faye cannot show the behaviour) cuts, blackholes,
//! delays and truncates its connections, on websocket and on long-polling. Publishers
//! talk to the server directly, so only the client under test suffers.

use std::net::SocketAddr;
use std::time::Duration;

use cometd_bridge::cometd::{
    Client, ClientOptions, ConnectionType, Data, Error, Message, SessionState, TransportErrorKind,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::support::bayeux::{BayeuxServer, CometdOptions, FayeOptions};
use crate::support::fault_proxy::FaultProxy;
use crate::support::peer::{WAIT, next, open, wait_for_state};

/// Generates one test per connection type for `$scenario(kind)`.
macro_rules! on_both_transports {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use cometd_bridge::cometd::ConnectionType;
            #[tokio::test]
            async fn websocket() { super::$scenario(ConnectionType::WebSocket).await }
            #[tokio::test]
            async fn long_polling() { super::$scenario(ConnectionType::LongPolling).await }
        }
    )*};
}

on_both_transports!(
    ten_cuts_within_the_session_timeout_keep_the_client_id_and_lose_only_what_was_in_flight,
    a_blackholed_server_is_detected_within_the_connect_timeout,
    a_server_blackholed_while_open_is_detected_then_recovered_from,
    two_hundred_ms_latency_each_way_still_delivers_in_order,
    a_connection_cut_after_n_bytes_mid_payload_is_recovered,
    a_healed_cut_is_not_reported_as_a_lost_connection,
);

/// Starts faye holding `/meta/connect` for `hold` seconds (it forgets a session after
/// twice that without a connect), and a proxy in front of it.
async fn faye_behind_a_proxy(hold: u64) -> (BayeuxServer, FaultProxy) {
    behind_a_proxy(BayeuxServer::faye(FayeOptions { timeout: Some(hold), ..FayeOptions::default() }).await)
        .await
}

/// A proxy in front of `server`.
async fn behind_a_proxy(server: BayeuxServer) -> (BayeuxServer, FaultProxy) {
    let port = reqwest::Url::parse(&server.url()).expect("the server's URL").port().expect("a port");
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await;
    (server, proxy)
}

/// Options for a client of `kind` that reaches `server` through `proxy`.
fn through(proxy: &FaultProxy, server: &BayeuxServer, kind: ConnectionType) -> ClientOptions {
    let endpoint = reqwest::Url::parse(&server.url()).expect("the server's URL");
    Client::builder(proxy.url(endpoint.path()))
        .connection_types([kind])
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .request_timeout(Duration::from_secs(5))
}

/// A client that talks to the server directly.
async fn publisher(server: &BayeuxServer) -> Client {
    open(Client::builder(server.url())).await
}

/// The data of a received message.
fn data(message: Message) -> Value {
    message.data.map(Data::into_value).unwrap_or(Value::Null)
}

/// The `n` of a received `{"n": …}` message.
fn number(message: Message) -> u64 {
    let data = data(message);
    data["n"].as_u64().unwrap_or_else(|| panic!("a numbered message, got {data}"))
}

/// Ten times, while a publisher sends numbered messages at a steady pace, every connection
/// is cut: each time just after faye confirmed a publication, so that the message is on
/// its way to the client, and after the client reconnected from the previous cut. faye
/// keeps the session (2 × 3 s without a connect) far longer than an outage lasts, so the
/// client keeps its id and gets every message once, in order, but for what the cut itself
/// destroyed.
///
/// faye has no acknowledgement extension: a message written to a connection has left its
/// queue. So a cut loses what was in flight, which the proxy counts; and on long-polling
/// the message faye flushes, just after the cut, into the held `/meta/connect` of the cut
/// connection (faye does not notice that the request's socket is gone; the messages after
/// it wait for the client's new connect). Asserted: no duplicates, in order, the same client
/// id, and nothing lost but messages published right around a cut (the one confirmed just
/// before it, and its neighbours); on websocket, one confirmed before the cut only if the
/// cut destroyed bytes on their way to the client.
async fn ten_cuts_within_the_session_timeout_keep_the_client_id_and_lose_only_what_was_in_flight(
    kind: ConnectionType,
) {
    const MESSAGES: u64 = 200;
    const CUTS: u64 = 10;
    /// Publications between cuts.
    const EVERY: u64 = 18;
    const PACE: Duration = Duration::from_millis(20);
    let (server, proxy) = faye_behind_a_proxy(3).await;
    let client = open(through(&proxy, &server, kind).connection_timeout(Some(Duration::from_secs(10)))).await;
    client.subscribe("/faults/steady").await.expect("subscribe");
    let client_id = client.status().client_id.expect("a client id");
    let publisher = publisher(&server).await;

    let (confirmed, mut confirmations) = watch::channel(0u64);
    let publishing = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(PACE);
        for n in 0..MESSAGES {
            ticks.tick().await;
            publisher.publish("/faults/steady", json!({ "n": n })).await.expect("publish");
            confirmed.send_replace(n + 1);
        }
    });
    let mut received = Vec::new();
    let receiving = async {
        while received.last() != Some(&(MESSAGES - 1)) {
            received.push(number(next(&client).await.expect("a message, not an error")));
        }
    };
    // Cut `k` once faye confirmed message `EVERY × k - 1`, then wait for the client's new
    // connection; returns the bytes each cut destroyed on their way to the client.
    let cutting = async {
        let mut dropped = Vec::new();
        for k in 1..=CUTS {
            confirmations.wait_for(|count| *count >= k * EVERY).await.expect("the publisher runs");
            let before = proxy.stats();
            proxy.cut_all();
            let after = proxy
                .wait_for("the client's new connection", WAIT, |stats| stats.accepted > before.accepted)
                .await;
            dropped.push(after.dropped_down - before.dropped_down);
        }
        dropped
    };
    let ((), dropped) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(receiving, cutting) })
            .await
            .unwrap_or_else(|_| panic!("{kind}: not done in 30 s; received {received:?}"));
    publishing.await.expect("the publisher");

    assert_eq!(client.status().client_id.as_deref(), Some(client_id.as_str()), "{kind}: no new handshake");
    assert!(received.windows(2).all(|pair| pair[0] < pair[1]), "{kind}: once each, in order: {received:?}");
    let lost: Vec<u64> = (0..MESSAGES).filter(|n| !received.contains(n)).collect();
    for n in &lost {
        // The cut nearest to message n came after message `EVERY × k - 1` was confirmed.
        let k = (n + 1 + EVERY / 2) / EVERY;
        let confirmed_before = (EVERY * k).saturating_sub(1);
        assert!(
            (1..=CUTS).contains(&k) && confirmed_before.abs_diff(*n) <= 1,
            "{kind}: message {n} is lost far from any cut (lost: {lost:?})"
        );
        // faye confirms a publication after writing it to the subscriber's websocket.
        if kind == ConnectionType::WebSocket && *n <= confirmed_before {
            let in_flight = dropped[(k - 1) as usize];
            assert!(in_flight > 0, "{kind}: message {n} is lost, but cut {k} destroyed nothing in flight");
        }
    }
    assert!(proxy.stats().cut >= CUTS, "{kind}: {:?}", proxy.stats());
    eprintln!("{kind}: lost {lost:?} of {MESSAGES}; bytes in flight destroyed by each cut: {dropped:?}");
}

/// The connect timeout the blackhole tests give the client.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Some slack over each bound, for a loaded test machine.
const MARGIN: Duration = Duration::from_secs(3);

/// A server that accepts connections and never answers fails `open` within about the
/// connect timeout, however long a single request may wait.
async fn a_blackholed_server_is_detected_within_the_connect_timeout(kind: ConnectionType) {
    let (server, proxy) = faye_behind_a_proxy(2).await;
    proxy.set_blackhole(true);
    let client = through(&proxy, &server, kind)
        .connection_timeout(Some(CONNECTION_TIMEOUT))
        .request_timeout(Duration::from_secs(30))
        .build()
        .expect("options");
    let started = Instant::now();
    let opened = tokio::time::timeout(Duration::from_secs(10), client.open()).await;
    let took = started.elapsed();
    let error = opened
        .unwrap_or_else(|_| panic!("{kind}: open still waits after 10 s (connection_timeout is 2 s)"))
        .expect_err("nothing answers");
    assert!(matches!(error, Error::Transport { .. }), "{kind}: a transport error, got {error:?}");
    assert!(took < CONNECTION_TIMEOUT + MARGIN, "{kind}: open gave up after {took:?}");
    assert!(client.is_closed());
    assert!(proxy.stats().accepted >= 1, "{kind}: the client reached the proxy");
    eprintln!("{kind}: open gave up after {took:?}: {error}");
}

/// The link goes dark under an open client: `receive` reports a connection timeout once
/// the held connect's own timeout (the advised hold × 1.2 + 2 s) and then the connect
/// timeout have passed; once the link is back the client receives again.
async fn a_server_blackholed_while_open_is_detected_then_recovered_from(kind: ConnectionType) {
    const HOLD: Duration = Duration::from_secs(2);
    let (server, proxy) = faye_behind_a_proxy(HOLD.as_secs()).await;
    let client = open(through(&proxy, &server, kind).connection_timeout(Some(CONNECTION_TIMEOUT))).await;
    client.subscribe("/faults/dark").await.expect("subscribe");
    let publisher = publisher(&server).await;
    publisher.publish("/faults/dark", json!("before")).await.expect("publish");
    assert_eq!(data(next(&client).await.expect("a message")), json!("before"));

    proxy.set_blackhole(true);
    let started = Instant::now();
    let bound = HOLD + HOLD / 5 + Duration::from_secs(2) + CONNECTION_TIMEOUT + MARGIN;
    let received = tokio::time::timeout(bound + Duration::from_secs(5), client.receive()).await;
    let took = started.elapsed();
    let error = received
        .unwrap_or_else(|_| panic!("{kind}: receive still waits after {:?}", bound + Duration::from_secs(5)))
        .expect_err("nothing gets through");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::ConnectionTimeout), "{kind}: {error}");
    assert!(took <= bound, "{kind}: detected after {took:?}, bound {bound:?}");
    assert!(!client.is_closed(), "{kind}: a connection timeout is not final");

    proxy.set_blackhole(false);
    let lifted = Instant::now();
    wait_for_state(&client, SessionState::Connected).await;
    publisher.publish("/faults/dark", json!("after")).await.expect("publish");
    assert_eq!(data(next(&client).await.expect("delivery resumes")), json!("after"), "{kind}");
    eprintln!(
        "{kind}: blackhole detected after {took:?} (bound {bound:?}); receiving again {:?} after it was lifted",
        lifted.elapsed()
    );
}

/// 200 ms more each way: every round trip takes over 400 ms, far below the request
/// timeouts, and a burst of messages still arrives whole and in order (without the
/// latency adding up per message).
async fn two_hundred_ms_latency_each_way_still_delivers_in_order(kind: ConnectionType) {
    const LATENCY: Duration = Duration::from_millis(200);
    const MESSAGES: u64 = 50;
    let (server, proxy) = faye_behind_a_proxy(2).await;
    proxy.set_latency(LATENCY);
    let client = open(through(&proxy, &server, kind)).await;

    let started = Instant::now();
    client.subscribe("/faults/slow").await.expect("subscribe");
    let subscribed = started.elapsed();
    let started = Instant::now();
    let reply = client.publish("/faults/slow", json!({ "n": 0 })).await.expect("publish");
    let published = started.elapsed();
    assert_eq!(reply.successful, Some(true));
    for (what, took) in [("subscribe", subscribed), ("publish", published)] {
        assert!(
            took >= 2 * LATENCY,
            "{kind}: the {what} round trip took {took:?}: the latency is not applied"
        );
    }
    assert_eq!(number(next(&client).await.expect("its own message")), 0);

    let publisher = publisher(&server).await;
    for n in 1..=MESSAGES {
        publisher.publish("/faults/slow", json!({ "n": n })).await.expect("publish");
    }
    let burst = Instant::now();
    let mut received = Vec::new();
    while received.len() < MESSAGES as usize {
        received.push(number(next(&client).await.expect("a message")));
    }
    let took = burst.elapsed();
    assert_eq!(received, (1..=MESSAGES).collect::<Vec<_>>(), "{kind}: all, in order");
    // One message after another would take MESSAGES × 200 ms = 10 s.
    assert!(took < Duration::from_secs(5), "{kind}: the burst took {took:?} to arrive");
    eprintln!("{kind}: subscribe took {subscribed:?}, publish {published:?}, a burst of {MESSAGES} {took:?}");
}

/// The connection carrying a message is cut part way through it: inside the HTTP
/// headers or the websocket frame's start, early in the body, and in its middle. The
/// client never hands out a torn message, reports no error, keeps its session, and
/// receives what is published once it is back, in order.
///
/// faye had written the torn message, so it has left faye's queue: it is lost (reported
/// on stderr). Messages faye writes before it notices the broken socket would be lost the
/// same way, so the next ones are published after the client's own publication went
/// through, which on websocket happens on the new socket.
async fn a_connection_cut_after_n_bytes_mid_payload_is_recovered(kind: ConnectionType) {
    const BIG: usize = 8 * 1024;
    let (server, proxy) = faye_behind_a_proxy(3).await;
    let client = open(through(&proxy, &server, kind)).await;
    client.subscribe("/faults/torn").await.expect("subscribe");
    let client_id = client.status().client_id.expect("a client id");
    let publisher = publisher(&server).await;
    let fill = "x".repeat(BIG);
    let mut lost = Vec::new();
    for (round, offset) in [10u64, 300, 4000].into_iter().enumerate() {
        let base = round as u64 * 10;
        // The link works and is idle: the cut can only land in what comes next.
        publisher.publish("/faults/torn", json!({ "n": base })).await.expect("publish");
        assert_eq!(number(next(&client).await.expect("the marker")), base, "{kind}");

        let cuts = proxy.stats().cut;
        proxy.cut_after(offset);
        publisher.publish("/faults/torn", json!({ "n": base + 1, "fill": fill })).await.expect("publish");
        proxy.wait_for("the cut", WAIT, |stats| stats.cut > cuts).await;
        let cut = Instant::now();
        tokio::time::timeout(WAIT, client.publish("/faults/torn", json!({ "n": base + 2 })))
            .await
            .expect("the client publishes again within the wait")
            .expect("publish after the cut");
        let back = cut.elapsed();
        publisher.publish("/faults/torn", json!({ "n": base + 3 })).await.expect("publish");

        let mut received = Vec::new();
        while received.last() != Some(&(base + 3)) {
            let data = data(next(&client).await.expect("a message, not an error"));
            if data["n"] == json!(base + 1) {
                assert_eq!(data["fill"].as_str().map(str::len), Some(BIG), "{kind}: a whole message");
            }
            received.push(data["n"].as_u64().expect("numbered"));
        }
        if received == [base + 2, base + 3] {
            lost.push((offset, base + 1, back));
        } else {
            assert_eq!(received, [base + 1, base + 2, base + 3], "{kind}: cut after {offset} bytes");
        }
    }
    assert_eq!(client.status().client_id.as_deref(), Some(client_id.as_str()), "{kind}: no new handshake");
    eprintln!("{kind}: lost to the cut, as (offset, n, publishing again took): {lost:?}");
}

/// The link breaks and heals at once: the client is back on a new connection within
/// milliseconds, so `receive` must not report a lost connection a connect timeout later,
/// even though the server holds the client's new `/meta/connect` (6 s here). The CometD
/// JavaScript client sends the first connect after a failure with `advice.timeout = 0`
/// for that reason, so that the server answers it at once.
async fn a_healed_cut_is_not_reported_as_a_lost_connection(kind: ConnectionType) {
    let (server, proxy) = match kind {
        ConnectionType::WebSocket => faye_behind_a_proxy(6).await,
        // faye 1.4.3 keeps the timer of a held connect whose request is gone, and holds the
        // same client's next connect until it fires, `advice.timeout = 0` or not: no client
        // can be told at once that it is back. The official CometD server answers it.
        ConnectionType::LongPolling => {
            behind_a_proxy(
                BayeuxServer::cometd(CometdOptions { timeout: Some(6000), ..CometdOptions::default() }).await,
            )
            .await
        }
    };
    let client = open(through(&proxy, &server, kind).connection_timeout(Some(CONNECTION_TIMEOUT))).await;
    client.subscribe("/faults/blip").await.expect("subscribe");
    // Twice: on websocket the first cut is healed inside the transport, which sends the
    // held connect again on a new socket; the second one reaches the session.
    for _ in 0..2 {
        let before = proxy.stats();
        proxy.cut_all();
        proxy.wait_for("the client's new connection", WAIT, |stats| stats.accepted > before.accepted).await;
    }
    let quiet = tokio::time::timeout(CONNECTION_TIMEOUT + MARGIN, client.receive()).await;
    assert!(
        quiet.is_err(),
        "{kind}: the client was back on a new connection, yet receive gave {:?} (state {:?})",
        quiet.map(|received| received.map(|message| message.channel)),
        client.status().state
    );
    assert_eq!(client.status().state, SessionState::Connected, "{kind}");
    publisher(&server).await.publish("/faults/blip", json!("after")).await.expect("publish");
    assert_eq!(data(next(&client).await.expect("a message")), json!("after"), "{kind}");
}
