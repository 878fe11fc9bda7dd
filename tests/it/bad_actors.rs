//! Bad actors, second round: a webhook receiver asking for an endless `Retry-After`,
//! host names resolving to private addresses, foreign `Host` and `Origin` headers,
//! credentials in URLs, and admin calls cut by a client that goes away.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use cometd_bridge::sink::destination::FixedNames;

use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::bayeux::BayeuxServer;
use crate::support::peer::open;
use crate::support::scenario::{faye, source, webhook};
use crate::support::webhook::WebhookReceiver;

async fn publish(faye: &BayeuxServer, channel: &str, data: Value) {
    let client = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    client.publish(channel, data).await.expect("publish");
}

/// The sum of every `cometd_bridge_task_restarts_total` series (0 when none is shown).
fn task_restarts(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("cometd_bridge_task_restarts_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn an_endless_retry_after_is_capped_at_max_backoff() {
    let faye = faye().await;
    // As the issue saw it: 503 without `Retry-After`, then 503 asking for u64::MAX seconds.
    let mut receiver = WebhookReceiver::start([503, 503]).await;
    receiver.retry_after([None, Some("18446744073709551615")]);
    // `webhook` sets `retry.max_backoff = "1s"`.
    let app =
        TestApp::spawn(&format!("{}{}", source(&faye), webhook("greedy", "/greedy", &receiver.url()))).await;
    app.wait_ready().await;
    publish(&faye, "/greedy", json!({ "n": 1 })).await;
    for _ in 0..2 {
        assert_eq!(receiver.next().await.status, 503);
    }
    let refused_at = Instant::now();
    let delivered = receiver.next().await;
    let waited = refused_at.elapsed();
    assert_eq!((delivered.status, delivered.json()["data"].clone()), (200, json!({ "n": 1 })));
    // The bound the issue names: max_backoff (1 s), with room for the request itself.
    assert!(waited < Duration::from_secs(3), "retried after {waited:?}");
    assert_eq!(task_restarts(&app.metrics().await), 0.0, "no task was restarted");
    let readyz = crate::support::http_client().get(app.url("/readyz")).send().await.expect("readyz");
    assert_eq!(readyz.status(), 200, "{}", readyz.text().await.unwrap_or_default());
    app.stop().await;
}

/// A webhook body for `url` on `channel`.
fn posted(id: &str, channel: &str, url: &str) -> Value {
    json!({ "id": id, "source": "demo", "channel": channel, "sink": { "type": "webhook", "url": url } })
}

/// The port of the receiver's URL.
fn port(receiver: &WebhookReceiver) -> u16 {
    reqwest::Url::parse(&receiver.url()).expect("a URL").port().expect("a port")
}

#[tokio::test]
async fn a_posted_host_name_resolving_to_loopback_is_refused_when_posted_and_when_rebound() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let names = FixedNames::default();
    names.set("ssrf-check.test", vec![Ipv4Addr::LOCALHOST.into()]);
    // TEST-NET-1: public as far as the check can tell, never contacted here.
    names.set("rebind.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
    // Private webhooks not allowed; the configuration's own webhook to 127.0.0.1 is trusted.
    let configured = webhook("configured", "/trusted", &receiver.url());
    let app = TestApp::spawn_resolving(&format!("{}{configured}", source(&faye)), "", names.clone()).await;
    app.wait_ready().await;
    let url = format!("http://ssrf-check.test:{}/hook", port(&receiver));
    let (status, answer) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("sneaky", "/sneaky", &url))).await;
    assert_eq!((status, answer["error"].clone()), (400, json!("forbidden_destination")), "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("ssrf-check.test resolves to 127.0.0.1, a loopback address"), "{message}");

    // Public when posted, rebound to loopback before it connects: refused when connecting.
    let url = format!("http://rebind.test:{}/hook", port(&receiver));
    let (status, created) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("rebinding", "/rebinding", &url))).await;
    assert_eq!((status, created["state"].clone()), (201, json!("active")), "{created}");
    names.set("rebind.test", vec![Ipv4Addr::LOCALHOST.into()]);
    publish(&faye, "/rebinding", json!("secret plans")).await;
    let letters = app.wait_for_dead_letters(1).await;
    let reason = letters[0]["reason"].as_str().expect("a reason");
    assert!(
        reason.contains("rebind.test resolves to 127.0.0.1, a loopback address"),
        "a clear reason: {reason}"
    );
    assert_eq!(letters[0]["subscription"], "rebinding");
    publish(&faye, "/trusted", json!("from the file")).await;
    let request = receiver.next().await;
    assert_eq!(
        request.json()["subscription"],
        "configured",
        "only the configured webhook reached the receiver"
    );
    app.stop().await;
}

