"""The workspace agent: a Trio TCP server that runs commands and file operations in one directory.

Start it in a nursery with ``await nursery.start(serve_agent, directory, token=...)``
(it reports the bound ``(host, port)``) or as a process with
``chatd-trio agent --dir DIR --listen HOST:PORT --token TOKEN`` (`main`).

Each connection authenticates with its first frame, then may send many
requests; they are served concurrently (up to a per-connection limit) and
answered by id, in completion order. Bad frames get an error response and the
connection keeps serving. When the client disconnects, its in-flight requests
are cancelled (a running command's whole process tree is killed).

Connections are isolated: whatever one sends, at worst that connection closes
and the agent and its other connections go on. Before authentication a peer
gets little: one frame of at most `AgentConfig.max_auth_frame_bytes`, read
within `auth_timeout`, among at most `max_connections` connections, and failed
attempts are rate-limited per peer host. The security model, including what
`execute` does and does not confine, is in docs/security.md.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import logging
import os
import posixpath
import shlex
import stat
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from chatd_trio._groups import leaves
from chatd_trio.agent import protocol as p
from chatd_trio.agent.confine import PathEscape, Root
from chatd_trio.agent.mcp import McpFailure, McpHub, McpServerConfig
from chatd_trio.agent.proctree import kill_tree, prepare_subreaper
from chatd_trio.config import AgentConfig, Config

logger = logging.getLogger(__name__)

_SHELL = "/bin/sh"
TOKEN_ENV = "CHATD_AGENT_TOKEN"
# accept() failing for lack of descriptors or memory is transient: wait, then accept again.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY = 0.1


class OpError(Exception):
    """A request failed in a way the client should see: `kind` plus a clear message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


Handler = Callable[[p.JSONObject], Awaitable[Any]]


