"""What a starting daemon starts (policies/restore.py), the function ``Daemon.run`` calls.

Properties over any set of saved records and configs: a daemon restart never starts an engine a person (or its
idle unload) stopped, nor one that failed; it never starts two engines of which one is exclusive.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies.restore import SHUTDOWN_REASON, EngineAtStart, SavedEngine, engines_to_start, wanted_at_start, was_running

STATES = ["starting", "ready", "degraded", "hung", "backoff", "stopped", "failed", "stopping"]
saved_records = st.none() | st.builds(
    SavedEngine, state=st.sampled_from(STATES),
    reason=st.sampled_from(["", SHUTDOWN_REASON, "llmctl stop", "idle"]), preload_refused=st.booleans())


@st.composite
def engine_sets(draw: st.DrawFn) -> tuple[list[EngineAtStart], str | None]:
    n = draw(st.integers(1, 5))
    engines = [EngineAtStart(name=f"e{i}", autostart=draw(st.booleans()), exclusive=draw(st.booleans()),
                             saved=draw(saved_records)) for i in range(n)]
    default = draw(st.sampled_from([None, *[e.name for e in engines]]))
    return engines, default


def _person_stopped(e: EngineAtStart) -> bool:
    s = e.saved
    return s is not None and ((s.state == "stopped" and s.reason != SHUTDOWN_REASON and not s.preload_refused)
                              or (s.state == "failed" and s.reason != SHUTDOWN_REASON))


@given(engine_sets())
def test_a_daemon_start_undoes_no_stop_and_never_starts_exclusive_engines_together(case: tuple) -> None:
    engines, default = case
    started = engines_to_start(engines, default=default)
    by_name = {e.name: e for e in engines}
    assert len(set(started)) == len(started)
    for name in started:
        assert not _person_stopped(by_name[name]), by_name[name]
    chosen = [by_name[n] for n in started]
    for a in chosen:
        for b in chosen:
            assert a is b or not (a.exclusive or b.exclusive), (a, b)
    ran = [e for e in engines if was_running(e.saved)]
    if ran and not any(e.exclusive for e in engines if wanted_at_start(e)):
        assert {e.name for e in ran} <= set(started)  # nothing exclusive wants to start: all that ran start
    assert engines_to_start(engines, default=default, swap_pending=True) == ()


def test_what_ran_starts_whatever_autostart_says_and_a_clean_exit_obeys_autostart() -> None:
    engines = [EngineAtStart("ran", autostart=False, saved=SavedEngine("ready")),
               EngineAtStart("backoff", autostart=False, saved=SavedEngine("backoff")),
               EngineAtStart("exit-on", autostart=True, saved=SavedEngine("stopped", SHUTDOWN_REASON)),
               EngineAtStart("exit-off", autostart=False, saved=SavedEngine("stopped", SHUTDOWN_REASON)),
               EngineAtStart("person", autostart=True, saved=SavedEngine("stopped", "llmctl stop")),
               EngineAtStart("idle", autostart=True, saved=SavedEngine("stopped", "idle")),
               EngineAtStart("failed", autostart=True, saved=SavedEngine("failed", "exited 3 times")),
               EngineAtStart("refused", autostart=True, saved=SavedEngine("stopped", "memory", preload_refused=True)),
               EngineAtStart("fresh", autostart=True)]
    assert engines_to_start(engines, default="ran") == ("ran", "backoff", "exit-on", "refused", "fresh")


def test_with_exclusive_engines_the_one_that_ran_starts_else_the_default() -> None:
    a, b, c = (EngineAtStart(n, autostart=True, exclusive=True) for n in "abc")
    assert engines_to_start([a, b, c], default="b") == ("b",)
    ran_c = EngineAtStart("c", autostart=False, exclusive=True, saved=SavedEngine("ready"))
    assert engines_to_start([a, b, ran_c], default="b") == ("c",)
    exited_a = EngineAtStart("a", autostart=True, exclusive=True, saved=SavedEngine("stopped", SHUTDOWN_REASON))
    assert engines_to_start([exited_a, b, c], default="b") == ("a",)


def test_engines_that_are_not_exclusive_all_start_next_to_an_exclusive_one_in_the_config() -> None:
    """A big exclusive model that did not run and is not the default, and two small engines that are not
    exclusive: both small ones start (they may run side by side); the big one waits for a request."""
    big = EngineAtStart("big", autostart=True, exclusive=True)
    chat, embed = EngineAtStart("chat", autostart=True), EngineAtStart("embed", autostart=True)
    assert engines_to_start([big, chat, embed], default="chat") == ("chat", "embed")
    ran = [EngineAtStart(n, autostart=False, saved=SavedEngine("ready")) for n in ("chat", "embed")]
    assert engines_to_start([big, *ran], default="big") == ("chat", "embed")
    # The exclusive default loads alone.
    assert engines_to_start([big, chat, embed], default="big") == ("big",)


def test_where_a_recorded_run_listens_and_whether_the_config_moved_it() -> None:
    """A record from before ``listen`` was kept gives its argv's --port: an upgrade and a port change in one
    restart still restart the engine on the new port (kept, it sat in `starting` until start_timeout)."""
    from policies.restore import recorded_listen, run_moved

    assert recorded_listen("127.0.0.1:8081", None, "127.0.0.1") == "127.0.0.1:8081"
    assert recorded_listen(None, ["python", "-m", "mlx_lm.server", "--port", "8081"], "127.0.0.1") == "127.0.0.1:8081"
    assert recorded_listen(None, ["vllm", "serve", "m", "--port=9000"], "0.0.0.0") == "0.0.0.0:9000"
    assert recorded_listen(None, ["ollama", "serve"], "127.0.0.1") is None
    assert run_moved("127.0.0.1:8081", "127.0.0.1:8082") and not run_moved("127.0.0.1:8081", "127.0.0.1:8081")
    assert not run_moved(None, "127.0.0.1:8082")  # unknown: kept, as before
