//! The client against servers that misbehave on purpose or by accident: answers too large
//! to hold, servers that never answer or keep forgetting the session, and extensions that
//! break the rules. Each case failed before its fix (a crash, a hang, a spin or a loss).
//!
//! The hostile answers come from a hand-written server (`support::fake`): no real Bayeux
//! server sends them on demand. Each client test runs beside a healthy session in the same
//! process (`Neighbour`), which must get every message; this binary holds nothing else, so
//! its peak memory, checked at the end of each test, is theirs. The bridge test runs the
//! daemon as its own process, beside a healthy source whose messages must all arrive.

#[path = "it/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use cometd_bridge::cometd::{
    Client, ConnectionType, Error, ErrorKind, Extension, HeaderMap, Message, SessionState,
    TransportErrorKind, async_trait,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use support::bayeux::{BayeuxServer, FayeOptions};
use support::daemon::Daemon;
use support::fake::{Behaviour, FakeServer};
use support::peer::{WAIT, wait_for_state};
use support::scenario::{delivered, publish_paced, webhook};
use support::webhook::WebhookReceiver;

/// The largest peak memory a test process may reach, as the issue asks.
const PEAK_RSS_LIMIT: u64 = 100 * 1024 * 1024;

/// This process's peak resident memory so far, in bytes.
fn own_peak_rss() -> u64 {
    peak_rss_of("self")
}

fn peak_rss_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number");
    kib * 1024
}

/// A healthy session in the same process, on its own faye: it publishes numbered messages
/// and receives each one, for as long as the hostile test runs.
struct Neighbour {
    stop: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<u64>,
    _faye: BayeuxServer,
}

impl Neighbour {
    async fn start() -> Neighbour {
        let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
        let subscriber = support::peer::open(Client::builder(faye.url())).await;
        subscriber.subscribe("/neighbour").await.expect("subscribe");
        let publisher =
            support::peer::open(Client::builder(faye.url()).connection_types([ConnectionType::LongPolling]))
                .await;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0;
            while !*stopped.borrow_and_update() {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = stopped.changed() => break,
                }
                publisher.publish("/neighbour", json!({ "n": n })).await.expect("the neighbour publishes");
                let message = tokio::time::timeout(WAIT, subscriber.receive())
                    .await
                    .expect("the neighbour's message arrives")
                    .expect("a message");
                assert_eq!(message.data.expect("data").value()["n"], n, "the neighbour's messages in order");
                n += 1;
            }
            publisher.close().await;
            subscriber.close().await;
            n
        });
        Neighbour { stop, task, _faye: faye }
    }

    /// Stops it; it must have exchanged messages the whole time, and this process must
    /// have stayed under the memory limit.
    async fn finish(self) {
        let _ = self.stop.send(true);
        let exchanged = self.task.await.expect("the neighbour was unaffected");
        assert!(exchanged > 0, "the neighbour exchanged messages");
        let peak = own_peak_rss();
        assert!(peak < PEAK_RSS_LIMIT, "peak RSS {} MiB", peak / (1024 * 1024));
    }
}

fn long_polling(url: String) -> Client {
    Client::builder(url)
        .connection_types([ConnectionType::LongPolling])
        .connection_timeout(Some(Duration::from_secs(1)))
        .request_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("options")
}

/// A websocket server that accepts the upgrade, then announces a frame of 100 TB.
struct HugeFrameServer {
    port: u16,
    task: JoinHandle<()>,
}

impl HugeFrameServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let Some(key) = support::fake::read_head(&mut reader, "sec-websocket-key").await else {
                        return;
                    };
                    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                    let mut frame = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    )
                    .into_bytes();
                    // A final text frame with a 64-bit length.
                    frame.extend([0x81, 127]);
                    frame.extend(100_000_000_000_000u64.to_be_bytes());
                    frame.extend(b"[{\"channel\":\"/x\"");
                    let stream = reader.get_mut();
                    if stream.write_all(&frame).await.is_ok() {
                        let mut rest = [0u8; 1024];
                        while stream.read(&mut rest).await.is_ok_and(|read| read > 0) {}
                    }
                });
            }
        });
        HugeFrameServer { port, task }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/cometd", self.port)
    }
}

