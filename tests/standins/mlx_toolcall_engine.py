#!/usr/bin/env python3
"""A stand-in for mlx_lm.server serving a tool-calling model, which the tiny random model is not.

The tiny model's chat template has no tool-call markers, so the real mlx_lm.server never parses a
tool call from it. This program answers ``POST /v1/chat/completions`` (streaming, with
``stream_options.include_usage``) in the exact stream format mlx_lm.server 0.32 emits when a
model wrote ``<tool_call>…</tool_call>``, as recorded from mlx_lm/server.py in the venv:

- ``ToolCallFormatter._format``: each call is ``{"function": {"name", "arguments": json.dumps(
  args)}, "type": "function", "id": str(uuid4()), "index": i}`` (``index`` only when streaming);
- ``handle_completion``: text chunks carry ``delta: {"role": "assistant", "content": ...}``; the
  whole call arrives in one chunk once the tool section closes; the last chunk says
  ``finish_reason: "tool_calls"`` (``if finish_reason == "stop" and made_tool_call``); then a
  ``choices: []`` chunk with ``usage`` and ``data: [DONE]``.

``--fragments N`` instead splits the arguments over N chunks the way vLLM and llama-server stream
them (id and name only on the first fragment). ``GET /standin/last`` returns the last request
body, so tests can check what the gateway's translation sent. Without ``tools`` in the request it
streams ``"ok"`` and ends with ``finish_reason: "stop"``; a last user message ``"FAIL MID-STREAM"``
gets one token and then an error object in the stream; ``"THINK FIRST"`` gets reasoning (in
``delta.reasoning``, as mlx_lm.server sends a thinking model's) and then an answer.

``--tokenize`` also serves ``POST /tokenize`` the way llama-server does (one id per word here).

    mlx_toolcall_engine.py --port P [--fragments N] [--tokenize]
"""

from __future__ import annotations

import argparse
import json
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fragments", type=int, default=0)
    p.add_argument("--tokenize", action="store_true", help="serve POST /tokenize as llama-server does")
    args = p.parse_args()
    last: dict[str, object] = {}

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
                self._json(200, {"status": "ok"})
            elif self.path == "/standin/last":
                self._json(200, last.get("body"))
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/tokenize" and args.tokenize:
                # llama-server's handle_tokenize answers {"tokens": [ids]} for {"content": text}
                # (tools/server/server.cpp); here one id per whitespace-separated word.
                self._json(200, {"tokens": list(range(len(str(body.get("content", "")).split())))})
                return
            if self.path != "/v1/chat/completions":
                # mlx_lm.server answers unknown POST paths with a bare 404 "Not Found".
                self.send_response(404)
                self.send_header("content-length", "9")
                self.end_headers()
                self.wfile.write(b"Not Found")
                return
            last["body"] = body
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            rid = f"chatcmpl-{uuid.uuid4()}"

            def chunk(delta: dict[str, object] | None, finish: str | None, **extra: object) -> None:
                doc: dict[str, object] = {"id": rid, "object": "chat.completion.chunk", "model": body.get("model"),
                                          "created": 0}
                doc["choices"] = [] if delta is None else [{"index": 0, "finish_reason": finish, "delta": delta}]
                doc.update(extra)
                self.wfile.write(f"data: {json.dumps(doc)}\n\n".encode())
                self.wfile.flush()

            tools = body.get("tools") or []
            if body.get("messages", [{}])[-1].get("content") == "FAIL MID-STREAM":
                # A fault injected on request: an error object inside the stream, as vLLM and
                # llama-server send one when generation fails after the response started.
                chunk({"role": "assistant", "content": "par"}, None)
                self.wfile.write(b'data: {"error": {"message": "out of memory while decoding", "code": 500}}\n\n')
                self.wfile.flush()
                self.close_connection = True
                return
            if body.get("messages", [{}])[-1].get("content") == "THINK FIRST":
                # A reasoning model under mlx_lm.server: its tokenizer's think tags route the
                # reasoning into delta.reasoning (server.py generate_response), the rest to content.
                chunk({"role": "assistant", "reasoning": "plan"}, None)
                chunk({"role": "assistant", "reasoning": " more"}, None)
                chunk({"role": "assistant", "content": "answer"}, None)
                chunk({"role": "assistant"}, "stop")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True
                return
            if tools:
                name = tools[0]["function"]["name"]
                if isinstance(body.get("tool_choice"), dict):
                    name = body["tool_choice"]["function"]["name"]
                arguments = json.dumps({"city": "Paris", "days": 3, "units": "metric"}, ensure_ascii=False)
                chunk({"role": "assistant", "content": "Checking."}, None)
                call_id = str(uuid.uuid4())
                if args.fragments:
                    n, size = args.fragments, len(arguments)
                    pieces = [arguments[size * i // n:size * (i + 1) // n] for i in range(n)]
                    chunk({"role": "assistant", "tool_calls": [
                        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]},
                        None)
                    for piece in pieces:
                        chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None)
                    chunk({"role": "assistant"}, "tool_calls")
                else:
                    call = {"function": {"name": name, "arguments": arguments}, "type": "function", "id": call_id,
                            "index": 0}
                    chunk({"role": "assistant", "tool_calls": [call]}, None)
                    chunk({"role": "assistant"}, "tool_calls")
                completion = 12
            else:
                chunk({"role": "assistant", "content": "ok"}, None)
                chunk({"role": "assistant"}, "stop")
                completion = 1
            if (body.get("stream_options") or {}).get("include_usage"):
                chunk(None, None, usage={"prompt_tokens": 20, "completion_tokens": completion,
                                         "total_tokens": 20 + completion})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
