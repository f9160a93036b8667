"""The watchdog's evidence rule end to end: `hung` means the engine stopped, never that a client did.

Real daemon, real gateway, a real mlx_lm.server (slow and paused clients; a generation loop wedged by
an import hook while `/health` stays 200) and the OpenAI stand-in where a behaviour cannot be made on
demand with the tiny model (silent engines, counter styles, lazy model loading).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers import PYTHON, REPO, Daemon, free_port, mlx_engine_toml, standin_engine_toml, tiny_model_dir

pytestmark = pytest.mark.slow

HOOK_DIR = REPO / "tests" / "standins" / "blocked_mlx"
DECODE_STALL_S = 2.0
CLIENT_TIMEOUT_S = 8.0


def _t(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def _states(d: Daemon, name: str) -> list[dict]:
    return [e for e in d.events() if e["kind"] == "engine.state_changed" and e.get("engine") == name]


def _hung(d: Daemon, name: str) -> list[dict]:
    return [e for e in _states(d, name) if e["to"] == "hung"]


def _body(max_tokens: int, model: str = "tiny") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": True}


def _stream_all(url: str, body: dict, timeout_s: float = 120.0) -> tuple[int, float]:
    """Read a whole stream; (token chunks, seconds)."""
    started = time.monotonic()
    chunks = 0
    with httpx.stream("POST", url, json=body, timeout=timeout_s) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                chunks += 1
    return chunks, time.monotonic() - started


def _gateway_toml(port: int, **keys: object) -> str:
    lines = ["[gateway]", f'listen = "127.0.0.1:{port}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def mlx_daemon() -> Iterator[tuple[Daemon, str]]:
    """One daemon with the gateway in front of a real mlx_lm.server; small buffers and timeouts."""
    gw = free_port()
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model_dir(), default=True, stall=f"{DECODE_STALL_S:g}s",
                          canary_interval="10m")
    cfg += _gateway_toml(gw, decode_stall_s=DECODE_STALL_S, client_timeout_s=CLIENT_TIMEOUT_S,
                         client_buffer_bytes="4KiB")
    cfg += '[policies.restart]\nhang_restart_after = "5s"\n'
    d = Daemon(cfg)
    try:
        d.start()
        d.wait_state("tiny", "ready", 90)
        yield d, f"http://127.0.0.1:{gw}/v1/chat/completions"
    finally:
        d.cleanup()


def test_a_client_that_stops_reading_is_cut_and_the_engine_stays_ready(mlx_daemon) -> None:
    """A client that reads the head and then nothing for 3x the decode stall: the engine stays `ready`,
    another client is served meanwhile, and the slow client is cut after client_timeout_s."""
    d, url = mlx_daemon
    before = len(_hung(d, "tiny"))
    pid = d.engine("tiny")["pid"]
    _, alone_s = _stream_all(url, _body(400))
    host, port = url.split("//")[1].split("/")[0].split(":")
    payload = json.dumps(_body(30000)).encode()
    slow = socket.socket()
    # A small receive window, set before connecting (the window scale is agreed in the handshake),
    # so the kernel's buffers fill within a second and the gateway's own buffer is what holds.
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((host, int(port)))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    head = slow.recv(1024)
    assert head.startswith(b"HTTP/1.1 200"), head
    stopped_reading = time.monotonic()
    try:
        time.sleep(3 * DECODE_STALL_S)
        assert d.engine("tiny")["state"] == "ready"
        chunks, during_s = _stream_all(url, _body(400))
        print(f"another client: {chunks} chunks in {during_s:.2f}s while the slow one held its stream "
              f"(alone: {alone_s:.2f}s)")
        assert chunks >= 100
        deadline = time.monotonic() + CLIENT_TIMEOUT_S + 30
        while d.status()["gateway"]["clients_cut"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        cut_after = time.monotonic() - stopped_reading
    finally:
        slow.close()
    assert d.status()["gateway"]["clients_cut"] == 1
    print(f"slow client cut {cut_after:.1f}s after it stopped reading (client_timeout_s {CLIENT_TIMEOUT_S:g})")
    assert cut_after >= CLIENT_TIMEOUT_S
    assert "gateway.client_cut" in d.stderr()
    engine = d.engine("tiny")
    assert engine["state"] == "ready" and engine["pid"] == pid and engine["restarts"] == 0
    assert len(_hung(d, "tiny")) == before, "a slow client never makes the engine hung"


def test_a_client_paused_with_sigstop_mid_stream_brings_no_verdict(mlx_daemon) -> None:
    """A client process SIGSTOPped mid-stream for 3x the decode stall, then resumed, reads its whole
    answer, and the engine gets no verdict."""
    d, url = mlx_daemon
    before = len(_hung(d, "tiny"))
    script = ("import httpx, json, sys\n"
              "n = 0\n"
              f"with httpx.stream('POST', {url!r}, json=json.loads(sys.argv[1]), timeout=120) as r:\n"
              "    for line in r.iter_lines():\n"
              "        if line.startswith('data:') and '[DONE]' not in line:\n"
              "            n += 1\n"
              "            if n == 5: print('started', flush=True)\n"
              "print('chunks', n, flush=True)\n")
    client = subprocess.Popen([PYTHON, "-c", script, json.dumps(_body(3000))], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "started"
        os.kill(client.pid, signal.SIGSTOP)
        time.sleep(3 * DECODE_STALL_S)
        assert d.engine("tiny")["state"] == "ready"
        os.kill(client.pid, signal.SIGCONT)
        out, _ = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGCONT)
            client.kill()
    chunks = int(out.split()[-1])
    assert chunks >= 1000, out
    assert len(_hung(d, "tiny")) == before and d.engine("tiny")["state"] == "ready"


def _silent_engine_daemon(daemon_factory, *flags: str, kind_keys: dict | None = None) -> tuple[Daemon, str]:
    gw = free_port()
    cfg = standin_engine_toml("quiet", free_port(), "--tps", "50", *flags, default=True, stall="2s",
                              canary_interval="10m", **(kind_keys or {}))
    cfg += _gateway_toml(gw, decode_stall_s=2.0, prefill_stall_s=2.0)
    cfg += '[policies.restart]\nhang_restart_after = "3s"\n'
    d = daemon_factory(cfg).start()
    d.wait_state("quiet", "ready", 60)
    return d, f"http://127.0.0.1:{gw}/v1/chat/completions"


def _stream_in_thread(url: str, body: dict) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(("case", "after_tokens"), [
    ("before the first token", 0),
    # Silent mid-stream is also covered in the default run by the completion-only counters test.
    pytest.param("mid-stream", 10, marks=pytest.mark.chaos_full),
])
def test_a_running_but_silent_engine_is_hung_on_stream_evidence_and_restarted(daemon_factory, case: str,
                                                                              after_tokens: int) -> None:
    """An engine alive with /health 200 that goes silent (head sent and no token, or mid-stream) is `hung`
    within stall + 2 s naming the stream evidence, and restarted after hang_restart_after."""
    d, url = _silent_engine_daemon(daemon_factory, "--silent-from", "2", "--silent-after-tokens", str(after_tokens))
    sent = time.time()
    _stream_in_thread(url, _body(200, "quiet"))
    engine = d.wait_state("quiet", "hung", 20)
    silent_from = sent + after_tokens / 50.0  # the stand-in's 50 tok/s
    hung = _hung(d, "quiet")[-1]
    print(f"silent {case}: hung {_t(hung) - silent_from:.2f}s after the engine went silent: {hung['reason']} "
          f"{hung['evidence']}")
    assert _t(hung) - silent_from <= 2.0 + 2.0 + 0.5  # stall + 2 s (+ the stand-in's token pacing)
    assert hung["evidence"]["source"] == "stream" and hung["evidence"]["silent_s"] >= 2.0
    assert engine["watchdog"]["evidence"]["source"] == "stream"
    assert httpx.get(d.engine("quiet")["base_url"] + "/health").status_code == 200
    d.wait_state("quiet", {"stopping", "backoff"}, 20)
    stopping = d.wait_events(lambda e: e["kind"] == "engine.state_changed" and e.get("engine") == "quiet"
                             and e["to"] == "stopping")[-1]
    assert "hang restart" in stopping["reason"]
    assert 3.0 - 1.0 <= _t(stopping) - _t(hung) <= 3.0 + 2.5


def test_a_non_streamed_request_to_an_engine_gone_silent_is_hung_on_its_tokens_not_after_the_read_timeout(
        daemon_factory) -> None:
    """A non-streamed answer gives nothing until it is whole, and no canary runs beside it: the gateway fetches
    it as a stream, so an engine without step counters that goes silent mid-answer is `hung` within stall + 2 s
    on the stream's evidence, and the client gets a 504 `engine_stalled` in OpenAI's shape within the stall
    limit, instead of waiting out upstream_read_timeout_s (600 s) while the engine is taken for busy."""
    d, url = _silent_engine_daemon(daemon_factory, "--silent-from", "2", "--silent-after-tokens", "10")
    sent = time.time()
    answer = httpx.post(url, json={**_body(200, "quiet"), "stream": False}, timeout=60)
    took_s = time.time() - sent
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "engine_stalled" and "decode" in answer.json()["error"]["message"]
    assert took_s < 2.0 + 10 / 50.0 + 3.0, took_s  # the decode stall limit after its tenth token, not 600 s
    d.wait_state("quiet", {"hung", "stopping", "backoff"}, 20)
    hung = _hung(d, "quiet")[-1]
    silent_from = sent + 10 / 50.0
    print(f"non-streamed, silent mid-answer: hung {_t(hung) - silent_from:.2f}s after the engine went silent, "
          f"the client answered after {took_s:.2f}s")
    assert _t(hung) - silent_from <= 2.0 + 2.0 + 0.5
    assert hung["evidence"]["source"] == "stream"


def test_real_mlx_with_a_wedged_generation_loop_is_hung_while_health_stays_200(daemon_factory) -> None:
    """A real mlx_lm.server whose generation loop blocks after one request (import hook) answers /health
    200 but is `hung` on canary evidence within stall + 2 s, and is restarted after hang_restart_after."""
    pythonpath = os.pathsep.join([str(HOOK_DIR), os.environ.get("PYTHONPATH", "")])
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model_dir(), stall="2s", canary_interval="2s")
    cfg += f'env = {{ PYTHONPATH = {json.dumps(pythonpath)}, BLOCK_GENERATION_AFTER = "1" }}\n'
    cfg += '[policies.restart]\nhang_restart_after = "3s"\n'
    d = daemon_factory(cfg).start()
    ready = d.wait_state("tiny", "ready", 90)
    engine = d.wait_state("tiny", "hung", 30)
    hung = _hung(d, "tiny")[-1]
    ready_event = [e for e in _states(d, "tiny") if e["to"] == "ready"][-1]
    print(f"wedged generation loop: hung {_t(hung) - _t(ready_event):.2f}s after ready "
          f"(canary every 2s, stall 2s): {hung['reason']} {hung['evidence']}")
    assert _t(hung) - _t(ready_event) <= 2.0 + 2.0 + 2.0 + 1.0  # next canary + stall + 2 s (+ one tick)
    assert hung["evidence"]["source"] == "canary"
    assert httpx.get(f"http://127.0.0.1:{ready['port']}/health").status_code == 200
    assert engine["pid"] == ready["pid"]
    d.wait_state("tiny", {"stopping", "backoff"}, 20)
    stopping = d.wait_events(lambda e: e["kind"] == "engine.state_changed" and e.get("engine") == "tiny"
                             and e["to"] == "stopping")[-1]
    assert "hang restart" in stopping["reason"]
    assert "wedged" in Path(d.engine("tiny")["log"]).read_text()


def _counter_daemon(daemon_factory, kind: str, *flags: str, extra_toml: str = "") -> tuple[Daemon, str, str]:
    gw = free_port()
    port = free_port()
    argv = [PYTHON, str(REPO / "tests" / "standins" / "openai_engine.py"), "--port", "{port}", "--tps", "20", *flags]
    cfg = ("[[engine]]\nname = \"c\"\n" f'kind = "{kind}"\nmodel = "standin"\nport = {port}\n'
           "command = [" + ", ".join(json.dumps(a) for a in argv) + "]\n"
           'footprint = "100MB"\nstop_grace = "5s"\nstall = "2s"\ncanary_interval = "10m"\n'
           "default = true\n")
    cfg += _gateway_toml(gw, decode_stall_s=2.0)
    cfg += '[policies.restart]\nhang_restart_after = "10m"\n[probes]\ninterval = "1s"\n' + extra_toml
    d = daemon_factory(cfg).start()
    d.wait_state("c", "ready", 60)
    return d, f"http://127.0.0.1:{gw}/v1/chat/completions", f"http://127.0.0.1:{port}/v1/chat/completions"


def test_a_start_check_whose_counters_cannot_be_read_still_proves_generation(daemon_factory) -> None:
    """A vLLM-kind engine whose /metrics answers 404: the start check reads the step count around its
    own generation, the read fails, and the engine is ready on that generation all the same (the
    failure is no evidence either way); status shows no counters."""
    d, _, _ = _counter_daemon(daemon_factory, "vllm")  # no --metrics: the stand-in has no /metrics
    ready = [e for e in _states(d, "c") if e["to"] == "ready"][-1]
    assert ready["reason"] == "generation ok"
    assert d.engine("c")["counters"] is None
    assert httpx.get(f"http://127.0.0.1:{d.engine('c')['port']}/metrics").status_code == 404


LONG_GENERATION_S = [6.0, pytest.param(90.0, marks=pytest.mark.chaos_full)]


@pytest.mark.long_wait
@pytest.mark.parametrize("long_s", LONG_GENERATION_S)
def test_completion_only_counters_do_not_make_a_long_generation_hung(daemon_factory, long_s: float) -> None:
    """oMLX-style totals that grow only at completion stay flat through a long generation: no verdict while
    tokens flow; when the engine then goes silent mid-stream it is hung on the stream's evidence."""
    tokens = int(long_s * 20)
    d, url, _ = _counter_daemon(daemon_factory, "omlx", "--metrics", "omlx", "--silent-from", "3",
                                "--silent-after-tokens", "10")
    chunks, took_s = _stream_all(url, _body(tokens, "c"), timeout_s=long_s + 60)
    print(f"{chunks} tokens over {took_s:.1f}s with a flat completion-time counter")
    assert chunks == tokens and not _hung(d, "c") and d.engine("c")["state"] == "ready"
    _stream_in_thread(url, _body(200, "c"))
    d.wait_state("c", "hung", 20)
    assert _hung(d, "c")[-1]["evidence"]["source"] == "stream"


