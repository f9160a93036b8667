"""Every decision in policies/ is one the daemon makes: each public policy function has a caller in the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
RUNTIME = ROOT / "supervisord_llm"


def _names_used(tree: ast.AST) -> set[str]:
    """Every name a piece of code refers to: bare names, attributes and imported names."""
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names)
    return used


def policy_functions() -> dict[str, tuple[str, ast.FunctionDef]]:
    """Public module-level functions of the public policy modules: name -> (module, definition)."""
    found: dict[str, tuple[str, ast.FunctionDef]] = {}
    for path in sorted(POLICIES.glob("*.py")):
        if path.name.startswith("_"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                found[node.name] = (path.stem, node)
    return found


def uncalled(runtime_names: set[str], functions: dict[str, tuple[str, ast.FunctionDef]]) -> list[str]:
    """Policy functions neither the runtime nor a policy function the runtime reaches refers to."""
    all_defs = {
        node.name: node
        for path in POLICIES.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef)
    }
    reached = {name for name in all_defs if name in runtime_names}
    frontier = list(reached)
    while frontier:
        for name in _names_used(all_defs[frontier.pop()]):
            if name in all_defs and name not in reached:
                reached.add(name)
                frontier.append(name)
    return sorted(f"policies.{module}.{name}" for name, (module, _) in functions.items() if name not in reached)


def test_every_policy_function_has_a_caller_in_the_runtime() -> None:
    """A policy the tests prove is a policy the daemon runs: no public function in policies/ is left uncalled."""
    runtime_names: set[str] = set()
    for path in RUNTIME.rglob("*.py"):
        runtime_names |= _names_used(ast.parse(path.read_text()))
    missing = uncalled(runtime_names, policy_functions())
    assert not missing, f"no caller in supervisord_llm/ for {missing}: wire them into the runtime or delete them"


def test_the_caller_check_notices_an_uncalled_function() -> None:
    """The check itself fails when the runtime stops calling a policy function (it is not vacuous)."""
    functions = policy_functions()
    assert "plan_swap" in functions and "decide_reboot" in functions
    runtime_names = set(functions) - {"plan_swap"}
    assert "policies.swap.plan_swap" in uncalled(runtime_names, functions)
