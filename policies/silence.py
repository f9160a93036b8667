"""An engine's silence toward one forwarded request: when a stream is stalled, and when a request the
engine sends nothing is still waited for.

Both verdicts rest on what the engine itself did: this request's tokens, or the progress the engine
showed elsewhere (its step counters, its prefill, other requests' tokens, a canary). A client's pace
never counts: while a client holds its stream back (its buffer is full) the engine is not read, so
the engine's silence meanwhile is not judged; nor is a request held while its engine restarts.

The gateway's runtime (``supervisord_llm/gateway/proxy.py`` for streams, ``gateway/upstream.py`` for the
read timeout) keeps the clocks and timers and calls these functions for every decision.
"""

from __future__ import annotations

from dataclasses import dataclass

# While the engine shows progress elsewhere, a request it sends nothing is given this many more read timeouts
# in a row (an hour in all with the default 600 s): an engine that dropped one request while serving others
# must not hold its client, its slot and its connection forever.
QUIET_EXTENSIONS_MAX = 5

# A stream's watch looks again at least this often while its silence is not the engine's (held back by
# its client, or held while its engine restarts).
_NOT_JUDGED_RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class StallLimits:
    """How long a stream may go without a token: before its first (prefill), and between tokens (decode)."""

    prefill_s: float
    decode_s: float


# Engines that send nothing while the model writes a tool call, and then the call whole: Ollama (its tool
# parser gives the call whole), mlx_lm.server (mlx_lm/server.py ``handle_completion`` writes a chunk only
# while ``current_state != "tool"``) and oMLX (github.com/jundot/omlx: its chat stream passes the text through
# ``ToolCallStreamFilter``, omlx/api/tool_calling.py, which holds back a tool-call envelope until it is whole and
# sends nothing meanwhile; with tools but no tool-call marker the tokenizer knows, ``stream_content`` is off and
# the whole answer comes at its end).
SILENT_TOOL_CALL_KINDS = frozenset({"ollama", "mlx_lm", "omlx"})


def stall_limits(*, prefill_stall_s: float, prefill_per_mib_s: float, decode_stall_s: float, body_bytes: int,
                 engine_kind: str, tools: bool) -> StallLimits:
    """The stall limits of one request: the prefill's grows with the prompt (``prefill_per_mib_s`` per MiB of
    request body). An engine that sends nothing while it collects a tool call (``SILENT_TOOL_CALL_KINDS``) is
    held to the prefill's limit between tokens too on a request with tools: a long call on a slow model is
    silent for as long as it takes to generate."""
    prefill_s = prefill_stall_s + body_bytes / 2**20 * prefill_per_mib_s
    decode_s = decode_stall_s
    if tools and engine_kind in SILENT_TOOL_CALL_KINDS:
        decode_s = max(decode_s, prefill_s)
    return StallLimits(prefill_s, decode_s)


# A stall look that comes this much later than it was due found the gateway itself paused (its process
# stopped, its loop blocked): it read nothing meanwhile, and the engine's tokens waited in the socket.
GATEWAY_PAUSE_S = 2.0


def gateway_paused(*, due_s: float | None, now_s: float) -> bool:
    """The look due at ``due_s`` comes at ``now_s``, more than ``GATEWAY_PAUSE_S`` late: the silence until now is
    the gateway's own, not evidence against the engine (a stream cut as ``engine_stalled`` and the engine marked
    hung, after the gateway's process was stopped for a minute). The stream's silence counts again from now,
    and its decode gives no rate sample (its tokens came at the gateway's pace)."""
    return due_s is not None and now_s - due_s > GATEWAY_PAUSE_S


@dataclass(frozen=True, slots=True)
class StallCheck:
    """One look at a stream: stalled (in ``phase``, silent for ``stalled_for_s``), or look again in ``wait_s``."""

    stalled: bool
    phase: str  # "prefill" (no token yet) or "decode"
    wait_s: float = 0.0
    stalled_for_s: float = 0.0


def stream_stall_check(*, now_s: float, sent_at_s: float, last_token_s: float | None, resumed_at_s: float,
                       limits: StallLimits, not_judged: bool, engine_progress_s: float | None) -> StallCheck:
    """Whether a stream is stalled: no token from the engine within the phase's limit, counted from the
    request's send (prefill) or its last token (decode), from when its client let the gateway read again
    (``resumed_at_s``), or from the engine's latest progress elsewhere, whichever is last.

    ``not_judged``: the stream's silence is not the engine's right now (its client holds it back, or it is
    held while the engine restarts); it is looked at again shortly. ``engine_progress_s``: when the engine
    last showed progress elsewhere (None: not known), which means it is working, so this stream waits.
    """
    if last_token_s is None:
        phase, since, limit = "prefill", sent_at_s, limits.prefill_s
    else:
        phase, since, limit = "decode", last_token_s, limits.decode_s
    if not_judged:
        return StallCheck(False, phase, wait_s=min(limit, _NOT_JUDGED_RECHECK_S))
    since = max(since, resumed_at_s)
    if engine_progress_s is not None and engine_progress_s > since:
        since = engine_progress_s
    delay = since + limit - now_s
    if delay <= 0:
        return StallCheck(True, phase, stalled_for_s=now_s - since)
    # Never wait longer than the decode limit: a first token arriving meanwhile starts a decode deadline
    # that can fall before the prefill one.
    return StallCheck(False, phase, wait_s=min(delay, limits.decode_s))


@dataclass(frozen=True, slots=True)
class QuietVerdict:
    """A request the engine sent nothing for a read timeout: wait another (``extend``), or give up (``reason``)."""

    extend: bool
    reason: str = ""


def quiet_request_verdict(*, quiet_s: float, timeout_s: float, progress_age_s: float | None,
                          extensions_in_a_row: int, watched: bool) -> QuietVerdict:
    """The engine sent this request nothing for ``quiet_s`` (at least the read timeout ``timeout_s``).

    A non-streamed answer comes whole, after the whole generation, so silence alone is no verdict: while the
    engine showed progress elsewhere within that quiet time (``progress_age_s`` seconds ago: its step counters,
    its prefill, other streams, a canary) the request waits another read timeout, up to
    ``QUIET_EXTENSIONS_MAX`` times in a row (bytes from the engine start the count again). ``watched`` is False
    where no progress is known for the engine at all: the read timeout stands.
    """
    if watched and extensions_in_a_row < QUIET_EXTENSIONS_MAX:
        if progress_age_s is not None and progress_age_s < quiet_s:
            return QuietVerdict(True)
    if not watched:
        return QuietVerdict(False, f"the engine sent nothing for {timeout_s:g}s (the gateway's upstream_read_timeout_s)")
    if extensions_in_a_row >= QUIET_EXTENSIONS_MAX:
        times = QUIET_EXTENSIONS_MAX + 1
        return QuietVerdict(False, f"the engine sent this request nothing for {times * timeout_s:g}s ({times} x the "
                                   "gateway's upstream_read_timeout_s), although it showed progress elsewhere")
    return QuietVerdict(False, f"the engine sent nothing for {timeout_s:g}s (the gateway's upstream_read_timeout_s) "
                               "and showed no progress meanwhile")
