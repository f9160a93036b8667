"""Route probes: whether an engine serves an API path, asked of the engine itself at ready time.

Whether an engine serves the Anthropic Messages API depends on its version (Ollama added
``/v1/messages`` in v0.14.0, ollama commit 2b2cda7a2 "api: implement anthropic api"; older vLLM and
SGLang releases lack the route too), so the answer is read from the
running engine instead of assumed from its kind. The probe posts an empty JSON object: an engine
that serves the route rejects it in validation (400/422, no generation, no model load: Ollama's
``AnthropicMessagesMiddleware`` answers "model is required" before anything else, vLLM and SGLang
fail pydantic validation), and one that does not answers 404/405.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

__all__ = ["MESSAGES_PATH", "classify_route_status", "probe_route"]

MESSAGES_PATH = "/v1/messages"

# 404/405: no such route. 400/422: the route exists and validated the (empty) body; 2xx would be
# an engine that accepted it anyway. 401/403 (a key we do not know), 5xx and no answer tell
# nothing about the route.
_ABSENT = frozenset({404, 405})
_PRESENT = frozenset({400, 422})


def classify_route_status(status_code: int) -> bool | None:
    """True when the answer shows the route exists, False when it shows it does not, None when it cannot tell."""
    if status_code in _ABSENT:
        return False
    if status_code in _PRESENT or 200 <= status_code < 300:
        return True
    return None


async def probe_route(
    client: httpx.AsyncClient,
    base_url: str,
    path: str = MESSAGES_PATH,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> bool | None:
    """POST ``{}`` to ``path``: True (served), False (not served) or None (no answer that tells)."""
    url = base_url.rstrip("/") + path
    try:
        response = await client.post(url, json={}, headers=headers, timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return classify_route_status(response.status_code)
