"""The watchdog and the swap policy on real mlx_lm.server engines under the real daemon.

Hangs are real (SIGSTOP), slowdowns are real (a SIGSTOP/SIGCONT duty cycle), crashes are real
(SIGKILL), swaps stop and start real processes, and the gateway is driven by the openai SDK.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime

import httpx
import psutil
import pytest

from tests.helpers import free_port, mlx_engine_toml, standin_engine_toml

pytestmark = pytest.mark.slow


def _t(event: dict) -> float:
    return datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()


def _wait_baseline(d, name: str, timeout_s: float = 60) -> None:
    """Until the engine has learned a throughput baseline (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while d.engine(name)["baseline_tokens_per_s"] is None and time.monotonic() < deadline:
        time.sleep(0.5)


def _gateway_daemon_with_lone_baseline(daemon_factory, tiny_model, windows: int = 2, share: float = 0.6,
                                      **keys: object):
    """A real mlx_lm.server with the gateway on and 3 s degraded windows, once it learned its rate from lone
    canaries: (daemon, gateway port, baseline)."""
    gw = free_port()
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, canary_interval="1s", canary_max_tokens=200, stall="10s",
                          default=True, **keys)
    cfg += f'[policies.degraded]\nwindow = "3s"\nwindows = {windows}\nshare = {share}\n'
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\n'
    d = daemon_factory(cfg).start()
    d.wait_state("tiny", "ready", 90)
    _wait_baseline(d, "tiny")
    baseline = d.engine("tiny")["baseline_tokens_per_s"]
    assert baseline, "a baseline is learned from canaries"
    return d, gw, baseline


def _watch_windows(d, threads: list[threading.Thread], stop: threading.Event, seconds: float = 18.0,
                   more_until: Callable[[dict], bool] | None = None, at_most_s: float = 0.0,
                   ) -> tuple[list[str], list[float | None]]:
    """The engine's state and judged rate every 0.5 s for ``seconds`` (6 windows of 3 s) while the started threads
    load it, and on while ``more_until(engine)`` is false, up to ``at_most_s`` in all; then they are told to stop
    and joined."""
    states: list[str] = []
    rates: list[float | None] = []
    try:
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds and (more_until is None or elapsed >= at_most_s
                                       or more_until(d.engine("tiny"))):
                break
            engine = d.engine("tiny")
            states.append(engine["state"])
            rates.append(engine["tokens_per_s"])
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return states, rates


def _state_events(d, name: str) -> list[dict]:
    return [e for e in d.events() if e["kind"] == "engine.state_changed" and e.get("engine") == name]