#[tokio::test]
async fn ipv6_forms_of_private_addresses_are_refused_when_posted() {
    let faye = faye().await;
    let app = TestApp::spawn_with_admin(&source(&faye), "").await;
    for url in [
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://[::127.0.0.1]:9/hook",
        "http://[64:ff9b::7f00:1]:9/hook",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "http://[fc00::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::]:9/hook",
        "http://[2002:7f00:1::1]/hook",
        "http://0.0.0.0:9/hook",
    ] {
        let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(posted("p", "/p", url))).await;
        assert_eq!(
            (status, answer["error"].clone()),
            (400, json!("forbidden_destination")),
            "{url}: {answer}"
        );
    }
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(listed, json!([]), "nothing was stored");
    app.stop().await;
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_delivered_when_private_webhooks_are_allowed() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let names = FixedNames::default();
    names.set("ssrf-check.test", vec![Ipv4Addr::LOCALHOST.into()]);
    let app = TestApp::spawn_resolving(&source(&faye), "allow_private_webhooks = true\n", names).await;
    app.wait_ready().await;
    let url = format!("http://ssrf-check.test:{}/hook", port(&receiver));
    let (status, created) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("allowed", "/allowed", &url))).await;
    assert_eq!((status, created["state"].clone()), (201, json!("active")), "{created}");
    publish(&faye, "/allowed", json!("welcome")).await;
    let request = receiver.next().await;
    assert_eq!(
        (request.json()["subscription"].clone(), request.json()["data"].clone()),
        (json!("allowed"), json!("welcome"))
    );
    assert_eq!(app.dead_letters().await.len(), 0);
    app.stop().await;
}

/// Every route that changes something, with a body where it takes one.
fn changing_routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("POST", "/api/v1/subscriptions", Some(posted("evil", "/**", "https://hooks.example.com/x"))),
        ("DELETE", "/api/v1/subscriptions/kept", None),
        ("POST", "/api/v1/subscriptions/kept/position", Some(json!({ "replay_from": "all" }))),
        ("POST", "/api/v1/dead-letters/none/retry", None),
        ("DELETE", "/api/v1/dead-letters/none", None),
        ("POST", "/api/v1/reload", None),
    ]
}

/// Calls `path` with these `Host` and `Origin` headers; the status and the error code.
async fn call_as(
    app: &TestApp,
    (method, path, body): &(&str, &str, Option<Value>),
    host: Option<&str>,
    origin: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let client = crate::support::http_client();
    let mut request = client.request(method.parse().expect("method"), app.url(path));
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    for (name, value) in [("host", host), ("origin", origin)] {
        if let Some(value) = value {
            request = request.header(name, value);
        }
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the admin server answers");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("a body");
    let body = serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null);
    (status, body["error"].clone())
}

