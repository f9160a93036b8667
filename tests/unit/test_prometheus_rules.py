"""The shipped Prometheus alert rules are valid and fire as their unit tests say (promtool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "units" / "prometheus"
PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """`promtool check rules` accepts the file and `promtool test rules` passes every alert case."""
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", "supervisord-llm.rules.yml"], cwd=RULES,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "supervisord-llm.rules.test.yml"], cwd=RULES,
                          capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stdout + test.stderr