def test_sigstop_is_hung_within_the_stall_time_and_sigcont_recovers(daemon_factory, tiny_model) -> None:
    """SIGSTOP → `hung` (detection time printed); SIGCONT → back to `ready` without a restart."""
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, stall="3s", canary_interval="2s")
    cfg += '[policies.restart]\nhang_restart_after = "10m"\n'
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        engine = d.wait_state("tiny", "hung", 20)
        hung = [e for e in _state_events(d, "tiny") if e["to"] == "hung"][-1]
        print(f"hung detected {_t(hung) - stopped_at:.2f} s after SIGSTOP ({engine['state_reason']})")
        assert _t(hung) - stopped_at < 3 + 2
    finally:
        os.kill(pid, signal.SIGCONT)
    engine = d.wait_state("tiny", "ready", 30)
    assert engine["pid"] == pid and engine["restarts"] == 0


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_duty_cycle_slowdown_is_degraded_and_recovers(daemon_factory, tiny_model) -> None:
    """Cutting throughput to ~40% with SIGSTOP/SIGCONT → `degraded`; lifting it → `ready`."""
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, canary_interval="1s", canary_max_tokens=200, stall="10s")
    cfg += '[policies.degraded]\nwindow = "3s"\nwindows = 2\nshare = 0.6\n'
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    _wait_baseline(d, "tiny")
    baseline = d.engine("tiny")["baseline_tokens_per_s"]
    assert baseline, "a baseline is learned from canaries"
    stop = threading.Event()

    def duty_cycle() -> None:  # 40% running: 20 ms on, 30 ms off
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.03)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)

    t = threading.Thread(target=duty_cycle, daemon=True)
    started = time.monotonic()
    t.start()
    try:
        engine = d.wait_state("tiny", "degraded", 60)
        print(f"degraded after {time.monotonic() - started:.1f} s: {engine['state_reason']} (baseline {baseline})")
        assert engine["state"] == "degraded"
        assert not [e for e in _state_events(d, "tiny") if e["to"] == "hung"], "a slowdown is not a hang"
    finally:
        stop.set()
        t.join()
        os.kill(pid, signal.SIGCONT)
    d.wait_state("tiny", "ready", 60)


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_many_concurrent_streams_are_not_degraded(daemon_factory, tiny_model) -> None:
    """A real mlx_lm.server that learned its rate from lone canaries, then serves 12 streams at once through
    the gateway: each stream decodes slower (the engine shares each step among them), which is load, not
    a slowdown of the engine; it stays `ready` through 6 windows of that load (judged first by what the
    lone rate bounds it to, then by the rate it learns at that concurrency) and raises no alert."""
    d, gw, baseline = _gateway_daemon_with_lone_baseline(daemon_factory, tiny_model)
    stop = threading.Event()
    done: list[int] = []

    def client() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 150,
                "stream": True}
        while not stop.is_set():
            with httpx.stream("POST", f"http://127.0.0.1:{gw}/v1/chat/completions", json=body,
                              timeout=60) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():
                    pass
            done.append(1)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(12)]
    for t in clients:
        t.start()
    # 6 windows of 3 s: the 5 a band needs to be learned, and one more; on (up to 12 windows) while no band of
    # the load is learned yet: a window some request's prefill touched is not judged, and where the load's
    # mean in flight sits between two bands their windows are shared out between them.
    states, rates = _watch_windows(d, clients, stop, more_until=lambda e: bool(
        set(e["baselines_by_concurrency"]) & {"3-4", "5-8", "9-16"}), at_most_s=36.0)
    print(f"baseline {baseline} tok/s from lone canaries; {len(done)} streams of 12 at once; "
          f"rates seen {sorted({r for r in rates if r})[:3]}..; states {sorted(set(states))}")
    learned_at = d.engine("tiny")["baselines_by_concurrency"]
    print(f"baselines by concurrency: {learned_at}")
    for e in _state_events(d, "tiny"):
        print(f"  {e['from']} -> {e['to']}: {e.get('reason')}")
    assert len(done) >= 12
    assert set(states) == {"ready"}, f"load was called a slowdown: {d.engine('tiny')['state_reason']}"
    # Learned at the load's own concurrency, below the lone rate. Which band: the mean of the requests in flight
    # over the intervals no other request's prefill touched, where the 12 clients' requests between their send
    # and their first token are not decoding: 9-16 in most runs, 5-8 in one CI run, 3-4 on a machine busy with
    # other tests (the 12 clients' threads then wait for a CPU between their streams).
    loaded = [band for band in learned_at if band in ("3-4", "5-8", "9-16")]
    assert "1" in learned_at and loaded and all(learned_at[band] < learned_at["1"] for band in loaded), learned_at
    assert not [e for e in d.events() if e["kind"] == "alert.sent" and "degraded" in str(e)]


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_decodes_beside_long_prefills_are_not_degraded(daemon_factory, tiny_model) -> None:
    """A real mlx_lm.server that learned its rate from lone canaries, then serves, through the gateway, one
    client's streams beside another client's long prompts (about a second of prefill each, one token
    answered): mlx_lm.server runs a prompt's prefill between decode steps, so a stream decoding beside one
    gets no token meanwhile and its rate over its decode falls to a fraction. That is the other request's
    prefill, not a slowdown of the engine: it stays `ready` through 12 windows of it and raises no alert,
    while the streams' tokens still give rates (the time the engine spent on the others' prefill left
    out: only the intervals between a stream's tokens that no other request's prefill touched count)."""
    # Long prompts grow the engine's memory (its prompt cache): a footprint that holds them. Three windows below
    # 40% of the baseline: on two cores the decode between prompts shares them with the gateway and both
    # clients at each prompt's turn, and a CI run read two windows of it at 43% of the lone canaries' p90, runs
    # here single windows at 49-52% (the prefill itself counted would read about 8%: the clients' own rates).
    d, gw, baseline = _gateway_daemon_with_lone_baseline(daemon_factory, tiny_model, windows=3, share=0.4,
                                                         footprint="1GB")
    stop = threading.Event()
    streams: list[float] = []
    prefills: list[float] = []
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"

    def streamer() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 300,
                "stream": True}
        while not stop.is_set():
            first = last = None
            tokens = 0
            with httpx.stream("POST", url, json=body, timeout=60) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:") and '"content"' in line:
                        last = time.monotonic()
                        first = first or last
                        tokens += 1
            if first is not None and last is not None and last > first:
                streams.append((tokens - 1) / (last - first))

    def prompter() -> None:
        k = 0
        while not stop.is_set():
            k += 1  # a new prompt each time (its start differs): no prompt cache shortens the prefill
            words = " ".join(f"w{k}x{i}" for i in range(700))
            started = time.monotonic()
            response = httpx.post(url, json={"model": "tiny", "max_tokens": 1,
                                             "messages": [{"role": "user", "content": f"{k} {words}"}]}, timeout=60)
            assert response.status_code == 200
            prefills.append(time.monotonic() - started)

    threads = [threading.Thread(target=streamer, daemon=True), threading.Thread(target=prompter, daemon=True)]
    for t in threads:
        t.start()
    # 36 s (12 windows): on a machine where a 700-word prompt takes five seconds of prefill, 18 s held only
    # two streams beside four prompts.
    states, rates = _watch_windows(d, threads, stop, seconds=36.0)
    streams.sort()
    print(f"baseline {baseline} tok/s from lone canaries; {len(prefills)} prompts, prefill p50 "
          f"{sorted(prefills)[len(prefills) // 2]:.2f}s; {len(streams)} streams, client-side rates "
          f"{[round(r) for r in streams]}; rates judged {sorted({r for r in rates if r})}; states {sorted(set(states))}")
    for e in _state_events(d, "tiny"):
        print(f"  {e['from']} -> {e['to']}: {e.get('reason')}")
    assert len(prefills) >= 3 and len(streams) >= 3
    assert streams[0] < 0.6 * baseline, "no stream decoded beside a prefill: the test proves nothing"
    assert set(states) == {"ready"}, f"another request's prefill was called a slowdown: {d.engine('tiny')['state_reason']}"
    judged = [r for r in rates if r]
    assert judged, "the streams gave no rates at all"
    # Only the intervals no prefill touched count: not a share taken off, which reads an engine that still
    # decodes beside a prefill as several times faster than it is (and would teach that as its baseline).
    assert max(judged) < 1.5 * baseline, f"rates beside prefills read too high: {sorted(judged)}"
    assert not [e for e in d.events() if e["kind"] == "alert.sent" and "degraded" in str(e)]