impl Drop for HugeFrameServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The daemon's peak resident memory, in bytes.
fn peak_rss(daemon: &Daemon) -> u64 {
    peak_rss_of(&daemon.child.id().expect("running").to_string())
}

/// Three sources whose servers answer too much (a declared 100 TB body, an endless
/// chunked body, a 100 TB websocket frame) and one healthy source in the same daemon:
/// the daemon stays up and small, names the limit, and the healthy source delivers all.
#[tokio::test]
async fn answers_larger_than_max_message_size_are_refused_and_the_rest_of_the_bridge_carries_on() {
    let declared = FakeServer::start(Behaviour::HugeDeclaredLength).await;
    let endless = FakeServer::start(Behaviour::EndlessChunked).await;
    let frame = HugeFrameServer::start().await;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let mut receiver = WebhookReceiver::start([]).await;
    let state = tempfile::tempdir().expect("state");
    let mut config =
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n", state.path().display());
    for (name, url, kind) in [
        ("declared", declared.url(), "long-polling"),
        ("endless", endless.url(), "long-polling"),
        ("frame", frame.url(), "websocket"),
        ("healthy", faye.url(), "long-polling"),
    ] {
        // The default limit (16 MiB), and a lower one set in the configuration.
        let limit = if name == "frame" { "max_message_size = \"4MiB\"\n" } else { "" };
        config.push_str(&format!(
            "[[sources]]\nname = \"{name}\"\nurl = \"{url}\"\nconnection_types = [\"{kind}\"]\n{limit}"
        ));
        let subscription = webhook(&format!("{name}-hook"), &format!("/{name}"), &receiver.url());
        config.push_str(&subscription.replace("source = \"demo\"", &format!("source = \"{name}\"")));
    }
    let file = state.path().join("config.toml");
    std::fs::write(&file, config).expect("write config");
    let mut daemon = Daemon::start(&file).await;
    daemon.wait_for_log("subscribed").await;

    publish_paced(faye.url(), "/healthy", 0..100, 200).await;
    let seen = delivered(&mut receiver, 100).await;
    assert_eq!(seen.len(), 100, "the healthy source delivered every message");

    let http = support::http_client();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let sources: Vec<Value> = http
            .get(format!("http://{}/api/v1/sources", daemon.admin))
            .send()
            .await
            .expect("the admin API answers")
            .bytes()
            .await
            .map(|bytes| serde_json::from_slice(&bytes).expect("JSON"))
            .expect("a body");
        let refused: Vec<&str> = sources
            .iter()
            .filter(|source| {
                source["last_error"].as_str().is_some_and(|error| error.contains("max_message_size"))
            })
            .filter_map(|source| source["name"].as_str())
            .collect();
        if refused.len() == 3 {
            assert!(!refused.contains(&"healthy"), "{sources:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "each hostile source names the limit: {sources:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(daemon.child.try_wait().expect("status").is_none(), "the daemon is still running");
    let peak = peak_rss(&daemon);
    assert!(peak < PEAK_RSS_LIMIT, "peak RSS {} MiB", peak / (1024 * 1024));
}

/// The same answers to the client alone, with its default limit (16 MiB): `open` fails
/// with a transport error naming the limit, the process stays small, and a healthy session
/// beside it carries on.
#[tokio::test]
async fn the_client_refuses_answers_over_its_default_limit() {
    let neighbour = Neighbour::start().await;
    let declared = FakeServer::start(Behaviour::HugeDeclaredLength).await;
    let endless = FakeServer::start(Behaviour::EndlessChunked).await;
    let frame = HugeFrameServer::start().await;
    for (url, kind) in [
        (declared.url(), ConnectionType::LongPolling),
        (endless.url(), ConnectionType::LongPolling),
        (frame.url(), ConnectionType::WebSocket),
    ] {
        let client = Client::builder(&url)
            .connection_types([kind])
            .connection_timeout(Some(Duration::from_secs(2)))
            .backoff(Duration::from_millis(100), Duration::from_millis(500))
            .build()
            .expect("options");
        let error =
            tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("refused");
        assert_eq!(
            error.transport_kind(),
            Some(&TransportErrorKind::TooLarge { limit: cometd_bridge::cometd::DEFAULT_MAX_MESSAGE_SIZE }),
            "{url}: {error}"
        );
        assert!(error.to_string().contains("max_message_size"), "{error}");
    }
    neighbour.finish().await;
}

/// A websocket server that answers the handshake and the first connect, then never reads
/// again: the client's writes fill the socket's buffers and block.
async fn start_deaf_websocket_server() -> (String, JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://127.0.0.1:{}/cometd", listener.local_addr().expect("address").port());
    let task = tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else { return };
        let mut socket = tokio_tungstenite::accept_async(stream).await.expect("upgrade");
        for _ in 0..2 {
            let Some(Ok(Frame::Text(text))) = socket.next().await else { return };
            let requests: Vec<Value> = serde_json::from_str(&text).expect("a Bayeux payload");
            let replies: Vec<Value> = requests
                .iter()
                .map(|request| {
                    json!({"channel": request["channel"], "id": request["id"], "successful": true,
                        "clientId": "deaf", "version": "1.0", "supportedConnectionTypes": ["websocket"],
                        "advice": {"reconnect": "retry", "interval": 0, "timeout": 60000}})
                })
                .collect();
            socket.send(Frame::text(Value::Array(replies).to_string())).await.expect("reply");
        }
        // Holds the socket open and reads nothing more.
        std::future::pending::<()>().await;
    });
    (url, task)
}

/// Writes to a server that stopped reading used to block for ever; now each gives up
/// after `request_timeout`.
#[tokio::test]
async fn a_write_the_server_never_takes_fails_after_the_request_timeout() {
    let neighbour = Neighbour::start().await;
    let (url, server) = start_deaf_websocket_server().await;
    let client = Client::builder(url)
        .connection_types([ConnectionType::WebSocket])
        .request_timeout(Duration::from_millis(500))
        .build()
        .expect("options");
    client.open().await.expect("open");
    // Sixteen 1 MiB publishes at once: more than loopback's buffers take, so a write
    // blocks while holding the socket, and the timed-out requests reset the socket.
    let big = json!("x".repeat(1024 * 1024));
    let publishes: Vec<_> = (0..16).map(|_| client.publish("/deaf", big.clone())).collect();
    let results = tokio::time::timeout(WAIT, futures_util::future::join_all(publishes))
        .await
        .expect("no publish hangs on a socket the server stopped reading");
    for result in results {
        let error = result.expect_err("a deaf server answers nothing");
        assert!(
            matches!(
                error.transport_kind(),
                Some(TransportErrorKind::RequestTimeout | TransportErrorKind::ConnectionClosed)
            ),
            "{error}"
        );
    }
    tokio::time::timeout(WAIT, client.close()).await.expect("close does not hang on the deaf socket");
    server.abort();
    neighbour.finish().await;
}

/// A server that accepts every handshake and forgets the session at every connect used to
/// keep `open` looping for ever.
#[tokio::test]
async fn open_gives_up_at_connection_timeout_when_every_connect_says_unknown_client() {
    let neighbour = Neighbour::start().await;
    let server = FakeServer::start(Behaviour::UnknownClient).await;
    let client = long_polling(server.url());
    let error =
        tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("no session");
    assert!(error.to_string().contains("connect request failed"), "{error}");
    assert!(client.is_closed());
    neighbour.finish().await;
}

/// A server that never answers: `open` gives up at `connection_timeout`, not after a
/// request timeout per connection type.
#[tokio::test]
async fn open_gives_up_at_connection_timeout_when_the_server_never_answers() {
    let neighbour = Neighbour::start().await;
    let server = FakeServer::start(Behaviour::Blackhole).await;
    let client = Client::builder(server.url())
        .connection_timeout(Some(Duration::from_secs(1)))
        .request_timeout(Duration::from_secs(30))
        .build()
        .expect("options");
    let error = tokio::time::timeout(Duration::from_secs(5), client.open())
        .await
        .expect("open gives up within the connection timeout, far before the request timeout")
        .expect_err("no answer");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::ConnectionTimeout), "{error}");
    server.wait_for_open_connections(0).await;
    neighbour.finish().await;
}

