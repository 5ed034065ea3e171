"""The connection to a workspace agent, and `dial_agent`.

One connection carries many concurrent calls (parallel tools share it):
requests carry ids and responses are matched to them.

File names are bytes on disk and str here, mapped as `os.listdir` does
(``surrogateescape``): a byte that is not part of valid UTF-8 becomes a lone
surrogate U+DC80..U+DCFF. A name from `list_dir` passed back to `read_file` or
`write_file` therefore names the same file, and `DirEntry.raw_name` gives the
bytes. `write_file` encodes its content the same way; `read_file` and `execute`
return text with undecodable bytes replaced by U+FFFD.

Structure: there is no background reader task. Whichever caller is waiting
for a response and finds nobody reading becomes the reader; it reads frames,
hands each response to its caller, and stops when its own response arrives,
passing the reader role to another waiting caller. So every read runs inside
a caller's own task (and nursery), a connection needs no nursery of its own,
and `dial_agent` can return a plain ``(conn, release)`` pair. The frame
parser keeps its state on the connection, so a reader cancelled mid-frame
loses nothing: the next reader resumes the same frame.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import pydantic
import trio

from chatd_trio import validation
from chatd_trio._cleanup import bounded_cleanup
from chatd_trio._closing import AsyncClosing
from chatd_trio.agent import protocol as p

# The records the connection returns are the port's (re-exported: the client's users
# import them from here or from `chatd_trio.agent`).
from chatd_trio.agent.base import (
    DirEntry,
    ExecResult,
    FileContent,
    InstructionFile,
    McpCallResult,
    McpTool,
    Release,
)
from chatd_trio.config import AgentConfig
from chatd_trio.domain import JSON, WorkspaceAgent
from chatd_trio.errors import (
    AgentAuthError,
    AgentConnectionLost,
    AgentError,
    AgentOperationError,
    AgentUnavailable,
)

logger = logging.getLogger(__name__)

ERR_BAD_RESPONSE = "bad_response"


@dataclass
class _Pending:
    wake: trio.Event = field(default_factory=trio.Event)
    response: p.JSONObject | None = None


class AgentConn(AsyncClosing):
    """An authenticated connection to one workspace agent; safe to use from many tasks."""

    def __init__(self, stream: trio.abc.Stream, *, agent: WorkspaceAgent, config: AgentConfig):
        self._stream = stream
        self._agent = agent
        self._config = config
        self._reader = p.FrameReader(
            stream,
            max_bytes=config.max_frame_bytes,
            chunk_bytes=config.read_chunk_bytes,
            max_depth=config.max_frame_depth,
        )
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._reading = False
        # Set once: every later call raises a fresh exception of this type and message.
        self._failure: tuple[type[AgentError], str] | None = None

    @property
    def agent(self) -> WorkspaceAgent:
        """The agent this connection talks to."""
        return self._agent

    @property
    def closed(self) -> bool:
        """True once released or broken; every call then raises."""
        return self._failure is not None

    async def aclose(self) -> None:
        """Close the connection; idempotent. Calls in flight raise AgentUnavailable."""
        self._fail(AgentUnavailable, "connection released")
        await trio.aclose_forcefully(self._stream)

    # -- operations -------------------------------------------------------------

    async def execute(
        self,
        command: str,
        timeout: float,  # noqa: ASYNC109 - the command's limit on the agent, not a local deadline
        *,
        output_limit: int | None = None,
    ) -> ExecResult:
        """Run `command` with `/bin/sh -c` in the workspace directory.

        The agent kills it after `timeout` seconds (`timed_out`); output (stdout and
        stderr merged) beyond `output_limit` bytes is dropped (`truncated`).
        """
        args: p.JSONObject = {"command": command, "timeout": timeout}
        if output_limit is not None:
            args["output_limit"] = output_limit
        r = await self._call(p.OP_EXECUTE, args)
        return ExecResult(**_read(_EXEC, r))

    async def read_file(self, path: str) -> FileContent:
        """Read a file inside the workspace directory (relative or absolute path).

        `path` may hold surrogate-escaped bytes, as `list_dir` names do. The content is
        text: bytes that are not UTF-8 come back as U+FFFD.
        """
        r = await self._call(p.OP_READ_FILE, {"path": path})
        return FileContent(**_read(_FILE, r))

    async def write_file(self, path: str, content: str) -> int:
        """Write (create or replace) a file inside the workspace; returns the bytes written.

        Missing parent directories are created. `path` and `content` are encoded as UTF-8
        with surrogateescape, so surrogate-escaped bytes are written as those bytes.
        """
        r = await self._call(p.OP_WRITE_FILE, {"path": path, "content": content})
        written: int = _read(_WRITTEN, r)["bytes"]
        return written

    async def list_dir(self, path: str = ".") -> list[DirEntry]:
        """The entries of a directory inside the workspace, sorted by name.

        Names that are not UTF-8 come surrogate-escaped (`DirEntry.raw_name` has the bytes).
        """
        r = await self._call(p.OP_LIST_DIR, {"path": path})
        return [DirEntry(**_fields(e)) for e in _read(_ENTRIES, r)["entries"]]

    async def instruction_files(self) -> list[InstructionFile]:
        """The home instruction file and `<dir>/AGENTS.md`, those that exist."""
        r = await self._call(p.OP_INSTRUCTION_FILES, {})
        return [InstructionFile(**_fields(f)) for f in _read(_FILES, r)["files"]]

    async def mcp_list_tools(self) -> list[McpTool]:
        """Tools of every MCP server of the workspace; a server that fails is left out."""
        r = await self._call(p.OP_MCP_LIST_TOOLS, {})
        errors = r.get("errors") or {}
        if errors:
            logger.warning(
                "mcp servers failed discovery", extra={"agent_id": str(self._agent.id), **errors}
            )
        return [McpTool(**_fields(t)) for t in _read(_TOOLS, r)["tools"]]

    async def mcp_call_tool(
        self, server: str, tool: str, arguments: dict[str, JSON]
    ) -> McpCallResult:
        """Call `tool` on the workspace's MCP server `server`."""
        r = await self._call(
            p.OP_MCP_CALL_TOOL, {"server": server, "tool": tool, "arguments": arguments}
        )
        return McpCallResult(**_read(_MCP_RESULT, r))

    # -- request/response -------------------------------------------------------

    async def _call(self, op: str, args: p.JSONObject) -> Any:
        self._raise_if_failed()
        request_id = next(self._ids)
        pending = _Pending()
        self._pending[request_id] = pending
        try:
            await self._send(p.request(request_id, op, args))
            response = await self._wait_for(pending)
        finally:
            # A cancelled caller's late response finds no entry and is dropped.
            del self._pending[request_id]
        if response.get("ok") is True:
            return response.get("result")
        error = response.get("error")
        kind = error.get("kind") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(kind, str) or not isinstance(message, str):
            raise AgentOperationError(ERR_BAD_RESPONSE, f"malformed error response to {op!r}")
        if kind == p.ERR_AUTH:
            raise AgentAuthError(f"agent {self._agent.id} refused the token: {message}")
        if kind == p.ERR_RATE_LIMITED and op == p.OP_AUTH:
            # Transient, unlike a wrong token: the host may try again once its bucket refills.
            raise AgentUnavailable(f"agent {self._agent.id} at {self._agent.address}: {message}")
        raise AgentOperationError(kind, message)

    async def _send(self, obj: p.JSONObject) -> None:
        try:
            data = p.encode_frame(obj, max_depth=self._config.max_frame_depth)
        except p.FrameError as exc:
            # Nothing was sent: the connection is untouched, only this call fails.
            raise AgentOperationError(
                p.ERR_BAD_REQUEST, f"request not sent: {exc.message}"
            ) from None
        if len(data) > self._config.max_frame_bytes:
            raise AgentOperationError(
                p.ERR_TOO_LARGE,
                f"request of {len(data)} bytes exceeds the frame limit of "
                f"{self._config.max_frame_bytes} bytes",
            )
        async with self._send_lock:
            self._raise_if_failed()
            # A half-sent frame would corrupt the stream for every other caller: a send
            # is never interrupted by the caller's cancellation, only by its own deadline.
            with bounded_cleanup(self._config.send_timeout) as scope:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    await self._break(AgentConnectionLost, f"sending failed: {exc}")
            if scope.cancelled_caught:
                await self._break(AgentConnectionLost, "the agent does not accept data")
        self._raise_if_failed()

    async def _wait_for(self, pending: _Pending) -> p.JSONObject:
        while True:
            if pending.response is not None:
                return pending.response
            self._raise_if_failed()
            if not self._reading:
                self._reading = True
                try:
                    while pending.response is None and self._failure is None:
                        await self._read_one()
                finally:
                    self._reading = False
                    self._hand_off()
                continue
            await pending.wake.wait()
            # Conditions are re-checked as state above, so a merged wake-up loses nothing.
            pending.wake = trio.Event()

    async def _read_one(self) -> None:
        try:
            frame = await self._reader.receive()
        except p.FrameError as exc:
            await self._break(AgentUnavailable, f"the agent sent a bad frame: {exc.message}")
            return
        except (p.IncompleteFrame, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await self._break(AgentConnectionLost, f"connection lost: {exc}")
            return
        if frame is None:
            await self._break(AgentConnectionLost, "the agent closed the connection")
            return
        request_id = frame.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None:
            logger.debug(
                "agent response without a waiting caller",
                extra={"agent_id": str(self._agent.id), "request_id": request_id},
            )
            return
        pending.response = frame
        pending.wake.set()

    def _hand_off(self) -> None:
        for pending in self._pending.values():
            if pending.response is None:
                pending.wake.set()
                return

    def _fail(self, kind: type[AgentError], message: str) -> None:
        if self._failure is None:
            self._failure = (kind, message)
        for pending in self._pending.values():
            pending.wake.set()

    async def _break(self, kind: type[AgentError], message: str) -> None:
        first = self._failure is None
        self._fail(kind, message)
        if first:
            logger.info(
                "agent connection broken",
                extra={"agent_id": str(self._agent.id), "reason": message},
            )
        # Closing also wakes a reader blocked in receive on this stream.
        await trio.aclose_forcefully(self._stream)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            kind, message = self._failure
            raise kind(f"agent {self._agent.id} at {self._agent.address}: {message}")

    async def _authenticate(self, token: str) -> int:
        result = await self._call(p.OP_AUTH, {"token": token})
        version = result.get("version") if isinstance(result, dict) else None
        if version != p.PROTOCOL_VERSION:
            raise AgentUnavailable(
                f"agent {self._agent.id} speaks protocol {version!r}, expected {p.PROTOCOL_VERSION}"
            )
        return p.PROTOCOL_VERSION


async def dial_agent(
    agent: WorkspaceAgent,
    *,
    connect_timeout: float | None = None,
    config: AgentConfig | None = None,
) -> tuple[AgentConn, Release]:
    """Connect to `agent` and authenticate; returns the connection and its release.

    Raises AgentUnavailable when nothing answers (refused, timed out) and
    AgentAuthError when the agent refuses the token. The caller must await the
    release exactly once (it is idempotent, so a second call is harmless).
    """
    cfg = config or AgentConfig()
    timeout = cfg.connect_timeout if connect_timeout is None else connect_timeout
    try:
        host, port = _split_address(agent.address)
    except ValueError as exc:
        raise AgentUnavailable(f"agent {agent.id}: {exc}") from None
    try:
        with trio.fail_after(timeout):
            stream = await _connect(host, port)
    except trio.TooSlowError:
        raise AgentUnavailable(
            f"agent {agent.id} at {agent.address}: connect timed out after {timeout} s"
        ) from None
    except OSError as exc:
        raise AgentUnavailable(
            f"agent {agent.id} at {agent.address}: {exc.strerror or exc}"
        ) from exc
    conn = AgentConn(stream, agent=agent, config=cfg)
    try:
        with trio.fail_after(cfg.auth_timeout):
            await conn._authenticate(agent.token)
    except trio.TooSlowError:
        await conn.aclose()
        raise AgentUnavailable(
            f"agent {agent.id} at {agent.address}: no answer to authentication "
            f"within {cfg.auth_timeout} s"
        ) from None
    except BaseException:
        await conn.aclose()
        raise
    return conn, conn.aclose


async def _connect(host: str, port: int) -> trio.SocketStream:
    """A TCP stream to `host`: an IP address is connected to directly, a name (or an
    address with an IPv6 zone) through `trio.open_tcp_stream` (resolution, then each
    address in turn). A turn dials its agent once; the direct way spares the resolver
    call and the happy-eyeballs nursery a literal address does not need."""
    try:
        ip = ipaddress.ip_address(host) if "%" not in host else None
    except ValueError:
        ip = None
    if ip is None:
        return await trio.open_tcp_stream(host, port)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid agent address {address!r}, expected host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


# -- response shapes (chatd_trio.validation: the library's one check of JSON data) --------


def _shape(title: str, /, **fields: Any) -> type[pydantic.BaseModel]:
    return validation.shape(title, {k: (v, ...) for k, v in fields.items()})


def _list_of(item: Any) -> Any:
    return list.__class_getitem__(item)


_EXEC = _shape("ExecResponse", exit_code=int, output=str, truncated=bool, timed_out=bool)
_FILE = _shape("ReadFileResponse", path=str, content=str, size=int, truncated=bool)
_WRITTEN = _shape("WriteFileResponse", bytes=int)
_ENTRY = _shape("DirEntryResponse", name=str, kind=str, size=int)
_ENTRIES = _shape("ListDirResponse", entries=_list_of(_ENTRY))
_FILE_ITEM = _shape("InstructionFileResponse", path=str, content=str, truncated=bool)
_FILES = _shape("InstructionFilesResponse", files=_list_of(_FILE_ITEM))
_TOOL = _shape(
    "McpToolResponse", server=str, name=str, description=str, input_schema=dict[str, Any]
)
_TOOLS = _shape("McpToolsResponse", tools=_list_of(_TOOL))
_MCP_RESULT = validation.shape(
    "McpCallResponse",
    {
        "content": (list[dict[str, Any]], ...),
        "is_error": (bool, ...),
        "structured_content": (Any, None),
    },
)


def _read(model: type[pydantic.BaseModel], response: Any) -> dict[str, Any]:
    """The response's fields, checked against `model`; `bad_response` naming each bad one."""
    try:
        return _fields(validation.check(model, response, what="response"))
    except validation.Invalid as exc:
        raise AgentOperationError(ERR_BAD_RESPONSE, str(exc)) from None


def _fields(values: pydantic.BaseModel) -> dict[str, Any]:
    return {name: getattr(values, name) for name in type(values).model_fields}
