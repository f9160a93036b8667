"""Policies stay pure: they import no I/O, clock, logging or runtime module; probes import no runtime module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

POLICIES = Path(__file__).resolve().parents[2] / "policies"
FORBIDDEN = {
    "supervisord_llm",
    "logging",
    "structlog",
    "time",
    "datetime",
    "os",
    "subprocess",
    "socket",
    "asyncio",
    "anyio",
    "httpx",
    "psutil",
    "pynvml",
    "threading",
    "pathlib",
    "random",
    "shutil",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.py")), ids=lambda p: p.name)
def test_policy_module_imports_nothing_impure(path: Path) -> None:
    """A policy module never reaches for the clock, the filesystem, logging or the daemon runtime."""
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, (
        f"{path.name} imports {sorted(bad)}; policies take readings and now_s as arguments"
    )


PROBES = POLICIES.parent / "probes"


@pytest.mark.parametrize("path", sorted(PROBES.glob("*.py")), ids=lambda p: p.name)
def test_probe_module_imports_nothing_from_the_runtime(path: Path) -> None:
    """A probe never imports the daemon runtime: sensing depends on nothing that acts."""
    assert "supervisord_llm" not in imported_roots(path), (
        f"probes/{path.name} imports supervisord_llm; probes return readings and import only probes"
    )
