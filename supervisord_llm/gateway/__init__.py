"""Room: gateway. The front port every client walks through.

``proxy`` (routing, limits, holding, streaming to the engine's pace), ``settings`` (the
``[gateway]`` table, read with the config's one table reader), ``bridge`` (the gateway's own thread
and event loop, and the one crossing from it to the daemon's loop), ``anthropic`` (the Messages API
translated for OpenAI-only engines), ``headers``, ``hold``, ``retry`` and ``turns``. The front-door
decisions themselves are pure functions in ``policies.frontdoor``.
"""
