"""The gateway in front of an engine that requires its own API key (vLLM/SGLang --api-key, oMLX auth.api_key).

The engine is the oMLX stand-in as a real process (it checks the key as oMLX does); the gateway
has a key of its own, as a gateway reachable by others should.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from supervisord_llm.gateway.proxy import GatewaySettings, Upstream
from tests.helpers import PYTHON, STANDINS, engine_process, free_port, short_tmpdir
from tests.integration.test_gateway import Backend, running_gateway

pytestmark = pytest.mark.anyio

ENGINE_KEY = "sk-engine-own-key"
GATEWAY_KEY = "sk-gateway-key"


@pytest.fixture(scope="module")
def keyed_engine() -> Iterator[str]:
    """The oMLX stand-in serving one model folder and requiring ENGINE_KEY."""
    root = short_tmpdir("keyed-")
    folder = root / "models" / "Tiny-4bit"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    port = free_port()
    env = {**os.environ, "OMLX_BASE_PATH": str(root / "home"), "OMLX_PORT": str(port),
           "OMLX_MODEL_DIR": str(folder.parent), "OMLX_API_KEY": ENGINE_KEY}
    with engine_process([PYTHON, str(STANDINS / "omlx_engine.py"), "serve"], port, env=env) as base_url:
        yield base_url


def _backend(base_url: str, auth_headers: tuple[tuple[str, str], ...]) -> Backend:
    upstream = Upstream("omlx", base_url, "omlx", supports_messages=True, served_model="Tiny-4bit",
                        auth_headers=auth_headers)
    return Backend({"omlx": upstream}, default="omlx")


def _settings() -> GatewaySettings:
    return replace(GatewaySettings(), api_key=GATEWAY_KEY)


async def test_gateway_reaches_a_keyed_engine_with_the_engines_key(keyed_engine: str) -> None:
    """A client holding only the gateway's key gets answers from an engine that requires its own key."""
    backend = _backend(keyed_engine, (("Authorization", f"Bearer {ENGINE_KEY}"),))
    async with running_gateway(backend, _settings()) as url, httpx.AsyncClient(timeout=30) as client:
        gateway_auth = {"Authorization": f"Bearer {GATEWAY_KEY}"}
        chat = await client.post(url + "/v1/chat/completions", headers=gateway_auth,
                                 json={"model": "omlx", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        message = await client.post(url + "/v1/messages", headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"},
                                    json={"model": "omlx", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    # Not streamed by the client: fetched from the engine as a stream (the watchdog sees its tokens), answered whole.
    assert chat.json()["choices"][0]["message"]["content"] == " one two three", chat.text
    assert message.status_code == 200, message.text
    assert message.json()["content"][0]["text"] == "omlx: one two"


async def test_without_the_engines_key_the_engine_refuses_what_the_gateway_accepted(keyed_engine: str) -> None:
    """Without the engine's key (the old behaviour) the gateway strips the client's credentials and the engine answers 401."""
    backend = _backend(keyed_engine, ())
    async with running_gateway(backend, _settings()) as url, httpx.AsyncClient(timeout=30) as client:
        chat = await client.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                                 json={"model": "omlx", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 401


def test_the_engine_really_requires_its_key(keyed_engine: str) -> None:
    """The stand-in engine refuses requests without its key, as oMLX's verify_api_key does."""
    assert httpx.get(keyed_engine + "/api/status", timeout=5).status_code == 401
    assert httpx.get(keyed_engine + "/api/status", headers={"x-api-key": ENGINE_KEY}, timeout=5).status_code == 200
