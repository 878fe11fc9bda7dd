//! The report: `bench/RESULTS.md` written from the results, and the headline figures.

use std::fmt::Write as _;

use serde_json::Value;

use crate::summary::median;
use crate::{MESSAGES, RUNS};

pub fn report(results: &Value) -> String {
    let mut out = String::new();
    let machine = &results["machine"];
    let w = &mut out;
    let _ = writeln!(w, "# Benchmark results\n");
    let _ = writeln!(
        w,
        "Written by `scripts/bench.sh` (the `bench` example); raw numbers in `bench/results.json`."
    );
    let _ = writeln!(
        w,
        "Every figure is the median of {RUNS} runs, with min–max. All processes (faye, nats-server, the publisher, the"
    );
    let _ = writeln!(
        w,
        "clients, the bridge) share the machine, so rates swing between runs; ratios within one run are steadier.\nEach receive group (transport and payload) and each bridge scenario starts on a fresh faye; within a receive group the clients take turns run by run.\n"
    );
    let _ = writeln!(
        w,
        "Machine: {} ({} cores, {} MB), kernel {}. {}; node {}; {}; {}.",
        machine["cpu"].as_str().unwrap_or(""),
        machine["cores"],
        machine["memory_kb"].as_u64().unwrap_or(0) / 1024,
        machine["kernel"].as_str().unwrap_or(""),
        machine["rustc"].as_str().unwrap_or(""),
        machine["node"].as_str().unwrap_or(""),
        machine["python"].as_str().unwrap_or(""),
        machine["nats_server"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        w,
        "Peers: faye {}, aiocometd {}, CometD JS client {} with cometd-nodejs-client {}.\n",
        machine["faye"].as_str().unwrap_or(""),
        machine["aiocometd"].as_str().unwrap_or(""),
        machine["cometd_js"].as_str().unwrap_or(""),
        machine["cometd_nodejs_client"].as_str().unwrap_or("")
    );
    let range = |value: &Value, digits: usize| {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits,
            median(value),
            digits,
            value["min"].as_f64().unwrap_or(0.0),
            digits,
            value["max"].as_f64().unwrap_or(0.0)
        )
    };

    let _ = writeln!(
        w,
        "## Client receive ({MESSAGES} messages a run, one publisher flooding faye over websocket)\n\n`cometd-bridge` is the client with its default options, reading the two fields it needs of each message's data into its own type (`Data::parse`), as a Rust application would; `cometd-bridge-value` parses the whole data into a `serde_json::Value` instead (what the JS and Python clients always do, into their own objects); `cometd-bridge-polled` turns read coalescing off (a busy websocket is then read on every wake-up), to show what coalescing buys and costs; `cometd-bridge listen` is the command-line `listen` printing every message as a JSON line to a pipe (its own CPU and memory, not the reader's). The targets use `cometd-bridge`.\n"
    );
    let _ = writeln!(
        w,
        "| transport | payload | client | msgs/s | CPU µs/msg | of which user space | p50 ms | p99 ms | peak RSS MB | lost / dup / reordered |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|---|---|---|");
    let receive = results["receive"].as_array().cloned().unwrap_or_default();
    for entry in &receive {
        let _ = writeln!(
            w,
            "| {} | {} B | {} | {} | {} | {:.2} | {} | {} | {:.1} | {} / {} / {} |",
            entry["transport"].as_str().unwrap_or(""),
            entry["payload"],
            entry["client"].as_str().unwrap_or(""),
            range(&entry["rate"], 0),
            range(&entry["cpu_us_per_msg"], 2),
            median(&entry["user_us_per_msg"]),
            range(&entry["p50_ms"], 1),
            range(&entry["p99_ms"], 1),
            median(&entry["max_rss_kb"]) / 1024.0,
            entry["gaps"],
            entry["duplicates"],
            entry["reordered"]
        );
    }
    let _ = writeln!(w, "\n### Targets (ratios in the same run)\n");
    let _ = writeln!(
        w,
        "| transport | payload | rate ÷ fastest peer (≥ 1) | CPU ÷ aiocometd (≤ 0.05) | CPU ÷ JS client (≤ 0.2) | user-space CPU ÷ aiocometd's | user-space CPU ÷ JS client's |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|---|");
    for transport in ["websocket", "long-polling"] {
        for size in [64, 1024] {
            let find = |client| receive_entry(&receive, transport, size, client);
            if let (Some(ours), Some(aio), Some(js)) =
                (find("cometd-bridge"), find("aiocometd"), find("cometd-js"))
            {
                let fastest = median(&aio["rate"]).max(median(&js["rate"]));
                let _ = writeln!(
                    w,
                    "| {transport} | {size} B | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} |",
                    median(&ours["rate"]) / fastest.max(1.0),
                    median(&ours["cpu_us_per_msg"]) / median(&aio["cpu_us_per_msg"]).max(1e-9),
                    median(&ours["cpu_us_per_msg"]) / median(&js["cpu_us_per_msg"]).max(1e-9),
                    median(&ours["user_us_per_msg"]) / median(&aio["user_us_per_msg"]).max(1e-9),
                    median(&ours["user_us_per_msg"]) / median(&js["user_us_per_msg"]).max(1e-9)
                );
            }
        }
    }

    let nats = &results["bridge_nats"];
    let _ = writeln!(w, "\n## Bridge → core NATS (64 B payloads)\n");
    let _ = writeln!(w, "| measure | value | target |");
    let _ = writeln!(w, "|---|---|---|");
    let full = &nats["full_speed"];
    let _ = writeln!(w, "| end-to-end msgs/s (full speed) | {} | |", range(&full["rate"], 0));
    let _ = writeln!(
        w,
        "| `cometd-bridge listen` (websocket) on the same flood, msgs/s | {} | |",
        range(&full["direct_rate"], 0)
    );
    let _ = writeln!(
        w,
        "| bridge rate ÷ `listen` | {:.2} | ≥ 0.95 |",
        median(&full["rate"]) / median(&full["direct_rate"]).max(1.0)
    );
    let _ = writeln!(
        w,
        "| bridge CPU µs per forwarded message (full speed, synced spool included) | {} | ≤ 5 |",
        range(&full["bridge_cpu_us_per_msg"], 2)
    );
    let _ = writeln!(
        w,
        "| `listen` CPU µs per message on the same flood | {} | |",
        range(&full["direct_cpu_us_per_msg"], 2)
    );
    let paced = &nats["at_10k"];
    let _ = writeln!(
        w,
        "| bridge CPU µs per forwarded message at 10k msg/s (smaller batches) | {} | |",
        range(&paced["bridge_cpu_us_per_msg"], 2)
    );
    let _ = writeln!(
        w,
        "| p50 / p99 ms via the bridge at 10k msg/s | {} / {} | |",
        range(&paced["p50_ms"], 2),
        range(&paced["p99_ms"], 2)
    );
    let _ = writeln!(
        w,
        "| p50 / p99 ms via `listen` at 10k msg/s | {} / {} | |",
        range(&paced["direct_p50_ms"], 2),
        range(&paced["direct_p99_ms"], 2)
    );
    let _ = writeln!(
        w,
        "| added p99 ms | {:.2} | ≤ 2 |",
        median(&paced["p99_ms"]) - median(&paced["direct_p99_ms"])
    );
    let _ = writeln!(
        w,
        "| bridge peak RSS MB | {:.1} | |",
        nats["bridge_max_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0
    );

    let memory = &results["bridge_nats_memory"];
    if !memory.is_null() {
        let _ = writeln!(
            w,
            "\n## Durable spool: what it costs (bridge → core NATS, state on the embedded store against `state.backend = \"memory\"`)\n"
        );
        let _ = writeln!(w, "| measure | embedded | memory | ratio or difference | target |");
        let _ = writeln!(w, "|---|---|---|---|---|");
        let (durable, volatile) = (&nats["full_speed"], &memory["full_speed"]);
        let _ = writeln!(
            w,
            "| msgs/s at full speed | {} | {} | {:.2} | ≥ 0.9 |",
            range(&durable["rate"], 0),
            range(&volatile["rate"], 0),
            median(&durable["rate"]) / median(&volatile["rate"]).max(1.0)
        );
        let _ = writeln!(
            w,
            "| bridge CPU µs/msg at full speed | {} | {} | {:+.2} | ≤ +3 |",
            range(&durable["bridge_cpu_us_per_msg"], 2),
            range(&volatile["bridge_cpu_us_per_msg"], 2),
            median(&durable["bridge_cpu_us_per_msg"]) - median(&volatile["bridge_cpu_us_per_msg"])
        );
        let _ = writeln!(
            w,
            "| bridge CPU µs/msg at 10k msg/s | {} | {} | {:+.2} | |",
            range(&nats["at_10k"]["bridge_cpu_us_per_msg"], 2),
            range(&memory["at_10k"]["bridge_cpu_us_per_msg"], 2),
            median(&nats["at_10k"]["bridge_cpu_us_per_msg"])
                - median(&memory["at_10k"]["bridge_cpu_us_per_msg"])
        );
    }
    let spool = &results["spool"];
    if !spool.is_null() {
        let _ = writeln!(w, "\n## The spool alone ({} messages of 1 KiB)\n", spool["messages"]);
        let _ = writeln!(w, "| measure | value | target |");
        let _ = writeln!(w, "|---|---|---|");
        let _ = writeln!(
            w,
            "| appends/s, group commits of {} (each synced) | {} | ≥ 50,000 |",
            spool["group"],
            range(&spool["append_rate"], 0)
        );
        let _ =
            writeln!(w, "| backlog drained into core NATS, msgs/s | {} | |", range(&spool["drain_rate"], 0));
    }
    let neighbour = &results["neighbour"];
    if !neighbour.is_null() {
        let _ = writeln!(
            w,
            "\n## A full subscription's cost on its neighbour ({} messages of 256 B on each of two channels of one source)\n",
            neighbour["messages_per_channel"]
        );
        let _ = writeln!(w, "| measure | value | target |");
        let _ = writeln!(w, "|---|---|---|");
        let _ = writeln!(w, "| healthy subscription alone, msgs/s | {} | |", range(&neighbour["alone"], 0));
        let _ = writeln!(
            w,
            "| healthy subscription beside a full one (64 KiB quota, dead webhook), msgs/s | {} | |",
            range(&neighbour["beside_full"], 0)
        );
        if !neighbour["beside_healthy"].is_null() {
            let _ = writeln!(
                w,
                "| healthy subscription beside a healthy one on the other channel (same CometD traffic), msgs/s | {} | |",
                range(&neighbour["beside_healthy"], 0)
            );
        }
        let _ = writeln!(
            w,
            "| beside a full one ÷ alone | {:.2} | ≥ 0.95 |",
            neighbour["ratio"].as_f64().unwrap_or(0.0)
        );
        if !neighbour["replay_alone"].is_null() {
            let _ =
                writeln!(w, "| with replay: alone, msgs/s | {} | |", range(&neighbour["replay_alone"], 0));
            let _ = writeln!(
                w,
                "| with replay: beside a full one (held upstream), msgs/s | {} | |",
                range(&neighbour["replay_beside_full"], 0)
            );
            let _ = writeln!(
                w,
                "| with replay: beside a full one ÷ alone | {:.2} | ≥ 0.95 |",
                neighbour["replay_ratio"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(ratio) = neighbour["ratio_same_traffic"].as_f64() {
            let _ = writeln!(
                w,
                "| beside a full one ÷ beside a healthy one (the cost of being full) | {ratio:.2} | |"
            );
        }
    }
    if let Some(latency) = results["webhook_latency"].as_array() {
        let _ =
            writeln!(w, "\n## Bridge → one webhook subscription at a receiver's latency (one run each)\n");
        let _ = writeln!(w, "| receiver latency | max_in_flight | messages | msgs/s | target |");
        let _ = writeln!(w, "|---|---|---|---|---|");
        for run in latency {
            let target = if run["latency_ms"] == 100 && run["max_in_flight"] == 8 { "≥ 60" } else { "" };
            let _ = writeln!(
                w,
                "| {} ms | {} | {} | {:.1} | {target} |",
                run["latency_ms"],
                run["max_in_flight"],
                run["messages"],
                run["rate"].as_f64().unwrap_or(0.0)
            );
        }
    }

    let js = &results["bridge_jetstream"];
    let _ = writeln!(w, "\n## Bridge → JetStream with acks ({} messages)\n", js["messages"]);
    let _ = writeln!(w, "| measure | value | target |");
    let _ = writeln!(w, "|---|---|---|");
    let _ = writeln!(
        w,
        "| delivery stage alone (forwarder + JetStream sink, fed from memory), msgs/s | {} | |",
        range(&js["stage_rate"], 0)
    );
    let _ = writeln!(
        w,
        "| plain async-nats JetStream publisher, same input and ack window, msgs/s | {} | |",
        range(&js["plain_publisher_rate"], 0)
    );
    let _ = writeln!(
        w,
        "| the same publisher adding only a `Nats-Msg-Id` header, msgs/s | {} | |",
        range(&js["plain_publisher_with_message_id_rate"], 0)
    );
    let _ = writeln!(
        w,
        "| delivery stage ÷ plain publisher | {:.2} | |",
        median(&js["stage_rate"]) / median(&js["plain_publisher_rate"]).max(1.0)
    );
    let _ = writeln!(
        w,
        "| delivery stage ÷ plain publisher with `Nats-Msg-Id` | {:.2} | ≥ 0.9 |",
        median(&js["stage_rate"]) / median(&js["plain_publisher_with_message_id_rate"]).max(1.0)
    );
    let _ = writeln!(
        w,
        "| plain publisher with `Nats-Msg-Id` ÷ plain publisher (what de-duplication alone costs) | {:.2} | |",
        median(&js["plain_publisher_with_message_id_rate"]) / median(&js["plain_publisher_rate"]).max(1.0)
    );
    let _ =
        writeln!(w, "| end to end: flood start to all stored, msgs/s | {} | |", range(&js["bridge_rate"], 0));
    let _ = writeln!(
        w,
        "| direct CometD subscriber on the same flood, msgs/s | {} | |",
        range(&js["direct_rate"], 0)
    );
    let _ = writeln!(
        w,
        "| end to end ÷ direct subscriber | {:.2} | |\n\nEnd to end, the bridge can go no faster than faye delivers to one subscriber on this machine; the delivery stage alone is the comparison with a plain publisher.",
        median(&js["bridge_rate"]) / median(&js["direct_rate"]).max(1.0)
    );
    let _ = writeln!(
        w,
        "The contract gives every JetStream message a `Nats-Msg-Id`, so that a retried publish is stored once; the stream checks each id against its de-duplication window, and in this run that alone leaves the plain publisher at {:.2} of its own rate.",
        median(&js["plain_publisher_with_message_id_rate"]) / median(&js["plain_publisher_rate"]).max(1.0)
    );

    let hook = &results["bridge_webhook"];
    let _ = writeln!(
        w,
        "\n## Bridge → webhook, {} subscriptions to one receiver ({} messages)\n",
        hook["subscriptions"], hook["messages"]
    );
    let _ = writeln!(
        w,
        "msgs/s {}; order kept per subscription: {}.",
        range(&hook["rate"], 0),
        hook["order_kept"]
    );

    let _ = writeln!(w, "\n## Sessions per process (idle websocket sessions to faye)\n");
    let _ = writeln!(w, "| requested | open | failed | RSS KB per session | target |");
    let _ = writeln!(w, "|---|---|---|---|---|");
    for run in results["sessions"].as_array().cloned().unwrap_or_default() {
        let result = &run["result"];
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.1} | ≤ 30 |",
            run["requested"],
            result["open"],
            result["failed"],
            result["kb_per_session"].as_f64().unwrap_or(0.0)
        );
    }
    let failover = &results["failover"];
    if !failover.is_null() {
        let _ = writeln!(
            w,
            "\n## Failover between replicas ({} × `kill -9` of the owner, `lease_ttl` {} s, one nats-server)\n",
            failover["kills"], failover["lease_ttl_s"]
        );
        let _ = writeln!(
            w,
            "From the kill to the first message the new owner forwards (a message every {} ms on faye, a JetStream sink; the new owner told by its session in `Nats-Msg-Id`). The standby takes the source once the dead owner's lease has expired (up to `lease_ttl` after its last renewal, renewed every fifth of it) and its next round sees it, then handshakes and subscribes.\n",
            failover["tick_ms"]
        );
        let _ = writeln!(w, "| measure | value | target |");
        let _ = writeln!(w, "|---|---|---|");
        let ms = |key: &str| failover[key].as_f64().unwrap_or(0.0);
        let _ = writeln!(w, "| median, ms | {:.0} | ≤ 3000 |", ms("median_ms"));
        let _ = writeln!(w, "| p99 (the largest of {}), ms | {:.0} | |", failover["kills"], ms("p99_ms"));
        let _ = writeln!(w, "| min – max, ms | {:.0} – {:.0} | |", ms("min_ms"), ms("max_ms"));
    }
    let idle = &results["idle"];
    let _ = writeln!(w, "\n## Idle daemon (one source, one subscription)\n");
    let _ = writeln!(w, "| measure | value | target |");
    let _ = writeln!(w, "|---|---|---|");
    let _ = writeln!(w, "| RSS MB | {:.1} | ≤ 15 |", median(&idle["rss_kb"]) / 1024.0);
    let _ = writeln!(w, "| start to `/readyz` 200, ms | {} | ≤ 100 |", range(&idle["ready_ms"], 0));
    let _ = writeln!(w, "\nThe whole run took {:.0} s.", results["duration_s"].as_f64().unwrap_or(0.0));
    if let Some(previous) = results["previous"]["headline"].as_array() {
        let _ = writeln!(w, "\n## Against the previous committed run\n");
        let _ = writeln!(
            w,
            "The headline figures of the run this one replaced (its `results.json`), beside this run's. \
             Absolute figures move with the machine's speed from run to run; the ratios are the ones to compare.\n"
        );
        let _ = writeln!(w, "| figure | before | now | target |");
        let _ = writeln!(w, "|---|---|---|---|");
        for (name, now, target) in headline(results) {
            let before = previous
                .iter()
                .find(|figure| figure["name"] == name.as_str())
                .and_then(|figure| figure["value"].as_f64());
            let before = before.map_or("–".to_string(), |value| format!("{value:.3}"));
            let _ = writeln!(w, "| {name} | {before} | {now:.3} | {target} |");
        }
    }
    let _ = writeln!(
        w,
        "\nBefore and after for every change that moved these numbers, with the profiles that led \
         to them and the targets still missed: `bench/HISTORY.md`."
    );
    out
}

/// One client's receive figures for a transport and payload size.
pub fn receive_entry<'r>(
    receive: &'r [Value],
    transport: &str,
    size: u64,
    client: &str,
) -> Option<&'r Value> {
    receive.iter().find(|e| e["transport"] == transport && e["payload"] == size && e["client"] == client)
}

