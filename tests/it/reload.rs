//! Live reload (`POST /api/v1/reload` and SIGHUP): all or nothing, and only what changed
//! restarts. Under load, an unchanged subscription keeps its session and loses nothing.

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::daemon::Daemon;
use crate::support::scenario::{delivered, faye, metric, publish_paced};
use crate::support::webhook::WebhookReceiver;

fn source(name: &str, url: &str, extra: &str) -> String {
    format!("[[sources]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}")
}

fn webhook(id: &str, source: &str, channel: &str, url: &str, extra: &str) -> String {
    format!(
        "[[subscriptions]]\nid = \"{id}\"\nsource = \"{source}\"\nchannel = \"{channel}\"\nsink = {{ type = \"webhook\", url = \"{url}\"{extra} }}\n"
    )
}

async fn client_id(app: &TestApp, source: &str) -> Value {
    let (status, sources) = app.call("GET", "/api/v1/sources", None).await;
    assert_eq!(status, 200, "{sources}");
    sources.as_array().expect("a list").iter().find(|entry| entry["name"] == source).expect("the source")
        ["client_id"]
        .clone()
}

async fn subscription_ids(app: &TestApp) -> Vec<String> {
    let (_, subscriptions) = app.call("GET", "/api/v1/subscriptions", None).await;
    subscriptions
        .as_array()
        .expect("a list")
        .iter()
        .map(|entry| entry["id"].as_str().expect("an id").to_string())
        .collect()
}

/// While 300 messages flow to an unchanged subscription, a reload changes one
/// subscription, removes one, adds one, and adds a source with a subscription of its own:
/// the report names them, the unchanged one gets all 300 once with the same session, and
/// the added and changed ones deliver.
#[tokio::test]
async fn a_reload_under_load_touches_only_what_changed() {
    let faye = faye().await;
    let mut steady = WebhookReceiver::start([]).await;
    let mut before = WebhookReceiver::start([]).await;
    let mut after = WebhookReceiver::start([]).await;
    let demo = source("demo", &faye.url(), "");
    let first = format!(
        "{demo}{}{}{}",
        webhook("steady", "demo", "/steady", &steady.url(), ""),
        webhook("changing", "demo", "/changing", &before.url(), ""),
        webhook("leaving", "demo", "/leaving", &before.url(), ""),
    );
    let app = TestApp::spawn(&first).await;
    app.wait_ready().await;
    let session = client_id(&app, "demo").await;

    let load = tokio::spawn(publish_paced(faye.url(), "/steady", 0..300, 100));
    // Reloaded while the load runs, once it has begun.
    let first = steady.next().await;
    assert_eq!(first.json()["data"]["n"], 0);
    app.rewrite_config(&format!(
        "{demo}{}{}{}{}{}",
        source("second", &faye.url(), "connection_types = [\"long-polling\"]\n"),
        webhook("steady", "demo", "/steady", &steady.url(), ""),
        webhook("changing", "demo", "/changing", &after.url(), ""),
        webhook("joining", "demo", "/joining", &after.url(), ""),
        webhook("second-hook", "second", "/second", &after.url(), ""),
    ));
    let (status, report) = app.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report,
        json!({"added": ["joining", "second", "second-hook"], "removed": ["leaving"], "changed": ["changing"]})
    );
    load.await.expect("the load ran");

    // The first message was taken off the receiver above; every other one arrives once.
    let seen = delivered(&mut steady, 299).await;
    assert!(seen.values().all(|count| *count == 1), "each once: {seen:?}");
    assert!((1..300).all(|n| seen.contains_key(&n)), "none lost: {} of 299", seen.len());
    assert_eq!(client_id(&app, "demo").await, session, "the unchanged source kept its session");
    assert_eq!(subscription_ids(&app).await, ["changing", "joining", "second-hook", "steady"]);

    app.wait_ready().await;
    for channel in ["/changing", "/joining", "/second"] {
        publish_paced(faye.url(), channel_name(channel), 0..1, 100).await;
        let request = after.next().await;
        assert_eq!(request.status, 200);
    }
    assert!(before.try_next().is_none(), "the changed subscription delivers to its new URL only");
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "cometd_bridge_config_reloads_total{result=\"ok\"}"), 1.0);
    app.stop().await;
}

/// `publish_paced` takes a `&'static str`.
fn channel_name(channel: &str) -> &'static str {
    match channel {
        "/changing" => "/changing",
        "/joining" => "/joining",
        _ => "/second",
    }
}

