//! `listen` (the binary) through repeated server restarts under a steady publisher: it
//! stays up, says when it reconnects, and resubscribes every time.
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

/// Publishes `{"n": k}` on `/tick` ten times a second, numbering every attempt; while the
/// server is down the attempts fail and are skipped.
fn ticker(url: String, ticks: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
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
            let _ =
                tokio::time::timeout(Duration::from_millis(500), client.publish("/tick", json!({ "n": n })))
                    .await;
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
    let ticking = ticker(server.url(), ticks.clone());

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
