//! Outages of any length, the parts that fit in the suite: replay resumes from what is
//! spooled across a forgotten session and a restart; a full subscription with replay is
//! held upstream and resumed without loss; the backlog's age; shutdown within its grace
//! with a frozen server; `cometd-bridge health`. (Full subscriptions without replay, over
//! outages longer than the session timeout, are in `tests/outage.rs`.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::peer::{WAIT, open};
use crate::support::scenario::{faye, metric, publish_paced, source, webhook};
use crate::support::webhook::WebhookReceiver;

const CHANNEL: &str = "/event/Order__e";

async fn salesforce_like(fixture: Value) -> BayeuxServer {
    BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![("salesforce".to_string(), fixture)],
        ..FayeOptions::default()
    })
    .await
}

fn replay_webhook(faye: &BayeuxServer, url: &str, extra: &str) -> String {
    format!(
        "[[sources]]\nname = \"sf\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nreplay = true\n\
         [[subscriptions]]\nid = \"orders\"\nsource = \"sf\"\nchannel = \"{CHANNEL}\"\n{extra}\
         sink = {{ type = \"webhook\", url = \"{url}\" }}\nretry = {{ max_backoff = \"500ms\" }}\n",
        faye.url()
    )
}

async fn publish_numbers(faye: &BayeuxServer, numbers: std::ops::Range<u64>, pad: usize) {
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    for n in numbers {
        publisher.publish(CHANNEL, json!({ "n": n, "pad": "x".repeat(pad) })).await.expect("publish");
    }
    publisher.close().await;
}

/// Waits until `subscription`'s backlog holds `messages`, failing if it passes it.
async fn wait_for_backlog(app: &TestApp, subscription: &str, messages: u64) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, view) = app.call("GET", &format!("/api/v1/subscriptions/{subscription}"), None).await;
        let held = view["backlog"]["messages"].as_u64().expect("a backlog");
        assert!(held <= messages, "the backlog passed {messages}: {view}");
        if held == messages {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "the backlog is not {messages}: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event number delivered with a 2xx, and how often, until `numbers` all arrived.
async fn delivered_events(
    receiver: &mut WebhookReceiver,
    numbers: std::ops::Range<u64>,
) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    while numbers.clone().any(|n| !seen.contains_key(&n)) {
        let request = receiver.next().await;
        if request.status == 200 {
            let id = request.header("webhook-id");
            assert!(!id.is_empty(), "a webhook-id on every delivery");
            *seen.entry(request.json()["data"]["payload"]["n"].as_u64().expect("numbered")).or_insert(0) += 1;
        }
    }
    while let Some(request) = receiver.try_next() {
        if request.status == 200 {
            *seen.entry(request.json()["data"]["payload"]["n"].as_u64().expect("numbered")).or_insert(0) += 1;
        }
    }
    seen
}

/// 10 events delivered (position 10), then 500 spooled behind a 503 webhook; the server
/// forgets the session (the bridge handshakes and subscribes again), then the bridge
/// restarts: the backlog stays 500 (plus the markers published to know each step is
/// done), and once the webhook is back each event is delivered once.
#[tokio::test]
async fn a_replayed_session_and_a_restart_spool_nothing_twice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trigger = dir.path().join("forget");
    let faye = salesforce_like(json!({ "unknownClientFile": trigger })).await;
    let mut receiver =
        WebhookReceiver::start(std::iter::repeat_n(200, 10).chain(std::iter::repeat_n(503, 10_000_000)))
            .await;
    let toml = replay_webhook(&faye, &receiver.url(), "");
    let app = TestApp::spawn(&toml).await;
    app.wait_ready().await;
    publish_numbers(&faye, 0..10, 0).await;
    let first = delivered_events(&mut receiver, 0..10).await;
    assert!(first.values().all(|count| *count == 1));
    publish_numbers(&faye, 10..510, 0).await;
    wait_for_backlog(&app, "orders", 500).await;

    std::fs::write(&trigger, "").expect("arm: the next connect gets 403::Unknown client");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&app.metrics().await, "cometd_bridge_session_losses_total{source=\"sf\"}") < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the session was not forgotten");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.wait_ready().await;
    // Subscribed again: a marker arrives after whatever the new subscription replayed.
    publish_numbers(&faye, 510..511, 0).await;
    wait_for_backlog(&app, "orders", 501).await;
    assert_eq!(metric(&app.metrics().await, "cometd_bridge_session_losses_total{source=\"sf\"}"), 1.0);

    let state = app.stop().await;
    let app = TestApp::spawn_in(&toml, state, None).await;
    app.wait_ready().await;
    wait_for_backlog(&app, "orders", 501).await;
    publish_numbers(&faye, 511..512, 0).await;
    wait_for_backlog(&app, "orders", 502).await;

    receiver.heal();
    let seen = delivered_events(&mut receiver, 10..512).await;
    let repeated: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(repeated.is_empty(), "delivered more than once: {repeated:?}");
    assert_eq!(seen.len(), 502);
    app.stop().await;
}

