"""The daemon's secrets stay with the daemon: engines get an environment without the values behind
`url_env`, `secret_env` and `api_key_env`, and secret-looking engine arguments are redacted in the
event log, the daemon's own log, state.json and status."""

from __future__ import annotations

import json
import shlex

import pytest

from supervisord_llm.redact import redact_argv
from tests.helpers import PYTHON, STANDINS, free_port

pytestmark = pytest.mark.slow

WEBHOOK_URL = "http://127.0.0.1:9/hook/T0K3N-in-the-url"
WEBHOOK_SECRET = "whsec-5ecret-value-1"
GATEWAY_KEY = "gw-key-5ecret-value-2"
ARGV_KEY = "sk-argv-5ecret-value-3"
ARGV_TOKEN = "hf_argv5ecretvalue4"


def test_engine_environment_and_records_hold_no_daemon_secret(daemon_factory, tmp_path) -> None:
    """An engine cannot read the daemon's webhook URL/secret or gateway key; its --api-key is shown as ***."""
    env_dump = tmp_path / "engine.env"
    port = free_port()
    script = f"env > {shlex.quote(str(env_dump))}; exec {PYTHON} {STANDINS / 'openai_engine.py'} --port {port}"
    command = ["/bin/sh", "-c", script, "engine", "--api-key", ARGV_KEY, f"--hf-token={ARGV_TOKEN}", "--port", "x"]
    cfg = ("[[engine]]\nname = \"s\"\nkind = \"command\"\n"
           f"port = {port}\nfootprint = \"100MB\"\nstart_timeout = \"30s\"\n"
           f"command = {json.dumps(command)}\nenv = {{ ENGINE_OWN = \"kept\" }}\n"
           f"[gateway]\nlisten = \"127.0.0.1:{free_port()}\"\napi_key_env = \"GW_KEY\"\n"
           "[alerts]\n[[alerts.webhook]]\nname = \"hook\"\nurl_env = \"HOOK_URL\"\nsecret_env = \"HOOK_SECRET\"\n")
    d = daemon_factory(cfg, env={"HOOK_URL": WEBHOOK_URL, "HOOK_SECRET": WEBHOOK_SECRET, "GW_KEY": GATEWAY_KEY,
                                 "UNRELATED_SETTING": "stays"})
    d.start()
    d.wait_state("s", "ready", 30)
    engine_env = env_dump.read_text()
    for secret in (WEBHOOK_URL, WEBHOOK_SECRET, GATEWAY_KEY):
        assert secret not in engine_env, "an engine inherited a daemon secret"
    assert "ENGINE_OWN=kept" in engine_env and "UNRELATED_SETTING=stays" in engine_env
    assert "SUPERVISORD_LLM_TAG=" in engine_env

    spawned = [e for e in d.events() if e["kind"] == "engine.spawned"]
    assert spawned and "--api-key" in spawned[0]["argv"] and "***" in spawned[0]["argv"]
    status = d.llmctl("status", "--json").stdout
    d.stop()
    places = {"events.jsonl": (d.state_dir / "events.jsonl").read_text(),
              "state.json": (d.state_dir / "state.json").read_text(),
              "daemon log": d.stderr_path.read_text(), "status": status}
    for where, text in places.items():
        for secret in (ARGV_KEY, ARGV_TOKEN, WEBHOOK_SECRET, GATEWAY_KEY):
            assert secret not in text, f"{secret} reached {where}"


@pytest.mark.parametrize(("argv", "expected"), [
    (["srv", "--api-key", "abc123"], ["srv", "--api-key", "***"]),
    (["srv", "--api_key=abc123"], ["srv", "--api_key=***"]),
    (["srv", "--hf-token", "hf_x", "--port", "8000"], ["srv", "--hf-token", "***", "--port", "8000"]),
    (["srv", "--password", "p", "--model", "m"], ["srv", "--password", "***", "--model", "m"]),
    (["srv", "--url", "https://user:pw@host/x"], ["srv", "--url", "https://user:***@host/x"]),
    (["srv", "OPENAI_API_KEY=sk-1"], ["srv", "OPENAI_API_KEY=***"]),
    (["srv", "sk-abcdefghijklmnop"], ["srv", "***"]),
    (["srv", "--max-tokens", "10", "--tokenizer", "t"], ["srv", "--max-tokens", "10", "--tokenizer", "t"]),
])
def test_secret_looking_arguments_are_redacted_and_others_kept(argv, expected) -> None:
    """Keys, tokens, passwords and URL passwords become ***; token counts and tokenizers stay readable."""
    assert redact_argv(argv) == expected
