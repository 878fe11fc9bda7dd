"""Counts a benchmark subscriber's messages: gaps, duplicates, order, latency.

Each message's data is {"seq": n, "ts": microseconds since the epoch at publish, "pad": ...}.
"""
import json


class Stats:
    """Sequence numbers seen are kept in a bitmap, latencies in a list sorted at the end
    (the same as the Rust and JS subscribers)."""

    def __init__(self):
        self.received = 0
        self.seen = bytearray(1024)
        self.distinct = 0
        self.highest = -1
        self.duplicates = 0
        self.reordered = 0
        self.last_seq = -1
        self.latencies = []
        self.first = None
        self.last = None

    def record(self, data, now_s):
        now_us = now_s * 1e6
        seq = data["seq"]
        self.received += 1
        byte, bit = seq >> 3, 1 << (seq & 7)
        if byte >= len(self.seen):
            self.seen.extend(bytearray(max(byte + 1, 2 * len(self.seen)) - len(self.seen)))
        if self.seen[byte] & bit:
            self.duplicates += 1
        else:
            self.seen[byte] |= bit
            self.distinct += 1
        self.highest = max(self.highest, seq)
        if seq < self.last_seq:
            self.reordered += 1
        self.last_seq = max(self.last_seq, seq)
        self.latencies.append((now_us - data["ts"]) / 1000.0)
        if self.first is None:
            self.first = now_us
        self.last = now_us

    def json(self):
        latencies = sorted(self.latencies) or [0.0]
        gaps = self.highest + 1 - self.distinct
        return json.dumps({
            "received": self.received,
            "gaps": gaps,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "first_us": self.first or 0,
            "last_us": self.last or 0,
            "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        })
