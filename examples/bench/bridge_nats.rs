//! Scenario: the bridge into core NATS, throughput, CPU and added latency.

use serde_json::{Value, json};

use crate::flood::flood_command;
use crate::process::{Proc, cpu_us, me, status_kb};
use crate::servers::{source, start_bridge_on};
use crate::subscribers::subscriber_command;
use crate::summary::summary;
use crate::{MESSAGES, RUNS};

/// Bridge → core NATS: throughput and CPU at full speed, and added latency at 10k msg/s,
/// against `cometd-bridge listen` (the same client, printing what it receives) on the same
/// flood, with the bridge's state (and so its spools) on `backend`: `embedded` (durable)
/// or `memory` (what durability costs).
pub async fn bridge_nats(url: &str, nats_url: &str, backend: &str) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[nats]\nurl = \"{nats_url}\"\n{}[[subscriptions]]\nid = \"flood\"\nsource = \"bench\"\nchannel = \"/bench/bridge\"\nsink = {{ type = \"nats\", subject = \"bench.flood\" }}\n",
        source(url)
    );
    let (bridge, _, _) = start_bridge_on(&config, dir.path(), backend).await;
    let mut full = Vec::new();
    let mut paced = Vec::new();
    for (rate, count) in [(0u64, MESSAGES), (10_000, 30_000)] {
        for _ in 0..RUNS {
            let mut nats_sub = Proc::spawn({
                let mut command = me();
                command.args(["nats-sub", nats_url, "bench.flood", &count.to_string()]);
                command
            });
            nats_sub.expect_ready();
            let mut direct = Proc::spawn(subscriber_command(
                "cometd-bridge listen",
                url,
                "/bench/bridge",
                count,
                "websocket",
            ));
            direct.expect_ready();
            let cpu_before = cpu_us(bridge.pid());
            let mut publisher = Proc::spawn(flood_command(url, count, 64, rate, &["/bench/bridge"]));
            let _ = publisher.line();
            publisher.reap();
            let via_bridge: Value = serde_json::from_str(&nats_sub.line().expect("stats")).expect("JSON");
            nats_sub.reap();
            let cpu_after = cpu_us(bridge.pid());
            let direct_stats: Value = serde_json::from_str(&direct.line().expect("stats")).expect("JSON");
            direct.reap();
            let span = |stats: &Value| {
                (stats["last_us"].as_f64().unwrap_or(0.0) - stats["first_us"].as_f64().unwrap_or(0.0)) / 1e6
            };
            let received = via_bridge["received"].as_f64().unwrap_or(0.0);
            let direct_cpu_us = direct_stats["own_user_us"].as_f64().unwrap_or(0.0)
                + direct_stats["own_system_us"].as_f64().unwrap_or(0.0);
            let run = json!({
                "rate": (received - 1.0) / span(&via_bridge).max(1e-9),
                "direct_rate": (direct_stats["received"].as_f64().unwrap_or(0.0) - 1.0) / span(&direct_stats).max(1e-9),
                "bridge_cpu_us_per_msg": (cpu_after - cpu_before) as f64 / received.max(1.0),
                "direct_cpu_us_per_msg": direct_cpu_us / direct_stats["received"].as_f64().unwrap_or(0.0).max(1.0),
                "p50_ms": via_bridge["p50_ms"], "p99_ms": via_bridge["p99_ms"],
                "direct_p50_ms": direct_stats["p50_ms"], "direct_p99_ms": direct_stats["p99_ms"],
                "received": via_bridge["received"], "gaps": via_bridge["gaps"], "reordered": via_bridge["reordered"],
            });
            eprintln!("bridge → NATS, {backend} spool (rate {rate}): {run}");
            if rate == 0 { full.push(run) } else { paced.push(run) }
        }
    }
    let max_rss_kb = status_kb(bridge.pid(), "VmHWM:");
    bridge.kill();
    let pick = |runs: &[Value], field: &str| {
        summary(&runs.iter().map(|run| run[field].as_f64().unwrap_or(0.0)).collect::<Vec<_>>())
    };
    json!({
        "full_speed": {
            "rate": pick(&full, "rate"), "direct_rate": pick(&full, "direct_rate"),
            "bridge_cpu_us_per_msg": pick(&full, "bridge_cpu_us_per_msg"),
            "direct_cpu_us_per_msg": pick(&full, "direct_cpu_us_per_msg"), "runs": full,
        },
        "at_10k": {
            "p50_ms": pick(&paced, "p50_ms"), "p99_ms": pick(&paced, "p99_ms"),
            "direct_p50_ms": pick(&paced, "direct_p50_ms"), "direct_p99_ms": pick(&paced, "direct_p99_ms"),
            "bridge_cpu_us_per_msg": pick(&paced, "bridge_cpu_us_per_msg"), "runs": paced,
        },
        "bridge_max_rss_kb": max_rss_kb,
    })
}
