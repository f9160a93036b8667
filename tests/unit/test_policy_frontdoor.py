"""Requests that wait for an engine to serve (policies/frontdoor.py ``room_to_wait_for_engine``) agree with the
engine's line (``admit_request``): every request let wait gets a slot or a place in the line once the engine
serves, so none waits out a load only to be refused then; and as many wait as the limits can take."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies.frontdoor import Admission, admit_request, room_to_wait_for_engine


@given(st.integers(0, 60), st.integers(0, 8), st.integers(0, 16))
def test_every_request_let_wait_for_a_loading_engine_is_taken_by_its_line_once_it_serves(
        arriving: int, max_concurrent: int, max_queue: int) -> None:
    held = 0
    for _ in range(arriving):
        if room_to_wait_for_engine(held=held, running=0, waiting=0, max_concurrent=max_concurrent,
                                   max_queue=max_queue):
            held += 1
    expected = arriving if max_concurrent == 0 else min(arriving, max_concurrent + max_queue)
    assert held == expected
    running = waiting = 0
    for _ in range(held):  # the engine serves: each held request enters its line
        verdict = admit_request(running=running, waiting=waiting, max_concurrent=max_concurrent, max_queue=max_queue)
        assert verdict is not Admission.REFUSE, (held, max_concurrent, max_queue)
        if verdict is Admission.RUN:
            running += 1
        else:
            waiting += 1


def test_the_open_files_limit_is_raised_to_what_max_connections_needs_within_the_hard_limit() -> None:
    from policies.frontdoor import MACOS_OPEN_MAX, open_files_soft_limit, open_files_wanted

    wanted = open_files_wanted(512)
    assert wanted == 2 * 512 + 256
    inf = -1
    # launchd: soft 256, no hard limit.
    assert open_files_soft_limit(soft=256, hard=inf, wanted=wanted, darwin=True, unlimited=inf) == wanted
    # macOS takes no soft limit above OPEN_MAX, whatever the hard limit.
    assert open_files_soft_limit(soft=256, hard=inf, wanted=50_000, darwin=True, unlimited=inf) == MACOS_OPEN_MAX
    assert open_files_soft_limit(soft=256, hard=inf, wanted=50_000, darwin=False, unlimited=inf) == 50_000
    # systemd: soft 1024, hard 524288.
    assert open_files_soft_limit(soft=1024, hard=524288, wanted=wanted, darwin=False, unlimited=inf) == wanted
    # A hard limit below what is wanted: as far as it goes.
    assert open_files_soft_limit(soft=256, hard=1000, wanted=wanted, darwin=False, unlimited=inf) == 1000
    # Never lowered: a higher or unlimited soft limit stays.
    assert open_files_soft_limit(soft=65536, hard=524288, wanted=wanted, darwin=False, unlimited=inf) == 65536
    assert open_files_soft_limit(soft=inf, hard=inf, wanted=wanted, darwin=False, unlimited=inf) == inf
    assert open_files_soft_limit(soft=2000, hard=1500, wanted=wanted, darwin=False, unlimited=inf) == 2000
