"""llmctl refuses counts and times that mean nothing, naming the argument and what it takes, before it asks the
daemon anything (exit code 2, as for any usage error)."""

from __future__ import annotations

import pytest

from supervisord_llm.cli import build_parser


@pytest.mark.parametrize(("argv", "named"), [
    (["events", "-n", "-5"], "-n/--lines: expected a whole number of lines (0 or more), got '-5'"),
    (["logs", "e", "-n", "ten"], "-n/--lines: expected a whole number of lines (0 or more), got 'ten'"),
    (["start", "e", "--timeout", "0"], "--timeout: expected seconds (a number above 0, at most 31622400), got '0'"),
    (["switch", "e", "--timeout", "nan"], "--timeout: expected seconds (a number above 0, at most 31622400), got 'nan'"),
    # Beyond what a socket's timeout or a sleep takes: an OverflowError traceback after the daemon was asked.
    (["switch", "e", "--timeout", "1e10"], "--timeout: expected seconds (a number above 0, at most 31622400), got '1e10'"),
    (["status", "--interval", "1e10"], "--interval: expected seconds (a number above 0, at most 31622400)"),
])
def test_a_meaningless_count_or_time_is_a_usage_error_naming_it(argv: list[str], named: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_sensible_values_parse() -> None:
    args = build_parser().parse_args(["events", "-n", "0"])
    assert args.lines == 0
    assert build_parser().parse_args(["start", "e", "--timeout", "1.5"]).timeout == 1.5


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_demo_refuses_a_port_no_socket_can_have(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``supervisord-llm demo --gateway-port 0`` started a daemon whose gateway listened on a port nobody knew."""
    from supervisord_llm.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--gateway-port", port])
    assert exit_.value.code == 2
    assert f"--gateway-port: expected a TCP port from 1 to 65535, got '{port}'" in capsys.readouterr().err
