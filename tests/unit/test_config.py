"""Config validation: every bad config is refused with a message naming file, key and what is valid."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from supervisord_llm.config import load_config
from supervisord_llm.errors import ConfigError
from tests.helpers import free_port

GOOD_ENGINE = '[[engine]]\nname = "a"\nkind = "mlx_lm"\nmodel = "/models/a"\nport = 8081\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    """A one-engine config loads; durations, sizes and defaults come out in seconds and bytes."""
    cfg = load_config(write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\n' + GOOD_ENGINE +
                            'footprint = "120GB"\nstart_timeout = "20m"\nexclusive = true\n'))
    e = cfg.engines[0]
    assert (e.name, e.kind, e.port, e.footprint_bytes, e.start_timeout_s, e.stop_grace_s, e.exclusive) == \
        ("a", "mlx_lm", 8081, 120 * 10**9, 1200.0, 60.0, True)
    assert cfg.daemon.control_socket == tmp_path / "s" / "control.sock"
    assert cfg.restart.min_interval_s == 60.0


@pytest.mark.parametrize(("host", "url"), [("127.0.0.1", "http://127.0.0.1:8081"), ("0.0.0.0", "http://127.0.0.1:8081"),
                                           ("::", "http://[::1]:8081"), ("::1", "http://[::1]:8081"),
                                           ("localhost", "http://localhost:8081")])
def test_an_engine_is_reached_at_a_url_its_host_makes(tmp_path: Path, host: str, url: str) -> None:
    """An engine listening on an IPv6 address is reached at a URL with the address in brackets (the
    daemon's probes and the gateway): "http://::1:8081" is no URL."""
    cfg = load_config(write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\n' + GOOD_ENGINE
                            + f'footprint = "1GB"\nhost = "{host}"\n'))
    assert cfg.engines[0].base_url == url


def test_state_dir_resolution_uses_environment(tmp_path: Path) -> None:
    """Without [daemon] state_dir, $SUPERVISORD_LLM_STATE_DIR is used."""
    cfg = load_config(write(tmp_path, GOOD_ENGINE + 'footprint = "1GB"\n'),
                      environ={"SUPERVISORD_LLM_STATE_DIR": str(tmp_path / "x")})
    assert cfg.daemon.state_dir == tmp_path / "x"


