"""Room: gateway. The front port every client walks through.

``proxy`` (routing, limits, holding, streaming to the engine's pace), ``settings`` (the
``[gateway]`` table, read with the config's one table reader) and ``anthropic`` (the Messages API
translated for OpenAI-only engines). The front-door decisions themselves are
pure functions in ``policies.frontdoor``.
"""
