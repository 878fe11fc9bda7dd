//! What a server sends is bounded before the client keeps it: a `clientId` over 1 KiB
//! fails the handshake, an `error` text is kept and reported up to 4 KiB. From a scripted
//! fake server, since no real one sends such values.

use std::sync::Arc;
use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType, SessionState, TransportErrorKind};
use serde_json::{Value, json};

use crate::support::peer::{WAIT, wait_for_state};
use crate::support::scripted::{Script, ScriptedServer};

fn client(server: &ScriptedServer, kind: ConnectionType) -> Client {
    Client::builder(server.url())
        .connection_types([kind])
        .connection_timeout(Some(Duration::from_secs(5)))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .build()
        .expect("options")
}

#[tokio::test]
async fn a_client_id_over_1_kib_fails_the_handshake() {
    for kind in [ConnectionType::LongPolling, ConnectionType::WebSocket] {
        let script: Script = Arc::new(|request: &Value| {
            (request["channel"] == "/meta/handshake").then(|| {
                json!({"channel": "/meta/handshake", "id": request["id"], "successful": true,
                    "clientId": "c".repeat(2 * 1024 * 1024), "version": "1.0",
                    "supportedConnectionTypes": ["long-polling", "websocket"]})
                .to_string()
            })
        });
        let server = ScriptedServer::start(script).await;
        let client = client(&server, kind);
        let error =
            tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("refused");
        assert!(
            matches!(error.transport_kind(), Some(TransportErrorKind::InvalidOperation(_))),
            "{kind}: {error}"
        );
        assert_eq!(
            error.to_string(),
            "the server sent a clientId of 2097152 bytes, over the 1024-byte limit",
            "{kind}"
        );
        let connects =
            server.requests().iter().filter(|request| request["channel"] == "/meta/connect").count();
        assert_eq!(connects, 0, "{kind}: the client id was never used");
    }
}

/// `code::` and 16 KiB of text: kept up to 4 KiB, with a marker of what was cut.
fn long_error() -> String {
    format!("500::{}", "e".repeat(16 * 1024))
}

fn assert_bounded(text: &str) {
    assert!(text.len() < 4 * 1024 + 200, "{} bytes kept", text.len());
    assert!(
        text.ends_with(&format!("… ({} more bytes)", long_error().len() - 4 * 1024)),
        "{}",
        &text[4000..]
    );
}

#[tokio::test]
async fn a_servers_error_text_is_kept_up_to_4_kib() {
    // A refused handshake: open's error.
    let script: Script = Arc::new(|request: &Value| {
        (request["channel"] == "/meta/handshake").then(|| {
            json!({"channel": "/meta/handshake", "id": request["id"], "successful": false,
                "error": format!("403::{}", "e".repeat(16 * 1024)), "advice": {"reconnect": "none"}})
            .to_string()
        })
    });
    let server = ScriptedServer::start(script).await;
    let error = tokio::time::timeout(WAIT, client(&server, ConnectionType::LongPolling).open())
        .await
        .expect("open gives up")
        .expect_err("refused");
    assert_bounded(&error.to_string());

    // A refused connect once open: the status's last error.
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refusing = refuse.clone();
    let script: Script = Arc::new(move |request: &Value| {
        (request["channel"] == "/meta/connect" && refusing.load(std::sync::atomic::Ordering::SeqCst)).then(
            || {
                json!({"channel": "/meta/connect", "id": request["id"], "successful": false,
                "error": long_error(), "advice": {"reconnect": "retry", "interval": 0}})
                .to_string()
            },
        )
    });
    let server = ScriptedServer::start(script).await;
    let client = client(&server, ConnectionType::LongPolling);
    tokio::time::timeout(WAIT, client.open()).await.expect("open finishes").expect("open");
    refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for_state(&client, SessionState::Reconnecting).await;
    let last_error = client.status().last_error.expect("the refusal is kept");
    assert!(last_error.starts_with("connect request failed: 500::eee"), "{}", &last_error[..60]);
    assert_bounded(&last_error);
    client.close().await;
}