/// Dropping `open`'s future stops the attempt: its connection closes.
#[tokio::test]
async fn dropping_open_stops_the_attempt() {
    let neighbour = Neighbour::start().await;
    let server = FakeServer::start(Behaviour::Blackhole).await;
    for (kind, url) in [
        (ConnectionType::LongPolling, server.url()),
        (ConnectionType::WebSocket, server.url().replace("http://", "ws://")),
    ] {
        let client =
            Client::builder(url).connection_types([kind]).connection_timeout(None).build().expect("options");
        let mut opening = Box::pin(client.open());
        tokio::select! {
            _ = server.wait_for_open_connections(1) => {}
            result = &mut opening => panic!("{kind}: open ended against a silent server: {result:?}"),
        }
        drop(opening);
        server.wait_for_open_connections(0).await;
        assert!(client.is_closed(), "{kind}");
    }
    neighbour.finish().await;
}

/// A publish made while the link is down fails after `request_timeout` instead of waiting
/// for the outage to end.
#[tokio::test]
async fn a_command_issued_while_reconnecting_fails_after_the_request_timeout() {
    let neighbour = Neighbour::start().await;
    let server = FakeServer::start(Behaviour::Valid).await;
    let client = Client::builder(server.url())
        .connection_types([ConnectionType::LongPolling])
        .connection_timeout(None)
        .request_timeout(Duration::from_millis(500))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("options");
    client.open().await.expect("open");
    server.set(Behaviour::Http500);
    wait_for_state(&client, SessionState::Reconnecting).await;
    let error = tokio::time::timeout(WAIT, client.publish("/during/outage", json!(1)))
        .await
        .expect("the publish gives up")
        .expect_err("not sent");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::RequestTimeout), "{error}");
    server.set(Behaviour::Valid);
    wait_for_state(&client, SessionState::Connected).await;
    client.publish("/after/outage", json!(2)).await.expect("sent once connected");
    client.close().await;
    neighbour.finish().await;
}

