"""Interop peer for the cometd-bridge tests, built on the Python library aiocometd 0.4.5.

Run it with the virtualenv that scripts/setup.sh makes:

  .tools/venv/bin/python tests/peers/aiocometd_peer.py listen URL CHANNEL COUNT [--transport T]
      Subscribes to CHANNEL, prints READY once subscribed, then prints each message it
      receives as one compact JSON line; exits 0 after COUNT messages.
  .tools/venv/bin/python tests/peers/aiocometd_peer.py publish URL CHANNEL JSON [--transport T]
      Publishes JSON as the message data and prints the server's reply as one JSON line.

T is "websocket" or "long-polling" (default: websocket, falling back to long-polling).
Errors are written to stderr and the exit code is 1.
"""
import argparse
import asyncio
import functools
import json
import sys


# --- shim: aiocometd passes loop= to asyncio calls that lost it in Python 3.10 -------------
def _without_loop(func):
    @functools.wraps(func)
    def call(*args, loop=None, **kwargs):
        return func(*args, **kwargs)
    return call


class _Semaphore(asyncio.Semaphore):
    # A subclass rather than a function, so isinstance() and subclassing keep working.
    def __init__(self, value=1, *, loop=None):
        super().__init__(value)


asyncio.Semaphore = _Semaphore
asyncio.wait = _without_loop(asyncio.wait)
asyncio.wait_for = _without_loop(asyncio.wait_for)
asyncio.sleep = _without_loop(asyncio.sleep)

# Imported only now, so that the library sees the patched asyncio functions.
import aiohttp  # noqa: E402
from aiocometd import Client, ConnectionType  # noqa: E402
from aiocometd.extensions import Extension  # noqa: E402
from aiocometd.transports.base import TransportBase  # noqa: E402


# --- shim: accept cookies from IP-address hosts such as 127.0.0.1 -------------------------
# aiohttp's default cookie jar drops them; cometd-nodejs-server relies on its session cookie.
async def _http_session(self):
    if self._http_session is None:
        self._http_session = aiohttp.ClientSession(
            json_serialize=self._json_dumps, cookie_jar=aiohttp.CookieJar(unsafe=True))
    return self._http_session


TransportBase._get_http_session = _http_session


class QuickFirstConnect(Extension):
    """Asks the server to answer the first /meta/connect at once.

    Client.open() waits for the reply to the first /meta/connect, which a server would
    otherwise hold for its whole connect timeout when there is nothing to deliver.
    """

    def __init__(self):
        self.sent = False

    async def outgoing(self, payload, headers):
        for message in payload:
            if not self.sent and message.get("channel") == "/meta/connect":
                message.setdefault("advice", {})["timeout"] = 0
                self.sent = True

    async def incoming(self, payload, headers=None):
        pass


def _json_argument(text):
    try:
        return json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None


def _print_json(value):
    print(json.dumps(value, separators=(",", ":")), flush=True)


def _quiet_cancellations(loop, context):
    # Tasks that aiocometd cancels while closing can be reported as "never retrieved";
    # those reports are noise. Anything else goes to the default handler.
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def _run(args):
    asyncio.get_running_loop().set_exception_handler(_quiet_cancellations)
    if args.transport == "websocket":
        types = [ConnectionType.WEBSOCKET]
    elif args.transport == "long-polling":
        types = [ConnectionType.LONG_POLLING]
    else:
        types = None  # aiocometd's default: websocket, else long-polling
    client = Client(args.url, types, extensions=[QuickFirstConnect()])
    try:
        await client.open()
        if args.command == "listen":
            await client.subscribe(args.channel)
            print("READY", flush=True)
            received = 0
            while received < args.count:
                _print_json(await client.receive())
                received += 1
        else:
            _print_json(await client.publish(args.channel, args.data))
    finally:
        if not client.closed:
            await client.close()
        elif client._transport is not None:
            # open() failed after the handshake: free the HTTP session it left behind.
            await client._transport.close()


class _Parser(argparse.ArgumentParser):
    # Usage errors exit 1 too (argparse's own choice is 2); subcommand parsers inherit this.
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"aiocometd_peer: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def main():
    parser = _Parser(description="aiocometd interop peer")
    commands = parser.add_subparsers(dest="command", required=True)
    listen = commands.add_parser("listen", help="subscribe and print COUNT messages")
    listen.add_argument("url")
    listen.add_argument("channel")
    listen.add_argument("count", type=int)
    publish = commands.add_parser("publish", help="publish one message")
    publish.add_argument("url")
    publish.add_argument("channel")
    publish.add_argument("data", type=_json_argument, metavar="JSON")
    for command in (listen, publish):
        command.add_argument("--transport", choices=["websocket", "long-polling"])
    args = parser.parse_args()
    try:
        asyncio.run(_run(args))
    except Exception as error:  # report any failure in one line, exit code 1
        print(f"aiocometd_peer: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
