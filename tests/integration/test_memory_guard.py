"""The memory guard on real engines under the real daemon.

The stand-in engine (tests/standins/openai_engine.py ``--grow-mb``) allocates and touches memory on
every request and never frees it, as mlx_lm.server's prompt cache did before ``--max-kv-size``;
sizes are tens of MB so that seven test runs share the machine. The real mlx_lm.server serves the
tiny model for the no-false-alarm case.
"""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import psutil
import pytest

from tests.helpers import free_port, mlx_engine_toml, standin_engine_toml

pytestmark = [pytest.mark.slow, pytest.mark.long_wait]  # mostly waits: run beside the rest

MB = 10**6
FAST_PROBES = '[probes]\ninterval = "0.3s"\nprocess_interval = "0.2s"\n'


def _gateway(port: int) -> str:
    return f'[gateway]\nlisten = "127.0.0.1:{port}"\n'


def _alerts(d, prefix: str) -> list[dict]:
    return [e for e in d.events() if e["kind"] == "alert.raised" and e["key"].startswith(prefix)]


def _chat(base: str, model: str, max_tokens: int = 8, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", timeout=timeout,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": max_tokens})


def _wait_memory(d, name: str, key: str, at_least: int, timeout_s: float = 15) -> dict:
    deadline = time.monotonic() + timeout_s
    mem: dict = {}
    while time.monotonic() < deadline:
        mem = d.engine(name)["memory"]
        if (mem.get(key) or 0) >= at_least:
            return mem
        time.sleep(0.1)
    raise AssertionError(f"{name} memory.{key} never reached {at_least}: {mem}")


@pytest.mark.long_wait
def test_growth_alerts_once_then_drains_and_restarts_through_the_backoff(daemon_factory) -> None:
    """An engine growing past soft warns once; past hard it takes no new requests, its in-flight stream
    finishes, then it stops gracefully and waits out the 60 s floor, with a critical alert naming the sizes."""
    gw = free_port()
    cfg = standin_engine_toml("grow", free_port(), "--grow-mb", "30", "--tps", "40",
                              footprint="60MB", memory_soft="80MB", memory_hard="150MB", canary_interval="10m")
    cfg += FAST_PROBES + _gateway(gw) + '[policies.memory_guard]\ndrain_grace = "20s"\n'
    d = daemon_factory(cfg).start()
    first = d.wait_state("grow", "ready", 30)
    base = f"http://127.0.0.1:{gw}"
    held = _wait_memory(d, "grow", "held_bytes", 1)["held_bytes"]
    assert held < 80 * MB, f"the stand-in starts below its soft watermark ({held})"
    # Requests until the soft watermark is crossed (the stand-in's own size varies a little).
    sent = 0
    while (d.engine("grow")["memory"]["held_bytes"] or 0) < 80 * MB and sent < 3:
        assert _chat(base, "grow").status_code == 200
        sent += 1
        time.sleep(1.0)
    _wait_memory(d, "grow", "held_bytes", 80 * MB)
    deadline = time.monotonic() + 5
    while not _alerts(d, "engine.memory_high:grow") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.engine("grow")["memory"]["held_bytes"] < 150 * MB
    # One more request below hard: no second warning for the same episode.
    if d.engine("grow")["memory"]["held_bytes"] + 30 * MB < 150 * MB:
        assert _chat(base, "grow").status_code == 200
        time.sleep(1.0)
    high = _alerts(d, "engine.memory_high:grow")
    assert len(high) == 1 and high[0]["severity"] == "warning", high

    # A long stream that grows the engine past hard: it is drained, not cut.
    streamed: dict = {}

    def stream() -> None:
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                          json={"model": "grow", "stream": True, "max_tokens": 160,
                                "messages": [{"role": "user", "content": "long"}]}) as r:
            streamed["status"] = r.status_code
            streamed["tokens"] = sum(1 for line in r.iter_lines() if line.startswith("data: {")
                                     and json.loads(line[6:])["choices"])

    t = threading.Thread(target=stream)
    t.start()
    while (d.engine("grow")["memory"]["held_bytes"] or 0) < 150 * MB and t.is_alive():
        _chat(base, "grow", max_tokens=1)  # grows it further while the stream runs
        time.sleep(0.5)
    deadline = time.monotonic() + 5
    refused = None
    while time.monotonic() < deadline and t.is_alive():
        r = _chat(base, "grow")
        if r.status_code == 503:
            refused = r
            break
        time.sleep(0.2)
    assert refused is not None, "a draining engine takes no new requests"
    assert "draining" in refused.text and refused.headers.get("retry-after")
    t.join(60)
    assert streamed == {"status": 200, "tokens": 160}, f"the in-flight stream finished: {streamed}"
    engine = d.wait_state("grow", "backoff", 30)
    assert "memory guard" in engine["state_reason"]
    # The 60 s floor: the next spawn is at least 60 s after the last one.
    spawns = [e for e in d.events() if e["kind"] == "engine.spawned" and e["engine"] == "grow"]
    assert len(spawns) == 1 and engine["pid"] is None
    last_spawn_wall = datetime_s(spawns[-1]["at"])
    assert engine["next_start_at"] - last_spawn_wall >= 60 - 0.5, engine
    exceeded = _alerts(d, "engine.memory_exceeded:grow")
    assert len(exceeded) == 1 and exceeded[0]["severity"] == "critical"
    details = exceeded[0]["details"]
    assert details["held_bytes"] >= 150 * MB and details["hard_bytes"] == 150 * MB
    assert "150.0 MB" in exceeded[0]["summary"]
    exited = _alerts(d, "engine.exited:grow")
    assert [a["details"]["exit"] for a in exited] == ["memory guard"], exited
    stopped = [e for e in d.events() if e["kind"] == "engine.stopped" and e["engine"] == "grow"][-1]
    assert stopped["graceful"] is True
    decided = [e for e in d.events() if e["kind"] == "policy.decided" and e.get("policy") == "memory_guard"]
    assert [e["decision"] for e in decided][-2:] == ["over", "restart"], decided
    assert decided[-2]["held_bytes"] >= 150 * MB and decided[-2]["hard_bytes"] == 150 * MB
    assert not psutil.pid_exists(first["pid"]), "the whole engine is gone before its restart"


