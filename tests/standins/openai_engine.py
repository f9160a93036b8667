#!/usr/bin/env python3
"""A small real engine stand-in speaking the OpenAI streaming API, with switchable misbehaviour.

It is a real program (own process, real socket, real signals) for the faults the tiny mlx model
cannot produce on demand: ignoring SIGTERM, leaving a grandchild in another session, printing a
known failure line and exiting, never becoming able to generate, exiting during start.

    openai_engine.py --port P [--tps 200] [--load-s 0] [--ignore-sigterm] [--grandchild]
                     [--print-line TEXT --exit-code N] [--never-ready] [--exit-after-s S]
                     [--hold-gpu-mb N] [--grow-mb N]

``--grow-mb N`` makes every generation request allocate N MB, write to every page of it and keep it,
the way mlx_lm.server's prompt cache grew without a bound before ``--max-kv-size``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tps", type=float, default=500.0)
    p.add_argument("--load-s", type=float, default=0.0)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--grandchild", action="store_true", help="spawn a grandchild in its own session")
    p.add_argument("--print-line", action="append", default=[])
    p.add_argument("--exit-code", type=int, default=1)
    p.add_argument("--never-ready", action="store_true", help="/health 200 but generation always fails")
    p.add_argument("--exit-after-s", type=float, default=None)
    p.add_argument("--keepalive-s", type=float, default=0.0, help="send SSE comments every N s before tokens")
    p.add_argument("--first-token-delay-s", type=float, default=0.0)
    p.add_argument("--log-paths", action="store_true", help="print every request line (method and path) as received")
    p.add_argument("--grow-mb", type=float, default=0.0, help="allocate and touch N MB per request, never freed")
    args = p.parse_args()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.print_line:
        for line in args.print_line:
            print(line, flush=True)
        time.sleep(0.2)
        sys.exit(args.exit_code)
    if args.grandchild:
        # A grandchild that escapes the process group: killpg alone would miss it.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100000)"],
                                 start_new_session=True)
        print(f"grandchild pid {child.pid}", flush=True)
    time.sleep(args.load_s)
    started = time.monotonic()
    kept: list[bytes] = []  # the "cache": grows by --grow-mb per request and is never trimmed

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *a: object) -> None:
            pass

        def _json(self, code: int, obj: object) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if args.log_paths:
                print(f"request GET {self.path}", flush=True)
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "standin", "object": "model"}]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if args.log_paths:
                print(f"request POST {self.path}", flush=True)
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if args.never_ready:
                self._json(500, {"error": {"message": "generation thread died"}})
                return
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._json(404, {"error": {"message": f"{self.path} not supported"}})
                return
            n = int(body.get("max_tokens") or 16)
            if args.grow_mb:
                # bytes of one repeated non-zero value are written out (memset), so every page is resident.
                kept.append(b"\x01" * int(args.grow_mb * 1e6))
            chat = self.path == "/v1/chat/completions"
            if not body.get("stream"):
                time.sleep(n / args.tps)
                text = "tok " * n
                choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                    {"index": 0, "text": text}
                self._json(200, {"id": "x", "object": "chat.completion", "choices": [choice],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def send(data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                deadline = time.monotonic() + args.keepalive_s
                while time.monotonic() < deadline:
                    send(b": keepalive\n\n")
                    time.sleep(0.5)
                time.sleep(args.first_token_delay_s)
                for _ in range(n):
                    delta = {"content": "tok "} if chat else None
                    choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": "tok "}
                    send(b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n")
                    time.sleep(1.0 / args.tps)
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
                send(b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n")
                send(b"data: [DONE]\n\n")
                send(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    if args.exit_after_s is not None:
        def bye() -> None:
            time.sleep(max(0.0, args.exit_after_s - (time.monotonic() - started)))
            os._exit(args.exit_code)
        threading.Thread(target=bye, daemon=True).start()
    print(f"standin listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
