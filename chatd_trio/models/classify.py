"""One table for every provider failure: (status, error code, body, in-stream) -> kind.

Both HTTP adapters (OpenAI-compatible, Anthropic) send every failure they see
through `classify`; nothing else decides whether a model error is retried. The
table is documented in docs/providers.md ("Errors and retries") and tested row
by row in tests/test_error_table.py.

A failure is first matched on the provider's error *code or type* and on a few
*message* phrases (quota and context-length errors arrive as 429 or 400 with
nothing else to tell them apart from a rate limit or a bad request), then on the
HTTP *status*. Kinds matched on a code are final or retried as the table says;
kinds matched on a status alone are retried when the status is in
`RetryConfig.retryable_status_codes`.

`CONTEXT_LENGTH` ("context_length") is the kind of "the prompt does not fit the
model's context window"; it is not retryable as it stands: the caller compacts
the history and tries the step again.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

__all__ = [
    "CONNECTION",
    "CONTEXT_LENGTH",
    "KIND_LABELS",
    "MALFORMED",
    "RULES",
    "STREAM_CUT",
    "UNREACHABLE",
    "Classified",
    "ErrorBody",
    "Rule",
    "classify",
    "parse_error_body",
    "readable_text",
]

QUOTA = "quota"
CONTEXT_LENGTH = "context_length"
AUTH = "auth"
PERMISSION = "permission"
NOT_FOUND = "not_found"
REQUEST_TOO_LARGE = "request_too_large"
RATE_LIMIT = "rate_limit"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
NOT_IMPLEMENTED = "not_implemented"
SERVER_ERROR = "server_error"
BAD_REQUEST = "bad_request"
CLIENT_ERROR = "client_error"
# Kinds of the transport, not of an error body (set by the adapters, listed here for one
# place to look): nothing answered at all; the connection broke before a response; the
# body ended or broke mid-answer; the response broke the protocol (never retried).
UNREACHABLE = "unreachable"
CONNECTION = "connection"
STREAM_CUT = "stream_cut"
MALFORMED = "malformed_response"

# The words a user reads after "HTTP <status>".
KIND_LABELS: Mapping[str, str] = {
    QUOTA: "quota or credits exhausted",
    CONTEXT_LENGTH: "context length exceeded",
    AUTH: "authentication failed",
    PERMISSION: "permission denied",
    NOT_FOUND: "not found",
    REQUEST_TOO_LARGE: "request too large",
    RATE_LIMIT: "rate limited",
    OVERLOADED: "overloaded",
    TIMEOUT: "timeout",
    NOT_IMPLEMENTED: "not implemented",
    SERVER_ERROR: "server error",
    BAD_REQUEST: "bad request",
    CLIENT_ERROR: "client error",
}

# A provider message beyond this is noise in a status line (HTML pages, stack traces).
MAX_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class Rule:
    """One row: a failure with any of these codes or phrases (or, failing that, these
    statuses) has `kind`; `retryable` applies when it matched on a code or phrase.

    `phrases` are matched case-insensitively in the message, only for 4xx statuses
    and in-stream errors: a 5xx page that mentions "context length" is still a 5xx.
    `stream_codes` are generic types ("invalid_request_error", "api_error") that
    say something only where no status does: inside a stream.
    """

    kind: str
    retryable: bool
    codes: frozenset[str] = frozenset()
    phrases: tuple[str, ...] = ()
    statuses: frozenset[int] = frozenset()
    stream_codes: frozenset[str] = frozenset()


# In order: the first row whose code or phrase matches wins, then the first whose status does.
RULES: tuple[Rule, ...] = (
    Rule(
        QUOTA,
        False,
        codes=frozenset(
            {
                "insufficient_quota",
                "billing_hard_limit_reached",
                "billing_not_active",
                "billing_error",
                "insufficient_balance",
                "payment_required",
            }
        ),
        phrases=(
            "exceeded your current quota",
            "credit balance is too low",
            "insufficient balance",
            "insufficient credits",
        ),
        statuses=frozenset({402}),
    ),
    Rule(
        CONTEXT_LENGTH,
        False,
        codes=frozenset({"context_length_exceeded", "context_window_exceeded"}),
        phrases=(
            "maximum context length",
            "context length",
            "context window",
            "prompt is too long",
            "input is too long",
            "too many input tokens",
        ),
    ),
    Rule(
        AUTH,
        False,
        codes=frozenset({"invalid_api_key", "authentication_error", "unauthorized"}),
        statuses=frozenset({401}),
    ),
    Rule(
        PERMISSION,
        False,
        codes=frozenset({"permission_error", "permission_denied"}),
        statuses=frozenset({403}),
    ),
    Rule(
        NOT_FOUND,
        False,
        codes=frozenset({"not_found_error", "model_not_found"}),
        statuses=frozenset({404}),
    ),
    Rule(
        REQUEST_TOO_LARGE,
        False,
        codes=frozenset({"request_too_large"}),
        statuses=frozenset({413}),
    ),
    Rule(
        RATE_LIMIT,
        True,
        codes=frozenset({"rate_limit_exceeded", "rate_limit_error", "requests", "tokens"}),
        statuses=frozenset({429}),
    ),
    Rule(
        OVERLOADED,
        True,
        codes=frozenset({"overloaded_error", "overloaded", "server_overloaded"}),
        statuses=frozenset({529}),
    ),
    Rule(TIMEOUT, True, codes=frozenset({"timeout_error"}), statuses=frozenset({408})),
    # 501: the server does not implement this endpoint; asking again cannot help.
    Rule(NOT_IMPLEMENTED, False, statuses=frozenset({501})),
    Rule(
        SERVER_ERROR,
        True,
        statuses=frozenset({500, 502, 503, 504}),
        stream_codes=frozenset({"api_error", "server_error", "internal_error"}),
    ),
    Rule(
        BAD_REQUEST,
        False,
        statuses=frozenset({400, 422}),
        stream_codes=frozenset({"invalid_request_error", "badrequesterror", "invalid_request"}),
    ),
)


@dataclass(frozen=True)
class ErrorBody:
    """What an error body says, whatever its shape: a readable message and a code."""

    message: str
    code: str = ""


@dataclass(frozen=True)
class Classified:
    """A classified failure: what the adapter raises as `ModelError`."""

    kind: str
    retryable: bool
    message: str


_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_HIDDEN = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.IGNORECASE | re.DOTALL)


def readable_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """One line of at most `limit` characters; an HTML page becomes its title or text."""
    if "<" in text and ">" in text and re.search(r"<(html|body|head|title|h1|p)\b", text, re.I):
        title = _TITLE.search(text)
        text = title.group(1) if title else _TAG.sub(" ", _HIDDEN.sub(" ", text))
        text = html.unescape(text)
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _code_of(obj: Mapping[str, object]) -> str:
    for key in ("code", "type"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _message_of(obj: Mapping[str, object]) -> str | None:
    for key in ("message", "detail", "msg"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def error_object(data: object) -> ErrorBody | None:
    """An error in any of the shapes servers use, from a decoded JSON value.

    OpenAI `{"error": {"message", "code", "type"}}`; Anthropic `{"type": "error",
    "error": {"type", "message"}}`; Mistral and vLLM put `message`/`code`/`type` at
    the top level; Ollama sends `{"error": "text"}`; FastAPI servers `{"detail": ...}`.
    """
    if not isinstance(data, Mapping):
        return None
    err = data.get("error")
    if isinstance(err, Mapping):
        inner = _message_of(err) or json.dumps(err)[:MAX_MESSAGE_CHARS]
        return ErrorBody(readable_text(inner), _code_of(err) or _code_of(data))
    if isinstance(err, str) and err:
        return ErrorBody(readable_text(err), _code_of(data))
    message = _message_of(data)
    if message is not None:
        code = _code_of(data)
        # vLLM's `type` is an exception class name ("BadRequestError") and `object` "error".
        return ErrorBody(readable_text(message), "" if code == "error" else code)
    detail = data.get("detail")
    if detail is not None:
        return ErrorBody(readable_text(json.dumps(detail)), "")
    return None


def parse_error_body(body: bytes | str) -> ErrorBody:
    """An error body (JSON of any known shape, HTML, text) as a short message and a code."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        found = error_object(json.loads(text))
    except (ValueError, RecursionError):
        found = None
    return found if found is not None else ErrorBody(readable_text(text))


