"""The workspace agent: a Trio TCP server that runs commands and file operations in one directory.

Start it in a nursery with ``await nursery.start(serve_agent, directory, token=...)``
(it reports the bound ``(host, port)``) or as a process with
``chatd-trio agent --dir DIR --listen HOST:PORT --token TOKEN`` (`main`).

Each connection authenticates with its first frame, then may send many
requests; they are served concurrently (up to a per-connection limit) and
answered by id, in completion order. Bad frames get an error response and the
connection keeps serving. When the client disconnects, its in-flight requests
are cancelled (a running command's process group is killed).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from chatd_trio.agent import protocol as p
from chatd_trio.agent.mcp import McpFailure, McpHub, McpServerConfig
from chatd_trio.config import AgentConfig, Config

logger = logging.getLogger(__name__)

_SHELL = "/bin/sh"
TOKEN_ENV = "CHATD_AGENT_TOKEN"


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
    root = await trio.Path(directory).resolve()
    if not await root.is_dir():
        raise ValueError(f"workspace directory {directory} does not exist or is not a directory")
    cfg = config or Config()
    async with trio.open_nursery() as nursery:
        hub = McpHub(mcp_servers or {}, directory=Path(root), config=cfg.agent, nursery=nursery)
        agent = _Agent(
            root=Path(root),
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
        await nursery.start(
            partial(
                trio.serve_listeners, agent.serve_connection, listeners, handler_nursery=nursery
            )
        )
        task_status.started((bound_host, bound_port))


@dataclass
class _Connection:
    stream: trio.SocketStream
    peer: str
    config: AgentConfig
    send_lock: trio.Lock

    async def send(self, obj: p.JSONObject) -> None:
        """Send one frame; a peer that does not take it within send_timeout is broken."""
        data = p.encode_frame(obj)
        if len(data) > self.config.max_frame_bytes:
            data = p.encode_frame(
                p.error_response(
                    obj.get("id"),
                    p.ERR_TOO_LARGE,
                    f"response of {len(data)} bytes exceeds the frame limit of "
                    f"{self.config.max_frame_bytes} bytes",
                )
            )
        async with self.send_lock:
            with trio.move_on_after(self.config.send_timeout) as scope:
                await self.stream.send_all(data)
        if scope.cancelled_caught:
            # A half-sent frame leaves the stream unusable for every later response.
            await trio.aclose_forcefully(self.stream)
            raise trio.BrokenResourceError("peer did not read a response in time")


class _Agent:
    def __init__(
        self,
        *,
        root: Path,
        token: str,
        hub: McpHub,
        home_instruction_file: Path | None,
        config: Config,
    ) -> None:
        self._root = root
        self._token = token.encode()
        self._hub = hub
        self._home_instruction_file = home_instruction_file
        self._cfg = config.agent
        self._instruction_max_bytes = config.workspace.instruction_file_max_bytes
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

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        conn = _Connection(stream=stream, peer=peer, config=self._cfg, send_lock=trio.Lock())
        reader = p.FrameReader(
            stream, max_bytes=self._cfg.max_frame_bytes, chunk_bytes=self._cfg.read_chunk_bytes
        )
        try:
            if await self._authenticate(conn, reader):
                await self._serve_requests(conn, reader)
        # except*: raised inside _serve_requests' nursery they arrive in a group.
        except* (trio.BrokenResourceError, trio.ClosedResourceError, p.IncompleteFrame) as group:
            logger.debug("agent connection ended", extra={"peer": peer, "reason": repr(group)})
        finally:
            await trio.aclose_forcefully(stream)

    async def _authenticate(self, conn: _Connection, reader: p.FrameReader) -> bool:
        frame: p.JSONObject | None = None
        with trio.move_on_after(self._cfg.auth_timeout):
            try:
                frame = await reader.receive()
            except p.FrameError as exc:
                await conn.send(p.error_response(None, exc.kind, exc.message))
                return False
        if frame is None:
            return False
        request_id = _request_id(frame)
        args = frame.get("args")
        token = args.get("token") if isinstance(args, dict) else None
        if (
            frame.get("op") == p.OP_AUTH
            and isinstance(token, str)
            and hmac.compare_digest(token.encode(), self._token)
        ):
            await conn.send(p.ok_response(request_id, {"version": p.PROTOCOL_VERSION}))
            return True
        logger.warning("agent authentication refused", extra={"peer": conn.peer})
        await conn.send(
            p.error_response(
                request_id,
                p.ERR_AUTH,
                "authentication failed: the first request must be 'auth' with the agent's token",
            )
        )
        return False

    async def _serve_requests(self, conn: _Connection, reader: p.FrameReader) -> None:
        inflight = trio.Semaphore(self._cfg.max_inflight_per_connection)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    frame = await reader.receive()
                except p.FrameError as exc:
                    await conn.send(p.error_response(None, exc.kind, exc.message))
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
            extra = {"peer": conn.peer, "op": op, "request_id": request_id}
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
            raise OpError(p.ERR_UNKNOWN_OP, f"unknown op {op!r} (known: {known})")
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
        return await self._execute(command, float(timeout), limit)

    async def _execute(self, command: str, time_limit: float, limit: int) -> p.JSONObject:
        output = bytearray()
        total = 0
        process: trio.Process | None = None
        read_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[trio.Process]) -> None:
            await trio.run_process(
                [_SHELL, "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=str(self._root),
                check=False,
                # Own process group, so a timeout kills the command's children too.
                start_new_session=True,
                deliver_cancel=_kill_process_group,
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

    def _confine(self, raw: str) -> Path:
        """The resolved path of `raw` (relative to the root, or absolute) inside the root."""
        if "\x00" in raw:
            raise OpError(p.ERR_BAD_REQUEST, "path contains a NUL byte")
        candidate = Path(raw)
        if not candidate.is_absolute():
            candidate = self._root / candidate
        # resolve() follows every symlink, dangling ones included, so a link out is caught.
        resolved = candidate.resolve()
        if not resolved.is_relative_to(self._root):
            raise OpError(
                p.ERR_PATH_ESCAPE,
                f"path {raw!r} resolves to {resolved}, outside the workspace directory "
                f"{self._root}",
            )
        return resolved

    def _relative(self, path: Path) -> str:
        return path.relative_to(self._root).as_posix() or "."

    async def _op_read_file(self, args: p.JSONObject) -> p.JSONObject:
        raw = _arg(args, "path", str)
        return await trio.to_thread.run_sync(self._read_file, raw)

    def _read_file(self, raw: str) -> p.JSONObject:
        path = self._confine(raw)
        limit = self._cfg.max_file_bytes
        with _translate_os_errors(raw):
            # O_NOFOLLOW: a symlink swapped in after the check is refused, not followed.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                info = os.fstat(f.fileno())
                if stat.S_ISDIR(info.st_mode):
                    raise OpError(p.ERR_IS_DIRECTORY, f"{raw!r} is a directory")
                data = f.read(limit + 1)
        return {
            "path": self._relative(path),
            "content": data[:limit].decode(errors="replace"),
            "size": info.st_size,
            "truncated": len(data) > limit,
        }

    async def _op_write_file(self, args: p.JSONObject) -> p.JSONObject:
        raw = _arg(args, "path", str)
        content = _arg(args, "content", str)
        return await trio.to_thread.run_sync(self._write_file, raw, content)

    def _write_file(self, raw: str, content: str) -> p.JSONObject:
        data = content.encode()
        if len(data) > self._cfg.max_file_bytes:
            raise OpError(
                p.ERR_FILE_TOO_LARGE,
                f"content of {len(data)} bytes exceeds the limit of {self._cfg.max_file_bytes}",
            )
        path = self._confine(raw)
        with _translate_os_errors(raw):
            if path.is_dir():
                raise OpError(p.ERR_IS_DIRECTORY, f"{raw!r} is a directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return {"path": self._relative(path), "bytes": len(data)}

    async def _op_list_dir(self, args: p.JSONObject) -> p.JSONObject:
        raw = args.get("path", ".")
        if not isinstance(raw, str):
            raise OpError(p.ERR_BAD_REQUEST, "'path' must be a string")
        return await trio.to_thread.run_sync(self._list_dir, raw)

    def _list_dir(self, raw: str) -> p.JSONObject:
        path = self._confine(raw)
        entries: list[p.JSONObject] = []
        with _translate_os_errors(raw), os.scandir(path) as it:
            for entry in it:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    kind = "symlink"
                elif stat.S_ISDIR(info.st_mode):
                    kind = "dir"
                elif stat.S_ISREG(info.st_mode):
                    kind = "file"
                else:
                    kind = "other"
                entries.append({"name": entry.name, "kind": kind, "size": info.st_size})
        entries.sort(key=lambda e: e["name"])
        limit = self._cfg.max_dir_entries
        return {
            "path": self._relative(path),
            "entries": entries[:limit],
            "truncated": len(entries) > limit,
        }

    # -- instruction files ------------------------------------------------------

    async def _op_instruction_files(self, args: p.JSONObject) -> p.JSONObject:
        return {"files": await trio.to_thread.run_sync(self._instruction_files)}

    def _instruction_files(self) -> list[p.JSONObject]:
        candidates: list[Path] = []
        if self._home_instruction_file is not None:
            # The home file is the agent operator's own: not confined to the workspace.
            candidates.append(self._home_instruction_file.expanduser())
        workspace_file = self._root / self._cfg.instruction_file_name
        try:
            candidates.append(self._confine(str(workspace_file)))
        except OpError:
            logger.warning(
                "workspace instruction file points outside the workspace",
                extra={"path": str(workspace_file)},
            )
        files: list[p.JSONObject] = []
        limit = self._instruction_max_bytes
        for path in candidates:
            try:
                with path.open("rb") as f:
                    data = f.read(limit + 1)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                logger.warning(
                    "instruction file unreadable", extra={"path": str(path), "error": str(exc)}
                )
                continue
            files.append(
                {
                    "path": str(path),
                    "content": data[:limit].decode(errors="replace"),
                    "truncated": len(data) > limit,
                }
            )
        return files

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
        raise OpError(p.ERR_NOT_FOUND, f"{raw!r} does not exist") from None
    except IsADirectoryError:
        raise OpError(p.ERR_IS_DIRECTORY, f"{raw!r} is a directory") from None
    except NotADirectoryError:
        raise OpError(p.ERR_NOT_DIRECTORY, f"{raw!r} is not a directory") from None
    except OSError as exc:
        raise OpError(p.ERR_IO, f"{raw!r}: {exc.strerror or exc}") from None


async def _kill_process_group(process: trio.Process) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await trio.lowlevel.checkpoint()


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