def datetime_s(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_second_engine_is_not_started_into_memory_the_first_is_growing_into(daemon_factory) -> None:
    """While engine A has grown past its footprint, starting B is refused on A's real size, naming it."""
    gw = free_port()
    cfg = standin_engine_toml("a", free_port(), "--grow-mb", "40", footprint="50MB", memory_soft="300MB",
                              memory_hard="400MB", canary_interval="10m")
    cfg += standin_engine_toml("b", free_port(), footprint="50MB", autostart=False)
    cfg += FAST_PROBES + _gateway(gw)
    cfg += '[policies.memory]\nbudget = "150MB"\nheadroom = "0GB"\nadmission_wait = "1s"\n'
    d = daemon_factory(cfg).start()
    d.wait_state("a", "ready", 30)
    for _ in range(2):
        assert _chat(f"http://127.0.0.1:{gw}", "a").status_code == 200
    mem = _wait_memory(d, "a", "held_bytes", 110 * MB)
    assert d.engine("a")["footprint_bytes"] >= mem["held_bytes"] - 5 * MB
    result = d.llmctl("start", "b")
    assert result.returncode == 1, "B must not start into the memory A is growing into"
    assert "budget" in result.stdout + result.stderr and "a (" in result.stdout + result.stderr, result
    b = d.engine("b")
    assert b["state"] == "stopped" and b["pid"] is None and b["start_refused"]["reason"] == "budget", b


def test_learned_peak_survives_a_daemon_restart_and_changes_admission(daemon_factory) -> None:
    """The peak an engine reached is kept in the state file: after a daemon restart it is shown in
    status and the engine is admitted on it (a start next to another engine no longer fits)."""
    ports = free_port(), free_port(), free_port()

    def config(a_autostart: bool) -> str:
        cfg = standin_engine_toml("a", ports[0], "--grow-mb", "40", footprint="50MB", memory_soft="300MB",
                                  memory_hard="400MB", canary_interval="10m", autostart=a_autostart)
        cfg += standin_engine_toml("b", ports[1], footprint="50MB", autostart=not a_autostart)
        cfg += FAST_PROBES + _gateway(ports[2])
        return cfg + '[policies.memory]\nbudget = "150MB"\nheadroom = "0GB"\nadmission_wait = "1s"\n'

    d = daemon_factory(config(True)).start()
    d.wait_state("a", "ready", 30)
    for _ in range(2):
        assert _chat(f"http://127.0.0.1:{ports[2]}", "a").status_code == 200
    peak = _wait_memory(d, "a", "learned_peak_bytes", 110 * MB)["learned_peak_bytes"]
    d.stop()  # a clean stop: the engines stop too
    saved = json.loads((d.state_dir / "state.json").read_text())["memory_guard"]["engines"]["a"]
    assert max(saved["run_peaks_bytes"]) >= 110 * MB

    # Second life: B runs, A does not; A's admission now counts its learned peak, not its 50 MB.
    d.config_path.write_text(f'[daemon]\nstate_dir = "{d.state_dir}"\n' + config(False))
    d.start()
    assert d.llmctl("start", "b").returncode == 0  # stopped before the restart, so not autostarted
    d.wait_state("b", "ready", 30)
    a = d.engine("a")
    assert a["state"] == "stopped"
    assert a["memory"]["learned_peak_bytes"] >= peak - MB and a["footprint_bytes"] >= 110 * MB, a
    status_text = d.llmctl("status").stdout
    assert "peak" in status_text, status_text
    result = d.llmctl("start", "a")
    assert result.returncode == 1 and "budget" in result.stdout + result.stderr, result
    assert d.engine("a")["pid"] is None


def test_real_mlx_server_is_attributed_and_the_guard_stays_quiet(daemon_factory, tiny_model) -> None:
    """The real mlx_lm.server's RSS is attributed to it (matches its process tree) and normal traffic
    raises no memory alert, also with footprint = "auto" on a model whose weights are a few MB; the cache cap
    the README advises (--prompt-cache-bytes) is accepted by the real server and satisfies doctor."""
    from policies.admission import auto_footprint_bytes
    from probes.weights import read_weights
    from supervisord_llm.subsystems.memory_guard import AUTO_RUNTIME_BYTES

    gw = free_port()
    cfg = mlx_engine_toml("tiny", free_port(), tiny_model, footprint="auto", default=True,
                          args=["--prompt-cache-bytes", "64MB"])
    cfg += FAST_PROBES + _gateway(gw)
    d = daemon_factory(cfg).start()
    engine = d.wait_state("tiny", "ready", 90)
    for i in range(10):
        r = httpx.post(f"http://127.0.0.1:{gw}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": f"tell me a story {i} " * 10}],
                             "max_tokens": 48})
        assert r.status_code == 200
    time.sleep(1.0)
    proc = psutil.Process(engine["pid"])
    tree_rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    mem = d.engine("tiny")["memory"]
    print(f"mlx_lm.server held {mem['held_bytes'] / MB:.1f} MB (psutil {tree_rss / MB:.1f} MB), peak "
          f"{mem['peak_bytes'] / MB:.1f} MB, soft {mem['soft_bytes'] / MB:.0f} MB, hard {mem['hard_bytes'] / MB:.0f} MB")
    assert abs(mem["held_bytes"] - tree_rss) < 0.15 * tree_rss
    weights = read_weights(str(tiny_model), "mlx_lm")
    assert weights is not None
    guarded = auto_footprint_bytes(weights.bytes) + AUTO_RUNTIME_BYTES
    assert mem["guard"] == "ok" and mem["soft_bytes"] == round(guarded * 1.1) and mem["hard_bytes"] == round(guarded * 1.3)
    assert mem["peak_bytes"] >= mem["held_bytes"] * 0.9
    assert not _alerts(d, "engine.memory"), "no memory alert under normal traffic"
    assert d.engine("tiny")["state"] == "ready" and d.engine("tiny")["restarts"] == 0
    assert "--prompt-cache-bytes" in " ".join(psutil.Process(engine["pid"]).cmdline())
    from supervisord_llm.config import load_config
    from supervisord_llm.doctor import check_memory_cap

    config = load_config(d.config_path)
    finding = check_memory_cap(config.engines[0], config)
    assert finding.level == "ok" and "--prompt-cache-bytes" in finding.message, finding


