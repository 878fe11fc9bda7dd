//! Scenario: the bridge into one webhook receiver through 10 subscriptions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::RUNS;
use crate::flood::flood_command;
use crate::process::Proc;
use crate::servers::{source, start_bridge};
use crate::summary::summary;

/// Bridge → one webhook receiver through 10 subscriptions: rate and per-subscription order.
pub async fn bridge_webhook(url: &str) -> Value {
    const COUNT: u64 = 20_000;
    let received = Arc::new(Mutex::new(BTreeMap::<String, Vec<u64>>::new()));
    let total = Arc::new(AtomicU64::new(0));
    let app = {
        let received = received.clone();
        let total = total.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let received = received.clone();
                let total = total.clone();
                async move {
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let subscription = body["subscription"].as_str().unwrap_or_default().to_string();
                    received
                        .lock()
                        .expect("lock")
                        .entry(subscription)
                        .or_default()
                        .push(body["data"]["seq"].as_u64().unwrap_or(0));
                    total.fetch_add(1, Ordering::Relaxed);
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut rates = Vec::new();
    let mut ordered = true;
    for _ in 0..RUNS {
        received.lock().expect("lock").clear();
        total.store(0, Ordering::Relaxed);
        let dir = tempfile::tempdir().expect("temp dir");
        let subscriptions: String = (0..10)
            .map(|i| format!("[[subscriptions]]\nid = \"w{i}\"\nsource = \"bench\"\nchannel = \"/bench/w{i}\"\nsink = {{ type = \"webhook\", url = \"{hook}\" }}\n"))
            .collect();
        let (bridge, _, _) = start_bridge(&format!("{}{subscriptions}", source(url)), dir.path()).await;
        let channels: Vec<String> = (0..10).map(|i| format!("/bench/w{i}")).collect();
        let channel_refs: Vec<&str> = channels.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut publisher = Proc::spawn(flood_command(url, COUNT, 64, 0, &channel_refs));
        let deadline = Instant::now() + Duration::from_secs(120);
        while total.load(Ordering::Relaxed) < COUNT && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rates.push(total.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64());
        ordered &=
            received.lock().expect("lock").values().all(|seqs| seqs.windows(2).all(|pair| pair[0] < pair[1]));
        let _ = publisher.line();
        publisher.reap();
        bridge.kill();
        eprintln!("webhook: {:.0} msg/s", rates.last().copied().unwrap_or(0.0));
    }
    server.abort();
    json!({"messages": COUNT, "subscriptions": 10, "rate": summary(&rates), "order_kept": ordered})
}