/// Drops every outgoing `/meta/subscribe`.
struct DropsSubscribes;

#[async_trait]
impl Extension for DropsSubscribes {
    async fn outgoing(&self, payload: &mut Vec<Message>, _headers: &mut HeaderMap) -> Result<(), Error> {
        payload.retain(|message| message.channel != "/meta/subscribe");
        Ok(())
    }
}

/// Never finishes its outgoing hook for a `/meta/subscribe` (a login that hangs, say).
struct HangsOnSubscribe;

#[async_trait]
impl Extension for HangsOnSubscribe {
    async fn outgoing(&self, payload: &mut Vec<Message>, _headers: &mut HeaderMap) -> Result<(), Error> {
        if payload.iter().any(|message| message.channel == "/meta/subscribe") {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// An extension hook that never finishes fails its request after `request_timeout`; the
/// session goes on.
#[tokio::test]
async fn a_hanging_extension_hook_fails_its_request_after_the_request_timeout() {
    let neighbour = Neighbour::start().await;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    for kind in [ConnectionType::LongPolling, ConnectionType::WebSocket] {
        let client = Client::builder(faye.url())
            .connection_types([kind])
            .request_timeout(Duration::from_millis(500))
            .extension(HangsOnSubscribe)
            .build()
            .expect("options");
        client.open().await.expect("open");
        let error = tokio::time::timeout(WAIT, client.subscribe("/hangs"))
            .await
            .expect("the subscribe gives up")
            .expect_err("the hook never finished");
        assert_eq!(error.transport_kind(), Some(&TransportErrorKind::RequestTimeout), "{kind}: {error}");
        assert!(
            cometd_bridge::telemetry::error_chain(&error)
                .contains("extension hooks took longer than request_timeout"),
            "{kind}: {}",
            cometd_bridge::telemetry::error_chain(&error)
        );
        client.publish("/still/works", json!(1)).await.expect("the session goes on");
        client.close().await;
    }
    neighbour.finish().await;
}

/// Panics on an incoming message whose data is `"boom"`.
struct PanicsOnBoom;

#[async_trait]
impl Extension for PanicsOnBoom {
    async fn incoming(&self, payload: &mut Vec<Message>, _headers: Option<&HeaderMap>) -> Result<(), Error> {
        if payload.iter().any(|message| message.data.as_ref().is_some_and(|data| data.json() == "\"boom\"")) {
            // A panic without the panic hook: a backtrace printed (and symbolised) here
            // would weigh on this process's peak memory, which the tests check.
            std::panic::resume_unwind(Box::new("boom in an extension"));
        }
        Ok(())
    }
}

#[tokio::test]
async fn an_extension_that_drops_a_request_is_an_error_and_the_session_goes_on() {
    let neighbour = Neighbour::start().await;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    for kind in [ConnectionType::LongPolling, ConnectionType::WebSocket] {
        let client = Client::builder(faye.url())
            .connection_types([kind])
            .extension(DropsSubscribes)
            .build()
            .expect("options");
        client.open().await.expect("open");
        let error = client.subscribe("/dropped").await.expect_err("the extension dropped it");
        assert_eq!(error.kind(), ErrorKind::ClientInvalidOperation, "{kind}: {error}");
        assert!(error.to_string().contains("extension"), "{kind}: {error}");
        client.publish("/still/works", json!(1)).await.expect("the session goes on");
        assert_eq!(client.status().state, SessionState::Connected);
        client.close().await;
    }
    neighbour.finish().await;
}

/// A panic in the session task (here in an extension's incoming hook on long-polling)
/// closes the client with the cause: `receive` returns it, then `Closed`, instead of
/// spinning while `status` says connected. On websocket the reader's panic drops the
/// socket and the session reconnects.
#[tokio::test]
async fn a_panicking_extension_closes_the_client_with_the_cause() {
    let neighbour = Neighbour::start().await;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let client = Arc::new(
        Client::builder(faye.url())
            .connection_types([ConnectionType::LongPolling])
            .extension(PanicsOnBoom)
            .build()
            .expect("options"),
    );
    client.open().await.expect("open");
    client.subscribe("/boom").await.expect("subscribe");
    let publisher =
        support::peer::open(Client::builder(faye.url()).connection_types([ConnectionType::LongPolling]))
            .await;
    publisher.publish("/boom", json!("boom")).await.expect("publish");
    let first = tokio::time::timeout(WAIT, client.receive()).await.expect("receive returns");
    let error = first.expect_err("the session failed");
    assert!(matches!(error, Error::SessionFailed(_)), "{error:?}");
    assert!(error.to_string().contains("boom in an extension"), "{error}");
    let status = client.status();
    assert_eq!(status.state, SessionState::Closed);
    assert!(status.last_error.as_deref().is_some_and(|error| error.contains("boom")), "{status:?}");
    let next = tokio::time::timeout(WAIT, client.receive()).await.expect("receive returns");
    assert!(matches!(next, Err(Error::Closed)), "{next:?}");
    publisher.close().await;
    neighbour.finish().await;
}

/// D4: a websocket consumer slower than the server's hold. The reader stops reading while
/// the pending queue is full, so the held `/meta/connect`'s answer waits behind events;
/// the connect used to time out and reset the socket with those events in it.
#[tokio::test]
async fn a_slow_consumer_on_websocket_loses_nothing_behind_a_held_connect() {
    let neighbour = Neighbour::start().await;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(1), ..FayeOptions::default() }).await;
    let client = Client::builder(faye.url())
        .connection_types([ConnectionType::WebSocket])
        .max_pending_count(5)
        .build()
        .expect("options");
    client.open().await.expect("open");
    client.subscribe("/slow").await.expect("subscribe");
    publish_paced(faye.url(), "/slow", 0..40, 1000).await;
    // The application is busy for longer than hold × 1.2 + 2 s (3.2 s here).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut numbers = Vec::new();
    while numbers.len() < 40 {
        let message = tokio::time::timeout(WAIT, client.receive())
            .await
            .unwrap_or_else(|_| panic!("only {} of 40 arrived: {numbers:?}", numbers.len()))
            .expect("a message");
        numbers.push(message.data.expect("data").value()["n"].as_u64().expect("numbered"));
    }
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    client.close().await;
    neighbour.finish().await;
}

/// A websocket server that answers the handshake and connects, never answers
/// `/meta/subscribe`, and from then on floods events (bounded: 200 MB at most). It says
/// when a write of its has waited a second: the client stopped reading and TCP pushed back.
async fn start_flooding_websocket_server(event: String) -> (String, tokio::sync::oneshot::Receiver<bool>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Frame;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://127.0.0.1:{}/cometd", listener.local_addr().expect("address").port());
    let (pushed_back, outcome) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else { return };
        let socket = tokio_tungstenite::accept_async(stream).await.expect("upgrade");
        let (mut writer, mut reader) = socket.split();
        while let Some(Ok(Frame::Text(text))) = reader.next().await {
            let requests: Vec<Value> = serde_json::from_str(&text).expect("a Bayeux payload");
            if requests.iter().any(|request| request["channel"] == "/meta/subscribe") {
                break; // never answered
            }
            let replies: Vec<Value> = requests
                .iter()
                .map(|request| {
                    json!({"channel": request["channel"], "id": request["id"], "successful": true,
                        "clientId": "flooded", "version": "1.0", "supportedConnectionTypes": ["websocket"],
                        "advice": {"reconnect": "retry", "interval": 0, "timeout": 60000}})
                })
                .collect();
            writer.send(Frame::text(Value::Array(replies).to_string())).await.expect("reply");
        }
        let frame = format!("[{}]", vec![event; 10].join(","));
        let mut blocked = false;
        for _ in 0..200 * 1024 * 1024 / frame.len() {
            let send = writer.send(Frame::text(frame.clone()));
            match tokio::time::timeout(Duration::from_secs(1), send).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
        }
        let _ = pushed_back.send(blocked);
        // Holds the socket open; the client reads on only if it wants to.
        std::future::pending::<()>().await;
    });
    (url, outcome)
}

