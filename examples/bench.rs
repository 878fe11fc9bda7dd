//! The benchmarks: `scripts/bench.sh` (which installs the peers and builds this in release
//! mode) runs `bench` with no arguments, which starts faye and nats-server on loopback,
//! runs every scenario a few times, and writes `bench/RESULTS.md` and
//! `bench/results.json`. The other modes are the processes it spawns, so that each one's
//! CPU time and memory are measured by the operating system on its own, and aids for
//! looking closer: `bench report` (RESULTS.md again from results.json), `bench receive
//! <client> [transport]`, `bench bridge [nats|jetstream]`, `bench stage`, and
//! `BENCH_PROFILE=perf.data` to run this client's subscriber under `perf record`
//! (`BENCH_PROFILE_EVENT=page-faults` to sample another event than CPU time,
//! `BENCH_PROFILE_FLAT=1` for a flat profile that disturbs the client less, and
//! `BENCH_PROFILE_TOOL=callgrind` for instruction counts under valgrind instead).
//!
//! Every load loop is bounded in count and in time; every network target is loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cometd_bridge::cometd::{Client, ConnectionType, ReadCoalescing};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

/// Runs per measured configuration; the median is reported with the min and max.
const RUNS: usize = 5;
/// Messages per client-receive run.
const MESSAGES: u64 = 60_000;
/// A subscriber gives up after this long without a message.
const IDLE_SECS: u64 = 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The measured clients run on a single-threaded runtime, as the Node and Python peers
    // run on one event loop; the orchestrator uses both cores.
    let runtime = match args.first().map(String::as_str) {
        Some("sub" | "nats-sub" | "sessions") => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build(),
    }
    .expect("runtime");
    match args.first().map(String::as_str) {
        None | Some("all") => runtime.block_on(orchestrate()),
        Some("sub") => {
            let coalescing = args.get(5).is_none_or(|client| client != "cometd-bridge-polled");
            let whole_value = args.get(5).is_some_and(|client| client == "cometd-bridge-value");
            runtime.block_on(subscriber(
                &args[1],
                &args[2],
                args[3].parse().expect("count"),
                &args[4],
                coalescing,
                whole_value,
            ))
        }
        Some("flood") => runtime.block_on(flood(&args[1..])),
        Some("listen-sub") => runtime.block_on(listen_subscriber(
            &args[1],
            &args[2],
            args[3].parse().expect("count"),
            &args[4],
        )),
        Some("nats-sub") => {
            runtime.block_on(nats_subscriber(&args[1], &args[2], args[3].parse().expect("count")))
        }
        Some("sessions") => runtime.block_on(sessions(&args[1], args[2].parse().expect("count"))),
        Some("bridge") => runtime.block_on(async {
            // A quick look while optimising: the NATS and JetStream bridge scenarios.
            let (faye, url) = start_faye(60);
            let store = tempfile::tempdir().expect("temp dir");
            let (nats, nats_url) = start_nats(store.path());
            // An optional argument picks one: `nats` or `jetstream`.
            if args.get(1).is_none_or(|only| only == "nats") {
                for backend in ["embedded", "memory"] {
                    let result = bridge_nats(&url, &nats_url, backend).await;
                    let brief = |part: &Value| {
                        json!({"rate": part["rate"], "cpu_us_per_msg": part["bridge_cpu_us_per_msg"], "p99_ms": part["p99_ms"], "direct_p99_ms": part["direct_p99_ms"]})
                    };
                    eprintln!("{backend}: full speed {}; at 10k msg/s {}", brief(&result["full_speed"]), brief(&result["at_10k"]));
                }
            }
            if args.get(1).is_none_or(|only| only == "jetstream") {
                eprintln!("{}", bridge_jetstream(&url, &nats_url).await);
            }
            nats.kill();
            faye.kill();
        }),
        Some("stage") => runtime.block_on(async {
            // A quick look while optimising: the JetStream delivery stage against the plain
            // publisher, without faye.
            let store = tempfile::tempdir().expect("temp dir");
            let (nats, nats_url) = start_nats(store.path());
            let jetstream = async_nats::jetstream::new(async_nats::connect(&nats_url).await.expect("connect"));
            for run in 0..RUNS {
                let plain = plain_publisher(&jetstream, &format!("plain{run}"), 20_000, false).await;
                let with_id = plain_publisher(&jetstream, &format!("plainid{run}"), 20_000, true).await;
                let stage = delivery_stage(&nats_url, &jetstream, &format!("stage{run}"), 20_000).await;
                eprintln!("stage {stage:.0} msg/s, plain {plain:.0} msg/s, plain with Nats-Msg-Id {with_id:.0} msg/s");
            }
            nats.kill();
        }),
        Some("spool") => runtime.block_on(async {
            // The spool alone, and the webhook at a receiver's latency.
            let store = tempfile::tempdir().expect("temp dir");
            let (nats, nats_url) = start_nats(store.path());
            eprintln!("{}", spool_alone(&nats_url).await);
            nats.kill();
            let (faye, url) = start_faye(60);
            eprintln!("{}", webhook_latency(&url).await);
            faye.kill();
        }),
        Some("neighbour") => runtime.block_on(async {
            // What a full subscription costs its healthy neighbour on the same source.
            let (faye, url) = start_faye(60);
            let store = tempfile::tempdir().expect("temp dir");
            let (nats, nats_url) = start_nats(store.path());
            eprintln!("{}", bridge_neighbour(&url, &nats_url).await);
            nats.kill();
            faye.kill();
        }),
        Some("idle") => runtime.block_on(async {
            let (faye, url) = start_faye(60);
            eprintln!("{}", idle_daemon(&url).await);
            faye.kill();
        }),
        Some("report") => {
            // Writes bench/RESULTS.md again from bench/results.json, after a change to the report.
            let dir = root().join("bench");
            let results = std::fs::read_to_string(dir.join("results.json")).expect("bench/results.json");
            let results: Value = serde_json::from_str(&results).expect("results JSON");
            std::fs::write(dir.join("RESULTS.md"), report(&results)).expect("write");
        }
        Some("receive") => {
            // A quick look while optimising: one run of one client, every transport and size.
            let (faye, url) = start_faye(60);
            // An optional third argument picks one transport.
            for transport in ["websocket", "long-polling"] {
                if args.get(2).is_some_and(|only| only != transport) {
                    continue;
                }
                for size in [64usize, 1024] {
                    let run = receive_run(&args[1], &url, transport, size, MESSAGES);
                    eprintln!(
                        "{transport} {size} B: {:.0} msg/s, {:.2} µs/msg ({:.2} user), p50 {} ms, peak RSS {} KB",
                        run.rate, run.cpu_us_per_msg, run.user_us_per_msg, run.stats["p50_ms"], run.max_rss_kb
                    );
                }
            }
            faye.kill();
        }
        Some(other) => panic!("unknown mode {other}"),
    }
}

