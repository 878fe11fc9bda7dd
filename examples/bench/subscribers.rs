//! The benchmark subscribers: the in-process modes that measure a client (`sub`,
//! `listen-sub`, `nats-sub`) and the command that starts each client's subscriber.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType, ReadCoalescing};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::IDLE_SECS;
use crate::process::{cpu_split_us, me, root};
use crate::stats::{Probe, Stats};

/// Mode `sub`: this project's client as a benchmark subscriber, with its default options
/// (`cometd-bridge`), with read coalescing off (`cometd-bridge-polled`), or parsing each
/// message's whole data into a `serde_json::Value` rather than reading just the two fields
/// it needs (`cometd-bridge-value`).
pub async fn subscriber(
    url: &str,
    channel: &str,
    count: u64,
    transport: &str,
    coalescing: bool,
    whole_value: bool,
) {
    let kind = if transport == "websocket" { ConnectionType::WebSocket } else { ConnectionType::LongPolling };
    let client = Client::builder(url)
        .connection_types([kind])
        .read_coalescing(coalescing.then(ReadCoalescing::default))
        .build()
        .expect("options");
    client.open().await.expect("open");
    client.subscribe(channel).await.expect("subscribe");
    println!("READY");
    let mut stats = Stats::default();
    let mut idle = IdleWatch::new();
    while stats.received < count {
        tokio::select! {
            biased;
            received = client.receive() => match received {
                Ok(message) => {
                    let probe = match (&message.data, whole_value) {
                        (Some(data), false) => data.parse().unwrap_or_default(),
                        (Some(data), true) => Probe::of_value(&data.value()),
                        (None, _) => Probe::default(),
                    };
                    stats.record(probe);
                }
                Err(error) => eprintln!("receive: {error}"),
            },
            expired = idle.expired(stats.received) => if expired { break },
        }
    }
    println!("{}", stats.json());
    client.close().await;
}

/// Mode `listen-sub`: `cometd-bridge listen` as a user runs it, its stdout read line by
/// line. It prints the usual stats with `listen`'s own CPU and memory (from `wait4` once it
/// exits after `--count`), so that reading its output is not counted against it.
pub async fn listen_subscriber(url: &str, channel: &str, count: u64, transport: &str) {
    use tokio::io::AsyncBufReadExt;
    let mut listen = tokio::process::Command::new(root().join("target/release/cometd-bridge"))
        .args(["listen", url, channel, "--count", &count.to_string(), "--transport", transport])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cometd-bridge listen (built by scripts/bench.sh)");
    let pid = listen.id().expect("running");
    let mut stderr = tokio::io::BufReader::new(listen.stderr.take().expect("stderr")).lines();
    let ready = stderr.next_line().await.expect("stderr").expect("listen's ready line");
    assert!(ready.starts_with("listening on"), "listen: {ready}");
    let (user_at_ready, system_at_ready) = cpu_split_us(pid);
    println!("READY");
    let mut lines =
        tokio::io::BufReader::with_capacity(256 * 1024, listen.stdout.take().expect("stdout")).lines();
    let mut stats = Stats::default();
    let mut idle = IdleWatch::new();
    while stats.received < count {
        tokio::select! {
            biased;
            line = lines.next_line() => match line.expect("stdout") {
                Some(line) => {
                    let message: Value = serde_json::from_str(&line).expect("a JSON line");
                    stats.record(Probe::of_value(&message["data"]));
                }
                None => break,
            },
            expired = idle.expired(stats.received) => if expired { break },
        }
    }
    let pid = libc::pid_t::try_from(pid).expect("pid");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers; tokio never waits for it.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
    let mut report = stats.json();
    report["own_user_us"] = json!(micros(usage.ru_utime).saturating_sub(user_at_ready));
    report["own_system_us"] = json!(micros(usage.ru_stime).saturating_sub(system_at_ready));
    report["own_max_rss_kb"] = json!(usage.ru_maxrss);
    println!("{report}");
}

