//! Scenario: the idle daemon, time to ready and memory.

use std::time::Duration;

use serde_json::{Value, json};

use crate::RUNS;
use crate::process::rss_kb;
use crate::servers::{source, start_bridge};
use crate::summary::summary;

pub async fn idle_daemon(url: &str) -> Value {
    let mut ready = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..RUNS {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "{}[[subscriptions]]\nid = \"idle\"\nsource = \"bench\"\nchannel = \"/bench/idle\"\nsink = {{ type = \"webhook\", url = \"http://127.0.0.1:9/\" }}\n",
            source(url)
        );
        let (bridge, _, to_ready) = start_bridge(&config, dir.path()).await;
        tokio::time::sleep(Duration::from_secs(2)).await; // idle
        ready.push(to_ready.as_secs_f64() * 1000.0);
        rss.push(rss_kb(bridge.pid()) as f64);
        bridge.kill();
    }
    json!({"ready_ms": summary(&ready), "rss_kb": summary(&rss)})
}
