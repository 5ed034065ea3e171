"""The workspace agent wire format: length-prefixed JSON frames over TCP.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
UTF-8 JSON holding one object. Length prefixes (rather than newlines) let a
reader refuse an oversized frame from its header alone and skip exactly its
bytes, so one bad frame never desynchronises the connection.

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
from typing import Any, Final

import trio

# Bumped on an incompatible change of ops or frame layout; the auth reply carries it.
PROTOCOL_VERSION: Final = 1

_HEADER: Final = struct.Struct("!I")

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
ERR_BAD_REQUEST: Final = "bad_request"
ERR_MALFORMED: Final = "malformed_frame"
ERR_TOO_LARGE: Final = "frame_too_large"
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


class FrameError(Exception):
    """A complete frame that cannot be used; the stream is still in sync after it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class IncompleteFrame(Exception):
    """The peer closed the stream in the middle of a frame."""


def encode_frame(obj: JSONObject) -> bytes:
    """One frame: length header plus compact UTF-8 JSON."""
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
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
    """

    def __init__(self, stream: trio.abc.ReceiveStream, *, max_bytes: int, chunk_bytes: int) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._chunk_bytes = chunk_bytes
        self._buffer = bytearray()
        self._discard = 0
        self._discarded_size = 0

    async def receive(self) -> JSONObject | None:
        """The next frame's object; None at a clean end of stream.

        Raises FrameError for an oversized or malformed frame (after consuming
        it entirely) and IncompleteFrame when the stream ends inside a frame.
        """
        while True:
            frame = self._next_buffered()
            if frame is not None:
                return frame
            data = await self._stream.receive_some(self._chunk_bytes)
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
                f"{self._max_bytes} bytes",
            )
        if len(self._buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if size > self._max_bytes:
            del self._buffer[: _HEADER.size]
            self._discard = size
            self._discarded_size = size
            return self._next_buffered()
        end = _HEADER.size + size
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        return decode_payload(payload)


def decode_payload(payload: bytes) -> JSONObject:
    """The JSON object of one frame; FrameError when it is not one."""
    try:
        obj = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(ERR_MALFORMED, f"frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(ERR_MALFORMED, "frame must be a JSON object")
    return obj
