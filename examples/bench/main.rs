//! The benchmarks: `scripts/bench.sh` (which installs the peers and builds this in release
//! mode) runs `bench` with no arguments, which starts faye and nats-server on loopback,
//! runs every scenario a few times, and writes `bench/RESULTS.md` and
//! `bench/results.json`. The other modes are the processes it spawns, so that each one's
//! CPU time and memory are measured by the operating system on its own, and aids for
//! looking closer: `bench report` (RESULTS.md again from results.json), `bench receive
//! <client> [transport]`, `bench bridge [nats|jetstream]`, `bench stage`, `bench failover`
//! (the failover scenario alone, merged into `bench/results.json` and `RESULTS.md`), and
//! `BENCH_PROFILE=perf.data` to run this client's subscriber under `perf record`
//! (`BENCH_PROFILE_EVENT=page-faults` to sample another event than CPU time,
//! `BENCH_PROFILE_FLAT=1` for a flat profile that disturbs the client less, and
//! `BENCH_PROFILE_TOOL=callgrind` for instruction counts under valgrind instead).
//!
//! Every load loop is bounded in count and in time; every network target is loopback.

use serde_json::{Value, json};

use crate::bridge_jetstream::{bridge_jetstream, delivery_stage, plain_publisher};
use crate::bridge_nats::bridge_nats;
use crate::failover::failover;
use crate::flood::flood;
use crate::idle::idle_daemon;
use crate::neighbour::bridge_neighbour;
use crate::orchestrate::orchestrate;
use crate::process::root;
use crate::receive::receive_run;
use crate::report::report;
use crate::servers::{start_faye, start_nats, start_salesforce_like};
use crate::sessions::sessions;
use crate::spool::spool_alone;
use crate::subscribers::{listen_subscriber, nats_subscriber, subscriber};
use crate::webhook_latency::webhook_latency;

mod bridge_jetstream;
mod bridge_nats;
mod bridge_webhook;
mod failover;
mod flood;
mod idle;
mod neighbour;
mod orchestrate;
mod process;
mod receive;
mod report;
mod servers;
mod sessions;
mod spool;
mod stats;
mod subscribers;
mod summary;
mod webhook_latency;

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
                        json!({"rate": part["rate"], "listen_rate": part["direct_rate"], "cpu_us_per_msg": part["bridge_cpu_us_per_msg"], "listen_cpu_us_per_msg": part["direct_cpu_us_per_msg"], "p99_ms": part["p99_ms"], "listen_p99_ms": part["direct_p99_ms"]})
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
            let (salesforce, replay_url) = start_salesforce_like(60);
            eprintln!("{}", bridge_neighbour(&url, &replay_url, &nats_url).await);
            salesforce.kill();
            nats.kill();
            faye.kill();
        }),
        Some("failover") => runtime.block_on(async {
            // Failover among replicas alone, its figures merged into the committed results.
            let (faye, url) = start_faye(60);
            let store = tempfile::tempdir().expect("temp dir");
            let (nats, nats_url) = start_nats(store.path());
            let result = failover(&url, &nats_url).await;
            eprintln!("{result}");
            nats.kill();
            faye.kill();
            let dir = root().join("bench");
            let mut results: Value = std::fs::read(dir.join("results.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_else(|| json!({}));
            results["failover"] = result;
            std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&results).expect("JSON"))
                .expect("write");
            std::fs::write(dir.join("RESULTS.md"), report(&results)).expect("write");
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