#[tokio::test]
async fn a_tokenless_api_serves_only_its_own_host_and_origin() {
    let faye = faye().await;
    let receiver = WebhookReceiver::start([]).await;
    let app =
        TestApp::spawn(&format!("{}{}", source(&faye), webhook("kept", "/kept", &receiver.url()))).await;
    app.wait_ready().await;
    let own_host = app.admin.to_string();
    let own_origin = format!("http://{own_host}");
    for route in changing_routes() {
        let (status, error) =
            call_as(&app, &route, Some("evil.example"), Some("https://evil.example"), None).await;
        assert_eq!((status, error), (421, json!("misdirected_request")), "{route:?}");
        let (status, error) = call_as(&app, &route, Some("evil.example:80"), None, None).await;
        assert_eq!((status, error), (421, json!("misdirected_request")), "{route:?}");
        let (status, error) = call_as(&app, &route, None, Some("https://evil.example"), None).await;
        assert_eq!((status, error), (403, json!("forbidden_origin")), "{route:?}");
        let (status, error) = call_as(&app, &route, None, Some("null"), None).await;
        assert_eq!((status, error), (403, json!("forbidden_origin")), "{route:?}");
    }
    // Reading stays possible from its own names; nothing was changed.
    let port = app.admin.port();
    for host in [own_host.clone(), format!("localhost:{port}"), format!("[::1]:{port}")] {
        let list = ("GET", "/api/v1/subscriptions", None);
        assert_eq!(call_as(&app, &list, Some(&host), None, None).await.0, 200, "{host}");
    }
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    let ids: Vec<&str> = listed.as_array().expect("array").iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, ["kept"], "nothing was added or removed");
    // Its own origin may change things (the status page does).
    let reload = ("POST", "/api/v1/reload", None);
    assert_eq!(call_as(&app, &reload, Some(&own_host), Some(&own_origin), None).await.0, 200);
    let page = crate::support::http_client().get(app.url("/")).header("host", "evil.example").send().await;
    assert_eq!(page.expect("answers").status(), 421, "the status page too");
    app.stop().await;
}

#[tokio::test]
async fn allowed_hosts_are_served_and_a_token_keeps_todays_behaviour() {
    let faye = faye().await;
    let app = TestApp::spawn_with_admin(&source(&faye), "allowed_hosts = [\"bridge.internal\"]\n").await;
    let list = ("GET", "/api/v1/subscriptions", None);
    assert_eq!(call_as(&app, &list, Some("bridge.internal"), None, None).await.0, 200);
    assert_eq!(call_as(&app, &list, Some("other.internal"), None, None).await.0, 421);
    app.stop().await;

    let app = TestApp::spawn_in(&source(&faye), tempfile::tempdir().expect("dir"), Some("t0ken")).await;
    let reload = ("POST", "/api/v1/reload", None);
    let (status, _) =
        call_as(&app, &reload, Some("evil.example"), Some("https://evil.example"), Some("t0ken")).await;
    assert_eq!(status, 200, "the token protects");
    let (status, _) = call_as(&app, &reload, Some("evil.example"), None, None).await;
    assert_eq!(status, 401);
    let (status, _) = call_as(&app, &list, None, None, None).await;
    assert_eq!(status, 401);
    let lower = crate::support::http_client()
        .get(app.url("/api/v1/subscriptions"))
        .header("authorization", "bearer t0ken")
        .send()
        .await
        .expect("answers");
    assert_eq!(lower.status(), 200, "the scheme is case-insensitive");
    app.stop().await;
}

#[tokio::test]
async fn the_api_adds_no_more_than_max_subscriptions() {
    let faye = faye().await;
    let receiver = WebhookReceiver::start([]).await;
    let configured = webhook("configured", "/one", &receiver.url());
    let app = TestApp::spawn_with_admin(
        &format!("{}{configured}", source(&faye)),
        "allow_private_webhooks = true\nmax_subscriptions = 2\n",
    )
    .await;
    let second = posted("second", "/two", &receiver.url());
    assert_eq!(app.call("POST", "/api/v1/subscriptions", Some(second.clone())).await.0, 201);
    let (status, error) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("third", "/three", &receiver.url()))).await;
    assert_eq!((status, error["error"].clone()), (409, json!("too_many_subscriptions")), "{error}");
    assert!(error["message"].as_str().unwrap_or_default().contains("admin.max_subscriptions"), "{error}");
    assert_eq!(app.call("GET", "/api/v1/subscriptions/third", None).await.0, 404, "nothing stored");
    assert_eq!(app.call("DELETE", "/api/v1/subscriptions/second", None).await.0, 204);
    assert_eq!(
        app.call("POST", "/api/v1/subscriptions", Some(posted("third", "/three", &receiver.url()))).await.0,
        201
    );
    app.stop().await;
}

