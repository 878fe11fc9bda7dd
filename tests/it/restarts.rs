//! `listen` (the binary) through repeated server restarts under a steady publisher: it
//! stays up, says when it reconnects, and resubscribes every time; the bridge on a replay
//! source through the same restarts loses nothing.
//!
//! The issue asks for 20 restarts (down 0.5–3 s, up 2–5 s); that is about two minutes a
//! set-up, so the normal suite does 5 and `COMETD_RESTARTS=20` does the full run.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use crate::support::bayeux::{BayeuxServer, CometdOptions, FayeOptions};
use crate::support::peer::WAIT;

/// Restarts in the normal suite.
const DEFAULT_RESTARTS: u64 = 5;

fn restarts() -> u64 {
    std::env::var("COMETD_RESTARTS").ok().and_then(|value| value.parse().ok()).unwrap_or(DEFAULT_RESTARTS)
}

/// The down and up durations of restart `k`: spread over 0.5–3 s and 2–5 s, the same on
/// every run.
fn periods(k: u64) -> (Duration, Duration) {
    let down = 500 + (k * 977 + 311) % 2500;
    let up = 2000 + (k * 1531 + 701) % 3000;
    (Duration::from_millis(down), Duration::from_millis(up))
}

/// The ticks the server accepted (answered the publish of).
type Accepted = Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>;

/// Publishes `{"n": k}` on `/tick` ten times a second, numbering every attempt and
/// recording in `accepted` those the server answered; while the server is down the
/// attempts fail and are skipped.
fn ticker(url: String, ticks: Arc<AtomicU64>, accepted: Accepted) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = cometd_bridge::cometd::Client::builder(url)
            .connection_types([cometd_bridge::cometd::ConnectionType::LongPolling])
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .connection_timeout(Some(Duration::from_secs(60)))
            .build()
            .expect("valid options");
        client.open().await.expect("the ticker opens");
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
            let sent = client.publish("/tick", json!({ "n": n }));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), sent).await {
                accepted.lock().expect("not poisoned").insert(n);
            }
        }
    })
}

async fn listen_survives_restarts(mut server: BayeuxServer, transport: &str) {
    let restarts = restarts();
    let mut listener = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
        .args(["listen", &server.url(), "/tick", "--transport", transport, "--connection-timeout", "10s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start listen");
    let mut stderr = BufReader::new(listener.stderr.take().expect("stderr")).lines();
    let ready = format!("listening on /tick ({transport})");
    tokio::time::timeout(WAIT, async {
        while let Some(line) = stderr.next_line().await.expect("stderr") {
            if line == ready {
                return;
            }
        }
        panic!("listen exited before it was ready");
    })
    .await
    .expect("ready line");
    let (reconnects_tx, reconnects) = watch::channel(0u64);
    let (log_tx, log) = watch::channel(String::new());
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.starts_with("reconnected") {
                reconnects_tx.send_modify(|count| *count += 1);
            }
            log_tx.send_modify(|log| {
                log.push_str(&line);
                log.push('\n');
            });
        }
    });
    let (printed_tx, printed) = watch::channel(0u64);
    let mut stdout = BufReader::new(listener.stdout.take().expect("stdout")).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            let message: Value = serde_json::from_str(&line).expect("one JSON message a line");
            let n = message["data"]["n"].as_u64().expect("a numbered tick");
            printed_tx.send_modify(|last| *last = (*last).max(n));
        }
    });
    let ticks = Arc::new(AtomicU64::new(0));
    let ticking = ticker(server.url(), ticks.clone(), Accepted::default());

    let delivered_after = |mut printed: watch::Receiver<u64>, after: u64, what: String| {
        let log = log.clone();
        async move {
            let waited = tokio::time::timeout(WAIT, printed.wait_for(|last| *last > after)).await;
            assert!(
                waited.is_ok(),
                "{what}: no tick after {after} printed; listen's stderr:\n{}",
                log.borrow().as_str()
            );
        }
    };
    delivered_after(printed.clone(), 0, "before the first restart".into()).await;
    for k in 0..restarts {
        let (down, up) = periods(k);
        server.process().stop().await;
        tokio::time::sleep(down).await;
        server.process().restart().await;
        let up_since = tokio::time::Instant::now();
        let at_restart = ticks.load(Ordering::SeqCst);
        delivered_after(printed.clone(), at_restart, format!("restart {}", k + 1)).await;
        assert!(
            listener.try_wait().expect("listen's status").is_none(),
            "listen exited at restart {}; stderr:\n{}",
            k + 1,
            log.borrow().as_str()
        );
        tokio::time::sleep_until(up_since + up).await;
    }
    assert!(
        listener.try_wait().expect("listen's status").is_none(),
        "listen exited:\n{}",
        log.borrow().as_str()
    );
    assert!(
        *reconnects.borrow() >= restarts,
        "listen said it reconnected {} times for {restarts} restarts:\n{}",
        *reconnects.borrow(),
        log.borrow().as_str()
    );
    ticking.abort();
    listener.start_kill().expect("stop listen");
}

