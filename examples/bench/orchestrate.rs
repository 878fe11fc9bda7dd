//! The full run (no arguments): every scenario in turn, the machine it ran on, and the
//! results written to `bench/results.json` and `bench/RESULTS.md`.

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

use crate::bridge_jetstream::bridge_jetstream;
use crate::bridge_nats::bridge_nats;
use crate::bridge_webhook::bridge_webhook;
use crate::failover::failover;
use crate::idle::idle_daemon;
use crate::neighbour::bridge_neighbour;
use crate::process::root;
use crate::receive;
use crate::report::{headline, report};
use crate::servers::{start_faye, start_nats, start_salesforce_like};
use crate::sessions::sessions_runs;
use crate::spool::spool_alone;
use crate::webhook_latency::webhook_latency;

pub async fn orchestrate() {
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    results.insert("machine".into(), machine());

    // 1. Client receive.
    results.insert("receive".into(), receive::scenario());

    // 2–4. The bridge, each scenario on a fresh faye.
    let store = tempfile::tempdir().expect("temp dir");
    let (nats, nats_url) = start_nats(store.path());
    let (faye, url) = start_faye(60);
    results.insert("bridge_nats".into(), bridge_nats(&url, &nats_url, "embedded").await);
    faye.kill();
    let (faye, url) = start_faye(60);
    results.insert("bridge_nats_memory".into(), bridge_nats(&url, &nats_url, "memory").await);
    faye.kill();
    results.insert("spool".into(), spool_alone(&nats_url).await);
    let (faye, url) = start_faye(60);
    results.insert("bridge_jetstream".into(), bridge_jetstream(&url, &nats_url).await);
    faye.kill();
    let (faye, url) = start_faye(60);
    results.insert("bridge_webhook".into(), bridge_webhook(&url).await);
    faye.kill();
    let (faye, url) = start_faye(60);
    results.insert("webhook_latency".into(), webhook_latency(&url).await);
    faye.kill();
    let (faye, url) = start_faye(60);
    let (salesforce, replay_url) = start_salesforce_like(60);
    results.insert("neighbour".into(), bridge_neighbour(&url, &replay_url, &nats_url).await);
    salesforce.kill();
    faye.kill();
    let (faye, url) = start_faye(60);
    results.insert("failover".into(), failover(&url, &nats_url).await);
    faye.kill();
    nats.kill();

    // 5–6. Sessions per process, idle daemon.
    let (faye, url) = start_faye(60);
    results.insert("sessions".into(), sessions_runs(&url));
    results.insert("idle".into(), idle_daemon(&url).await);
    faye.kill();

    results.insert("duration_s".into(), json!(started.elapsed().as_secs_f64()));
    let dir = root().join("bench");
    // The committed run this one replaces, in headline figures: RESULTS.md shows before and
    // after for whatever changed since.
    if let Some(previous) = std::fs::read(dir.join("results.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
    {
        results.insert("previous".into(), json!({
            "machine": previous["machine"],
            "headline": headline(&previous).into_iter().map(|(name, value, _)| json!({"name": name, "value": value})).collect::<Vec<_>>(),
        }));
    }
    let results = Value::Object(results);
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results).expect("JSON"))
        .expect("write");
    std::fs::write(dir.join("RESULTS.md"), report(&results)).expect("write");
    eprintln!("wrote bench/RESULTS.md and bench/results.json in {:.0} s", started.elapsed().as_secs_f64());
}

pub fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let version = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let npm_version = |dir: &str, package: &str| {
        std::fs::read_to_string(root().join(dir).join("node_modules").join(package).join("package.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|package| package["version"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_kb": status_kb_from("/proc/meminfo", "MemTotal:"),
        "kernel": version("uname", &["-r"]),
        "rustc": version("rustc", &["--version"]),
        "node": version("node", &["--version"]),
        "python": version(root().join(".tools/venv/bin/python").to_str().unwrap_or("python3"), &["--version"]),
        "nats_server": version(root().join(".tools/bin/nats-server").to_str().unwrap_or("nats-server"), &["--version"]),
        "faye": npm_version("tests/peers", "faye"),
        "cometd_js": npm_version("bench/peers", "cometd"),
        "cometd_nodejs_client": npm_version("bench/peers", "cometd-nodejs-client"),
        "aiocometd": "0.4.5",
        "cometd_bridge": env!("CARGO_PKG_VERSION"),
    })
}

pub fn status_kb_from(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}
