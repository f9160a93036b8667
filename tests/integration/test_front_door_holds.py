"""The front door holds: slow headers are cut, held streaming clients hear keep-alives, requests the
engine never answered are resent to the restarted engine (and answered ones never are), 100 clients
ride through a manual restart, and a flood of 2,000 connections is refused while the daemon serves."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import resource
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import PYTHON, free_port, mlx_engine_toml, standin_engine_toml

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


def _engine_log(d, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((d.state_dir / "logs").glob(f"{name}.log*")))


def _received(log: str, marker: str) -> int:
    """How often the engine itself received a request carrying ``marker``: mlx_lm.server at
    ``--log-level DEBUG`` logs every request body it reads ("Incoming Request Body", mlx_lm/server.py
    0.32 ``APIHandler.do_POST``), one JSON field per line (a translated Messages request's text is in
    ``content`` or a ``text`` part)."""
    return len(re.findall(rf'"(?:content|text)": "{re.escape(marker)}"', log))


def _runs(log: str) -> list[str]:
    """The engine log cut into its runs (each run of mlx_lm.server logs "Starting httpd" first)."""
    return log.split("Starting httpd")[1:]


def _sse_stream(url: str, body: dict, headers: dict | None = None, timeout_s: float = 120) -> tuple[int, list[tuple[float, str]]]:
    """A streaming request; the status and every line with the time it arrived."""
    lines: list[tuple[float, str]] = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout_s) as r:
        for line in r.iter_lines():
            lines.append((time.monotonic(), line))
    return r.status_code, lines


# ---------------------------------------------------------------------------------------------
# Slow headers


def test_slow_headers_get_a_408_in_the_api_shape_and_an_idle_connection_is_closed(daemon_factory) -> None:
    """A client trickling its headers gets 408 after header_timeout_s; one sending nothing is closed; others are served.
    A kept-alive connection that goes idle after its answer is closed too, but refused nothing: it is not counted."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nheader_timeout_s = "2s"\n').start()
    d.wait_state("e", "ready", 30)
    trickle = socket.create_connection(("127.0.0.1", gw))
    messages = socket.create_connection(("127.0.0.1", gw))
    idle = socket.create_connection(("127.0.0.1", gw))
    kept = http.client.HTTPConnection("127.0.0.1", gw, timeout=20)  # answered once, then idle: kept alive
    kept.request("POST", "/v1/chat/completions", json.dumps({"model": "e", "max_tokens": 2, **CHAT}),
                 {"content-type": "application/json"})
    kept_answer = kept.getresponse()
    assert kept_answer.status == 200 and kept_answer.read()
    try:
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        messages.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
        for _ in range(3):  # a header line now and then never completes the headers
            time.sleep(0.5)
            trickle.sendall(b"x-slow: 1\r\n")
        # Served meanwhile: the slow ones hold nothing others need.
        ok = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json={"model": "e", "max_tokens": 2, **CHAT},
                        timeout=30)
        assert ok.status_code == 200
        answers = []
        for sock in (trickle, messages, idle):
            sock.settimeout(20)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            answers.append(data)
    finally:
        for sock in (trickle, messages, idle):
            sock.close()
    head, _, body = answers[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_timeout" and "header_timeout_s" in json.loads(body)["error"]["message"]
    head, _, body = answers[1].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["type"] == "error"  # Anthropic's shape
    assert answers[2] == b""  # nothing was asked: closed without an answer
    assert kept.sock is not None and kept.sock.recv(1) == b""  # closed once idle for header_timeout_s
    kept.close()
    assert d.gateway_counters(lambda g: g["refused"].get("header_timeout") == 3)["refused"]["header_timeout"] == 3


# ---------------------------------------------------------------------------------------------
# Held streaming requests


def _slow_start_toml(name: str, port: int, model: Path, sleep_s: int, **keys: object) -> str:
    """A real mlx_lm.server behind a wrapper that sleeps before exec'ing it: a slow model load."""
    return mlx_engine_toml(name, port, model, command=["sh", "-c", f'sleep {sleep_s}; exec "$@"', "slow-start",
                                                       PYTHON, "-m", "mlx_lm.server"], **keys)


@pytest.mark.long_wait
@pytest.mark.slow
def test_streaming_clients_held_through_a_slow_start_hear_keepalives_then_their_answer(daemon_factory,
                                                                                         tiny_model: Path) -> None:
    """Held through a 20 s start: streams get 200 at once, ': loading' comments, then tokens; non-streaming keeps JSON."""
    gw = free_port()
    d = daemon_factory(_slow_start_toml("tiny", free_port(), tiny_model, 20, default=True, start_timeout="90s")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "120s"\nhold_keepalive_s = "2s"\n').start()
    assert d.engine("tiny")["state"] == "starting"
    results: dict[str, object] = {}

    def openai() -> None:
        results["openai"] = _sse_stream(f"http://127.0.0.1:{gw}/v1/chat/completions",
                                        {"model": "tiny", "stream": True, "max_tokens": 5, **CHAT})

    def anthropic() -> None:
        results["anthropic"] = _sse_stream(f"http://127.0.0.1:{gw}/v1/messages",
                                           {"model": "tiny", "stream": True, "max_tokens": 5, **CHAT},
                                           ANTHROPIC_HEADERS)

    def plain() -> None:
        r = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json={"model": "tiny", "max_tokens": 5, **CHAT},
                       timeout=120)
        results["plain"] = (r.status_code, r.headers["content-type"], r.json())

    threads = [threading.Thread(target=f) for f in (openai, anthropic, plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ready_at = next(e for e in d.events() if e["kind"] == "engine.state_changed" and e.get("to") == "ready")
    assert ready_at["startup_s"] >= 20
    for key, done_marker in (("openai", "data: [DONE]"), ("anthropic", "event: message_stop")):
        status, lines = results[key]  # type: ignore[misc]
        assert status == 200, (key, lines)
        texts = [line for _, line in lines]
        comments = [t for t in texts if t.startswith(": loading tiny")]
        assert len(comments) >= 5, (key, texts[:10])  # about one every 2 s through the 20 s start
        assert re.fullmatch(r": loading tiny \d+s \(starting\)", comments[0]), comments[0]
        first_data = next(i for i, t in enumerate(texts) if t.startswith("data:"))
        assert all(not t.startswith(":") or "keepalive" in t for t in texts[first_data:]), texts  # ours stop first
        assert done_marker in texts and "event: error" not in texts and not any(t.startswith('data: {"error"') for t in texts)
    status, content_type, doc = results["plain"]  # type: ignore[misc]
    assert status == 200 and content_type.startswith("application/json") and doc["choices"][0]["message"]["content"]


def test_a_held_stream_whose_engine_fails_to_start_ends_with_an_error_event(daemon_factory) -> None:
    """The hold fails (the engine exits during start): held streams get one SSE error event in their API's shape."""
    gw = free_port()
    d = daemon_factory('[[engine]]\nname = "e"\nkind = "command"\nport = ' + str(free_port())
                       + '\ncommand = ["sh", "-c", "sleep 6; exit 3"]\nfootprint = "100MB"\nstart_timeout = "30s"\n'
                       + 'default = true\n'
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "60s"\nhold_keepalive_s = "1s"\n').start()
    # The gateway's process starts beside the engine: the requests go out once it answers, while the
    # engine is still starting.
    assert httpx.get(f"http://127.0.0.1:{gw}/v1/models", timeout=30).status_code == 200
    assert d.engine("e")["state"] == "starting"
    results: dict[str, tuple[int, list[tuple[float, str]]]] = {}

    def call(key: str, path: str, headers: dict | None) -> None:
        results[key] = _sse_stream(f"http://127.0.0.1:{gw}{path}", {"model": "e", "stream": True, "max_tokens": 5,
                                                                      **CHAT}, headers, timeout_s=60)

    threads = [threading.Thread(target=call, args=("openai", "/v1/chat/completions", None)),
               threading.Thread(target=call, args=("anthropic", "/v1/messages", ANTHROPIC_HEADERS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status, lines = results["openai"]
    texts = [t for _, t in lines if t]
    assert status == 200 and texts[0].startswith(": loading e")
    error = json.loads(texts[-1].removeprefix("data: "))
    assert error["error"]["reason"] == "backoff" and error["error"]["code"] == "engine_unavailable"
    status, lines = results["anthropic"]
    texts = [t for _, t in lines if t]
    assert status == 200 and texts[-2] == "event: error"
    error = json.loads(texts[-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
    assert d.engine("e")["state"] == "backoff"


# ---------------------------------------------------------------------------------------------
# Retry before the first byte


@pytest.mark.slow
def test_a_request_the_engine_never_answered_is_resent_to_the_restarted_engine_and_an_answered_one_never(
        daemon_factory, tiny_model: Path) -> None:
    """Restart under two long generations: the unanswered non-streamed one is resent and answered; the stream is not."""
    gw = free_port()
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model, default=True, args=["--log-level", "DEBUG"])
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "120s"\n'
                       + '[policies.memory]\nswap_drain = "1s"\n').start()
    first = d.wait_state("tiny", "ready", 90)
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    results: dict[str, object] = {}

    def plain() -> None:
        r = httpx.post(url, timeout=180, json={"model": "tiny", "max_tokens": 4000,
                                               "messages": [{"role": "user", "content": "plain-1"}]})
        results["plain"] = (r.status_code, r.json())

    def stream() -> None:
        results["stream"] = _sse_stream(url, {"model": "tiny", "stream": True, "max_tokens": 4000,
                                              "messages": [{"role": "user", "content": "stream-1"}]}, timeout_s=180)

    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (_received(_engine_log(d, "tiny"), "plain-1")
                                               and _received(_engine_log(d, "tiny"), "stream-1")):
        time.sleep(0.2)
    assert d.llmctl("restart", "tiny", "--force").returncode == 0  # the 60 s spacing is a person's to override
    for t in threads:
        t.join()
    assert d.engine("tiny")["pid"] != first["pid"]
    status, doc = results["plain"]  # type: ignore[misc]
    assert status == 200 and doc["usage"]["completion_tokens"] > 0
    status, lines = results["stream"]  # type: ignore[misc]
    texts = [t for _, t in lines if t.startswith("data:")]
    # Its head and tokens had reached the client: it was cut with the old engine, never resent.
    # (mlx_lm.server ends a stream by closing the connection, so the cut looks like an end without [DONE].)
    assert status == 200 and len(texts) > 1 and "data: [DONE]" not in texts
    old, new = _runs(_engine_log(d, "tiny"))[-2:]
    assert _received(old, "plain-1") == 1 and _received(new, "plain-1") == 1
    assert _received(old, "stream-1") == 1 and _received(new, "stream-1") == 0
    drained = [e for e in d.events() if e["kind"] == "engine.drained"]
    assert drained and drained[-1]["in_flight"] == 2  # both still ran after the 1 s drain


def _restarted_in_prefill(daemon_factory, call: Callable[[int], object]) -> tuple[object, int, int]:
    """The stand-in sending a stream's head only with its first token (llama-server's way), behind the gateway
    (keep-alive comments every second); ``call(gateway_port)`` runs in a thread and is restarted under (1 s
    drain, 6 s load) once its request reached the engine, in its 3 s prefill: (what call gave, first pid, last)."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--head-with-first-token", "--first-token-delay-s", "3",
                                           "--load-s", "6", default=True, canary_interval="10m", start_timeout="60s")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "60s"\nhold_keepalive_s = "1s"\n'
                       + '[policies.memory]\nswap_drain = "1s"\n').start()
    first = d.wait_state("e", "ready", 60)["pid"]
    log = d.state_dir / "logs" / "e.log"
    mark = "max_tokens=5 stream=True"  # the test's request (the gateway streams from the engine either way)
    before = log.read_text(errors="replace").count(mark)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call(gw)))
    thread.start()
    deadline = time.monotonic() + 20
    while log.read_text(errors="replace").count(mark) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text(errors="replace").count(mark) == before + 1, "the request never reached the engine"
    assert d.llmctl("restart", "e", "--force").returncode == 0  # in the request's 3 s prefill, before any head
    thread.join(90)
    # Sent once more, to the restarted engine (its log goes on in the same file), and only once.
    assert log.read_text(errors="replace").count(mark) == before + 2, result
    return result[0], first, d.engine("e")["pid"]


@pytest.mark.long_wait
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_stream_resent_after_a_restart_in_its_prefill_hears_keepalives_while_it_waits(daemon_factory,
                                                                                        api: str) -> None:
    """llama-server sends a stream's head only with its first token: a restart during the prefill leaves the stream
    with nothing from the engine. It is held and sent again to the restarted engine (6 s of loading here), and
    meanwhile the client has its 200 head and ': loading e' comments, as a stream held for a start does; then
    the new engine's answer. (Before, it heard nothing until the new engine's first token: a 15-minute load
    outlasts every SDK's read timeout.)"""
    path, headers, done = (("/v1/chat/completions", None, "data: [DONE]") if api == "openai"
                           else ("/v1/messages", ANTHROPIC_HEADERS, "event: message_stop"))
    result, first, last = _restarted_in_prefill(daemon_factory, lambda gw: _sse_stream(
        f"http://127.0.0.1:{gw}{path}", {"model": "e", "stream": True, "max_tokens": 5, **CHAT}, headers, 90))
    status, lines = result  # type: ignore[misc]
    texts = [t for _, t in lines]
    assert status == 200 and last != first, texts
    assert done in texts and "event: error" not in texts and not any(t.startswith('data: {"error"') for t in texts)
    first_data = next(i for i, (_, t) in enumerate(lines) if t.startswith(("data:", "event:")))
    comments = [(at, t) for at, t in lines[:first_data] if t.startswith(": loading e")]
    # One a second through the drain (1 s), the stop and the 6 s load.
    assert len(comments) >= 4, texts
    assert re.fullmatch(r": loading e \d+s \(\w+\)", comments[0][1]), comments[0]
    # Through the wait, not only at its end: the first comment seconds before the new engine's first byte.
    assert lines[first_data][0] - comments[0][0] >= 3, texts


@pytest.mark.long_wait
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_whole_answer_resent_after_a_restart_in_its_prefill_stays_plain_json(daemon_factory, api: str) -> None:
    """The same restart under a request that asked for a whole answer (fetched from the engine as a stream and
    rebuilt, or translated to the Messages API): it is held and resent too, and its client gets one plain JSON
    answer, never the SSE head and comments a held stream gets."""
    path, headers = (("/v1/chat/completions", None) if api == "openai" else ("/v1/messages", ANTHROPIC_HEADERS))
    result, first, last = _restarted_in_prefill(daemon_factory, lambda gw: httpx.post(
        f"http://127.0.0.1:{gw}{path}", json={"model": "e", "max_tokens": 5, **CHAT}, headers=headers, timeout=90))
    assert isinstance(result, httpx.Response) and last != first
    assert result.status_code == 200 and result.headers["content-type"].startswith("application/json"), result.text
    doc = result.json()
    assert (doc["choices"][0]["message"]["content"] if api == "openai" else doc["content"][0]["text"]), doc


def test_a_request_a_live_engine_dropped_without_an_answer_is_not_sent_again(daemon_factory) -> None:
    """The engine's request handler fails on this request and closes the connection without an answer (the
    stand-in's, on a max_tokens it cannot read) while the engine runs on: the request reached it once and is not
    replayed into it (each replay of a long prompt costs its whole prefill again); the client gets a 502 saying
    the engine closed the connection, and the engine serves the next request as before."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), default=True, canary_interval="10m")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "60s"\n').start()
    pid = d.wait_state("e", "ready", 30)["pid"]
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"

    def received() -> int:  # generation requests the engine read (its start check's among them)
        return sum(1 for line in _engine_log(d, "e").splitlines() if line.startswith("request "))

    before = received()
    started = time.monotonic()
    dropped = httpx.post(url, timeout=60, json={"model": "e", "max_tokens": "x", **CHAT})
    assert dropped.status_code == 502 and dropped.json()["error"]["code"] == "upstream_closed", dropped.text
    assert time.monotonic() - started < 10
    assert received() - before == 1
    served = httpx.post(url, timeout=60, json={"model": "e", "max_tokens": 4, **CHAT})
    assert served.status_code == 200 and d.engine("e")["pid"] == pid


def test_a_request_whose_engine_died_into_backoff_gets_the_usual_503_with_retry_after(daemon_factory) -> None:
    """The engine is SIGKILLed while it holds a request (no response head yet): it goes to backoff (its 60 s
    spawn floor), so the held resend cannot be served; the client gets the 503 a new request would, with
    Retry-After and the reason, not a 502 with the connector's words."""
    import os
    import signal

    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "5", default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "60s"\n').start()
    pid = d.wait_state("e", "ready", 30)["pid"]
    results: list[httpx.Response] = []

    def call() -> None:
        # Not streamed, 100 tokens at 5 tok/s: the engine holds the head for 20 s.
        results.append(httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=90,
                                  json={"model": "e", "max_tokens": 100, **CHAT}))

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    t.join(90)
    (r,) = results
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert "aiohttp" not in r.text and "ClientConnectorError" not in r.text and "ssl:default" not in r.text
    assert r.json()["error"]["code"] == "engine_unavailable" and r.json()["error"]["reason"] == "backoff"
    assert d.engine("e")["state"] == "backoff"
    assert d.gateway_counters(lambda g: g["refused"].get("backoff", 0) >= 1)["refused"].get("backoff") == 1


def test_with_no_hold_time_a_request_for_an_engine_in_backoff_is_told_why_and_until_when(daemon_factory) -> None:
    """``hold_s = 0``: nothing is held, but a request for an engine in its restart backoff still gets the daemon's
    answer (reason backoff, Retry-After the seconds to its next start, and until when), not a "hold time of 0s"
    with Retry-After 1 that sends its client back 59 times."""
    import os
    import signal

    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "0s"\n').start()
    pid = d.wait_state("e", "ready", 30)["pid"]
    os.kill(pid, signal.SIGKILL)
    d.wait_state("e", "backoff", 30)  # its 60 s spawn floor
    for path, anthropic in (("/v1/chat/completions", False), ("/v1/messages", True)):
        r = httpx.post(f"http://127.0.0.1:{gw}{path}", timeout=30, json={"model": "e", "max_tokens": 3, **CHAT},
                       headers=ANTHROPIC_HEADERS if anthropic else None)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert (r.json().get("type") == "error") is anthropic, r.text
        if not anthropic:
            assert error["reason"] == "backoff" and error["until"], error
        assert "backoff" in error["message"] and 10 <= int(r.headers["retry-after"]) <= 60, (r.headers, error)


@pytest.mark.long_wait
def test_after_a_clean_daemon_restart_inside_the_spawn_floor_requests_are_held_for_the_start(daemon_factory) -> None:
    """The daemon stops its engine on SIGTERM and is started again at once: the engine waits out its 60 s floor
    between spawns. No failure is behind that wait, so status says it is the floor, and a request is held for
    the start and served, not refused with a 503 as one for a crashed engine is. (With an old crash whose
    backoff has passed, the same: tests/unit/test_supervisor_transitions.py.)"""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "90s"\n').start()
    d.wait_state("e", "ready", 30)
    d.stop()
    d.start()
    engine = d.wait_state("e", "backoff", 30)
    assert "floor between spawns" in engine["state_reason"], engine
    started = time.monotonic()
    r = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=120,
                   json={"model": "e", "max_tokens": 3, **CHAT})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started > 5  # held for the start, not served by a running engine
    assert d.engine("e")["state"] == "ready"


@pytest.mark.long_wait
def test_status_says_an_on_demand_start_waits_for_the_spawn_floor(daemon_factory) -> None:
    """Unloaded when idle 10 s after it started, then asked for: the start waits for the 60 s floor between
    spawns while the request is held. `llmctl status` says that, not the last run's start check
    ("/health: ConnectError"); the request is then served."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), default=True, idle_unload="10s")
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "90s"\n').start()
    d.wait_state("e", "ready", 30)
    d.wait_state("e", "stopped", 60)
    results: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: results.append(httpx.post(
        f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=120, json={"model": "e", "max_tokens": 3, **CHAT})))
    thread.start()
    engine = d.wait_state("e", "starting", 30)
    deadline = time.monotonic() + 10
    while "floor" not in (engine.get("start_check") or "") and time.monotonic() < deadline:
        time.sleep(0.2)
        engine = d.engine("e")
    assert engine["pid"] is None and "floor between spawns" in (engine["start_check"] or ""), engine
    shown = d.llmctl("status")
    assert "floor between spawns" in shown.stdout and "ConnectError" not in shown.stdout, shown.stdout
    thread.join(120)
    assert results and results[0].status_code == 200, results


# ---------------------------------------------------------------------------------------------
# 100 clients through a manual restart


async def _client(base: str, n: int, stop: asyncio.Event, answers: list[dict]) -> None:
    """Requests one after another until told to stop (and one more): streamed and not, OpenAI and Anthropic.
    The clients begin 20 ms apart: 64 connects at once to mlx_lm.server (a listen backlog of 5) on a loaded
    machine had one of them reset by the engine's TCP stack before the restart this test is about."""
    await asyncio.sleep(n * 0.02)
    async with httpx.AsyncClient(base_url=base, timeout=180) as http:
        i = 0
        while True:
            last = stop.is_set()
            marker = f"m-{n}-{i}"
            kind = ("openai-stream", "openai", "anthropic-stream", "anthropic")[(n + i) % 4]
            path = "/v1/messages" if kind.startswith("anthropic") else "/v1/chat/completions"
            body = {"model": "tiny", "max_tokens": 6, "stream": kind.endswith("stream"),
                    "messages": [{"role": "user", "content": marker}]}
            headers = ANTHROPIC_HEADERS if kind.startswith("anthropic") else {}
            try:
                async with http.stream("POST", path, json=body, headers=headers) as r:
                    text = (await r.aread()).decode()
                answer = {"marker": marker, "kind": kind, "status": r.status_code, "text": text}
            except httpx.HTTPError as exc:
                answer = {"marker": marker, "kind": kind, "status": -1, "text": repr(exc)}
            answers.append(answer)
            i += 1
            if last:
                return


def _complete(answer: dict) -> bool:
    text, kind = answer["text"], answer["kind"]
    if answer["status"] != 200 or '"error"' in text:
        return False
    if kind == "openai-stream":
        return text.rstrip().endswith("data: [DONE]")
    if kind == "anthropic-stream":
        return "event: message_stop" in text
    doc = json.loads(text)
    return bool(doc["choices"][0]["message"]["content"]) if kind == "openai" else doc["stop_reason"] is not None


@pytest.mark.slow
def test_100_clients_through_a_manual_restart_are_all_answered_once_without_an_error(daemon_factory,
                                                                                      tiny_model: Path) -> None:
    """llmctl restart under 100 busy clients: in-flight requests finish, new ones wait, none fails, none runs twice."""
    gw = free_port()
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model, default=True, args=["--log-level", "DEBUG"])
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "120s"\n').start()
    first = d.wait_state("tiny", "ready", 90)
    answers: list[dict] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        clients = [asyncio.create_task(_client(f"http://127.0.0.1:{gw}", n, stop, answers)) for n in range(100)]
        while len({a["marker"].split("-")[1] for a in answers}) < 100:  # every client has been answered once
            await asyncio.sleep(0.1)
        restart = await asyncio.to_thread(d.llmctl, "restart", "tiny", "--force")
        assert restart.returncode == 0, restart.stderr
        await asyncio.to_thread(d.wait_state, "tiny", "ready", 90)
        stop.set()
        await asyncio.gather(*clients)

    asyncio.run(scenario())
    assert d.engine("tiny")["pid"] != first["pid"]
    failed = [a for a in answers if not _complete(a)]
    assert not failed, failed[:3]
    log = _engine_log(d, "tiny")
    twice = [a["marker"] for a in answers if _received(log, a["marker"]) != 1]
    assert not twice, twice[:5]  # the engine itself received every request exactly once
    old, new = _runs(log)[-2:]
    served_after = [a for a in answers if _received(new, a["marker"])]
    assert len(served_after) >= 100 and len(answers) - len(served_after) >= 100  # both runs served real traffic
    assert any(e["kind"] == "engine.draining" for e in d.events())


# ---------------------------------------------------------------------------------------------
# A flood of connections


async def _flood(port: int, connections: int, request: bytes) -> list[bytes]:
    """``connections`` sockets at once: half send a whole request, half send nothing; what each got back."""

    async def one(i: int) -> bytes:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            return f"connect failed: {exc}".encode()
        try:
            if i % 2 == 0:
                writer.write(request)
                await writer.drain()
            return await asyncio.wait_for(reader.read(), 60)
        except (OSError, TimeoutError) as exc:
            return f"failed: {exc!r}".encode()
        finally:
            writer.close()

    return await asyncio.gather(*(one(i) for i in range(connections)))


@pytest.mark.slow
def test_a_gateway_started_with_launchds_256_open_files_still_serves_160_streams_at_once(daemon_factory) -> None:
    """launchd starts a service with a soft limit of 256 open files, and each proxied stream holds two (the
    client's connection and the engine's): from about 120 streams at once the gateway could accept no connection
    (clients wait, unanswered and uncounted, for another stream to end). It raises its own soft limit to what
    max_connections needs, within the hard limit: 160 streams are in the gateway at once, held by the engine's
    prefill, and all answered."""
    gw = free_port()
    # max_concurrent = 0: every stream goes on to the engine at once (none waits in the gateway's line).
    d = daemon_factory(standin_engine_toml("e", free_port(), "--first-token-delay-s", "20", default=True,
                                           canary_interval="10m", start_timeout="90s", max_concurrent=0)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n', open_files=256).start()
    d.wait_state("e", "ready", 90)
    gateway_pid = d.status()["gateway"]["pid"]
    limits = Path(f"/proc/{gateway_pid}/limits")
    if limits.exists():  # Linux: the gateway's own soft limit, raised from the 256 it started with
        line = next(x for x in limits.read_text().splitlines() if x.startswith("Max open files"))
        assert int(line.split()[3]) >= 2 * 512 + 256, line
    answers: list[tuple[int, list[tuple[float, str]]] | BaseException] = []

    def stream() -> None:
        try:
            answers.append(_sse_stream(f"http://127.0.0.1:{gw}/v1/chat/completions",
                                       {"model": "e", "stream": True, "max_tokens": 3, **CHAT}, timeout_s=60))
        except BaseException as exc:  # noqa: BLE001 - counted below
            answers.append(exc)

    clients = [threading.Thread(target=stream) for _ in range(160)]
    for t in clients:
        t.start()
        time.sleep(0.005)
    # All of them in the gateway at once, in the engine's 20 s prefill (at 256 files, about 120 were, and the
    # others waited for a stream to end before the gateway could accept their connection).
    assert d.gateway_counters(lambda g: g["in_flight"] >= 160, timeout_s=16)["in_flight"] == 160
    for t in clients:
        t.join(90)
    failed = [a for a in answers if isinstance(a, BaseException) or a[0] != 200
              or "data: [DONE]" not in [line for _, line in a[1]]]
    assert len(answers) == 160 and not failed, failed[:3]


@pytest.mark.slow
def test_a_flood_of_2000_connections_is_refused_while_a_stream_and_the_control_api_keep_going(daemon_factory) -> None:
    """2,000 connections at once: beyond max_connections a JSON 503, idle ones cut; a live stream and llmctl carry on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))  # the daemon inherits it too
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "20", default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nmax_connections = 64\nheader_timeout_s = "3s"\n').start()
    d.wait_state("e", "ready", 30)
    live: dict[str, object] = {}

    def stream() -> None:
        live["result"] = _sse_stream(f"http://127.0.0.1:{gw}/v1/chat/completions",
                                     {"model": "e", "stream": True, "max_tokens": 120, **CHAT})

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.5)
    body = json.dumps({"model": "e", "max_tokens": 20, **CHAT}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    flood: dict[str, list[bytes]] = {}
    flooder = threading.Thread(target=lambda: flood.update(answers=asyncio.run(_flood(gw, 2000, request))))
    flooder.start()
    time.sleep(1.0)
    status = d.llmctl("status", "--json", timeout=60)  # the control API answers in the middle of the flood
    assert status.returncode == 0 and json.loads(status.stdout)["engines"][0]["state"] == "ready"
    flooder.join()
    streamer.join()
    answers = flood["answers"]
    asked, idle = answers[0::2], answers[1::2]
    served = [a for a in asked if a.startswith(b"HTTP/1.1 200")]
    refused = [a for a in asked if a.startswith(b"HTTP/1.1 503")]
    closed = [a for a in asked if not a]
    assert len(served) + len(refused) + len(closed) == len(asked), {a[:60] for a in asked} - {b""}
    assert served and refused  # up to max_connections run; the rest get the JSON 503 at once
    assert all(json.loads(a.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded" for a in refused)
    assert all(a == b"" or a.startswith(b"HTTP/1.1 503") for a in idle)  # idle ones: cut (or refused)
    status_code, lines = live["result"]  # type: ignore[misc]
    texts = [t for _, t in lines if t]
    assert status_code == 200 and texts[-1] == "data: [DONE]", texts[-3:]
    after = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json={"model": "e", "max_tokens": 2, **CHAT},
                       timeout=30)
    assert after.status_code == 200
    assert d.gateway_counters(lambda g: g["refused"].get("header_timeout", 0) > 0)["refused"]["header_timeout"] > 0


@pytest.mark.parametrize("key", ["header_timeout_s", "hold_keepalive_s"])
@pytest.mark.parametrize("value", ["0s", "soon", -1])
def test_bad_header_timeout_and_keepalive_values_name_the_file_and_key(key: str, value: object) -> None:
    """header_timeout_s / hold_keepalive_s that are not a positive duration are a config error naming the key."""
    from supervisord_llm.errors import ConfigError
    from supervisord_llm.gateway.proxy import GatewaySettings

    with pytest.raises(ConfigError) as caught:
        GatewaySettings.from_toml({key: value}, file="/etc/x.toml")
    message = str(caught.value)
    assert "/etc/x.toml" in message and f"gateway.{key}" in message


# ---------------------------------------------------------------------------------------------
# Turns: requests grouped by engine during swaps


def test_mixed_requests_for_two_exclusive_engines_are_served_grouped_with_one_swap_each(daemon_factory) -> None:
    """b, a, b, a, b, a arriving while b loads: all of b's, then all of a's, two swaps, none refused."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("a", free_port(), "--load-s", "2", exclusive=True, autostart=False)
                       + standin_engine_toml("b", free_port(), "--load-s", "2", exclusive=True, autostart=False)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "90s"\n').start()
    finished: list[tuple[str, int]] = []
    lock = threading.Lock()

    def call(engine: str) -> None:
        r = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json={"model": engine, "max_tokens": 3, **CHAT},
                       timeout=120)
        with lock:
            finished.append((engine, r.status_code))

    threads = []
    for engine in "bababa":
        threads.append(threading.Thread(target=call, args=(engine,)))
        threads[-1].start()
        time.sleep(0.15)
    for t in threads:
        t.join()
    assert [code for _, code in finished] == [200] * 6, finished
    assert [engine for engine, _ in finished] == list("bbbaaa")  # grouped, b's group first (its request came first)
    swaps = [e["target"] for e in d.events() if e["kind"] == "swap.started"]
    assert swaps == ["b", "a"]
    turns = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "serving_order"]
    assert [t["engine"] for t in turns][:2] == ["b", "a"] and turns[0]["groups"]


def test_requests_in_an_exclusive_engines_line_are_answered_before_a_swap_stops_it(daemon_factory) -> None:
    """80 requests for a one-slot engine wait in its line; then one for another exclusive engine: the swap
    waits for a's whole line (it was there first), then b loads. Without counting the line, the swap's
    drain saw a moment with no request in flight (one had just handed its slot to the next) and
    stopped a under its line: those requests waited for a swap back behind the 60 s spawn floor (with
    real models, two more loads of minutes each)."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("a", free_port(), "--tps", "100", exclusive=True, max_concurrent=1,
                                           default=True)
                       + standin_engine_toml("b", free_port(), "--load-s", "1", exclusive=True, autostart=False)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "90s"\n'
                       + '[policies.memory]\nswap_drain = "60s"\n').start()
    d.wait_state("a", "ready", 30)
    finished: list[tuple[str, int]] = []
    lock = threading.Lock()

    def call(engine: str) -> None:
        r = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json={"model": engine, "max_tokens": 5, **CHAT},
                       timeout=120)
        with lock:
            finished.append((engine, r.status_code))

    threads = [threading.Thread(target=call, args=("a",)) for _ in range(80)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every request for a is in its line (each takes about 0.05 s): b's comes after them all
    threads.append(threading.Thread(target=call, args=("b",)))
    threads[-1].start()
    for t in threads:
        t.join()
    assert [engine for engine, _ in finished] == ["a"] * 80 + ["b"], finished
    assert [code for _, code in finished] == [200] * 81, finished
    assert [e["target"] for e in d.events() if e["kind"] == "swap.started"] == ["b"]  # no swap back to a


@pytest.mark.slow
def test_a_restart_just_after_a_stream_started_drains_it_instead_of_cutting_it(daemon_factory) -> None:
    """The gateway tells the daemon of a request's start without waiting (and may route it without
    asking): a restart asked for the instant the response head arrived still counts that stream as
    in flight, drains it, and the client gets its whole answer."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "50", default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n[policies.memory]\nswap_drain = "60s"\n').start()
    first = d.wait_state("e", "ready", 30)
    tokens = 0
    done = False
    with d.client() as control, httpx.stream("POST", f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=60,
                                             json={"model": "e", "stream": True, "max_tokens": 60, **CHAT}) as response:
        # At once, on the response head: the stream is a few milliseconds old.
        restart = control.post("/v1/engines/e/restart", json={"force": True})
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {") and '"content"' in line:
                tokens += 1
    assert restart.status_code == 200, restart.text
    assert done and tokens >= 60, f"the stream was cut after {tokens} tokens"
    assert d.wait_state("e", "ready", 60)["pid"] != first["pid"]
    draining = [e for e in d.events() if e["kind"] == "engine.draining"]
    assert draining and draining[-1]["in_flight"] == 1


@pytest.mark.long_wait
def test_llmctl_restart_of_a_hung_engine_does_not_wait_for_its_requests(daemon_factory) -> None:
    """A SIGSTOPped (hung) engine with a stream in flight: llmctl restart stops it at once, no drain."""
    import os
    import signal

    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "5", default=True)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n[policies.memory]\nswap_drain = "5m"\n').start()
    first = d.wait_state("e", "ready", 30)
    streamer = threading.Thread(target=lambda: _sse_stream(f"http://127.0.0.1:{gw}/v1/chat/completions", {
        "model": "e", "stream": True, "max_tokens": 500, **CHAT}, timeout_s=120))
    streamer.start()
    time.sleep(1.0)
    os.kill(first["pid"], signal.SIGSTOP)
    try:
        d.wait_state("e", "hung", 30)
        assert d.llmctl("restart", "e", "--force").returncode == 0
        ready = d.wait_state("e", "ready", 60)  # well within the 5 min drain it would have waited
    finally:
        try:
            os.kill(first["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    streamer.join()
    assert ready["pid"] != first["pid"]
    assert not [e for e in d.events() if e["kind"] == "engine.draining"]


def test_a_stream_for_a_ready_engine_waiting_behind_another_engines_turn_hears_keepalives(daemon_factory) -> None:
    """A stream for a still-ready engine held behind another engine's turn gets its head and keep-alives at once."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("a", free_port(), "--tps", "20", exclusive=True, default=True)
                       + standin_engine_toml("b", free_port(), "--load-s", "2", exclusive=True, autostart=False)
                       + f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = "90s"\nhold_keepalive_s = "1s"\n').start()
    d.wait_state("a", "ready", 30)
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    # a's own stream keeps it busy, so the swap to b drains a for a while and a is still "ready" then.
    busy = threading.Thread(target=lambda: _sse_stream(url, {"model": "a", "stream": True, "max_tokens": 60, **CHAT}))
    busy.start()
    time.sleep(0.5)
    for_b: dict[str, int] = {}
    swap = threading.Thread(target=lambda: for_b.setdefault(
        "status", httpx.post(url, json={"model": "b", "max_tokens": 3, **CHAT}, timeout=120).status_code))
    swap.start()
    time.sleep(0.5)
    assert d.engine("a")["state"] == "ready"
    # A client that gives up after 3 s of silence: a's request waits for b's whole turn, then a swap
    # back that the 60 s spawn floor delays; it hears comments all along (the test leaves after three).
    comments: list[str] = []
    with httpx.stream("POST", url, json={"model": "a", "stream": True, "max_tokens": 3, **CHAT},
                      timeout=httpx.Timeout(120, read=3.0)) as r:
        status = r.status_code
        for line in r.iter_lines():
            assert not line.startswith("data:"), line  # a's turn comes only after b's
            if line.startswith(":"):
                comments.append(line)
            if len(comments) == 3:
                break
    busy.join()
    swap.join()
    assert status == 200 and for_b == {"status": 200}
    assert all(re.fullmatch(r": loading a \d+s \(\w+\)", c) for c in comments), comments
    assert [e["target"] for e in d.events() if e["kind"] == "swap.started"] == ["b"]


def test_a_stream_refused_by_a_full_queue_gets_a_real_429(daemon_factory) -> None:
    """max_concurrent = 1, max_queue = 0: a second stream gets a 429 with Retry-After, not a 200 head and an error event."""
    gw = free_port()
    d = daemon_factory(standin_engine_toml("e", free_port(), "--tps", "20", default=True, max_concurrent=1,
                                           max_queue=0) + f'[gateway]\nlisten = "127.0.0.1:{gw}"\n').start()
    d.wait_state("e", "ready", 30)
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    body = {"model": "e", "stream": True, "max_tokens": 40, **CHAT}
    running = threading.Thread(target=lambda: _sse_stream(url, body))
    running.start()
    time.sleep(0.5)
    refused = httpx.post(url, json=body, timeout=30)
    running.join()
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
