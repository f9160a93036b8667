"""``supervisord-llm``: run the daemon in the foreground (``run``) or on the embedded default (``demo``)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio

from supervisord_llm import __version__
from supervisord_llm.config import Config, config_notes, default_state_dir, load_config
from supervisord_llm.doctor import restart_refusal
from supervisord_llm.errors import ConfigError, SupervisordLLMError
from supervisord_llm.logsetup import configure_logging


def build_daemon(config: Config, logger: Any) -> Any:
    """Claim the state dir, then build the subsystems and load durable state. Blocking.

    The lock comes first: subsystems open files in the state dir (the alert outbox compacts its
    journal when built), and a second daemon must fail before touching what the first one uses.
    """
    from supervisord_llm.daemon import Daemon
    from supervisord_llm.extensions import install_extensions

    daemon = Daemon(config, logger=logger)
    daemon.claim()
    try:
        install_extensions(daemon)
        daemon.open()
    except BaseException:
        daemon.close()
        raise
    return daemon


# What the service manager gave this process, kept for a re-exec: ``Notifier.from_env`` removes
# them from the environment (engines must not inherit them), but the re-executed daemon is the
# same service process and must keep notifying systemd and feeding its watchdog.
_SERVICE_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_service_env: dict[str, str] = {}

# run_daemon's result when the daemon is to replace itself (SIGHUP, ``llmctl daemon restart``).
RESTART = -1


async def run_daemon(config: Config, logger: Any, *, banner: str | None = None) -> int:
    from supervisord_llm.engine import scopes
    from supervisord_llm.sdnotify import Notifier, watchdog_loop

    daemon = await anyio.to_thread.run_sync(build_daemon, config, logger)
    launcher = await anyio.to_thread.run_sync(scopes.launcher)
    if launcher.enabled or scopes.why_off:
        logger.info("daemon.engine_scopes", enabled=launcher.enabled, user_manager=launcher.user, why_off=scopes.why_off)
    exit_code = 0
    notifier = Notifier.from_env()
    try:
        async with anyio.create_task_group() as tg:
            async def on_signals() -> None:
                nonlocal exit_code
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for signum in signals:
                        logger.info("daemon.signal", signal=signal.Signals(signum).name)
                        if signum == signal.SIGHUP:
                            problem = await anyio.to_thread.run_sync(restart_refusal, config)
                            if problem is not None:
                                # The new daemon would stop at once on its config, leaving the engines to no
                                # one: this one keeps supervising them, and says why.
                                logger.error("daemon.restart_refused", error=problem)
                                daemon.events.emit("daemon.restart_refused", pid=os.getpid(), error=problem)
                                continue
                            # A restart that keeps the models: leave every engine running, write the
                            # state, and exec a fresh daemon in this same process, which adopts them.
                            daemon.events.emit("daemon.restarting", pid=os.getpid(), engines="kept")
                            notifier.notify(RELOADING=1, STATUS="restarting; engines keep running")
                            await daemon.shutdown(stop_engines=False)
                            exit_code = RESTART
                        else:
                            notifier.stopping("stopping engines" if config.daemon.stop_engines_on_exit else None)
                            await daemon.shutdown(stop_engines=config.daemon.stop_engines_on_exit)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signals)

            def status_line() -> str:
                engines = ", ".join(f"{s.name} {s.state}" for s in daemon.supervisors.values())
                return engines or "no engines configured"

            def on_event(event: dict[str, Any]) -> None:
                if event.get("kind") in ("engine.state_changed", "swap.started", "swap.finished", "reboot.announced"):
                    notifier.status(status_line())

            def ready() -> None:
                if banner:
                    print(banner, flush=True)
                notifier.ready(status_line())
                daemon.events.listeners.append(on_event)
                if notifier.watchdog_interval_s:
                    tg.start_soon(lambda: watchdog_loop(notifier, lambda: daemon.healthy_loop))

            await tg.start(lambda task_status: daemon.run(task_status=task_status, ready_callback=ready))
    finally:
        daemon.close()
        notifier.close()
    return exit_code


def _demo_config_text(state_dir: Path, model_dir: Path, engine_port: int, gateway_port: int) -> str:
    return f"""# The embedded default: a tiny random-weight llama served by a real mlx_lm.server.
[daemon]
state_dir = "{state_dir}"

[[engine]]
name = "tiny"                 # what `llmctl` and the gateway's "model" field call it
kind = "mlx_lm"               # runs: python -m mlx_lm.server --model ... --port ...
model = "{model_dir}"
port = {engine_port}
default = true                # requests without a model go here
footprint = "1GB"             # memory admission: what this engine holds while resident
args = ["--prompt-cache-bytes", "256MB"]  # the engine bounds its own KV cache (the memory guard backs it up)
start_timeout = "2m"          # ready only after a real generation succeeded within this time
stop_grace = "20s"            # SIGTERM, then SIGKILL after this long
canary_interval = "30s"       # a tiny real generation when no traffic proved it works