@pytest.mark.long_wait
def test_sigkill_restart_is_at_least_60s_after_the_previous_spawn(daemon_factory, tiny_model) -> None:
    """After a crash the next automatic spawn waits for the 60 s floor (one real wait)."""
    d = daemon_factory(mlx_engine_toml("tiny", free_port(), tiny_model)).start()
    first = d.wait_state("tiny", "ready", 90)
    os.kill(first["pid"], signal.SIGKILL)
    backoff = d.wait_state("tiny", "backoff", 10)
    assert backoff["next_start_in_s"] > 45
    second = d.wait_state("tiny", "ready", 150)
    spawns = [e for e in d.events() if e["kind"] == "engine.spawned"]
    assert len(spawns) == 2 and second["pid"] != first["pid"]
    gap = _t(spawns[1]) - _t(spawns[0])
    print(f"second spawn {gap:.1f} s after the first")
    assert gap >= 60.0


def _two_exclusive(tiny_model, gateway_port: int | None = None, **b_keys) -> str:
    cfg = mlx_engine_toml("a", free_port(), tiny_model, exclusive=True, default=True)
    cfg += mlx_engine_toml("b", free_port(), tiny_model, exclusive=True, **b_keys)
    if gateway_port:
        cfg += f'[gateway]\nlisten = "127.0.0.1:{gateway_port}"\ndecode_stall_s = 2\nhold_s = 60\n'
    return cfg