/// A replay subscription with a 16 KiB quota behind a dead webhook: when full, its channel
/// is unsubscribed upstream (nothing dropped), and once the webhook is back and the spool
/// has room it subscribes again from the newest spooled replay id: every event arrives
/// exactly once.
#[tokio::test]
async fn a_full_replay_subscription_is_held_upstream_and_loses_nothing() {
    let faye = salesforce_like(json!({})).await;
    let mut receiver = WebhookReceiver::start(std::iter::repeat_n(503, 10_000_000)).await;
    let app = TestApp::spawn(&replay_webhook(&faye, &receiver.url(), "spool_max_bytes = \"16KiB\"\n")).await;
    app.wait_ready().await;
    publish_numbers(&faye, 0..300, 300).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, view) = app.call("GET", "/api/v1/subscriptions/orders", None).await;
        let (_, sources) = app.call("GET", "/api/v1/sources", None).await;
        let subscribed = sources[0]["subscriptions"].as_array().expect("a list").iter().any(|c| c == CHANNEL);
        if view["full"] == true && !subscribed {
            assert_eq!(view["dropped"], 0, "with replay nothing is dropped: {view}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not held: {view} {sources}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = crate::support::http_client().get(app.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "a held subscription does not make the bridge unready");
    receiver.heal();
    let seen = delivered_events(&mut receiver, 0..300).await;
    let repeated: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(repeated.is_empty(), "delivered more than once: {repeated:?}");
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "cometd_bridge_subscription_full{subscription=\"orders\"}"), 0.0);
    assert_eq!(metric(&metrics, "cometd_bridge_session_losses_total{source=\"sf\"}"), 0.0);
    app.stop().await;
}

/// The same, with what the server keeps while the subscription is held (about 100 KB)
/// larger than the source's `max_message_size` (64 KiB): the server replays it in one
/// long-polling answer, which the client reads message by message (each within the
/// limit) rather than refusing it whole, so every event still arrives exactly once.
#[tokio::test]
async fn a_replay_answer_larger_than_max_message_size_is_read_message_by_message() {
    let faye = salesforce_like(json!({})).await;
    let mut receiver = WebhookReceiver::start(std::iter::repeat_n(503, 10_000_000)).await;
    let toml = replay_webhook(&faye, &receiver.url(), "spool_max_bytes = \"16KiB\"\n").replacen(
        "replay = true\n",
        "replay = true\nmax_message_size = \"64KiB\"\n",
        1,
    );
    let app = TestApp::spawn(&toml).await;
    app.wait_ready().await;
    publish_numbers(&faye, 0..300, 300).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, view) = app.call("GET", "/api/v1/subscriptions/orders", None).await;
        if view["full"] == true {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not held: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.heal();
    let seen = delivered_events(&mut receiver, 0..300).await;
    let repeated: Vec<_> = seen.iter().filter(|(_, count)| **count > 1).collect();
    assert!(repeated.is_empty(), "delivered more than once: {repeated:?}");
    assert_eq!(metric(&app.metrics().await, "cometd_bridge_session_losses_total{source=\"sf\"}"), 0.0);
    app.stop().await;
}

/// 50 messages waiting behind a 503 webhook for more than 2 s show an oldest age of more
/// than 2 s (it read 0 while a batch was being retried after an earlier settlement).
#[tokio::test]
async fn the_backlog_age_counts_while_a_batch_is_retried() {
    let faye = faye().await;
    let receiver =
        WebhookReceiver::start(std::iter::repeat_n(200, 5).chain(std::iter::repeat_n(503, 1_000_000))).await;
    let app =
        TestApp::spawn(&format!("{}{}", source(&faye), webhook("hook", "/aged", &receiver.url()))).await;
    app.wait_ready().await;
    publish_paced(faye.url(), "/aged", 0..55, 1000).await;
    wait_for_backlog(&app, "hook", 50).await;
    // The quantity under test is the passing of time itself.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, view) = app.call("GET", "/api/v1/subscriptions/hook", None).await;
    let age = view["backlog"]["oldest_age_seconds"].as_f64().expect("an age");
    assert!(age >= 2.0, "{view}");
    let metrics = app.metrics().await;
    assert!(metric(&metrics, "cometd_bridge_spool_oldest_age_seconds{subscription=\"hook\"}") >= 2.0);
    drop(receiver);
    app.stop().await;
}