@pytest.mark.chaos_full  # the rule itself is covered by tests/unit/test_policy_progress.py in the default run
def test_per_step_counters_are_progress_while_they_move_and_hung_when_flat(daemon_factory) -> None:
    """vLLM-style per-step totals: a long generation read directly from the engine (the gateway sees
    nothing) is no verdict while the counter moves; when the engine stops mid-generation it is hung on
    the counters' evidence within stall + 2 s (+ one counter reading)."""
    d, _, direct = _counter_daemon(daemon_factory, "vllm", "--metrics", "vllm", "--silent-from", "2",
                                   "--silent-after-tokens", "120")
    sent = time.time()
    _stream_in_thread(direct, {**_body(400, "standin")})
    time.sleep(120 / 20 - 0.5)  # 6 s of tokens: three stall times
    assert not _hung(d, "c") and d.engine("c")["state"] == "ready"
    engine = d.wait_state("c", "hung", 20)
    hung = _hung(d, "c")[-1]
    silent_from = sent + 120 / 20
    print(f"per-step counters flat: hung {_t(hung) - silent_from:.2f}s after the engine went silent: "
          f"{hung['reason']}")
    assert hung["evidence"]["source"] == "counters" and engine["watchdog"]["evidence"]["source"] == "counters"
    assert _t(hung) - silent_from <= 2.0 + 2.0 + 1.0 + 0.5


