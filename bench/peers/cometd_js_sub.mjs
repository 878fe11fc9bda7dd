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
const seen = new Set();
const latencies = [];
let lastSeq = -1;
let idle = null;

const finish = () => {
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * q))] : 0;
  const highest = seen.size ? Math.max(...seen) : -1;
  stats.gaps = highest + 1 - seen.size;
  stats.p50_ms = at(0.5);
  stats.p99_ms = at(0.99);
  process.stdout.write(JSON.stringify(stats) + '\n', () => cometd.disconnect(() => process.exit(0)));
  setTimeout(() => process.exit(0), 1000).unref();
};
const rearm = () => {
  clearTimeout(idle);
  idle = setTimeout(finish, timeoutMs);
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
    if (seen.has(seq)) stats.duplicates += 1;
    seen.add(seq);
    if (seq < lastSeq) stats.reordered += 1;
    lastSeq = Math.max(lastSeq, seq);
    latencies.push((nowUs - ts) / 1000);
    if (!stats.first_us) stats.first_us = nowUs;
    stats.last_us = nowUs;
    if (stats.received >= count) finish(); else rearm();
  }, (subscribed) => {
    if (!subscribed.successful) {
      console.error('subscribe failed', JSON.stringify(subscribed));
      process.exit(1);
    }
    process.stdout.write('READY\n');
    rearm();
  });
});
