"""The channel between the daemon and its gateway process (gateway/channel.py), on a real socket pair."""

from __future__ import annotations

import socket

import anyio
import pytest

from supervisord_llm.gateway.channel import ChannelClosed, open_channel

pytestmark = pytest.mark.anyio


async def test_lazy_messages_keep_their_order_are_never_lost_and_go_out_on_their_own() -> None:
    """A lazy note goes out with the next message, in the order sent; alone, it goes out shortly;
    on close, whatever is held goes out before the end."""
    ours, theirs = socket.socketpair()
    sender, receiver = await open_channel(ours), await open_channel(theirs)
    sender.send("note", "request_started", lazy=True)
    sender.send("tokens", {"tiny": 1.0}, lazy=True)
    sender.send("acquire", 7, "tiny")
    with anyio.fail_after(5):
        got = [await receiver.receive() for _ in range(3)]
    assert got == [("note", "request_started"), ("tokens", {"tiny": 1.0}), ("acquire", 7, "tiny")]
    sender.send("note", "request_finished", lazy=True)
    with anyio.fail_after(5):
        assert await receiver.receive() == ("note", "request_finished")
    sender.send("note", "last", lazy=True)
    sender.close()
    with anyio.fail_after(5):
        assert await receiver.receive() == ("note", "last")
        with pytest.raises(ChannelClosed):
            await receiver.receive()
    receiver.close()