/// SIGTERM with three sources, one of them frozen (SIGSTOP): the daemon exits 0 within
/// `shutdown_grace` (it waited 34 s for the frozen server's disconnect before).
#[tokio::test]
async fn shutdown_fits_in_the_grace_period_with_a_frozen_server() {
    let mut servers = [faye().await, faye().await, faye().await];
    let state = tempfile::tempdir().expect("state");
    let mut toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[bridge]\nshutdown_grace = \"4s\"\n[state]\npath = \"{}\"\n",
        state.path().display()
    );
    for (index, server) in servers.iter().enumerate() {
        toml.push_str(&format!(
            "[[sources]]\nname = \"s{index}\"\nurl = \"{}\"\nrequest_timeout = \"30s\"\n",
            server.url()
        ));
        toml.push_str(&format!(
            "[[subscriptions]]\nid = \"sub{index}\"\nsource = \"s{index}\"\nchannel = \"/c\"\nsink = {{ type = \"webhook\", url = \"http://127.0.0.1:9/h\" }}\n"
        ));
    }
    let file = state.path().join("config.toml");
    std::fs::write(&file, toml).expect("write config");
    let mut daemon = Daemon::start(&file).await;
    let ready = format!("http://{}/readyz", daemon.admin);
    let deadline = tokio::time::Instant::now() + WAIT;
    while crate::support::http_client().get(&ready).send().await.expect("readyz").status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    servers[1].process().freeze();
    let started = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = tokio::time::timeout(WAIT, daemon.child.wait()).await.expect("exits").expect("status");
    let took = started.elapsed();
    servers[1].process().thaw();
    println!("exited {status} after {took:?} (grace 4 s)");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_millis(4500), "exited after {took:?}, past the 4 s grace period");
}

/// `cometd-bridge health`: exit 0 and "ready" from a ready bridge (by `--url`, and by the
/// configuration's `admin.listen`, an unspecified address asked on loopback); exit 1 from
/// a bridge that is not ready and from none at all.
#[tokio::test]
async fn health_exits_0_only_when_the_bridge_is_ready() {
    let faye = faye().await;
    let app =
        TestApp::spawn(&format!("{}{}", source(&faye), webhook("hook", "/h", "http://127.0.0.1:9/h"))).await;
    app.wait_ready().await;
    // Run beside the in-process bridge, which must go on answering meanwhile.
    let health = |args: Vec<String>, env: Vec<(&'static str, String)>| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
            .arg("health")
            .args(args)
            .envs(env)
            .output()
            .await
            .expect("run health")
    };
    let ready = health(vec!["--url".into(), app.url("/readyz")], vec![]).await;
    assert!(ready.status.success(), "{}", String::from_utf8_lossy(&ready.stderr));
    assert!(String::from_utf8_lossy(&ready.stdout).starts_with("ready"));

    let config = app.state.path().join("health.toml");
    std::fs::write(&config, format!("[admin]\nlisten = \"0.0.0.0:{}\"\n{}", app.admin.port(), source(&faye)))
        .expect("write config");
    let by_config = health(vec![], vec![("COMETD_BRIDGE_CONFIG", config.display().to_string())]).await;
    assert!(by_config.status.success(), "{}", String::from_utf8_lossy(&by_config.stderr));

    let unready = TestApp::spawn(
        "[[sources]]\nname = \"gone\"\nurl = \"http://127.0.0.1:9/bayeux\"\n[[subscriptions]]\nid = \"x\"\nsource = \"gone\"\nchannel = \"/x\"\nsink = { type = \"webhook\", url = \"http://127.0.0.1:9/h\" }\n",
    )
    .await;
    let not_ready = health(vec!["--url".into(), unready.url("/readyz")], vec![]).await;
    assert_eq!(not_ready.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&not_ready.stderr).contains("not ready"), "{not_ready:?}");
    let port = unready.admin.port();
    unready.stop().await;
    let nobody = health(vec!["--url".into(), format!("http://127.0.0.1:{port}/readyz")], vec![]).await;
    assert_eq!(nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("did not answer"), "{nobody:?}");
    app.stop().await;
}

