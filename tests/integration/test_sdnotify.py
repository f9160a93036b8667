"""sd_notify against a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisord_llm.sdnotify import Notifier, watchdog_loop


class NotifySocket:
    """A bound SOCK_DGRAM socket standing where systemd's notify socket would be."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def drain(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        yield s
    finally:
        s.close()


def test_ready_and_status_reach_the_socket(notify_socket: NotifySocket) -> None:
    """READY=1 with a STATUS, then a STATUS update and STOPPING=1 arrive as systemd expects them."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready("control API up; loading qwen")
    assert notifier.status("2 engines ready")
    assert notifier.stopping()
    assert notify_socket.drain() == ["READY=1\nSTATUS=control API up; loading qwen", "STATUS=2 engines ready",
                                     "STOPPING=1"]
    notifier.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets exist on Linux only")
def test_abstract_socket_names_work() -> None:
    """An abstract NOTIFY_SOCKET ("@name", as systemd passes it in containers) is reached too."""
    receiver = NotifySocket(f"@supervisord-llm-test-{uuid.uuid4().hex}")
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.address})
        assert notifier.watchdog()
        assert receiver.drain() == ["WATCHDOG=1"]
        notifier.close()
    finally:
        receiver.close()


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    """Under launchd or in a terminal (no NOTIFY_SOCKET) the calls do nothing and raise nothing."""
    notifier = Notifier.from_env({"WATCHDOG_USEC": "60000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert notifier.ready() is False and notifier.watchdog() is False and notifier.status("x") is False


def test_a_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    """If systemd's socket is gone, a notify returns False instead of crashing the daemon."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False
    notifier.close()


def test_environment_is_read_then_removed_for_children() -> None:
    """The watchdog interval is half of WATCHDOG_USEC, and the variables are removed so engines do not inherit them."""
    env = {"NOTIFY_SOCKET": "/run/user/1000/systemd/notify", "WATCHDOG_USEC": "60000000",
           "WATCHDOG_PID": str(os.getpid()), "HOME": "/home/you"}
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval_s == 30.0
    assert env == {"HOME": "/home/you"}
    kept = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10"}
    Notifier.from_env(kept, unset_environment=False)
    assert "NOTIFY_SOCKET" in kept


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    """A WATCHDOG_PID naming another process (we were started by a wrapper) disables our pings."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "60000000",
                                  "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.enabled and notifier.watchdog_interval_s is None


def test_multiline_values_are_refused() -> None:
    """A STATUS with a newline would forge another field; it is refused."""
    notifier = Notifier("/run/x")
    with pytest.raises(ValueError, match="one line"):
        notifier.status("ok\nREADY=1")


@pytest.mark.anyio
async def test_watchdog_pings_only_while_the_loop_is_healthy(notify_socket: NotifySocket) -> None:
    """WATCHDOG=1 is sent at the interval while healthy, stops when the loop is unhealthy, and resumes after."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval_s == 0.05
    healthy = True

    async def pings_within(seconds: float) -> int:
        await anyio.sleep(seconds)
        return notify_socket.drain().count("WATCHDOG=1")

    async with anyio.create_task_group() as tg:
        tg.start_soon(watchdog_loop, notifier, lambda: healthy)
        assert await pings_within(0.5) >= 3
        healthy = False
        await pings_within(0.1)  # a ping decided just before the switch may still arrive
        assert await pings_within(0.5) == 0
        healthy = True
        assert await pings_within(0.5) >= 3
        tg.cancel_scope.cancel()
    notifier.close()


@pytest.mark.anyio
async def test_watchdog_loop_returns_when_no_watchdog_is_configured(notify_socket: NotifySocket) -> None:
    """Without WatchdogSec the loop ends at once instead of sleeping forever or pinging."""
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    with anyio.fail_after(5):
        await watchdog_loop(notifier, lambda: True)
    assert notify_socket.drain() == []
    notifier.close()
