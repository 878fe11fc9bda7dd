//! The admin API through real HTTP: every route and error status, auth, runtime
//! subscriptions that receive from faye and survive restarts (also `kill -9`), dead letters.

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

async fn faye() -> BayeuxServer {
    BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await
}

fn source(faye: &BayeuxServer) -> String {
    format!("[[sources]]\nname = \"demo\"\nurl = \"{}\"\n", faye.url())
}

fn configured(receiver: &WebhookReceiver) -> String {
    format!(
        "[[subscriptions]]\nid = \"from-file\"\nsource = \"demo\"\nchannel = \"/file\"\nsink = {{ type = \"webhook\", url = \"{}\", secret = \"hidden\" }}\n",
        receiver.url()
    )
}

fn webhook_body(id: &str, channel: &str, receiver: &WebhookReceiver) -> Value {
    json!({ "id": id, "source": "demo", "channel": channel, "sink": { "type": "webhook", "url": receiver.url() } })
}

async fn publish(faye: &BayeuxServer, channel: &str, data: Value) {
    let client = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    client.publish(channel, data).await.expect("publish");
}

#[tokio::test]
async fn subscriptions_can_be_added_listed_and_removed_at_runtime() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&format!("{}{}", source(&faye), configured(&receiver))).await;
    app.wait_ready().await;

    let (status, created) =
        app.call("POST", "/api/v1/subscriptions", Some(webhook_body("live", "/live/**", &receiver))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["state"], "active", "faye confirmed the channel: {created}");
    assert_eq!(created["origin"], "api");
    publish(&faye, "/live/a", json!("hello")).await;
    let request = receiver.next().await;
    assert_eq!(
        (request.json()["subscription"].clone(), request.json()["data"].clone()),
        (json!("live"), json!("hello"))
    );

    let (status, list) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list.as_array().expect("array").iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, ["from-file", "live"]);
    let from_file = &list[0];
    assert_eq!(from_file["origin"], "config");
    assert_eq!(from_file["sink"]["secret"], "***", "secrets are never returned");
    let (status, one) = app.call("GET", "/api/v1/subscriptions/live", None).await;
    assert_eq!((status, one["forwarded"].clone(), one["received"].clone()), (200, json!(1), json!(1)));

    let (status, sources) = app.call("GET", "/api/v1/sources", None).await;
    assert_eq!(status, 200);
    let demo = &sources[0];
    assert_eq!((demo["name"].clone(), demo["state"].clone()), (json!("demo"), json!("connected")));
    assert_eq!(demo["url"], faye.url());
    assert!(demo["connection_type"].is_string() && demo["client_id"].is_string(), "{demo}");

    let (status, body) = app.call("DELETE", "/api/v1/subscriptions/live", None).await;
    assert_eq!((status, body), (204, Value::Null));
    let (_, sources) = app.call("GET", "/api/v1/sources", None).await;
    assert!(
        !sources[0]["subscriptions"].as_array().expect("array").contains(&json!("/live/**")),
        "unsubscribed upstream"
    );
    let (status, _) = app.call("GET", "/api/v1/subscriptions/live", None).await;
    assert_eq!(status, 404);
    let (status, error) = app.call("DELETE", "/api/v1/subscriptions/live", None).await;
    assert_eq!((status, error["error"].clone()), (404, json!("not_found")));
    let (status, error) = app.call("DELETE", "/api/v1/subscriptions/from-file", None).await;
    assert_eq!((status, error["error"].clone()), (409, json!("conflict")));
    assert!(error["message"].as_str().expect("message").contains("configuration file"), "{error}");
    app.stop().await;
}

#[tokio::test]
async fn a_channel_still_needed_stays_subscribed_upstream() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&source(&faye)).await;
    app.wait_ready().await;
    for id in ["first", "second"] {
        let (status, body) =
            app.call("POST", "/api/v1/subscriptions", Some(webhook_body(id, "/shared", &receiver))).await;
        assert_eq!(status, 201, "{body}");
    }
    assert_eq!(app.call("DELETE", "/api/v1/subscriptions/first", None).await.0, 204);
    publish(&faye, "/shared", json!("still")).await;
    let request = receiver.next().await;
    assert_eq!(request.json()["subscription"], "second");
    app.stop().await;
}