/// A tmpfs mounted for a test, unmounted when dropped (even when the test fails).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=`) on a new directory. Needs root (or
    /// CAP_SYS_ADMIN): the test fails and says so otherwise.
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount(8)");
        assert!(
            status.success(),
            "this test needs a small filesystem: mounting a tmpfs failed ({status}); run the tests as root (CI and the project's machines do), or with CAP_SYS_ADMIN"
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// The state directory on an 8 MiB filesystem, nearly full, messages of 1 KB behind a 503
/// webhook until the disk is full: the session stays up (no session lost, the source
/// connected), the subscription is full and counts what it drops, `/readyz` and
/// `cometd_bridge_store_healthy` say the store fails. Space freed: the store heals without a
/// restart, and once the webhook is back every message spooled before the disk filled is
/// delivered, and `delivered + dropped == published`.
#[tokio::test]
async fn a_full_disk_costs_the_subscription_not_the_session_and_heals_when_space_is_freed() {
    let disk = SmallDisk::mount("8m");
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    receiver.set_down(true);
    let state = tempfile::TempDir::new_in(disk.path()).expect("state directory on the small disk");
    let toml = format!("{}{}", source(&faye), webhook("hook", "/disk", &receiver.url()));
    let app = TestApp::spawn_with_state(&toml, state, None, "min_free_bytes = \"0\"\n").await;
    app.wait_ready().await;
    // Leave about 1 MiB: the database fills it within seconds.
    let free = free_bytes(disk.path());
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![0u8; free.saturating_sub(1 << 20) as usize]).expect("fill the disk");

    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    let pad = "x".repeat(1000);
    let mut published = 0u64;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    let mut failing = false;
    while !failing {
        assert!(tokio::time::Instant::now() < deadline, "the disk never filled ({published} published)");
        for _ in 0..20 {
            publisher.publish("/disk", json!({ "n": published, "pad": pad })).await.expect("publish");
            published += 1;
        }
        failing = metric(&app.metrics().await, "cometd_bridge_store_healthy") == 0.0;
    }
    // The last free bytes too (redb failed to grow its file by a chunk; small writes could
    // still fit): now nothing can be written until space is freed.
    let rest = disk.path().join("rest");
    std::fs::write(&rest, vec![0u8; free_bytes(disk.path()) as usize]).expect("fill the rest");
    // Full, and going on: publish more while it is.
    for _ in 0..100 {
        publisher.publish("/disk", json!({ "n": published, "pad": pad })).await.expect("publish");
        published += 1;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, view) = app.call("GET", "/api/v1/subscriptions/hook", None).await;
        if view["full"] == true && view["dropped"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not full: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = crate::support::http_client().get(app.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.expect("body").contains("state store"), "readyz says the store fails");
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "cometd_bridge_source_connected{source=\"demo\"}"),
        1.0,
        "the session stays up"
    );
    assert_eq!(metric(&metrics, "cometd_bridge_session_losses_total{source=\"demo\"}"), 0.0);

    let deadline = tokio::time::Instant::now() + WAIT;
    let view = loop {
        let (_, view) = app.call("GET", "/api/v1/subscriptions/hook", None).await;
        let settled =
            ["dropped", "forwarded"].iter().map(|key| view[key].as_u64().expect("a count")).sum::<u64>();
        let spooled = view["backlog"]["messages"].as_u64().expect("a backlog");
        if view["received"] == published && settled + spooled == published {
            break view;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all received: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(view["dropped"].as_u64().expect("dropped") >= 100, "what came while the disk was full: {view}");
    std::fs::remove_file(&filler).expect("free the space");
    std::fs::remove_file(&rest).expect("free the space");
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&app.metrics().await, "cometd_bridge_store_healthy") != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the store did not heal after the space was freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Healthy again: it takes messages (the marker), and everything arrives.
    publisher.publish("/disk", json!({ "n": published, "pad": pad })).await.expect("publish");
    published += 1;
    publisher.close().await;
    receiver.set_down(false);
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    let mut delivered = BTreeMap::new();
    let view = loop {
        while let Some(request) = receiver.try_next() {
            if request.status == 200 {
                *delivered.entry(request.json()["data"]["n"].as_u64().expect("numbered")).or_insert(0) += 1;
            }
        }
        let (_, view) = app.call("GET", "/api/v1/subscriptions/hook", None).await;
        let dropped = view["dropped"].as_u64().expect("dropped");
        if view["backlog"]["messages"] == 0 && delivered.len() as u64 + dropped == published {
            break view;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} delivered, {view}", delivered.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("disk full: {published} published, {} delivered, {} dropped", delivered.len(), view["dropped"]);
    assert!(delivered.values().all(|count| *count == 1), "each delivered once");
    assert!(delivered.contains_key(&(published - 1)), "the marker sent after healing arrived");
    let first_dropped = (0..published).find(|n| !delivered.contains_key(n)).expect("some were dropped");
    assert!(first_dropped > 0, "what was spooled before the disk filled is delivered");
    assert_eq!(view["full"], false, "{view}");
    app.stop().await;
}

/// Free bytes on the filesystem holding `path`, from `df`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let output =
        std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(path).output().expect("df");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .nth(1)
        .and_then(|line| line.trim().parse().ok())
        .expect("df's answer")
}
