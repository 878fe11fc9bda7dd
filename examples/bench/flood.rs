//! The flood: a raw websocket Bayeux publisher (mode `flood`) and the command that starts it.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};

use crate::process::me;
use crate::stats::now_us;

/// Mode `flood URL COUNT SIZE RATE CHANNEL...`: a raw websocket Bayeux publisher, 50
/// publishes a frame and at most 2,000 unacknowledged, round-robin over the channels. RATE
/// 0 is as fast as the server acknowledges; otherwise messages per second. Prints the
/// acknowledged count and rate.
pub async fn flood(args: &[String]) {
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

pub fn flood_command(url: &str, count: u64, size: usize, rate: u64, channels: &[&str]) -> Command {
    let mut command = me();
    command.args(["flood", url, &count.to_string(), &size.to_string(), &rate.to_string()]).args(channels);
    command
}