[gateway]
listen = "127.0.0.1:{gateway_port}"   # point OpenAI/Anthropic clients here
"""


def demo(args: argparse.Namespace) -> int:
    # Absolute: the config written below names it, and a relative path in a config is read from the config's
    # own directory (which is this one).
    state_dir = Path(os.environ.get("SUPERVISORD_LLM_STATE_DIR") or default_state_dir()).expanduser().absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    model_dir = state_dir / "models" / "tiny-llama"
    from supervisord_llm.tinymodel import is_complete

    if not is_complete(model_dir):
        print(f"making the tiny model in {model_dir} (once, deterministic, no download) ...", flush=True)
        done = subprocess.run([sys.executable, "-m", "supervisord_llm.tinymodel", str(model_dir)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"supervisord-llm demo: could not make the tiny model:\n{done.stderr.strip()}\n"
                  "install the demo's extra: pip install 'supervisord-llm[mlx]' (make install does)",
                  file=sys.stderr)
            return 1
    config_path = state_dir / "demo.toml"
    config_path.write_text(_demo_config_text(state_dir, model_dir, args.engine_port, args.gateway_port))
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"supervisord-llm: {exc}", file=sys.stderr)
        return 2
    logger = configure_logging(args.log_level, json_logs=False)
    banner = (
        f"\nsupervisord-llm {__version__} demo is up. The engine becomes ready once a real generation works.\n"
        f"  status:   llmctl status            (or: .venv/bin/llmctl status)\n"
        f"  engine:   http://127.0.0.1:{args.engine_port}  (mlx_lm.server, tiny model)\n"
        f"  gateway:  http://127.0.0.1:{args.gateway_port}/v1/chat/completions  (and /v1/messages)\n"
        f"  page:     http://127.0.0.1:{args.gateway_port}/  (the status page)\n"
        f"  config:   {config_path}\n"
        f"  events:   llmctl events -f\n"
        f"Ctrl-C stops the daemon and the engine.\n"
    )
    return _serve(config, logger, banner)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"supervisord-llm: {exc}", file=sys.stderr)
        # Under systemd the reason also shows in `systemctl status` (Status: "…").
        from supervisord_llm.sdnotify import Notifier

        notifier = Notifier.from_env()
        notifier.notify(STATUS=f"config error: {exc}".replace("\n", " "))
        notifier.close()
        return 2
    logger = configure_logging(args.log_level or config.daemon.log_level, json_logs=args.json_logs)
    return _serve(config, logger, None)


def _project_error(exc: BaseException) -> SupervisordLLMError | None:
    """The project's own error inside ``exc`` (task groups wrap errors in exception groups)."""
    if isinstance(exc, SupervisordLLMError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _project_error(inner)
            if found is not None:
                return found
    return None


def _serve(config: Config, logger: Any, banner: str | None) -> int:
    """Run the daemon in the foreground; a known failure (state dir taken, gateway port in use …)
    is one clear line and exit status 1, not a traceback."""
    try:
        code = anyio.run(lambda: run_daemon(config, logger, banner=banner))
        if code == RESTART:
            reexec()
        return code
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        error = _project_error(exc)
        if error is None:
            raise
        print(f"supervisord-llm: {error}", file=sys.stderr)
        return 1


def _port(text: str) -> int:
    """A TCP port, 1-65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text!r}")
    return value


def reexec() -> None:
    """Replace this process with a fresh daemon of the same command line (same pid).

    The pid matters: systemd and launchd keep tracking the service, and the engines' keepers stay
    this process's children, so the new daemon adopts the engines (pid + create time), reads their
    exit status from their keepers and reaps the keepers. The state-dir lock and every socket close on exec (Python opens them
    non-inheritable), so the new daemon takes them again at once.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **_service_env})


def check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"supervisord-llm: {exc}", file=sys.stderr)
        return 2
    names = ", ".join(e.name for e in config.engines)
    print(f"{config.file}: ok ({len(config.engines)} engine(s): {names})" if names else f"{config.file}: ok (no engines)")
    for note in config_notes(config):
        print(f"{config.file}: note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    _service_env.update({k: os.environ[k] for k in _SERVICE_ENV_KEYS if k in os.environ})
    parser = argparse.ArgumentParser(prog="supervisord-llm", description="Supervisor daemon for local LLM servers")
    parser.add_argument("--version", action="version", version=f"supervisord-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the daemon in the foreground (for launchd/systemd)")
    p_run.add_argument("--config", help="config file (default: $SUPERVISORD_LLM_CONFIG, else the platform config dir)")
    p_run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p_run.add_argument("--json-logs", action="store_true", help="log JSON lines (for journald/launchd)")
    p_run.set_defaults(func=run)
    p_demo = sub.add_parser("demo", help="run the daemon on the embedded default (tiny local model)")
    p_demo.add_argument("--engine-port", type=_port, default=8081)
    p_demo.add_argument("--gateway-port", type=_port, default=8000)
    p_demo.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p_demo.set_defaults(func=demo)
    p_check = sub.add_parser("check-config", help="validate a config file and exit")
    p_check.add_argument("--config")
    p_check.set_defaults(func=check)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
