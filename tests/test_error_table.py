"""The error classification table (chatd_trio.models.classify), row by row, and the
error-body shapes it reads. The same table is documented in docs/providers.md."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd_trio.config import RetryConfig
from chatd_trio.models.classify import (
    CONTEXT_LENGTH,
    MAX_MESSAGE_CHARS,
    RULES,
    ErrorBody,
    classify,
    parse_error_body,
    readable_text,
)

RETRYABLE = RetryConfig().retryable_status_codes


def verdict(status: int | None, message: str = "", code: str = "") -> tuple[str, bool]:
    c = classify(status, ErrorBody(message, code), retryable_statuses=RETRYABLE)
    return c.kind, c.retryable


@pytest.mark.parametrize(
    ("status", "code", "message", "kind", "retryable"),
    [
        # quota and billing are final, even as a 429
        (429, "insufficient_quota", "You exceeded your current quota", "quota", False),
        (429, "", "You exceeded your current quota, please check your plan", "quota", False),
        (400, "invalid_request_error", "Your credit balance is too low", "quota", False),
        (400, "billing_error", "", "quota", False),
        (402, "", "Payment Required", "quota", False),
        # context length: its own kind, not retried as it stands
        (400, "context_length_exceeded", "", CONTEXT_LENGTH, False),
        (400, "", "This model's maximum context length is 8192 tokens", CONTEXT_LENGTH, False),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 > 200000",
            CONTEXT_LENGTH,
            False,
        ),
        (413, "", "input is too long for the context window", CONTEXT_LENGTH, False),
        (None, "context_length_exceeded", "", CONTEXT_LENGTH, False),
        # auth, permission, not found, size: final
        (401, "invalid_request_error", "Incorrect API key provided", "auth", False),
        (401, "", "", "auth", False),
        (400, "invalid_api_key", "bad key", "auth", False),
        (403, "", "Country not supported", "permission", False),
        (404, "", "The model `x` does not exist", "not_found", False),
        (404, "model_not_found", "", "not_found", False),
        (413, "request_too_large", "", "request_too_large", False),
        # rate limits and overload are retried
        (429, "rate_limit_exceeded", "Rate limit reached", "rate_limit", True),
        (429, "", "", "rate_limit", True),
        (None, "rate_limit_error", "", "rate_limit", True),
        (529, "overloaded_error", "Overloaded", "overloaded", True),
        (503, "overloaded_error", "Overloaded", "overloaded", True),
        (None, "overloaded_error", "", "overloaded", True),
        (408, "", "", "timeout", True),
        # server errors: retried, except 501
        (500, "", "", "server_error", True),
        (502, "", "", "server_error", True),
        (503, "", "", "server_error", True),
        (504, "", "", "server_error", True),
        (500, "", "mentions the context length but is a 500", "server_error", True),
        (501, "", "Not Implemented", "not_implemented", False),
        (599, "", "", "server_error", False),
        # client errors are final
        (400, "invalid_request_error", "Invalid value for 'messages'", "bad_request", False),
        (422, "", "Unprocessable", "bad_request", False),
        (418, "", "", "client_error", False),
        # in-stream errors by their type; unknown ones are a server breaking mid-answer
        (None, "invalid_request_error", "bad tool schema", "bad_request", False),
        (None, "api_error", "", "server_error", True),
        (None, "server_error", "", "server_error", True),
        (None, "", "something odd", "server_error", True),
    ],
)
def test_table_row(status: int | None, code: str, message: str, kind: str, retryable: bool) -> None:
    assert verdict(status, message, code) == (kind, retryable)


def test_status_retryability_follows_the_config() -> None:
    c = classify(500, ErrorBody("x"), retryable_statuses=frozenset({503}))
    assert (c.kind, c.retryable) == ("server_error", False)
    # A code-matched row keeps its own verdict whatever the config says.
    c = classify(429, ErrorBody("x", "insufficient_quota"), retryable_statuses={429})
    assert (c.kind, c.retryable) == ("quota", False)


def test_user_facing_messages() -> None:
    c = classify(
        429,
        ErrorBody("You exceeded your current quota", "insufficient_quota"),
        retryable_statuses=RETRYABLE,
    )
    assert c.message == (
        "HTTP 429 quota or credits exhausted: You exceeded your current quota [insufficient_quota]"
    )
    c = classify(None, ErrorBody("Overloaded", "overloaded_error"), retryable_statuses=RETRYABLE)
    assert c.message == "stream error (overloaded): Overloaded [overloaded_error]"
    c = classify(503, ErrorBody(""), retryable_statuses=RETRYABLE)
    assert c.message == "HTTP 503 server error: no error message"


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        # OpenAI
        (
            {"error": {"message": "m", "type": "requests", "code": "rate_limit_exceeded"}},
            "m",
            "rate_limit_exceeded",
        ),
        (
            {"error": {"message": "m", "type": "invalid_request_error", "code": None}},
            "m",
            "invalid_request_error",
        ),
        # Anthropic
        (
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "Overloaded",
            "overloaded_error",
        ),
        # Mistral / vLLM: top level
        (
            {"object": "error", "message": "Unauthorized", "type": "unauthorized", "code": None},
            "Unauthorized",
            "unauthorized",
        ),
        (
            {"object": "error", "message": "too long", "type": "BadRequestError", "code": 400},
            "too long",
            "BadRequestError",
        ),
        # Ollama
        ({"error": "model 'x' not found"}, "model 'x' not found", ""),
        # FastAPI
        ({"detail": "Not authenticated"}, "Not authenticated", ""),
        (
            {"detail": [{"loc": ["body"], "msg": "field required"}]},
            '[{"loc": ["body"], "msg": "field required"}]',
            "",
        ),
    ],
)
def test_error_body_shapes(body: object, message: str, code: str) -> None:
    assert parse_error_body(json.dumps(body).encode()) == ErrorBody(message, code)


def test_html_and_text_bodies_are_shortened() -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 10_000 + "</body>"
    assert parse_error_body(page.encode()) == ErrorBody("502 Bad Gateway")
    untitled = "<html><body><h1>Service\n  Unavailable</h1><script>var a=1;</script></body>"
    assert parse_error_body(untitled).message == "Service Unavailable"
    assert len(parse_error_body(b"y" * 10_000).message) == MAX_MESSAGE_CHARS
    assert parse_error_body(b"[" * 100_000).message.startswith("[[[")
    assert parse_error_body(b"\xff\xfe broken utf-8").message.endswith("broken utf-8")


@settings(max_examples=300)
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_any_body_gives_one_short_line_and_a_verdict(raw: bytes) -> None:
    """Invariant: whatever the bytes, parsing and classifying never raise, and the
    message is one line of at most MAX_MESSAGE_CHARS characters."""
    body = parse_error_body(raw)
    assert len(body.message) <= MAX_MESSAGE_CHARS
    assert "\n" not in body.message
    for status in (None, 400, 429, 500):
        assert classify(status, body, retryable_statuses=RETRYABLE).kind


def test_every_rule_kind_has_a_label_and_codes_are_lowercase() -> None:
    from chatd_trio.models.classify import KIND_LABELS

    for rule in RULES:
        assert rule.kind in KIND_LABELS
        assert all(c == c.lower() for c in rule.codes | rule.stream_codes)
    assert readable_text("a\n\n b") == "a b"


def test_the_providers_guide_documents_every_kind_and_its_examples_parse() -> None:
    import ast
    import re
    from pathlib import Path

    from chatd_trio.models import classify

    guide = (Path(__file__).resolve().parent.parent / "docs" / "providers.md").read_text()
    kinds = {r.kind for r in RULES}
    kinds |= {classify.UNREACHABLE, classify.CONNECTION, classify.STREAM_CUT, classify.MALFORMED}
    for kind in kinds:
        assert f"| `{kind}` |" in guide, kind
    blocks = re.findall(r"```python\n(.*?)```", guide, re.DOTALL)
    assert len(blocks) >= 3
    for block in blocks:
        ast.parse(block)
