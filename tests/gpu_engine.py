#!/usr/bin/env python3
"""A small real GPU engine for the NVIDIA validation: holds GPU memory and speaks the OpenAI streaming API.

It allocates ``--gpu-mb`` MiB of device memory with torch (plain ``cudaMalloc`` through the caching
allocator: ``torch.empty`` on a cuda device, never managed memory), touches it, and keeps it until
it exits. With ``--orphan-gpu-mb`` it first starts a grandchild in its own session that holds its
own GPU memory (the leftover an engine's worker leaves behind when the engine dies); with
``--orphan-ignore-sigterm`` that grandchild ignores SIGTERM, so only SIGKILL frees it.

    gpu_engine.py --port P [--gpu-mb N] [--device 0] [--orphan-gpu-mb N] [--orphan-ignore-sigterm]
                  [--tps 500]
    gpu_engine.py --hold-only --gpu-mb N [--device 0] [--ignore-sigterm]   (the grandchild)

It serves ``GET /health``, ``GET /v1/models`` and streaming or plain ``POST /v1/chat/completions``
and ``/v1/completions`` with a usage chunk, like ``tests/standins/openai_engine.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MIB = 1024 * 1024


def hold_gpu_memory(mb: int, device: int) -> object:
    """Allocate and touch ``mb`` MiB on cuda:``device``; the tensor must stay referenced to keep it."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_engine: torch sees no CUDA device", file=sys.stderr, flush=True)
        sys.exit(3)
    tensor = torch.empty(mb * MIB, dtype=torch.uint8, device=f"cuda:{device}")
    tensor.fill_(1)
    torch.cuda.synchronize(device)
    return tensor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--gpu-mb", type=int, default=0)
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--orphan-gpu-mb", type=int, default=0)
    p.add_argument("--orphan-ignore-sigterm", action="store_true")
    p.add_argument("--hold-only", action="store_true", help="only hold GPU memory (the grandchild)")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--tps", type=float, default=500.0)
    args = p.parse_args()
    if args.gpu_mb < 0 or args.orphan_gpu_mb < 0:
        p.error("--gpu-mb and --orphan-gpu-mb are MiB and must be >= 0")
    if not args.hold_only and args.port is None:
        p.error("--port is required (except with --hold-only)")

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    if args.hold_only:
        held = hold_gpu_memory(args.gpu_mb, args.device)
        print("held", flush=True)
        sys.stdout.close()
        while held is not None:
            time.sleep(3600)
        return

    if args.orphan_gpu_mb:
        argv = [sys.executable, os.path.abspath(__file__), "--hold-only", "--gpu-mb", str(args.orphan_gpu_mb),
                "--device", str(args.device)]
        if args.orphan_ignore_sigterm:
            argv.append("--ignore-sigterm")
        # Its own session: killpg of the engine's group does not reach it.
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
        assert child.stdout is not None
        line = child.stdout.readline().decode().strip()
        child.stdout.close()
        if line != "held":
            print(f"gpu_engine: the grandchild did not take its GPU memory (said {line!r})", file=sys.stderr,
                  flush=True)
            sys.exit(4)
        print(f"gpu_engine: orphan-to-be pid {child.pid} holds {args.orphan_gpu_mb} MiB", flush=True)

    held = hold_gpu_memory(args.gpu_mb, args.device) if args.gpu_mb else None
    print(f"gpu_engine: pid {os.getpid()} holds {args.gpu_mb} MiB on cuda:{args.device}", flush=True)

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
            if self.path == "/health":
                self._json(200, {"status": "ok", "gpu_mb": args.gpu_mb})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "gpu-engine", "object": "model"}]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._json(404, {"error": {"message": f"{self.path} not supported"}})
                return
            n = int(body.get("max_tokens") or 16)
            chat = self.path == "/v1/chat/completions"
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            if not body.get("stream"):
                time.sleep(n / args.tps)
                text = "tok " * n
                choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                    {"index": 0, "text": text}
                self._json(200, {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def send(data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            try:
                for _ in range(n):
                    choice = {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
                    send(b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n")
                    time.sleep(1.0 / args.tps)
                send(b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n")
                send(b"data: [DONE]\n\n")
                send(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"gpu_engine listening on {args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        del held


if __name__ == "__main__":
    main()