/// The figures the targets are about, as (name, value, target), from a run's results.
pub fn headline(results: &Value) -> Vec<(String, f64, &'static str)> {
    let mut figures = Vec::new();
    let receive = results["receive"].as_array().cloned().unwrap_or_default();
    for transport in ["websocket", "long-polling"] {
        for size in [64, 1024] {
            let cpu = |client| {
                receive_entry(&receive, transport, size, client).map(|entry| median(&entry["cpu_us_per_msg"]))
            };
            if let (Some(ours), Some(aio), Some(js)) =
                (cpu("cometd-bridge"), cpu("aiocometd"), cpu("cometd-js"))
            {
                figures.push((format!("client CPU µs/msg, {transport} {size} B"), ours, ""));
                figures.push((
                    format!("client CPU ÷ JS client, {transport} {size} B"),
                    ours / js.max(1e-9),
                    "≤ 0.2",
                ));
                figures.push((
                    format!("client CPU ÷ aiocometd, {transport} {size} B"),
                    ours / aio.max(1e-9),
                    "≤ 0.05",
                ));
            }
        }
    }
    let nats = &results["bridge_nats"];
    figures.push((
        "bridge → NATS CPU µs/msg (full speed)".into(),
        median(&nats["full_speed"]["bridge_cpu_us_per_msg"]),
        "≤ 5",
    ));
    figures.push((
        "bridge → NATS rate ÷ `listen` (full speed)".into(),
        median(&nats["full_speed"]["rate"]) / median(&nats["full_speed"]["direct_rate"]).max(1.0),
        "≥ 0.95",
    ));
    figures.push((
        "bridge → NATS added p99 ms at 10k msg/s".into(),
        median(&nats["at_10k"]["p99_ms"]) - median(&nats["at_10k"]["direct_p99_ms"]),
        "≤ 2",
    ));
    if let Some(ratio) = results["neighbour"]["ratio"].as_f64() {
        figures.push(("healthy subscription rate beside a full one ÷ alone".into(), ratio, "≥ 0.95"));
    }
    let memory = &results["bridge_nats_memory"];
    if !memory.is_null() {
        figures.push((
            "bridge → NATS rate, durable ÷ memory spool".into(),
            median(&nats["full_speed"]["rate"]) / median(&memory["full_speed"]["rate"]).max(1.0),
            "≥ 0.9",
        ));
        figures.push((
            "bridge → NATS CPU µs/msg added by the durable spool".into(),
            median(&nats["full_speed"]["bridge_cpu_us_per_msg"])
                - median(&memory["full_speed"]["bridge_cpu_us_per_msg"]),
            "≤ 3",
        ));
    }
    if !results["spool"].is_null() {
        figures.push((
            "spool appends/s of 1 KiB".into(),
            median(&results["spool"]["append_rate"]),
            "≥ 50,000",
        ));
        figures.push((
            "spool backlog drain into NATS msgs/s".into(),
            median(&results["spool"]["drain_rate"]),
            "",
        ));
    }
    let js = &results["bridge_jetstream"];
    figures.push((
        "JetStream delivery stage ÷ plain publisher".into(),
        median(&js["stage_rate"]) / median(&js["plain_publisher_rate"]).max(1.0),
        "",
    ));
    figures.push((
        "JetStream delivery stage ÷ publisher with `Nats-Msg-Id`".into(),
        median(&js["stage_rate"]) / median(&js["plain_publisher_with_message_id_rate"]).max(1.0),
        "≥ 0.9",
    ));
    for run in results["sessions"].as_array().cloned().unwrap_or_default() {
        figures.push((
            format!("RSS KB per idle session ({} sessions)", run["requested"]),
            run["result"]["kb_per_session"].as_f64().unwrap_or(0.0),
            "≤ 30",
        ));
    }
    figures.push(("idle daemon RSS MB".into(), median(&results["idle"]["rss_kb"]) / 1024.0, "≤ 15"));
    figures.push(("idle daemon start to /readyz ms".into(), median(&results["idle"]["ready_ms"]), "≤ 100"));
    figures
}