#[tokio::test]
async fn credentials_in_webhook_urls_are_masked_in_answers_and_dead_letters() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn(&source(&faye)).await;
    app.wait_ready().await;
    let secret_url = format!("http://user:hunter2@127.0.0.1:{}/hook?token=tok3n&page=2", port(&receiver));
    let masked_url = format!("http://***:***@127.0.0.1:{}/hook?token=***&page=2", port(&receiver));
    let (status, created) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("masked", "/masked", &secret_url))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["sink"]["url"], json!(masked_url));
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(listed[0]["sink"]["url"], json!(masked_url));
    let (_, one) = app.call("GET", "/api/v1/subscriptions/masked", None).await;
    assert_eq!(one["sink"]["url"], json!(masked_url));
    // The real URL is still the one posted to.
    publish(&faye, "/masked", json!("hello")).await;
    let request = receiver.next().await;
    assert_eq!(request.json()["data"], "hello");

    // A webhook nobody listens on: reqwest's error names the URL; the reason must not.
    let closed =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    let closed_url = format!("http://user:hunter2@127.0.0.1:{closed}/hook?api_key=k3y");
    let mut body = posted("closed", "/closed", &closed_url);
    body["retry"] = json!({ "max_elapsed": "500ms", "max_backoff": "100ms" });
    assert_eq!(app.call("POST", "/api/v1/subscriptions", Some(body)).await.0, 201);
    publish(&faye, "/closed", json!("lost")).await;
    let letters = app.wait_for_dead_letters(1).await;
    let reason = letters[0]["reason"].as_str().expect("a reason");
    assert!(reason.contains("connection failed"), "{reason}");
    for secret in ["hunter2", "k3y", "user"] {
        assert!(!reason.contains(secret), "{secret} in {reason}");
    }
    app.stop().await;
}

#[tokio::test]
async fn readyz_without_the_token_says_why_in_general_terms_only() {
    let closed =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    let toml = format!(
        "[[sources]]\nname = \"secret-source\"\nurl = \"http://127.0.0.1:{closed}/bayeux?token=tok3n\"\n[[subscriptions]]\nid = \"hidden-id\"\nsource = \"secret-source\"\nchannel = \"/hidden/channel\"\nsink = {{ type = \"webhook\", url = \"http://127.0.0.1:9/hook\" }}\n"
    );
    let app = TestApp::spawn_in(&toml, tempfile::tempdir().expect("dir"), Some("t0ken")).await;
    let client = crate::support::http_client();
    let anonymous = client.get(app.url("/readyz")).send().await.expect("readyz");
    assert_eq!(anonymous.status(), 503);
    let anonymous: Value = serde_json::from_slice(&anonymous.bytes().await.expect("body")).expect("JSON");
    assert_eq!(anonymous, json!({ "status": "not ready", "reasons": ["a source is not connected"] }));
    let detailed = client.get(app.url("/readyz")).bearer_auth("t0ken").send().await.expect("readyz");
    assert_eq!(detailed.status(), 503);
    let detailed: Value = serde_json::from_slice(&detailed.bytes().await.expect("body")).expect("JSON");
    let reasons = detailed["reasons"].to_string();
    assert!(reasons.contains("source secret-source is"), "the details with the token: {reasons}");
    assert!(!reasons.contains("tok3n"), "credentials masked even then: {reasons}");
    app.stop().await;
}

