"""`llmctl` against a real daemon: a light client (stdlib only), aligned status, followed streams."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time

from tests.helpers import PYTHON, free_port, standin_engine_toml


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follower:
    """An `llmctl ... -f` process whose stdout lines are collected by a thread as they arrive."""

    def __init__(self, d, *args: str) -> None:
        # As from a terminal, where Ctrl-C reaches it: a test run started as a script's background job has
        # SIGINT ignored, and a child would inherit that (Python then never raises KeyboardInterrupt).
        self.proc = subprocess.Popen([PYTHON, "-m", "supervisord_llm.cli", "--socket", str(d.socket), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=d.env,
                                     preexec_fn=_sigint_default)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def read_until(self, predicate, timeout_s: float) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            got.append(line)
            if predicate(line):
                return got
        raise AssertionError(f"no matching line within {timeout_s}s; got {got}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)  # the process is gone, so its stdout is at EOF and the reader ends
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def test_status_table_is_aligned_and_the_client_loads_neither_httpx_nor_rich(daemon_factory) -> None:
    """`llmctl status` prints one aligned row per engine, and starts without importing httpx or rich."""
    d = daemon_factory(standin_engine_toml("alpha", free_port()) + standin_engine_toml("b", free_port(),
                                                                                        autostart=False)).start()
    d.wait_state("alpha", "ready", 30)
    out = subprocess.run([PYTHON, "-X", "importtime", "-m", "supervisord_llm.cli", "--socket", str(d.socket),
                          "status"], capture_output=True, text=True, timeout=60, env=d.env)
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "supervisord_llm" in imported and not {"httpx", "rich", "anyio"} & imported
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("ENGINE"))
    rows = {line.split()[0]: line for line in lines[header + 1:header + 3]}
    assert set(rows) == {"alpha", "b"}
    assert "\x1b[" not in out.stdout  # no colour codes when stdout is not a terminal
    # Every column starts at the same offset in the header and in each row.
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", lines[header])]
    for row in rows.values():
        for col in starts[:6]:  # ENGINE..FOR are never empty
            assert row[col - 2:col] == "  " and row[col] != " ", (lines[header], row)
    assert rows["alpha"].split()[2] == "ready" and rows["b"].split()[2] == "stopped"
    assert any(line.startswith("alerts: 0 pending") for line in lines)


def test_engine_commands_keep_their_exit_codes_and_messages(daemon_factory) -> None:
    """Unknown engine: exit 1 with the daemon's message; stop waits for `stopped`; no daemon: exit 3."""
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    unknown = d.llmctl("stop", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr and unknown.stderr.startswith("llmctl: ")
    stop = d.llmctl("stop", "e")
    assert stop.returncode == 0 and stop.stdout.strip().endswith("e: stopped")
    logs = d.llmctl("logs", "e", "-n", "5")
    assert logs.returncode == 0 and 0 < len(logs.stdout.splitlines()) <= 5
    # -n 0: no line, as `tail -n 0` (with -f: only what comes next).
    for argv in (("logs", "e", "-n", "0"), ("events", "-n", "0")):
        none = d.llmctl(*argv)
        assert (none.returncode, none.stdout) == (0, ""), (argv, none.stdout)
    assert len(d.llmctl("events", "-n", "3").stdout.splitlines()) == 3
    js = json.loads(d.llmctl("status", "--json").stdout)
    assert js["engines"][0]["state"] == "stopped"
    d.stop()
    gone = d.llmctl("events")
    assert gone.returncode == 3 and "no supervisord-llm daemon is running" in gone.stderr


def test_engine_commands_by_an_alias_act_and_report_as_by_the_name(daemon_factory) -> None:
    """An alias works wherever the engine's name does: the command waits for that engine's state and exits 0."""
    d = daemon_factory(standin_engine_toml("e", free_port(), aliases=["gguf"])).start()
    d.wait_state("e", "ready", 30)
    stop = d.llmctl("stop", "gguf")
    assert stop.returncode == 0 and stop.stdout.strip().endswith("e: stopped"), stop
    start = d.llmctl("start", "gguf", "--force")
    assert start.returncode == 0 and start.stdout.strip().endswith("e: ready"), start
    again = d.llmctl("start", "gguf")
    assert again.returncode == 0, again


def test_events_follow_streams_new_events_and_ends_cleanly_when_the_daemon_dies(daemon_factory) -> None:
    """`llmctl events -f --json` prints a new event as it happens; a killed daemon ends it with one line, exit 1."""
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    follower = Follower(d, "events", "-f", "--json", "-n", "1")
    try:
        follower.read_until(lambda line: line.startswith("{"), 30)  # the backlog line: it is connected
        assert d.post("/v1/engines/e/stop").status_code == 200
        lines = follower.read_until(lambda line: '"engine.stopped"' in line, 30)
        assert json.loads(lines[-1])["engine"] == "e"
        d.kill()
        assert follower.proc.wait(30) == 1
        assert follower.proc.stderr is not None
        err = follower.proc.stderr.read()
        assert "closed the connection" in err and "Traceback" not in err
    finally:
        follower.close()


def test_logs_follow_streams_the_engine_output(daemon_factory) -> None:
    """`llmctl logs NAME -f` prints the engine's existing output and keeps following it."""
    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    with open(d.state_dir / "logs" / "e.log", "a") as log:
        log.write("hello from the engine\n")
    follower = Follower(d, "logs", "e", "-f", "-n", "50")
    try:
        follower.read_until(lambda line: "hello from the engine" in line, 30)
        with open(d.state_dir / "logs" / "e.log", "a") as log:
            log.write("a later line\n")
        follower.read_until(lambda line: "a later line" in line, 30)
        follower.proc.send_signal(signal.SIGINT)
        assert follower.proc.wait(30) == 0  # Ctrl-C ends a follow quietly
    finally:
        follower.close()


def test_llmctl_finds_the_daemon_from_a_config_whose_secrets_live_in_the_daemons_environment(daemon_factory) -> None:
    """A webhook URL and the gateway's key kept in the daemon's environment (url_env, api_key_env) are not in an
    operator's shell: `llmctl --config` needs only the config's control socket, so it still reaches the daemon,
    and `check-config` (which checks everything) still names the missing variable."""
    config = (standin_engine_toml("a", free_port())
              + f'[gateway]\nlisten = "127.0.0.1:{free_port()}"\napi_key_env = "TEST_GATEWAY_KEY"\n'
              + '[[alerts.webhook]]\nname = "chat"\nformat = "slack"\nurl_env = "TEST_SLACK_WEBHOOK_URL"\n')
    d = daemon_factory(config, env={"TEST_GATEWAY_KEY": "k-123", "TEST_SLACK_WEBHOOK_URL": "http://127.0.0.1:9/x"})
    d.start()
    d.wait_state("a", "ready", 30)
    shell = {k: v for k, v in d.env.items() if k not in ("TEST_GATEWAY_KEY", "TEST_SLACK_WEBHOOK_URL")}
    done = subprocess.run([PYTHON, "-m", "supervisord_llm.cli", "--config", str(d.config_path), "status"],
                          capture_output=True, text=True, timeout=60, env=shell)
    assert done.returncode == 0 and re.search(r"^a\s+command\s+ready", done.stdout, re.M), (done.stdout, done.stderr)
    checked = subprocess.run([PYTHON, "-m", "supervisord_llm.main", "check-config", "--config", str(d.config_path)],
                             capture_output=True, text=True, timeout=60, env=shell)
    assert checked.returncode == 2 and "TEST_" in checked.stderr, checked.stderr
    # A mistake in the [daemon] table, which llmctl reads, is named (exit 2), not passed over.
    typo = d.config_path.with_name("typo.toml")
    typo.write_text(d.config_path.read_text().replace("[daemon]\n", '[daemon]\nlog_level = "loud"\n', 1))
    done = subprocess.run([PYTHON, "-m", "supervisord_llm.cli", "--config", str(typo), "status"],
                          capture_output=True, text=True, timeout=60, env=shell)
    assert done.returncode == 2 and "daemon.log_level" in done.stderr and "loud" in done.stderr, done.stderr


def test_a_daemon_that_takes_the_request_and_never_answers_is_exit_code_4(tmp_path) -> None:
    """A wedged daemon (its socket accepts, nothing answers) is "timed out", exit code 4 as the README's
    table says, not 1 (refused): a script can tell a stuck daemon from a refusal."""
    import socket

    from tests.helpers import short_tmpdir

    path = short_tmpdir() / "wedged.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(4)
    try:
        code = ("import sys, supervisord_llm.cli as cli; cli.Client.__init__.__defaults__ = (1.0,); "
                f"sys.exit(cli.main(['--socket', {str(path)!r}, 'status']))")
        done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert done.returncode == 4 and "did not answer within" in done.stderr, (done.returncode, done.stderr)


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(daemon_factory) -> None:
    """`llmctl events | head -2`: the reader leaves after two lines; llmctl ends with exit 0 and no traceback.
    So does `llmctl doctor | head -1`."""
    import subprocess
    import sys

    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    for _ in range(3):  # enough events that the output outgrows what `head` reads
        assert d.llmctl("restart", "e", "--force").returncode == 0
    llmctl = subprocess.Popen([sys.executable, "-m", "supervisord_llm.cli", "--socket", str(d.socket), "events",
                               "-n", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert llmctl.stdout is not None
    llmctl.stdout.readline()
    llmctl.stdout.close()  # the reader is gone
    _, stderr = llmctl.communicate(timeout=30)
    assert llmctl.returncode == 0 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr
    # `llmctl doctor | head -1`: a preflight that passed is exit 0 there too (rich's console made it exit 1).
    doctor = subprocess.Popen([sys.executable, "-m", "supervisord_llm.cli", "--config", str(d.config_path), "doctor"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert doctor.stdout is not None
    doctor.stdout.readline()
    doctor.stdout.close()
    _, stderr = doctor.communicate(timeout=60)
    whole = subprocess.run([sys.executable, "-m", "supervisord_llm.cli", "--config", str(d.config_path), "doctor"],
                           capture_output=True, text=True, timeout=60)
    assert whole.returncode == 0, whole.stdout  # it passes: so must its piped run
    assert doctor.returncode == 0 and b"Traceback" not in stderr, (doctor.returncode, stderr)
    # One that finds an error says so piped too (the checks run to their end): exit 1, not the reader's 0.
    broken = d.config_path.with_name("broken.toml")
    broken.write_text(d.config_path.read_text().replace("[[engine]]\n", '[[engine]]\ncwd = "/nonexistent/dir"\n', 1))
    doctor = subprocess.Popen([sys.executable, "-m", "supervisord_llm.cli", "--config", str(broken), "doctor"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert doctor.stdout is not None
    doctor.stdout.readline()
    doctor.stdout.close()
    _, stderr = doctor.communicate(timeout=60)
    assert doctor.returncode == 1 and b"Traceback" not in stderr, (doctor.returncode, stderr)


def test_a_stopped_engine_whose_failure_streak_holds_its_start_says_so_in_status(daemon_factory) -> None:
    """Crashed, then stopped by a person inside its backoff: nothing is scheduled (NEXT is empty), yet
    `llmctl start` is refused for a while; status says for how long and that --force starts it now."""
    import os
    import signal

    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    os.kill(d.wait_state("e", "ready", 30)["pid"], signal.SIGKILL)
    d.wait_state("e", "backoff", 30)
    assert d.llmctl("stop", "e").returncode == 0
    engine = d.engine("e")
    assert engine["state"] == "stopped" and engine["next_start_in_s"] is None, engine
    assert engine["start_allowed_in_s"] is not None and 0 < engine["start_allowed_in_s"] <= 60, engine
    table = d.llmctl("status").stdout
    assert "a start is allowed in" in table and "--force starts it now" in table, table
    refused = d.llmctl("start", "e")
    assert refused.returncode == 1 and "--force" in refused.stderr, refused


def test_status_interval_alone_refreshes_as_watch_does(daemon_factory) -> None:
    """`llmctl status --interval 0.2` refreshes until stopped (the interval was ignored without --watch: one print)."""
    import subprocess
    import sys

    d = daemon_factory(standin_engine_toml("e", free_port())).start()
    d.wait_state("e", "ready", 30)
    proc = subprocess.Popen([sys.executable, "-m", "supervisord_llm.cli", "--socket", str(d.socket), "status",
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=d.env)
    try:
        out, _ = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode != 0 or out.count("ENGINE  KIND") > 1, out  # still running after 4 s: it refreshes
    assert out.count("ENGINE  KIND") >= 3, out


def test_events_shows_the_newest_n_or_all_there_are(daemon_factory) -> None:
    """A young daemon holds fewer events than asked for: all of them are shown. With more than half of -n (a
    daemon with 41 events and the default 50) the tail wrapped around and 9 were shown."""
    d = daemon_factory(standin_engine_toml("a", free_port())).start()
    d.wait_state("a", "ready", 30)
    with d.client() as c:
        held = len(c.get("/v1/events", params={"lines": "1000"}).json()["events"])
    assert held >= 3
    for n in (1, held - 1, held, held + 1, 2 * held - 1, 50):
        shown = d.llmctl("events", "--json", "-n", str(n))
        assert shown.returncode == 0, shown
        assert len(shown.stdout.splitlines()) == min(n, held), (n, held, shown.stdout)
