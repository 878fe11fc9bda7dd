//! The `listen` and `publish` commands, run as the built binary against faye.

use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::peer::WAIT;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"));
    command.kill_on_drop(true);
    command
}

async fn publish(url: &str, channel: &str, json: &str) -> std::process::Output {
    tokio::time::timeout(WAIT, binary().args(["publish", url, channel, json]).output())
        .await
        .expect("publish finishes")
        .expect("run publish")
}

#[tokio::test]
async fn listen_prints_what_publish_sends() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    for transport in ["websocket", "long-polling"] {
        let mut listener = binary()
            .args(["listen", &server.url(), "/cli/**", "--count", "2", "--transport", transport])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start listen");
        let mut stderr = BufReader::new(listener.stderr.take().expect("stderr")).lines();
        let ready =
            tokio::time::timeout(WAIT, stderr.next_line()).await.expect("ready line").expect("stderr");
        assert_eq!(ready.as_deref(), Some(format!("listening on /cli/** ({transport})").as_str()));

        for n in 1..=2 {
            let output = publish(&server.url(), "/cli/a/b", &format!("{{\"n\":{n}}}")).await;
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            let reply: Value = serde_json::from_slice(&output.stdout).expect("the reply is JSON");
            assert_eq!(reply["successful"], true);
            assert_eq!(reply["channel"], "/cli/a/b");
        }
        let output = tokio::time::timeout(WAIT, listener.wait_with_output())
            .await
            .expect("listen exits after --count")
            .expect("listen output");
        assert!(output.status.success());
        let lines: Vec<Value> = String::from_utf8(output.stdout)
            .expect("UTF-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON message a line"))
            .collect();
        assert_eq!(lines.len(), 2);
        for (n, line) in (1..=2).zip(&lines) {
            assert_eq!(line["channel"], "/cli/a/b");
            assert_eq!(line["data"], json!({ "n": n }));
        }
    }
}

/// `listen` buffers a flood but shows a lone message at once: each line is on stdout while
/// the command is still running, the flood complete and in order.
#[tokio::test]
async fn listen_shows_each_message_while_running_and_keeps_up_with_a_flood() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let mut listener = binary()
        .args(["listen", &server.url(), "/flood", "--transport", "websocket"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start listen");
    let mut stderr = BufReader::new(listener.stderr.take().expect("stderr")).lines();
    tokio::time::timeout(WAIT, stderr.next_line()).await.expect("ready line").expect("stderr");
    let mut stdout = BufReader::new(listener.stdout.take().expect("stdout")).lines();
    let publisher = crate::support::peer::open(cometd_bridge::cometd::Client::builder(server.url())).await;
    async fn line(stdout: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>, expected: u64) {
        let line = tokio::time::timeout(WAIT, stdout.next_line())
            .await
            .expect("the line shows while listen runs")
            .expect("stdout")
            .expect("a line");
        let message: Value = serde_json::from_str(&line).expect("one JSON message a line");
        assert_eq!(message["data"], json!({ "n": expected }));
    }
    publisher.publish("/flood", json!({ "n": 0 })).await.expect("publish");
    line(&mut stdout, 0).await;
    let flood: Vec<_> = (1..=2000).map(|n| publisher.publish("/flood", json!({ "n": n }))).collect();
    for result in futures_util::future::join_all(flood).await {
        result.expect("publish");
    }
    for n in 1..=2000 {
        line(&mut stdout, n).await;
    }
    publisher.close().await;
    listener.start_kill().expect("stop listen");
}

#[tokio::test]
async fn a_rejected_publish_exits_1_with_one_line() {
    let server = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let output = publish(&server.url(), "/not a channel", "1").await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("publish request failed: 405:/not a channel:Invalid channel"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_server_exits_1_after_the_connection_timeout() {
    let port = crate::support::process::free_port();
    let output = tokio::time::timeout(
        WAIT,
        binary()
            .args([
                "listen",
                &format!("http://127.0.0.1:{port}/bayeux"),
                "/x",
                "--connection-timeout",
                "300ms",
            ])
            .output(),
    )
    .await
    .expect("gives up")
    .expect("run listen");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).expect("UTF-8");
    assert!(stderr.starts_with("cometd-bridge: could not connect to the server"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn bad_usage_exits_2() {
    let output =
        binary().args(["publish", "http://127.0.0.1:1/x", "/x", "{not json"]).output().await.expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("the message data is not JSON"));
    let output = binary().args(["listen", "ftp://x/", "/x"]).output().await.expect("run");
    assert_eq!(output.status.code(), Some(2));
    let output = binary().args(["frobnicate"]).output().await.expect("run");
    assert_eq!(output.status.code(), Some(2));
    let output = binary().arg("--version").output().await.expect("run");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("cometd-bridge "));
}