def test_relative_state_dir_and_socket_are_read_from_the_config_files_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon (working directory: launchd's or systemd's) and llmctl (any shell's) find the same socket."""
    from supervisord_llm.config import control_socket_of

    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "config.toml"
    path.write_text('[daemon]\nstate_dir = "state"\ncontrol_socket = "run/ctl.sock"\n' + GOOD_ENGINE + 'footprint = "1GB"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.daemon.state_dir == conf_dir / "state"
    assert cfg.daemon.control_socket == conf_dir / "run" / "ctl.sock"
    monkeypatch.chdir("/")
    assert control_socket_of(path) == conf_dir / "run" / "ctl.sock"


def test_a_relative_model_beside_the_config_is_that_one_and_a_model_id_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``model = "models/tiny"`` beside the config was read from the working directory: from `/` (systemd's)
    the engine got a name it looked up on a model hub."""
    conf_dir = tmp_path / "etc"
    (conf_dir / "models" / "tiny").mkdir(parents=True)
    path = conf_dir / "config.toml"
    path.write_text(GOOD_ENGINE.replace('"/models/a"', '"models/tiny"') + 'footprint = "1GB"\ncwd = "work"\n'
                    + GOOD_ENGINE.replace('"a"', '"b"').replace('"/models/a"', '"mlx-community/Qwen3-8B-4bit"')
                    .replace("8081", "8082") + 'footprint = "1GB"\n')
    monkeypatch.chdir("/")
    cfg = load_config(path)
    assert cfg.engines[0].model == str(conf_dir / "models" / "tiny")
    assert cfg.engines[0].cwd == str(conf_dir / "work")
    assert cfg.engines[1].model == "mlx-community/Qwen3-8B-4bit"  # no such path: an id the engine resolves
    assert cfg.engines[0].model_as_written == "models/tiny"  # clients may still name the model so


def test_config_path_resolution_uses_environment(tmp_path: Path) -> None:
    """Without --config, $SUPERVISORD_LLM_CONFIG names the file."""
    path = write(tmp_path, GOOD_ENGINE + 'footprint = "1GB"\n')
    assert load_config(None, environ={"SUPERVISORD_LLM_CONFIG": str(path)}).file == str(path)


BAD = [
    ("invalid TOML", "[[engine]\nname=", "invalid TOML"),
    ("wrong type for port", GOOD_ENGINE.replace("port = 8081", 'port = "eighty"'), "engine[0].port: expected an integer"),
    ("unknown kind", GOOD_ENGINE.replace('"mlx_lm"', '"tensorflow"'), "engine[0].kind: 'tensorflow' is not valid; expected one of: mlx_lm, omlx, vllm, llama_cpp, ollama, sglang, command"),
    ("negative duration", GOOD_ENGINE + 'stop_grace = "-5s"\n', "engine[0].stop_grace: a duration cannot be negative, got '-5s'; expected a duration such as"),
    ("bad size", GOOD_ENGINE + 'footprint = "12 parsecs"\n', "engine[0].footprint: unknown size unit 'parsecs'"),
    ("duplicate names", GOOD_ENGINE + GOOD_ENGINE.replace("8081", "8082"), "duplicate engine name or alias 'a'"),
    ("missing model", '[[engine]]\nname = "a"\nkind = "vllm"\n', "engine[0].model: is required for kind 'vllm'"),
    ("missing command", '[[engine]]\nname = "a"\nkind = "command"\n', "engine[0].command: is required for kind \"command\""),
    ("port out of range", GOOD_ENGINE.replace("8081", "70000"), "engine[0].port: must be at most 65535"),
    ("unknown key", GOOD_ENGINE + "gpus = 2\n", "engine[0].gpus: unknown key 'gpus'; valid keys here:"),
    ("restart faster than 60s", GOOD_ENGINE + '[policies.restart]\nmin_interval = "10s"\n', "policies.restart.min_interval: must be at least 60s (two automatic spawns closer than 60s turn a Metal OOM into a crash loop"),
    ("reboot argv as a shell string", '[policies.reboot]\nargv = "sudo reboot"\n', "policies.reboot.argv: must be a list of strings (it runs without a shell)"),
    ("shared port", GOOD_ENGINE + GOOD_ENGINE.replace('"a"', '"b"'), "engine[1].port: port 8081 is already used by engine 'a'"),
    ("memory_hard at the footprint", GOOD_ENGINE + 'footprint = "100GB"\nmemory_hard = "100GB"\n',
     "engine[0].memory_hard: must be above the engine's footprint (100.0 GB), got 100.0 GB: at its normal size the "
     'engine would be drained and restarted; e.g. memory_hard = "130GB"'),
    ("shared port, localhost", GOOD_ENGINE + GOOD_ENGINE.replace('"a"', '"b"') + 'host = "localhost"\n',
     "engine[1].port: port 8081 is already used by engine 'a' (127.0.0.1:8081)"),
    ("shared port, wildcard", GOOD_ENGINE + GOOD_ENGINE.replace('"a"', '"b"') + 'host = "0.0.0.0"\n',
     "engine[1].port: port 8081 is already used by engine 'a' (127.0.0.1:8081)"),
    ("two defaults", GOOD_ENGINE + "default = true\n" + GOOD_ENGINE.replace('"a"', '"b"').replace("8081", "8082") + "default = true\n", "more than one engine is marked default (a, b)"),
    ("bad engine name", GOOD_ENGINE.replace('name = "a"', 'name = "a b/c"'), "engine[0].name: 'a b/c' is not valid"),
    ("engine not a table array", 'engine = "mlx"\n', "engine: expected [[engine]] tables"),
    ("bool as duration", GOOD_ENGINE + "start_timeout = true\n", "engine[0].start_timeout: expected a duration"),
    ("unknown top-level section", "[engines]\n", "engines: unknown key 'engines'"),
    ("omlx flag that rewrites settings.json", '[[engine]]\nname = "o"\nkind = "omlx"\nmodel = "/m/Qwen3-4bit"\nargs = ["--port=9000"]\n',
     "engine[0].args: --port makes `omlx serve` rewrite the user's settings.json"),
    ("alert_on_exit not a bool", GOOD_ENGINE + 'alert_on_exit = "no"\n', "engine[0].alert_on_exit: expected true or false"),
    ("bad min_severity", '[alerts]\n[[alerts.webhook]]\nname = "p"\nurl = "https://x/y"\nmin_severity = "page"\n',
     "alerts.webhook[0].min_severity: expected one of info, warning, critical"),
    ("heartbeat with nothing to send", '[alerts.heartbeat]\ninterval = "1m"\n', "alerts.heartbeat: nothing to send"),
    ("max_backoff below initial_backoff", '[policies.restart]\ninitial_backoff = "10m"\nmax_backoff = "5m"\n',
     "policies.restart.max_backoff: must be at least initial_backoff (600s), got 300s"),
    ("reboot cooldown under an hour", '[policies.reboot]\ncooldown = "20m"\n',
     "policies.reboot.cooldown: must be at least 3600s (a condition that comes back after every boot"),
    ("stranded threshold within idle drift", '[policies.stranded]\nthreshold = "1GB"\n',
     "policies.stranded.threshold: must be above 2GB (idle wired memory drifts by that much), got 1GB"),
    # Values that loaded and then broke every start, or a probe, at run time:
    ("zero memory budget", '[policies.memory]\nbudget = "0"\n',
     'policies.memory.budget: must be above zero, such as "120GB" (or "auto"), got \'0\''),
    ("memory budget below a byte", '[policies.memory]\nbudget = "0.5B"\n', "policies.memory.budget: must be above zero"),
    ("prefill allowance NaN", '[gateway]\nprefill_per_mib_s = nan\n',
     "gateway.prefill_per_mib_s: expected 0 or more seconds per MiB as a number such as 512, got nan"),
    ("prefill allowance infinite", '[gateway]\nprefill_per_mib_s = inf\n', "gateway.prefill_per_mib_s: expected 0 or more"),
    ("engine host no address", GOOD_ENGINE + 'host = "not a host!"\n',
     "engine[0].host: 'not a host!' is not an address or host name; the address the engine listens on, such as "
     "127.0.0.1"),
    ("env name with =", GOOD_ENGINE + 'env = { "A=B" = "x" }\n',
     "engine[0].env: 'A=B' is not an environment variable name: it must be non-empty, without '=' or NUL"),
    ("env value with NUL", GOOD_ENGINE + 'env = { A = "x\\u0000y" }\n', "engine[0].env: the value of A holds a NUL"),
    ("arg with NUL", GOOD_ENGINE + 'args = ["--x", "\\u0000"]\n', "engine[0].args: '\\x00' holds a NUL character"),
    ("a GPU listed twice", GOOD_ENGINE + "gpu_devices = [0, 0]\n",
     "engine[0].gpu_devices: names a GPU more than once: [0, 0]; list each index once"),
]


@pytest.mark.parametrize(("label", "text", "expected"), BAD, ids=[b[0] for b in BAD])
def test_malformed_config_is_refused_precisely(tmp_path: Path, label: str, text: str, expected: str) -> None:
    """Each malformed config names the file, the key and what would be valid."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message, message


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A config path that does not exist is named, with how to give another."""
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file; pass --config PATH"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(tmp_path: Path) -> None:
    """A config the user cannot read is reported as such."""
    path = write(tmp_path, GOOD_ENGINE)
    path.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path)


def test_unreadable_file_is_named_for_root(tmp_path: Path) -> None:
    """A config path that is a directory (unreadable as a file) is reported, not a traceback."""
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.toml: is a directory, expected a TOML file"):
        load_config(tmp_path / "dir.toml")


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    """Binary garbage in the config gets a clear error."""
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_config(path)


def test_daemon_refuses_to_start_on_bad_config(tmp_path: Path) -> None:
    """`supervisord-llm run` with a bad config exits 2 with the precise message, starting nothing."""
    import subprocess
    import sys

    path = write(tmp_path, GOOD_ENGINE.replace('"mlx_lm"', '"tensorflow"'))
    done = subprocess.run([sys.executable, "-m", "supervisord_llm.main", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "engine[0].kind: 'tensorflow' is not valid" in done.stderr


def test_a_memory_soft_above_the_auto_hard_is_no_error_with_the_guard_off(tmp_path: Path) -> None:
    """The watermarks are not used with [policies.memory_guard] enabled = false: a config that loaded before the
    check still does (a daemon restart onto it would otherwise be refused)."""
    cfg = load_config(write(tmp_path, GOOD_ENGINE + 'footprint = "100GB"\nmemory_soft = "150GB"\n'
                            '[policies.memory_guard]\nenabled = false\n'))
    assert cfg.engines[0].memory_soft_bytes == 150 * 10**9


def test_memory_guard_keys_load_and_default(tmp_path: Path) -> None:
    """memory_soft/memory_hard are sizes per engine; [policies.memory_guard] has its factors and grace."""
    cfg = load_config(write(tmp_path, GOOD_ENGINE + 'footprint = "100GB"\nmemory_soft = "110GB"\nmemory_hard = "130GB"\n'
                            '[policies.memory_guard]\nsoft_factor = 1.2\nhard_factor = 1.5\ndrain_grace = "45s"\n'))
    e = cfg.engines[0]
    assert (e.memory_soft_bytes, e.memory_hard_bytes) == (110 * 10**9, 130 * 10**9)
    g = cfg.memory_guard
    assert (g.enabled, g.soft_factor, g.hard_factor, g.drain_grace_s) == (True, 1.2, 1.5, 45.0)
    default = load_config(write(tmp_path, GOOD_ENGINE + 'footprint = "100GB"\n'))
    assert (default.engines[0].memory_soft_bytes, default.engines[0].memory_hard_bytes) == (None, None)
    assert (default.memory_guard.soft_factor, default.memory_guard.hard_factor) == (1.1, 1.3)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('memory_soft = "130GB"\nmemory_hard = "110GB"\n', "engine[0].memory_soft", "must be below memory_hard"),
        # memory_hard "auto" is footprint × hard_factor: a memory_soft above it was lowered to it without a word.
        ('footprint = "100GB"\nmemory_soft = "150GB"\n', "engine[0].memory_soft", "hard_factor 1.3 = 130.0 GB"),
        ('footprint = "100GB"\nmemory_soft = "140GB"\n[policies.memory_guard]\nhard_factor = 1.35\nsoft_factor = 1.1\n',
         "engine[0].memory_soft", "set memory_hard above it"),
        ('memory_hard = "lots"\n', "engine[0].memory_hard", '"auto"'),
        ('[policies.memory_guard]\nsoft_factor = 1.4\n', "policies.memory_guard.soft_factor",
         "must be below hard_factor (1.3)"),
        ('[policies.memory_guard]\nhard_factor = 0.5\n', "policies.memory_guard.hard_factor", "at least 1.0"),
        ('[policies.memory_guard]\nceiling = "1GB"\n', "policies.memory_guard.ceiling",
         "valid keys here: drain_grace, enabled, hard_factor, soft_factor"),
        ('[policies.memory_guard]\nenabled = "yes"\n', "policies.memory_guard.enabled", "true or false"),
    ],
)
def test_memory_guard_keys_are_validated(tmp_path: Path, text: str, key: str, expected: str) -> None:
    """A bad memory guard key is refused naming the file, the key and what would be valid."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD_ENGINE + text))
    message = str(info.value)
    assert str(tmp_path / "config.toml") in message and key in message and expected in message, message


@pytest.mark.parametrize(("metrics", "gateway", "clash"), [
    ("127.0.0.1:9464", 'listen = "127.0.0.1:9464"', True),
    ("0.0.0.0:9464", 'listen = "127.0.0.1:9464"', True),   # the wildcard covers the gateway's address
    ("localhost:9464", 'listen = "127.0.0.1:9464"', True),
    ("127.0.0.2:9464", 'listen = "127.0.0.1:9464"', False),  # same port, another address: both bind
    ("127.0.0.1:9465", 'listen = "127.0.0.1:9464"', False),
    ("127.0.0.1:9464", 'listen = "127.0.0.1:9464"\nenabled = false', False),  # no gateway listens
])
def test_the_gateway_and_metrics_listen_clash_only_where_both_cannot_bind(tmp_path: Path, metrics: str, gateway: str,
                                                                          clash: bool) -> None:
    text = (f'[daemon]\nstate_dir = "{tmp_path}/s"\nmetrics_listen = "{metrics}"\n' + GOOD_ENGINE
            + f'footprint = "1GB"\n[gateway]\n{gateway}\n')
    if clash:
        with pytest.raises(ConfigError, match="same port of the same address"):
            load_config(write(tmp_path, text))
    else:
        load_config(write(tmp_path, text))


# ---- values no reader may let through: NaN, infinity, absurd sizes --------------------------------

NOT_FINITE = [
    ("[policies.restart]\nmin_interval = nan\n", "policies.restart.min_interval", "finite"),
    ("[policies.restart]\ninitial_backoff = nan\n", "policies.restart.initial_backoff", "finite"),
    ("[policies.restart]\nfactor = nan\n", "policies.restart.factor", "from 1 to 10"),
    ("[policies.restart]\nhang_restart_after = nan\n", "policies.restart.hang_restart_after", "finite"),
    ("[policies.degraded]\nshare = nan\n", "policies.degraded.share", "from 0.01 to 0.99"),
    ("[policies.memory_guard]\nsoft_factor = nan\n", "policies.memory_guard.soft_factor", "from 1 to 4"),
    ("[policies.reboot]\ngrace = nan\n", "policies.reboot.grace", "finite"),
    ("[policies.memory]\nadmission_wait = nan\n", "policies.memory.admission_wait", "finite"),
    ("[policies.memory]\nauto_factor = nan\n", "policies.memory.auto_factor", "from 1 to 4"),
    ("[policies.memory]\nauto_factor = inf\n", "policies.memory.auto_factor", "from 1 to 4"),
    ('[gateway]\nhold_s = nan\n', "gateway.hold_s", "finite"),
    ('[gateway]\nhold_s = "1000d"\n', "gateway.hold_s", "at most 365d"),
]


@pytest.mark.parametrize(("section", "key", "expected"), NOT_FINITE, ids=[n[1] + "=" + n[0].split("= ")[1].strip()
                                                                         for n in NOT_FINITE])
def test_nan_and_infinity_are_refused_at_their_key(tmp_path: Path, section: str, key: str, expected: str) -> None:
    """NaN passes every `<` and `>=` check, so each reader refuses it (and infinity) itself, naming the key and
    what is valid, before a settings object sees it (BackoffSettings raised a bare ValueError: a traceback)."""
    path = write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\n' + GOOD_ENGINE + 'footprint = "1GB"\n' + section)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), key), str(info.value)
    assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize(("line", "key", "expected"), [
    ("stop_grace = nan", "engine[0].stop_grace", "finite"),
    ("stop_grace = 1e400", "engine[0].stop_grace", "finite"),  # TOML reads it as infinity
    ("stop_grace = inf", "engine[0].stop_grace", "finite"),
    ("start_timeout = nan", "engine[0].start_timeout", "finite"),
    ("stall = nan", "engine[0].stall", "finite"),
    (f'stall = "{"9" * 400}s"', "engine[0].stall", "finite"),  # digits beyond a float: infinity
    ('footprint = "99999999999999999999999TB"', "engine[0].footprint", "at most 1PB"),
    (f'footprint = "{"9" * 400}TB"', "engine[0].footprint", "at most 1PB"),  # int(inf) raised OverflowError
    ("footprint = 1000000000000000001", "engine[0].footprint", "at most 1PB"),
    ('gpu_footprint = "2000TB"\ngpu_devices = [0]', "engine[0].gpu_footprint", "at most 1PB"),
    ('memory_hard = "5000TB"', "engine[0].memory_hard", "at most 1PB"),
    # A footprint of 0 turned the memory guard off and counted the engine as nothing, without a word.
    ('footprint = "0"', "engine[0].footprint", "must be above zero"),
    ("footprint = 0", "engine[0].footprint", "must be above zero"),
    # Seconds in quotes: the message said "or a number of seconds" of the number it refused.
    ('load_timeout = "0"', "engine[0].load_timeout", "a string needs its unit (0s), a number of seconds is written"),
    ('stall = "30"', "engine[0].stall", "(30s)"),
])
def test_engine_durations_and_sizes_must_be_finite_and_sane(tmp_path: Path, line: str, key: str, expected: str) -> None:
    """An engine's stop_grace = nan (or 1e400) was accepted: every comparison with NaN is false, and an
    infinite grace never ends. A size of 10^35 bytes counted as a footprint."""
    path = write(tmp_path, GOOD_ENGINE + ('' if "footprint" in line else 'footprint = "1GB"\n') + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), key), str(info.value)
    assert expected in str(info.value), str(info.value)


def test_the_largest_sizes_and_durations_are_still_accepted(tmp_path: Path) -> None:
    """The limits are far from any real value: 1PB ("1000TB") and 365d load."""
    cfg = load_config(write(tmp_path, GOOD_ENGINE + 'footprint = "1000TB"\nstop_grace = "365d"\n'))
    assert (cfg.engines[0].footprint_bytes, cfg.engines[0].stop_grace_s) == (10**15, 365 * 86400.0)


def test_check_config_reports_a_nan_as_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    """`check-config` on min_interval = nan printed a Python traceback; it is the key's config error, exit 2."""
    import subprocess
    import sys

    path = write(tmp_path, GOOD_ENGINE + 'footprint = "1GB"\n[policies.restart]\nmin_interval = nan\n')
    done = subprocess.run([sys.executable, "-m", "supervisord_llm.main", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{path}: policies.restart.min_interval: " in done.stderr, done.stderr


def test_a_settings_objects_own_refusal_names_the_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError from a policy's settings object (its last line of defence) becomes the config error of the key
    that set the field it names, never a traceback."""
    import dataclasses

    import supervisord_llm.config as config_module
    from policies.backoff import BackoffSettings

    @dataclasses.dataclass(frozen=True)
    class Stricter(BackoffSettings):
        def __post_init__(self) -> None:
            if self.failure_window_s < 7200:
                raise ValueError(f"backoff failure_window_s must be >= 7200s, got {self.failure_window_s!r}")

    monkeypatch.setattr(config_module, "BackoffSettings", Stricter)
    path = write(tmp_path, GOOD_ENGINE + 'footprint = "1GB"\n[policies.restart]\nfailure_window = "1h"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "policies.restart.failure_window"), str(info.value)
    assert "must be >= 7200s" in str(info.value)


# ---- listeners that cannot both bind ------------------------------------------------------------------

@pytest.mark.parametrize(("metrics", "clash"), [
    ("127.0.0.1:8081", True),
    ("0.0.0.0:8081", True),     # the wildcard covers the engine's address
    ("localhost:8081", True),
    ("127.0.0.2:8081", False),  # same port, another address: both bind
    ("127.0.0.1:8082", False),
])
def test_metrics_listen_on_an_engine_port_is_refused(tmp_path: Path, metrics: str, clash: bool) -> None:
    """metrics_listen on an engine's port was accepted, and the engine then never started (its port held by the
    daemon's metrics server); it is refused as a gateway on an engine's port is."""
    path = write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\nmetrics_listen = "{metrics}"\n' + GOOD_ENGINE
                 + 'footprint = "1GB"\n')
    if not clash:
        load_config(path)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), "daemon.metrics_listen"), str(info.value)
    assert "engine 'a'" in str(info.value) and "8081" in str(info.value)


def test_a_gateway_on_the_wildcard_address_of_an_engine_port_is_refused(tmp_path: Path) -> None:
    """A gateway on 0.0.0.0:P covers an engine's 127.0.0.1:P: they cannot both bind."""
    path = write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\n' + GOOD_ENGINE + 'footprint = "1GB"\n'
                 '[gateway]\nlisten = "0.0.0.0:8081"\napi_key = "k"\n')
    with pytest.raises(ConfigError, match="gateway.listen: the gateway port 8081 is engine 'a'"):
        load_config(path)


# ---- the config path a daemon records ---------------------------------------------------------------

def test_a_relative_config_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --config standin.toml` recorded "standin.toml": doctor and service install, run from another
    directory, then failed with "no such file". The path is absolute from the start (--config and the env)."""
    write(tmp_path, GOOD_ENGINE + 'footprint = "1GB"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config("config.toml").file == str(tmp_path / "config.toml")
    assert load_config(None, environ={"SUPERVISORD_LLM_CONFIG": "./config.toml"}).file == str(tmp_path / "config.toml")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/nope\.toml: no such file"):
        load_config("nope.toml")


# ---- a config with nothing to supervise -----------------------------------------------------------

def test_check_config_warns_about_a_config_without_engines(tmp_path: Path) -> None:
    """A config without [[engine]] loads (the daemon runs with none: its memory watch, reboot escalation and
    alerts work, the gateway answers 404 "no engines are configured"), but check-config says so plainly."""
    import subprocess
    import sys

    path = write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\n')
    done = subprocess.run([sys.executable, "-m", "supervisord_llm.main", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{path}: note: engine: no [[engine]] table" in done.stdout, done.stdout
    assert f"{path}: ok (no engines)" in done.stdout and "0 engine(s): )" not in done.stdout, done.stdout
    assert "gateway" not in done.stdout, done.stdout  # no [gateway] table: no gateway runs to answer anything
    with_gateway = write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/s"\n[gateway]\nlisten = "127.0.0.1:{free_port()}"\n')
    done = subprocess.run([sys.executable, "-m", "supervisord_llm.main", "check-config", "--config", str(with_gateway)],
                          capture_output=True, text=True, timeout=60)
    assert 'the gateway answers every request with 404 "no engines are configured"' in done.stdout, done.stdout


# ---- names and aliases --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key", "expected"), [
    (GOOD_ENGINE + 'aliases = ["a"]\n', "engine[0].aliases", "alias 'a': the engine's own name"),
    (GOOD_ENGINE + 'aliases = ["x", "x"]\n', "engine[0].aliases", "alias 'x': listed twice in aliases"),
    (GOOD_ENGINE + GOOD_ENGINE.replace('"a"', '"b"').replace("8081", "8082") + 'aliases = ["a"]\n',
     "engine[1].aliases", "alias 'a': already the name of engine 'a'"),
    (GOOD_ENGINE + 'aliases = ["b"]\n' + GOOD_ENGINE.replace('"a"', '"b"').replace("8081", "8082"),
     "engine[1].name", "alias 'b': already an alias of engine 'a'"),
    (GOOD_ENGINE + GOOD_ENGINE.replace("8081", "8082"), "engine[1].name", "alias 'a': already the name of engine 'a'"),
])
def test_a_duplicate_name_or_alias_is_reported_where_it_is(tmp_path: Path, text: str, key: str, expected: str) -> None:
    """A clash inside engine[0].aliases was reported at engine[0].name; each is named at the key that holds it."""
    path = write(tmp_path, text.replace("port = 8081\n", 'port = 8081\nfootprint = "1GB"\n')
                 .replace("port = 8082\n", 'port = 8082\nfootprint = "1GB"\n'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.key) == (str(path), key), str(info.value)
    assert f"duplicate engine name or {expected}" in str(info.value), str(info.value)


@pytest.mark.parametrize(("engine", "hold", "noted"), [
    ('preload = false\n', "0", True),
    ('preload = false\n', "120", False),
    ('', "0", False),  # preloaded, not exclusive, never unloaded: nothing waits to be started by a request
    ('idle_unload = "30m"\n', "0", True),
])
def test_hold_s_0_says_that_requests_then_start_no_engine(tmp_path: Path, engine: str, hold: str, noted: bool) -> None:
    """hold_s = 0 ("no request ever waits") also means no request starts a stopped engine: it got a 503 with the
    engine's old reason for ever, and check-config said nothing."""
    from supervisord_llm.config import config_notes

    path = write(tmp_path, GOOD_ENGINE + 'footprint = "1GB"\n' + engine + f'[gateway]\nhold_s = {hold}\n')
    notes = [n for n in config_notes(load_config(path)) if n.startswith("gateway.hold_s")]
    assert bool(notes) is noted, notes
