//! Scenario: what a full subscription costs its healthy neighbour on the same source.

use serde_json::{Value, json};

use crate::RUNS;
use crate::flood::flood_command;
use crate::process::{Proc, me};
use crate::servers::{source, start_bridge};
use crate::summary::{median, summary};

/// What a full subscription costs its neighbour: the rate of a healthy subscription (core
/// NATS) of a source while another subscription of the same source is full (a 64 KiB quota
/// behind a webhook that refuses connections, so it drops and counts), ÷ its rate with no
/// neighbour (the figure; the source then carries only half the flood), and ÷ its
/// rate beside a healthy neighbour on the other channel (a second NATS subscription: the
/// same CometD traffic, so what is left is the cost of being full). The same flood, half on
/// each channel, every time; the three take turns.
pub async fn bridge_neighbour(url: &str, nats_url: &str) -> Value {
    const COUNT: u64 = 40_000;
    let healthy = format!(
        "[nats]\nurl = \"{nats_url}\"\n{}[[subscriptions]]\nid = \"healthy\"\nsource = \"bench\"\nchannel = \"/bench/healthy\"\nsink = {{ type = \"nats\", subject = \"bench.healthy\" }}\n",
        source(url)
    );
    let full = "[[subscriptions]]\nid = \"full\"\nsource = \"bench\"\nchannel = \"/bench/full\"\nspool_max_bytes = \"64KiB\"\nsink = { type = \"webhook\", url = \"http://127.0.0.1:9/refused\" }\n";
    let working = "[[subscriptions]]\nid = \"full\"\nsource = \"bench\"\nchannel = \"/bench/full\"\nsink = { type = \"nats\", subject = \"bench.other\" }\n";
    let mut rates: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..RUNS {
        for (variant, neighbour) in [(0, ""), (1, working), (2, full)] {
            let dir = tempfile::tempdir().expect("temp dir");
            let (bridge, _, _) = start_bridge(&format!("{healthy}{neighbour}"), dir.path()).await;
            let mut nats_sub = Proc::spawn({
                let mut command = me();
                command.args(["nats-sub", nats_url, "bench.healthy", &(COUNT / 2).to_string()]);
                command
            });
            nats_sub.expect_ready();
            let mut publisher =
                Proc::spawn(flood_command(url, COUNT, 256, 0, &["/bench/healthy", "/bench/full"]));
            let _ = publisher.line();
            publisher.reap();
            let stats: Value = serde_json::from_str(&nats_sub.line().expect("stats")).expect("JSON");
            nats_sub.reap();
            bridge.kill();
            let span =
                (stats["last_us"].as_f64().unwrap_or(0.0) - stats["first_us"].as_f64().unwrap_or(0.0)) / 1e6;
            let rate = (stats["received"].as_f64().unwrap_or(0.0) - 1.0) / span.max(1e-9);
            let what = ["alone", "beside a healthy neighbour", "beside a full one"][variant];
            eprintln!("neighbour: healthy subscription {rate:.0} msg/s {what}");
            rates[variant].push(rate);
        }
    }
    let [alone, beside_healthy, beside_full] = rates.map(|runs| summary(&runs));
    let ratio = median(&beside_full) / median(&alone).max(1e-9);
    let ratio_same_traffic = median(&beside_full) / median(&beside_healthy).max(1e-9);
    json!({
        "messages_per_channel": COUNT / 2, "alone": alone, "beside_healthy": beside_healthy,
        "beside_full": beside_full, "ratio": ratio, "ratio_same_traffic": ratio_same_traffic,
    })
}
