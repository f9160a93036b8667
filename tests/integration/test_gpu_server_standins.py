"""kind = "vllm" and kind = "sglang" under the real daemon, against a stand-in true to their recorded surfaces.

vLLM and SGLang need CUDA and cannot run here; tests/standins/gpu_server_engine.py reproduces what
the contract fixtures record of them (vLLM's port opening only once the engine is built, SGLang's
/ready answering 503 until warmed up and its /health running a generation, the --api-key guards).
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import PYTHON, STANDINS, free_port

KEY = "sk-engine-contract"


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_engine_started_with_a_key_becomes_ready_through_its_own_routes(kind: str, daemon_factory) -> None:
    """The daemon waits out loading on the engine's cheap route, canaries with the key from --api-key, and finds /v1/messages native."""
    port = free_port()
    argv = [PYTHON, str(STANDINS / "gpu_server_engine.py"), "--as", kind]
    config = "\n".join([
        "[[engine]]", f'name = "{kind}"', f'kind = "{kind}"', 'model = "Qwen/Qwen3-8B"', f"port = {port}",
        "command = [" + ", ".join(f'"{a}"' for a in argv) + "]",
        f'args = ["--api-key", "{KEY}", "--load-s", "1.5"]',
        'footprint = "100MB"', 'stop_grace = "5s"', 'start_timeout = "60s"', "",
    ])
    daemon = daemon_factory(config).start()
    daemon.wait_state(kind, "ready", timeout_s=60)
    seen = httpx.get(f"http://127.0.0.1:{port}/standin/calls", timeout=5).json()
    calls, auth = seen["calls"], seen["auth"]

    assert calls.get("/v1/completions", 0) >= 1
    assert {a for a in auth if a} == {f"Bearer {KEY}"}  # every request that carried a key carried the right one
    if kind == "sglang":
        assert calls.get("/ready", 0) >= 2  # polled while it answered 503
        assert calls.get("/health", 0) == 0 and calls.get("/health_generate", 0) == 0
    else:
        assert calls.get("/health", 0) >= 1

    deadline = time.monotonic() + 10
    found: list[dict] = []
    while not found and time.monotonic() < deadline:
        found = [e for e in daemon.events() if e["kind"] == "engine.discovered" and e["engine"] == kind]
        time.sleep(0.1)
    assert found and found[-1]["messages_native"] is True
