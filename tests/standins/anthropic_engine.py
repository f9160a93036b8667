"""A small engine stand-in that speaks the Anthropic Messages API (``/v1/messages``) and ``/health``.

Run it as a program: ``python -m tests.standins.anthropic_engine --port 8123``. It streams in the
Anthropic SSE event format (message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta with usage, message_stop) or answers a whole message.

Per-request behaviour is set with headers (they pass through the gateway unchanged):
  x-standin-prefill-s        seconds before the first token (default 0)
  x-standin-keepalive-s      during that wait, send ``: keepalive`` SSE comments this often
  x-standin-token-delay-s    seconds between tokens (default 0.005)
``GET /standin/stats`` says how many requests came and how many streams lost their client.
With ``--count-tokens`` it also answers ``POST /v1/messages/count_tokens``.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ["Hello", " from", " the", " stand", "-in", " engine", ".", " It", " streams", " words"]


COUNT_TOKENS = False  # --count-tokens: answer /v1/messages/count_tokens (without: 404, no such endpoint)


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.active_streams = 0
        self.client_gone = 0
        self.completed = 0

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {
                "requests": self.requests,
                "active_streams": self.active_streams,
                "client_gone": self.client_gone,
                "completed": self.completed,
            }


STATS = _Stats()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _json(self, status: int, doc: object) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/standin/stats":
            self._json(200, STATS.as_dict())
        else:
            self._json(
                404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}}
            )

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        if self.path.split("?")[0] == "/v1/messages/count_tokens" and COUNT_TOKENS:
            # llama-server's answer shape ({"input_tokens": n}); here one token per word of the messages.
            doc = json.loads(raw)
            words = sum(len(str(m.get("content", "")).split()) for m in doc.get("messages", []))
            self._json(200, {"input_tokens": words})
            return
        if self.path != "/v1/messages":
            self._json(
                404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}}
            )
            return
        try:
            body = json.loads(raw)
            max_tokens = int(body["max_tokens"])
            model = str(body.get("model", "standin"))
        except (ValueError, KeyError, TypeError) as exc:
            self._json(
                400,
                {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": f"bad request: {exc}"},
                },
            )
            return
        with STATS.lock:
            STATS.requests += 1
        prefill_s = float(self.headers.get("x-standin-prefill-s") or 0)
        keepalive_s = float(self.headers.get("x-standin-keepalive-s") or 0)
        delay_s = float(self.headers.get("x-standin-token-delay-s") or 0.005)
        words = [WORDS[i % len(WORDS)] for i in range(max_tokens)]
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if not body.get("stream"):
            time.sleep(prefill_s + delay_s * len(words))
            self._json(
                200,
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": "".join(words)}],
                    "stop_reason": "max_tokens",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 5, "output_tokens": len(words)},
                },
            )
            with STATS.lock:
                STATS.completed += 1
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        with STATS.lock:
            STATS.active_streams += 1
        try:
            self._event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": message_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 5, "output_tokens": 1},
                    },
                },
            )
            deadline = time.monotonic() + prefill_s
            while time.monotonic() < deadline:
                step = min(keepalive_s or prefill_s, max(0.0, deadline - time.monotonic()))
                time.sleep(step)
                if keepalive_s:
                    self._write(b": keepalive\n\n")
            self._event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            self._event("ping", {"type": "ping"})
            for word in words:
                self._event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": word},
                    },
                )
                time.sleep(delay_s)
            self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
            self._event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            )
            self._event("message_stop", {"type": "message_stop"})
            with STATS.lock:
                STATS.completed += 1
        except (BrokenPipeError, ConnectionResetError):
            with STATS.lock:
                STATS.client_gone += 1
        finally:
            with STATS.lock:
                STATS.active_streams -= 1

    def _event(self, name: str, doc: object) -> None:
        self._write(f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode())

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-tokens", action="store_true", help="serve POST /v1/messages/count_tokens")
    args = parser.parse_args(argv)
    global COUNT_TOKENS
    COUNT_TOKENS = args.count_tokens
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
