//! Scenario: client receive, each client on each transport and payload size.

use serde_json::{Value, json};

use crate::flood::flood_command;
use crate::process::{Proc, cpu_split_us};
use crate::servers::start_faye;
use crate::subscribers::subscriber_command;
use crate::summary::{median, summary};
use crate::{MESSAGES, RUNS};

/// One measurement of a subscriber receiving a flood.
pub struct Run {
    pub stats: Value,
    pub rate: f64,
    pub cpu_us_per_msg: f64,
    /// The user-space part of `cpu_us_per_msg`; the rest is the kernel's.
    pub user_us_per_msg: f64,
    pub max_rss_kb: u64,
    pub publisher_rate: f64,
}

pub fn receive_run(client: &str, url: &str, transport: &str, size: usize, count: u64) -> Run {
    let channel = "/bench/flood";
    let mut sub = Proc::spawn(subscriber_command(client, url, channel, count, transport));
    sub.expect_ready();
    let (user_at_ready, system_at_ready) = cpu_split_us(sub.pid());
    let mut publisher = Proc::spawn(flood_command(url, count, size, 0, &[channel]));
    let published: Value = serde_json::from_str(&publisher.line().expect("publisher result")).expect("JSON");
    publisher.reap();
    let stats: Value = serde_json::from_str(&sub.line().expect("subscriber stats")).expect("JSON");
    let usage = sub.reap();
    let received = stats["received"].as_f64().unwrap_or(0.0);
    let span = (stats["last_us"].as_f64().unwrap_or(0.0) - stats["first_us"].as_f64().unwrap_or(0.0)) / 1e6;
    // A subscriber that measures another process (`listen-sub`) reports that one's usage.
    let (user_us, system_us, max_rss_kb) = match stats["own_user_us"].as_u64() {
        Some(user) => (
            user,
            stats["own_system_us"].as_u64().unwrap_or(0),
            stats["own_max_rss_kb"].as_u64().unwrap_or(0),
        ),
        None => (
            usage.user_us.saturating_sub(user_at_ready),
            usage.system_us.saturating_sub(system_at_ready),
            usage.max_rss_kb,
        ),
    };
    Run {
        rate: if span > 0.0 { (received - 1.0) / span } else { 0.0 },
        cpu_us_per_msg: (user_us + system_us) as f64 / received.max(1.0),
        user_us_per_msg: user_us as f64 / received.max(1.0),
        max_rss_kb,
        publisher_rate: published["rate"].as_f64().unwrap_or(0.0),
        stats,
    }
}

/// Each client, both transports, two payload sizes. Each group gets a fresh faye: its heap
/// grows over a run, which would slow the later groups.
pub fn scenario() -> Value {
    let mut receive = Vec::new();
    for transport in ["websocket", "long-polling"] {
        for size in [64usize, 1024] {
            let (faye, url) = start_faye(60);
            const CLIENTS: [&str; 6] = [
                "cometd-bridge",
                "cometd-bridge-polled",
                "cometd-bridge-value",
                "cometd-bridge listen",
                "aiocometd",
                "cometd-js",
            ];
            // The clients take turns run by run, so that a slow spell of the machine (its
            // speed drifts by up to a fifth) falls on all of them, not on one client's runs.
            let mut runs_of: Vec<Vec<Run>> = CLIENTS.iter().map(|_| Vec::new()).collect();
            for _ in 0..RUNS {
                for (client, runs) in CLIENTS.iter().zip(&mut runs_of) {
                    runs.push(receive_run(client, &url, transport, size, MESSAGES));
                }
            }
            for (client, runs) in CLIENTS.into_iter().zip(runs_of) {
                let lost: u64 = runs.iter().map(|run| run.stats["gaps"].as_u64().unwrap_or(0)).sum();
                let received: Vec<u64> =
                    runs.iter().map(|run| run.stats["received"].as_u64().unwrap_or(0)).collect();
                let entry = json!({
                    "transport": transport, "payload": size, "client": client,
                    "rate": summary(&runs.iter().map(|run| run.rate).collect::<Vec<_>>()),
                    "cpu_us_per_msg": summary(&runs.iter().map(|run| run.cpu_us_per_msg).collect::<Vec<_>>()),
                    "user_us_per_msg": summary(&runs.iter().map(|run| run.user_us_per_msg).collect::<Vec<_>>()),
                    "p50_ms": summary(&runs.iter().map(|run| run.stats["p50_ms"].as_f64().unwrap_or(0.0)).collect::<Vec<_>>()),
                    "p99_ms": summary(&runs.iter().map(|run| run.stats["p99_ms"].as_f64().unwrap_or(0.0)).collect::<Vec<_>>()),
                    "max_rss_kb": summary(&runs.iter().map(|run| run.max_rss_kb as f64).collect::<Vec<_>>()),
                    "publisher_rate": summary(&runs.iter().map(|run| run.publisher_rate).collect::<Vec<_>>()),
                    "received": received, "gaps": lost,
                    "duplicates": runs.iter().map(|run| run.stats["duplicates"].as_u64().unwrap_or(0)).sum::<u64>(),
                    "reordered": runs.iter().map(|run| run.stats["reordered"].as_u64().unwrap_or(0)).sum::<u64>(),
                });
                eprintln!(
                    "receive {transport} {size} B {client}: {} msg/s, {} µs/msg",
                    median(&entry["rate"]) as u64,
                    median(&entry["cpu_us_per_msg"])
                );
                receive.push(entry);
            }
            faye.kill();
        }
    }
    Value::Array(receive)
}
