"""One executor: every action a policy returns is carried out in executor.py, and nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from policies.actions import Admit, Alert, Drain, EscalateReboot, Noop, Refuse, RunReboot, Stop, WaitUntil
from supervisord_llm.executor import ActionExecutor

RUNTIME = Path(__file__).resolve().parents[2] / "supervisord_llm"
# Actions that only the executor may branch on: nothing else needs to know them but to carry them
# out. Reading an answer is not an effect: Refuse/WaitUntil/Start answers of admission and the
# memory wait, a watchdog's Restart that becomes its HealthVerdict to the engine's supervisor (the
# only writer of its state), the memory guard's Drain bookkeeping of its own episode.
EFFECTS = {"Stop", "EscalateReboot", "RunReboot"}


class Host:
    """The executor's host, recording what it was asked to do."""

    def __init__(self) -> None:
        self.events: Any = None
        self.supervisors: dict[str, Any] = {}
        self.done: list[tuple[str, object]] = []

    def alert(self, alert: Alert) -> None:
        self.done.append(("alert", alert))

    def drain(self, action: Drain) -> bool:
        self.done.append(("drain", action))
        return True

    def announce_reboot(self, action: EscalateReboot) -> bool:
        self.done.append(("announce_reboot", action))
        return True

    def run_reboot(self, action: RunReboot) -> bool:
        self.done.append(("run_reboot", action))
        return True


@pytest.mark.parametrize(
    ("action", "capability"),
    [
        (Alert("memory.stranded", "critical", "245 GB stranded"), "alert"),
        (Drain("e", 30.0, "over its hard watermark"), "drain"),
        (EscalateReboot(300.0, "wired memory stranded"), "announce_reboot"),
        (RunReboot(("sudo", "-n", "shutdown", "-r", "now"), "wired memory stranded"), "run_reboot"),
    ],
)
def test_each_immediate_action_reaches_its_capability(action: object, capability: str) -> None:
    """An alert, a drain and each reboot step are carried out by the host capability named for it."""
    host = Host()
    ActionExecutor(host).apply(action)  # type: ignore[arg-type]
    assert host.done == [(capability, action)]


@pytest.mark.parametrize("action", [WaitUntil(10.0, "grace"), Noop("nothing")])
def test_a_wait_or_nothing_has_no_effect(action: object) -> None:
    """"Decide again later" and "nothing to do" pass through the executor without doing anything."""
    host = Host()
    ActionExecutor(host).apply(action)  # type: ignore[arg-type]
    assert host.done == []


@pytest.mark.parametrize("action", [Admit("e"), Refuse("e", "budget", "no room"), Stop("e", 60.0, "swap")])
def test_answers_and_engine_commands_are_refused_by_apply(action: object) -> None:
    """An answer is not an effect, and a stop needs the awaited path: apply refuses both by name."""
    with pytest.raises(ValueError, match=type(action).__name__):
        ActionExecutor(Host()).apply(action)  # type: ignore[arg-type]


def _effect_checks(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            kinds = node.args[1]
            names = [e.id for e in (kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]) if isinstance(e, ast.Name)]
            found += [f"{path.relative_to(RUNTIME.parent)}:{node.lineno} {n}" for n in names if n in EFFECTS]
    return found


def test_only_the_executor_turns_actions_into_effects() -> None:
    """No runtime module outside executor.py branches on an effect action to carry it out itself."""
    offenders = [hit for path in sorted(RUNTIME.rglob("*.py")) if path.name != "executor.py"
                 for hit in _effect_checks(path)]
    assert not offenders, f"actions carried out outside executor.py: {offenders}"
