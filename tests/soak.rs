//! The soak tests (not part of the test command; `scripts/soak.sh` runs them). The first: a webhook
//! down for `SOAK_SECONDS` (600) while faye publishes `SOAK_RATE` (100) messages a second
//! to the `cometd-bridge run` binary, then back. Passes when every message arrived exactly
//! once, none became a dead letter, no session was lost and the daemon's resident memory
//! stayed under `SOAK_MAX_RSS_MB` (50) throughout; prints what it measured.

#[path = "it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::bayeux::{BayeuxServer, FayeOptions};
use support::daemon::Daemon;
use support::peer::open;
use support::webhook::WebhookReceiver;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// The resident set of process `pid`, in MB; fails the test when `/proc` cannot tell.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("cannot read /proc/{pid}/status: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

async fn get(admin: &str, path: &str) -> String {
    support::http_client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .expect("admin answers")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_down_for_minutes_under_load_loses_nothing() {
    let seconds = setting("SOAK_SECONDS", 600);
    let rate = setting("SOAK_RATE", 100);
    let max_rss = setting("SOAK_MAX_RSS_MB", 50) as f64;
    let total = seconds * rate;

    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(3), ..FayeOptions::default() }).await;
    let mut receiver = WebhookReceiver::start(std::iter::repeat_n(503, 1_000_000)).await;
    let state = tempfile::tempdir().expect("state");
    let config = state.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\n\
             [[subscriptions]]\nid = \"hook\"\nsource = \"demo\"\nchannel = \"/soak\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\nretry = {{ max_backoff = \"5s\" }}\n",
            state.path().display(),
            faye.url(),
            receiver.url()
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&config).await;
    daemon.wait_for_log("subscribed").await;
    let pid = daemon.child.id().expect("running");

    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut peak_rss: f64 = 0.0;
    let mut last_sample = Instant::now();
    for n in 0..total {
        ticks.tick().await;
        publisher.publish("/soak", json!({ "n": n, "pad": "x".repeat(64) })).await.expect("publish");
        if last_sample.elapsed() >= Duration::from_secs(1) {
            peak_rss = peak_rss.max(rss_mb(pid));
            last_sample = Instant::now();
        }
    }
    let published_in = started.elapsed();
    let subscription: Value =
        serde_json::from_str(&get(&daemon.admin, "/api/v1/subscriptions/hook").await).expect("JSON");
    let backlog = subscription["backlog"].clone();

    receiver.heal();
    let healed = Instant::now();
    let mut seen = vec![0u32; total as usize];
    let mut distinct = 0;
    let drain_deadline = Instant::now() + Duration::from_secs(seconds.max(60) * 2);
    while distinct < total {
        assert!(Instant::now() < drain_deadline, "only {distinct} of {total} delivered");
        let request = receiver.next().await;
        if request.status != 200 {
            continue;
        }
        let n = request.json()["data"]["n"].as_u64().expect("numbered") as usize;
        if seen[n] == 0 {
            distinct += 1;
        }
        seen[n] += 1;
        if last_sample.elapsed() >= Duration::from_secs(1) {
            peak_rss = peak_rss.max(rss_mb(pid));
            last_sample = Instant::now();
        }
    }
    let drained_in = healed.elapsed();
    while let Some(request) = receiver.try_next() {
        if request.status == 200 {
            seen[request.json()["data"]["n"].as_u64().expect("numbered") as usize] += 1;
        }
    }
    let duplicates: u64 = seen.iter().map(|count| u64::from(count.saturating_sub(1))).sum();
    let page: Value = serde_json::from_str(&get(&daemon.admin, "/api/v1/dead-letters").await).expect("JSON");
    let letters = page["dead_letters"].clone();
    let metrics = get(&daemon.admin, "/metrics").await;
    let losses = metrics
        .lines()
        .find(|line| line.starts_with("cometd_bridge_session_losses_total"))
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or("?")
        .to_string();
    let file_mb =
        std::fs::metadata(state.path().join("state.redb")).map_or(0.0, |meta| meta.len() as f64 / 1e6);
    println!(
        "soak: {total} messages at {rate}/s over {:.0} s with the webhook down; backlog at the end {backlog}; \
         drained in {:.1} s ({:.0} msg/s); duplicates {duplicates}; dead letters {}; session losses {losses}; \
         peak RSS {peak_rss:.1} MB; state.redb {file_mb:.1} MB",
        published_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        total as f64 / drained_in.as_secs_f64(),
        letters.as_array().map_or(0, Vec::len),
    );
    daemon.signal(libc::SIGTERM);
    let _ = tokio::time::timeout(Duration::from_secs(30), daemon.child.wait()).await;
    assert_eq!(duplicates, 0, "each message exactly once");
    assert_eq!(letters, json!([]), "no dead letters");
    assert_eq!(losses, "0", "no session lost");
    assert!(peak_rss < max_rss, "peak RSS {peak_rss:.1} MB is over {max_rss} MB");
}