def test_machine_below_its_headroom_recycles_the_largest_offender_first(daemon_factory, tmp_path) -> None:
    """When the machine falls below its headroom, the engine most over its footprint is drained and
    restarted; an engine within its footprint keeps serving."""
    from tests.helpers import STANDINS

    seq = tmp_path / "sequence.txt"
    seq.write_text("studio-512gb-idle\n")  # 523 GB available of a 512 GiB Mac
    env = {"PATH": f"{STANDINS}:{os.environ['PATH']}", "STANDIN_VM_STAT_SEQUENCE_FILE": str(seq)}
    gw = free_port()
    cfg = standin_engine_toml("a", free_port(), "--grow-mb", "40", footprint="50MB", memory_soft="300MB",
                              memory_hard="400MB", canary_interval="10m")
    cfg += standin_engine_toml("b", free_port(), footprint="50MB", canary_interval="10m")
    cfg += ('[probes]\nplatform = "darwin"\ninterval = "0.3s"\nprocess_interval = "0.2s"\n'
            f'vm_stat = "{STANDINS / "vm_stat"}"\nsysctl = "{STANDINS / "sysctl"}"\n')
    cfg += _gateway(gw) + '[policies.memory]\nheadroom = "100GB"\n'
    d = daemon_factory(cfg, env=env).start()
    d.wait_state("a", "ready", 30)
    d.wait_state("b", "ready", 30)
    for _ in range(2):
        assert _chat(f"http://127.0.0.1:{gw}", "a").status_code == 200
    _wait_memory(d, "a", "held_bytes", 90 * MB)
    seq.write_text("studio-512gb-two-models-danger\n")  # 49.7 GB available: below the 100 GB headroom
    a = d.wait_state("a", {"stopping", "backoff"}, 20)
    assert "headroom" in a["state_reason"] and "largest offender" in a["state_reason"], a
    deadline = time.monotonic() + 10  # the event log's writer may land the line after the state is visible
    while not (decided := [e for e in d.events() if e["kind"] == "policy.decided"
                           and e.get("policy") == "memory_guard_machine"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decided and decided[0]["decision"] == "drain" and decided[0]["engine"] == "a", decided
    assert decided[0]["available_bytes"] < 100 * 10**9 <= decided[0]["headroom_bytes"]
    exceeded = _alerts(d, "engine.memory_exceeded:a")
    assert len(exceeded) == 1 and exceeded[0]["severity"] == "critical"
    time.sleep(1.0)
    b = d.engine("b")
    assert b["state"] == "ready" and b["restarts"] == 0, "an engine within its footprint keeps serving"
    assert not _alerts(d, "engine.memory_exceeded:b")

