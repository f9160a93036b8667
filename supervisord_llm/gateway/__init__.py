"""Room: gateway. The front port every client walks through.

``proxy`` (routing, limits, holding, streaming to the engine's pace), ``anthropic``
(the Messages API translated for OpenAI-only engines) and ``bridge`` (the gateway's own thread and
event loop, and the one crossing from it to the daemon's loop). The front-door decisions themselves are
pure functions in ``policies.frontdoor``.
"""
