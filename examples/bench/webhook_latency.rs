//! Scenario: a webhook receiver's latency against `max_in_flight`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::flood::flood_command;
use crate::process::Proc;
use crate::servers::{source, start_bridge};

/// The bridge → one webhook subscription whose receiver takes 20 ms or 100 ms per request,
/// with `max_in_flight` 1 and 16: messages a second, one run each (bounded by count).
pub async fn webhook_latency(url: &str) -> Value {
    let total = Arc::new(AtomicU64::new(0));
    let mut results = Vec::new();
    for (latency_ms, in_flight, count) in
        [(20u64, 1u64, 150u64), (100, 1, 50), (20, 16, 2_000), (100, 8, 600), (100, 16, 800)]
    {
        total.store(0, Ordering::Relaxed);
        let app = {
            let total = total.clone();
            axum::Router::new().route(
                "/hook",
                axum::routing::post(move || {
                    let total = total.clone();
                    async move {
                        // The receiver's latency is the scenario.
                        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                        total.fetch_add(1, Ordering::Relaxed);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hook = format!("http://{}/hook", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "{}[[subscriptions]]\nid = \"slow\"\nsource = \"bench\"\nchannel = \"/bench/slow\"\nsink = {{ type = \"webhook\", url = \"{hook}\", max_in_flight = {in_flight} }}\n",
            source(url)
        );
        let (bridge, _, _) = start_bridge(&config, dir.path()).await;
        let started = Instant::now();
        let mut publisher = Proc::spawn(flood_command(url, count, 64, 0, &["/bench/slow"]));
        let deadline = Instant::now() + Duration::from_secs(120);
        while total.load(Ordering::Relaxed) < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = total.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        let _ = publisher.line();
        publisher.reap();
        bridge.kill();
        server.abort();
        eprintln!("webhook at {latency_ms} ms, max_in_flight {in_flight}: {rate:.1} msg/s");
        results.push(
            json!({"latency_ms": latency_ms, "max_in_flight": in_flight, "messages": count, "rate": rate}),
        );
    }
    Value::Array(results)
}