async def serve_agent(
    directory: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str,
    mcp_servers: Mapping[str, McpServerConfig] | None = None,
    home_instruction_file: Path | None = None,
    config: Config | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the workspace agent for `directory` until cancelled.

    Reports the bound ``(host, port)`` through `task_status`; `port=0` picks a free port.
    """
    if not token:
        raise ValueError("the agent token must not be empty")
    root = Path(await trio.Path(directory).resolve())
    if not await trio.Path(root).is_dir():
        raise ValueError(f"workspace directory {directory} does not exist or is not a directory")
    cfg = config or Config()
    # Absolute paths may name the directory as given as well as its resolved form.
    confined = Root(root, aliases=(Path(await trio.Path(directory).absolute()),))
    try:
        async with trio.open_nursery() as nursery:
            hub = McpHub(mcp_servers or {}, directory=root, config=cfg.agent, nursery=nursery)
            agent = _Agent(
                root=confined,
                root_path=root,
                token=token,
                hub=hub,
                home_instruction_file=home_instruction_file,
                config=cfg,
            )
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound_host, bound_port = listeners[0].socket.getsockname()[:2]
            logger.info(
                "workspace agent listening",
                extra={"host": bound_host, "port": bound_port, "directory": str(root)},
            )
            slots = trio.Semaphore(cfg.agent.max_connections)
            for listener in listeners:
                nursery.start_soon(agent.accept_loop, listener, slots, nursery)
            task_status.started((bound_host, bound_port))
    finally:
        confined.close()


@dataclass
class _Connection:
    stream: trio.SocketStream
    peer: str
    host: str
    config: AgentConfig
    send_lock: trio.Lock

    async def send(self, obj: p.JSONObject) -> None:
        """Send one frame; a peer that does not take it within send_timeout is broken."""
        data = _encode_response(obj, self.config)
        async with self.send_lock:
            with trio.move_on_after(self.config.send_timeout) as scope:
                await self.stream.send_all(data)
        if scope.cancelled_caught:
            # A half-sent frame leaves the stream unusable for every later response.
            await trio.aclose_forcefully(self.stream)
            raise trio.BrokenResourceError("peer did not read a response in time")


def _encode_response(obj: p.JSONObject, config: AgentConfig) -> bytes:
    """`obj` as a frame, or an error frame in its place when it cannot be one."""
    request_id = obj.get("id")
    try:
        data = p.encode_frame(obj, max_depth=config.max_frame_depth)
    except p.FrameError as exc:
        return p.encode_frame(
            p.error_response(request_id, p.ERR_INTERNAL, f"result cannot be sent: {exc.message}"),
            max_depth=config.max_frame_depth,
        )
    if len(data) > config.max_frame_bytes:
        return p.encode_frame(
            p.error_response(
                request_id,
                p.ERR_TOO_LARGE,
                f"response of {len(data)} bytes exceeds the frame limit of "
                f"{config.max_frame_bytes} bytes",
            ),
            max_depth=config.max_frame_depth,
        )
    return data


class AuthFailureLimiter:
    """Failed authentications per peer host: a token bucket of `burst`, refilled at `rate`/s.

    Only hosts with a recent failure are remembered, at most `max_hosts` of them.
    """

    def __init__(self, *, burst: int, rate: float, max_hosts: int) -> None:
        self._burst = burst
        self._rate = rate
        self._max_hosts = max_hosts
        # host -> (tokens, time of the last update)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, host: str, now: float) -> float:
        bucket = self._buckets.get(host)
        if bucket is None:
            return float(self._burst)
        tokens, then = bucket
        return min(float(self._burst), tokens + (now - then) * self._rate)

    def allowed(self, host: str, now: float) -> bool:
        """Whether `host` may try a token now."""
        return self._tokens(host, now) >= 1.0

    def failed(self, host: str, now: float) -> None:
        """Record a wrong token from `host`."""
        self._buckets[host] = (self._tokens(host, now) - 1.0, now)
        self._buckets.move_to_end(host)
        while len(self._buckets) > self._max_hosts:
            self._buckets.popitem(last=False)


class _Agent:
    def __init__(
        self,
        *,
        root: Root,
        root_path: Path,
        token: str,
        hub: McpHub,
        home_instruction_file: Path | None,
        config: Config,
    ) -> None:
        self._root = root
        self._root_path = root_path
        self._token = token.encode("utf-8", "surrogatepass")
        self._hub = hub
        self._home_instruction_file = home_instruction_file
        self._cfg = config.agent
        self._instruction_max_bytes = config.workspace.instruction_file_max_bytes
        self._auth_failures = AuthFailureLimiter(
            burst=self._cfg.auth_failure_burst,
            rate=self._cfg.auth_failure_rate,
            max_hosts=self._cfg.auth_failure_max_hosts,
        )
        self._subreaper = prepare_subreaper()
        self._ops: dict[str, Handler] = {
            p.OP_EXECUTE: self._op_execute,
            p.OP_READ_FILE: self._op_read_file,
            p.OP_WRITE_FILE: self._op_write_file,
            p.OP_LIST_DIR: self._op_list_dir,
            p.OP_INSTRUCTION_FILES: self._op_instruction_files,
            p.OP_MCP_LIST_TOOLS: self._op_mcp_list_tools,
            p.OP_MCP_CALL_TOOL: self._op_mcp_call_tool,
        }

    # -- connections ------------------------------------------------------------

    async def accept_loop(
        self, listener: trio.SocketListener, slots: trio.Semaphore, nursery: trio.Nursery
    ) -> None:
        """Accept connections while fewer than `max_connections` are open; closes `listener`."""
        async with listener:
            while True:
                # At the cap we stop accepting: new connections wait in the listen backlog.
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    slots.release()
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    logger.warning("agent cannot accept a connection", extra={"error": str(exc)})
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(self._handle, stream, slots)

    async def _handle(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            await self.serve_connection(stream)
        except Exception:
            # Isolation: a bug reached by one connection's input ends that connection only.
            logger.exception("agent connection failed")
        finally:
            slots.release()

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection until it closes; errors end this connection only."""
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            host = peer = "?"
        conn = _Connection(
            stream=stream, peer=peer, host=str(host), config=self._cfg, send_lock=trio.Lock()
        )
        # Before authentication: one small frame, refused from its header when larger.
        reader = p.FrameReader(
            stream,
            max_bytes=self._cfg.max_auth_frame_bytes,
            chunk_bytes=min(self._cfg.read_chunk_bytes, self._cfg.max_auth_frame_bytes),
            max_depth=self._cfg.max_frame_depth,
            skip_oversized=False,
        )
        try:
            if await self._authenticate(conn, reader):
                reader.max_bytes = self._cfg.max_frame_bytes
                reader.chunk_bytes = self._cfg.read_chunk_bytes
                reader.skip_oversized = True
                await self._serve_requests(conn, reader)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, p.ProtocolError) as group:
            reasons = ", ".join(repr(leaf) for leaf in leaves(group))
            logger.debug("agent connection ended", extra={"peer": peer, "reason": reasons})
        except* Exception:
            logger.exception("agent connection failed", extra={"peer": peer})
        finally:
            await trio.aclose_forcefully(stream)

    async def _authenticate(self, conn: _Connection, reader: p.FrameReader) -> bool:
        # One deadline, counted from the connect, for the whole exchange: trickling bytes
        # or a peer that does not read the refusal cannot extend it.
        with trio.move_on_after(self._cfg.auth_timeout):
            try:
                frame = await reader.receive()
            except p.FrameError as exc:
                await self._refuse(conn, None, exc.kind, exc.message)
                return False
            if frame is None:
                return False
            request_id = _request_id(frame)
            now = trio.current_time()
            if not self._auth_failures.allowed(conn.host, now):
                refused, kind, message = (
                    "agent authentication rate-limited",
                    p.ERR_RATE_LIMITED,
                    "too many failed authentications from this host; try again later",
                )
            elif self._holds_token(frame):
                await conn.send(p.ok_response(request_id, {"version": p.PROTOCOL_VERSION}))
                return True
            else:
                self._auth_failures.failed(conn.host, now)
                refused, kind, message = (
                    "agent authentication refused",
                    p.ERR_AUTH,
                    "authentication failed: the first request must be 'auth' "
                    "with the agent's token",
                )
            logger.warning(refused, extra={"peer": conn.peer})
            await self._refuse(conn, request_id, kind, message)
        return False

    def _holds_token(self, frame: p.JSONObject) -> bool:
        """The frame is an `auth` request carrying this agent's token."""
        args = frame.get("args")
        token = args.get("token") if isinstance(args, dict) else None
        return (
            frame.get("op") == p.OP_AUTH
            and isinstance(token, str)
            and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token)
        )

    async def _refuse(
        self, conn: _Connection, request_id: int | None, kind: str, message: str
    ) -> None:
        """Send the refusal, then close so that the peer can read it.

        Closing with unread input would reset the connection and the peer would lose
        the refusal: so end our side, then read and drop (never keep) what the peer
        still sends until it closes too, within the caller's deadline.
        """
        await conn.send(p.error_response(request_id, kind, message))
        await conn.stream.send_eof()
        while await conn.stream.receive_some(self._cfg.read_chunk_bytes):
            pass

    async def _serve_requests(self, conn: _Connection, reader: p.FrameReader) -> None:
        inflight = trio.Semaphore(self._cfg.max_inflight_per_connection)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    frame = await reader.receive()
                except p.FrameError as exc:
                    await conn.send(p.error_response(None, exc.kind, exc.message))
                    if not exc.in_sync:
                        break
                    continue
                if frame is None:
                    break
                await inflight.acquire()
                nursery.start_soon(self._serve_request, conn, frame, inflight)
            # The client is gone: nobody will read these answers, stop the work.
            nursery.cancel_scope.cancel()

    async def _serve_request(
        self, conn: _Connection, frame: p.JSONObject, inflight: trio.Semaphore
    ) -> None:
        try:
            request_id = _request_id(frame)
            op = frame.get("op")
            extra = {"peer": conn.peer, "op": str(op)[:100], "request_id": request_id}
            try:
                result = await self._dispatch(frame)
            except OpError as exc:
                logger.debug("agent request failed", extra={**extra, "kind": exc.kind})
                response = p.error_response(request_id, exc.kind, exc.message)
            except Exception as exc:
                logger.exception("agent request crashed", extra=extra)
                response = p.error_response(request_id, p.ERR_INTERNAL, repr(exc))
            else:
                response = p.ok_response(request_id, result)
            try:
                await conn.send(response)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                logger.debug("agent response undeliverable", extra=extra)
        finally:
            inflight.release()

    async def _dispatch(self, frame: p.JSONObject) -> Any:
        if _request_id(frame) is None:
            raise OpError(p.ERR_BAD_REQUEST, "request needs an integer 'id'")
        op = frame.get("op")
        if not isinstance(op, str):
            raise OpError(p.ERR_BAD_REQUEST, "request needs a string 'op'")
        handler = self._ops.get(op)
        if handler is None:
            known = ", ".join(sorted(self._ops))
            raise OpError(p.ERR_UNKNOWN_OP, f"unknown op {op[:100]!r} (known: {known})")
        args = frame.get("args", {})
        if not isinstance(args, dict):
            raise OpError(p.ERR_BAD_REQUEST, "'args' must be a JSON object")
        return await handler(args)

    # -- execute ----------------------------------------------------------------

    async def _op_execute(self, args: p.JSONObject) -> p.JSONObject:
        command = _arg(args, "command", str)
        timeout = _arg(args, "timeout", (int, float))
        if not 0 < timeout <= self._cfg.max_exec_timeout:
            raise OpError(
                p.ERR_BAD_REQUEST,
                f"'timeout' must be in (0, {self._cfg.max_exec_timeout}] seconds",
            )
        limit = args.get("output_limit")
        if limit is None:
            limit = self._cfg.default_output_limit
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not 0 <= limit <= self._cfg.max_output_limit
        ):
            raise OpError(
                p.ERR_BAD_REQUEST,
                f"'output_limit' must be an integer in [0, {self._cfg.max_output_limit}]",
            )
        if "\x00" in command:
            raise OpError(p.ERR_BAD_REQUEST, "command contains a NUL byte")
        try:
            argv = [_SHELL, "-c", command.encode("utf-8", "surrogateescape")]
        except UnicodeEncodeError:
            raise OpError(
                p.ERR_BAD_REQUEST, "command holds a lone surrogate that stands for no byte"
            ) from None
        return await self._execute(argv, float(timeout), limit)

    async def _execute(
        self, argv: list[str | bytes], time_limit: float, limit: int
    ) -> p.JSONObject:
        output = bytearray()
        total = 0
        process: trio.Process | None = None
        read_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[trio.Process]) -> None:
            await trio.run_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=str(self._root_path),
                env=_command_environment(),
                check=False,
                # Own session, and a subreaper: whatever the command starts (setsid and
                # double forks included) stays in its tree, and a timeout kills the tree.
                start_new_session=True,
                preexec_fn=self._subreaper,
                deliver_cancel=_kill_process_tree,
                task_status=task_status,
            )
            # Exited: the rest of the output is in the pipe, unless a daemonised child holds it.
            read_scope.deadline = min(
                read_scope.deadline, trio.current_time() + self._cfg.kill_grace
            )

        try:
            with trio.move_on_after(time_limit) as timeout_scope:
                async with trio.open_nursery() as nursery:
                    process = await nursery.start(run)
                    stdout = process.stdout
                    assert stdout is not None
                    try:
                        with read_scope:
                            while data := await stdout.receive_some(self._cfg.read_chunk_bytes):
                                total += len(data)
                                room = limit - len(output)
                                if room > 0:
                                    output += data[:room]
                    finally:
                        await trio.aclose_forcefully(stdout)
        except OSError as exc:
            raise OpError(p.ERR_IO, f"cannot run command: {exc}") from None
        assert process is not None
        return {
            "exit_code": process.returncode,
            "output": output.decode(errors="replace"),
            "truncated": total > limit,
            "timed_out": timeout_scope.cancelled_caught,
        }

    # -- files ------------------------------------------------------------------

    def _relative(self, raw: str) -> bytes:
        """The client's path as bytes relative to the root (not yet resolved: `Root.open` does)."""
        if "\x00" in raw:
            raise OpError(p.ERR_BAD_REQUEST, "path contains a NUL byte")
        try:
            path = raw.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise OpError(
                p.ERR_BAD_REQUEST,
                f"path {_quote(raw)} holds a lone surrogate outside U+DC80..U+DCFF, which stands "
                "for no byte",
            ) from None
        try:
            relative = self._root.relative(path)
        except PathEscape:
            raise self._escape(raw) from None
        # Text that climbs above the root is refused before any lookup, existing or not.
        normal = posixpath.normpath(relative or b".")
        if normal == b".." or normal.startswith(b"../"):
            raise self._escape(raw)
        return relative

    def _escape(self, raw: str) -> OpError:
        return OpError(
            p.ERR_PATH_ESCAPE,
            f"path {_quote(raw)} leads outside the workspace directory {self._root_path}",
        )

    @contextmanager
    def _open(self, raw: str, flags: int) -> Iterator[int]:
        """A descriptor of the client's path `raw`, opened beneath the root; closed on exit."""
        relative = self._relative(raw)
        with _translate_os_errors(raw):
            try:
                fd = self._root.open(relative, flags)
            except PathEscape:
                raise self._escape(raw) from None
            try:
                yield fd
            finally:
                os.close(fd)

    async def _op_read_file(self, args: p.JSONObject) -> p.JSONObject:
        raw = _arg(args, "path", str)
        return await trio.to_thread.run_sync(self._read_file, raw)

    def _read_file(self, raw: str) -> p.JSONObject:
        limit = self._cfg.max_file_bytes
        # O_NONBLOCK: opening a FIFO must not block a worker thread until a writer comes.
        with self._open(raw, os.O_RDONLY | os.O_NONBLOCK) as fd:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise OpError(p.ERR_IS_DIRECTORY, f"{_quote(raw)} is a directory")
            if not stat.S_ISREG(info.st_mode):
                raise OpError(p.ERR_IO, f"{_quote(raw)} is not a regular file")
            with _translate_os_errors(raw):
                data = _read_up_to(fd, limit + 1)
        return {
            "path": _display(self._relative(raw)),
            "content": data[:limit].decode(errors="replace"),
            "size": info.st_size,
            "truncated": len(data) > limit,
        }

    async def _op_write_file(self, args: p.JSONObject) -> p.JSONObject:
        raw = _arg(args, "path", str)
        content = _arg(args, "content", str)
        return await trio.to_thread.run_sync(self._write_file, raw, content)

    def _write_file(self, raw: str, content: str) -> p.JSONObject:
        try:
            # surrogateescape: a str read with it (os.listdir-style) writes its exact bytes.
            data = content.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise OpError(
                p.ERR_BAD_REQUEST,
                "content holds a lone surrogate outside U+DC80..U+DCFF, which stands for no byte",
            ) from None
        if len(data) > self._cfg.max_file_bytes:
            raise OpError(
                p.ERR_FILE_TOO_LARGE,
                f"content of {len(data)} bytes exceeds the limit of {self._cfg.max_file_bytes}",
            )
        relative = self._relative(raw)
        parent = posixpath.dirname(relative.rstrip(b"/"))
        if parent:
            with _translate_os_errors(raw):
                try:
                    self._root.makedirs(parent)
                except PathEscape:
                    raise self._escape(raw) from None
        # No O_TRUNC before the check: a FIFO or device is refused, not written to.
        with self._open(raw, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK) as fd:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OpError(p.ERR_IO, f"{_quote(raw)} is not a regular file")
            with _translate_os_errors(raw):
                os.ftruncate(fd, 0)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
        return {"path": _display(relative), "bytes": len(data)}

    async def _op_list_dir(self, args: p.JSONObject) -> p.JSONObject:
        raw = args.get("path", ".")
        if not isinstance(raw, str):
            raise OpError(p.ERR_BAD_REQUEST, "'path' must be a string")
        return await trio.to_thread.run_sync(self._list_dir, raw)

    def _list_dir(self, raw: str) -> p.JSONObject:
        entries: list[p.JSONObject] = []
        with (
            self._open(raw, os.O_RDONLY | os.O_DIRECTORY) as fd,
            _translate_os_errors(raw),
            os.scandir(fd) as it,
        ):
            for entry in it:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the directory was read
                if stat.S_ISLNK(info.st_mode):
                    kind = "symlink"
                elif stat.S_ISDIR(info.st_mode):
                    kind = "dir"
                elif stat.S_ISREG(info.st_mode):
                    kind = "file"
                else:
                    kind = "other"
                name = _wire_name(os.fsencode(entry.name))
                entries.append({"name": name, "kind": kind, "size": info.st_size})
        entries.sort(key=lambda e: e["name"])
        limit = self._cfg.max_dir_entries
        return {
            "path": _display(self._relative(raw)),
            "entries": entries[:limit],
            "truncated": len(entries) > limit,
        }

    # -- instruction files ------------------------------------------------------

    async def _op_instruction_files(self, args: p.JSONObject) -> p.JSONObject:
        return {"files": await trio.to_thread.run_sync(self._instruction_files)}

    def _instruction_files(self) -> list[p.JSONObject]:
        files: list[p.JSONObject] = []
        if self._home_instruction_file is not None:
            # The home file is the agent operator's own: not confined to the workspace.
            home = self._home_instruction_file.expanduser()
            data = self._read_instruction_file(home, lambda: os.open(home, os.O_RDONLY))
            if data is not None:
                files.append(self._instruction(str(home), data))
        name = self._cfg.instruction_file_name
        workspace_file = self._root_path / name
        data = self._read_instruction_file(
            workspace_file,
            lambda: self._root.open(os.fsencode(name), os.O_RDONLY | os.O_NONBLOCK),
        )
        if data is not None:
            files.append(self._instruction(str(workspace_file), data))
        return files

    def _read_instruction_file(self, path: Path, opener: Callable[[], int]) -> bytes | None:
        limit = self._instruction_max_bytes
        try:
            fd = opener()
        except PathEscape:
            logger.warning(
                "workspace instruction file points outside the workspace",
                extra={"path": str(path)},
            )
            return None
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            logger.warning(
                "instruction file unreadable", extra={"path": str(path), "error": str(exc)}
            )
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return _read_up_to(fd, limit + 1)
        except OSError as exc:
            logger.warning(
                "instruction file unreadable", extra={"path": str(path), "error": str(exc)}
            )
            return None
        finally:
            os.close(fd)

    def _instruction(self, path: str, data: bytes) -> p.JSONObject:
        limit = self._instruction_max_bytes
        return {
            "path": path,
            "content": data[:limit].decode(errors="replace"),
            "truncated": len(data) > limit,
        }

    # -- MCP --------------------------------------------------------------------

    async def _op_mcp_list_tools(self, args: p.JSONObject) -> p.JSONObject:
        tools, errors = await self._hub.list_tools()
        return {"tools": tools, "errors": errors}

    async def _op_mcp_call_tool(self, args: p.JSONObject) -> p.JSONObject:
        server = _arg(args, "server", str)
        tool = _arg(args, "tool", str)
        arguments = args.get("arguments", {})
        if not isinstance(arguments, dict):
            raise OpError(p.ERR_BAD_REQUEST, "'arguments' must be a JSON object")
        try:
            return await self._hub.call_tool(server, tool, arguments)
        except McpFailure as exc:
            raise OpError(p.ERR_MCP, str(exc)) from None


