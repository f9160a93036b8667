"""Contract tests: each adapter against its engine's recorded surfaces, replayed by a real HTTP server.

The fixtures in ``tests/contract/fixtures/<engine>/`` are what the engine really sends: recorded from
a real mlx_lm.server here (``tests/fixtures/record_mlx_lm.py`` re-records them), and for vLLM, SGLang,
Ollama and oMLX, which cannot run here, made from the engine's own source at the version each
fixture names (``source`` fields cite the upstream file for every surface). The replay server
answers only the recorded route, with the recorded status and bytes, and asks for the API key
where the engine does, so an adapter that calls the wrong route, sends the wrong model name or
forgets the key fails here the way it would fail against the engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from probes.errors import ProbeError
from supervisord_llm.config import EngineConfig
from supervisord_llm.engine.adapters import EngineAdapter, adapter_for

pytestmark = [pytest.mark.anyio, pytest.mark.long_wait]  # mostly waits: run beside the rest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ENGINES = ("mlx_lm", "llama_cpp", "vllm", "sglang", "ollama", "omlx")


@pytest.fixture(autouse=True)
def _no_engine_keys_from_this_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys a developer has exported for their own engines must not leak into what these tests expect."""
    for name in ("VLLM_API_KEY", "OMLX_API_KEY", "OMLX_BASE_PATH"):
        monkeypatch.delenv(name, raising=False)


def surfaces(engine: str) -> dict[str, Any]:
    return json.loads((FIXTURES / engine / "surfaces.json").read_text())


# ---------------------------------------------------------------- the replay server

Answer = tuple[int, str, str]  # status, content type, body


