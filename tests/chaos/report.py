"""Render the chaos results (``.pytest_cache/chaos-results.json``) into docs/reliability.md.

    .venv/bin/python -m pytest tests/chaos -m "chaos or chaos_full"   # or: make chaos
    .venv/bin/python -m tests.chaos.report
"""

from __future__ import annotations

import json
import sys

from tests.chaos.conftest import RESULTS
from tests.helpers import REPO

DOC = REPO / "docs" / "reliability.md"
START, END = "<!-- chaos:start -->", "<!-- chaos:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: dict[str, dict], run: dict) -> str:
    rows = ["| scenario | suite | expected | observed | data lost | result |", "|---|---|---|---|---|---|"]
    for entry in sorted(results.values(), key=lambda e: (e["suite"], e["test"])):
        rows.append(f"| {_cell(entry['scenario'] or entry['test'])} | {entry['suite']} | {_cell(entry['expected'])} | "
                    f"{_cell(entry['observed'])} | {_cell(entry['lost'] or '—')} | {entry['result']} "
                    f"({entry['duration_s']} s) |")
    return (f"One run: {run['at']} on commit `{run['commit']}`, {len(results)} scenarios; rendered from "
            f"`{RESULTS.relative_to(REPO) if RESULTS.is_relative_to(REPO) else RESULTS}` by "
            "`python -m tests.chaos.report`. Only rows that run produced.\n\n" + "\n".join(rows) + "\n")


def main() -> int:
    try:
        doc = json.loads(RESULTS.read_text())
        run, results = doc["run"], doc["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"no chaos results of one run at {RESULTS} ({exc}); run `make chaos` first", file=sys.stderr)
        return 1
    text = DOC.read_text() if DOC.exists() else "# Reliability\n"
    block = f"{START}\n{render(results, run)}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC} ({len(results)} scenarios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
