"""An engine's error answers in the client's API shape, and the 502 for a request an engine gave no answer
(supervisord_llm.gateway.proxy: engine_error_shaped, engine_error_body, _unanswered)."""

from __future__ import annotations

import json

import httpx
import pytest

from supervisord_llm.gateway.anthropic import openai_error_message
from supervisord_llm.gateway.proxy import _unanswered, engine_error_body, engine_error_shaped


@pytest.mark.parametrize(("raw", "openai", "anthropic"), [
    (b'{"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}}', True, False),
    (b'{"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}', True, True),
    (b'{"error": "max_tokens must be of type int"}', False, False),
    (b'{"object": "error", "message": "bad", "code": 400}', False, False),
    (b"Not Found", False, False),
    (b"", False, False),
])
def test_only_a_body_in_the_clients_shape_counts_as_shaped(raw: bytes, openai: bool, anthropic: bool) -> None:
    """OpenAI's shape has an error object with a message; Anthropic's adds type "error" and the error's type."""
    assert engine_error_shaped(False, raw) is openai
    assert engine_error_shaped(True, raw) is anthropic


@pytest.mark.parametrize(("raw", "text"), [
    (b'{"error": "max_tokens must be of type int"}', "max_tokens must be of type int"),
    (b'{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}', "too long"),
    (b'{"detail": "Not authenticated"}', "Not authenticated"),
    (b'{"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "missing"}]}',
     "body.messages: field required"),
    (b"upstream exploded\n", "upstream exploded"),
    (b"", "(empty body)"),
])
def test_the_engines_text_is_found_in_the_shapes_engines_use(raw: bytes, text: str) -> None:
    """mlx_lm.server's error string, vLLM's older top-level message, FastAPI's detail, plain text."""
    assert openai_error_message(raw) == text


def test_the_engines_text_is_bounded() -> None:
    """A huge error text is quoted in part."""
    assert len(openai_error_message(json.dumps({"error": "x" * 100_000}).encode())) == 2000


@pytest.mark.parametrize(("anthropic", "status", "kind", "code", "said"), [
    (False, 400, "invalid_request_error", "engine_refused", "refused"),
    (False, 404, "invalid_request_error", "engine_refused", "refused"),
    (False, 503, "server_error", "engine_error", "failed to answer"),
    (True, 422, "invalid_request_error", "engine_refused", "refused"),
    (True, 500, "api_error", "engine_error", "failed to answer"),
])
def test_an_engines_error_is_the_clients_for_4xx_and_the_servers_for_5xx(
        anthropic: bool, status: int, kind: str, code: str, said: str) -> None:
    """The rewritten body says the text is the engine's, names the engine and its status, in the client's shape."""
    body = engine_error_body(anthropic, "tiny", status, b'{"error": "boom"}')
    error = body["error"]
    assert (body.get("type") == "error") is anthropic
    assert error["type"] == kind and error["code"] == code and error["engine"] == "tiny"
    assert error["engine_status"] == status and error["message"] == f"engine 'tiny' {said} the request: boom"
    if not anthropic:
        assert set(error) >= {"message", "type", "param", "code"}


def test_a_translated_refusal_says_where_it_was_sent_and_the_engines_status() -> None:
    """The translation path's body: the client's status (mlx_lm.server's 404 is a bad request), the engine's named."""
    body = engine_error_body(True, "tiny", 404, b'{"error": "no model"}', client_status=400,
                             translated_to="/v1/chat/completions")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["engine_status"] == 404
    assert body["error"]["message"] == (
        "engine 'tiny' refused the request translated to /v1/chat/completions (HTTP 404): no model")


_REQUEST = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")


@pytest.mark.parametrize(("exc", "code", "said"), [
    (httpx.ConnectError("Connection refused", request=_REQUEST), "upstream_unreachable", "could not be reached"),
    (httpx.RemoteProtocolError("the engine closed the connection without sending a response", request=_REQUEST),
     "upstream_closed", "closed the connection without answering"),
    (httpx.ReadError("Connection reset by peer", request=_REQUEST), "upstream_closed",
     "reset the connection without answering"),
    (httpx.ProtocolError("the engine's response does not parse", request=_REQUEST), "upstream_bad_response",
     "could not read"),
])
def test_a_connection_that_failed_is_told_apart_from_one_closed_unanswered(
        exc: httpx.HTTPError, code: str, said: str) -> None:
    """Refused (nothing reached) vs closed or reset without an answer vs an answer that does not parse."""
    got_code, message = _unanswered("a", "http://127.0.0.1:1", exc, 1)
    assert got_code == code and said in message and "'a'" in message