def test_switch_between_exclusive_engines_never_overlaps(daemon_factory, tiny_model) -> None:
    """`llmctl switch b` stops a, sees its tree gone, then starts b: process lifetimes never overlap."""
    d = daemon_factory(_two_exclusive(tiny_model)).start()
    a = d.wait_state("a", "ready", 90)
    assert d.engine("b")["state"] == "stopped"  # exclusive: only the default starts
    a_proc = psutil.Process(a["pid"])
    out = d.llmctl("switch", "b", timeout=180)
    assert out.returncode == 0, out.stderr
    assert d.wait_state("b", "ready", 10)["pid"]
    assert not psutil.pid_exists(a["pid"]) or a_proc.status() == psutil.STATUS_ZOMBIE
    stopped = [e for e in d.events() if e["kind"] == "engine.stopped" and e["engine"] == "a"][-1]
    spawned = [e for e in d.events() if e["kind"] == "engine.spawned" and e["engine"] == "b"][-1]
    assert stopped["seq"] < spawned["seq"]
    assert _t(spawned) >= _t(stopped), "b started before a's exit was confirmed"
    print(f"a's tree gone at {_t(stopped):.3f}, b spawned at {_t(spawned):.3f}; {out.stdout.strip()}")
    finished = [e for e in d.events() if e["kind"] == "swap.finished"][-1]
    assert finished["target"] == "b" and finished["stopped"] == ["a"]


def test_switch_to_an_engine_that_cannot_start_rolls_back(daemon_factory, tiny_model) -> None:
    """A swap to an engine that dies during start stops it and brings the previous engine back, with an alert."""
    cfg = mlx_engine_toml("a", free_port(), tiny_model, exclusive=True, default=True)
    cfg += standin_engine_toml("broken", free_port(), "--print-line", "Error: broken engine", exclusive=True)
    d = daemon_factory(cfg).start()
    d.wait_state("a", "ready", 90)
    out = d.llmctl("switch", "broken", timeout=180)
    assert out.returncode == 1
    assert "did not become ready" in out.stderr
    a = d.wait_state("a", "ready", 90)
    assert a["pid"]
    assert d.engine("broken")["state"] in ("stopped", "failed")
    rolled = [e for e in d.events() if e["kind"] == "swap.rolled_back"]
    assert rolled and rolled[-1]["restored"] == ["a"]
    assert [e for e in d.events() if e["kind"] == "alert.raised" and e["key"] == "swap.failed:broken"]


def test_gateway_request_for_the_other_model_swaps_and_a_stream_in_flight_finishes(daemon_factory, tiny_model) -> None:
    """A request for b swaps a→b; a stream in flight on a is drained (it completes) before a stops."""
    import openai

    gw = free_port()
    d = daemon_factory(_two_exclusive(tiny_model, gw)).start()
    d.wait_state("a", "ready", 90)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw}/v1", api_key="unused", max_retries=0, timeout=120)
    result: dict = {}

    def long_stream() -> None:
        chunks = 0
        usage = None
        for chunk in client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=1500, stream=True,
                                                    stream_options={"include_usage": True}):
            chunks += 1
            usage = chunk.usage or usage
        result["usage"] = usage

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.5)
    reply = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    t.join(120)
    assert reply.choices and reply.usage.completion_tokens == 8
    assert result["usage"] is not None and result["usage"].completion_tokens == 1500, "the in-flight stream completed"
    assert d.engine("b")["state"] == "ready" and d.engine("a")["state"] == "stopped"
    finished = [e for e in d.events() if e["kind"] == "swap.finished"][-1]
    assert finished["target"] == "b" and finished["drain_s"] > 0


