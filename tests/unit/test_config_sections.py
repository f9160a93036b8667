"""[gateway] and [alerts] are read by the config's one table reader: every mistake names file, key and what is valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from supervisord_llm.config import load_config
from supervisord_llm.errors import ConfigError
from supervisord_llm.gateway.settings import GATEWAY_KEYS, GatewaySettings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


@pytest.mark.parametrize(
    ("table", "bad_key", "message"),
    [
        ({"enabled": "yes"}, "gateway.enabled", "expected true or false"),
        ({"listen": 8000}, "gateway.listen", 'HOST:PORT'),
        ({"api_key": ""}, "gateway.api_key", "non-empty string"),
        ({"api_key_env": "EMPTY_KEY"}, "gateway.api_key_env", "is empty"),
        ({"api_key": "k", "api_key_env": "SET_KEY"}, "gateway.api_key", "not both"),
        ({"hold_s": "soon"}, "gateway.hold_s", '"90s"'),
        ({"shutdown_grace_s": True}, "gateway.shutdown_grace_s", "a duration"),
        ({"prefill_stall_s": 0}, "gateway.prefill_stall_s", "greater than 0"),
        ({"client_timeout_s": "0s"}, "gateway.client_timeout_s", "greater than 0"),
        ({"upstream_connect_timeout_s": 0}, "gateway.upstream_connect_timeout_s", "greater than 0"),
        ({"upstream_read_timeout_s": 0}, "gateway.upstream_read_timeout_s", "greater than 0"),
        ({"body_timeout_s": 0}, "gateway.body_timeout_s", "greater than 0"),
        ({"max_body_bytes": 100}, "gateway.max_body_bytes", "at least 1024"),
        ({"client_buffer_bytes": "1KB"}, "gateway.client_buffer_bytes", "at least 4096"),
        ({"prefill_per_mib_s": -1}, "gateway.prefill_per_mib_s", "seconds per MiB"),
        ({"max_upstream_connections": 0}, "gateway.max_upstream_connections", "at least 1"),
        ({"max_connections": 0}, "gateway.max_connections", "at least 1"),
        ({"swaps": "sometimes"}, "gateway.swaps", "'allowed', 'with_key', 'never'"),
        ({"swaps": "with_key"}, "gateway.swaps", '"with_key" needs the gateway to have an api_key'),
        ({"think_tags": "hide"}, "gateway.think_tags", "'text', 'thinking', 'auto'"),
        ({"watch_non_streamed": "yes"}, "gateway.watch_non_streamed", "true or false"),
        ({"listen": "0.0.0.0:8000"}, "gateway.listen", "no API key"),
        ({"hold": "2m"}, "gateway.hold", "valid keys here: enabled, listen"),
    ],
)
def test_each_gateway_mistake_names_its_own_key(table: dict[str, object], bad_key: str, message: str) -> None:
    """A wrong [gateway] value is reported at exactly that key, with what would be valid (never a guessed key)."""
    with pytest.raises(ConfigError) as caught:
        GatewaySettings.from_toml(table, file="/etc/llm.toml", key="gateway",
                                  environ={"EMPTY_KEY": "", "SET_KEY": "k"})
    assert (caught.value.file, caught.value.key) == ("/etc/llm.toml", bad_key)
    assert message in str(caught.value)


def test_a_disabled_gateway_on_any_address_loads_as_off(tmp_path: Path) -> None:
    """enabled = false turns the gateway off, whatever else the table says, as long as the values are valid."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[gateway]\nenabled = false\nlisten = "127.0.0.1:9100"\n')
    assert load_config(path).gateway is None


def test_gateway_api_key_env_is_read_from_the_environment_given_to_the_config(tmp_path: Path) -> None:
    """api_key_env is looked up in the environment the config is loaded with (not only the process's)."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[gateway]\napi_key_env = "GW_TEST_KEY_11C"\n')
    cfg = load_config(path, environ={"GW_TEST_KEY_11C": "s3cret"})
    assert cfg.gateway is not None and cfg.gateway.api_key == "s3cret"


def test_every_gateway_key_is_documented() -> None:
    """Each key the [gateway] reader accepts appears in docs/config.md's [gateway] section."""
    text = DOCS.read_text()
    section = text[text.index("## `[gateway]`"):]
    section = section[:section.index("\n## ", 1)]
    missing = [key for key in GATEWAY_KEYS if not re.search(rf"`{key}\b", section)]
    assert not missing, f"docs/config.md [gateway] does not document {missing}"


