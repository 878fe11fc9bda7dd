"""Prints NATS messages as they arrive: `nats_tail.py URL SUBJECT COUNT`.

Prints READY once subscribed, then `NATS <subject> <payload> [<header>=<value> ...]` per
message, and exits after COUNT messages. Part of the cometd-bridge demo.
"""
import asyncio
import sys

import nats


async def main(url: str, subject: str, count: int) -> None:
    client = await nats.connect(url)
    subscription = await client.subscribe(subject)
    await client.flush()
    print("READY", flush=True)
    for _ in range(count):
        message = await subscription.next_msg(timeout=30)
        headers = " ".join(f"{name}={value}" for name, value in sorted((message.headers or {}).items()))
        print(f"NATS {message.subject} {message.data.decode()} {headers}", flush=True)
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