def test_requests_during_a_restart_wait_and_succeed_and_backoff_gets_503(daemon_factory, tiny_model) -> None:
    """During `restart` a request is held until ready; during backoff it gets 503 with Retry-After."""
    gw = free_port()
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, default=True)
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\nhold_s = 60\n'
    d = daemon_factory(cfg).start()
    first = d.wait_state("tiny", "ready", 90)
    assert d.llmctl("restart", "tiny", "--force", "--no-wait").returncode == 0
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json=body, timeout=90)
    assert response.status_code == 200, response.text
    assert d.engine("tiny")["pid"] != first["pid"]
    os.kill(d.engine("tiny")["pid"], signal.SIGKILL)
    d.wait_state("tiny", "backoff", 10)
    response = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 503
    assert 0 < int(response.headers["retry-after"]) <= 60
    assert "backoff" in response.text


def test_sigstop_mid_stream_marks_the_engine_hung_through_the_gateway(daemon_factory, tiny_model) -> None:
    """A live stream that stops producing tokens marks the engine hung within the decode stall time."""
    gw = free_port()
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, default=True, canary_interval="10m")
    cfg += f'[gateway]\nlisten = "127.0.0.1:{gw}"\ndecode_stall_s = 2\n'
    cfg += '[policies.restart]\nhang_restart_after = "10m"\n'
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "stream": True}
    twenty = threading.Event()

    def read_stream() -> None:  # the client stays connected the whole time
        with httpx.stream("POST", f"http://127.0.0.1:{gw}/v1/chat/completions", json=body, timeout=60) as response:
            for i, _line in enumerate(response.iter_lines()):
                if i == 3:
                    twenty.set()

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    assert twenty.wait(60)
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        d.wait_state("tiny", "hung", 15)
        hung = [e for e in _state_events(d, "tiny") if e["to"] == "hung"][-1]
        print(f"hung {_t(hung) - stopped_at:.2f} s after SIGSTOP mid-stream: {hung['reason']}")
        assert _t(hung) - stopped_at <= 2 + 2
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.rates  # judges decode rates: run alone (see the Makefile)
def test_throughput_baseline_survives_a_daemon_restart(daemon_factory, tiny_model) -> None:
    """The learned tokens/s baseline is kept per model across a daemon crash and restart."""
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, canary_interval="1s", canary_max_tokens=100)
    cfg += '[policies.degraded]\nwindow = "2s"\n'
    d = daemon_factory(cfg).start()
    d.wait_state("tiny", "ready", 90)
    _wait_baseline(d, "tiny")
    learned = d.engine("tiny")["baseline_tokens_per_s"]
    assert learned
    time.sleep(6)  # learned baselines are saved with the next memory probe (every probes.interval, 5 s)
    d.kill()
    d.start()
    again = d.wait_state("tiny", "ready", 60)
    assert again["baseline_tokens_per_s"] is not None
    assert again["baseline_tokens_per_s"] >= 0.5 * learned


@pytest.mark.long_wait
def test_degraded_engine_is_restarted_when_idle_if_configured(daemon_factory, tiny_model) -> None:
    """With `restart_when_idle`, a degraded engine with no traffic is restarted (new pid)."""
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, canary_interval="1s", canary_max_tokens=200, stall="10s")
    cfg += '[policies.degraded]\nwindow = "3s"\nwindows = 2\nshare = 0.6\nrestart_when_idle = true\n'
    d = daemon_factory(cfg).start()
    pid = d.wait_state("tiny", "ready", 90)["pid"]
    _wait_baseline(d, "tiny")
    stop = threading.Event()

    def duty_cycle() -> None:
        # Stopped 80% of the time: slow beyond doubt, also when this thread gets the CPU late on a loaded machine
        # (at 60% stopped one CI run's engine recovered from degraded before the idle restart came).
        try:
            while not stop.is_set():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.08)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.02)
        except ProcessLookupError:
            pass  # restarted: the slow process is gone

    t = threading.Thread(target=duty_cycle, daemon=True)
    t.start()
    try:
        d.wait_state("tiny", "degraded", 60)
        engine = d.wait_state("tiny", "ready", 120)  # the restart keeps the 60 s floor between spawns
    finally:
        stop.set()
        t.join()
    assert engine["pid"] != pid and engine["restarts"] >= 1
    reasons = [e["reason"] for e in _state_events(d, "tiny") if e["to"] == "stopping"]
    assert any("degraded restart while idle" in r for r in reasons), reasons
