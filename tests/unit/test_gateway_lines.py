"""The gateway's per-engine lines tell the daemon how many requests each holds (a swap's drain waits
for them: ``policies.swap.drained``)."""

from __future__ import annotations

import anyio
import pytest

from supervisord_llm.gateway.proxy import EngineLines, _LineWaitExpired


def test_a_slot_handed_to_the_next_in_line_never_shows_an_empty_line() -> None:
    told: list[int] = []
    lines = EngineLines(lambda engine, occupied: told.append(occupied))

    async def main() -> None:
        await lines.enter("b", 1, 8, wait_s=10)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(_enter, lines, "b")
            await anyio.sleep(0.05)
            for _ in range(3):
                lines.leave("b")
                await anyio.sleep(0.01)

    anyio.run(main)
    assert told == [1, 2, 3, 2, 1, 0]


async def _enter(lines: EngineLines, engine: str) -> None:
    await lines.enter(engine, 1, 8, wait_s=10)


def test_a_request_that_leaves_the_line_or_waits_too_long_is_no_longer_counted() -> None:
    told: list[int] = []
    lines = EngineLines(lambda engine, occupied: told.append(occupied))

    async def main() -> None:
        await lines.enter("a", 1, 8, wait_s=10)
        with anyio.move_on_after(0.05):  # its client left while it waited
            await lines.enter("a", 1, 8, wait_s=10)
        with pytest.raises(_LineWaitExpired):  # no slot within its wait
            await lines.enter("a", 1, 8, wait_s=0.05)
        lines.leave("a")

    anyio.run(main)
    assert told == [1, 2, 1, 2, 1, 0]
