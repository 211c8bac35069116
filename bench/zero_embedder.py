"""A zero-cost OpenAI-compatible embeddings endpoint: the same unit vector for every input, at once.

Run as `python -m bench.zero_embedder --port N`; Sluice's embed stage reaches it through
`SLUICE_EMBED_URL=http://127.0.0.1:N/v1` (stages/backends/http_embedder.py).
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.prepare import CONSTANT_VECTOR

# Rendered once: an answer is then a string join, so the endpoint costs next to nothing.
_VECTOR = json.dumps(CONSTANT_VECTOR, separators=(",", ":"))
_ITEM = '{"object":"embedding","index":%d,"embedding":' + _VECTOR + "}"


class ZeroHandler(BaseHTTPRequestHandler):
    """Answers `POST /v1/embeddings` with constant vectors and `GET /health` with 200."""

    # Keep-alive, so the embed stage's one HTTP client reuses its connection.
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        """Health check."""
        self._send(b'{"status":"ok"}')

    def do_POST(self) -> None:
        """One constant unit vector per input text."""
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        inputs = body.get("input", [])
        count = 1 if isinstance(inputs, str) else len(inputs)
        items = ",".join(_ITEM % i for i in range(count))
        self._send(f'{{"object":"list","model":"zero","data":[{items}]}}'.encode())

    def _send(self, payload: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one log line a batch would cost more than the answer."""


def main() -> None:
    """Serve on loopback until killed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), ZeroHandler).serve_forever()


if __name__ == "__main__":
    main()