fn now_us() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros()).expect("fits")
}

/// What a subscriber reads of each message's data: its sequence number and when it was
/// published (the padding is skipped).
#[derive(Default, serde::Deserialize)]
struct Probe {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    ts: Option<u64>,
}

impl Probe {
    fn of_value(data: &Value) -> Probe {
        Probe { seq: data["seq"].as_u64().unwrap_or(0), ts: data["ts"].as_u64() }
    }
}

/// Gaps, duplicates, order and latency of a subscriber's messages (the same fields, kept
/// the same way, as `bench/peers/stats.py` and `cometd_js_sub.mjs`: sequence numbers seen
/// in a bitmap, latencies in a list sorted at the end).
#[derive(Default)]
struct Stats {
    received: u64,
    /// One bit per sequence number.
    seen: Vec<u64>,
    distinct: u64,
    highest: Option<u64>,
    duplicates: u64,
    reordered: u64,
    last_seq: Option<u64>,
    latencies_ms: Vec<f64>,
    first_us: u64,
    last_us: u64,
}

impl Stats {
    fn record(&mut self, probe: Probe) {
        let now = now_us();
        let seq = probe.seq;
        let ts = probe.ts.unwrap_or(now);
        self.received += 1;
        assert!(seq < 1 << 32, "sequence numbers come from the flood: {seq}");
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & bit == 0 {
            self.seen[word] |= bit;
            self.distinct += 1;
        } else {
            self.duplicates += 1;
        }
        self.highest = Some(self.highest.map_or(seq, |highest| highest.max(seq)));
        if self.last_seq.is_some_and(|last| seq < last) {
            self.reordered += 1;
        }
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        self.latencies_ms.push(now.saturating_sub(ts) as f64 / 1000.0);
        if self.first_us == 0 {
            self.first_us = now;
        }
        self.last_us = now;
    }

    fn json(&mut self) -> Value {
        self.latencies_ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let latencies = &self.latencies_ms;
            if latencies.is_empty() {
                0.0
            } else {
                latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)]
            }
        };
        let highest = self.highest.map_or(0, |max| max + 1);
        json!({
            "received": self.received,
            "gaps": highest - self.distinct,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "first_us": self.first_us,
            "last_us": self.last_us,
            "p50_ms": at(0.5),
            "p99_ms": at(0.99),
        })
    }
}