def _match_code(status: int | None, body: ErrorBody) -> Rule | None:
    code = body.code.lower()
    if code:
        for rule in RULES:
            if code in rule.codes or (status is None and code in rule.stream_codes):
                return rule
    if status is None or 400 <= status < 500:
        message = body.message.lower()
        for rule in RULES:
            if any(p in message for p in rule.phrases):
                return rule
    return None


def classify(
    status: int | None,
    body: ErrorBody,
    *,
    retryable_statuses: Collection[int],
) -> Classified:
    """The table's verdict for one failure; `status` None means an in-stream error."""
    rule = _match_code(status, body)
    if rule is not None:
        kind, retryable = rule.kind, rule.retryable
    elif status is not None:
        by_status = next((r for r in RULES if status in r.statuses), None)
        if by_status is not None:
            kind = by_status.kind
        else:
            kind = SERVER_ERROR if status >= 500 else CLIENT_ERROR
        retryable = status in retryable_statuses
    else:
        # An unknown error inside a stream that had started: the server broke mid-answer.
        kind, retryable = SERVER_ERROR, True
    label = KIND_LABELS.get(kind, kind)
    where = f"HTTP {status} {label}" if status is not None else f"stream error ({label})"
    text = body.message or "no error message"
    if body.code and body.code.lower() not in text.lower():
        text = f"{text} [{body.code}]"
    return Classified(kind, retryable, f"{where}: {text}")
