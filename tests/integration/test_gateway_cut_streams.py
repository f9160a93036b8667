"""A stream the engine broke off is an error for the client, never a clean end.

mlx_lm.server speaks HTTP/1.0: its streams end with its connection, also when the engine dies in the
middle of an answer (a Metal OOM, a kill). The gateway used to pass that on as a finished answer: on
``/v1/messages`` a ``message_delta`` with ``stop_reason: "end_turn"`` and a ``message_stop`` (a tool
call cut in half handed over as whole), on ``/v1/chat/completions`` a stream that just stopped, and
the request was recorded as complete. Here the real mlx_lm.server is killed after its first tokens,
and the official SDKs see an error.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anthropic
import openai
import pytest

from supervisord_llm.gateway.proxy import Upstream
from tests.helpers import MlxServer
from tests.integration.test_gateway import Backend, opened, running_gateway

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

LONG = 4000  # tokens: the answer is still running when the engine is killed


def _backend(engine: MlxServer) -> Backend:
    return Backend({"tiny": Upstream("tiny", engine.base_url, "mlx_lm", supports_messages=False,
                                     served_model="default_model")}, default="tiny")


def _kill(engine: MlxServer) -> None:
    if engine.proc.poll() is None:
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait(10)


async def test_a_messages_stream_whose_engine_dies_ends_with_an_error_not_end_turn(tiny_model: Path) -> None:
    engine = MlxServer(tiny_model)
    try:
        backend = _backend(engine)
        kinds: list[str] = []
        async with running_gateway(backend) as url:
            client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
            with pytest.raises(anthropic.APIStatusError) as info:
                async with client.messages.stream(model="tiny", max_tokens=LONG,
                                                  messages=[{"role": "user", "content": "hi"}]) as stream:
                    async for event in stream:
                        kinds.append(event.type)
                        if kinds.count("content_block_delta") == 3:
                            _kill(engine)
        print(kinds[-4:], info.value)
        assert "broke off the stream" in str(info.value) and "no [DONE], no finish_reason" in str(info.value)
        assert "message_stop" not in kinds and "message_delta" not in kinds, kinds
        assert [s.ended for s in backend.finished] == ["upstream_error"]
    finally:
        engine.close()


async def test_a_whole_message_whose_engine_dies_midway_is_an_error_not_a_cut_message(tiny_model: Path) -> None:
    """Not streamed: the translation reads the engine's stream whole; it used to answer 200 with the text so far."""
    engine = MlxServer(tiny_model)
    try:
        backend = _backend(engine)
        async with running_gateway(backend) as url:
            client = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
            import anyio

            async def kill_soon() -> None:
                await anyio.sleep(1.5)
                await anyio.to_thread.run_sync(_kill, engine)

            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_soon)
                with pytest.raises(anthropic.APIStatusError) as info:
                    await client.messages.create(model="tiny", max_tokens=LONG,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 502 and "broke off the stream" in str(info.value), info.value
    finally:
        engine.close()


async def test_a_chat_stream_whose_engine_dies_ends_with_an_error_event(tiny_model: Path) -> None:
    engine = MlxServer(tiny_model)
    try:
        backend = _backend(engine)
        chunks = 0
        async with running_gateway(backend) as url:
            client = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
            stream = await client.chat.completions.create(model="tiny", max_tokens=LONG, stream=True,
                                                          messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.APIError) as info:
                async for _chunk in stream:
                    chunks += 1
                    if chunks == 3:
                        _kill(engine)
        assert "broke off the stream" in str(info.value), info.value
        assert [s.ended for s in backend.finished] == ["upstream_error"]
    finally:
        engine.close()


async def test_a_finished_stream_still_ends_cleanly(tiny_model: Path) -> None:
    """The check reads the engine's own end ([DONE], finish_reason), so a whole answer is not taken for a cut one."""
    engine = MlxServer(tiny_model)
    try:
        backend = _backend(engine)
        async with running_gateway(backend) as url:
            chat = opened(openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0))
            stream = await chat.chat.completions.create(model="tiny", max_tokens=5, stream=True,
                                                        messages=[{"role": "user", "content": "hi"}])
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
            messages = opened(anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0))
            async with messages.messages.stream(model="tiny", max_tokens=5,
                                                messages=[{"role": "user", "content": "hi"}]) as s:
                final = await s.get_final_message()
        assert reasons[-1] == "length" and final.stop_reason == "max_tokens"
        assert [s.ended for s in backend.finished] == ["complete", "complete"]
    finally:
        engine.close()
