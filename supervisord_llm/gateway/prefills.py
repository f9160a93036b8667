"""Which requests each engine has in prefill, as the gateway sees them: what a stream's rate leaves out.

Room: gateway.

Every request is *in prefill* from when it was sent to its engine until the engine's first token of it
reached the gateway (the token meter reads the engine's own bytes); one that ends without a token (an
answer not streamed, an error) was in prefill until it ended, since nothing tells its prompt from its
answer, and so does a non-streamed request with a long prompt fetched as a stream (the engine's work on it
goes on after its first token). While another request is in prefill the engine may run its prompt instead
of decoding, or beside it: a stream's rate is taken only over the intervals between its tokens that no
other request's prefill touched (``policies.health.quiet_interval``; the rate, ``stream_decode_rate``). A
short prompt counts as a long one does: one interval between a stream's tokens is one decode step, and
mlx_lm.server stops every stream for a whole prefill chunk (a 180-word prompt: 0.7 s). Each interval is
judged one arrival late (``QuietTally``): the engine makes a stream's token and another request's first
token in one step, and the stream's may reach the gateway first. What this costs: a request waiting for
its turn inside an engine that runs fewer at once than it is sent counts as in prefill all its wait, and
the streams beside it give no sample meanwhile (none rather than a wrong one).

The prefills of long prompts (``policies.health.prefill_counts``) whose first token the gateway sees
(streams, and requests fetched as streams) are told to the daemon (``on_change``), whose per-step counter
samples of the engine leave out the intervals such a prefill touched (``policies.health.prefill_beside``):
vLLM's own counters show no prefill until its first token. A non-streamed answer's span lasts until its
end, so it is not told: it would leave out every counter sample of the engine for as long as the answer
takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from policies.health import DECODE_SAMPLE_MAX_EVENTS, quiet_interval

__all__ = ["PrefillSpans", "QuietTally"]

# (engine, its requests in prefill now, when one's prefill ended: None when one began)
OnChange: TypeAlias = Callable[[str, int, "float | None"], None]


class PrefillSpans:
    """Requests in prefill per engine, and when the last one's prefill ended."""

    def __init__(self, on_change: OnChange | None = None) -> None:
        self._live: dict[str, set[int]] = {}  # engine -> keys of its requests in prefill
        self._told: dict[str, set[int]] = {}  # engine -> those of them told to the daemon
        self._last_end_s: dict[str, float] = {}
        self._next_key = 0
        self._on_change = on_change

    def begin(self, engine: str, *, tell: bool = True) -> int:
        """A request went to ``engine``: in prefill until :meth:`end` with the key returned. ``tell``: its
        first token will be seen (a stream), so the daemon is told of its prefill."""
        key = self._next_key
        self._next_key += 1
        self._live.setdefault(engine, set()).add(key)
        if tell:
            told = self._told.setdefault(engine, set())
            told.add(key)
            if self._on_change is not None:
                self._on_change(engine, len(told), None)
        return key

    def end(self, engine: str, key: int, at_s: float) -> None:
        """The request's prefill is over at ``at_s`` (its first token, or its end); once only."""
        live = self._live.get(engine)
        if live is None or key not in live:
            return
        live.discard(key)
        if not live:
            del self._live[engine]
        self._last_end_s[engine] = max(at_s, self._last_end_s.get(engine, at_s))
        told = self._told.get(engine)
        if told is not None and key in told:
            told.discard(key)
            count = len(told)
            if not told:
                del self._told[engine]
            if self._on_change is not None:
                self._on_change(engine, count, at_s)

    def in_prefill(self, engine: str, own: int | None = None) -> int:
        """How many requests to ``engine`` are in prefill now, leaving out ``own`` (the asking request's)."""
        live = self._live.get(engine, ())
        return len(live) - (own is not None and own in live)

    def last_end_s(self, engine: str) -> float | None:
        """When the last prefill of a request to ``engine`` ended, or None."""
        return self._last_end_s.get(engine)


class QuietTally:
    """One stream's decode where no other request's prefill touched it: each arrival of its tokens is judged
    by its interval since the arrival before, and every token of an arrival with it (a burst's tokens
    share their wait; judging each alone would count a burst's last tokens after a dropped wait, and read
    the engine faster than it is).

    An arrival is judged when the next one comes (or the stream ends, ``settle``): another request's prefill
    that ended in its interval or in the next leaves it out. The engine makes this stream's token and the
    other's first token in one step, after the other's prefill; this stream's may reach the gateway first.
    ``own``: the stream's own span (a request fetched as a stream keeps its span to its end), never counted
    against it. Only its first ``DECODE_SAMPLE_MAX_EVENTS`` token events count: beyond them its own grown
    context slows its decode (policies/health.py)."""

    def __init__(self, spans: PrefillSpans, engine: str, in_flight: Callable[[], int]) -> None:
        self.spans = spans
        self.engine = engine
        self.in_flight = in_flight  # requests to the engine through the gateway now
        self.own: int | None = None
        self.tokens = 0
        self.seconds = 0.0
        self.in_flight_s = 0.0
        self._previous_s: float | None = None
        # The arrival not yet judged: (its interval's start, its length, requests in flight then, whether
        # another request was in prefill when it came); its tokens are _pending_tokens.
        self._pending: tuple[float, float, int, bool] | None = None
        self._pending_tokens = 0
        self._events = 0

    def token(self, at_s: float) -> None:
        """A token after the stream's first arrived at ``at_s`` (the first only starts the clock)."""
        self._events += 1
        if self._events > DECODE_SAMPLE_MAX_EVENTS:
            if self._pending is not None and at_s != self._previous_s:
                self.settle()  # the last arrival within the sample is judged; none after it
                self._previous_s = None
            return
        previous = self._previous_s
        self._previous_s = at_s
        if previous is None:
            return
        if at_s != previous:  # a new arrival
            self.settle()
            live = self.spans.in_prefill(self.engine, self.own) > 0
            self._pending = (previous, at_s - previous, self.in_flight(), live)
        if self._pending is not None:
            self._pending_tokens += 1

    def settle(self) -> None:
        """Judge the arrival still pending (the stream ended, or the next arrival came)."""
        pending, tokens = self._pending, self._pending_tokens
        self._pending, self._pending_tokens = None, 0
        if pending is None:
            return
        since_s, seconds, in_flight, live = pending
        if quiet_interval(since_s, int(live), self.spans.last_end_s(self.engine)):
            self.tokens += tokens
            self.seconds += seconds
            self.in_flight_s += in_flight * seconds
