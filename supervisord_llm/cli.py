"""``llmctl``: talk to the daemon over its control socket.

Room: interfaces.

Exit codes: 0 ok; 1 the operation failed or was refused; 2 usage or config error; 3 no daemon is
running; 4 the engine did not reach the awaited state in time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from supervisord_llm.convert import format_bytes, format_duration
from supervisord_llm.errors import ConfigError

# Startup time is most of what a command costs, so this module imports only the standard library at
# the top: the control API is spoken with http.client over the Unix socket, the status table is
# plain aligned text, and rich is imported only where a spinner is drawn on a terminal.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_TIMEOUT = 0, 1, 2, 3, 4


def resolve_socket(args: argparse.Namespace) -> Path:
    """--socket, else the config's control socket (--config / $SUPERVISORD_LLM_CONFIG / default if it
    exists), else $SUPERVISORD_LLM_STATE_DIR/control.sock, else the platform state dir's."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    from supervisord_llm.config import control_socket_of, default_state_dir, resolve_config_path

    config_path = resolve_config_path(getattr(args, "config", None))
    if getattr(args, "config", None) or os.environ.get("SUPERVISORD_LLM_CONFIG") or config_path.exists():
        return control_socket_of(config_path)
    state = os.environ.get("SUPERVISORD_LLM_STATE_DIR")
    return (Path(state) if state else default_state_dir()) / "control.sock"


# ---- the control API client -----------------------------------------------------------------

class NoDaemon(Exception):
    def __init__(self, socket_path: Path) -> None:
        super().__init__(f"llmctl: no supervisord-llm daemon is running (nothing answers on {socket_path})")


class StreamBroken(Exception):
    """The daemon went away in the middle of a followed stream."""


