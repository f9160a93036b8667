"""Room: gateway. The front port every client walks through.

``proxy`` (routing, limits, holding, streaming to the engine's pace), ``settings`` (the
``[gateway]`` table, read with the config's one table reader), ``worker`` (the gateway's own process),
``process`` (the daemon's side of it: starting, answering and restarting it), ``channel`` (the one
crossing between the two), ``protocol`` (the types both sides share: all of the gateway the daemon
imports), ``upstream`` (the client to the engine), ``anthropic`` (the Messages API
translated for OpenAI-only engines), ``headers``, ``hold``, ``retry`` and ``turns``. The front-door
decisions themselves are pure functions in ``policies.frontdoor``.
"""