/// Mode `nats-sub`: a plain NATS subscriber counting the bridge's output.
pub async fn nats_subscriber(url: &str, subject: &str, count: u64) {
    let client = async_nats::connect(url).await.expect("connect");
    let mut subscription = client.subscribe(subject.to_string()).await.expect("subscribe");
    client.flush().await.expect("flush");
    println!("READY");
    let mut stats = Stats::default();
    let mut idle = IdleWatch::new();
    while stats.received < count {
        tokio::select! {
            biased;
            message = subscription.next() => match message {
                Some(message) => stats.record(serde_json::from_slice(&message.payload).unwrap_or_default()),
                None => break,
            },
            expired = idle.expired(stats.received) => if expired { break },
        }
    }
    println!("{}", stats.json());
}

/// Gives up on a subscriber after [`IDLE_SECS`] without a message, checked once a second
/// rather than with a timer per message (the peers' subscribers do the same), so that the
/// bookkeeping costs little next to the client being measured.
pub struct IdleWatch {
    tick: tokio::time::Interval,
    last_count: u64,
    idle_ticks: u64,
}

impl IdleWatch {
    pub fn new() -> Self {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        IdleWatch { tick, last_count: 0, idle_ticks: 0 }
    }

    /// Waits for the next tick; true when `received` has not moved for [`IDLE_SECS`].
    pub async fn expired(&mut self, received: u64) -> bool {
        self.tick.tick().await;
        if received == self.last_count {
            self.idle_ticks += 1;
        } else {
            (self.last_count, self.idle_ticks) = (received, 0);
        }
        self.idle_ticks > IDLE_SECS
    }
}

/// A subscriber process for `client` (ours, aiocometd, cometd-js).
pub fn subscriber_command(client: &str, url: &str, channel: &str, count: u64, transport: &str) -> Command {
    let count = count.to_string();
    let idle = IDLE_SECS.to_string();
    match client {
        "cometd-bridge" | "cometd-bridge-polled" | "cometd-bridge-value" => {
            match std::env::var_os("BENCH_PROFILE") {
                // Instruction counts, undisturbed by timing (this machine's VM has no
                // hardware counters for perf): `BENCH_PROFILE=callgrind.out
                // BENCH_PROFILE_TOOL=callgrind bench receive cometd-bridge`.
                Some(output)
                    if std::env::var_os("BENCH_PROFILE_TOOL").is_some_and(|tool| tool == "callgrind") =>
                {
                    let mut command = Command::new("valgrind");
                    command
                        .args(["--tool=callgrind", "-q"])
                        .arg(format!("--callgrind-out-file={}", Path::new(&output).display()));
                    command.arg(std::env::current_exe().expect("current exe"));
                    command.args(["sub", url, channel, &count, transport, client]);
                    command
                }
                // A profiling aid: `BENCH_PROFILE=perf.data bench receive cometd-bridge`.
                Some(output) => {
                    let mut command = Command::new("perf");
                    if std::env::var_os("BENCH_PROFILE_FLAT").is_some() {
                        // A flat profile disturbs the measured process far less (websocket
                        // reading, in particular, changes under the full one).
                        command.args(["record", "-F", "999", "-q"]);
                    } else {
                        command.args(["record", "-F", "4000", "--call-graph", "dwarf,32768", "-q"]);
                    }
                    // Another event than CPU time, e.g. BENCH_PROFILE_EVENT=page-faults.
                    if let Some(event) = std::env::var_os("BENCH_PROFILE_EVENT") {
                        command.arg("-e").arg(event);
                    }
                    command
                        .arg("-o")
                        .arg(output)
                        .arg("--")
                        .arg(std::env::current_exe().expect("current exe"));
                    command.args(["sub", url, channel, &count, transport, client]);
                    command
                }
                None => {
                    let mut command = me();
                    command.args(["sub", url, channel, &count, transport, client]);
                    command
                }
            }
        }
        "cometd-bridge listen" => {
            let mut command = me();
            command.args(["listen-sub", url, channel, &count, transport]);
            command
        }
        "aiocometd" => {
            let mut command = Command::new(root().join(".tools/venv/bin/python"));
            command
                .arg(root().join("bench/peers/aiocometd_sub.py"))
                .args([url, channel, &count, transport, &idle]);
            command
        }
        _ => {
            let mut command = Command::new("node");
            command
                .arg(root().join("bench/peers/cometd_js_sub.mjs"))
                .args([url, channel, &count, transport, &idle]);
            command
        }
    }
}
