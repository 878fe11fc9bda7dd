"""A webhook receiver for the demo: `webhook_echo.py PORT SECRET [HOST]` (host 127.0.0.1).

Answers every POST with 204 and prints `WEBHOOK <body> signature=<ok|bad>`, checking the
Standard Webhooks signature (v1, HMAC-SHA256 of id.timestamp.body) with SECRET.
"""
import base64
import hashlib
import hmac
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = sys.argv[2]
KEY = base64.b64decode(SECRET.removeprefix("whsec_")) if SECRET.startswith("whsec_") else SECRET.encode()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        signed = f"{self.headers['webhook-id']}.{self.headers['webhook-timestamp']}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
        received = self.headers.get("webhook-signature", "").split()
        verdict = "ok" if expected in received else "bad"
        print(f"WEBHOOK {body.decode()} signature={verdict}", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


HOST = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
HTTPServer((HOST, int(sys.argv[1])), Handler).serve_forever()
