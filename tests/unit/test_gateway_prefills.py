"""The gateway's record of which requests each engine has in prefill."""

from __future__ import annotations

from supervisord_llm.gateway.prefills import PrefillSpans


def test_an_interval_is_quiet_while_no_request_is_in_prefill() -> None:
    p = PrefillSpans()
    assert p.quiet_since("a", 0.0)
    stream = p.begin("a", 0.0)
    p.end("a", stream, 0.1)  # its own first token
    assert p.quiet_since("a", 0.1)


def test_a_request_in_prefill_touches_every_interval_until_its_first_token() -> None:
    p = PrefillSpans()
    prompt = p.begin("a", 1.0)
    assert not p.quiet_since("a", 0.5)
    assert not p.quiet_since("a", 1.5)
    p.end("a", prompt, 2.0)
    assert not p.quiet_since("a", 1.9)  # the interval from 1.9 saw it end
    assert p.quiet_since("a", 2.0)


def test_other_engines_do_not_count() -> None:
    p = PrefillSpans()
    p.begin("b", 0.0)
    other = p.begin("b", 0.0)
    p.end("b", other, 5.0)
    assert p.quiet_since("a", 1.0)


def test_end_is_once_only_and_unknown_keys_are_ignored() -> None:
    p = PrefillSpans()
    k1, k2 = p.begin("a", 1.0), p.begin("a", 1.5)
    p.end("a", k1, 3.0)
    assert not p.quiet_since("a", 3.0)  # k2 still in prefill
    p.end("a", k2, 2.0)  # the later end stands
    assert not p.quiet_since("a", 2.5) and p.quiet_since("a", 3.0)
    p.end("a", k1, 9.0)  # a second end (the request's end after its first token) changes nothing
    p.end("a", 12345, 9.0)
    p.end("nope", k1, 9.0)
    assert p.quiet_since("a", 3.0)
