"""kind = "omlx" under the real daemon, against a stand-in true to oMLX's recorded behaviour (oMLX is macOS-only).

The stand-in (tests/standins/omlx_engine.py) rewrites settings.json when started with the flags
``omlx serve`` saves, knows models only by folder name and wants the key from settings.json on
/v1 and /api/status, as oMLX does; so this proves the adapter's start, canary and /v1/messages
passthrough against those rules end to end.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

from tests.helpers import PYTHON, STANDINS, free_port, short_tmpdir

STANDIN = STANDINS / "omlx_engine.py"
USER_KEY = "sk-users-own-omlx-key"


def _user_home(root: Path) -> Path:
    """An oMLX home as a user has it: their own port, model folders elsewhere and an API key."""
    home = root / "omlx-home"
    home.mkdir()
    settings = {"version": "1.0", "server": {"host": "127.0.0.1", "port": 8000},
                "model": {"model_dirs": ["/Users/me/other-models"]}, "auth": {"api_key": USER_KEY}}
    (home / "settings.json").write_text(json.dumps(settings, indent=2))
    return home


def _model_folder(root: Path) -> Path:
    folder = root / "models" / "Tiny-4bit"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    return folder


def test_standin_rewrites_settings_when_given_flags_like_omlx() -> None:
    """The stand-in reproduces oMLX's rewrite: started with --port it saves settings.json (what the adapter must avoid)."""
    root = short_tmpdir("omlx-")
    home = _user_home(root)
    before = (home / "settings.json").read_text()
    proc = subprocess.Popen([PYTHON, str(STANDIN), "serve", "--port", str(free_port())],
                            env={"OMLX_BASE_PATH": str(home), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        line = proc.stdout.readline().decode() if proc.stdout else ""
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    assert "Saved CLI arguments to settings.json" in line
    assert (home / "settings.json").read_text() != before


def test_omlx_engine_ready_with_its_folder_name_and_key_and_settings_untouched(daemon_factory) -> None:
    """The daemon starts oMLX without touching settings.json, canaries it by folder name with the key from settings.json, and /v1/messages goes through natively with that key."""
    root = short_tmpdir("omlx-")
    home = _user_home(root)
    folder = _model_folder(root)
    settings_before = (home / "settings.json").read_bytes()
    port, gateway_port = free_port(), free_port()
    config = "\n".join([
        "[[engine]]", 'name = "omlx"', 'kind = "omlx"', f'model = "{folder}"', f"port = {port}",
        f'command = ["{PYTHON}", "{STANDIN}", "serve"]', f'env = {{ OMLX_BASE_PATH = "{home}" }}',
        'footprint = "100MB"', 'stop_grace = "5s"', 'start_timeout = "30s"',
        "[gateway]", f'listen = "127.0.0.1:{gateway_port}"', "",
    ])
    daemon = daemon_factory(config).start()
    daemon.wait_state("omlx", "ready", timeout_s=60)

    assert (home / "settings.json").read_bytes() == settings_before
    engine_requests = httpx.get(f"http://127.0.0.1:{port}/standin/requests", timeout=5).json()
    canaries = [r for r in engine_requests if r[1] == "/v1/chat/completions"]
    assert canaries and all(model == "Tiny-4bit" for _, _, model in canaries)

    deadline = time.monotonic() + 10
    while not [e for e in daemon.events() if e["kind"] == "engine.discovered"] and time.monotonic() < deadline:
        time.sleep(0.1)
    discovered = [e for e in daemon.events() if e["kind"] == "engine.discovered"]
    assert discovered and discovered[-1]["engine"] == "omlx" and discovered[-1]["messages_native"] is True

    # The client knows no engine key: the gateway authenticates to oMLX with the one from settings.json.
    reply = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/messages", timeout=30,
                       headers={"x-api-key": "whatever-the-client-has", "anthropic-version": "2023-06-01"},
                       json={"model": "omlx", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["content"][0]["text"] == "omlx: one two three"  # the engine's own answer, not a translation
