//! The `cometd-bridge run` and `check` commands as a user runs them: exit codes, problems
//! named by key, and a SIGTERM with deliveries in flight.

use cometd_bridge::store::DeadLetterRecords;
use serde_json::json;
use tokio::process::Command;

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"));
    command.kill_on_drop(true).env_remove("RUST_LOG");
    command
}

/// Runs `check` on `toml` and returns (exit code, stderr).
async fn check(toml: &str, extension: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("config.{extension}"));
    std::fs::write(&file, toml).expect("write config");
    let output = binary().args(["check", "--config"]).arg(&file).output().await.expect("run check");
    (output.status.code(), String::from_utf8(output.stderr).expect("UTF-8"))
}

#[tokio::test]
async fn every_class_of_bad_config_exits_2_naming_the_key() {
    let source = "[[sources]]\nname = \"demo\"\nurl = \"http://127.0.0.1:1/bayeux\"\n";
    let cases: &[(&str, String, &str)] = &[
        ("syntax", "[admin\nlisten = 1".into(), "config.toml"),
        (
            "unknown key",
            "[admin]\nlisten = \"127.0.0.1:0\"\ncolour = \"blue\"\n".into(),
            "admin.colour: unknown key",
        ),
        ("wrong type", "[bridge]\nqueue_capacity = \"many\"\n".into(), "queue_capacity"),
        (
            "duration",
            "[bridge]\nshutdown_grace = \"soon\"\n".into(),
            "bridge.shutdown_grace: \"soon\" is not a duration",
        ),
        ("address", "[admin]\nlisten = \"everywhere\"\n".into(), "admin.listen:"),
        (
            "state backend",
            "[state]\nbackend = \"redis\"\n".into(),
            "state.backend: \"redis\" is not a backend",
        ),
        (
            "state bucket",
            "[state]\nbackend = \"nats-kv\"\nbucket = \"a.b\"\n".into(),
            "state.bucket: must be letters, digits",
        ),
        (
            "source url",
            "[[sources]]\nname = \"demo\"\nurl = \"ftp://x/\"\n".into(),
            "sources[0].url: scheme \"ftp\"",
        ),
        (
            "reference",
            format!(
                "{source}[[subscriptions]]\nid = \"a\"\nsource = \"nope\"\nchannel = \"/a\"\nsink = {{ type = \"nats\", subject = \"a\" }}\n"
            ),
            "subscriptions[0].source: no source is named \"nope\"",
        ),
        (
            "relative webhook URL",
            format!(
                "{source}[[subscriptions]]\nid = \"a\"\nsource = \"demo\"\nchannel = \"/a\"\nsink = {{ type = \"webhook\", url = \"/hook\" }}\n"
            ),
            "subscriptions[0].sink.url: \"/hook\": relative URL without a base",
        ),
        (
            "template",
            format!(
                "{source}[[subscriptions]]\nid = \"a\"\nsource = \"demo\"\nchannel = \"/a\"\nsink = {{ type = \"nats\", subject = \"a.*\" }}\n"
            ),
            "subscriptions[0].sink.subject: wildcard",
        ),
        (
            "channel",
            format!(
                "{source}[[subscriptions]]\nid = \"a\"\nsource = \"demo\"\nchannel = \"a/b\"\nsink = {{ type = \"nats\", subject = \"a\" }}\n"
            ),
            "subscriptions[0].channel:",
        ),
        (
            "secret",
            format!(
                "{source}[[subscriptions]]\nid = \"a\"\nsource = \"demo\"\nchannel = \"/a\"\nsink = {{ type = \"webhook\", url = \"http://127.0.0.1:1/\", secret = \"env:COMETD_BRIDGE_TEST_UNSET\" }}\n"
            ),
            "subscriptions[0].sink.secret: environment variable COMETD_BRIDGE_TEST_UNSET is not set",
        ),
        ("duplicate", format!("{source}{source}"), "sources[1].name: \"demo\" is used by another source"),
    ];
    for (class, toml, expected) in cases {
        let (code, stderr) = check(toml, "toml").await;
        assert_eq!(code, Some(2), "{class}: {stderr}");
        assert!(stderr.contains(expected), "{class}: expected {expected:?} in {stderr:?}");
    }
    let (code, stderr) = check("admin: {listen: nowhere}\n", "yaml").await;
    assert_eq!(
        (code, stderr.trim()),
        (Some(2), "admin.listen: \"nowhere\" is not an address like 127.0.0.1:8080")
    );
    let (code, stderr) = check("{\"bridge\": {\"queue_capacity\": 0}}", "json").await;
    assert_eq!((code, stderr.trim()), (Some(2), "bridge.queue_capacity: must be a positive number, not 0"));
    let (code, stderr) = check("x = 1", "ini").await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown configuration format"), "{stderr}");
}