class Response:
    """A finished answer: status code and body."""

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the Host header is only a label)."""

    def __init__(self, socket_path: Path, timeout_s: float | None) -> None:
        super().__init__("daemon", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Requests to the daemon's control socket, one connection each (a local connect is cheap)."""

    def __init__(self, socket_path: Path, timeout_s: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s

    def _open(self, method: str, path: str, params: dict[str, str] | None, json_body: Any,
              timeout_s: float | None) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(self.socket_path, timeout_s)
        url = path + ("?" + urlencode(params) if params else "")
        headers = {"Accept": "*/*"}
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
        except OSError as exc:  # no socket file, refused, not a socket: nobody answers there
            conn.close()
            raise NoDaemon(self.socket_path) from exc
        try:
            conn.request(method, url, body=body, headers=headers)
            return conn, conn.getresponse()
        except ConnectionError as exc:  # accepted, then dropped unanswered (the daemon is going away)
            conn.close()
            raise NoDaemon(self.socket_path) from exc
        except BaseException:
            conn.close()
            raise

    def request(self, method: str, path: str, *, params: dict[str, str] | None = None, json: Any = None,
                timeout_s: float | None = None) -> Response:
        """One request, answered in full (``timeout_s``: this call's, else the client's)."""
        conn, response = self._open(method, path, params, json, timeout_s or self.timeout_s)
        try:
            return Response(response.status, response.read())
        finally:
            conn.close()

    @contextmanager
    def stream(self, method: str, path: str, *, params: dict[str, str] | None = None
               ) -> Iterator[http.client.HTTPResponse]:
        """A followed stream's response, without a read timeout (read it as it arrives with read1)."""
        conn, response = self._open(method, path, params, None, None)
        try:
            yield response
        finally:
            conn.close()


def _fail(response: Response) -> int:
    try:
        body = response.json()
        message = body.get("error") or body
    except ValueError:
        message = response.text.strip()
    print(f"llmctl: {message}", file=sys.stderr)
    return EXIT_FAILED


class _QuietSpinner:
    def update(self, text: str) -> None:
        pass


@contextmanager
def _spinner(text: str) -> Iterator[Any]:
    """A rich spinner on stderr when it is a terminal; nothing (and no rich import) otherwise."""
    if not sys.stderr.isatty():
        yield _QuietSpinner()
        return
    from rich.console import Console

    with Console(stderr=True).status(text) as status:
        yield status


# ---- status ---------------------------------------------------------------------------------

STATE_STYLE = {"ready": "32", "degraded": "33", "hung": "1;31", "failed": "1;31",
               "backoff": "35", "starting": "36", "stopping": "36", "stopped": "2"}
COLUMNS = ("ENGINE", "KIND", "STATE", "PID", "PORT", "FOR", "TOK/S (BASE)", "MEMORY", "RESTARTS", "NEXT", "NOTE")


def _use_colour(stream: Any) -> bool:
    return (hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def _engine_row(e: dict[str, Any]) -> list[str]:
    tps = "-" if e.get("tokens_per_s") is None else f"{e['tokens_per_s']:.0f}"
    base = e.get("baseline_tokens_per_s")
    tps += f" ({base:.0f})" if base else ""
    mem = e.get("memory") or {}
    running = e.get("pid") is not None  # a stopped engine's last reading is of a process that is gone
    memory = format_bytes(mem.get("rss_bytes")) if running and mem.get("rss_bytes") else "-"
    if running and mem.get("gpu_bytes"):
        memory += f" / GPU {format_bytes(mem['gpu_bytes'])}"
    nxt = f"in {format_duration(e['next_start_in_s'])}" if e.get("next_start_in_s") is not None else "-"
    note = ""
    if e.get("diagnosis"):
        note = f"{e['diagnosis']['cause']} → {e['diagnosis']['remedy']}"
    elif e.get("state") == "starting" and e.get("start_check"):
        note = e["start_check"]
    elif e.get("state") in ("hung", "degraded", "backoff", "failed", "starting", "stopping"):
        note = e.get("state_reason") or ""
        if e.get("state") == "failed" and e.get("start_allowed_in_s") is not None:
            # First: the note is cut to the column, and this is what a person can do.
            note = f"`llmctl start` in {format_duration(e['start_allowed_in_s'])}, --force now; {note}"
    elif e.get("state") == "stopped" and e.get("state_reason") == "idle":
        note = "unloaded when idle"
    elif e.get("state") == "stopped" and e.get("start_refused"):
        note = f"start refused ({e['start_refused']['reason']}): see below"
    elif e.get("start_allowed_in_s") is not None:
        last_failure = e.get("streak_last_failure") or (e.get("last_exit") or {}).get("reason") or "exited"
        note = (f"a start is allowed in {format_duration(e['start_allowed_in_s'])} (a failure streak: "
                f"{last_failure}); --force starts it now")
    elif e.get("last_canary") and not e["last_canary"].get("ok"):
        note = f"canary: {e['last_canary'].get('error')}"
    return [e["name"], e["engine"], e["state"], str(e.get("pid") or "-"), str(e.get("port")),
            format_duration(e.get("for_s")), tps, memory, str(e.get("restarts", 0)), nxt, note[:90]]


def _guard_line(e: dict[str, Any]) -> str:
    """The memory guard's view of one engine: what it holds now, its peak, its watermarks."""
    mem = e.get("memory") or {}
    if mem.get("soft_bytes") is None and not mem.get("learned_peak_bytes"):
        return ""
    parts = [f"{format_bytes(mem.get('held_bytes'))} now"]
    peak, learned = mem.get("peak_bytes"), mem.get("learned_peak_bytes")
    if peak is not None:
        parts.append(f"peak {format_bytes(peak)}")
    if learned and learned != peak:
        parts.append(f"learned peak {format_bytes(learned)}")
    if mem.get("soft_bytes") is not None:
        parts.append(f"soft {format_bytes(mem['soft_bytes'])}, hard {format_bytes(mem.get('hard_bytes'))}")
    guard = mem.get("guard")
    flag = {"high": "  HIGH", "draining": "  draining for a restart", "off": "  (guard off)"}.get(guard or "", "")
    return f"memory {e['name']}: " + ", ".join(parts) + flag


def render_status(doc: dict[str, Any], *, colour: bool = False) -> str:
    """The status table and summary lines as text: columns aligned, two spaces apart."""
    def paint(text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text

    d = doc["daemon"]
    lines = [paint(f"supervisord-llm {d['version']}  pid {d['pid']}  up {format_duration(d['uptime_s'])}  "
                   f"state {d['state_dir']}", "1")]
    rows = [_engine_row(e) for e in doc["engines"]]
    widths = [max([len(col)] + [len(r[i]) for r in rows]) for i, col in enumerate(COLUMNS)]

    def line(cells: list[str], header: bool = False) -> str:
        out = []
        for i, cell in enumerate(cells):
            padded = cell if i == len(cells) - 1 else cell.ljust(widths[i])
            if header:
                padded = paint(padded, "1")
            elif COLUMNS[i] == "STATE":
                padded = paint(cell, STATE_STYLE.get(cell, "")) + " " * (widths[i] - len(cell))
            out.append(padded)
        return "  ".join(out).rstrip()

    lines.append(line(list(COLUMNS), header=True))
    lines.extend(line(r) for r in rows)
    for e in doc["engines"]:
        guard = _guard_line(e)
        if guard:
            lines.append(paint(guard, "1;31" if "draining" in guard else "33" if "HIGH" in guard else ""))
    for e in doc["engines"]:
        refused = e.get("start_refused") if e.get("state") == "stopped" else None
        if refused:
            # In full (the table's note is cut): the sizes are the point.
            lines.append(paint(f"{e['name']}: start refused ({refused['reason']}): {refused['message']}; the next "
                               f"request or `llmctl start {e['name']}` tries again", "33"))
    mem = doc["system"]["memory"]
    text = f"memory: {format_bytes(mem.get('available_bytes'))} available of {format_bytes(mem.get('total_bytes'))}"
    if mem.get("wired_bytes") is not None:
        text += f"; wired {format_bytes(mem['wired_bytes'])}"
        if mem.get("baseline_wired_bytes") is not None:
            text += f" (baseline {format_bytes(mem['baseline_wired_bytes'])})"
        if mem.get("stranded_bytes"):
            text += f"; STRANDED {format_bytes(mem['stranded_bytes'])}"
    if mem.get("error"):
        text += f"; probe error: {mem['error']}"
    lines.append(text)
    for gpu in doc["system"].get("gpus") or []:
        lines.append(f"gpu {gpu.get('index')}: {gpu.get('name')} {format_bytes(gpu.get('used_bytes'))} used of "
                     f"{format_bytes(gpu.get('total_bytes'))}")
    a = doc.get("alerts") or {}
    lines.append(f"alerts: {a.get('pending', 0)} pending, {a.get('delivered', 0)} delivered, "
                 f"{a.get('failed', 0)} failed")
    beat = doc.get("heartbeat")
    if beat:
        state = "sending" if beat.get("sending") else f"withheld: {beat.get('reason')}"
        text = f"heartbeat: every {format_duration(beat.get('interval_s'))}, {state} ({beat.get('sent', 0)} sent)"
        lines.append(text if beat.get("sending") is not False else paint(text, "1;31"))
    reboot = doc.get("reboot") or {}
    if reboot.get("state") not in (None, "idle"):
        lines.append(paint(f"reboot: {reboot['state']} at {reboot.get('at')} ({reboot.get('reason')}); "
                           "`llmctl reboot cancel` cancels", "1;31"))
    if doc.get("gateway"):
        g = doc["gateway"]
        lines.append(f"gateway: http://{g['listen']}  in flight {g.get('in_flight', 0)}")
    if doc.get("swap"):
        lines.append(paint(f"swap to {doc['swap']['target']} in progress ({format_duration(doc['swap']['for_s'])})",
                           "36"))
    history = (doc.get("history") or {}).get("engines") or {}
    if history:
        interval_s = doc["history"].get("interval_s") or 10
        span = format_duration(interval_s * SPARK_SAMPLES)
        lines.append(paint(f"tokens/s, last {span} (one mark per {format_duration(interval_s)}):", "2"))
        width = max(len(name) for name in history)
        for name, h in history.items():
            rates = h.get("tokens_per_s") or []
            states = h.get("state") or []
            lines.append(f"  {name.ljust(width)}  {sparkline(rates[-SPARK_SAMPLES:], states[-SPARK_SAMPLES:])}")
    return "\n".join(lines) + "\n"


SPARK_SAMPLES = 60
_BARS = "▁▂▃▄▅▆▇█"
# States with no generation to show get a mark of their own instead of a bar.
_STATE_MARKS = {"hung": "!", "failed": "x", "backoff": "~", "starting": ".", "stopping": ".", "stopped": " "}


def sparkline(rates: list[float | None], states: list[str] | None = None) -> str:
    """One character per sample: a bar scaled to the highest rate, or a mark for a state without one."""
    known = [r for r in rates if r is not None]
    top = max(known) if known else 0.0
    out = []
    for i, rate in enumerate(rates):
        state = states[i] if states and i < len(states) else None
        if state in _STATE_MARKS:
            out.append(_STATE_MARKS[state])
        elif rate is None or top <= 0:
            out.append(" ")
        else:
            out.append(_BARS[min(len(_BARS) - 1, int(rate / top * (len(_BARS) - 1) + 0.5))])
    tail = f"  {known[-1]:.0f} tok/s" if known else ""
    return "".join(out) + tail


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    if args.interval is not None:
        args.watch = True
    else:
        args.interval = 2.0
    colour = _use_colour(sys.stdout)
    first = True
    while True:
        response = client.request("GET", "/v1/status", params={"history": "1"} if args.watch and not args.json else None)
        if response.status_code != 200:
            return _fail(response)
        doc = response.json()
        if args.json:
            text = json.dumps(doc, indent=2) + "\n"
        else:
            text = render_status(doc, colour=colour)
            if args.watch and sys.stdout.isatty():
                # Redraw in place: home, each line cleared to its end, then the rest of the screen.
                text = ("\x1b[2J" if first else "") + "\x1b[H" + text.replace("\n", "\x1b[K\n") + "\x1b[J"
                first = False
        sys.stdout.write(text)
        sys.stdout.flush()
        if not args.watch:
            return EXIT_OK
        time.sleep(args.interval)


# ---- engine operations ----------------------------------------------------------------------

def _wait_state(client: Client, name: str, goal: set[str], timeout_s: float, quiet: bool) -> int:
    """Poll status, showing progress, until the engine reaches a goal state (or a dead end).

    Waiting for ready, ``stopped`` is a dead end too: the daemon answers a start once the engine is
    starting, so stopped here means this start ended there (memory admission refused it, or a stop
    overtook it), and its reason says why.
    """
    dead_ends = {"failed", "backoff"} - goal
    if "ready" in goal:
        dead_ends.add("stopped")
    deadline = time.monotonic() + timeout_s
    with _spinner(f"{name} ...") as spinner:
        while time.monotonic() < deadline:
            doc = client.request("GET", "/v1/status").json()
            engine = next((e for e in doc["engines"] if e["name"] == name), None)
            if engine is None:
                print(f"llmctl: no engine named {name!r} in the daemon's status any more", file=sys.stderr)
                return EXIT_FAILED
            state = engine["state"]
            spinner.update(f"{name}: {state} for {format_duration(engine.get('for_s'))} "
                           f"{engine.get('state_reason') or ''}")
            if state in goal:
                if not quiet:
                    print(f"{name}: {state}")
                return EXIT_OK
            if state in dead_ends:
                reason = engine.get("state_reason") or ""
                diag = engine.get("diagnosis")
                print(f"llmctl: {name} is {state}: {reason}", file=sys.stderr)
                if diag:
                    print(f"  cause: {diag['cause']}\n  remedy: {diag['remedy']}", file=sys.stderr)
                return EXIT_FAILED
            time.sleep(0.3)
    print(f"llmctl: {name} did not reach {'/'.join(sorted(goal))} within {timeout_s:.0f}s", file=sys.stderr)
    return EXIT_TIMEOUT


def _path_part(name: str) -> str:
    """An engine's name or alias as one segment of a control path: an alias may hold '/', spaces or any letter
    (``Qwen/Qwen3-8B``), which the daemon reads back decoded."""
    return quote(name, safe="")


def cmd_engine(client: Client, args: argparse.Namespace) -> int:
    body = {"force": bool(getattr(args, "force", False))}
    response = client.request("POST", f"/v1/engines/{_path_part(args.name)}/{args.op}", json=body)
    if response.status_code != 200:
        return _fail(response)
    doc = response.json()
    print(doc.get("message", "ok"))
    if args.no_wait:
        return EXIT_OK
    goal = {"stopped"} if args.op == "stop" else {"ready", "degraded"}
    # The daemon names the engine it acted on: the one an alias given here stands for.
    engine = doc.get("engine")
    name = engine["name"] if isinstance(engine, dict) and isinstance(engine.get("name"), str) else args.name
    return _wait_state(client, name, goal, args.timeout, quiet=False)


def cmd_switch(client: Client, args: argparse.Namespace) -> int:
    import threading

    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["response"] = client.request("POST", "/v1/switch", json={"name": args.name},
                                                timeout_s=args.timeout)
        except Exception as exc:  # surfaced below
            result["error"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()
    started = time.monotonic()
    with _spinner(f"switching to {args.name} ...") as spinner:
        while t.is_alive():
            t.join(0.5)
            if isinstance(spinner, _QuietSpinner):
                continue  # nobody sees the progress: no status polls
            try:
                doc = Client(client.socket_path).request("GET", "/v1/status").json()
                states = ", ".join(f"{e['name']}={e['state']}" for e in doc["engines"])
                spinner.update(f"switching to {args.name} ({time.monotonic() - started:.0f}s): {states}")
            except Exception:
                pass
    if isinstance(result.get("error"), TimeoutError):
        # The daemon goes on with the switch; only this command stopped waiting for it.
        print(f"llmctl: switching to {args.name} did not finish within {args.timeout:g}s (--timeout); the daemon goes "
              f"on with it: `llmctl status` shows where it is", file=sys.stderr)
        return EXIT_TIMEOUT
    if "error" in result:
        raise result["error"]
    response = result["response"]
    if response.status_code != 200:
        return _fail(response)
    body = response.json()
    print(f"switched to {body['target']} in {body.get('total_s', 0):.1f}s"
          + (f" (stopped {', '.join(body['stopped'])})" if body.get("stopped") else ""))
    return EXIT_OK


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    params = {"lines": str(args.lines), "follow": "1" if args.follow else "0"}
    if not args.follow:
        response = client.request("GET", f"/v1/engines/{_path_part(args.name)}/logs", params=params)
        if response.status_code != 200:
            return _fail(response)
        sys.stdout.write(response.text)
        return EXIT_OK
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    with client.stream("GET", f"/v1/engines/{_path_part(args.name)}/logs", params=params) as stream:
        if stream.status != 200:
            return _fail(Response(stream.status, stream.read()))
        for chunk in _chunks(stream):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
    return EXIT_OK


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    def show(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=args.follow)
            return
        rest = {k: v for k, v in event.items() if k not in ("seq", "at", "kind", "engine")}
        engine = f" [{event['engine']}]" if event.get("engine") else ""
        print(f"{event.get('at')} {event.get('kind')}{engine} {json.dumps(rest, separators=(',', ':'))}",
              flush=args.follow)

    if not args.follow:
        response = client.request("GET", "/v1/events", params={"lines": str(args.lines)})
        if response.status_code != 200:
            return _fail(response)
        for event in response.json()["events"]:
            show(event)
        return EXIT_OK
    with client.stream("GET", "/v1/events", params={"follow": "1", "lines": str(args.lines)}) as stream:
        if stream.status != 200:
            return _fail(Response(stream.status, stream.read()))
        for line in _lines(stream):
            if line.strip():
                show(json.loads(line))
    return EXIT_OK


def _chunks(response: Any) -> Iterator[bytes]:
    """What arrives on a followed stream, as it arrives; ends when the daemon ends the stream."""
    try:
        while chunk := response.read1(65536):
            yield chunk
    except (http.client.IncompleteRead, ConnectionError) as exc:
        raise StreamBroken() from exc


def _lines(response: Any) -> Iterator[bytes]:
    """One line at a time from a followed stream (each event is one line), as soon as it arrives."""
    buffer = b""
    for chunk in _chunks(response):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if buffer:
        yield buffer


def cmd_reboot(client: Client, args: argparse.Namespace) -> int:
    response = client.request("POST", "/v1/reboot/cancel", json={})
    if response.status_code != 200:
        return _fail(response)
    print(response.json().get("message", "ok"))
    return EXIT_OK


def cmd_alerts_test(client: Client, args: argparse.Namespace) -> int:
    response = client.request("POST", "/v1/alerts/test", json={})
    if response.status_code != 200:
        return _fail(response)
    print(response.json().get("message", "ok"))
    return EXIT_OK


def cmd_daemon_restart(client: Client, args: argparse.Namespace) -> int:
    """Restart the daemon in place (an upgrade, a config change that touches no engine): the
    engines keep running and the new daemon adopts them, so no model is reloaded."""
    before = client.request("GET", "/v1/status")
    if before.status_code != 200:
        return _fail(before)
    old = before.json()["daemon"]
    pids_before = {e["name"]: e["pid"] for e in before.json()["engines"] if e.get("pid")}
    running_before = list(pids_before)
    serving_before = [e["name"] for e in before.json()["engines"] if e.get("state") in ("ready", "degraded")]
    asked_s = time.monotonic()
    response = client.request("POST", "/v1/daemon/restart", json={})
    if response.status_code != 200:
        return _fail(response)
    deadline = time.monotonic() + args.timeout
    with _spinner("restarting the daemon"):
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                now = client.request("GET", "/v1/status", timeout_s=5)
            except (NoDaemon, TimeoutError):
                continue
            if now.status_code != 200:
                continue
            body = now.json()
            # The same pid (an exec): a fresh daemon shows another start time (an uptime that went back, from
            # a daemon without one; that missed a restart of a daemon up for less than a second). It answers
            # before it has re-attached its engines, so wait for those that ran before to show again.
            if old.get("started_at") is not None and body["daemon"].get("started_at") is not None:
                restarted = body["daemon"]["started_at"] != old["started_at"]
            else:
                restarted = body["daemon"]["uptime_s"] < old["uptime_s"] + (time.monotonic() - asked_s) - 1.0
            pids = {e["name"]: e.get("pid") for e in body["engines"]}
            states = {e["name"]: e.get("state") for e in body["engines"]}
            # An adopted engine is checked again (starting, a moment): those that served, serving again. An engine
            # the new config no longer has is not waited for.
            reattached = (all(pids.get(name) for name in running_before if name in pids)
                          and all(states[name] in ("ready", "degraded", "hung") for name in serving_before
                                  if name in states and pids.get(name) == pids_before.get(name)))
            if restarted and (reattached or time.monotonic() > deadline - args.timeout / 2):
                running = [e for e in body["engines"] if e.get("pid")]
                # An engine on another pid was started again (its address changed in the config, say): not kept.
                kept = ", ".join(f"{e['name']} {e['state']} (pid {e['pid']})" for e in running
                                 if pids_before.get(e["name"]) == e["pid"])
                started = ", ".join(f"{e['name']} {e['state']} (pid {e['pid']}"
                                    + (f", was {pids_before[e['name']]})" if e["name"] in pids_before else ")")
                                    for e in running if pids_before.get(e["name"]) != e["pid"])
                # One that ran and has no process yet (restarted on its new address through the 60 s floor).
                down = ", ".join(f"{e['name']} {e['state']}" for e in body["engines"]
                                 if e["name"] in pids_before and not e.get("pid"))
                print(f"daemon restarted (pid {body['daemon']['pid']}); engines kept: {kept or 'none'}"
                      + (f"; started: {started}" if started else "") + (f"; not running yet: {down}" if down else ""))
                return EXIT_OK
    print(f"llmctl: the daemon did not answer again within {args.timeout:.0f}s; see its log", file=sys.stderr)
    return EXIT_TIMEOUT


def cmd_metrics(client: Client, args: argparse.Namespace) -> int:
    response = client.request("GET", "/metrics")
    if response.status_code != 200:
        return _fail(response)
    sys.stdout.write(response.text)
    return EXIT_OK


def running_daemon_status(args: argparse.Namespace) -> dict[str, Any] | None:
    """The status of the daemon answering on the socket llmctl would use (the demo's included), or None.

    This is how the local commands (doctor, service install) follow the running daemon's config
    and state dir before falling back to the config search.
    """
    try:
        socket_path = resolve_socket(args)
    except ConfigError:
        state = os.environ.get("SUPERVISORD_LLM_STATE_DIR")
        from supervisord_llm.config import default_state_dir

        socket_path = (Path(state) if state else default_state_dir()) / "control.sock"
    try:
        response = Client(socket_path, timeout_s=5).request("GET", "/v1/status")
    except (NoDaemon, TimeoutError, OSError):
        return None
    if response.status_code != 200:
        return None
    doc = response.json()
    return doc if isinstance(doc, dict) else None


def cmd_doctor(args: argparse.Namespace) -> int:
    from supervisord_llm.config import resolve_config_path
    from supervisord_llm.doctor import run_doctor

    explicit = args.config or os.environ.get("SUPERVISORD_LLM_CONFIG")
    running = running_daemon_status(args)
    # The daemon records its config as resolve_config_path made it (absolute): compare the same form.
    if explicit and running is not None and running.get("daemon", {}).get("config") != str(resolve_config_path(args.config)):
        running = None  # another config was asked for: check it as a config, not as the running one
    return run_doctor(args.config, running)


def cmd_service(args: argparse.Namespace) -> int:
    from supervisord_llm import service
    from supervisord_llm.config import load_config, resolve_config_path

    kind = args.kind or service.default_kind()
    if args.action == "uninstall":
        plan = service.uninstall(kind, args.dry_run)
    else:
        config_path = resolve_config_path(args.config)
        running = None if args.config or config_path.exists() else running_daemon_status(args)
        if running is not None and running.get("daemon", {}).get("config"):
            config_path = Path(running["daemon"]["config"])
        try:
            config = load_config(config_path)
            state_dir, grace = config.daemon.state_dir, max((e.stop_grace_s for e in config.engines), default=60.0)
        except ConfigError as exc:
            print(f"llmctl: {exc}", file=sys.stderr)
            return EXIT_USAGE
        plan = service.install(kind, args.dry_run, config_path=config_path, state_dir=state_dir,
                               max_stop_grace_s=grace)
    if args.action == "install":
        verb = "would write" if args.dry_run else "wrote"
        print(f"{verb} {plan.path}" if plan.content is not None else str(plan.path))
    elif plan.changed or (args.dry_run and plan.path.exists()):
        print(f"{'would remove' if args.dry_run else 'removed'} {plan.path}")
    if plan.content and args.dry_run:
        print(plan.content)
    for note in plan.notes:
        print(f"note: {note}")
    if plan.commands:
        print("then run:")
        for command in plan.commands:
            print("  " + shlex.join(command))
    return EXIT_OK


def _line_count(text: str) -> int:
    """``-n``: how many lines, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of lines (0 or more), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of lines (0 or more), got {text!r}")
    return value


MAX_SECONDS = 366 * 86400  # a year: beyond it a socket's timeout or a sleep overflows


def _seconds(text: str) -> float:
    """A time in seconds, more than 0 and at most a year."""
    wanted = f"expected seconds (a number above 0, at most {MAX_SECONDS}), got {text!r}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(wanted) from None
    if not math.isfinite(value) or value <= 0 or value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(wanted)
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (to find the control socket)")
    common.add_argument("--socket", default=argparse.SUPPRESS, help="control socket path (overrides the config)")
    parser = argparse.ArgumentParser(prog="llmctl", description="Control the supervisord-llm daemon",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("status", help="engines, memory, alerts at a glance")
    p.add_argument("--json", action="store_true", help="machine-readable (schema version 1)")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=_seconds, default=None,
                   help="seconds between refreshes (default 2); given alone, it turns --watch on")
    p.set_defaults(func=cmd_status)

    for op, text in (("start", "start an engine"), ("stop", "stop an engine (SIGTERM, grace, SIGKILL)"),
                     ("restart", "restart an engine")):
        p = sub.add_parser(op, help=text)
        p.add_argument("name")
        if op in ("start", "restart"):
            p.add_argument("--force", action="store_true",
                           help="override the backoff / the 60s spacing between spawns")
        p.add_argument("--no-wait", action="store_true", help="return once the daemon accepted it")
        p.add_argument("--timeout", type=_seconds, default=1800.0, help="seconds to wait for the result")
        p.set_defaults(func=cmd_engine, op=op)

    p = sub.add_parser("switch", help="swap to another engine (stops conflicting ones first)")
    p.add_argument("name")
    p.add_argument("--timeout", type=_seconds, default=3600.0)
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("logs", help="an engine's output")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what the engine writes")
    p.add_argument("-n", "--lines", type=_line_count, default=100,
                   help="how many of the last lines to print first (default 100, at most 10000; 0: none)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("events", help="the daemon's event log")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing events as they happen")
    p.add_argument("-n", "--lines", type=_line_count, default=50,
                   help="how many of the last events to print first (default 50, at most 1000; 0: none)")
    p.add_argument("--json", action="store_true", help="one JSON object per line, as events.jsonl holds them")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("reboot", help="reboot escalation")
    p.add_argument("action", choices=["cancel"])
    p.set_defaults(func=cmd_reboot)

    p = sub.add_parser("alerts", help="alert delivery")
    p.add_argument("action", choices=["test"])
    p.set_defaults(func=cmd_alerts_test)

    p = sub.add_parser("daemon", help="the daemon itself")
    p.add_argument("action", choices=["restart"], help="restart: re-execute the daemon, keeping every engine running")
    p.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to wait for the new daemon (default 60)")
    p.set_defaults(func=cmd_daemon_restart)

    p = sub.add_parser("metrics", help="Prometheus metrics text")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("doctor", help="preflight: config, commands, model files, ports, memory")
    p.set_defaults(func=cmd_doctor, local=True)

    p = sub.add_parser("service", help="install the daemon as a launchd/systemd service")
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    p.add_argument("--kind", choices=["launchd", "systemd"], help="default: this platform's")
    p.set_defaults(func=cmd_service, local=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.socket = getattr(args, "socket", None)
    if getattr(args, "local", False):
        try:
            return int(args.func(args))
        except BrokenPipeError:
            return _reader_gone()
    try:
        socket_path = resolve_socket(args)
    except ConfigError as exc:
        print(f"llmctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    client = Client(socket_path)
    try:
        return int(args.func(client, args))
    except NoDaemon as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_NO_DAEMON
    except StreamBroken:
        print("llmctl: the daemon closed the connection in the middle of the stream", file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError:
        print(f"llmctl: the daemon did not answer within {client.timeout_s:.0f}s (it is running but busy or "
              "stuck; `llmctl status` again, or look at its log)", file=sys.stderr)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """Whatever read llmctl's output went away (``llmctl events | head``): that is the reader's choice, not a
    failure. Python would report the pipe once more when it flushes stdout at exit; it goes nowhere instead."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
