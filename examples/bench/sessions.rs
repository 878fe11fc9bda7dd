//! Scenario: idle sessions per process, the memory each one takes (mode `sessions`).

use std::process::Command;
use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType};
use serde_json::{Value, json};

use crate::process::{Proc, rss_kb};

/// Mode `sessions URL N`: N idle sessions in this one process; prints the memory they take.
pub async fn sessions(url: &str, count: usize) {
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

pub fn sessions_runs(url: &str) -> Value {
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
