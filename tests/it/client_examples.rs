//! The client crate's examples (`crates/bayeux-client/examples`) run as a user would run
//! them, against real faye on loopback: `listen` prints what `publish` sends, on both
//! transports, and `salesforce_replay` logs in with OAuth and prints what the
//! Salesforce-like fixture replays. The examples are built as programs first (`cargo test
//! --all-targets` builds them only as test harnesses), then run as built binaries.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::peer::{WAIT, open};
use cometd_bridge::cometd::{Client, ConnectionType};

/// The built example `name`, in the target directory of this test's executable
/// (`target/<profile>/deps/`). `cargo test --all-targets` builds examples only as test
/// harnesses, not as the programs, so the first call builds them (`cargo build -p
/// bayeux-client --examples`, a no-op when they are up to date) with the cargo, target
/// directory and profile that built the tests.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile =
        exe.parent().and_then(Path::parent).expect("the test executable is in target/<profile>/deps");
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(error) = BUILT.get_or_init(|| build_examples(profile)) {
        panic!("the client's examples could not be built: {error}");
    }
    let path = profile.join("examples").join(name);
    assert!(
        path.is_file(),
        "the example `{name}` is not at {} after building: `cargo build -p bayeux-client --examples` builds it",
        path.display()
    );
    path
}

/// The environment cargo gives a test process (its package's name, paths, binaries).
const CARGO_SETS: [&str; 9] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_",
    "CARGO_TARGET_TMPDIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_CFG_",
    "OUT_DIR",
];

/// Builds the client crate's examples as programs into `profile_dir` (`target/<profile>`).
fn build_examples(profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = profile_dir.parent().ok_or("no target directory above the profile's")?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let mut command = std::process::Command::new(&cargo);
    // What cargo sets for a test process describes this package; build scripts that watch
    // it (ring's does) would rebuild for the examples each time, and for the tests after.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if CARGO_SETS.iter().any(|prefix| name.starts_with(prefix)) {
            command.env_remove(&*name);
        }
    }
    let output = command
        .args(["build", "--quiet", "-p", "bayeux-client", "--examples", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--manifest-path")
        .arg(crate::support::project_dir().join("Cargo.toml"))
        .output()
        .map_err(|error| format!("run {}: {error}", cargo.display()))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`cargo build -p bayeux-client --examples` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// A running example, its output read a line at a time.
struct Running {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Running {
    fn start(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(example(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("start the example {name}: {error}"));
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        Running { child, stdout, stderr }
    }

    /// Reads stderr until a line equal to `line`; fails with what came instead.
    async fn wait_for_stderr(&mut self, line: &str) {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(WAIT, async {
            while let Some(read) = self.stderr.next_line().await.expect("read stderr") {
                if read == line {
                    return true;
                }
                seen.push(read);
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "waiting for {line:?} on stderr; it said: {seen:?}");
    }

    /// The next line on stdout, as JSON.
    async fn next_json(&mut self) -> Value {
        let line = tokio::time::timeout(WAIT, self.stdout.next_line())
            .await
            .expect("a line on stdout in time")
            .expect("read stdout")
            .expect("stdout still open");
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("{line:?} is not JSON: {error}"))
    }

    /// Interrupts the example as Ctrl-C would and checks that it closes and exits cleanly.
    async fn interrupt(mut self) {
        let pid = i32::try_from(self.child.id().expect("still running")).expect("a pid");
        // SAFETY: kill(2) on the child's own pid, which this struct still owns (not reaped).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let status =
            tokio::time::timeout(WAIT, self.child.wait()).await.expect("exits in time").expect("wait");
        assert!(status.success(), "exits cleanly after Ctrl-C: {status}");
    }
}

#[tokio::test]
async fn listen_prints_what_publish_sends_on_both_transports() {
    let server = BayeuxServer::faye(FayeOptions::default()).await;
    let url = server.url();
    let mut listeners = Vec::new();
    for transport in ["--long-polling", "--websocket"] {
        let mut listen = Running::start("listen", &[transport, &url, "/examples/**"]);
        listen.wait_for_stderr("subscribed /examples/**").await;
        listeners.push(listen);
    }

    let published = tokio::time::timeout(
        WAIT,
        Command::new(example("publish")).args([&url, "/examples/chat", r#"{"text": "hello"}"#]).output(),
    )
    .await
    .expect("publish finishes in time")
    .expect("run publish");
    let stderr = String::from_utf8_lossy(&published.stderr);
    assert!(published.status.success(), "publish: {} {stderr}", published.status);
    let reply: Value = serde_json::from_slice(&published.stdout).expect("publish prints the reply as JSON");
    assert_eq!(
        (&reply["channel"], &reply["successful"]),
        (&json!("/examples/chat"), &json!(true)),
        "{reply}"
    );

    for mut listen in listeners {
        let line = listen.next_json().await;
        assert_eq!(line, json!({ "channel": "/examples/chat", "data": { "text": "hello" } }));
        listen.interrupt().await;
    }
}

#[tokio::test]
async fn publish_says_why_the_server_refused() {
    let server = BayeuxServer::faye(FayeOptions::default()).await;
    // faye refuses a publish to a meta channel.
    let output = Command::new(example("publish"))
        .args([&server.url(), "/meta/nothing", "1"])
        .output()
        .await
        .expect("run publish");
    assert_eq!(output.status.code(), Some(1), "refused: exit status 1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("publish: "), "the reason on stderr: {stderr}");
}

#[tokio::test]
async fn salesforce_replay_logs_in_and_prints_the_retained_events_with_their_ids() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token-1").expect("token");
    let server = BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![
            ("salesforce".into(), json!({})),
            ("token-auth".into(), json!({ "tokenFile": token_file })),
        ],
        oauth: Some(json!({ "tokenFile": token_file, "clientId": "app", "clientSecret": "app-secret" })),
        ..FayeOptions::default()
    })
    .await;
    let publisher = open(
        Client::builder(server.url())
            .connection_types([ConnectionType::LongPolling])
            .header("Authorization", "Bearer token-1"),
    )
    .await;
    for n in 0..3 {
        publisher.publish("/event/Order__e", json!({ "n": n })).await.expect("publish");
    }
    publisher.close().await;

    let login = server.url().replace("/bayeux", "");
    let url = server.url();
    let arguments = ["--login", &login, "--client-id", "app", "--client-secret", "app-secret"];
    let mut replay = Running::start(
        "salesforce_replay",
        &[
            &arguments[..],
            &["--client-credentials", "--replay-from", "-2", "--cometd-url", &url, "/event/Order__e"],
        ]
        .concat(),
    );
    replay.wait_for_stderr("subscribed /event/Order__e from all").await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let line = replay.next_json().await;
        assert_eq!(line["channel"], "/event/Order__e", "{line}");
        assert_eq!(line["data"]["payload"], json!({ "n": n }), "replayed in order: {line}");
        let id = line["replayId"].as_i64().unwrap_or_else(|| panic!("a replay id: {line}"));
        assert_eq!(line["data"]["event"]["replayId"], json!(id), "the id printed is the event's: {line}");
        ids.push(id);
    }
    assert!(ids.is_sorted() && ids[0] < ids[2], "increasing replay ids: {ids:?}");
    replay.interrupt().await;
}
