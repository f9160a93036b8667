"""A stand-in for vLLM's and SGLang's OpenAI servers (CUDA engines that cannot run here), true to their recorded surfaces.

    python tests/standins/gpu_server_engine.py --as vllm   [MODEL] --host H --port P [--api-key K] [...]
    python tests/standins/gpu_server_engine.py --as sglang --model-path M --host H --port P [--api-key K] [...]

What it reproduces (tests/contract/fixtures/{vllm,sglang}/surfaces.json cite the upstream files):

* vLLM 0.33.0: the port opens only once the engine is built (``--load-s``); ``GET /health`` 200;
  ``--api-key`` guards /v1, /v2, /inference, /cohere with ``{"error":"Unauthorized"}``;
  ``POST /v1/messages`` with an invalid body is 400.
* SGLang 0.5.23: the port opens at once; ``GET /ready`` answers 503 until the model is loaded and
  warmed up (``--load-s``), then 200; ``/health`` and ``/health_generate`` run a generation (here:
  counted, so a test can show nobody used them); ``--api-key`` guards everything but /health*,
  /ready and /metrics.
* Both: ``POST /v1/completions`` streams a chunk per token and a usage chunk, then ``[DONE]``;
  ``GET /metrics`` has the engine's token counter and running-request gauge.

``GET /standin/calls`` returns how often each path was requested and which Authorization headers came.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = [" 1", ",", " 2", ",", " 3", ",", " 4", ",", " 5", ",", " 6", ",", " 7", ",", " 8", ","]


class State:
    def __init__(self, flavour: str, api_key: str | None, load_s: float) -> None:
        self.flavour = flavour
        self.api_key = api_key
        self.ready_at = time.monotonic() + load_s
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.auth_seen: list[str] = []
        self.generated = 0
        self.running = 0

    def guarded(self, path: str) -> bool:
        if self.flavour == "vllm":
            return path.startswith(("/v1", "/v2", "/inference", "/cohere"))
        return not path.startswith(("/health", "/ready", "/metrics", "/standin"))


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _allowed(self) -> bool:
            with state.lock:
                state.calls[self.path] += 1
                state.auth_seen.append(self.headers.get("Authorization", ""))
            if state.api_key and state.guarded(self.path) and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._send(401, '{"error":"Unauthorized"}')
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/standin/calls":
                with state.lock:
                    self._send(200, json.dumps({"calls": dict(state.calls), "auth": state.auth_seen}))
                return
            if not self._allowed():
                return
            loaded = time.monotonic() >= state.ready_at
            if self.path == "/ready" and state.flavour == "sglang":
                self._send(200 if loaded else 503, "")
            elif self.path in ("/health", "/health_generate"):
                if state.flavour == "sglang":
                    time.sleep(1.0)  # SGLang's handler submits a generation and sleeps in 1 s steps
                self._send(200 if loaded else 503, "")
            elif self.path == "/metrics":
                self._send(200, self._metrics(), "text/plain; version=0.0.4")
            else:
                self._send(404, '{"detail":"Not Found"}')

        def _metrics(self) -> str:
            with state.lock:
                generated, running = state.generated, state.running
            if state.flavour == "vllm":
                return ("# TYPE vllm:num_requests_running gauge\n"
                        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}.0\n'
                        "# TYPE vllm:generation_tokens_total counter\n"
                        f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {generated}.0\n')
            return ("# TYPE sglang:num_running_reqs gauge\n"
                    f'sglang:num_running_reqs{{model_name="m"}} {running}.0\n'
                    "# TYPE sglang:realtime_tokens_total counter\n"
                    f'sglang:realtime_tokens_total{{mode="decode",model_name="m"}} {generated}.0\n'
                    "# TYPE sglang:generation_tokens_total counter\n"
                    f'sglang:generation_tokens_total{{model_name="m"}} {generated}.0\n')

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", 0) or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                body = {}
            if not self._allowed():
                return
            if self.path == "/v1/completions":
                self._completion(body)
            elif self.path == "/v1/messages":
                missing = [k for k in ("model", "max_tokens", "messages") if k not in body]
                if missing:
                    self._send(400, json.dumps({"error": {"message": f"Field required: {', '.join(missing)}",
                                                          "type": "BadRequestError", "param": None, "code": 400}}))
                else:
                    self._send(200, json.dumps({"id": "msg_x", "type": "message", "role": "assistant", "model": body["model"],
                                                "content": [{"type": "text", "text": state.flavour + ": native"}],
                                                "stop_reason": "end_turn", "stop_sequence": None,
                                                "usage": {"input_tokens": 3, "output_tokens": 2}}))
            else:
                self._send(404, '{"detail":"Not Found"}')

        def _completion(self, body: dict) -> None:
            n = max(1, min(int(body.get("max_tokens") or 16), len(WORDS)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            with state.lock:
                state.running += 1
            try:
                for i, word in enumerate(WORDS[:n]):
                    chunk = {"id": "cmpl-s", "object": "text_completion", "created": int(time.time()), "model": body.get("model"),
                             "choices": [{"index": 0, "text": word, "logprobs": None,
                                          "finish_reason": "length" if i == n - 1 else None}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.002)
                usage = {"id": "cmpl-s", "object": "text_completion", "created": int(time.time()), "model": body.get("model"),
                         "choices": [], "usage": {"prompt_tokens": 9, "total_tokens": 9 + n, "completion_tokens": n}}
                self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
                self.wfile.flush()
            finally:
                with state.lock:
                    state.running -= 1
                    state.generated += n
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--as", dest="flavour", choices=["vllm", "sglang"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--load-s", type=float, default=1.0)
    args, _rest = parser.parse_known_args()  # the model and the engines' other flags
    state = State(args.flavour, args.api_key, args.load_s)
    if args.flavour == "vllm":
        time.sleep(args.load_s)  # vLLM builds its engine before the HTTP server listens
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.serve_forever()


if __name__ == "__main__":
    main()