def _quote(raw: str) -> str:
    """A client's path for an error message: quoted, and cut short when it is huge."""
    return repr(raw) if len(raw) <= 300 else repr(raw[:300]) + f"... ({len(raw)} characters)"


def _command_environment() -> dict[str, str]:
    """The agent's environment without its token: `env` in a command must not print it."""
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    return env


def _wire_name(name: bytes) -> str:
    """A file name for the wire: undecodable bytes become lone surrogates (surrogateescape)."""
    return name.decode("utf-8", "surrogateescape")


def _display(relative: bytes) -> str:
    """The path shown back to the client: relative to the root, normalised as text."""
    return _wire_name(posixpath.normpath(relative or b".")).removeprefix("./") or "."


def _read_up_to(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _request_id(frame: p.JSONObject) -> int | None:
    request_id = frame.get("id")
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        return request_id
    return None


def _arg(args: p.JSONObject, name: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
    value = args.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise OpError(p.ERR_BAD_REQUEST, f"argument {name!r} must be {names}")
    return value


@contextmanager
def _translate_os_errors(raw: str) -> Iterator[None]:
    """Turn filesystem errors into OpErrors naming the path the client asked for."""
    try:
        yield
    except FileNotFoundError:
        raise OpError(p.ERR_NOT_FOUND, f"{_quote(raw)} does not exist") from None
    except IsADirectoryError:
        raise OpError(p.ERR_IS_DIRECTORY, f"{_quote(raw)} is a directory") from None
    except NotADirectoryError:
        raise OpError(p.ERR_NOT_DIRECTORY, f"{_quote(raw)} is not a directory") from None
    except OSError as exc:
        raise OpError(p.ERR_IO, f"{_quote(raw)}: {exc.strerror or exc}") from None


async def _kill_process_tree(process: trio.Process) -> None:
    # One blocking pass in a thread: it stops the whole tree before killing any of it.
    killed = await trio.to_thread.run_sync(kill_tree, process.pid)
    logger.debug("command killed", extra={"pid": process.pid, "processes": killed})


# -- process entry point --------------------------------------------------------


def add_agent_command(subparsers: Any) -> None:
    """Register `chatd-trio agent` on an argparse subparsers object."""
    parser = subparsers.add_parser("agent", help="run a workspace agent (TCP server)")
    _add_agent_arguments(parser)


def _add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, type=Path, help="workspace directory")
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)"
    )
    parser.add_argument("--token", default=None, help=f"the agent's secret (default: ${TOKEN_ENV})")
    parser.add_argument(
        "--mcp",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="an MCP stdio server, e.g. --mcp 'files=npx server-files .' (repeatable)",
    )
    parser.add_argument("--home-instruction-file", type=Path, default=None)


