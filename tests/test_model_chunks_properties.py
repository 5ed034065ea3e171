"""Property: whatever a server sends as one event, both adapters either turn it into
deltas or raise their own `ModelError`; nothing else escapes (issue 15's RecursionError
was one such escape)."""

from __future__ import annotations

import json

import httpx_sse
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd_trio.errors import ModelError
from chatd_trio.models import anthropic, openai

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "type",
        "index",
        "delta",
        "content_block",
        "choices",
        "error",
        "usage",
        "message",
        "tool_calls",
        "function",
        "text",
        "partial_json",
        "stop_reason",
        "finish_reason",
        "id",
        "name",
        "signature",
        "thinking",
        "data",
        "content",
        "reasoning_content",
    ]
)
# Objects built from the keys the adapters look at, so the parsers are reached deep down.
shaped = st.recursive(
    json_values,
    lambda inner: st.dictionaries(KEYS, inner, max_size=5) | st.lists(inner, max_size=3),
    max_leaves=30,
)
payloads = (shaped | json_values).map(json.dumps) | st.text(max_size=50) | st.just("[" * 50_000)
EVENTS = st.sampled_from(
    [
        "",
        "message",
        "error",
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
    ]
)

# Only their parsers are used: no request is ever sent, so one client each is enough.
OPENAI = openai.OpenAIChatModel("http://127.0.0.1:9/v1", "k", "m")
ANTHROPIC = anthropic.AnthropicModel("k", "m", base_url="http://127.0.0.1:9")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(EVENTS, payloads), min_size=1, max_size=6))
def test_openai_chunks_yield_deltas_or_the_adapters_error(events: list[tuple[str, str]]) -> None:
    model = OPENAI
    state = openai._StreamState()
    for name, data in events:
        try:
            model._handle(httpx_sse.ServerSentEvent(event=name, data=data), state)
        except ModelError:
            return


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(EVENTS, payloads), min_size=1, max_size=8))
def test_anthropic_events_yield_deltas_or_the_adapters_error(
    events: list[tuple[str, str]],
) -> None:
    model = ANTHROPIC
    state = anthropic._StreamState()
    for name, data in events:
        try:
            model._handle(httpx_sse.ServerSentEvent(event=name, data=data), state)
        except ModelError:
            return
    for index in list(state.blocks):
        model._close_block(index, state)
    state.to_usage()
