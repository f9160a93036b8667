"""Serving order when engines take turns: held requests grouped by engine, groups in arrival order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies.frontdoor import (
    HeldGroup,
    gateway_may_pass,
    groups_to_serve,
    holds_for_groups,
    next_group,
    swap_may_start,
)


def test_the_group_whose_first_request_arrived_first_is_served_first() -> None:
    """B's group waited since t=1, A's since t=2: B's turn, all of it, although A is resident."""
    turn = next_group([HeldGroup("a", 2.0, 5), HeldGroup("b", 1.0, 3)], resident="a")
    assert turn is not None and turn.engine == "b"
    assert "3 held request(s) for b" in turn.message and "a (5)" in turn.message


def test_a_tie_goes_to_the_resident_engine_and_empty_groups_do_not_count() -> None:
    """Same arrival: the resident engine needs no swap; a group nobody waits in any more is skipped."""
    assert next_group([HeldGroup("b", 1.0, 1), HeldGroup("a", 1.0, 1)], resident="a").engine == "a"  # type: ignore[union-attr]
    assert next_group([HeldGroup("b", 0.5, 0), HeldGroup("a", 1.0, 2)], resident=None).engine == "a"  # type: ignore[union-attr]
    assert next_group([], resident="a") is None


def test_a_request_waits_when_its_engine_is_not_serving_or_a_conflicting_group_waits() -> None:
    """Straight in only when its engine serves and no group for an engine it cannot share with waits."""
    assert not holds_for_groups("a", serving=True, conflicting_groups=0)
    assert holds_for_groups("a", serving=True, conflicting_groups=1)  # no jumping B's line
    assert holds_for_groups("a", serving=False, conflicting_groups=0)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 100)), min_size=1, max_size=30))
def test_mixed_arrivals_cost_one_turn_per_engine(arrivals: list[tuple[str, float]]) -> None:
    """However A, B and C requests interleave, serving group by group takes each engine's turn once."""
    groups: dict[str, HeldGroup] = {}
    for engine, at_s in arrivals:
        g = groups.get(engine)
        groups[engine] = HeldGroup(engine, min(at_s, g.oldest_s) if g else at_s, (g.requests if g else 0) + 1)
    turns = []
    resident = None
    while groups:
        turn = next_group(list(groups.values()), resident=resident)
        assert turn is not None
        turns.append(turn.engine)
        resident = turn.engine
        del groups[turn.engine]  # a released group leaves whole
    assert len(turns) == len(set(turns)) == len({e for e, _ in arrivals})
    firsts = {e: min(t for x, t in arrivals if x == e) for e, _ in arrivals}
    assert [firsts[e] for e in turns] == sorted(firsts[e] for e in turns)


def test_engines_that_can_share_the_machine_do_not_take_turns() -> None:
    """A budget engine reloading after a crash does not hold back another budget engine's requests."""
    budget = groups_to_serve([HeldGroup("c", 1.0, 4), HeldGroup("d", 2.0, 1)], resident=None)
    assert [t.engine for t in budget] == ["c", "d"]
    # An exclusive engine anywhere ahead in line makes the later ones wait for their turn.
    mixed = groups_to_serve([HeldGroup("a", 1.0, 2, exclusive=True), HeldGroup("c", 2.0, 1), HeldGroup("d", 3.0, 1)],
                            resident=None)
    assert [t.engine for t in mixed] == ["a"]
    behind = groups_to_serve([HeldGroup("c", 1.0, 2), HeldGroup("a", 2.0, 1, exclusive=True), HeldGroup("d", 3.0, 1)],
                             resident=None)
    assert [t.engine for t in behind] == ["c"]


def test_a_swap_waits_for_requests_on_their_way_but_not_for_lost_ones() -> None:
    """The next group's swap starts once nothing let through is still on its way; one that never started within the bound does not count."""
    assert swap_may_start([], max_wait_s=2.0)
    assert not swap_may_start([0.1], max_wait_s=2.0)
    assert not swap_may_start([5.0, 0.1], max_wait_s=2.0)
    assert swap_may_start([2.0, 7.5], max_wait_s=2.0)


def test_the_gateway_routes_on_its_own_only_for_a_serving_engine_while_nothing_is_held() -> None:
    assert gateway_may_pass(serving=True, draining=False, held_groups=0)
    assert not gateway_may_pass(serving=False, draining=False, held_groups=0)  # a start is the daemon's
    assert not gateway_may_pass(serving=True, draining=True, held_groups=0)  # refused while draining
    assert not gateway_may_pass(serving=True, draining=False, held_groups=1)  # a turn to decide


def test_no_swap_starts_while_the_gateway_may_let_requests_through_on_its_own() -> None:
    assert not swap_may_start([], max_wait_s=2.0, passes_closed=False)
    assert not swap_may_start([9.0], max_wait_s=2.0, passes_closed=False)  # no time limit on this one
    assert swap_may_start([], max_wait_s=2.0, passes_closed=True)