/// `check` reads the file `run` would (`$COMETD_BRIDGE_CONFIG`, as the image sets it), and
/// text logs written to a pipe carry no colour codes.
#[tokio::test]
async fn check_reads_the_configured_file_and_logs_to_a_pipe_are_plain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, "[admin]\nlisten = \"127.0.0.1:0\"\n").expect("write config");
    let output = binary().arg("check").env("COMETD_BRIDGE_CONFIG", &file).output().await.expect("run check");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(stdout.starts_with(&format!("{}: valid", file.display())), "{stdout}");

    // `run`'s text logs, read through a pipe as `docker logs` does.
    let state = tempfile::tempdir().expect("state");
    std::fs::write(
        &file,
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n", state.path().display()),
    )
    .expect("write config");
    let mut run = binary()
        .args(["run", "--config"])
        .arg(&file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start run");
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(run.stderr.take().expect("stderr")));
    let mut seen = Vec::new();
    while !seen.iter().any(|line: &String| line.contains("running")) {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("a log line").expect("stderr");
        seen.push(line.expect("run logs until it is running"));
    }
    run.start_kill().expect("stop run");
    assert!(seen.iter().all(|line| !line.contains('\u{1b}')), "no ANSI escapes in piped logs: {seen:?}");
    assert!(seen.iter().any(|line| line.contains("INFO")), "{seen:?}");
}

#[tokio::test]
async fn all_problems_are_listed_at_once() {
    let (code, stderr) = check(
        "[admin]\nlisten = \"x\"\n[bridge]\nshutdown_grace = \"y\"\n[[sources]]\nname = \"\"\nurl = \"z\"\n",
        "toml",
    )
    .await;
    assert_eq!(code, Some(2));
    let keys: Vec<&str> = stderr.lines().map(|line| line.split(':').next().unwrap_or_default()).collect();
    assert_eq!(
        keys,
        ["admin.listen", "bridge.shutdown_grace", "sources[0].name", "sources[0].url"],
        "{stderr}"
    );
}

/// Unknown keys anywhere (a table, a source, a subscription) are each named by their full
/// path, beside the other problems of the file.
#[tokio::test]
async fn every_unknown_key_is_named_with_its_path() {
    let (code, stderr) = check(
        "[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n[state]\nspool_max_bytes = \"lots\"\nmin_free_bytes = \"plenty\"\n[[sources]]\nname = \"demo\"\nurl = \"http://127.0.0.1:1/bayeux\"\ncolour = \"red\"\n\
         [[subscriptions]]\nid = \"s\"\nsource = \"demo\"\nchannel = \"/s\"\nsink = { type = \"nats\", subject = \"s\" }\nretry = { max_elapsed = \"1h\", tries = 3 }\n",
        "toml",
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    for expected in [
        "admin.bogus: unknown key",
        "sources[0].colour: unknown key",
        "subscriptions[0].retry.tries: unknown key",
        "state.spool_max_bytes: \"lots\" is not a size",
        "state.min_free_bytes: \"plenty\" is not a size",
    ] {
        assert!(stderr.lines().any(|line| line.starts_with(expected)), "no {expected:?} in\n{stderr}");
    }
}

#[tokio::test]
async fn run_refuses_a_bad_config_before_binding_anything() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = held.local_addr().expect("address");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, format!("[admin]\nlisten = \"{address}\"\n[bridge]\nshutdown_grace = \"later\"\n"))
        .expect("write");
    let output = binary().args(["run", "--config"]).arg(&file).output().await.expect("run");
    assert_eq!(output.status.code(), Some(2), "validation fails before the taken port could");
    assert!(String::from_utf8_lossy(&output.stderr).contains("bridge.shutdown_grace"));
    let output = binary()
        .args(["run"])
        .env("COMETD_BRIDGE_CONFIG", dir.path().join("missing.toml"))
        .output()
        .await
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.toml: no such file"));
}