#[tokio::test]
async fn listen_survives_cometd_restarts_on_long_polling() {
    let server =
        BayeuxServer::cometd(CometdOptions { timeout: Some(2000), ..CometdOptions::default() }).await;
    listen_survives_restarts(server, "long-polling").await;
}

#[tokio::test]
async fn listen_survives_faye_restarts_on_long_polling() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    listen_survives_restarts(server, "long-polling").await;
}

#[tokio::test]
async fn listen_survives_faye_restarts_on_websocket() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    listen_survives_restarts(server, "websocket").await;
}

/// The bridge on a replay source (the Salesforce-like fixture, its event log kept on disk
/// across restarts as Salesforce keeps its retention) through the same restarts under a
/// numbered ticker: every tick the server accepted is delivered to the webhook, once,
/// including those published while the bridge was reconnecting. (Without the log kept,
/// the ticks published while the bridge reconnected are missing: the test fails.)
#[tokio::test]
async fn the_bridge_with_replay_loses_nothing_across_restarts() {
    use std::collections::BTreeMap;

    use crate::support::app::TestApp;
    use crate::support::webhook::WebhookReceiver;

    const MARKER: u64 = 1_000_000_000;
    let restarts = restarts();
    let dir = tempfile::tempdir().expect("temp dir");
    let fixture = json!({ "logFile": dir.path().join("events.jsonl"), "retention": 1_000_000 });
    let mut server = BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![("salesforce".to_string(), fixture)],
        ..FayeOptions::default()
    })
    .await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&format!(
        "[[sources]]\nname = \"sf\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nreplay = true\n\
         connection_timeout = \"10s\"\n\
         [[subscriptions]]\nid = \"ticks\"\nsource = \"sf\"\nchannel = \"/tick\"\n\
         sink = {{ type = \"webhook\", url = \"{}\" }}\n",
        server.url(),
        receiver.url()
    ))
    .await;
    app.wait_ready().await;

    let accepted = Accepted::default();
    let ticks = Arc::new(AtomicU64::new(0));
    let ticking = ticker(server.url(), ticks.clone(), accepted.clone());
    /// Waits until a tick numbered after `after` is delivered, counting every delivery.
    async fn delivered_after(
        receiver: &mut WebhookReceiver,
        delivered: &mut BTreeMap<u64, usize>,
        after: u64,
    ) {
        while delivered.keys().next_back().is_none_or(|last| *last <= after) {
            let request = receiver.next().await;
            let n = request.json()["data"]["payload"]["n"].as_u64().expect("a numbered tick");
            *delivered.entry(n).or_insert(0) += 1;
        }
    }
    let mut delivered: BTreeMap<u64, usize> = BTreeMap::new();
    delivered_after(&mut receiver, &mut delivered, 0).await;
    for k in 0..restarts {
        let (down, up) = periods(k);
        server.process().stop().await;
        tokio::time::sleep(down).await;
        server.process().restart().await;
        let up_since = tokio::time::Instant::now();
        let at_restart = ticks.load(Ordering::SeqCst);
        delivered_after(&mut receiver, &mut delivered, at_restart).await;
        // Up for its period, counting what arrives meanwhile.
        let remaining = (up_since + up).saturating_duration_since(tokio::time::Instant::now());
        tokio::time::timeout(remaining, delivered_after(&mut receiver, &mut delivered, MARKER))
            .await
            .expect_err("no marker yet");
    }
    ticking.abort();
    let _ = ticking.await;
    let accepted = accepted.lock().expect("not poisoned").clone();
    // A marker after the last tick: whatever was going to arrive has arrived once it has.
    let publisher = crate::support::peer::open(cometd_bridge::cometd::Client::builder(server.url())).await;
    publisher.publish("/tick", json!({ "n": MARKER })).await.expect("the marker");
    publisher.close().await;
    delivered_after(&mut receiver, &mut delivered, MARKER - 1).await;
    let missing: Vec<u64> = accepted.iter().filter(|n| !delivered.contains_key(n)).copied().collect();
    let twice: Vec<(&u64, &usize)> = delivered.iter().filter(|(_, count)| **count > 1).collect();
    assert!(missing.is_empty(), "{} accepted ticks never delivered: {missing:?}", missing.len());
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert!(accepted.len() as u64 > restarts * 10, "the ticker ran: {} accepted", accepted.len());
    let metrics = app.metrics().await;
    let losses =
        crate::support::scenario::metric(&metrics, "cometd_bridge_session_losses_total{source=\"sf\"}");
    assert!(losses >= restarts as f64, "each restart cost the session: {losses}");
    app.stop().await;
}
