"""Turn-taking (gateway/turns.py): one decider releases held groups for everyone, and the next
group's swap waits for the released requests to reach their engine, not a fixed time.

The host is a small implementation of ``TurnHost`` that says which engine serves; the daemon's own
wiring is covered by the grouped-swap test in tests/integration/test_front_door_holds.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import anyio.abc
import pytest

from policies.frontdoor import ServeGroup
from supervisord_llm.gateway import turns
from supervisord_llm.gateway.turns import EngineTurns

pytestmark = [pytest.mark.anyio, pytest.mark.long_wait]  # mostly waits: run beside the rest


class Host:
    """Two exclusive engines; ``serving_now`` is what serves; swaps are recorded, not run."""

    def __init__(self, serving: str | None) -> None:
        self.serving_now = serving
        self.swaps: list[str] = []
        self.refused_starts: list[str] = []
        self.decisions = 0
        self.turns: list[str] = []
        self.passes_closed = True  # the gateway holds no pass the daemon has not seen it give up
        self.close_asked = 0
        self.group_changes = 0

    def now(self) -> float:
        return anyio.current_time()

    def engine_names(self) -> list[str]:
        return ["a", "b"]

    def serving(self, engine: str) -> bool:
        return engine == self.serving_now

    def exclusive(self, engine: str) -> bool:
        return True

    def resident(self) -> str | None:
        self.decisions += 1  # asked once per decision
        return self.serving_now

    def unavailable(self, engine: str) -> Exception | None:
        return None

    def start_swap(self, engine: str, *, may_start: bool = True) -> bool | Exception:
        if not may_start:  # (as the daemon: gateway.swaps forbids it for every request waiting)
            self.refused_starts.append(engine)
            return RuntimeError(f"{engine} may not be started for these requests")
        self.swaps.append(engine)
        return True

    def decided(self, action: ServeGroup, **inputs: object) -> None:
        self.turns.append(action.engine)

    def close_passes(self) -> bool:
        self.close_asked += 1
        return self.passes_closed

    def groups_changed(self) -> None:
        self.group_changes += 1


Running = tuple[Host, EngineTurns, anyio.abc.TaskGroup]


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    host = Host(serving="a")
    engine_turns = EngineTurns(host)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine_turns.run)
        yield host, engine_turns, tg
        tg.cancel_scope.cancel()


async def _wait_turn(engine_turns: EngineTurns, engine: str, released: list[str]) -> None:
    """A held request: waits for its engine's turn, then notes that it was released."""
    await engine_turns.wait_turn(engine)
    released.append(engine)


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.01)


async def test_one_decider_serves_every_held_request_without_polling_per_request(running: Running) -> None:
    """200 requests held for 1.5 s cost a handful of decisions, not one per request every 0.25 s,
    and all are released together once their engine serves."""
    host, engine_turns, tg = running
    released: list[str] = []

    for _ in range(200):
        tg.start_soon(_wait_turn, engine_turns, "b", released)
    await _until(lambda: host.swaps == ["b"])
    await anyio.sleep(1.5)
    assert released == [] and host.decisions <= 210  # old: about 200 x 6 while held
    before = host.decisions
    await anyio.sleep(1.0)
    assert host.decisions - before <= 3  # held and nothing changed: the fallback's pace only
    host.serving_now = "b"
    engine_turns.changed()  # the swap finished
    await _until(lambda: len(released) == 200, 2.0)


async def test_the_next_swap_waits_until_released_requests_have_started(running: Running) -> None:
    """a's released group is still on its way to a: b's swap waits for their request_started, then starts at once."""
    host, engine_turns, tg = running
    host.serving_now = None
    released: list[str] = []

    for _ in range(3):
        tg.start_soon(_wait_turn, engine_turns, "a", released)
    await anyio.sleep(0.05)
    tg.start_soon(_wait_turn, engine_turns, "b", released)
    await _until(lambda: host.swaps == ["a"])
    host.serving_now = "a"
    engine_turns.changed()
    await _until(lambda: released == ["a"] * 3)
    await anyio.sleep(0.6)  # more than the old fixed 0.25 s settle time
    assert host.swaps == ["a"], "b's swap must not stop a under requests still on their way"
    for _ in range(2):
        engine_turns.request_started("a")
    await anyio.sleep(0.1)
    assert host.swaps == ["a"]
    engine_turns.request_started("a")
    await _until(lambda: host.swaps == ["a", "b"], 0.5)