@pytest.mark.long_wait
def test_a_vllm_prefill_longer_than_the_stall_time_is_not_hung_and_a_wedge_after_it_still_is(daemon_factory) -> None:
    """vLLM counts no token while it prefills a prompt, so a long prompt sent straight to the engine keeps
    its step count flat with a request running for 3x the stall time; its KV cache gauge rises with every
    prefill chunk, so the engine is not hung (the same pid, ready, the answer whole). A later request the
    engine wedges on mid-answer is still hung on the counters within stall + 2 s (+ one reading)."""
    d, _, direct = _counter_daemon(daemon_factory, "vllm", "--metrics", "vllm", "--prefill-tokens-per-s", "500",
                                   "--silent-from", "3", "--silent-after-tokens", "20")
    pid = d.engine("c")["pid"]
    prompt = " ".join(["word"] * 3000)  # 6 s of prefill at 500 words/s
    body = {"model": "standin", "messages": [{"role": "user", "content": prompt}], "max_tokens": 20,
            "stream": True}
    chunks, took_s = _stream_all(direct, body, timeout_s=60)
    counters = d.engine("c")["counters"]
    print(f"long prefill straight to the engine: {chunks} tokens after {took_s:.1f}s; counters {counters}")
    assert took_s >= 6.0 and chunks == 20
    assert not _hung(d, "c"), f"a prefill was called a hang: {_hung(d, 'c')}"
    engine = d.engine("c")
    assert engine["state"] == "ready" and engine["pid"] == pid
    assert counters is not None and counters["cache_usage"] is not None
    sent = time.time()
    _stream_in_thread(direct, _body(400, "standin"))
    engine = d.wait_state("c", "hung", 20)
    hung = _hung(d, "c")[-1]
    silent_from = sent + 20 / 20
    print(f"wedged after the prefill test: hung {_t(hung) - silent_from:.2f}s after the engine went silent: "
          f"{hung['reason']}")
    assert hung["evidence"]["source"] == "counters" and engine["pid"] == pid
    assert _t(hung) - silent_from <= 2.0 + 2.0 + 1.0 + 0.5