#[tokio::test]
async fn every_error_answers_in_the_contract_shape() {
    let faye = faye().await;
    let receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&format!("{}{}", source(&faye), configured(&receiver))).await;
    app.wait_ready().await;
    let client = crate::support::http_client();
    let post = |body: String, content_type: &'static str| {
        client.post(app.url("/api/v1/subscriptions")).header("content-type", content_type).body(body).send()
    };
    let error = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: Value =
            serde_json::from_slice(&response.bytes().await.expect("body")).expect("a JSON error body");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        (
            status,
            body["error"].as_str().expect("an error code").to_string(),
            body["message"].as_str().unwrap().to_string(),
        )
    };

    let cases = [
        (webhook_body("bad", "no-slash", &receiver), 400, "invalid_subscription", "channel:"),
        (webhook_body("", "/x", &receiver), 400, "invalid_subscription", "id: must not be empty"),
        (
            json!({"id": "x", "source": "demo", "channel": "/x", "sink": {"type": "nats", "subject": "a..b"}}),
            400,
            "invalid_subscription",
            "sink.subject:",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": "/x", "sink": {"type": "webhook", "url": "/rel"}}),
            400,
            "invalid_subscription",
            "sink.url:",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": "/x"}),
            400,
            "invalid_subscription",
            "missing field `sink`",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": "/x", "colour": 1, "sink": {"type": "webhook", "url": "http://127.0.0.1:1/"}}),
            400,
            "invalid_subscription",
            "colour: unknown key",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": 42, "sink": {"type": "webhook", "url": "http://127.0.0.1:1/"}}),
            400,
            "invalid_subscription",
            "channel: invalid type: integer `42`, expected a string",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": "/x", "sink": {"type": "webhook", "url": "http://127.0.0.1:1/", "colour": "red"}}),
            400,
            "invalid_subscription",
            "sink.colour: unknown key",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": "/x", "sink": {"type": "webhook", "url": 42}}),
            400,
            "invalid_subscription",
            "sink.url: invalid type: integer `42`, expected a string",
        ),
        (
            json!({"id": "x", "source": "demo", "channel": "/x", "retry": {"max_backoff": 5}, "sink": {"type": "webhook", "url": "http://127.0.0.1:1/"}}),
            400,
            "invalid_subscription",
            "retry.max_backoff: invalid type: integer `5`, expected a string",
        ),
        (
            webhook_body("x", "/x", &receiver)
                .as_object()
                .cloned()
                .map(|mut o| {
                    o.insert("source".into(), json!("nowhere"));
                    Value::Object(o)
                })
                .unwrap(),
            404,
            "unknown_source",
            "nowhere",
        ),
        (webhook_body("from-file", "/x", &receiver), 409, "conflict", "from-file"),
    ];
    for (body, status, code, needle) in cases {
        let (got_status, got_code, message) =
            error(post(body.to_string(), "application/json").await.expect("send")).await;
        assert_eq!((got_status, got_code.as_str()), (status, code), "{body}: {message}");
        assert!(message.contains(needle), "{body}: {message:?} should contain {needle:?}");
    }
    let (status, code, _) = error(post("{\"id\": ".into(), "application/json").await.expect("send")).await;
    assert_eq!((status, code.as_str()), (400, "malformed_json"));
    let (status, code, _) =
        error(post(webhook_body("t", "/t", &receiver).to_string(), "text/plain").await.expect("send")).await;
    assert_eq!((status, code.as_str()), (415, "unsupported_media_type"));
    let huge = json!({ "id": "x".repeat(70_000) }).to_string();
    let (status, code, _) = error(post(huge, "application/json").await.expect("send")).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    let (status, code, _) = error(client.get(app.url("/api/v1/nothing")).send().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code, _) = error(client.put(app.url("/api/v1/sources")).send().await.expect("send")).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    for (method, path) in
        [("POST", "/api/v1/dead-letters/nope/retry"), ("DELETE", "/api/v1/dead-letters/nope")]
    {
        let (status, body) = app.call(method, path, None).await;
        assert_eq!((status, body["error"].clone()), (404, json!("not_found")), "{method} {path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_token_guards_the_api_but_not_health_or_metrics() {
    let faye = faye().await;
    let app = TestApp::spawn_in(&source(&faye), tempfile::tempdir().expect("state"), Some("s3cret")).await;
    let client = crate::support::http_client();
    for path in ["/healthz", "/metrics"] {
        assert_eq!(client.get(app.url(path)).send().await.expect("send").status(), 200, "{path} stays open");
    }
    for authorization in [None, Some("Bearer wrong"), Some("s3cret"), Some("Basic s3cret")] {
        let mut request = client.get(app.url("/api/v1/sources"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert_eq!(
            response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"cometd-bridge\"")
        );
        let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
        assert_eq!(body["error"], "unauthorized");
    }
    let response = client
        .get(app.url("/api/v1/sources"))
        .header("authorization", "Bearer s3cret")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn runtime_subscriptions_survive_a_restart() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&source(&faye)).await;
    app.wait_ready().await;
    let (status, body) =
        app.call("POST", "/api/v1/subscriptions", Some(webhook_body("kept", "/kept", &receiver))).await;
    assert_eq!(status, 201, "{body}");
    let state = app.stop().await;

    let app = TestApp::spawn_in(&source(&faye), state, None).await;
    app.wait_ready().await;
    let (status, body) = app.call("GET", "/api/v1/subscriptions/kept", None).await;
    assert_eq!((status, body["state"].clone(), body["origin"].clone()), (200, json!("active"), json!("api")));
    publish(&faye, "/kept", json!("after restart")).await;
    assert_eq!(receiver.next().await.json()["data"], "after restart");
    app.stop().await;
}

#[tokio::test]
async fn a_subscription_is_kept_through_kill_9_right_after_201() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let state = tempfile::tempdir().expect("state");
    let file = state.path().join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nallow_private_webhooks = true\n[state]\npath = \"{}\"\n{}",
            state.path().display(),
            source(&faye)
        ),
    )
    .expect("write config");
    let client = crate::support::http_client();
    let daemon = Daemon::start(&file).await;
    let admin = daemon.admin.clone();
    let response = client
        .post(format!("http://{admin}/api/v1/subscriptions"))
        .header("content-type", "application/json")
        .body(webhook_body("durable", "/durable", &receiver).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    daemon.kill_9().await;

    let daemon = Daemon::start(&file).await;
    let admin = daemon.admin.clone();
    let response =
        client.get(format!("http://{admin}/api/v1/subscriptions/durable")).send().await.expect("get");
    assert_eq!(response.status(), 200, "the acknowledged subscription survived kill -9");
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.get(format!("http://{admin}/readyz")).send().await.expect("readyz").status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready after restart");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    publish(&faye, "/durable", json!("after kill")).await;
    assert_eq!(receiver.next().await.json()["data"], "after kill");
}