#[tokio::test]
async fn the_state_buckets_subjects_are_reserved_for_its_spools() {
    let faye = faye().await;
    let nats = crate::support::nats::NatsServer::start().await;
    let toml = format!("[nats]\nurl = \"{}\"\n{}", nats.url(), source(&faye));
    let state_keys = "backend = \"nats\"\nbucket = \"bridge\"\n";
    let app = TestApp::spawn_with_state(&toml, tempfile::tempdir().expect("dir"), None, state_keys).await;
    app.wait_ready().await;
    let nats_body = |id: &str, channel: &str, subject: &str| json!({ "id": id, "source": "demo", "channel": channel, "sink": { "type": "nats", "subject": subject } });
    for subject in ["bridge.spool.766963746966", "bridge.{channel}"] {
        let (status, answer) =
            app.call("POST", "/api/v1/subscriptions", Some(nats_body("forged", "/x", subject))).await;
        assert_eq!(status, 400, "{subject}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains("sink.subject") && message.contains("state.bucket"), "{message}");
    }
    // A subject only a publisher's channel makes reserved: refused when it renders.
    let (status, answer) =
        app.call("POST", "/api/v1/subscriptions", Some(nats_body("forger", "/bridge/**", "{channel}"))).await;
    assert_eq!(status, 201, "{answer}");
    let mut spools =
        async_nats::connect(nats.url()).await.expect("connect").subscribe("bridge.>").await.expect("sub");
    publish(&faye, "/bridge/spool/766963746966", json!({ "forged": "record" })).await;
    let letters = app.wait_for_dead_letters(1).await;
    let reason = letters[0]["reason"].as_str().expect("a reason");
    assert!(reason.contains("\"bridge.\"") && reason.contains("keeps its state"), "{reason}");
    // Nothing was published under the bucket's prefix but the bridge's own spool records.
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(200), futures_util::StreamExt::next(&mut spools)).await
    {
        assert!(
            !String::from_utf8_lossy(&message.payload).starts_with("{\"forged\""),
            "a forged record: {message:?}"
        );
    }
    app.stop().await;

    // The configuration file is checked the same way.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("bridge.toml");
    std::fs::write(
        &file,
        format!(
            "[state]\nbackend = \"nats\"\nbucket = \"bridge\"\n{toml}[[subscriptions]]\nid = \"s\"\nsource = \"demo\"\nchannel = \"/x\"\nsink = {{ type = \"nats\", subject = \"bridge.spool.73\" }}\n"
        ),
    )
    .expect("write");
    let error = cometd_bridge::config::load(&file, &cometd_bridge::config::Env::new()).expect_err("refused");
    assert!(
        error
            .to_string()
            .contains("subscriptions[0].sink.subject: \"bridge.spool.73\" starts with \"bridge.\""),
        "{error}"
    );
}

/// Calls the API and gives up after 100 ms, closing the connection (as `curl -m` does).
async fn cut(app: &TestApp, method: &str, path: &str, body: Option<Value>) {
    let client = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().expect("client");
    let mut request = client.request(method.parse().expect("method"), app.url(path));
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    let answer = request.send().await;
    assert!(answer.as_ref().is_err_and(reqwest::Error::is_timeout), "cut before the answer: {answer:?}");
}

