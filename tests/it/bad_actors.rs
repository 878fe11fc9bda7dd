//! Bad actors, second round: a webhook receiver asking for an endless `Retry-After`,
//! host names resolving to private addresses, foreign `Host` and `Origin` headers,
//! credentials in URLs, and admin calls cut by a client that goes away.

use std::time::{Duration, Instant};

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
async fn a_posted_host_name_resolving_to_loopback_is_refused_when_connecting() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    // Private webhooks not allowed; the configuration's own webhook to 127.0.0.1 is trusted.
    let configured = webhook("configured", "/trusted", &receiver.url());
    let app = TestApp::spawn_resolving_to_loopback(
        &format!("{}{configured}", source(&faye)),
        "",
        "ssrf-check.test",
    )
    .await;
    app.wait_ready().await;
    let url = format!("http://ssrf-check.test:{}/hook", port(&receiver));
    let (status, created) =
        app.call("POST", "/api/v1/subscriptions", Some(posted("sneaky", "/sneaky", &url))).await;
    assert_eq!((status, created["state"].clone()), (201, json!("active")), "{created}");
    publish(&faye, "/sneaky", json!("secret plans")).await;
    let letters = app.wait_for_dead_letters(1).await;
    let reason = letters[0]["reason"].as_str().expect("a reason");
    assert!(
        reason.contains("ssrf-check.test resolves to 127.0.0.1, a loopback address"),
        "a clear reason: {reason}"
    );
    assert_eq!(letters[0]["subscription"], "sneaky");
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
    let app = TestApp::spawn_resolving_to_loopback(
        &source(&faye),
        "allow_private_webhooks = true\n",
        "ssrf-check.test",
    )
    .await;
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