/// A changed source reconnects alone: its subscriptions restart on a new session, the
/// other source keeps its own.
#[tokio::test]
async fn a_changed_source_reconnects_alone() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let hooks = format!(
        "{}{}",
        webhook("a-hook", "a", "/a", &receiver.url(), ""),
        webhook("b-hook", "b", "/b", &receiver.url(), "")
    );
    let app =
        TestApp::spawn(&format!("{}{}{hooks}", source("a", &faye.url(), ""), source("b", &faye.url(), "")))
            .await;
    app.wait_ready().await;
    let (a, b) = (client_id(&app, "a").await, client_id(&app, "b").await);
    app.rewrite_config(&format!(
        "{}{}{hooks}",
        source("a", &faye.url(), "request_timeout = \"20s\"\n"),
        source("b", &faye.url(), "")
    ));
    let (status, report) = app.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report, json!({"added": [], "removed": [], "changed": ["a", "a-hook"]}));
    app.wait_ready().await;
    assert_ne!(client_id(&app, "a").await, a, "a new session for the changed source");
    assert_eq!(client_id(&app, "b").await, b, "the other source kept its session");
    publish_paced(faye.url(), "/a", 0..3, 100).await;
    assert_eq!(delivered(&mut receiver, 3).await.len(), 3);
    app.stop().await;
}

/// A file with problems is refused whole, with every problem; nothing changes.
#[tokio::test]
async fn a_reload_with_problems_changes_nothing() {
    let faye = faye().await;
    let receiver = WebhookReceiver::start([]).await;
    let demo = source("demo", &faye.url(), "");
    let app =
        TestApp::spawn(&format!("{demo}{}", webhook("kept", "demo", "/kept", &receiver.url(), ""))).await;
    app.wait_ready().await;
    app.rewrite_config(&format!(
        "{demo}bogus = 1\n{}{}",
        webhook("kept", "demo", "/kept", &receiver.url(), ""),
        webhook("broken", "nowhere", "/broken", "ftp://example", ""),
    ));
    let (status, answer) = app.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_config");
    let problems: Vec<&str> =
        answer["problems"].as_array().expect("problems").iter().filter_map(Value::as_str).collect();
    assert!(problems.iter().any(|problem| problem.contains("bogus: unknown key")), "{problems:?}");
    assert!(problems.iter().any(|problem| problem.contains("subscriptions[1].source")), "{problems:?}");
    assert!(problems.iter().any(|problem| problem.contains("subscriptions[1].sink.url")), "{problems:?}");
    assert_eq!(subscription_ids(&app).await, ["kept"]);

    // What only a restart can apply is refused too.
    app.rewrite_config(&format!("{demo}{}", webhook("kept", "demo", "/kept", &receiver.url(), "")));
    let file = app.state.path().join("config.toml");
    let text = std::fs::read_to_string(&file).expect("config");
    std::fs::write(&file, text.replace("[admin]\n", "[admin]\ntoken = \"a-new-token\"\n")).expect("write");
    let (status, answer) = app.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"], "restart_required");
    assert!(answer["message"].as_str().is_some_and(|message| message.contains("[admin]")), "{answer}");
    let (status, _) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(status, 200, "the old token (none) still applies");
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "cometd_bridge_config_reloads_total{result=\"error\"}"), 2.0);
    app.stop().await;
}

/// A source that subscriptions added through the API still use cannot be removed.
#[tokio::test]
async fn a_source_in_use_by_the_api_is_not_removed() {
    let faye = faye().await;
    let receiver = WebhookReceiver::start([]).await;
    let two = format!("{}{}", source("demo", &faye.url(), ""), source("other", &faye.url(), ""));
    let app = TestApp::spawn(&two).await;
    app.wait_ready().await;
    let body = json!({"id": "posted", "source": "other", "channel": "/posted",
        "sink": {"type": "webhook", "url": receiver.url()}});
    let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(body)).await;
    assert_eq!(status, 201, "{answer}");
    app.rewrite_config(&source("demo", &faye.url(), ""));
    let (status, answer) = app.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, 400, "{answer}");
    let problems = answer["problems"].to_string();
    assert!(problems.contains("\\\"posted\\\" added through the API uses it"), "{problems}");
    assert_eq!(subscription_ids(&app).await, ["posted"]);
    app.stop().await;
}

/// SIGHUP reloads the daemon as a user runs it.
#[tokio::test]
async fn sighup_reloads_the_daemon() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let state = tempfile::tempdir().expect("state");
    let file = state.path().join("config.toml");
    let header =
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n", state.path().display());
    let demo = source("demo", &faye.url(), "");
    std::fs::write(&file, format!("{header}{demo}")).expect("write");
    let mut daemon = Daemon::start(&file).await;
    std::fs::write(&file, format!("{header}{demo}{}", webhook("hup", "demo", "/hup", &receiver.url(), "")))
        .expect("write");
    daemon.signal(libc::SIGHUP);
    let reloaded = daemon.wait_for_log("configuration reloaded").await;
    assert_eq!(reloaded["fields"]["added"], "[\"hup\"]", "{reloaded}");
    daemon.wait_for_log("subscribed").await;
    publish_paced(faye.url(), "/hup", 0..1, 100).await;
    assert_eq!(receiver.next().await.status, 200);
}
