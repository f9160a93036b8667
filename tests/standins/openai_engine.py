#!/usr/bin/env python3
"""A small real engine stand-in speaking the OpenAI streaming API, with switchable misbehaviour.

It is a real program (own process, real socket, real signals) for the faults the tiny mlx model
cannot produce on demand: ignoring SIGTERM, leaving a grandchild in another session, printing a
known failure line and exiting, never becoming able to generate, exiting during start.

    openai_engine.py --port P [--tps 200] [--load-s 0] [--ignore-sigterm] [--grandchild]
                     [--print-line TEXT --exit-code N] [--never-ready] [--exit-after-s S] [--exit-on-sigusr1]
                     [--hold-gpu-mb N] [--grow-mb N]
                     [--silent-from N [--silent-after-tokens K]]   running but silent
                     [--metrics vllm|omlx]                         per-step / completion-time counters
                     [--slow-on-sigusr2 F]                         decode F times as fast after SIGUSR2
                     [--ollama [--lazy-load-s S] [--keep-alive-s K]]  Ollama API, lazy model load
                     [--prefill-blocks-decode]                     one engine step at a time, as mlx_lm.server

``--grow-mb N`` makes every generation request allocate N MB, write to every page of it and keep it,
the way mlx_lm.server's prompt cache grew without a bound before ``--max-kv-size``.

Running-but-silent engines (what users meet besides SIGSTOP): from the N-th generation request on
(counting canaries), the engine sends K tokens (K=0: only the response head, the pattern of oMLX
issue #2852) and then nothing, with the connection open, ``/health`` 200 and the process running.

Counters reproduce the engines' recorded behaviour: ``--metrics vllm`` serves
``vllm:generation_tokens_total`` advanced per token (vllm/v1/metrics/loggers.py increments it from
each step's IterationStats; nothing while a prompt is prefilled, stats.py counts prompt tokens at the
first token), ``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc``: a request takes a
cache block for every prefill chunk (``--first-token-delay-s`` is its prefill, one chunk every
``--prefill-chunk-s``; ``--prefill-tokens-per-s`` adds time for each word of the prompt, so a long
prompt has a long prefill and a canary's does not) and one per 16 tokens made, and frees them when it ends (vLLM's scheduler
allocates blocks for each scheduled chunk and reports its usage after every step, scheduler.py
``schedule`` / ``update_from_output``); a silent engine moves none of them. A request in prefill counts in
``vllm:num_requests_running`` (vLLM's scheduler keeps it in its running list through every chunk). Its
prompt (a token a word) is added to ``vllm:prompt_tokens_total`` in one go with its first token, and
``vllm:time_to_first_token_seconds`` observes it then, never while it is prefilled: vLLM's output
processor adds a request's whole ``prompt_len`` while it ``is_prefilling``, which ends with the first
output the engine core hands out for it, and observes its time to first token in the same step
(vllm/v1/metrics/stats.py ``IterationStats.update_from_output``, vllm/v1/engine/output_processor.py;
the counter and histogram in vllm/v1/metrics/loggers.py ``PrometheusStatLogger.record``). ``--metrics omlx`` serves
``/api/status`` whose ``total_completion_tokens`` grows only when a request finishes (oMLX adds a
request's tokens to its stats at completion) with ``active_requests``.

``--prefill-blocks-decode`` runs the engine one step at a time, as mlx_lm.server does: each chunk of a
prompt's prefill (2048 words, at ``--prefill-tokens-per-s``) takes the engine whole, and no stream beside it
gets a token until the chunk is done. mlx_lm.server's one generation thread calls ``BatchGenerator.next`` in
a loop, and each call runs a decode step for the requests generating and then a chunk of
``prefill_step_size`` tokens (2048 by default) of the prompts being prefilled (mlx_lm/generate.py
``BatchGenerator._next``, mlx_lm/server.py ``_generate`` and its ``--prefill-step-size``, mlx-lm 0.32): a
prompt shorter than one chunk stops every stream beside it for the whole of its prefill. Not modelled: mlx
prefills up to 8 prompts in one call (here concurrent prompts' chunks take turns), runs one decode step
between two chunks of a long prompt (here the lock is not fair: chunks may follow each other), and holds
back prefill while its decode batch is full; a non-streamed request has no prefill here. The tests that
use it send one streamed prompt shorter than a chunk at a time.

``--ollama`` speaks Ollama's API (``/api/version``, ``/api/ps``, streamed ``/api/generate`` and ``/api/chat``, plus the
OpenAI paths): the model loads on the first request *before the first byte* (``--lazy-load-s``) and
unloads after ``--keep-alive-s`` idle seconds; ``/api/ps`` lists it only while loaded (ollama
docs/api.md "List Running Models"; server/sched.go adds a runner to the loaded set after its load).
Every generation request is logged as ``request N PATH loaded=BOOL``.
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

MLX_PREFILL_STEP = 2048  # mlx_lm.server --prefill-step-size, its default (mlx_lm/server.py)


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
    p.add_argument("--exit-on-sigusr1", action="store_true",
                   help="exit with --exit-code when SIGUSR1 arrives (an engine ending on its own, when a test says)")
    p.add_argument("--keepalive-s", type=float, default=0.0, help="send SSE comments every N s before tokens")
    p.add_argument("--first-token-delay-s", type=float, default=0.0, help="the prefill: time before the first token")
    # llama-server answers a stream's head only with its first result, after the prefill (llama.cpp
    # tools/server/server-context.cpp: "in streaming mode, the first error must be treated as non-stream response",
    # rd.next() before the response; the llama.cpp of llama-cpp-python 0.3.36, which tools/build_engines.sh builds).
    p.add_argument("--head-with-first-token", action="store_true",
                   help="send a stream's response head only with its first token (llama-server's way)")
    p.add_argument("--prefill-chunk-s", type=float, default=0.25, help="one KV cache block per chunk of the prefill")
    p.add_argument("--prefill-tokens-per-s", type=float, default=0.0,
                   help="prefill the prompt at this many words a second (0: no time for the prompt)")
    p.add_argument("--prefill-blocks-decode", action="store_true",
                   help="a prefill chunk stops every stream's decode until it is done (mlx_lm.server)")
    p.add_argument("--log-paths", action="store_true", help="print every request line (method and path) as received")
    p.add_argument("--log-header", action="append", default=[],
                   help="print this request header of every POST as received (\"header NAME: VALUE\", None if absent)")
    p.add_argument("--grow-mb", type=float, default=0.0, help="allocate and touch N MB per request, never freed")
    p.add_argument("--silent-from", type=int, default=0, help="from the N-th generation request on, go silent")
    p.add_argument("--silent-after-tokens", type=int, default=0)
    p.add_argument("--metrics", choices=("vllm", "omlx"), default=None)
    p.add_argument("--slow-on-sigusr2", type=float, default=None,
                   help="after SIGUSR2, decode at this share of --tps (an engine that became slow: a throttled GPU)")
    p.add_argument("--ollama", action="store_true")
    p.add_argument("--model-name", default="tiny:1b")
    p.add_argument("--lazy-load-s", type=float, default=0.0)
    p.add_argument("--keep-alive-s", type=float, default=300.0)
    # Adapters append their own arguments (a model path, "serve", --model-dir ...): ignore them.
    args, _unknown = p.parse_known_args()

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.exit_on_sigusr1:
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(args.exit_code))
    if args.slow_on_sigusr2 is not None:
        def slow_down(*_: object) -> None:
            args.tps *= args.slow_on_sigusr2

        signal.signal(signal.SIGUSR2, slow_down)
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
    lock = threading.Lock()
    stats = {"requests": 0, "running": 0, "tokens_step": 0, "tokens_done": 0, "loaded_until": 0.0, "blocks": 0,
             "prompt_tokens": 0, "first_tokens": 0, "ttft_s": 0.0}
    cache_blocks = 4096  # vllm:kv_cache_usage_perc = blocks in use / cache_blocks
    load_lock = threading.Lock()
    step = threading.Lock()  # --prefill-blocks-decode: the engine's one step at a time

    def loaded() -> bool:
        return not args.ollama or time.monotonic() < stats["loaded_until"]

    def ensure_loaded() -> None:
        """Ollama loads the model before it answers at all (nothing is sent while loading)."""
        if not args.ollama:
            return
        with load_lock:
            if not loaded():
                time.sleep(args.lazy_load_s)
            stats["loaded_until"] = float("inf")  # held while a request runs

    def release(keep_alive_s: float | None = None) -> None:
        """Ollama restarts the model's keep-alive timer when a request ends (the request's own
        ``keep_alive`` if it sent one, else the server default)."""
        if args.ollama:
            stats["loaded_until"] = time.monotonic() + (args.keep_alive_s if keep_alive_s is None else keep_alive_s)

    def expires_at() -> str:
        """/api/ps ``expires_at`` (RFC 3339, as Ollama writes it) for the current keep-alive."""
        left_s = stats["loaded_until"] - time.monotonic()
        when = time.time() + min(left_s, 10 * 365 * 86400)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e9):09d}Z"

    def prompt_words(body: dict) -> int:
        messages = body.get("messages") or []
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return len((text + " " + str(body.get("prompt") or "")).split())

    def silence() -> None:
        while True:  # running, connection open, never another byte
            time.sleep(3600)

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
            elif self.path == "/api/version" and args.ollama:
                self._json(200, {"version": "0.14.0"})
            elif self.path == "/api/ps" and args.ollama:
                models = [{"name": args.model_name, "model": args.model_name, "expires_at": expires_at()}] \
                    if loaded() else []
                self._json(200, {"models": models})
            elif self.path == "/metrics" and args.metrics == "vllm":
                body = ("# TYPE vllm:generation_tokens_total counter\n"
                        f'vllm:generation_tokens_total{{model_name="standin"}} {stats["tokens_step"]}.0\n'
                        "# TYPE vllm:num_requests_running gauge\n"
                        f'vllm:num_requests_running{{model_name="standin"}} {stats["running"]}.0\n'
                        "# TYPE vllm:kv_cache_usage_perc gauge\n"
                        f'vllm:kv_cache_usage_perc{{model_name="standin"}} {stats["blocks"] / cache_blocks!r}\n'
                        "# TYPE vllm:prompt_tokens_total counter\n"
                        f'vllm:prompt_tokens_total{{model_name="standin"}} {stats["prompt_tokens"]}.0\n'
                        "# TYPE vllm:time_to_first_token_seconds histogram\n"
                        f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="standin"}} '
                        f'{stats["first_tokens"]}.0\n'
                        f'vllm:time_to_first_token_seconds_count{{model_name="standin"}} {stats["first_tokens"]}.0\n'
                        f'vllm:time_to_first_token_seconds_sum{{model_name="standin"}} {stats["ttft_s"]!r}\n'
                        ).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/api/status" and args.metrics == "omlx":
                self._json(200, {"total_completion_tokens": stats["tokens_done"],
                                 "active_requests": stats["running"], "avg_generation_tps": args.tps})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "standin", "object": "model"}]})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if args.log_paths:
                print(f"request POST {self.path}", flush=True)
            for name in args.log_header:
                print(f"header {name}: {self.headers.get(name)}", flush=True)
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if args.never_ready:
                self._json(500, {"error": {"message": "generation thread died"}})
                return
            ollama_generate = args.ollama and self.path in ("/api/generate", "/api/chat")
            if self.path not in ("/v1/chat/completions", "/v1/completions") and not ollama_generate:
                self._json(404, {"error": {"message": f"{self.path} not supported"}})
                return
            with lock:
                stats["requests"] += 1
                number = stats["requests"]
                stats["running"] += 1
            print(f"request {number} {self.path} loaded={loaded()} keep_alive={body.get('keep_alive')} "
                  f"max_tokens={body.get('max_tokens')} stream={body.get('stream') is True}", flush=True)
            keep_alive = body.get("keep_alive")
            try:
                ensure_loaded()
                self._generate(body, number, ollama_generate)
            finally:
                with lock:
                    stats["running"] -= 1
                release(float(keep_alive) if isinstance(keep_alive, int | float) else None)

        def _generate(self, body: dict, number: int, ollama_generate: bool) -> None:
            silent = bool(args.silent_from) and number >= args.silent_from
            if ollama_generate:
                n = int((body.get("options") or {}).get("num_predict") or 16)
                if silent and args.silent_after_tokens <= 0:
                    silence()  # as Ollama, which sends its head with its first line: nothing at all
                self.send_response(200)
                self.send_header("content-type", "application/x-ndjson")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                chat = self.path == "/api/chat"  # Ollama's chat: the text in "message", not "response"
                try:
                    for i in range(n):
                        if silent and i >= args.silent_after_tokens:
                            silence()
                        line = json.dumps({"model": args.model_name, "done": False,
                                           **({"message": {"role": "assistant", "content": "tok "}} if chat else
                                              {"response": "tok "})})
                        data = line.encode() + b"\n"
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        stats["tokens_step"] += 1
                        time.sleep(1.0 / args.tps)
                    line = json.dumps({"model": args.model_name, "response": "", "done": True, "eval_count": n,
                                       "eval_duration": int(n / args.tps * 1e9)})
                    data = line.encode() + b"\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
                    self.wfile.flush()
                    stats["tokens_done"] += n
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return
            n = int(body.get("max_tokens") or 16)
            sent_at = time.monotonic()

            def first_token() -> None:  # as vLLM counts it: the whole prompt, with the first token
                with lock:
                    stats["prompt_tokens"] += prompt_words(body)
                    stats["first_tokens"] += 1
                    stats["ttft_s"] += time.monotonic() - sent_at

            if args.grow_mb:
                # bytes of one repeated non-zero value are written out (memset), so every page is resident.
                kept.append(b"\x01" * int(args.grow_mb * 1e6))
            chat = self.path == "/v1/chat/completions"
            if not body.get("stream"):
                if silent:
                    silence()  # a hung engine: the whole answer never comes
                first_token()
                time.sleep(n / args.tps)
                text = "tok " * n
                choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                    {"index": 0, "text": text}
                self._json(200, {"id": "x", "object": "chat.completion", "choices": [choice],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
                return
            head_sent = False

            def head() -> None:
                nonlocal head_sent
                if not head_sent:
                    head_sent = True
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()

            if not args.head_with_first_token:
                head()

            def send(data: bytes) -> None:
                head()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            held = 0  # this request's KV cache blocks

            def take_block() -> None:
                nonlocal held
                with lock:
                    stats["blocks"] += 1
                held += 1

            try:
                deadline = time.monotonic() + args.keepalive_s
                while time.monotonic() < deadline:
                    send(b": keepalive\n\n")
                    time.sleep(0.5)
                prefill_s = args.first_token_delay_s
                if args.prefill_tokens_per_s:
                    prefill_s += prompt_words(body) / args.prefill_tokens_per_s
                prefill_end = time.monotonic() + prefill_s
                if args.prefill_blocks_decode and args.prefill_tokens_per_s:
                    words = prompt_words(body)
                    while words > 0:  # a chunk of mlx_lm.server's prefill_step_size at a time, alone
                        chunk = min(words, MLX_PREFILL_STEP)
                        with step:
                            time.sleep(chunk / args.prefill_tokens_per_s)
                        words -= chunk
                        take_block()
                    prefill_end = time.monotonic() + args.first_token_delay_s
                while (left := prefill_end - time.monotonic()) > 0:  # one chunk per step
                    time.sleep(min(left, args.prefill_chunk_s))
                    take_block()
                for i in range(n):
                    if silent and i >= args.silent_after_tokens:
                        silence()
                    if i == 0:
                        first_token()
                    if args.prefill_blocks_decode:
                        with step:  # waits while a prefill chunk runs
                            pass
                    delta = {"content": "tok "} if chat else None
                    choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": "tok "}
                    send(b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n")
                    stats["tokens_step"] += 1  # per decode step, as vLLM counts
                    if i % 16 == 0:
                        take_block()
                    time.sleep(1.0 / args.tps)
                stats["tokens_done"] += n  # at completion, as oMLX and llama.cpp count
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
                send(b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n")
                send(b"data: [DONE]\n\n")
                send(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with lock:
                    stats["blocks"] -= held

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
