//! Salesforce's ways with a session, from a scripted fake server (what the Salesforce-like
//! faye fixture cannot do on demand): a `/meta/disconnect` it sends on its own, and a
//! body limit of 32 KiB (Salesforce answers 413 above it) with many subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType, SessionState};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::support::peer::{WAIT, open};
use crate::support::scripted::{Script, ScriptedServer};

const CHANNELS: usize = 300;

/// A server-sent `/meta/disconnect` is followed by a new handshake and every one of 300
/// subscriptions back, in payloads under 32 KiB.
async fn a_server_disconnect_brings_a_new_handshake_and_every_subscription(kind: ConnectionType) {
    let armed = Arc::new(AtomicBool::new(false));
    let disconnected = Arc::new(AtomicBool::new(false));
    let (resubscribed_tx, mut resubscribed) = watch::channel(0usize);
    let (armed_in, disconnected_in) = (armed.clone(), disconnected.clone());
    let script: Script = Arc::new(move |request: &Value| {
        match request["channel"].as_str() {
            Some("/meta/connect")
                if request["advice"]["timeout"] != json!(0) && armed_in.swap(false, Ordering::SeqCst) =>
            {
                disconnected_in.store(true, Ordering::SeqCst);
                let connect = json!({"channel": "/meta/connect", "id": request["id"], "successful": true});
                return Some(format!(
                    "{connect},{}",
                    json!({"channel": "/meta/disconnect", "successful": true})
                ));
            }
            Some("/meta/subscribe") if disconnected_in.load(Ordering::SeqCst) => {
                resubscribed_tx.send_modify(|count| *count += 1);
            }
            _ => {}
        }
        None
    });
    let server = ScriptedServer::start(script).await;
    let client =
        open(Client::builder(server.url()).connection_types([kind]).request_timeout(Duration::from_secs(10)))
            .await;
    let channels: Vec<String> =
        (0..CHANNELS).map(|n| format!("/event/Order_Change_Event_Number_{n:04}__e")).collect();
    for channel in &channels {
        client.subscribe(channel).await.expect("subscribe");
    }
    armed.store(true, Ordering::SeqCst);
    tokio::time::timeout(WAIT, resubscribed.wait_for(|count| *count >= CHANNELS))
        .await
        .expect("every channel subscribed again")
        .expect("the server runs");
    let mut status = client.watch_status().expect("open");
    tokio::time::timeout(
        WAIT,
        status.wait_for(|status| {
            status.state == SessionState::Connected && status.subscriptions.len() == CHANNELS
        }),
    )
    .await
    .expect("connected with every subscription")
    .expect("the session runs");
    let requests = server.requests();
    let handshakes = requests.iter().filter(|request| request["channel"] == "/meta/handshake").count();
    assert_eq!(handshakes, 2, "{kind}: a new handshake after the server's disconnect");
    let sizes = server.payload_sizes();
    let largest = sizes.iter().max().copied().unwrap_or_default();
    assert!(largest < 32 * 1024, "{kind}: a payload of {largest} bytes");
    assert_eq!(*resubscribed.borrow(), CHANNELS, "{kind}: each channel once");
    client.close().await;
}

#[tokio::test]
async fn a_server_disconnect_on_long_polling() {
    a_server_disconnect_brings_a_new_handshake_and_every_subscription(ConnectionType::LongPolling).await;
}

#[tokio::test]
async fn a_server_disconnect_on_websocket() {
    a_server_disconnect_brings_a_new_handshake_and_every_subscription(ConnectionType::WebSocket).await;
}

/// Handshakes denied for the concurrent-client limit (`403::Handshake denied`, the reason
/// in `ext.sfdc.failureReason`), again and again: one attempt per (longest) backoff step,
/// never a storm, and the status says why.
#[tokio::test]
async fn denied_handshakes_back_off_and_say_why() {
    const DENIALS: usize = 6;
    const STEP: Duration = Duration::from_millis(300);
    let deny = Arc::new(AtomicBool::new(false));
    let (denied_tx, mut denied) = watch::channel(0usize);
    let deny_in = deny.clone();
    let script: Script = Arc::new(move |request: &Value| {
        if !deny_in.load(Ordering::SeqCst) {
            return None;
        }
        match request["channel"].as_str() {
            Some("/meta/connect") => Some(
                json!({"channel": "/meta/connect", "id": request["id"], "successful": false,
                    "error": "403::Unknown client", "advice": {"reconnect": "handshake"}})
                .to_string(),
            ),
            Some("/meta/handshake") => {
                denied_tx.send_modify(|count| *count += 1);
                Some(
                    json!({"channel": "/meta/handshake", "id": request["id"], "successful": false,
                        "error": "403::Handshake denied",
                        "ext": {"sfdc": {"failureReason": "403::Organization concurrent user limit exceeded"}},
                        "advice": {"reconnect": "handshake"}})
                    .to_string(),
                )
            }
            _ => None,
        }
    });
    let server = ScriptedServer::start(script).await;
    let client = open(
        Client::builder(server.url())
            .connection_types([ConnectionType::LongPolling])
            .backoff(Duration::from_millis(20), STEP),
    )
    .await;
    deny.store(true, Ordering::SeqCst);
    tokio::time::timeout(WAIT, denied.wait_for(|count| *count >= 1)).await.expect("denied").expect("runs");
    let first = tokio::time::Instant::now();
    tokio::time::timeout(WAIT, denied.wait_for(|count| *count >= DENIALS))
        .await
        .expect("denied")
        .expect("runs");
    let elapsed = first.elapsed();
    assert!(
        elapsed >= STEP * (DENIALS as u32 - 1),
        "{DENIALS} handshakes within {elapsed:?}: more than one per backoff step of {STEP:?}"
    );
    let last_error = client.status().last_error.expect("the denial is kept");
    assert!(
        last_error.contains("403::Handshake denied") && last_error.contains("concurrent user limit exceeded"),
        "{last_error}"
    );
    client.close().await;
}