def run_agent_command(args: argparse.Namespace) -> int:
    """Run the agent from parsed `chatd-trio agent` arguments until interrupted."""
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"chatd-trio agent: --token or ${TOKEN_ENV} is required", file=sys.stderr)
        return 2
    try:
        host, port = parse_listen(args.listen)
        servers = dict(_parse_mcp(spec) for spec in args.mcp)
    except ValueError as exc:
        print(f"chatd-trio agent: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            bound_host, bound_port = await nursery.start(
                partial(
                    serve_agent,
                    args.dir,
                    host=host,
                    port=port,
                    token=token,
                    mcp_servers=servers,
                    home_instruction_file=args.home_instruction_file,
                )
            )
            print(f"agent listening on {bound_host}:{bound_port}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    """`chatd-trio agent --dir DIR --listen HOST:PORT --token TOKEN` as a standalone entry point."""
    parser = argparse.ArgumentParser(
        prog="chatd-trio agent", description="Run a workspace agent (TCP server)."
    )
    _add_agent_arguments(parser)
    return run_agent_command(parser.parse_args(argv))


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host.removeprefix("[").removesuffix("]"), port


def _parse_mcp(spec: str) -> tuple[str, McpServerConfig]:
    name, sep, command = spec.partition("=")
    argv = shlex.split(command)
    if not sep or not name or not argv:
        raise ValueError(f"expected --mcp NAME=COMMAND, got {spec!r}")
    return name, McpServerConfig(command=argv[0], args=tuple(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