/// The flapping soak (`scripts/soak.sh flapping`): a replay source (the Salesforce-like
/// fixture) publishing `SOAK_RATE` (100) messages of about 1 KB a second for
/// `SOAK_FLAP_SECONDS` (3600) to a subscription with a 16 MiB spool quota (`SOAK_QUOTA`), whose webhook
/// is down 5 minutes, up 1 minute, in turn. The subscription fills, is held upstream and
/// resumes from its spool each time. Passes when every event arrived (0 lost), no session
/// was lost and the daemon's RSS is flat: sampled at the end of each cycle (the spool
/// drained), none is 20 MB or more above the first cycle's (which filled the spool and
/// the caches behind it for the first time); prints them, the RSS after the first minute,
/// the duplicates and the full episodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_webhook_for_an_hour_with_replay_loses_nothing() {
    let seconds = setting("SOAK_FLAP_SECONDS", 3600);
    let rate = setting("SOAK_RATE", 100);
    let down_for = Duration::from_secs(setting("SOAK_DOWN_SECONDS", 300));
    let up_for = Duration::from_secs(setting("SOAK_UP_SECONDS", 60));
    let total = seconds * rate;
    let channel = "/event/Soak__e";
    let quota = std::env::var("SOAK_QUOTA").unwrap_or_else(|_| "16MiB".into());

    let fixture = json!({ "retention": total + 1000 });
    let faye = BayeuxServer::faye(FayeOptions {
        timeout: Some(3),
        extensions: vec![("salesforce".to_string(), fixture)],
        ..FayeOptions::default()
    })
    .await;
    let mut receiver = WebhookReceiver::start([]).await;
    receiver.set_down(true);
    let state = tempfile::tempdir().expect("state");
    let config = state.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n[[sources]]\nname = \"sf\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nreplay = true\n\
             [[subscriptions]]\nid = \"hook\"\nsource = \"sf\"\nchannel = \"{channel}\"\nspool_max_bytes = \"{quota}\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\nretry = {{ max_backoff = \"5s\" }}\n",
            state.path().display(),
            faye.url(),
            receiver.url()
        ),
    )
    .expect("config");
    let mut daemon = Daemon::start(&config).await;
    daemon.wait_for_log("subscribed").await;
    let pid = daemon.child.id().expect("running");

    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut seen = vec![0u32; total as usize];
    let mut distinct = 0u64;
    let record = |request: support::webhook::Received, seen: &mut Vec<u32>, distinct: &mut u64| {
        if request.status == 200 {
            let n = request.json()["data"]["payload"]["n"].as_u64().expect("numbered") as usize;
            if seen[n] == 0 {
                *distinct += 1;
            }
            seen[n] += 1;
        }
    };
    let (mut rss_start, mut peak_rss) = (0.0f64, 0.0f64);
    let mut cycle_ends: Vec<f64> = Vec::new();
    let (mut last_sample, mut phase_started, mut down, mut full_seen) =
        (Instant::now(), Instant::now(), true, 0);
    let pad = "x".repeat(950);
    for n in 0..total {
        ticks.tick().await;
        publisher.publish(channel, json!({ "n": n, "pad": pad })).await.expect("publish");
        if phase_started.elapsed() >= if down { down_for } else { up_for } {
            down = !down;
            receiver.set_down(down);
            phase_started = Instant::now();
            let view: Value =
                serde_json::from_str(&get(&daemon.admin, "/api/v1/subscriptions/hook").await).expect("JSON");
            let rss = rss_mb(pid);
            if down {
                // A cycle ended (down, then up and drained): the steady-state points.
                cycle_ends.push(rss);
            }
            println!(
                "soak: {:.0} s, webhook {}, RSS {rss:.1} MB, subscription {view}",
                started.elapsed().as_secs_f64(),
                if down { "down" } else { "up" }
            );
        }
        while let Some(request) = receiver.try_next() {
            record(request, &mut seen, &mut distinct);
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            let rss = rss_mb(pid);
            peak_rss = peak_rss.max(rss);
            if rss_start == 0.0 && started.elapsed() >= Duration::from_secs(60.min(seconds / 10)) {
                rss_start = rss;
            }
            let full = get(&daemon.admin, "/api/v1/subscriptions/hook").await.contains("\"full\":true");
            full_seen += u32::from(full);
            last_sample = Instant::now();
        }
    }
    receiver.set_down(false);
    let drain_deadline = Instant::now() + Duration::from_secs(900);
    while distinct < total {
        assert!(Instant::now() < drain_deadline, "only {distinct} of {total} delivered");
        let request = receiver.next().await;
        record(request, &mut seen, &mut distinct);
    }
    while let Some(request) = receiver.try_next() {
        record(request, &mut seen, &mut distinct);
    }
    let rss_end = rss_mb(pid);
    let duplicates: u64 = seen.iter().map(|count| u64::from(count.saturating_sub(1))).sum();
    let metrics = get(&daemon.admin, "/metrics").await;
    let value = |name: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.rsplit(' ').next())
            .unwrap_or("?")
            .to_string()
    };
    let losses = value("cometd_bridge_session_losses_total");
    let cycles: Vec<String> = cycle_ends.iter().map(|rss| format!("{rss:.1}")).collect();
    println!(
        "soak (flapping, replay): {total} events at {rate}/s over {:.0} s, webhook down {down_for:?} / up {up_for:?}; \
         lost 0; duplicates {duplicates}; seconds seen full {full_seen}; session losses {losses}; \
         RSS after 1 min {rss_start:.1} MB, at each cycle's end [{}] MB, after the last drain {rss_end:.1} MB, peak {peak_rss:.1} MB",
        started.elapsed().as_secs_f64(),
        cycles.join(", ")
    );
    daemon.signal(libc::SIGTERM);
    let _ = tokio::time::timeout(Duration::from_secs(30), daemon.child.wait()).await;
    assert_eq!(losses, "0", "no session lost");
    assert!(full_seen > 0, "the quota filled at least once (the scenario is not exercised otherwise)");
    // Flat once the first cycle has filled the spool and the caches behind it (the store's
    // page cache, the allocator's pools): no cycle ends 20 MB or more above the first.
    let first = cycle_ends.first().copied().unwrap_or(rss_end);
    let highest = cycle_ends.iter().copied().fold(rss_end, f64::max);
    assert!(
        highest - first < 20.0,
        "RSS grew from {first:.1} MB after the first cycle to {highest:.1} MB: [{}]",
        cycles.join(", ")
    );
}