#[tokio::test]
async fn dead_letters_are_listed_retried_and_discarded() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([400, 400]).await;
    let app = TestApp::spawn(&format!(
        "{}[[subscriptions]]\nid = \"hook\"\nsource = \"demo\"\nchannel = \"/dl\"\nsink = {{ type = \"webhook\", url = \"{}\", secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\" }}\n",
        source(&faye),
        receiver.url()
    ))
    .await;
    app.wait_ready().await;
    publish(&faye, "/dl", json!("first")).await;
    publish(&faye, "/dl", json!("second")).await;
    let first_attempt = receiver.next().await;
    assert_eq!(first_attempt.status, 400);
    assert_eq!(receiver.next().await.status, 400);
    // The receiver is healthy now (it answers 200 from here on).
    let letters = app.wait_for_dead_letters(2).await;
    assert_eq!(letters[0]["message"]["data"], "first");
    assert_eq!(letters[0]["reason"], "rejected: HTTP 400");
    assert_eq!(letters[0]["subscription"], "hook");
    let first = letters[0]["id"].as_str().expect("id").to_string();
    let second = letters[1]["id"].as_str().expect("id").to_string();

    let (status, body) = app.call("POST", &format!("/api/v1/dead-letters/{first}/retry"), None).await;
    assert_eq!(status, 202, "{body}");
    let retried = receiver.next().await;
    assert_eq!((retried.status, retried.json()["data"].clone()), (200, json!("first")));
    assert_eq!(retried.header("webhook-id"), first_attempt.header("webhook-id"), "the same delivery id");
    let (status, _) = app.call("DELETE", &format!("/api/v1/dead-letters/{second}"), None).await;
    assert_eq!(status, 204);
    let (_, page) = app.call("GET", "/api/v1/dead-letters", None).await;
    assert_eq!(page, json!({"dead_letters": [], "next": null}));
    // A marker published after the discard: everything before it has arrived by then.
    publish(&faye, "/dl", json!("marker")).await;
    let next = receiver.next().await;
    assert_eq!(next.json()["data"], "marker", "the discarded one was not delivered before the marker");
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_document_is_served() {
    let faye = faye().await;
    let app = TestApp::spawn(&source(&faye)).await;
    let (status, document) = app.call("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().is_some_and(|version| version.starts_with("3.")), "{document}");
    assert!(document["paths"]["/api/v1/subscriptions"]["post"].is_object());
    app.stop().await;
}