/// Polls `GET path` until `done` holds for its status and body, failing after the wait.
async fn wait_until(app: &TestApp, path: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + crate::support::peer::WAIT;
    loop {
        let (status, body) = app.call("GET", path, None).await;
        if done(status, &body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "GET {path}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(app: &TestApp) -> u16 {
    crate::support::http_client().get(app.url("/readyz")).send().await.expect("readyz").status().as_u16()
}

#[tokio::test]
async fn a_cut_delete_and_a_cut_post_complete_and_survive_a_restart() {
    let faye = faye().await;
    let mut slow = WebhookReceiver::start([]).await;
    slow.hold(Duration::from_secs(2));
    let app = TestApp::spawn(&source(&faye)).await;
    app.wait_ready().await;
    let (status, _) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("busy", "/busy", &slow.url()))).await;
    assert_eq!(status, 201);
    publish(&faye, "/busy", json!("held")).await;
    slow.next().await; // in flight now, held by the receiver
    // The DELETE waits for the delivery in flight; its client gives up first.
    cut(&app, "DELETE", "/api/v1/subscriptions/busy", None).await;
    // A POST waits for the DELETE (one change at a time); its client gives up too.
    cut(&app, "POST", "/api/v1/subscriptions", Some(posted("later", "/later", &slow.url()))).await;
    wait_until(&app, "/api/v1/subscriptions/busy", |status, _| status == 404).await;
    let later = wait_until(&app, "/api/v1/subscriptions/later", |status, _| status == 200).await;
    assert_eq!(later["origin"], "api");
    let (status, error) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("later", "/later", &slow.url()))).await;
    assert_eq!((status, error["error"].clone()), (409, json!("conflict")), "it exists, and is listed");
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(ready(&app).await, 200);

    let state = app.stop().await;
    let app = TestApp::spawn_in(&source(&faye), state, None).await;
    app.wait_ready().await;
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    let ids: Vec<&str> = listed.as_array().expect("array").iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, ["later"], "the restart agrees: busy removed, later added");
    app.stop().await;
}

#[tokio::test]
async fn a_cut_reload_completes_and_survives_a_restart() {
    let faye = faye().await;
    let mut slow = WebhookReceiver::start([]).await;
    slow.hold(Duration::from_secs(2));
    let mut fast = WebhookReceiver::start([]).await;
    let before = format!("{}{}", source(&faye), webhook("changing", "/changing", &slow.url()));
    let after = format!("{}{}", source(&faye), webhook("changing", "/changing", &fast.url()));
    let app = TestApp::spawn(&before).await;
    app.wait_ready().await;
    publish(&faye, "/changing", json!(1)).await;
    slow.next().await; // in flight now, held by the receiver
    app.rewrite_config(&after);
    cut(&app, "POST", "/api/v1/reload", None).await;
    let view = wait_until(&app, "/api/v1/subscriptions/changing", |status, body| {
        status == 200 && body["sink"]["url"] == json!(fast.url())
    })
    .await;
    assert_eq!(view["origin"], "config");
    assert_eq!(ready(&app).await, 200);
    publish(&faye, "/changing", json!(2)).await;
    assert_eq!(fast.next().await.json()["data"], 2, "the new sink delivers");

    let state = app.stop().await;
    let app = TestApp::spawn_in(&after, state, None).await;
    app.wait_ready().await;
    let (status, view) = app.call("GET", "/api/v1/subscriptions/changing", None).await;
    assert_eq!((status, view["sink"]["url"].clone()), (200, json!(fast.url())), "{view}");
    app.stop().await;
}

