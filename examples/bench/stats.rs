//! What a subscriber records of the messages it receives: sequence numbers (gaps,
//! duplicates, order) and latency, printed as one JSON line.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub fn now_us() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_micros()).expect("fits")
}

/// What a subscriber reads of each message's data: its sequence number and when it was
/// published (the padding is skipped).
#[derive(Default, serde::Deserialize)]
pub struct Probe {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    ts: Option<u64>,
}

impl Probe {
    pub fn of_value(data: &Value) -> Probe {
        Probe { seq: data["seq"].as_u64().unwrap_or(0), ts: data["ts"].as_u64() }
    }
}

/// Gaps, duplicates, order and latency of a subscriber's messages (the same fields, kept
/// the same way, as `bench/peers/stats.py` and `cometd_js_sub.mjs`: sequence numbers seen
/// in a bitmap, latencies in a list sorted at the end).
#[derive(Default)]
pub struct Stats {
    pub received: u64,
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
    pub fn record(&mut self, probe: Probe) {
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

    pub fn json(&mut self) -> Value {
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
