"""The workspace agent wire format: length-prefixed JSON frames over TCP.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
JSON holding one object. Length prefixes (rather than newlines) let a
reader refuse an oversized frame from its header alone and skip exactly its
bytes, so one bad frame never desynchronises the connection.

Frames are written as ASCII JSON: every non-ASCII character is a ``\\uXXXX``
escape. A file name that is not UTF-8 travels as a str holding lone surrogates
U+DC80..U+DCFF, one per undecodable byte (Python's ``surrogateescape``, the
convention of `os.listdir`); an escaped lone surrogate is valid JSON text, and
the other side turns it back into the same bytes. NaN and Infinity are not JSON
and are refused in both directions, as is nesting deeper than the reader's
`max_depth`.

Requests:  ``{"id": int, "op": str, "args": {...}}``
Responses: ``{"id": int | null, "ok": true, "result": ...}`` or
           ``{"id": int | null, "ok": false, "error": {"kind": str, "message": str}}``

The first request on a connection must be ``{"op": "auth", "args": {"token": ...}}``;
a wrong token is answered with an ``auth`` error and the connection is closed.
Requests carry client-chosen ids and may be answered out of order, so one
connection serves several concurrent calls. A response to a frame whose id
could not be read carries ``"id": null``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final, NoReturn

import trio

# Bumped on an incompatible change of ops or frame layout; the auth reply carries it.
PROTOCOL_VERSION: Final = 1

_HEADER: Final = struct.Struct("!I")
HEADER_BYTES: Final = _HEADER.size

OP_AUTH: Final = "auth"
OP_EXECUTE: Final = "execute"
OP_READ_FILE: Final = "read_file"
OP_WRITE_FILE: Final = "write_file"
OP_LIST_DIR: Final = "list_dir"
OP_INSTRUCTION_FILES: Final = "instruction_files"
OP_MCP_LIST_TOOLS: Final = "mcp_list_tools"
OP_MCP_CALL_TOOL: Final = "mcp_call_tool"

# Error kinds: stable strings a caller may branch on.
ERR_AUTH: Final = "auth"
ERR_RATE_LIMITED: Final = "rate_limited"
ERR_BAD_REQUEST: Final = "bad_request"
ERR_MALFORMED: Final = "malformed_frame"
ERR_TOO_LARGE: Final = "frame_too_large"
ERR_TOO_DEEP: Final = "frame_too_deep"
ERR_UNKNOWN_OP: Final = "unknown_op"
ERR_PATH_ESCAPE: Final = "path_escape"
ERR_NOT_FOUND: Final = "not_found"
ERR_IS_DIRECTORY: Final = "is_directory"
ERR_NOT_DIRECTORY: Final = "not_directory"
ERR_FILE_TOO_LARGE: Final = "file_too_large"
ERR_IO: Final = "io"
ERR_MCP: Final = "mcp"
ERR_INTERNAL: Final = "internal"

JSONObject = dict[str, Any]


class ProtocolError(Exception):
    """The peer broke the wire format; the only exception type framing code raises."""


class FrameError(ProtocolError):
    """A frame that cannot be used.

    `in_sync` tells whether the stream is still at a frame boundary after it (the
    frame was consumed entirely) or must be closed (a refused header left its body unread).
    """

    def __init__(self, kind: str, message: str, *, in_sync: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.in_sync = in_sync


class IncompleteFrame(ProtocolError):
    """The peer closed the stream in the middle of a frame."""


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def encode_frame(obj: JSONObject, *, max_depth: int) -> bytes:
    """One frame: length header plus compact ASCII JSON.

    Raises FrameError when `obj` is not JSON (NaN, Infinity, a non-JSON type, a
    cycle) or nests deeper than `max_depth`; nothing is sent then.
    """
    depth_error = _depth_error(obj, max_depth)
    if depth_error is not None:
        raise FrameError(ERR_TOO_DEEP, depth_error)
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FrameError(ERR_MALFORMED, f"value is not JSON: {exc}") from None
    payload = text.encode("ascii")
    return _HEADER.pack(len(payload)) + payload


def request(request_id: int, op: str, args: JSONObject) -> JSONObject:
    """A request frame body."""
    return {"id": request_id, "op": op, "args": args}


def ok_response(request_id: int | None, result: Any) -> JSONObject:
    """A success response frame body."""
    return {"id": request_id, "ok": True, "result": result}


def error_response(request_id: int | None, kind: str, message: str) -> JSONObject:
    """An error response frame body."""
    return {"id": request_id, "ok": False, "error": {"kind": kind, "message": message}}


class FrameReader:
    """Reads frames from a stream, refusing frames larger than `max_bytes`.

    All parsing state lives on the reader, never in a local of `receive`, so a
    cancelled `receive` loses no bytes and the next call resumes the same frame.
    `max_bytes`, `skip_oversized` and `chunk_bytes` may be changed between frames
    (the agent reads the first frame, before authentication, under tighter limits).
    """

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        *,
        max_bytes: int,
        chunk_bytes: int,
        max_depth: int,
        skip_oversized: bool = True,
    ) -> None:
        self._stream = stream
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self.max_depth = max_depth
        # False: an oversized header raises at once instead of reading and dropping its body.
        self.skip_oversized = skip_oversized
        self._buffer = bytearray()
        self._discard = 0
        self._discarded_size = 0

    async def receive(self) -> JSONObject | None:
        """The next frame's object; None at a clean end of stream.

        Raises FrameError for an oversized or malformed frame and IncompleteFrame
        when the stream ends inside a frame. An oversized frame is consumed
        entirely first when `skip_oversized`, else refused from its header alone
        (`in_sync` False: the caller must close the stream).
        """
        while True:
            frame = self._next_buffered()
            if frame is not None:
                return frame
            # Never read past the frame in progress by more than one chunk.
            data = await self._stream.receive_some(self.chunk_bytes)
            if not data:
                if self._buffer or self._discard:
                    raise IncompleteFrame("connection closed in the middle of a frame")
                return None
            self._buffer += data

    def _next_buffered(self) -> JSONObject | None:
        if self._discard:
            taken = min(self._discard, len(self._buffer))
            del self._buffer[:taken]
            self._discard -= taken
            if self._discard:
                return None
            raise FrameError(
                ERR_TOO_LARGE,
                f"frame of {self._discarded_size} bytes exceeds the limit of "
                f"{self.max_bytes} bytes",
            )
        if len(self._buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > self.max_bytes:
            if not self.skip_oversized:
                raise FrameError(
                    ERR_TOO_LARGE,
                    f"frame of {size} bytes exceeds the limit of {self.max_bytes} bytes",
                    in_sync=False,
                )
            del self._buffer[: _HEADER.size]
            self._discard = size
            self._discarded_size = size
            return self._next_buffered()
        end = _HEADER.size + size
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        return decode_payload(payload, max_depth=self.max_depth)


def decode_payload(payload: bytes, *, max_depth: int) -> JSONObject:
    """The JSON object of one frame; FrameError (and nothing else) when it is not one."""
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        # The C parser recurses per nesting level; it gives up well before the stack does.
        raise FrameError(ERR_TOO_DEEP, f"frame nests deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        # ValueError covers JSONDecodeError, NaN/Infinity and integers beyond
        # Python's digit limit; its message may quote the input, so keep it short.
        raise FrameError(ERR_MALFORMED, f"frame is not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise FrameError(ERR_MALFORMED, "frame must be a JSON object")
    depth_error = _depth_error(obj, max_depth)
    if depth_error is not None:
        raise FrameError(ERR_TOO_DEEP, depth_error)
    return obj


def _depth_error(obj: Any, max_depth: int) -> str | None:
    """Why `obj` nests too deeply, or None; iterative, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > max_depth:
            return f"frame nests deeper than {max_depth} levels"
        stack.extend((child, depth + 1) for child in children)
    return None
