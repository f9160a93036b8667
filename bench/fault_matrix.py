"""Fault matrix: real faults must be detected, benign stresses must bring no verdict.

Each scenario runs on a fresh daemon (gateway on) and a real engine: the tiny mlx_lm.server where
the fault can be made on it (SIGSTOP, SIGKILL, a generation loop wedged by the import hook in
tests/standins/blocked_mlx, a SIGSTOP/SIGCONT duty cycle), else the OpenAI stand-in
(tests/standins/openai_engine.py: silent engines, completion-only counters, keep-alive comments
during a long prefill, an Ollama-like lazy loader, a vLLM-like prefill with its token total flat).
A verdict is any of `hung`, `degraded`, an exit
seen by the daemon, or a restart; its time is from the fault to the first such event.

    .venv/bin/python bench/fault_matrix.py            # every scenario (about 5 minutes)
    .venv/bin/python bench/fault_matrix.py --only sigstop,slow_reader
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import (  # noqa: E402
    PYTHON,
    REPO,
    STANDINS,
    Daemon,
    event_wall_s,
    free_port,
    mlx_engine_toml,
    standin_engine_toml,
    tiny_model_dir,
)

STALL_S = 2.0
HANG_RESTART_AFTER_S = 3.0
CLIENT_TIMEOUT_S = 8.0
VERDICT_STATES = ("hung", "degraded")


def _gateway(port: int, **keys: object) -> str:
    lines = ["[gateway]", f'listen = "127.0.0.1:{port}"', f"decode_stall_s = {STALL_S}",
             f"prefill_stall_s = {STALL_S}", f"client_timeout_s = {CLIENT_TIMEOUT_S}",
             'client_buffer_bytes = "4KiB"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + f'\n[policies.restart]\nhang_restart_after = "{HANG_RESTART_AFTER_S:g}s"\n'


def _mlx(name: str, gw: int, *, extra: str = "", degraded: str = "", **keys: object) -> str:
    keys.setdefault("canary_interval", "10m")
    keys.setdefault("stall", f"{STALL_S:g}s")
    cfg = mlx_engine_toml(name, free_port(), tiny_model_dir(), default=True, **keys)
    return cfg + extra + _gateway(gw) + degraded


def _standin(name: str, gw: int, *flags: str, kind: str = "command", **keys: object) -> str:
    keys.setdefault("canary_interval", "10m")
    cfg = standin_engine_toml(name, free_port(), *flags, default=True, stall=f"{STALL_S:g}s", **keys)
    if kind != "command":
        cfg = cfg.replace('kind = "command"', f'kind = "{kind}"')
    return cfg + _gateway(gw) + '[probes]\ninterval = "1s"\n'


def _stream(url: str, max_tokens: int, *, model: str = "e", prompt: str = "hi",
            timeout_s: float = 180.0) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True}
    out: dict[str, Any] = {"tokens": 0, "error": None}
    try:
        with httpx.stream("POST", url, json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                return out
            for line in r.iter_lines():
                if line.startswith("data:") and '"content"' in line:
                    out["tokens"] += 1
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    t.start()
    return t, box


def _verdicts(d: Daemon, name: str, after_wall_s: float) -> list[dict[str, Any]]:
    """State changes to hung/degraded, exits and hang/degraded restarts after ``after_wall_s``."""
    out = []
    for e in d.events():
        if e.get("engine") != name or event_wall_s(e) < after_wall_s:
            continue
        if e["kind"] == "engine.state_changed" and e["to"] in VERDICT_STATES:
            out.append({"verdict": e["to"], "at": event_wall_s(e), "reason": e.get("reason"),
                        "evidence": e.get("evidence")})
        elif e["kind"] == "engine.exited":
            out.append({"verdict": "exited", "at": event_wall_s(e), "reason": e.get("signal") or e.get("code"),
                        "evidence": None})
    return out


def _wait_verdict(d: Daemon, name: str, after_wall_s: float, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _verdicts(d, name, after_wall_s)
        if found:
            return found[0]
        time.sleep(0.1)
    return None


# ---- faults -----------------------------------------------------------------------------------


def fault_sigstop(d: Daemon, gw: int) -> tuple[float, float]:
    pid = d.engine("e")["pid"]
    t0 = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        _wait_verdict(d, "e", t0, 15)
    finally:
        os.kill(pid, signal.SIGCONT)
    return t0, 15


def fault_sigkill(d: Daemon, gw: int) -> tuple[float, float]:
    t0 = time.time()
    os.kill(d.engine("e")["pid"], signal.SIGKILL)
    return t0, 10


def fault_silent_before_first_token(d: Daemon, gw: int) -> tuple[float, float]:
    t0 = time.time()
    _in_thread(lambda: _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 200, timeout_s=30))
    return t0, 15


def fault_silent_mid_stream(d: Daemon, gw: int) -> tuple[float, float]:
    t0 = time.time()
    _in_thread(lambda: _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 200, timeout_s=30))
    return t0 + 10 / 50, 15  # the engine goes silent after 10 tokens at 50 tok/s


def fault_dead_generation_thread(d: Daemon, gw: int) -> tuple[float, float]:
    # The loop wedges on the first canary after the readiness one (canary every 2 s from ready).
    ready = [e for e in d.events() if e["kind"] == "engine.state_changed" and e["to"] == "ready"][-1]
    return event_wall_s(ready) + 2.0, 20


def _wait_baseline(d: Daemon) -> None:
    deadline = time.monotonic() + 90
    while d.engine("e")["baseline_tokens_per_s"] is None and time.monotonic() < deadline:
        time.sleep(0.5)


def _run_windows(clients: list[Callable[[], None]], stop: threading.Event) -> tuple[float, float]:
    """The clients, each in a thread, for 8 windows of 3 s; then told to stop. (start time, window)."""
    t0 = time.time()
    threads = [threading.Thread(target=client, daemon=True) for client in clients]
    for t in threads:
        t.start()
    time.sleep(8 * 3.0)
    stop.set()
    for t in threads:
        t.join(60)
    return t0, 3


def fault_slowdown(d: Daemon, gw: int) -> tuple[float, float]:
    _wait_baseline(d)
    pid = d.engine("e")["pid"]
    stop = threading.Event()

    def duty_cycle() -> None:  # 40% running
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.03)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)

    t0 = time.time()
    t = threading.Thread(target=duty_cycle, daemon=True)
    t.start()
    try:
        _wait_verdict(d, "e", t0, 60)
    finally:
        stop.set()
        t.join()
        os.kill(pid, signal.SIGCONT)
    return t0, 60


# ---- benign stresses ---------------------------------------------------------------------------


def benign_slow_reader(d: Daemon, gw: int) -> tuple[float, float]:
    payload = json.dumps({"model": "e", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000,
                          "stream": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", gw))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
              b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    s.recv(512)
    t0 = time.time()
    time.sleep(CLIENT_TIMEOUT_S + 3 * STALL_S + 4)
    s.close()
    return t0, 0


def benign_paused_client(d: Daemon, gw: int) -> tuple[float, float]:
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"
    script = ("import httpx, sys\n"
              f"with httpx.stream('POST', {url!r}, json={{'model': 'e', 'messages': [{{'role': 'user', "
              "'content': 'hi'}], 'max_tokens': 3000, 'stream': True}, timeout=120) as r:\n"
              "    for i, line in enumerate(r.iter_lines()):\n"
              "        if i == 10: print('started', flush=True)\n")
    client = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    client.stdout.readline()
    t0 = time.time()
    os.kill(client.pid, signal.SIGSTOP)
    time.sleep(3 * STALL_S)
    os.kill(client.pid, signal.SIGCONT)
    client.wait(120)
    return t0, 3


def benign_long_generation_completion_counters(d: Daemon, gw: int) -> tuple[float, float]:
    t0 = time.time()
    result = _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 60 * 20, timeout_s=120)  # 60 s at 20 tok/s
    assert result["tokens"] == 1200, result
    return t0, 0


def benign_long_prefill(d: Daemon, gw: int) -> tuple[float, float]:
    # 3x the stall before the first token, keep-alive comments meanwhile; a 48 KiB prompt earns
    # 48/1024 MiB x 512 s = 24 s more prefill deadline than prefill_stall_s.
    t0 = time.time()
    result = _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 20, prompt="x" * 48 * 1024)
    assert result["tokens"] == 20, result
    return t0, 2


def benign_lazy_load(d: Daemon, gw: int) -> tuple[float, float]:
    time.sleep(4.0)  # past the keep-alive: the engine unloads the model
    t0 = time.time()
    result = _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 20, model="e")
    assert result["tokens"] == 20, result
    return t0, 3


def benign_burst_64(d: Daemon, gw: int) -> tuple[float, float]:
    t0 = time.time()
    threads = [_in_thread(lambda: _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 64)) for _ in range(64)]
    for t, _ in threads:
        t.join(180)
    errors = [box["result"]["error"] for _, box in threads if box.get("result", {}).get("error")]
    assert len(errors) <= 4, errors
    return t0, 3


def benign_vllm_long_prefill(d: Daemon, gw: int) -> tuple[float, float]:
    # vLLM counts no token while it prefills: 3x the stall with its token total flat and a request
    # running, sent to the engine's own port (no canary, no gateway stream); its KV cache gauge rises.
    t0 = time.time()
    result = _stream(f"http://127.0.0.1:{d.engine('e')['port']}/v1/chat/completions", 20, model="standin",
                     prompt=" ".join(["word"] * int(3 * STALL_S * 500)))
    assert result["tokens"] == 20, result
    return t0, 3


def benign_load_after_lone_baseline(d: Daemon, gw: int) -> tuple[float, float]:
    # The rate learned from lone canaries, then 12 streams at once for 8 windows: each decodes slower.
    _wait_baseline(d)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            _stream(f"http://127.0.0.1:{gw}/v1/chat/completions", 150, timeout_s=60)

    return _run_windows([client] * 12, stop)


def benign_long_prompts_beside_streams(d: Daemon, gw: int) -> tuple[float, float]:
    # The rate learned from lone canaries; then one client streams while another sends long prompts (700
    # words, one token answered, a new prompt each time so no prompt cache shortens it) for 8 windows:
    # mlx_lm.server prefills each between the stream's decode steps, so the stream waits.
    _wait_baseline(d)
    stop = threading.Event()
    url = f"http://127.0.0.1:{gw}/v1/chat/completions"

    def streamer() -> None:
        while not stop.is_set():
            _stream(url, 300, timeout_s=60)

    def prompter() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            words = " ".join(f"w{k}x{i}" for i in range(700))
            try:
                httpx.post(url, timeout=60, json={"model": "e", "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": f"{k} {words}"}]})
            except httpx.HTTPError:
                pass

    return _run_windows([streamer, prompter], stop)


HOOK = {"PYTHONPATH": os.pathsep.join([str(STANDINS / "blocked_mlx"), str(REPO)]), "BLOCK_GENERATION_AFTER": "1"}
OMLX = [PYTHON, str(STANDINS / "openai_engine.py"), "--port", "{port}", "--tps", "20", "--metrics", "omlx"]

# name: (fault?, config(gw), action)
SCENARIOS: dict[str, tuple[bool, Callable[[int], str], Callable[[Daemon, int], tuple[float, float]]]] = {
    "sigstop": (True, lambda gw: _mlx("e", gw), fault_sigstop),
    "sigkill": (True, lambda gw: _mlx("e", gw), fault_sigkill),
    "silent_before_first_token": (True, lambda gw: _standin("e", gw, "--tps", "50", "--silent-from", "2"),
                                  fault_silent_before_first_token),
    "silent_mid_stream": (True, lambda gw: _standin("e", gw, "--tps", "50", "--silent-from", "2",
                                                    "--silent-after-tokens", "10"), fault_silent_mid_stream),
    "dead_generation_thread": (True, lambda gw: _mlx(
        "e", gw, canary_interval="2s",
        extra="env = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in HOOK.items()) + " }\n"),
        fault_dead_generation_thread),
    "slowdown": (True, lambda gw: _mlx("e", gw, canary_interval="1s", canary_max_tokens=200, stall="10s",
                                       degraded='[policies.degraded]\nwindow = "3s"\nwindows = 2\nshare = 0.6\n'),
                 fault_slowdown),
    "slow_reader": (False, lambda gw: _mlx("e", gw), benign_slow_reader),
    "paused_client": (False, lambda gw: _mlx("e", gw), benign_paused_client),
    "long_generation_completion_counters": (False, lambda gw: (
        "[[engine]]\nname = \"e\"\nkind = \"omlx\"\nmodel = \"standin\"\n" f"port = {free_port()}\n"
        "command = [" + ", ".join(json.dumps(a) for a in OMLX) + "]\n"
        f'footprint = "100MB"\nstop_grace = "5s"\nstall = "{STALL_S:g}s"\ncanary_interval = "10m"\ndefault = true\n'
        + _gateway(gw) + '[probes]\ninterval = "1s"\n'), benign_long_generation_completion_counters),
    "long_prefill": (False, lambda gw: _standin("e", gw, "--keepalive-s", str(3 * STALL_S)), benign_long_prefill),
    "lazy_load": (False, lambda gw: _standin("e", gw, "--ollama", "--lazy-load-s", str(3 * STALL_S),
                                             "--keep-alive-s", "2", kind="ollama", model="tiny:1b",
                                             canary_interval="3s"), benign_lazy_load),
    "burst_64": (False, lambda gw: _mlx("e", gw), benign_burst_64),
    "vllm_long_prefill": (False, lambda gw: _standin("e", gw, "--metrics", "vllm", "--prefill-tokens-per-s", "500",
                                                     kind="vllm", model="standin"), benign_vllm_long_prefill),
    # the default share and windows, on 3 s windows
    "load_after_lone_baseline": (False, lambda gw: _mlx(
        "e", gw, canary_interval="1s", canary_max_tokens=200, stall="10s",
        degraded='[policies.degraded]\nwindow = "3s"\nwindows = 3\nshare = 0.5\n'), benign_load_after_lone_baseline),
    # long prompts grow the engine's prompt cache: a footprint that holds them
    "long_prompts_beside_streams": (False, lambda gw: _mlx(
        "e", gw, canary_interval="1s", canary_max_tokens=200, stall="10s", footprint="1GB",
        degraded='[policies.degraded]\nwindow = "3s"\nwindows = 2\nshare = 0.6\n'), benign_long_prompts_beside_streams),
}


def run_scenario(name: str) -> dict[str, Any]:
    fault, make_config, act = SCENARIOS[name]
    gw = free_port()
    d: Daemon | None = None
    try:
        d = Daemon(make_config(gw)).start()
        d.wait_state("e", "ready", 120)
        started = time.time()
        t0, wait_s = act(d, gw)
        verdict = _wait_verdict(d, "e", started, wait_s) if wait_s else None
        verdict = verdict or (_verdicts(d, "e", started) or [None])[0]
        gateway = d.status().get("gateway") or {}
        return {"scenario": name, "fault": fault, "detected": verdict is not None,
                "verdict": verdict and verdict["verdict"], "time_s": verdict and round(verdict["at"] - t0, 2),
                "reason": verdict and verdict["reason"], "evidence": verdict and verdict["evidence"],
                "clients_cut": gateway.get("clients_cut", 0)}
    except Exception as exc:  # a scenario that could not run is reported, not hidden
        return {"scenario": name, "fault": fault, "detected": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if d is not None:
            d.cleanup()


def run(only: list[str] | None = None) -> dict[str, Any]:
    rows = [run_scenario(name) for name in (only or list(SCENARIOS))]
    faults = [r for r in rows if r["fault"]]
    benign = [r for r in rows if not r["fault"]]
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "commit": commit,
        "rows": rows,
        "settings": {"stall_s": STALL_S, "hang_restart_after_s": HANG_RESTART_AFTER_S,
                     "client_timeout_s": CLIENT_TIMEOUT_S},
        "faults_detected": sum(1 for r in faults if r["detected"]),
        "faults": len(faults),
        "benign_verdicts": sum(1 for r in benign if r["detected"]),
        "benign": len(benign),
        "met": all(r["detected"] for r in faults) and not any(r["detected"] for r in benign)
        and not any("error" in r for r in rows),
    }


def render(r: dict[str, Any]) -> str:
    st = r["settings"]
    lines = ["### Fault matrix (hung only on the engine's own evidence)", "",
             f"Fresh daemon per scenario, stall {st['stall_s']:g} s (engine and gateway), hang restart after "
             f"{st['hang_restart_after_s']:g} s, client timeout {st['client_timeout_s']:g} s; commit "
             f"{r.get('commit') or 'unknown'}. Faults on the real "
             "tiny mlx_lm.server where they can be made on it, else on the OpenAI stand-in. Time is from the "
             "fault to the first verdict event.", "",
             "| scenario | kind | expected | verdict | time to verdict | evidence / reason |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        kind = "fault" if row["fault"] else "benign"
        expected = "detected" if row["fault"] else "no verdict"
        if "error" in row:
            lines.append(f"| {row['scenario']} | {kind} | {expected} | could not run | — | `{row['error']}` |")
            continue
        verdict = row["verdict"] or "none"
        t = "—" if row["time_s"] is None else f"{row['time_s']:.2f} s"
        ev = row["evidence"]
        if isinstance(ev, dict) and ev.get("source") == "process":
            why = f"process: {row['reason']}"
        elif isinstance(ev, dict) and ev.get("source"):
            why = f"{ev['source']}, silent {ev.get('silent_s')} s"
        else:
            why = row["reason"] or ""
        if row.get("clients_cut"):
            why = (why + "; " if why else "") + f"{row['clients_cut']} client cut"
        lines.append(f"| {row['scenario']} | {kind} | {expected} | {verdict} | {t} | {why} |")
    lines += ["", "| | detected | no verdict |", "|---|---|---|",
              f"| real faults ({r['faults']}) | {r['faults_detected']} | {r['faults'] - r['faults_detected']} |",
              f"| benign stresses ({r['benign']}) | {r['benign_verdicts']} | {r['benign'] - r['benign_verdicts']} |",
              "", f"Target: every fault detected, no verdict on a benign stress → "
              f"{'**met**' if r['met'] else '**missed**'}.", "",
              "Reproduce: `.venv/bin/python bench/fault_matrix.py`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    args = p.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    unknown = set(only or ()) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario {sorted(unknown)[0]!r}; valid: {', '.join(SCENARIOS)}")
    r = run(only)
    print(render(r))


if __name__ == "__main__":
    main()