@dataclass
class Replay:
    """Routes (method, path) -> a function of the request body giving the recorded answer."""

    routes: dict[tuple[str, str], Callable[[dict[str, Any]], Answer]] = field(default_factory=dict)
    api_key: str | None = None  # when set, guarded paths answer the engine's recorded 401 without it
    guarded: Callable[[str], bool] = lambda path: False
    unauthorized: Answer = (401, "application/json", '{"error":"Unauthorized"}')
    requests: list[tuple[str, str, dict[str, Any], dict[str, str]]] = field(default_factory=list)

    def answer(self, method: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> Answer:
        self.requests.append((method, path, body, headers))
        if self.api_key is not None and self.guarded(path):
            given = headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                return self.unauthorized
        route = self.routes.get((method, path))
        if route is None:
            return 404, "application/json", '{"detail":"Not Found"}'
        return route(body)


def recorded(exchange: dict[str, Any]) -> Callable[[dict[str, Any]], Answer]:
    return lambda _body: (exchange["status"], exchange.get("content_type", "application/json"), exchange.get("body", ""))


@pytest.fixture
def replay() -> Iterator[tuple[str, Replay]]:
    """A real HTTP server on 127.0.0.1 answering with recorded engine bytes; returns (base_url, replay)."""
    state = Replay()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length", 0) or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"_raw": raw.decode(errors="replace")}
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, content_type, text = state.answer(method, self.path, body, headers)
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def make_adapter(engine: str, base_url: str, tmp_path: Path, **overrides: Any) -> EngineAdapter:
    port = int(base_url.rsplit(":", 1)[1])
    model = {
        "mlx_lm": str(tmp_path / "tiny-model"),
        "llama_cpp": str(tmp_path / "tiny-llama.gguf"),
        "vllm": "Qwen/Qwen3-8B",
        "sglang": "Qwen/Qwen3-8B",
        "ollama": "qwen3:8b",
        "omlx": str(tmp_path / "models" / "Qwen3-4B-4bit"),
    }[engine]
    # An empty OMLX_BASE_PATH folder keeps the user's real ~/.omlx/settings.json out of these tests.
    env = {"OMLX_BASE_PATH": str(tmp_path / "omlx-base")} if engine == "omlx" else {}
    config = EngineConfig(name=f"{engine}-contract", kind=engine, model=model, port=port, env=env)
    return adapter_for(replace(config, **overrides))


def guard_for(engine: str) -> Callable[[str], bool]:
    """Which paths each engine guards with its API key (see the fixtures' ``unauthorized.source``)."""
    if engine == "vllm":
        return lambda path: path.startswith(("/v1", "/v2", "/inference", "/cohere"))
    if engine == "sglang":
        return lambda path: not path.startswith(("/health", "/ready", "/metrics"))
    if engine == "llama_cpp":
        return lambda path: path not in ("/health", "/v1/health")
    if engine == "omlx":
        return lambda path: path.startswith("/v1/") or path == "/api/status"
    return lambda path: False


def canary_exchange(engine: str) -> dict[str, Any]:
    s = surfaces(engine)
    return s["canary_chat"] if engine == "mlx_lm" else s["canary"]


# ---------------------------------------------------------------- fixtures say where they came from


@pytest.mark.parametrize("engine", ENGINES)
def test_every_fixture_names_its_source(engine: str) -> None:
    """Every recorded surface says where it came from: the engine version and, for the source-made ones, the upstream file."""
    s = surfaces(engine)
    assert s["source"]["engine"] and s["source"]["version"]
    if engine != "mlx_lm":
        for key, value in s.items():
            if isinstance(value, dict) and "status" in value:
                assert value.get("source"), f"{engine} {key} cites no upstream file"
        for line in s.get("log_lines", []):
            assert line["source"], f"{engine} log line cites no upstream file"


# ---------------------------------------------------------------- canaries


@pytest.mark.parametrize("engine", ENGINES)
async def test_canary_passes_on_the_engines_recorded_stream(engine: str, replay: tuple[str, Replay], tmp_path: Path) -> None:
    """The adapter's canary goes to the engine's own generation route and counts the recorded stream's tokens."""
    base_url, state = replay
    exchange = canary_exchange(engine)
    expected = {"omlx": "Qwen3-4B-4bit", "mlx_lm": "default_model"}.get(engine)

    def answer(body: dict[str, Any]) -> Answer:
        if expected is not None and body.get("model") != expected and "canary_unknown_model" in surfaces(engine):
            return recorded(surfaces(engine)["canary_unknown_model"])(body)
        return exchange["status"], exchange["content_type"], exchange["body"]

    state.routes[(exchange["method"], exchange["path"])] = answer
    adapter = make_adapter(engine, base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        reading = await adapter.canary(client, stall_s=5, timeout_s=10)
    assert reading.ok, reading.error
    tokens = exchange.get("tokens") or exchange["request"]["max_tokens"]
    assert reading.completion_tokens == tokens
    method, path, body, _ = state.requests[-1]
    assert (method, path) == (exchange["method"], exchange["path"])
    if expected is not None:
        assert body["model"] == expected


async def test_sglang_is_never_probed_through_its_generating_health_routes(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """SGLang's /health and /health_generate run a generation themselves: neither liveness nor canary uses them."""
    base_url, state = replay
    s = surfaces("sglang")
    state.routes[("POST", s["canary"]["path"])] = recorded(s["canary"])
    adapter = make_adapter("sglang", base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        await adapter.canary(client, stall_s=5, timeout_s=10)
    used = {path for _, path, _, _ in state.requests} | {adapter.liveness_path}
    assert not used & set(s["generating_endpoints"]["paths"])
    assert adapter.liveness_path == s["liveness"]["path"]


async def test_omlx_canary_with_the_model_path_gets_the_engines_404(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """oMLX knows models by folder name: sending the folder's path (the old behaviour) is the recorded 404, which fails the canary."""
    base_url, state = replay
    s = surfaces("omlx")

    def answer(body: dict[str, Any]) -> Answer:
        if body.get("model") != s["model_folder"]:
            return recorded(s["canary_unknown_model"])(body)
        return recorded(s["canary"])(body)

    state.routes[("POST", "/v1/chat/completions")] = answer
    adapter = make_adapter("omlx", base_url, tmp_path, served_model=str(tmp_path / "models" / "Qwen3-4B-4bit"))
    async with httpx.AsyncClient() as client:
        reading = await adapter.canary(client, stall_s=5, timeout_s=10)
    assert not reading.ok and "HTTP 404" in str(reading.error) and "Model not found" in str(reading.error)


async def test_mlx_lm_with_a_dead_generation_thread_fails_the_canary(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """mlx_lm.server whose generation thread died (recorded: weights missing) answers /health 503 and fails the canary by name."""
    base_url, state = replay
    s = surfaces("mlx_lm")
    assert s["no_weights_health_first_answer"]["status"] == 503
    assert s["missing_model_health_first_answer"]["status"] == 503 and s["missing_model_still_running"]
    state.routes[("POST", "/v1/chat/completions")] = recorded(s["no_weights_canary_chat"])
    adapter = make_adapter("mlx_lm", base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        reading = await adapter.canary(client, stall_s=5, timeout_s=10)
    assert not reading.ok and "generation thread died" in str(reading.error)


async def test_ollama_version_answers_while_its_runner_is_dead_but_the_canary_fails(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """Ollama's liveness (/api/version) stays 200 after its runner died; only the canary shows it, naming the runner's error."""
    base_url, state = replay
    s = surfaces("ollama")
    state.routes[("GET", "/api/version")] = recorded(s["liveness"]["dead"])
    state.routes[("POST", "/api/generate")] = recorded(s["canary_runner_dead"])
    adapter = make_adapter("ollama", base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        live = await client.get(adapter.liveness_url)
        reading = await adapter.canary(client, stall_s=5, timeout_s=10)
    assert live.status_code == 200
    assert not reading.ok and "llama-server process has terminated" in str(reading.error)


# ---------------------------------------------------------------- liveness


@pytest.mark.parametrize("engine", ENGINES)
def test_liveness_path_is_the_recorded_cheap_one(engine: str, tmp_path: Path) -> None:
    """Each adapter's liveness URL is the engine's recorded cheap route (no generation behind it)."""
    s = surfaces(engine)
    path = s["liveness"]["path"] if "liveness" in s else s["health_ready"]["path"]
    adapter = make_adapter(engine, "http://127.0.0.1:1", tmp_path)
    assert adapter.liveness_path == path


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama_cpp"])
def test_loading_and_dead_engines_are_not_live(engine: str) -> None:
    """While vLLM/SGLang/llama-server load, and after they die, their liveness route refuses or answers 5xx, so no canary is tried on it."""
    liveness = surfaces(engine)["liveness"]
    for state in ("loading", "dead"):
        recorded_answer = liveness[state]
        assert recorded_answer.get("refused") or recorded_answer["status"] >= 500, (engine, state)
    assert liveness["ready"]["status"] == 200


# ---------------------------------------------------------------- counters


@pytest.mark.parametrize("engine", ["vllm", "sglang", "omlx", "llama_cpp"])
async def test_counters_read_from_the_recorded_endpoint(engine: str, replay: tuple[str, Replay], tmp_path: Path) -> None:
    """Token totals and running requests come out of the engine's recorded /metrics or /api/status text."""
    base_url, state = replay
    metrics = surfaces(engine)["metrics"]
    text = (FIXTURES / engine / metrics["file"]).read_text()
    content_type = "application/json" if metrics["file"].endswith(".json") else "text/plain; version=0.0.4"
    state.routes[("GET", metrics["path"])] = lambda _body: (200, content_type, text)
    adapter = make_adapter(engine, base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        counters = await adapter.counters(client, 1.0)
    assert counters is not None
    assert counters.generated_tokens_total == metrics["generated_tokens_total"]
    assert counters.requests_running == metrics["requests_running"]
    if "tokens_per_s" in metrics:
        assert counters.tokens_per_s == metrics["tokens_per_s"]
    # The step count and the queue the watchdog and the start check read (absent: the engine has none).
    assert counters.steps_total == metrics.get("steps_total")
    assert counters.requests_waiting == metrics.get("requests_waiting")
    assert counters.cache_usage == metrics.get("cache_usage")  # vLLM's per-step KV cache gauge


# ---------------------------------------------------------------- API keys


def _key_config(engine: str, key: str, tmp_path: Path) -> dict[str, Any]:
    """How a user gives each engine its key: its own flag, or (oMLX) its settings.json."""
    if engine in ("vllm", "sglang", "llama_cpp"):
        return {"args": ("--api-key", key)}
    base = tmp_path / "omlx-base"
    base.mkdir(exist_ok=True)
    (base / "settings.json").write_text(json.dumps({"version": "1.0", "auth": {"api_key": key}}))
    return {}


@pytest.mark.parametrize("engine", ["vllm", "sglang", "omlx", "llama_cpp"])
async def test_canary_carries_the_engines_api_key(engine: str, replay: tuple[str, Replay], tmp_path: Path) -> None:
    """An engine started with an API key gets it on the canary; without it the canary is the engine's recorded 401."""
    base_url, state = replay
    s = surfaces(engine)
    exchange = s["canary"]
    state.routes[(exchange["method"], exchange["path"])] = recorded(exchange)
    state.api_key = f"sk-{engine}-contract"
    state.guarded = guard_for(engine)
    state.unauthorized = (s["unauthorized"]["status"], s["unauthorized"]["content_type"], s["unauthorized"]["body"])
    async with httpx.AsyncClient() as client:
        without = await make_adapter(engine, base_url, tmp_path).canary(client, stall_s=5, timeout_s=10)
        overrides = _key_config(engine, state.api_key, tmp_path)
        with_key = await make_adapter(engine, base_url, tmp_path, **overrides).canary(client, stall_s=5, timeout_s=10)
    assert not without.ok and "HTTP 401" in str(without.error)
    assert with_key.ok, with_key.error


async def test_omlx_status_needs_the_key_from_env_or_settings(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """oMLX's /api/status answers 401 without the key; OMLX_API_KEY in the engine's env (or its settings.json) gets the counters."""
    base_url, state = replay
    s = surfaces("omlx")
    text = (FIXTURES / "omlx" / "status.json").read_text()
    state.routes[("GET", "/api/status")] = lambda _body: (200, "application/json", text)
    state.api_key = "sk-omlx-status"
    state.guarded = guard_for("omlx")
    state.unauthorized = (s["unauthorized"]["status"], s["unauthorized"]["content_type"], s["unauthorized"]["body"])
    async with httpx.AsyncClient() as client:
        with pytest.raises(ProbeError, match="401"):
            await make_adapter("omlx", base_url, tmp_path).counters(client, 1.0)
        env = {"OMLX_BASE_PATH": str(tmp_path / "omlx-base"), "OMLX_API_KEY": state.api_key}
        counters = await make_adapter("omlx", base_url, tmp_path, env=env).counters(client, 1.0)
    assert counters is not None and counters.generated_tokens_total == s["metrics"]["generated_tokens_total"]


# ---------------------------------------------------------------- /v1/messages, found out at ready time


MESSAGES_CASES = [
    ("vllm", "current", True), ("vllm", "older", False),
    ("sglang", "current", True), ("sglang", "older", False),
    ("ollama", "current", True), ("ollama", "older", False),
    ("omlx", "current", True),
]


@pytest.mark.parametrize(("engine", "release", "native"), MESSAGES_CASES)
async def test_messages_support_is_asked_of_the_running_engine(
    engine: str, release: str, native: bool, replay: tuple[str, Replay], tmp_path: Path
) -> None:
    """Whether /v1/messages goes to the engine natively follows the engine's own answer at ready time (older releases: translated)."""
    base_url, state = replay
    probe = surfaces(engine)["messages_probe"][release]
    state.routes[("POST", "/v1/messages")] = recorded(probe)
    adapter = make_adapter(engine, base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        facts = await adapter.discover(client)
    assert adapter.messages_supported is native
    assert facts == {"messages_native": native}
    method, path, body, _ = state.requests[-1]
    assert (method, path, body) == ("POST", "/v1/messages", {})


@pytest.mark.parametrize(("release", "native", "facts"), [("current", True, {}), ("older", False, {"messages_native": False})])
async def test_llama_server_messages_probe_follows_its_recorded_answers(
    release: str, native: bool, facts: dict[str, bool], replay: tuple[str, Replay], tmp_path: Path
) -> None:
    """llama-server answers the probe's empty Messages body with 500 ('messages' is required): no verdict, native stays; an older build's 404 means translation."""
    base_url, state = replay
    state.routes[("POST", "/v1/messages")] = recorded(surfaces("llama_cpp")["messages_probe"][release])
    adapter = make_adapter("llama_cpp", base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        assert await adapter.discover(client) == facts
    assert adapter.messages_supported is native


async def test_configured_messages_support_wins_and_nothing_is_asked(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """An engine config's supports_messages decides alone: the engine is not asked."""
    base_url, state = replay
    adapter = make_adapter("ollama", base_url, tmp_path, supports_messages=False)
    async with httpx.AsyncClient() as client:
        assert await adapter.discover(client) == {}
    assert adapter.messages_supported is False and state.requests == []


async def test_an_engine_that_does_not_answer_keeps_the_kinds_default(tmp_path: Path) -> None:
    """No answer to the probe (engine gone, key unknown) tells nothing: the kind's default stands."""
    from tests.helpers import free_port

    adapter = make_adapter("vllm", f"http://127.0.0.1:{free_port()}", tmp_path)
    async with httpx.AsyncClient() as client:
        assert await adapter.discover(client) == {}
    assert adapter.messages_supported is True


async def test_mlx_lm_is_translated_and_its_recorded_404_agrees(replay: tuple[str, Replay], tmp_path: Path) -> None:
    """mlx_lm.server has no /v1/messages (recorded 404), so the gateway translates and the engine is not asked."""
    base_url, state = replay
    s = surfaces("mlx_lm")
    assert s["messages_probe"]["status"] == 404
    adapter = make_adapter("mlx_lm", base_url, tmp_path)
    async with httpx.AsyncClient() as client:
        assert await adapter.discover(client) == {}
    assert adapter.messages_supported is False and state.requests == []


# ---------------------------------------------------------------- log lines


@pytest.mark.parametrize("engine", ["vllm", "sglang", "ollama"])
def test_recorded_log_lines_are_diagnosed(engine: str, tmp_path: Path) -> None:
    """Each failure line in the engine's own log format is named by its signature."""
    adapter = make_adapter(engine, "http://127.0.0.1:1", tmp_path)
    for entry in surfaces(engine)["log_lines"]:
        diagnosis = adapter.diagnose([entry["line"]])
        assert diagnosis is not None and diagnosis.signature == entry["signature"], entry["line"]


@pytest.mark.parametrize(
    ("log", "signature"),
    [("start.txt", None), ("no-weights.txt", "model.safetensors_missing"), ("missing-model.txt", "model.invalid_repo_id")],
)
def test_recorded_mlx_lm_logs_are_diagnosed(log: str, signature: str | None, tmp_path: Path) -> None:
    """mlx_lm.server's real output: a clean start is no failure; missing weights and a missing model are named."""
    lines = (FIXTURES / "mlx_lm" / "logs" / log).read_text().splitlines()
    diagnosis = make_adapter("mlx_lm", "http://127.0.0.1:1", tmp_path).diagnose(lines)
    assert (diagnosis.signature if diagnosis else None) == signature


# ---------------------------------------------------------------- oMLX command line


def test_omlx_is_started_without_flags_that_rewrite_its_settings(tmp_path: Path) -> None:
    """oMLX gets host, port and model folder through OMLX_* variables, never the flags it saves into settings.json."""
    s = surfaces("omlx")
    adapter = make_adapter("omlx", "http://127.0.0.1:8123", tmp_path)
    argv = adapter.argv()
    assert argv[:2] == ["omlx", "serve"]
    assert not set(argv) & set(s["settings_cli_flags_saved"])
    env = adapter.env()
    assert env["OMLX_PORT"] == "8123" and env["OMLX_HOST"] == "127.0.0.1"
    assert env["OMLX_MODEL_DIR"] == str(tmp_path / "models")
    assert adapter.request_model == s["model_folder"]


def test_omlx_symlinked_model_folder_keeps_its_own_name(tmp_path: Path) -> None:
    """A model folder that is a symlink is named as it appears in the model directory, where oMLX lists it."""
    target = tmp_path / "elsewhere" / "Qwen3-4B-4bit-v2"
    target.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "Qwen3-4B-4bit").symlink_to(target)
    adapter = make_adapter("omlx", "http://127.0.0.1:1", tmp_path)
    assert adapter.request_model == "Qwen3-4B-4bit"
    assert adapter.env()["OMLX_MODEL_DIR"] == str(tmp_path / "models")


# ---------------------------------------------------------------- the mlx_lm recording is still the engine's


def _chunk_shapes(sse_body: str) -> set[tuple[str, ...]]:
    shapes = set()
    for line in sse_body.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            choice_keys = tuple(sorted(chunk["choices"][0])) if chunk.get("choices") else ()
            shapes.add((*sorted(chunk), "|", *choice_keys))
    return shapes


async def test_mlx_lm_recording_matches_the_installed_server(mlx_server: Any, tmp_path: Path) -> None:
    """The installed mlx_lm.server still answers as recorded (health, routes it lacks, stream chunk shapes); re-record if not."""
    s = surfaces("mlx_lm")
    chat = s["canary_chat"]
    async with httpx.AsyncClient(base_url=mlx_server.base_url, timeout=60) as client:
        health = await client.get("/health")
        messages = await client.post("/v1/messages", json={})
        metrics = await client.get("/metrics")
        stream = await client.post(chat["path"], json=chat["request"])
    assert (health.status_code, health.text) == (s["health_ready"]["status"], s["health_ready"]["body"])
    assert messages.status_code == s["messages_probe"]["status"]
    assert metrics.status_code == s["metrics"]["status"]
    assert stream.status_code == 200
    assert _chunk_shapes(stream.text) == _chunk_shapes(chat["body"])


# ---------------------------------------------------------------- small pure rules behind the above


@pytest.mark.parametrize(
    ("status", "served"),
    [(404, False), (405, False), (400, True), (422, True), (200, True), (401, None), (403, None), (500, None), (503, None)],
)
def test_route_probe_answers(status: int, served: bool | None) -> None:
    """Only 404/405 say the route is missing and only 400/422/2xx that it exists; a 401 or a 5xx tells nothing."""
    from probes.routes import classify_route_status

    assert classify_route_status(status) is served


@pytest.mark.parametrize("content", ["{not json", '["a list"]', '{"auth": "no table"}', '{"auth": {"api_key": 42}}', ""])
def test_omlx_key_from_a_damaged_settings_file_is_none(content: str, tmp_path: Path) -> None:
    """A settings.json oMLX's key cannot be read from gives no key (and no exception): requests go without one."""
    base = tmp_path / "omlx-base"
    base.mkdir()
    (base / "settings.json").write_text(content)
    assert make_adapter("omlx", "http://127.0.0.1:1", tmp_path).api_key is None


def test_omlx_key_from_env_wins_over_settings(tmp_path: Path) -> None:
    """OMLX_API_KEY in the engine's env is the key oMLX uses (omlx/settings.py), so it wins over settings.json."""
    base = tmp_path / "omlx-base"
    base.mkdir()
    (base / "settings.json").write_text(json.dumps({"auth": {"api_key": "from-settings"}}))
    assert make_adapter("omlx", "http://127.0.0.1:1", tmp_path).api_key == "from-settings"
    env = {"OMLX_BASE_PATH": str(base), "OMLX_API_KEY": "from-env"}
    adapter = make_adapter("omlx", "http://127.0.0.1:1", tmp_path, env=env)
    assert adapter.api_key == "from-env"
    assert adapter.auth_headers() == {"Authorization": "Bearer from-env"}


@pytest.mark.parametrize("args", [("--api-key", "k1"), ("--api-key=k1",), ("--port", "1", "--api-key", "k1", "--api-key", "k2")])
def test_vllm_key_from_its_flag_in_every_spelling(args: tuple[str, ...], tmp_path: Path) -> None:
    """vLLM's --api-key is found as '--api-key K' or '--api-key=K' among the engine's args (the first one when repeated)."""
    assert make_adapter("vllm", "http://127.0.0.1:1", tmp_path, args=args).api_key == "k1"


def test_vllm_key_from_env_when_no_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --api-key vLLM reads VLLM_API_KEY: from the engine's env, else the daemon's (which the engine inherits)."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert make_adapter("vllm", "http://127.0.0.1:1", tmp_path).api_key is None
    monkeypatch.setenv("VLLM_API_KEY", "inherited")
    assert make_adapter("vllm", "http://127.0.0.1:1", tmp_path).api_key == "inherited"
    assert make_adapter("vllm", "http://127.0.0.1:1", tmp_path, env={"VLLM_API_KEY": "own"}).api_key == "own"


def test_omlx_key_follows_a_changed_settings_file(tmp_path: Path) -> None:
    """A key changed in oMLX's settings.json (then oMLX restarted) is the key used next, without restarting the daemon."""
    import os

    base = tmp_path / "omlx-base"
    base.mkdir()
    settings = base / "settings.json"
    settings.write_text(json.dumps({"auth": {"api_key": "first"}}))
    adapter = make_adapter("omlx", "http://127.0.0.1:1", tmp_path)
    assert adapter.api_key == "first"
    settings.write_text(json.dumps({"auth": {"api_key": "second-key"}}))
    os.utime(settings, ns=(1, 1))  # a different mtime even on coarse clocks
    assert adapter.api_key == "second-key"
    settings.unlink()
    assert adapter.api_key is None