class _Decoders:
    """Clients of ``url`` (the engine's own port: the gateway sees none of them), each streaming answers of
    ``max_tokens`` one after another until told to stop."""

    def __init__(self, url: str, max_tokens: int = 100) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.threads: list[tuple[threading.Thread, threading.Event]] = []

    def add(self, n: int) -> None:
        for _ in range(n):
            stop = threading.Event()

            def run(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    _stream_all(self.url, _body(self.max_tokens, "standin"), timeout_s=60)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            self.threads.append((thread, stop))

    def stop(self, n: int | None = None) -> None:
        """Stop ``n`` of them (all: None) and wait until their answers are done."""
        stopping = self.threads[:n] if n is not None else list(self.threads)
        for _, stop in stopping:
            stop.set()
        for thread, _ in stopping:
            thread.join(60)
        self.threads = self.threads[len(stopping):]


def _learned_at(d: Daemon, band: str, what: str) -> dict[str, float]:
    """The engine's baselines once it learned one at ``band`` (within 60 s; ``what``: from what, for the
    failure message)."""
    deadline = time.monotonic() + 60
    while band not in (d.engine("c")["baselines_by_concurrency"] or {}) and time.monotonic() < deadline:
        time.sleep(0.5)
    learned = d.engine("c")["baselines_by_concurrency"]
    assert band in learned, f"no baseline learned {what}: {learned}"
    return learned


def _slowed_is_degraded(d: Daemon) -> None:
    """The engine decodes at 30% of its rate from now on (the stand-in's SIGUSR2): it is called degraded."""
    os.kill(d.engine("c")["pid"], signal.SIGUSR2)
    engine = d.wait_state("c", "degraded", 30)
    print(f"slowed to 30%: {engine['state_reason']}")


def _states_while(d: Daemon, seconds: float) -> set[str]:
    states = set()
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        states.add(d.engine("c")["state"])
        time.sleep(0.25)
    return states


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_a_long_prompt_prefilled_beside_steady_vllm_decodes_is_not_degraded_and_a_slowdown_still_is(
        daemon_factory) -> None:
    """A vLLM-like engine (per-step token total, requests running, its prompt count at each first token)
    learns 20 tok/s per request from four clients of its own port decoding at once. Then one of them
    decodes on at that very rate while three long prompts sent through the gateway are prefilled for
    15 s: the engine reports four running and makes 20 tok/s in all, which per request reads a quarter of
    the baseline. That is the other clients' prompts, not the engine: it stays `ready` (the counter
    intervals those prefills touched give no sample). When the engine then really decodes at 30% of its
    rate, with four clients again, it is `degraded`."""
    d, gateway_url, direct = _counter_daemon(
        daemon_factory, "vllm", "--metrics", "vllm", "--prefill-tokens-per-s", "250", "--slow-on-sigusr2", "0.3",
        extra_toml='[policies.degraded]\nwindow = "3s"\nwindows = 2\n')
    decoders = _Decoders(direct)
    decoders.add(4)
    try:
        learned = _learned_at(d, "3-4", "at 4 at once")
        decoders.stop(3)
        prompt = " ".join(["word"] * 3750)  # 15 s of prefill at 250 words/s, 19 KB: a long prompt
        body = {"model": "c", "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "stream": True}
        prompts = [threading.Thread(target=_stream_all, args=(gateway_url, body, 60), daemon=True) for _ in range(3)]
        for t in prompts:
            t.start()
        states = _states_while(d, 14.0)
        counters = d.engine("c")["counters"]
        samples = d.engine("c")["watchdog"]["counter_samples"]  # the check says what it left out, and why
        for t in prompts:
            t.join(30)
        print(f"baselines {learned}; while 3 prompts were prefilled beside 1 decoding client: states {states}, "
              f"counters {counters}")
        assert counters["requests_running"] == 4, "the prefills were not counted as running: the test proves nothing"
        assert states == {"ready"}, f"other clients' prefill was called a slowdown: {d.engine('c')['state_reason']}"
        assert samples["taken"] > 0 and samples["left_out_for_prefill"] > 0, samples
        assert "long prompt" in samples["last_left_out"], samples
        decoders.add(3)
        time.sleep(3.0)
        _slowed_is_degraded(d)
    finally:
        decoders.stop()


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_short_prompts_prefilled_beside_a_stream_are_not_a_slowdown_and_a_slowdown_still_is(daemon_factory) -> None:
    """An engine that runs one step at a time, as mlx_lm.server does (a prefill chunk stops every stream beside
    it), learns 20 tok/s from a lone client's streams through the gateway. Then another client sends short
    prompts (180 words, about 1 KB: well under what counts as a long prompt) one a second beside it, each
    prefilled for 0.6 s, in which the stream gets no token. That is the other client's prefill, not the
    engine: the intervals between the stream's tokens that a prefill touched, short prompt or long, are left
    out of its rate, so the rate judged stays the engine's 20 tok/s and it stays `ready`. When the engine
    then really decodes at 30% of its rate, it is `degraded`."""
    gw = free_port()
    cfg = standin_engine_toml("c", free_port(), "--tps", "20", "--prefill-tokens-per-s", "300",
                              "--prefill-blocks-decode", "--slow-on-sigusr2", "0.3", model="standin", default=True,
                              stall="5s", canary_interval="10m")
    cfg += _gateway_toml(gw) + '[probes]\ninterval = "1s"\n[policies.degraded]\nwindow = "3s"\nwindows = 2\n'
    d = daemon_factory(cfg).start()
    d.wait_state("c", "ready", 60)
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    decoders = _Decoders(url, max_tokens=20)  # a sample a second: every 3 s window has one, also when slow
    decoders.add(1)
    stop = threading.Event()
    prefills: list[float] = []

    def prompter() -> None:
        k = 0
        while not stop.wait(1.0):
            k += 1
            prompt = " ".join(f"w{k}x{i}" for i in range(180))
            _, took_s = _stream_all(url, {"model": "standin", "messages": [{"role": "user", "content": prompt}],
                                          "max_tokens": 1, "stream": True}, 60)
            prefills.append(took_s)

    try:
        learned = _learned_at(d, "1", "from the lone client")
        thread = threading.Thread(target=prompter, daemon=True)
        thread.start()
        states: set[str] = set()
        judged: list[float] = []
        try:
            beside_from = time.monotonic() + 4.0  # a 3 s window and a probe tick after the first prompt
            until = time.monotonic() + 14.0
            while time.monotonic() < until:
                engine = d.engine("c")
                states.add(engine["state"])
                if engine["tokens_per_s"] and time.monotonic() >= beside_from:
                    judged.append(engine["tokens_per_s"])
                time.sleep(0.25)
        finally:
            stop.set()
            thread.join(30)
        print(f"baselines {learned}; {len(prefills)} short prompts of {min(prefills):.2f}-{max(prefills):.2f} s beside "
              f"a stream: states {states}, rates judged {sorted(set(judged))}")
        assert len(prefills) >= 5 and min(prefills) >= 0.5, "the prompts were not prefilled: the test proves nothing"
        assert len(judged) >= 10, f"the stream gave (almost) no rate beside the prompts: {judged}"
        assert min(judged) >= 0.75 * learned["1"], \
            f"another client's short prompts were read as the engine's decode time: {sorted(judged)}"
        assert states == {"ready"}, f"another client's short prompts were called a slowdown: " \
                                    f"{d.engine('c')['state_reason']}"
        _slowed_is_degraded(d)
    finally:
        decoders.stop()


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_a_canary_that_a_request_began_beside_gives_no_rate(daemon_factory) -> None:
    """Canaries run only while no request is in flight, but a request may begin while one runs. On an engine
    that runs one step at a time (mlx_lm.server: a prefill chunk stops every decode), a 2 s canary beside a
    prompt prefilled for 1 s reads a third less than the engine decodes: that canary's rate is left out, so
    the rate judged stays the engine's 20 tok/s."""
    gw = free_port()
    cfg = standin_engine_toml("c", free_port(), "--tps", "20", "--prefill-tokens-per-s", "300",
                              "--prefill-blocks-decode", model="standin", default=True, stall="5s",
                              canary_interval="1s", canary_max_tokens=40)
    cfg += _gateway_toml(gw) + '[policies.degraded]\nwindow = "3s"\nwindows = 2\n'
    d = daemon_factory(cfg).start()
    d.wait_state("c", "ready", 60)
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    learned = _learned_at(d, "1", "from lone canaries")
    judged: list[float] = []
    canaries: set[float] = set()
    prompt = " ".join(f"w{i}" for i in range(300))  # 1 s of prefill
    for k in range(8):  # one every 2.5 s: 1 s after each ends a canary starts, and the next begins 0.5 s into it
        started = time.monotonic()
        _stream_all(url, {"model": "standin", "messages": [{"role": "user", "content": f"{k} {prompt}"}],
                          "max_tokens": 1, "stream": True}, 60)
        while time.monotonic() < started + 2.5:
            engine = d.engine("c")
            if engine["tokens_per_s"]:
                judged.append(engine["tokens_per_s"])
            canaries.add(round((engine["last_canary"] or {}).get("tokens_per_s") or 0.0, 1))
            time.sleep(0.1)
    print(f"baselines {learned}; canaries read {sorted(canaries)}; rates judged {sorted(set(judged))}")
    assert min(canaries - {0.0}, default=learned["1"]) < 0.8 * learned["1"], \
        "no canary ran beside a prefill: the test proves nothing"
    assert judged and min(judged) >= 0.75 * learned["1"], \
        f"a canary beside another request's prefill was read as the engine's decode: {sorted(set(judged))}"
    assert d.engine("c")["state"] == "ready"


@pytest.mark.long_wait
def test_a_lazy_loader_is_loading_not_hung_and_gets_no_canary_while_unloaded(daemon_factory) -> None:
    """An Ollama-like engine whose model load takes 3x the stall: canaries while it is loaded do not
    extend its keep-alive, none is sent once it reports its model unloaded, and a request that makes
    it load shows `loading`, then tokens, never `hung`."""
    gw = free_port()
    cfg = standin_engine_toml("lazy", free_port(), "--ollama", "--lazy-load-s", "3", "--keep-alive-s", "3",
                              default=True, stall="1s", canary_interval="1s", model="tiny:1b")
    cfg = cfg.replace('kind = "command"', 'kind = "ollama"')
    cfg += _gateway_toml(gw) + '[probes]\ninterval = "1s"\n'
    d = daemon_factory(cfg).start()
    d.wait_state("lazy", "ready", 60)
    ready_at = time.monotonic()
    log = Path(d.engine("lazy")["log"])
    while (d.engine("lazy").get("watchdog") or {}).get("model_resident") is not False:
        assert time.monotonic() - ready_at < 3.0 + 4.0, "canaries every second kept the model resident"
        time.sleep(0.2)
    time.sleep(3.0)  # three more canary intervals with the model unloaded
    requests = [line for line in log.read_text().splitlines() if line.startswith("request ")]
    print(f"requests before the real one: {requests}")
    assert [r for r in requests if "loaded=False" in r] == requests[:1], \
        f"no canary reached the engine once its model was unloaded: {requests}"
    assert not _hung(d, "lazy")
    phases: list[str | None] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            phases.append((d.engine("lazy").get("watchdog") or {}).get("phase"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        chunks, took_s = _stream_all(f"http://127.0.0.1:{gw}/v1/chat/completions", _body(20, "lazy"))
    finally:
        stop.set()
        watcher.join()
    print(f"request to the unloaded model: {chunks} chunks after {took_s:.1f}s; phases seen {sorted(set(map(str, phases)))}")
    assert chunks == 20 and took_s >= 3.0
    assert "loading" in phases
    assert not _hung(d, "lazy") and d.engine("lazy")["state"] == "ready"


@pytest.mark.long_wait
def test_a_hang_that_comes_back_after_each_canary_is_one_episode_and_gets_its_restart(daemon_factory) -> None:
    """vLLM-style counters show a request running and no step; canaries asked for fewer tokens than the engine
    gives before it goes silent answer in between. Each canary cleared the hang and the next look called it
    again: hung and ready every few seconds (a critical alert each time), and hang_restart_after, counted from
    each new start, was never reached. A hang back within 30 s of clearing is the same episode: restarted."""
    port = free_port()
    argv = [PYTHON, str(REPO / "tests" / "standins" / "openai_engine.py"), "--port", "{port}", "--tps", "20",
            "--metrics", "vllm", "--silent-from", "3", "--silent-after-tokens", "20"]
    cfg = ("[[engine]]\nname = \"c\"\nkind = \"vllm\"\nmodel = \"standin\"\n" f"port = {port}\n"
           "command = [" + ", ".join(json.dumps(a) for a in argv) + "]\n"
           'footprint = "100MB"\nstop_grace = "5s"\nstall = "2s"\ncanary_interval = "10m"\ncanary_max_tokens = 8\n'
           '[policies.restart]\nhang_restart_after = "10s"\n[probes]\ninterval = "1s"\n')
    d = daemon_factory(cfg).start()
    pid = d.wait_state("c", "ready", 60)["pid"]
    direct = f"http://127.0.0.1:{port}/v1/chat/completions"
    _stream_in_thread(direct, _body(400, "standin"))  # the start check was the 1st, this the 2nd: it answers
    time.sleep(1.0)
    _stream_in_thread(direct, _body(400, "standin"))  # the 3rd: 20 tokens, then running without a step
    restart = d.wait_events(lambda e: e["kind"] == "policy.decided" and e.get("policy") == "hang_restart",
                            timeout_s=60)
    assert restart, [(e["to"], e["reason"]) for e in _states(d, "c")]
    assert d.wait_state("c", "ready", 90)["pid"] != pid
