"""Which requests each engine has in prefill, as the gateway sees them: what a stream's rate leaves out.

Room: gateway.

A request is *in prefill* from when it was sent to its engine until the engine's first token of it
reached the gateway (the token meter reads the engine's own bytes); one that ends without a token (an
answer not streamed, an error) was in prefill until it ended, since nothing tells its prompt from its
answer. While another request is in prefill the engine may run its prompt instead of decoding, or
beside it: a stream's rate is taken only over the intervals between its tokens that no other
request's prefill touched (``policies.health.quiet_interval``; the rate, ``stream_decode_rate``).
"""

from __future__ import annotations

from policies.health import quiet_interval

__all__ = ["PrefillSpans"]


class PrefillSpans:
    """Requests in prefill per engine, and when the last one's prefill ended."""

    def __init__(self) -> None:
        self._live: dict[str, dict[int, float]] = {}  # engine -> request key -> sent at
        self._last_end_s: dict[str, float] = {}
        self._next_key = 0

    def begin(self, engine: str, at_s: float) -> int:
        """A request went to ``engine`` at ``at_s``: in prefill until :meth:`end` with the key returned."""
        key = self._next_key
        self._next_key += 1
        self._live.setdefault(engine, {})[key] = at_s
        return key

    def end(self, engine: str, key: int, at_s: float) -> None:
        """The request's prefill is over at ``at_s`` (its first token, or its end); once only."""
        live = self._live.get(engine)
        if live is None or live.pop(key, None) is None:
            return
        if not live:
            del self._live[engine]
        self._last_end_s[engine] = max(at_s, self._last_end_s.get(engine, at_s))

    def quiet_since(self, engine: str, since_s: float) -> bool:
        """No request to ``engine`` in prefill now, and none ended its prefill after ``since_s``."""
        return quiet_interval(since_s, len(self._live.get(engine, ())), self._last_end_s.get(engine))
