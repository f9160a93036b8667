"""docs/cli.md documents every command, subcommand, option, choice and default the two parsers take.

The parsers are walked as argparse builds them (``llmctl``: ``cli.build_parser``; ``supervisord-llm``:
the parser ``main.main`` builds, caught at ``parse_args``), so a flag added to the code without a line
in the reference fails here, naming the command, the flag and the file.

Each command has a section in docs/cli.md: a heading that names it in backticks (``### `llmctl switch` ``);
the section runs to the next heading of the same or a higher level. Each option of a command has a
table row in its section whose first cell names it, and that row states the option's default (where it
has one other than off/unset); an option the command shares with its program's top-level parser
(``llmctl --config``/``--socket``) may have its row there instead. Choices must appear in the section.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisord_llm import cli
from supervisord_llm import main as main_module

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cli.md"
DOC_NAME = "docs/cli.md"
HELP = {"-h", "--help"}


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


def supervisord_llm_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser ``supervisord-llm`` uses: its builder where main.py has one, else the one main() builds."""
    builder = getattr(main_module, "build_parser", None)
    if builder is not None:
        return builder()

    def caught(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Built(self)

    with monkeypatch.context() as patch:
        patch.setattr(main_module, "_service_env", {})  # main() records the service manager's variables there
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(_Built) as built:
            main_module.main([])
    return built.value.parser


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("llmctl", "daemon")
    parser: argparse.ArgumentParser
    parent: argparse.ArgumentParser | None

    @property
    def name(self) -> str:
        return " ".join(self.path)


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...],
         parent: argparse.ArgumentParser | None = None) -> Iterator[Command]:
    """This command and every subcommand below it, through the parsers' subparser actions."""
    yield Command(path, parser, parent)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name), parser)


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[Command]:
    found = [*walk(supervisord_llm_parser(monkeypatch), ("supervisord-llm",)), *walk(cli.build_parser(), ("llmctl",))]
    assert len(found) > 10, f"walked only {[c.name for c in found]}: the parsers were not found"
    return found


def doc_text() -> str:
    assert DOC.is_file(), f"{DOC_NAME} is missing"
    return DOC.read_text()


def section(text: str, command: str) -> str | None:
    """The text under the first heading naming ``command`` in backticks, to the next heading of its level or higher."""
    lines = text.splitlines()
    heading = re.compile(r"^(#+)\s")
    named = re.compile(r"`" + re.escape(command) + r"[` ]")
    for i, line in enumerate(lines):
        match = heading.match(line)
        if match and named.search(line):
            level = len(match.group(1))
            end = len(lines)
            for j in range(i + 1, len(lines)):
                other = heading.match(lines[j])
                if other and len(other.group(1)) <= level:
                    end = j
                    break
            return "\n".join(lines[i:end])
    return None


def mentions(text: str, word: str) -> bool:
    """``word`` as a whole token: ``--timeout`` not inside ``--timeouts``, ``-n`` not inside ``--no-wait``."""
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


def rows_naming(text: str, flag: str) -> list[str]:
    """The table rows of ``text`` whose first cell names ``flag`` (an option's row: flag, default, meaning)."""
    rows = []
    for line in text.splitlines():
        match = re.match(r"^\|([^|]*)\|", line)
        if match and mentions(match.group(1), flag):
            rows.append(line)
    return rows


def default_text(value: object) -> str | None:
    """How a default is written in the reference, or None where it has nothing to state (off, unset)."""
    if value is None or value is argparse.SUPPRESS or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def own_options(command: Command) -> Iterator[argparse.Action]:
    for action in command.parser._actions:
        if action.option_strings and not set(action.option_strings) <= HELP:
            yield action


def test_every_command_has_a_section(commands: list[Command]) -> None:
    text = doc_text()
    missing = [c.name for c in commands if section(text, c.name) is None]
    assert not missing, (f"{DOC_NAME} has no heading naming these commands in backticks "
                         f"(e.g. ### `{missing[0]}`): {', '.join(missing)}")


def test_every_option_is_documented(commands: list[Command]) -> None:
    text = doc_text()
    missing = []
    for command in commands:
        own = section(text, command.name)
        if own is None:
            continue  # test_every_command_has_a_section names it
        parent_options: set[str] = set()
        parent_text = ""
        if command.parent is not None:
            parent_options = {s for a in command.parent._actions for s in a.option_strings}
            parent_text = section(text, " ".join(command.path[:-1])) or ""
        for action in own_options(command):
            for flag in action.option_strings:
                if rows_naming(own, flag) or (flag in parent_options and rows_naming(parent_text, flag)):
                    continue
                missing.append(f"`{command.name}` {flag}")
    assert not missing, (f"{DOC_NAME} has no table row (first cell) for these options in their command's section: "
                         + "; ".join(missing))


def test_every_choice_is_documented(commands: list[Command]) -> None:
    """Positional actions (``reboot cancel``, ``service install|uninstall``) and option values (``--kind``)."""
    text = doc_text()
    missing = []
    for command in commands:
        own = section(text, command.name)
        if own is None:
            continue
        for action in command.parser._actions:
            if isinstance(action, argparse._SubParsersAction) or not action.choices:
                continue
            what = "/".join(action.option_strings) or action.dest
            missing += [f"`{command.name}` {what} {choice!r}" for choice in action.choices if not mentions(own, str(choice))]
    assert not missing, f"{DOC_NAME} does not name these choices in their command's section: " + "; ".join(missing)


def test_every_default_is_stated(commands: list[Command]) -> None:
    text = doc_text()
    missing = []
    for command in commands:
        own = section(text, command.name)
        if own is None:
            continue
        for action in own_options(command):
            wanted = default_text(action.default)
            if wanted is None:
                continue
            rows = [row for flag in action.option_strings for row in rows_naming(own, flag)]
            if not any(mentions(row, wanted) for row in rows):
                missing.append(f"`{command.name}` {action.option_strings[-1]} (default {wanted})")
    assert not missing, f"{DOC_NAME} does not state these defaults in their options' rows: " + "; ".join(missing)


def test_every_llmctl_exit_code_is_documented() -> None:
    llmctl = section(doc_text(), "llmctl") or ""
    codes = {name: value for name, value in vars(cli).items() if name.startswith("EXIT_") and isinstance(value, int)}
    assert codes, "supervisord_llm.cli defines no EXIT_* codes"
    missing = [f"{name} = {value}" for name, value in sorted(codes.items(), key=lambda kv: kv[1])
               if not re.search(rf"^\| `{value}` \|", llmctl, re.MULTILINE)]
    assert not missing, f"{DOC_NAME}: the llmctl exit-code table has no row for " + ", ".join(missing)
