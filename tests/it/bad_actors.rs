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