@pytest.mark.parametrize(
    ("text", "bad_key", "message"),
    [
        ('[[alerts.webhook]]\nname = "a"\nurl = "https://x/y"\nurl_env = "U"\n', "alerts.webhook[0].url", "not both"),
        ('[[alerts.webhook]]\nname = "a"\nurl_env = "NOT_SET_11C"\n', "alerts.webhook[0].url_env", "is not set"),
        ('[[alerts.webhook]]\nname = "a"\nurl_env = "HOOK_11C"\nsecret_env = 3\n', "alerts.webhook[0].secret_env",
         "name of an environment variable"),
        ("[alerts]\nwebhook = [1]\n", "alerts.webhook[0]", "expected a table"),
        ('[alerts]\nhost = 5\n', "alerts.host", "expected a string"),
        ('[alerts.heartbeat]\nurl = "https://x/y"\nwatchdog_alert = 1\n', "alerts.heartbeat.watchdog_alert",
         "true or false"),
        ('[alerts.heartbeat]\nurl = "https://x/y"\nmethod = "PUT"\n', "alerts.heartbeat.method", "GET, POST"),
    ],
)
def test_each_alerts_mistake_names_file_key_and_what_is_valid(tmp_path: Path, text: str, bad_key: str,
                                                             message: str) -> None:
    """A wrong [alerts] value in a config file is refused at its own key, in the same format as every section."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n' + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"HOOK_11C": "https://hooks.example.com/x"})
    assert (caught.value.file, caught.value.key) == (str(path), bad_key)
    assert message in str(caught.value)


def test_alert_url_env_is_read_from_the_environment_given_to_the_config(tmp_path: Path) -> None:
    """url_env is looked up in the environment the config is loaded with."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[[alerts.webhook]]\nname = "a"\nurl_env = "HOOK_11C"\n')
    cfg = load_config(path, environ={"HOOK_11C": "https://hooks.example.com/x"})
    assert cfg.alerts.targets[0].url == "https://hooks.example.com/x"


def _policy_settings_classes() -> dict[str, type]:
    import dataclasses
    import importlib
    import pkgutil

    import policies

    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(policies.__path__):
        module = importlib.import_module(f"policies.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("Settings") and dataclasses.is_dataclass(value) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_no_config_class_mirrors_a_policy_settings_class() -> None:
    """The config holds the policies' own settings objects; no config class copies their fields one by one."""
    import dataclasses

    import supervisord_llm.config as config

    policy_classes = _policy_settings_classes()
    for name, value in vars(config).items():
        if not (dataclasses.is_dataclass(value) and isinstance(value, type)) or value.__module__ != config.__name__:
            continue
        ours = {f.name for f in dataclasses.fields(value)}
        for policy_name, policy_class in policy_classes.items():
            shared = ours & {f.name for f in dataclasses.fields(policy_class)}
            assert len(shared) < 2, f"config.{name} mirrors {policy_name} (fields {sorted(shared)})"


def test_config_builds_the_policies_settings_objects(tmp_path: Path) -> None:
    """[policies.degraded], [policies.memory_guard] and return_wait arrive as the policies' own settings objects."""
    from policies.health import HealthSettings
    from policies.memory_guard import GuardSettings
    from policies.swap import SwapSettings

    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n'
                    '[policies.degraded]\nshare = 0.3\nwindows = 4\nwindow = "20s"\nrestart_when_idle = true\n'
                    '[policies.memory_guard]\nsoft_factor = 1.2\ndrain_grace = "10s"\n'
                    '[policies.memory]\nreturn_wait = "90s"\n')
    cfg = load_config(path)
    assert cfg.degraded == HealthSettings(window_s=20.0, degraded_share=0.3, degraded_windows=4, restart_when_idle=True)
    assert cfg.memory_guard.guard == GuardSettings(soft_factor=1.2, hard_factor=1.3, drain_grace_s=10.0)
    assert cfg.memory.swap == SwapSettings(memory_wait_s=90.0, poll_interval_s=1.0)


def test_a_zero_return_wait_is_a_config_error(tmp_path: Path) -> None:
    """return_wait = "0s" is refused when the config loads (naming the key), not when the first swap runs."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path}/s"\n[policies.memory]\nreturn_wait = "0s"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "policies.memory.return_wait" and "greater than 0" in str(caught.value)
