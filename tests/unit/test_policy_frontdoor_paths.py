"""The door's path and method verdicts for the gateway's own model list (policies.frontdoor.check_path)."""

from __future__ import annotations

import pytest

from policies.frontdoor import check_path


@pytest.mark.parametrize("raw", [b"/v1/models", b"/v1/models/tiny", b"/v1/models/Qwen%2FQwen3-8B"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_another_method_on_the_model_list_is_a_405_allowing_get(raw: bytes, method: str) -> None:
    """/v1/models and /v1/models/{id} (an id with an encoded slash too) take GET: anything else is a 405, Allow: GET."""
    verdict = check_path(raw, method)
    assert (verdict.ok, verdict.status, verdict.code, verdict.allow) == (False, 405, "method_not_allowed", "GET")
    assert f"takes GET, not {method}" in verdict.message


def test_a_wrong_method_on_an_inference_path_names_post() -> None:
    """GET /v1/chat/completions: a 405 whose Allow is POST."""
    verdict = check_path(b"/v1/chat/completions", "GET")
    assert (verdict.status, verdict.allow) == (405, "POST")


def test_the_404_for_another_path_names_what_is_forwarded_and_what_is_answered() -> None:
    """A path the gateway neither forwards nor answers: a 404 naming both, without contradicting itself."""
    verdict = check_path(b"/v1/sleep", "POST")
    assert verdict.status == 404 and not verdict.allow
    assert "/v1/chat/completions" in verdict.message and "answers GET /v1/models" in verdict.message
