"""A stand-in for oMLX's ``omlx serve`` (macOS-only, so it cannot run here), true to its recorded behaviour.

    python tests/standins/omlx_engine.py serve [--model-dir D] [--port P] [--host H] [--api-key K] [--base-path B]

What it reproduces, each from github.com/jundot/omlx (omlx/cli.py and omlx/server.py at commit
01496518d83bc640ab4b078143a9a36d50b00ffe, omlx/settings.py at 004308c9cfb0b1f67d710d219a2c59a281364269):

* settings: ``<base>/settings.json`` with base = ``--base-path``, else ``OMLX_BASE_PATH``, else
  ``~/.omlx`` (settings.py resolve_default_base_path); then ``OMLX_HOST``/``OMLX_PORT``/
  ``OMLX_MODEL_DIR``/``OMLX_API_KEY`` (``_apply_env_overrides``), then the flags. Any of
  ``--model-dir --port --host --max-model-memory --max-process-memory --log-level`` makes
  ``omlx serve`` save the merged settings back into settings.json (cli.py ``_has_cli_overrides``
  then ``settings.save()``): that is the rewrite the adapter must never cause.
* models: every sub-folder of the model directory with a config.json, known by its folder name.
* ``GET /health``: always 200 (server.py ``health``). ``GET /api/status`` and ``/v1/*`` want the
  API key as a Bearer token or ``x-api-key`` when one is set (``verify_api_key``): 401 otherwise.
* ``POST /v1/chat/completions``: streams chat chunks and a usage chunk for a known model, 404
  "Model not found: <name>" otherwise. ``POST /v1/messages``: the Anthropic Messages API; a body
  without model/max_tokens/messages is FastAPI's 422.
* ``/api/status`` totals grow only when a request completes (server_metrics snapshot).

``GET /standin/requests`` lists (method, path, model) of the requests it served, for assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

WORDS = [" one", " two", " three", " four", " five", " six", " seven", " eight"]
SAVING_FLAGS = ("model_dir", "port", "host", "max_model_memory", "max_process_memory", "log_level")


def load_settings(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    base = Path(os.path.expanduser(args.base_path or os.environ.get("OMLX_BASE_PATH") or "~/.omlx"))
    path = base / "settings.json"
    settings: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"version": "1.0"}
    server = settings.setdefault("server", {})
    model = settings.setdefault("model", {})
    auth = settings.setdefault("auth", {})
    server.setdefault("host", "127.0.0.1")
    server.setdefault("port", 8000)
    if os.environ.get("OMLX_HOST"):
        server["host"] = os.environ["OMLX_HOST"]
    if os.environ.get("OMLX_PORT"):
        server["port"] = int(os.environ["OMLX_PORT"])
    if os.environ.get("OMLX_MODEL_DIR"):
        model["model_dirs"] = [d for d in os.environ["OMLX_MODEL_DIR"].split(",") if d]
    if os.environ.get("OMLX_API_KEY"):
        auth["api_key"] = os.environ["OMLX_API_KEY"]
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.model_dir is not None:
        model["model_dirs"] = [d for d in args.model_dir.split(",") if d]
    if args.api_key is not None:
        auth["api_key"] = args.api_key
    if any(getattr(args, name) is not None for name in SAVING_FLAGS):
        base.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
        print("Saved CLI arguments to settings.json", flush=True)
    return base, settings


def discover(model_dirs: list[str]) -> list[str]:
    found = []
    for directory in model_dirs:
        root = Path(directory)
        if root.is_dir():
            found += sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
    return found


class State:
    def __init__(self, models: list[str], api_key: str | None) -> None:
        self.models = models
        self.api_key = api_key
        self.lock = threading.Lock()
        self.total_requests = 0
        self.total_completion_tokens = 0
        self.active = 0
        self.seen: list[tuple[str, str, str | None]] = []


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _json(self, status: int, payload: object) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if not state.api_key:
                return True
            given = self.headers.get("Authorization", "")
            key = given[7:] if given.lower().startswith("bearer ") else self.headers.get("x-api-key")
            if key is None:
                self._unauthorized("API key required")
                return False
            if key != state.api_key:
                self._unauthorized("Invalid API key")
                return False
            return True

        def _unauthorized(self, message: str) -> None:
            if self.path.startswith("/v1/"):
                self._json(401, {"error": {"message": message, "type": "authentication_error", "param": None, "code": None}})
            else:
                self._json(401, {"detail": message})

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._json(200, {"status": "healthy", "default_model": None, "mcp": None,
                                 "engine_pool": {"model_count": len(state.models), "loaded_count": 1,
                                                 "max_model_memory": None, "current_model_memory": 0}})
            elif self.path == "/api/status":
                if self._authorized():
                    with state.lock:
                        self._json(200, {"status": "ok", "version": "standin", "total_requests": state.total_requests,
                                         "active_requests": state.active, "waiting_requests": 0,
                                         "total_completion_tokens": state.total_completion_tokens,
                                         "avg_generation_tps": 400.0, "loaded_models": state.models[:1]})
            elif self.path == "/standin/requests":
                self._json(200, state.seen)
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", 0) or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                body = {}
            state.seen.append(("POST", self.path, body.get("model")))
            if not self._authorized():
                return
            if self.path == "/v1/chat/completions":
                self._chat(body)
            elif self.path == "/v1/messages":
                self._messages(body)
            else:
                self._json(404, {"detail": "Not Found"})

        def _chat(self, body: dict[str, Any]) -> None:
            model = body.get("model")
            if model not in state.models:
                self._json(404, {"error": {"message": f"Model not found: {model}", "type": "not_found_error",
                                           "param": None, "code": None}})
                return
            n = max(1, min(int(body.get("max_tokens") or 8), len(WORDS)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            with state.lock:
                state.active += 1
            try:
                for i, word in enumerate(WORDS[:n]):
                    chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model, "choices": [{"index": 0, "delta": {"content": word},
                                                          "finish_reason": "length" if i == n - 1 else None}]}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.005)
                usage = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": model, "choices": [],
                         "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}}
                self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
                self.wfile.flush()
            finally:
                with state.lock:
                    state.active -= 1
                    state.total_requests += 1
                    state.total_completion_tokens += n
            self.close_connection = True

        def _messages(self, body: dict[str, Any]) -> None:
            missing = [k for k in ("model", "max_tokens", "messages") if k not in body]
            if missing:
                self._json(422, {"detail": [{"type": "missing", "loc": ["body", k], "msg": "Field required", "input": body}
                                            for k in missing]})
                return
            if body["model"] not in state.models:
                self._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                            "message": f"Model not found: {body['model']}"}})
                return
            n = max(1, min(int(body["max_tokens"]), len(WORDS)))
            self._json(200, {"id": "msg_standin", "type": "message", "role": "assistant", "model": body["model"],
                             "content": [{"type": "text", "text": "omlx:" + "".join(WORDS[:n])}],
                             "stop_reason": "max_tokens", "stop_sequence": None,
                             "usage": {"input_tokens": 5, "output_tokens": n}})

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(prog="omlx")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    for flag in ("--model-dir", "--host", "--max-model-memory", "--max-process-memory", "--log-level",
                 "--base-path", "--api-key"):
        serve.add_argument(flag, default=None)
    serve.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    base, settings = load_settings(args)
    models = discover(settings["model"].get("model_dirs") or [str(base / "models")])
    state = State(models, settings["auth"].get("api_key") or None)
    server = ThreadingHTTPServer((settings["server"]["host"], settings["server"]["port"]), make_handler(state))
    print(f"Starting server at http://{settings['server']['host']}:{settings['server']['port']}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
