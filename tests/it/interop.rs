//! Interop with the Python reference, aiocometd 0.4.5 (from PyPI, in `.tools/venv`, run by
//! `tests/peers/aiocometd_peer.py`), through faye: each side receives what the other sends.

use std::process::Stdio;

use cometd_bridge::cometd::{Client, ConnectionType, Data};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::peer::{WAIT, next, open};
use crate::support::project_dir;

fn aiocometd(args: &[&str]) -> Command {
    let python = project_dir().join(".tools/venv/bin/python");
    assert!(
        python.is_file(),
        "aiocometd's virtualenv is missing ({}); run `scripts/setup.sh`",
        python.display()
    );
    let mut command = Command::new(python);
    command.arg(project_dir().join("tests/peers/aiocometd_peer.py")).args(args).kill_on_drop(true);
    command
}

const TRANSPORTS: [(ConnectionType, &str); 2] =
    [(ConnectionType::WebSocket, "websocket"), (ConnectionType::LongPolling, "long-polling")];

#[tokio::test]
async fn aiocometd_receives_what_this_client_publishes() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    for (kind, name) in TRANSPORTS {
        let mut listener = aiocometd(&["listen", &server.url(), "/interop/py", "2", "--transport", name])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start aiocometd");
        let mut lines = BufReader::new(listener.stdout.take().expect("stdout")).lines();
        let ready =
            tokio::time::timeout(WAIT, lines.next_line()).await.expect("READY in time").expect("stdout");
        assert_eq!(ready.as_deref(), Some("READY"));

        let client = open(Client::builder(server.url()).connection_types([kind])).await;
        for n in 1..=2 {
            client.publish("/interop/py", json!({ "n": n })).await.expect("publish");
        }
        for n in 1..=2 {
            let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a line").expect("stdout");
            let message: Value = serde_json::from_str(&line.expect("not EOF")).expect("JSON");
            assert_eq!(message["channel"], "/interop/py", "{name}");
            assert_eq!(message["data"], json!({ "n": n }), "{name}");
        }
        let status = tokio::time::timeout(WAIT, listener.wait()).await.expect("exits").expect("status");
        assert!(status.success(), "{name}: aiocometd exited with {status}");
    }
}

#[tokio::test]
async fn this_client_receives_what_aiocometd_publishes() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    for (kind, name) in TRANSPORTS {
        let client = open(Client::builder(server.url()).connection_types([kind])).await;
        client.subscribe("/interop/rust").await.expect("subscribe");
        for n in 1..=2 {
            let data = json!({ "n": n }).to_string();
            let output = tokio::time::timeout(
                WAIT,
                aiocometd(&["publish", &server.url(), "/interop/rust", &data, "--transport", name]).output(),
            )
            .await
            .expect("aiocometd publishes in time")
            .expect("run aiocometd");
            assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
            let reply: Value = serde_json::from_slice(&output.stdout).expect("the reply is JSON");
            assert_eq!(reply["successful"], true);
        }
        for n in 1..=2 {
            let message = next(&client).await.expect("message");
            assert_eq!(
                (message.channel.as_str(), message.data.map(Data::into_value)),
                ("/interop/rust", Some(json!({ "n": n })))
            );
        }
    }
}