/// Mode `sub`: this project's client as a benchmark subscriber, with its default options
/// (`cometd-bridge`), with read coalescing off (`cometd-bridge-polled`), or parsing each
/// message's whole data into a `serde_json::Value` rather than reading just the two fields
/// it needs (`cometd-bridge-value`).
async fn subscriber(
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
async fn listen_subscriber(url: &str, channel: &str, count: u64, transport: &str) {
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
async fn nats_subscriber(url: &str, subject: &str, count: u64) {
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
struct IdleWatch {
    tick: tokio::time::Interval,
    last_count: u64,
    idle_ticks: u64,
}

impl IdleWatch {
    fn new() -> Self {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        IdleWatch { tick, last_count: 0, idle_ticks: 0 }
    }

    /// Waits for the next tick; true when `received` has not moved for [`IDLE_SECS`].
    async fn expired(&mut self, received: u64) -> bool {
        self.tick.tick().await;
        if received == self.last_count {
            self.idle_ticks += 1;
        } else {
            (self.last_count, self.idle_ticks) = (received, 0);
        }
        self.idle_ticks > IDLE_SECS
    }
}

/// Mode `flood URL COUNT SIZE RATE CHANNEL...`: a raw websocket Bayeux publisher, 50
/// publishes a frame and at most 2,000 unacknowledged, round-robin over the channels. RATE
/// 0 is as fast as the server acknowledges; otherwise messages per second. Prints the
/// acknowledged count and rate.
async fn flood(args: &[String]) {
    let url = args[0].replacen("http", "ws", 1);
    let count: u64 = args[1].parse().expect("count");
    let size: usize = args[2].parse().expect("size");
    let rate: u64 = args[3].parse().expect("rate");
    let channels: Vec<&String> = args[4..].iter().collect();
    let pad = "x".repeat(size);
    let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("websocket");
    let (mut writer, mut reader) = socket.split();
    let handshake = json!([{"channel": "/meta/handshake", "version": "1.0", "supportedConnectionTypes": ["websocket"], "id": "h"}]);
    writer.send(handshake.to_string().into()).await.expect("send");
    let reply = reader.next().await.expect("reply").expect("frame");
    let reply: Value = serde_json::from_str(reply.to_text().expect("text")).expect("JSON");
    let client_id = reply[0]["clientId"].as_str().expect("client id").to_string();
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let reading = tokio::spawn(async move {
        while let Some(Ok(frame)) = reader.next().await {
            if let Ok(replies) = serde_json::from_str::<Vec<Value>>(frame.to_text().unwrap_or("[]")) {
                let acks = replies.iter().filter(|reply| reply["successful"] == true).count() as u64;
                counter.fetch_add(acks, Ordering::Relaxed);
            }
        }
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut sent = 0u64;
    while sent < count && Instant::now() < deadline {
        while sent - acked.load(Ordering::Relaxed) >= 2000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        if rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        }
        let batch = if rate > 0 { 10.min(count - sent) } else { 50.min(count - sent) };
        let frame: Vec<Value> = (0..batch)
            .map(|i| {
                let seq = sent + i;
                let channel = channels[(seq % channels.len() as u64) as usize];
                json!({"channel": channel, "clientId": client_id, "id": seq.to_string(), "data": {"seq": seq, "ts": now_us(), "pad": pad}})
            })
            .collect();
        writer.send(Value::Array(frame).to_string().into()).await.expect("send");
        sent += batch;
    }
    while acked.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"acked": acked.load(Ordering::Relaxed), "rate": acked.load(Ordering::Relaxed) as f64 / elapsed})
    );
    reading.abort();
}

/// Mode `sessions URL N`: N idle sessions in this one process; prints the memory they take.
async fn sessions(url: &str, count: usize) {
    let before = rss_kb(std::process::id());
    let mut clients = Vec::with_capacity(count);
    let mut failed = 0;
    for chunk in 0..count.div_ceil(100) {
        let opening: Vec<_> = (0..100.min(count - chunk * 100))
            .map(|_| async {
                let client = Client::builder(url)
                    .connection_types([ConnectionType::WebSocket])
                    .build()
                    .expect("options");
                client.open().await.map(|()| client)
            })
            .collect();
        for result in futures_util::future::join_all(opening).await {
            match result {
                Ok(client) => clients.push(client),
                Err(_) => failed += 1,
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let buffers settle before measuring
    let after = rss_kb(std::process::id());
    let open = clients.len();
    println!(
        "{}",
        json!({"open": open, "failed": failed, "rss_before_kb": before, "rss_after_kb": after,
               "kb_per_session": (after.saturating_sub(before)) as f64 / open.max(1) as f64})
    );
    for client in &clients {
        client.close().await;
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// User + system CPU time of a running process, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let (user, system) = cpu_split_us(pid);
    user + system
}

/// A process's user and kernel CPU time so far, in µs (from `/proc`, 10 ms ticks).
fn cpu_split_us(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) * 1_000_000 / 100, ticks(12) * 1_000_000 / 100)
}

/// A spawned process, its stdout lines, and its resource use once reaped.
struct Proc {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    /// Set once `wait4` has reaped it, so that dropping it does not signal a pid that may
    /// have been reused.
    reaped: bool,
}

impl Drop for Proc {
    /// A process the run did not stop (it panicked on the way) is killed, not left running
    /// with the run's output pipe open.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a process used, from the kernel at reaping (wait4).
struct Usage {
    user_us: u64,
    system_us: u64,
    max_rss_kb: u64,
}

impl Proc {
    fn spawn(mut command: Command) -> Proc {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Proc { child, lines, reaped: false }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line (`None` at end of output).
    fn line(&mut self) -> Option<String> {
        self.lines.next().and_then(Result::ok)
    }

    fn expect_ready(&mut self) {
        let line = self.line();
        assert_eq!(line.as_deref(), Some("READY"), "a READY line");
    }

    /// Waits for the process to end and returns what it used.
    fn reap(mut self) -> Usage {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid out-pointers.
        unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        self.reaped = true;
        let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
        Usage {
            user_us: micros(usage.ru_utime),
            system_us: micros(usage.ru_stime),
            max_rss_kb: usage.ru_maxrss as u64,
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.reap();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn start_faye(timeout: u64) -> (Proc, String) {
    let mut command = Command::new("bash");
    command.args([
        "-c",
        &format!(
            "ulimit -n 20000 2>/dev/null; exec node {} '{{\"timeout\": {timeout}}}'",
            root().join("tests/peers/faye-server.js").display()
        ),
    ]);
    let mut faye = Proc::spawn(command);
    let port =
        faye.line().and_then(|line| line.strip_prefix("LISTENING ").map(str::to_owned)).expect("faye port");
    (faye, format!("http://127.0.0.1:{port}/bayeux"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

fn start_nats(store: &Path) -> (Proc, String) {
    let port = free_port();
    let mut command = Command::new(root().join(".tools/bin/nats-server"));
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .arg("-l")
        .arg(store.join("log"));
    let nats = Proc::spawn(command);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (nats, format!("nats://127.0.0.1:{port}"))
}

fn me() -> Command {
    Command::new(std::env::current_exe().expect("current exe"))
}

/// A subscriber process for `client` (ours, aiocometd, cometd-js).
fn subscriber_command(client: &str, url: &str, channel: &str, count: u64, transport: &str) -> Command {
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

fn flood_command(url: &str, count: u64, size: usize, rate: u64, channels: &[&str]) -> Command {
    let mut command = me();
    command.args(["flood", url, &count.to_string(), &size.to_string(), &rate.to_string()]).args(channels);
    command
}

/// One measurement of a subscriber receiving a flood.
struct Run {
    stats: Value,
    rate: f64,
    cpu_us_per_msg: f64,
    /// The user-space part of `cpu_us_per_msg`; the rest is the kernel's.
    user_us_per_msg: f64,
    max_rss_kb: u64,
    publisher_rate: f64,
}

fn receive_run(client: &str, url: &str, transport: &str, size: usize, count: u64) -> Run {
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

/// Median, min and max.
fn summary(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({"median": sorted[sorted.len() / 2], "min": sorted[0], "max": sorted[sorted.len() - 1], "runs": values})
}

fn median(value: &Value) -> f64 {
    value["median"].as_f64().unwrap_or(0.0)
}

async fn orchestrate() {
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    results.insert("machine".into(), machine());

    // 1. Client receive: each client, both transports, two payload sizes. Each group gets a
    // fresh faye: its heap grows over a run, which would slow the later groups.
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
    results.insert("receive".into(), Value::Array(receive));

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
    results.insert("neighbour".into(), bridge_neighbour(&url, &nats_url).await);
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

fn machine() -> Value {
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

fn status_kb_from(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

/// A bridge process on a configuration, its state on the embedded store; returns it once
/// `/readyz` answers 200.
async fn start_bridge(config: &str, dir: &Path) -> (Proc, u16, Duration) {
    start_bridge_on(config, dir, "embedded").await
}

/// [`start_bridge`] on the state backend `backend`.
async fn start_bridge_on(config: &str, dir: &Path, backend: &str) -> (Proc, u16, Duration) {
    let admin = free_port();
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\nbackend = \"{backend}\"\npath = \"{}\"\n{config}",
            dir.join("state").display()
        ),
    )
    .expect("write config");
    let started = Instant::now();
    let mut command = Command::new(root().join("target/release/cometd-bridge"));
    command.args(["run", "--config"]).arg(&file).env("RUST_LOG", "warn");
    let bridge = Proc::spawn(command);
    let ready = wait_ready(admin).await;
    (bridge, admin, ready.duration_since(started))
}

async fn wait_ready(admin: u16) -> Instant {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = http.get(format!("http://127.0.0.1:{admin}/readyz")).send().await
            && response.status() == 200
        {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the bridge did not become ready");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn source(url: &str) -> String {
    format!(
        "[[sources]]\nname = \"bench\"\nurl = \"{url}\"\nconnection_types = [\"websocket\"]\nmax_pending_count = 1000\n"
    )
}

/// Bridge → core NATS: throughput and CPU at full speed, and added latency at 10k msg/s
/// against a direct CometD subscriber on the same flood, with the bridge's state (and so
/// its spools) on `backend`: `embedded` (durable) or `memory` (what durability costs).
async fn bridge_nats(url: &str, nats_url: &str, backend: &str) -> Value {
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
            let mut direct =
                Proc::spawn(subscriber_command("cometd-bridge", url, "/bench/bridge", count, "websocket"));
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
            let run = json!({
                "rate": (received - 1.0) / span(&via_bridge).max(1e-9),
                "direct_rate": (direct_stats["received"].as_f64().unwrap_or(0.0) - 1.0) / span(&direct_stats).max(1e-9),
                "bridge_cpu_us_per_msg": (cpu_after - cpu_before) as f64 / received.max(1.0),
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
            "bridge_cpu_us_per_msg": pick(&full, "bridge_cpu_us_per_msg"), "runs": full,
        },
        "at_10k": {
            "p50_ms": pick(&paced, "p50_ms"), "p99_ms": pick(&paced, "p99_ms"),
            "direct_p50_ms": pick(&paced, "direct_p50_ms"), "direct_p99_ms": pick(&paced, "direct_p99_ms"),
            "bridge_cpu_us_per_msg": pick(&paced, "bridge_cpu_us_per_msg"), "runs": paced,
        },
        "bridge_max_rss_kb": max_rss_kb,
    })
}

/// Bridge → JetStream with acks, measured twice. The delivery stage alone (the bridge's
/// forwarder and JetStream sink, fed from memory) against a plain async-nats JetStream
/// publisher with the bridge's ack window, both in this process, in the same run: the
/// like-for-like comparison. And end to end (flood → faye → bridge → stream) beside a
/// direct CometD subscriber on the same flood, which shows what the CometD side delivers.
async fn bridge_jetstream(url: &str, nats_url: &str) -> Value {
    const COUNT: u64 = 20_000;
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
    let mut stage_rates = Vec::new();
    let mut plain_rates = Vec::new();
    let mut plain_id_rates = Vec::new();
    let mut bridge_rates = Vec::new();
    let mut direct_rates = Vec::new();
    for run in 0..RUNS {
        plain_rates.push(plain_publisher(&jetstream, &format!("plain{run}"), COUNT, false).await);
        plain_id_rates.push(plain_publisher(&jetstream, &format!("plainid{run}"), COUNT, true).await);
        stage_rates.push(delivery_stage(nats_url, &jetstream, &format!("stage{run}"), COUNT).await);

        // End to end.
        let name = format!("BRIDGE{run}");
        create_stream(&jetstream, &name, &format!("bridge{run}.>")).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "[nats]\nurl = \"{nats_url}\"\n{}[[subscriptions]]\nid = \"js\"\nsource = \"bench\"\nchannel = \"/bench/js{run}\"\nsink = {{ type = \"nats\", subject = \"bridge{run}.x\", jetstream = true }}\n",
            source(url)
        );
        let (bridge, _, _) = start_bridge(&config, dir.path()).await;
        let channel = format!("/bench/js{run}");
        let mut direct = Proc::spawn(subscriber_command("cometd-bridge", url, &channel, COUNT, "websocket"));
        direct.expect_ready();
        let started = Instant::now();
        let mut publisher = Proc::spawn(flood_command(url, COUNT, 64, 0, &[&channel]));
        wait_stored(&jetstream, &name, COUNT).await;
        bridge_rates.push(COUNT as f64 / started.elapsed().as_secs_f64());
        let _ = publisher.line();
        publisher.reap();
        let direct_stats: Value = serde_json::from_str(&direct.line().expect("stats")).expect("JSON");
        direct.reap();
        let span = (direct_stats["last_us"].as_f64().unwrap_or(0.0)
            - direct_stats["first_us"].as_f64().unwrap_or(0.0))
            / 1e6;
        direct_rates.push((direct_stats["received"].as_f64().unwrap_or(0.0) - 1.0) / span.max(1e-9));
        bridge.kill();
        eprintln!(
            "JetStream: delivery stage {:.0} msg/s, plain publisher {:.0} msg/s ({:.0} with Nats-Msg-Id); end to end {:.0} msg/s, direct subscriber {:.0} msg/s",
            stage_rates[run], plain_rates[run], plain_id_rates[run], bridge_rates[run], direct_rates[run]
        );
    }
    json!({
        "messages": COUNT,
        "stage_rate": summary(&stage_rates),
        "plain_publisher_rate": summary(&plain_rates),
        "plain_publisher_with_message_id_rate": summary(&plain_id_rates),
        "bridge_rate": summary(&bridge_rates),
        "direct_rate": summary(&direct_rates),
    })
}

async fn create_stream(jetstream: &async_nats::jetstream::Context, name: &str, subjects: &str) {
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            ..Default::default()
        })
        .await
        .expect("stream");
}

/// Waits (at most two minutes) until stream `name` holds `count` messages.
async fn wait_stored(jetstream: &async_nats::jetstream::Context, name: &str, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored =
            jetstream.get_stream(name).await.expect("stream").info().await.expect("info").state.messages;
        if stored >= count || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The peer: `count` 64-byte JSON messages published with async-nats, the bridge's ack
/// window in flight; `with_message_id` adds a `Nats-Msg-Id` header, as the bridge must, so
/// that the stream tracks duplicates for it too. Returns messages per second until the
/// last ack.
async fn plain_publisher(
    jetstream: &async_nats::jetstream::Context,
    prefix: &str,
    count: u64,
    with_message_id: bool,
) -> f64 {
    create_stream(jetstream, &prefix.to_uppercase(), &format!("{prefix}.>")).await;
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for seq in 0..count {
        let payload = json!({"seq": seq, "ts": now_us(), "pad": "x".repeat(64)}).to_string();
        let ack = if with_message_id {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("bench.{prefix}.session.{seq}"));
            jetstream.publish_with_headers(format!("{prefix}.x"), headers, payload.into()).await
        } else {
            jetstream.publish(format!("{prefix}.x"), payload.into()).await
        };
        window.push_back(ack.expect("publish"));
        if window.len() >= cometd_bridge::sink::ACK_WINDOW {
            window.pop_front().expect("ack").await.expect("ack");
        }
    }
    for ack in window {
        ack.await.expect("ack");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// The bridge's delivery stage alone: its spool, forwarder and JetStream sink, as the
/// daemon runs them, handed `count` messages like the plain publisher's by appending them
/// to the spool in batches of 512. Returns messages per second until the forwarder has
/// every ack.
async fn delivery_stage(
    nats_url: &str,
    jetstream: &async_nats::jetstream::Context,
    prefix: &str,
    count: u64,
) -> f64 {
    use cometd_bridge::bridge::forwarder::{Counters, Forwarder, Stop};
    use cometd_bridge::bridge::spool::{Spool, SpoolLimit, Spooled};
    use cometd_bridge::delivery::Envelope;
    use cometd_bridge::sink::{NatsSink, RetryPolicy, Sink, subject::SubjectTemplate};
    use cometd_bridge::store::{EmbeddedStore, SpoolAppend, Store};

    create_stream(jetstream, &prefix.to_uppercase(), &format!("{prefix}.>")).await;
    let client = async_nats::connect(nats_url).await.expect("connect");
    let metrics = cometd_bridge::telemetry::metrics::Metrics::new();
    let subject = SubjectTemplate::parse(&format!("{prefix}.x")).expect("subject");
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
    let counters = Arc::new(Counters::default());
    let spool = Spool::new("stage".into(), store.clone(), SpoolLimit::new(u64::MAX), u64::MAX, None);
    let forwarder = Forwarder {
        subscription: "stage".into(),
        sink: Sink::Nats(Box::new(NatsSink::new(
            client,
            subject,
            true,
            cometd_bridge::config::Payload::Data,
        ))),
        spool: spool.clone(),
        store: store.clone(),
        metrics,
        counters: counters.clone(),
        replay: None,
        retry: RetryPolicy::new(cometd_bridge::config::RetryConfig {
            max_elapsed: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(1),
            max_attempts: None,
        }),
    };
    let (source, session): (Arc<str>, Arc<str>) = ("bench".into(), "session".into());
    let stop = Stop::default();
    let started = Instant::now();
    // The forwarder runs as the daemon runs it; the spool is filled as fast as it can be.
    let task = tokio::spawn(forwarder.run(1, stop.clone()));
    let mut seq = 0;
    while seq < count {
        let mut envelopes = Vec::new();
        while seq < count && envelopes.len() < 512 {
            let message = cometd_bridge::cometd::Message {
                channel: "/bench/stage".into(),
                data: Some(json!({"seq": seq, "ts": now_us(), "pad": "x".repeat(64)}).into()),
                ..Default::default()
            };
            envelopes.push(Envelope {
                source: source.clone(),
                subscription: "stage".into(),
                session: session.clone(),
                sequence: seq,
                replay_id: None,
                message: Arc::new(message),
                received_at: std::time::SystemTime::now(),
            });
            seq += 1;
        }
        let appends: Vec<SpoolAppend> = envelopes
            .iter()
            .map(|envelope| SpoolAppend { subscription: "stage".into(), record: envelope.to_record() })
            .collect();
        let sizes: Vec<u64> = appends.iter().map(|append| append.record.len() as u64).collect();
        let sequences = store.spool_append(appends.into()).await.expect("spooled").into_iter().flatten();
        spool.appended(
            envelopes.into_iter().zip(sequences).zip(sizes).map(|((envelope, sequence), bytes)| Spooled {
                sequence,
                bytes,
                envelope,
            }),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters.forwarded.load(Ordering::Relaxed) < count {
        assert!(Instant::now() < deadline, "the forwarder did not deliver every message in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    stop.soon.cancel();
    task.await.expect("the forwarder finished");
    rate
}

/// Bridge → one webhook receiver through 10 subscriptions: rate and per-subscription order.
async fn bridge_webhook(url: &str) -> Value {
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

/// What a full subscription costs its neighbour: the rate of a healthy subscription (core
/// NATS) of a source while another subscription of the same source is full (a 64 KiB quota
/// behind a webhook that refuses connections, so it drops and counts), ÷ its rate with no
/// neighbour (the issue's figure; the source then carries only half the flood), and ÷ its
/// rate beside a healthy neighbour on the other channel (a second NATS subscription: the
/// same CometD traffic, so what is left is the cost of being full). The same flood, half on
/// each channel, every time; the three take turns.
async fn bridge_neighbour(url: &str, nats_url: &str) -> Value {
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

/// The spool alone: appends of 1 KiB messages to the embedded store in group commits of
/// 512 (each synced), then the drain of that backlog into core NATS by a forwarder that
/// reads it back from the store, as after a restart.
async fn spool_alone(nats_url: &str) -> Value {
    use cometd_bridge::bridge::forwarder::{Counters, Forwarder, Stop};
    use cometd_bridge::bridge::spool::{Spool, SpoolLimit};
    use cometd_bridge::delivery::Envelope;
    use cometd_bridge::sink::{NatsSink, RetryPolicy, Sink, subject::SubjectTemplate};
    use cometd_bridge::store::{EmbeddedStore, SpoolAppend, Store};

    const COUNT: u64 = 60_000;
    const GROUP: usize = 512;
    let mut append_rates = Vec::new();
    let mut drain_rates = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let pad = "x".repeat(1000);
        let records: Vec<SpoolAppend> = (0..COUNT)
            .map(|seq| {
                let envelope = Envelope {
                    source: "bench".into(),
                    subscription: "drain".into(),
                    session: "session".into(),
                    sequence: seq,
                    replay_id: None,
                    message: Arc::new(cometd_bridge::cometd::Message {
                        channel: "/bench/drain".into(),
                        data: Some(json!({"seq": seq, "pad": pad}).into()),
                        ..Default::default()
                    }),
                    received_at: std::time::SystemTime::now(),
                };
                SpoolAppend { subscription: "drain".into(), record: envelope.to_record() }
            })
            .collect();
        let started = Instant::now();
        for group in records.chunks(GROUP) {
            store.spool_append(group.to_vec().into()).await.expect("append");
        }
        append_rates.push(COUNT as f64 / started.elapsed().as_secs_f64());

        let summary = store.spool_summaries().await.expect("summaries").remove("drain");
        let client = async_nats::connect(nats_url).await.expect("connect");
        let counters = Arc::new(Counters::default());
        let spool = Spool::new("drain".into(), store.clone(), SpoolLimit::new(u64::MAX), u64::MAX, summary);
        let forwarder = Forwarder {
            subscription: "drain".into(),
            sink: Sink::Nats(Box::new(NatsSink::new(
                client,
                SubjectTemplate::parse("bench.drain").expect("subject"),
                false,
                cometd_bridge::config::Payload::Data,
            ))),
            spool,
            store: store.clone(),
            metrics: cometd_bridge::telemetry::metrics::Metrics::new(),
            counters: counters.clone(),
            replay: None,
            retry: RetryPolicy::new(cometd_bridge::config::RetryConfig {
                max_elapsed: Duration::from_secs(3600),
                max_backoff: Duration::from_secs(1),
                max_attempts: None,
            }),
        };
        let stop = Stop::default();
        let started = Instant::now();
        let task = tokio::spawn(forwarder.run(summary.map_or(1, |summary| summary.first), stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(120);
        while counters.forwarded.load(Ordering::Relaxed) < COUNT {
            assert!(Instant::now() < deadline, "the backlog did not drain in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drain_rates.push(COUNT as f64 / started.elapsed().as_secs_f64());
        stop.soon.cancel();
        task.await.expect("the forwarder stopped");
        eprintln!(
            "spool: {:.0} appends/s of 1 KiB in groups of {GROUP}, backlog of {COUNT} drained into NATS at {:.0} msg/s",
            append_rates.last().copied().unwrap_or(0.0),
            drain_rates.last().copied().unwrap_or(0.0)
        );
    }
    json!({"messages": COUNT, "group": GROUP, "append_rate": summary(&append_rates), "drain_rate": summary(&drain_rates)})
}

/// The bridge → one webhook subscription whose receiver takes 20 ms or 100 ms per request,
/// with `max_in_flight` 1 and 16: messages a second, one run each (bounded by count).
async fn webhook_latency(url: &str) -> Value {
    let total = Arc::new(AtomicU64::new(0));
    let mut results = Vec::new();
    for (latency_ms, in_flight, count) in
        [(20u64, 1u64, 150u64), (100, 1, 50), (20, 16, 2_000), (100, 8, 600), (100, 16, 800)]
    {
        total.store(0, Ordering::Relaxed);
        let app = {
            let total = total.clone();
            axum::Router::new().route(
                "/hook",
                axum::routing::post(move || {
                    let total = total.clone();
                    async move {
                        // The receiver's latency is the scenario.
                        tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                        total.fetch_add(1, Ordering::Relaxed);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hook = format!("http://{}/hook", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "{}[[subscriptions]]\nid = \"slow\"\nsource = \"bench\"\nchannel = \"/bench/slow\"\nsink = {{ type = \"webhook\", url = \"{hook}\", max_in_flight = {in_flight} }}\n",
            source(url)
        );
        let (bridge, _, _) = start_bridge(&config, dir.path()).await;
        let started = Instant::now();
        let mut publisher = Proc::spawn(flood_command(url, count, 64, 0, &["/bench/slow"]));
        let deadline = Instant::now() + Duration::from_secs(120);
        while total.load(Ordering::Relaxed) < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rate = total.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        let _ = publisher.line();
        publisher.reap();
        bridge.kill();
        server.abort();
        eprintln!("webhook at {latency_ms} ms, max_in_flight {in_flight}: {rate:.1} msg/s");
        results.push(
            json!({"latency_ms": latency_ms, "max_in_flight": in_flight, "messages": count, "rate": rate}),
        );
    }
    Value::Array(results)
}

fn sessions_runs(url: &str) -> Value {
    let mut runs = Vec::new();
    for count in [1_000usize, 10_000] {
        let mut command = Command::new("bash");
        command.args([
            "-c",
            &format!(
                "ulimit -n 20000 2>/dev/null; exec {} sessions {url} {count}",
                std::env::current_exe().expect("exe").display()
            ),
        ]);
        let mut process = Proc::spawn(command);
        let result: Value =
            process.line().and_then(|line| serde_json::from_str(&line).ok()).unwrap_or(Value::Null);
        process.reap();
        eprintln!("sessions {count}: {result}");
        runs.push(json!({"requested": count, "result": result}));
    }
    Value::Array(runs)
}

async fn idle_daemon(url: &str) -> Value {
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

fn report(results: &Value) -> String {
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
        "| direct CometD subscriber on the same flood, msgs/s | {} | |",
        range(&full["direct_rate"], 0)
    );
    let _ = writeln!(
        w,
        "| bridge rate ÷ client alone | {:.2} | ≥ 0.95 |",
        median(&full["rate"]) / median(&full["direct_rate"]).max(1.0)
    );
    let _ = writeln!(
        w,
        "| bridge CPU µs per forwarded message (full speed) | {} | ≤ 10 |",
        range(&full["bridge_cpu_us_per_msg"], 2)
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
        "| p50 / p99 ms direct at 10k msg/s | {} / {} | |",
        range(&paced["direct_p50_ms"], 2),
        range(&paced["direct_p99_ms"], 2)
    );
    let _ = writeln!(
        w,
        "| added p99 ms | {:.2} | ≤ 1 |",
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
        "| delivery stage ÷ plain publisher | {:.2} | ≥ 0.8 |",
        median(&js["stage_rate"]) / median(&js["plain_publisher_rate"]).max(1.0)
    );
    let _ = writeln!(
        w,
        "| delivery stage ÷ plain publisher with `Nats-Msg-Id` | {:.2} | |",
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
fn receive_entry<'r>(receive: &'r [Value], transport: &str, size: u64, client: &str) -> Option<&'r Value> {
    receive.iter().find(|e| e["transport"] == transport && e["payload"] == size && e["client"] == client)
}

/// The figures the targets are about, as (name, value, target), from a run's results.
fn headline(results: &Value) -> Vec<(String, f64, &'static str)> {
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
        "≤ 10",
    ));
    figures.push((
        "bridge → NATS added p99 ms at 10k msg/s".into(),
        median(&nats["at_10k"]["p99_ms"]) - median(&nats["at_10k"]["direct_p99_ms"]),
        "≤ 1",
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
        "≥ 0.8",
    ));
    figures.push((
        "JetStream delivery stage ÷ publisher with `Nats-Msg-Id`".into(),
        median(&js["stage_rate"]) / median(&js["plain_publisher_with_message_id_rate"]).max(1.0),
        "",
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

use std::fmt::Write as _;