#[tokio::test]
async fn environment_variables_override_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[bridge]\nshutdown_grace = \"never\"\n").expect("write");
    let output = binary()
        .args(["check", "--config"])
        .arg(&file)
        .env("COMETD_BRIDGE__BRIDGE__SHUTDOWN_GRACE", "3s")
        .output()
        .await
        .expect("check");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A configuration whose only subscription goes to a webhook that keeps failing.
fn stuck_config(
    state: &std::path::Path,
    faye: &BayeuxServer,
    receiver: &WebhookReceiver,
    grace: &str,
) -> std::path::PathBuf {
    stuck_config_to(state, faye, &receiver.url(), grace)
}

/// [`stuck_config`] with the webhook at `url`.
fn stuck_config_to(
    state: &std::path::Path,
    faye: &BayeuxServer,
    url: &str,
    grace: &str,
) -> std::path::PathBuf {
    let file = state.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n[bridge]\nshutdown_grace = \"{grace}\"\n\
             [[sources]]\nname = \"demo\"\nurl = \"{}\"\n\
             [[subscriptions]]\nid = \"stuck\"\nsource = \"demo\"\nchannel = \"/stuck\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
            state.display(),
            faye.url(),
            url
        ),
    )
    .expect("write config");
    file
}

/// SIGTERM while a webhook keeps failing: the process exits 0 within the grace period,
/// nothing becomes a dead letter, and the next start delivers the backlog, in order, with
/// the webhook ids it had.
#[tokio::test]
async fn sigterm_with_a_backlog_keeps_it_for_the_next_start() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let mut failing = WebhookReceiver::start(std::iter::repeat_n(503, 1000)).await;
    let state = tempfile::tempdir().expect("state");
    let mut daemon = Daemon::start(&stuck_config(state.path(), &faye, &failing, "1s")).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    for n in 0..5 {
        publisher.publish("/stuck", json!(n)).await.expect("publish");
    }
    assert_eq!(failing.next().await.status, 503, "a delivery is in flight");

    daemon.signal(libc::SIGTERM);
    let status = tokio::time::timeout(WAIT, daemon.child.wait())
        .await
        .expect("exits within the grace period")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    {
        let store = cometd_bridge::store::EmbeddedStore::open(state.path()).expect("store");
        let letters = store.dead_letters().await.expect("read");
        assert!(letters.is_empty(), "no dead letters at shutdown: {letters:?}");
    }

    let mut working = WebhookReceiver::start([]).await;
    let mut daemon = Daemon::start(&stuck_config(state.path(), &faye, &working, "1s")).await;
    let mut data = Vec::new();
    while data.len() < 5 {
        data.push(working.next().await.json()["data"].clone());
    }
    assert_eq!(data, (0..5).map(|n| json!(n)).collect::<Vec<_>>(), "the backlog, in order");
    daemon.signal(libc::SIGTERM);
    let status = tokio::time::timeout(WAIT, daemon.child.wait()).await.expect("exits").expect("status");
    assert_eq!(status.code(), Some(0));
}

/// A second SIGTERM while shutdown waits for a delivery in flight (to a webhook that
/// accepts the connection and never answers) ends the process at once.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", stalled.local_addr().expect("address"));
    let state = tempfile::tempdir().expect("state");
    let mut daemon = Daemon::start(&stuck_config_to(state.path(), &faye, &url, "1h")).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    publisher.publish("/stuck", json!(1)).await.expect("publish");
    let (_connection, _) =
        tokio::time::timeout(WAIT, stalled.accept()).await.expect("a delivery is in flight").expect("accept");
    daemon.signal(libc::SIGTERM);
    daemon.wait_for_log("shutdown requested; a second signal exits at once").await;
    daemon.signal(libc::SIGTERM);
    let status = tokio::time::timeout(WAIT, daemon.child.wait())
        .await
        .expect("exits at once, not after 1h")
        .expect("status");
    assert_eq!(status.code(), Some(1));
}