#[tokio::test]
async fn a_cut_position_reset_completes_and_survives_a_restart() {
    const CHANNEL: &str = "/event/Order__e";
    let extensions = vec![("salesforce".to_string(), json!({}))];
    let options = crate::support::bayeux::FayeOptions { timeout: Some(2), extensions, ..Default::default() };
    let faye = BayeuxServer::faye(options).await;
    let mut slow = WebhookReceiver::start([]).await;
    slow.hold(Duration::from_secs(2));
    let mut orders = WebhookReceiver::start([]).await;
    let toml = format!(
        "[[sources]]\nname = \"demo\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nreplay = true\n{}",
        faye.url(),
        webhook("orders", CHANNEL, &orders.url())
    );
    let app = TestApp::spawn(&toml).await;
    app.wait_ready().await;
    publish(&faye, CHANNEL, json!({ "n": 1 })).await;
    assert_eq!(orders.next().await.json()["data"]["payload"]["n"], 1);
    let path = "/api/v1/subscriptions/orders";
    wait_until(&app, path, |_, view| view["positions"][CHANNEL].as_i64().is_some_and(|id| id > 0)).await;
    // A slow delivery being removed holds the one change at a time; the reset waits, cut.
    let (status, _) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("busy", "/busy", &slow.url()))).await;
    assert_eq!(status, 201);
    publish(&faye, "/busy", json!("held")).await;
    slow.next().await;
    cut(&app, "DELETE", "/api/v1/subscriptions/busy", None).await;
    cut(&app, "POST", "/api/v1/subscriptions/orders/position", Some(json!({ "replay_from": "new" }))).await;
    wait_until(&app, path, |_, view| view["positions"][CHANNEL] == json!(-1)).await;
    // Subscribed again from the new position (a cut reset left the channel unsubscribed).
    app.wait_ready().await;
    wait_until(&app, path, |_, view| view["state"] == "active").await;
    publish(&faye, CHANNEL, json!({ "n": 2 })).await;
    assert_eq!(orders.next().await.json()["data"]["payload"]["n"], 2, "still delivering after the reset");

    let (_, before) = app.call("GET", path, None).await;
    let state = app.stop().await;
    let app = TestApp::spawn_in(&toml, state, None).await;
    app.wait_ready().await;
    let (_, after) = app.call("GET", path, None).await;
    assert_eq!(after["positions"], before["positions"], "the restart resumes from the same position");
    assert_eq!(app.call("GET", "/api/v1/subscriptions/busy", None).await.0, 404);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_api_changes_during_reloads_leave_a_consistent_state() {
    let faye = faye().await;
    let first = WebhookReceiver::start([]).await;
    let second = WebhookReceiver::start([]).await;
    let config = |receiver: &WebhookReceiver| {
        format!("{}{}", source(&faye), webhook("configured", "/configured", &receiver.url()))
    };
    let app = std::sync::Arc::new(TestApp::spawn(&config(&first)).await);
    app.wait_ready().await;
    // 50 changes: 25 subscriptions added, the odd ones removed again, all at once.
    let changes: Vec<_> = (0..25)
        .map(|n| {
            let app = app.clone();
            let url = first.url();
            tokio::spawn(async move {
                let id = format!("c{n}");
                let mut statuses = vec![
                    app.call("POST", "/api/v1/subscriptions", Some(posted(&id, &format!("/c/{n}"), &url)))
                        .await
                        .0,
                ];
                if n % 2 == 1 {
                    statuses.push(app.call("DELETE", &format!("/api/v1/subscriptions/{id}"), None).await.0);
                }
                statuses
            })
        })
        .collect();
    for round in 0..10 {
        app.rewrite_config(&config(if round % 2 == 0 { &second } else { &first }));
        let (status, answer) = app.call("POST", "/api/v1/reload", None).await;
        assert_eq!(status, 200, "reload {round}: {answer}");
    }
    for change in changes {
        let statuses = change.await.expect("the change ran");
        assert!(statuses == [201] || statuses == [201, 204], "{statuses:?}");
    }
    let expected: Vec<String> = std::iter::once("configured".to_string())
        .chain((0..25).filter(|n| n % 2 == 0).map(|n| format!("c{n}")))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let ids = |listed: &Value| -> Vec<String> {
        listed.as_array().expect("array").iter().filter_map(|s| s["id"].as_str().map(String::from)).collect()
    };
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(ids(&listed), expected);
    let configured = listed.as_array().expect("array").iter().find(|s| s["id"] == "configured").cloned();
    assert_eq!(configured.expect("configured")["sink"]["url"], json!(first.url()), "the last reload applied");
    app.wait_ready().await;

    let app = std::sync::Arc::into_inner(app).expect("the only handle");
    let state = app.stop().await;
    let app = TestApp::spawn_in(&config(&first), state, None).await;
    app.wait_ready().await;
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(ids(&listed), expected, "the restart agrees");
    app.stop().await;
}
