// Benchmark subscriber on the CometD JavaScript client (npm cometd + cometd-nodejs-client).
//
//   node cometd_js_sub.mjs URL CHANNEL COUNT TRANSPORT TIMEOUT_S
//
// Prints READY once subscribed, then, after COUNT messages or TIMEOUT_S seconds without
// one, one JSON line of statistics (the same fields as stats.py).
import { adapt } from 'cometd-nodejs-client';
import { CometD } from 'cometd';

adapt();
const [url, channel, countText, transport, timeoutText] = process.argv.slice(2);
const count = Number(countText);
const timeoutMs = Number(timeoutText) * 1000;

const cometd = new CometD();
cometd.configure({ url, logLevel: 'warn' });
for (const name of cometd.getTransportTypes()) {
  if (name !== transport) cometd.unregisterTransport(name);
}

const stats = { received: 0, gaps: 0, duplicates: 0, reordered: 0, first_us: 0, last_us: 0 };
// Sequence numbers seen in a bitmap, latencies in a list sorted at the end (as the Rust
// and Python subscribers keep them).
let seen = new Uint8Array(1024);
let distinct = 0;
let highest = -1;
const latencies = [];
let lastSeq = -1;
let watch = null;

let finished = false;
const finish = () => {
  if (finished) return;
  finished = true;
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * q))] : 0;
  clearInterval(watch);
  stats.gaps = highest + 1 - distinct;
  stats.p50_ms = at(0.5);
  stats.p99_ms = at(0.99);
  process.stdout.write(JSON.stringify(stats) + '\n', () => cometd.disconnect(() => process.exit(0)));
  setTimeout(() => process.exit(0), 1000).unref();
};
// Idleness is checked once a second, not with a timer per message.
const startWatch = () => {
  let lastCount = -1;
  let idleTicks = 0;
  watch = setInterval(() => {
    if (stats.received === lastCount) {
      idleTicks += 1;
      if (idleTicks * 1000 > timeoutMs) finish();
    } else {
      lastCount = stats.received;
      idleTicks = 0;
    }
  }, 1000);
};

cometd.handshake((reply) => {
  if (!reply.successful) {
    console.error('handshake failed', JSON.stringify(reply));
    process.exit(1);
  }
  cometd.subscribe(channel, (message) => {
    const nowUs = (performance.timeOrigin + performance.now()) * 1000;
    const { seq, ts } = message.data;
    stats.received += 1;
    const byte = seq >> 3;
    const bit = 1 << (seq & 7);
    if (byte >= seen.length) {
      const grown = new Uint8Array(Math.max(byte + 1, 2 * seen.length));
      grown.set(seen);
      seen = grown;
    }
    if (seen[byte] & bit) {
      stats.duplicates += 1;
    } else {
      seen[byte] |= bit;
      distinct += 1;
    }
    if (seq > highest) highest = seq;
    if (seq < lastSeq) stats.reordered += 1;
    lastSeq = Math.max(lastSeq, seq);
    latencies.push((nowUs - ts) / 1000);
    if (!stats.first_us) stats.first_us = nowUs;
    stats.last_us = nowUs;
    if (stats.received >= count) finish();
  }, (subscribed) => {
    if (!subscribed.successful) {
      console.error('subscribe failed', JSON.stringify(subscribed));
      process.exit(1);
    }
    process.stdout.write('READY\n');
    startWatch();
  });
});
