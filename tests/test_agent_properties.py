"""Property tests of the agent wire format and server against arbitrary frames (issue 15).

Invariants:
- decoding any bytes yields a JSON object or the protocol's own error, nothing else;
- whatever one connection sends, before or after authentication, the agent answers
  only with well-formed frames, and its other connections and new dials go on working.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd_trio.agent import protocol as p
from chatd_trio.domain import WorkspaceAgent
from tests.test_agent import DEPTH, GUARD, TOKEN, raw_client, running_agent
from tests.test_agent_hardening import dialed, frame_of

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)

# Ops a random request may name: everything but `execute` (random shell text is not
# something to run), plus names that are no op at all.
ops = st.sampled_from(
    [
        p.OP_AUTH,
        p.OP_LIST_DIR,
        p.OP_READ_FILE,
        p.OP_WRITE_FILE,
        p.OP_INSTRUCTION_FILES,
        p.OP_MCP_LIST_TOOLS,
        p.OP_MCP_CALL_TOOL,
        "no_such_op",
    ]
) | st.text(max_size=20).filter(lambda op: op != p.OP_EXECUTE)

requests = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers() | json_values,
        "op": ops | json_values,
        "args": st.dictionaries(
            st.sampled_from(["path", "content", "token", "server", "tool", "arguments"])
            | st.text(max_size=5),
            json_values,
            max_size=4,
        )
        | json_values,
    },
).map(lambda obj: json.dumps(obj).encode())

deep = st.builds(
    lambda opener, n: opener * n,
    st.sampled_from([b"[", b'{"a":', b'{"id":1,"op":"list_dir","args":', b'["\\u']),
    st.sampled_from([DEPTH, DEPTH + 1, 1000, 5000, 100_000]) | st.integers(1, 200_000),
)

payloads = st.one_of(
    requests,
    deep,
    deep,  # twice: the case that killed the agent deserves the weight
    st.binary(max_size=300),
    st.sampled_from([b'{"a":NaN}', b'{"a":Infinity}', b"[1e999]", b'{"a":' + b"9" * 5000 + b"}"]),
    st.binary(min_size=1, max_size=8).map(lambda b: b'{"a":"' + b + b'"}'),  # bad UTF-8
)

pieces = st.one_of(
    payloads.map(frame_of),
    # A header announcing anything up to 4 GiB, followed by a little of its body.
    st.builds(
        lambda size, body: size.to_bytes(4, "big") + body,
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
    ),
    st.binary(max_size=64),  # unframed garbage
)

streams = st.lists(pieces, min_size=1, max_size=6).map(b"".join)


class ChunkedStream:
    """A receive stream handing out `data` in the given chunk sizes."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self._data = data
        self._sizes = sizes or [len(data) or 1]
        self._turn = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = self._sizes[self._turn % len(self._sizes)]
        self._turn += 1
        take = min(size, max_bytes or size)
        chunk, self._data = self._data[:take], self._data[take:]
        return chunk


@settings(max_examples=400, deadline=None)
@given(payload=payloads | st.binary(max_size=2000))
def test_decode_yields_an_object_or_a_frame_error(payload: bytes) -> None:
    try:
        obj = p.decode_payload(payload, max_depth=DEPTH)
    except p.FrameError as exc:
        assert exc.kind in (p.ERR_MALFORMED, p.ERR_TOO_DEEP)
    else:
        assert isinstance(obj, dict)
        # What was accepted can be sent back: the depth cap holds both ways.
        assert p.decode_payload(p.encode_frame(obj, max_depth=DEPTH)[4:], max_depth=DEPTH) == obj


@settings(max_examples=200, deadline=None)
@given(
    data=streams,
    sizes=st.lists(st.integers(1, 70_000), max_size=5),
    max_bytes=st.sampled_from([64, 4096, 1 << 20]),
    skip_oversized=st.booleans(),
)
async def test_frame_reader_yields_objects_or_protocol_errors_only(
    data: bytes, sizes: list[int], max_bytes: int, skip_oversized: bool
) -> None:
    reader = p.FrameReader(
        ChunkedStream(data, sizes),  # type: ignore[arg-type]
        max_bytes=max_bytes,
        chunk_bytes=65536,
        max_depth=DEPTH,
        skip_oversized=skip_oversized,
    )
    for _ in range(len(data) + 2):
        try:
            frame = await reader.receive()
        except p.IncompleteFrame:
            return
        except p.FrameError as exc:
            assert exc.kind in (p.ERR_MALFORMED, p.ERR_TOO_DEEP, p.ERR_TOO_LARGE)
            if not exc.in_sync:
                assert not skip_oversized
                return
            continue
        if frame is None:
            return
        assert isinstance(frame, dict)
    raise AssertionError("the reader made no progress")


async def exchange(agent: WorkspaceAgent, data: bytes, *, authenticate: bool) -> list[Any]:
    """Send `data` on a fresh connection, then end it; every frame the agent sent back."""
    received: list[Any] = []
    async with raw_client(agent) as raw:
        if authenticate:
            assert (await raw.request(0, p.OP_AUTH, {"token": TOKEN}))["ok"] is True

        async def send() -> None:
            try:
                await raw.send_bytes(data)
                await raw.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the agent closed first: allowed

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            try:
                while (frame := await raw.reader.receive()) is not None:
                    received.append(frame)
            except trio.BrokenResourceError:
                pass
    return received


def well_formed(frame: Any) -> bool:
    shapes = ({"id", "ok", "result"}, {"id", "ok", "error"})
    if not isinstance(frame, dict) or set(frame) not in shapes:
        return False
    if frame["ok"] is True:
        return "result" in frame
    error = frame["error"]
    return (
        frame["ok"] is False
        and isinstance(error, dict)
        and isinstance(error.get("kind"), str)
        and isinstance(error.get("message"), str)
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=streams, authenticate=st.booleans())
async def test_any_bytes_on_one_connection_leave_the_agent_serving(
    data: bytes, authenticate: bool
) -> None:
    """Before or after auth: answers are well-formed frames; other connections live on."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with trio.fail_after(GUARD):
            async with running_agent(root) as agent, dialed(agent) as other:
                frames = await exchange(agent, data, authenticate=authenticate)
                assert all(well_formed(f) for f in frames), frames
                if not authenticate:
                    # Before auth the agent answers at most the one frame it reads.
                    assert len(frames) <= 1
                    assert all(f["ok"] is False for f in frames)
                await other.instruction_files()
                async with dialed(agent) as fresh:
                    await fresh.mcp_list_tools()
