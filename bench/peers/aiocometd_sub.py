"""Benchmark subscriber on aiocometd 0.4.5 (with the shims of tests/peers/aiocometd_peer.py).

  aiocometd_sub.py URL CHANNEL COUNT TRANSPORT TIMEOUT_S

Prints READY once subscribed, then, after COUNT messages or TIMEOUT_S seconds without one,
one JSON line of statistics (see stats.py).
"""
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "peers"))
import aiocometd_peer  # noqa: E402  (applies the shims)
from aiocometd_peer import Client, ConnectionType, QuickFirstConnect  # noqa: E402

from stats import Stats  # noqa: E402


async def main(url, channel, count, transport, timeout):
    asyncio.get_running_loop().set_exception_handler(aiocometd_peer._quiet_cancellations)
    kind = ConnectionType.WEBSOCKET if transport == "websocket" else ConnectionType.LONG_POLLING
    client = Client(url, [kind], extensions=[QuickFirstConnect()])
    await client.open()
    await client.subscribe(channel)
    print("READY", flush=True)
    stats = Stats()

    async def receive_all():
        while stats.received < count:
            message = await client.receive()
            stats.record(message["data"], time.time())

    # Idleness is checked once a second, not with a timer per message (as the Rust and
    # JS subscribers do), so that the bookkeeping costs little next to the client.
    receiving = asyncio.ensure_future(receive_all())
    last_count, idle_ticks = -1, 0
    while not receiving.done():
        await asyncio.wait([receiving], timeout=1.0)
        if stats.received == last_count:
            idle_ticks += 1
            if idle_ticks > timeout:
                receiving.cancel()
                break
        else:
            last_count, idle_ticks = stats.received, 0
    if receiving.done() and not receiving.cancelled() and receiving.exception():
        raise receiving.exception()
    print(stats.json(), flush=True)
    await client.close()


if __name__ == "__main__":
    url, channel, count, transport, timeout = sys.argv[1:6]
    asyncio.run(main(url, channel, int(count), transport, float(timeout)))