async def test_a_swap_waits_until_the_gateway_has_given_up_its_passes(running: Running) -> None:
    """While the gateway may still let requests through to a on its own (its pass not yet given up),
    b's swap does not start, however long; the gateway's confirmation starts it at once. Groups that
    form or end are reported, so the passes can be taken back and given again."""
    host, engine_turns, tg = running
    host.passes_closed = False
    released: list[str] = []

    tg.start_soon(_wait_turn, engine_turns, "b", released)
    await _until(lambda: host.close_asked >= 1)
    assert host.group_changes == 1  # b's group formed: the host takes the passes back
    await anyio.sleep(2.5)  # longer than a lost request is waited for (START_WAIT_MAX_S)
    assert host.swaps == [], "a swap must not stop a while the gateway may still send requests to it"
    host.passes_closed = True
    engine_turns.changed()  # the gateway's confirmation arrived
    await _until(lambda: host.swaps == ["b"], 0.5)
    host.serving_now = "b"
    engine_turns.changed()
    await _until(lambda: released == ["b"])
    assert host.group_changes == 2  # b's group ended: passes may be given again


async def test_a_released_request_that_never_starts_holds_the_next_swap_only_for_a_bounded_time(
        running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request let through whose start is never reported (its client left) stops counting after START_WAIT_MAX_S."""
    monkeypatch.setattr(turns, "START_WAIT_MAX_S", 0.5)
    host, engine_turns, tg = running
    engine_turns.let_through("a")
    tg.start_soon(engine_turns.wait_turn, "b")
    await anyio.sleep(0.3)
    assert host.swaps == []
    await _until(lambda: host.swaps == ["b"], 1.0)


async def test_a_failed_swap_refuses_its_group_with_the_reason(running: Running) -> None:
    """The swap for b's group fails: every held request for b gets that error, not a timeout."""
    host, engine_turns, tg = running
    errors: list[str] = []

    async def wait() -> None:
        try:
            await engine_turns.wait_turn("b")
        except RuntimeError as exc:
            errors.append(str(exc))

    for _ in range(3):
        tg.start_soon(wait)
    await _until(lambda: host.swaps == ["b"])
    engine_turns.swap_failed("b", RuntimeError("b does not fit"))
    await _until(lambda: errors == ["b does not fit"] * 3)
    assert engine_turns.groups == {}



async def test_a_permission_to_start_the_engine_leaves_with_the_request_that_had_it(running: Running) -> None:
    """gateway.swaps: a group whose only request that may start its engine gave up is refused when its turn
    comes, not swapped in for the requests that may not."""
    host, engine_turns, tg = running
    host.passes_closed = False  # hold the turn until both requests are in the group
    outcome: list[str] = []
    scopes: list[anyio.CancelScope] = []

    async def unpermitted() -> None:
        try:
            await engine_turns.wait_turn("b", may_start=False)
            outcome.append("released")
        except RuntimeError:
            outcome.append("refused")

    async def permitted() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await engine_turns.wait_turn("b", may_start=True)

    tg.start_soon(unpermitted)
    tg.start_soon(permitted)
    await _until(lambda: engine_turns.groups.get("b") is not None and engine_turns.groups["b"].requests == 2)
    scopes[0].cancel()  # the client with the key gave up
    await _until(lambda: engine_turns.groups["b"].requests == 1)
    host.passes_closed = True
    engine_turns.changed()
    await _until(lambda: bool(outcome))
    assert outcome == ["refused"] and host.swaps == [] and host.refused_starts == ["b"]