/// Memory is bounded by `max_pending_count` plus one server batch (`max_message_size`)
/// whatever the server sends while a request waits: the websocket reader stops reading
/// and lets TCP push back (it used to read on for as long as the subscribe waited).
#[tokio::test]
async fn a_flood_while_a_subscribe_waits_stays_bounded() {
    const LIMIT: usize = 100;
    const BATCH: usize = 64 * 1024;
    let neighbour = Neighbour::start().await;
    let event = json!({"channel": "/flood", "data": {"text": "x".repeat(60)}}).to_string();
    let (url, pushed_back) = start_flooding_websocket_server(event.clone()).await;
    let client = Client::builder(url)
        .connection_types([ConnectionType::WebSocket])
        .max_pending_count(LIMIT as i64)
        .max_message_size(BATCH)
        .request_timeout(Duration::from_secs(20))
        .build()
        .expect("options");
    client.open().await.expect("open");
    let waiting = client.clone();
    let subscribe = tokio::spawn(async move { waiting.subscribe("/flood").await });
    let pushed_back = tokio::time::timeout(Duration::from_secs(60), pushed_back)
        .await
        .expect("the flood ends or is pushed back")
        .expect("the server ran");
    assert!(pushed_back, "the client read all 200 MB; {} pending", client.pending_count());
    // The limit, one batch's worth of these events past it, and the frame that crossed it.
    let bound = LIMIT + BATCH / event.len() + 10;
    assert!(client.pending_count() <= bound, "{} pending, over {bound}", client.pending_count());
    subscribe.abort();
    drop(client); // its disconnect would wait behind the flood
    neighbour.finish().await;
}
