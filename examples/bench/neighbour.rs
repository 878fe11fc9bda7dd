//! Scenario: what a full subscription costs its healthy neighbour on the same source.

use serde_json::{Value, json};

use crate::RUNS;
use crate::flood::flood_command;
use crate::process::{Proc, me};
use crate::servers::{source, start_bridge};
use crate::summary::{median, summary};

/// What a full subscription costs its neighbour: the rate of a healthy subscription (core
/// NATS) of a source while another subscription of the same source is full (a 64 KiB quota
/// behind a webhook that refuses connections), ÷ its rate with no neighbour (the issue's
/// figure; the source then carries only half the flood), and ÷ its rate beside a healthy
/// neighbour on the other channel (a second NATS subscription: the same CometD traffic,
/// so what is left is the cost of being full). The same flood, half on each channel, every
/// time; the variants take turns.
///
/// On `url` (plain faye) the source has no replay: a full subscription drops and counts
/// every message of its channel, which the session must still receive. On `replay_url`
/// (the Salesforce-like fixture) the source has replay: a full subscription is held, its
/// channel unsubscribed upstream, and the healthy one is measured alone and beside it.
pub async fn bridge_neighbour(url: &str, replay_url: &str, nats_url: &str) -> Value {
    let full = "[[subscriptions]]\nid = \"full\"\nsource = \"bench\"\nchannel = \"/bench/full\"\nspool_max_bytes = \"64KiB\"\nsink = { type = \"webhook\", url = \"http://127.0.0.1:9/refused\" }\n";
    let working = "[[subscriptions]]\nid = \"full\"\nsource = \"bench\"\nchannel = \"/bench/full\"\nsink = { type = \"nats\", subject = \"bench.other\" }\n";
    let variants = [
        ("alone", url, false, ""),
        ("beside a healthy neighbour", url, false, working),
        ("beside a full one", url, false, full),
        ("alone (replay)", replay_url, true, ""),
        ("beside a full one (replay, held upstream)", replay_url, true, full),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..RUNS {
        for (index, (what, url, replay, neighbour)) in variants.iter().enumerate() {
            let rate = healthy_rate(url, *replay, neighbour, nats_url).await;
            eprintln!("neighbour: healthy subscription {rate:.0} msg/s {what}");
            rates[index].push(rate);
        }
    }
    let runs: Vec<Value> = rates.iter().map(|runs| summary(runs)).collect();
    let ratio = |over: usize, under: usize| median(&runs[over]) / median(&runs[under]).max(1e-9);
    json!({
        "messages_per_channel": COUNT / 2, "alone": runs[0], "beside_healthy": runs[1],
        "beside_full": runs[2], "ratio": ratio(2, 0), "ratio_same_traffic": ratio(2, 1),
        "replay_alone": runs[3], "replay_beside_full": runs[4], "replay_ratio": ratio(4, 3),
    })
}

const COUNT: u64 = 40_000;

/// The healthy subscription's rate, beside `neighbour`, over one flood.
async fn healthy_rate(url: &str, replay: bool, neighbour: &str, nats_url: &str) -> f64 {
    let replay = if replay { "replay = true\n" } else { "" };
    let healthy = format!(
        "[nats]\nurl = \"{nats_url}\"\n{}{replay}[[subscriptions]]\nid = \"healthy\"\nsource = \"bench\"\nchannel = \"/bench/healthy\"\nsink = {{ type = \"nats\", subject = \"bench.healthy\" }}\n",
        source(url)
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (bridge, _, _) = start_bridge(&format!("{healthy}{neighbour}"), dir.path()).await;
    let mut nats_sub = Proc::spawn({
        let mut command = me();
        command.args(["nats-sub", nats_url, "bench.healthy", &(COUNT / 2).to_string()]);
        command
    });
    nats_sub.expect_ready();
    let mut publisher = Proc::spawn(flood_command(url, COUNT, 256, 0, &["/bench/healthy", "/bench/full"]));
    let _ = publisher.line();
    publisher.reap();
    let stats: Value = serde_json::from_str(&nats_sub.line().expect("stats")).expect("JSON");
    nats_sub.reap();
    bridge.kill();
    let span = (stats["last_us"].as_f64().unwrap_or(0.0) - stats["first_us"].as_f64().unwrap_or(0.0)) / 1e6;
    (stats["received"].as_f64().unwrap_or(0.0) - 1.0) / span.max(1e-9)
}
