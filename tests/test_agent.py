"""The workspace agent server and its connection, over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd_trio.agent import (
    AgentConn,
    McpServerConfig,
    McpTool,
    dial_agent,
    serve_agent,
)
from chatd_trio.agent import protocol as p
from chatd_trio.config import AgentConfig, Config, WorkspaceConfig
from chatd_trio.domain import WorkspaceAgent
from chatd_trio.errors import (
    AgentAuthError,
    AgentConnectionLost,
    AgentOperationError,
    AgentUnavailable,
)

TOKEN = "s3cret-token"
FIXTURE_MCP = Path(__file__).with_name("fixtures_mcp_server.py")
# Real sockets and processes run on the real clock; this only bounds a broken test.
GUARD = 30
DEPTH = AgentConfig().max_frame_depth


def make_agent(address: str, directory: Path, token: str = TOKEN) -> WorkspaceAgent:
    return WorkspaceAgent(
        id=uuid.uuid4(),
        build_id=uuid.uuid4(),
        workspace_id=uuid.uuid4(),
        name="main",
        address=address,
        token=token,
        directory=str(directory),
        created_at=datetime.now(UTC),
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace.resolve()


@asynccontextmanager
async def running_agent(root: Path, **kwargs: Any) -> AsyncIterator[WorkspaceAgent]:
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(partial(serve_agent, root, token=TOKEN, **kwargs))
        yield make_agent(f"{host}:{port}", root)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(root: Path, **kwargs: Any) -> AsyncIterator[AgentConn]:
    async with running_agent(root, **kwargs) as agent:
        conn, release = await dial_agent(agent)
        try:
            yield conn
        finally:
            await release()


class RawClient:
    """Speaks frames directly, to send what AgentConn never would."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = p.FrameReader(stream, max_bytes=1 << 20, chunk_bytes=4096, max_depth=DEPTH)

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, request_id: int, op: str, args: dict[str, Any]) -> dict[str, Any]:
        await self.stream.send_all(p.encode_frame(p.request(request_id, op, args), max_depth=DEPTH))
        return await self.receive()

    async def receive(self) -> dict[str, Any]:
        frame = await self.reader.receive()
        assert frame is not None
        return frame


@asynccontextmanager
async def raw_client(agent: WorkspaceAgent) -> AsyncIterator[RawClient]:
    host, port = agent.address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        yield RawClient(stream)
    finally:
        await stream.aclose()


async def wait_process_exit(pid: int) -> None:
    """Wait until process `pid` has exited (a pidfd turns readable then; no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(GUARD):
            await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


# -- execute ------------------------------------------------------------------


async def test_execute_returns_exit_code_and_merged_output(root: Path) -> None:
    async with connected(root) as conn:
        result = await conn.execute("echo out; echo err >&2; pwd; exit 3", timeout=GUARD)
    assert result.exit_code == 3
    assert result.output.splitlines() == ["out", "err", str(root)]
    assert not result.truncated
    assert not result.timed_out


async def test_execute_timeout_kills_the_whole_process_group(root: Path) -> None:
    async with connected(root) as conn:
        # The background child would outlive a kill of the shell alone.
        result = await conn.execute("sleep 60 & echo $!; wait", timeout=0.5)
    assert result.timed_out
    assert result.exit_code == -signal.SIGKILL
    child = int(result.output.split()[0])
    await wait_process_exit(child)


async def test_execute_returns_when_a_detached_child_keeps_the_pipe(root: Path) -> None:
    cfg = Config(agent=AgentConfig(kill_grace=0.2))
    async with connected(root, config=cfg) as conn:
        result = await conn.execute("setsid sleep 60 & echo $!", timeout=GUARD)
    detached = int(result.output.split()[0])
    try:
        assert result.exit_code == 0
        assert not result.timed_out
    finally:
        os.kill(detached, signal.SIGKILL)


async def test_execute_caps_output(root: Path) -> None:
    async with connected(root) as conn:
        capped = await conn.execute(
            "head -c 100000 /dev/zero | tr '\\0' a", GUARD, output_limit=1000
        )
        small = await conn.execute("printf abc", GUARD, output_limit=1000)
    assert capped.output == "a" * 1000
    assert capped.truncated
    assert capped.exit_code == 0
    assert not capped.timed_out
    assert small.output == "abc"
    assert not small.truncated


async def test_execute_rejects_bad_arguments(root: Path) -> None:
    async with connected(root) as conn:
        with pytest.raises(AgentOperationError) as bad_timeout:
            await conn.execute("true", timeout=0)
        with pytest.raises(AgentOperationError) as bad_limit:
            await conn.execute("true", GUARD, output_limit=-1)
        # The connection still serves after refused requests.
        assert (await conn.execute("true", GUARD)).exit_code == 0
    assert bad_timeout.value.kind == p.ERR_BAD_REQUEST
    assert "timeout" in bad_timeout.value.message
    assert bad_limit.value.kind == p.ERR_BAD_REQUEST


# -- files --------------------------------------------------------------------


async def test_write_read_list_inside_the_directory(root: Path) -> None:
    async with connected(root) as conn:
        written = await conn.write_file("sub/dir/a.txt", "héllo\n")
        read = await conn.read_file("sub/dir/a.txt")
        read_abs = await conn.read_file(str(root / "sub" / "dir" / "a.txt"))
        top = await conn.list_dir(".")
        nested = await conn.list_dir("sub/dir")
        await conn.write_file("sub/dir/a.txt", "replaced")
        replaced = await conn.read_file("sub/dir/a.txt")
    assert written == len("héllo\n".encode())
    assert (root / "sub" / "dir" / "a.txt").read_text() == "replaced"
    assert read.content == "héllo\n"
    assert read.path == "sub/dir/a.txt"
    assert read.size == written
    assert not read.truncated
    assert read_abs.content == read.content
    assert [(e.name, e.kind) for e in top] == [("sub", "dir")]
    assert [(e.name, e.kind, e.size) for e in nested] == [("a.txt", "file", written)]
    assert replaced.content == "replaced"


async def test_file_errors_are_clear(root: Path) -> None:
    (root / "d").mkdir()
    (root / "f").write_text("x")
    cfg = Config(agent=AgentConfig(max_file_bytes=8))
    (root / "big").write_text("0123456789abc")
    async with connected(root, config=cfg) as conn:
        errors = {}
        for name, call in {
            "missing": conn.read_file("nope.txt"),
            "read_dir": conn.read_file("d"),
            "write_dir": conn.write_file("d", "x"),
            "list_file": conn.list_dir("f"),
            "list_missing": conn.list_dir("nope"),
            "too_big": conn.write_file("x", "123456789"),
        }.items():
            with pytest.raises(AgentOperationError) as info:
                await call
            errors[name] = info.value.kind
        big = await conn.read_file("big")
    assert errors == {
        "missing": p.ERR_NOT_FOUND,
        "read_dir": p.ERR_IS_DIRECTORY,
        "write_dir": p.ERR_IS_DIRECTORY,
        "list_file": p.ERR_NOT_DIRECTORY,
        "list_missing": p.ERR_NOT_FOUND,
        "too_big": p.ERR_FILE_TOO_LARGE,
    }
    assert big.content == "01234567"
    assert big.truncated
    assert big.size == 13


async def test_paths_escaping_the_directory_are_refused(root: Path) -> None:
    outside = root.parent / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("secret")
    (root / "link_file").symlink_to(secret)
    (root / "link_dir").symlink_to(outside)
    (root / "dangling").symlink_to(outside / "new.txt")
    (root / "inner.txt").write_text("inner")
    (root / "link_inside").symlink_to(root / "inner.txt")
    async with connected(root) as conn:
        attempts = [
            conn.read_file("../outside/secret.txt"),
            conn.read_file("sub/../../outside/secret.txt"),
            conn.read_file(str(secret)),
            conn.read_file("/etc/passwd"),
            conn.read_file("link_file"),
            conn.read_file("link_dir/secret.txt"),
            conn.write_file("../outside/secret.txt", "pwned"),
            conn.write_file("link_file", "pwned"),
            conn.write_file("link_dir/secret.txt", "pwned"),
            conn.write_file("dangling", "pwned"),
            conn.list_dir(".."),
            conn.list_dir("link_dir"),
        ]
        for attempt in attempts:
            with pytest.raises(AgentOperationError) as info:
                await attempt
            assert info.value.kind == p.ERR_PATH_ESCAPE
            assert "outside the workspace directory" in info.value.message
        # A symlink that stays inside is fine.
        inside = await conn.read_file("link_inside")
    assert inside.content == "inner"
    assert secret.read_text() == "secret"
    assert not (outside / "new.txt").exists()


# -- authentication and framing -----------------------------------------------


async def test_wrong_token_is_refused_and_the_server_keeps_serving(root: Path) -> None:
    async with running_agent(root) as agent:
        with pytest.raises(AgentAuthError):
            await dial_agent(make_agent(agent.address, root, token="wrong"))
        conn, release = await dial_agent(agent)
        try:
            assert (await conn.execute("echo ok", GUARD)).output == "ok\n"
        finally:
            await release()


async def test_first_frame_must_authenticate_then_connection_closes(root: Path) -> None:
    async with running_agent(root) as agent, raw_client(agent) as raw:
        response = await raw.request(1, p.OP_LIST_DIR, {"path": "."})
        assert response["ok"] is False
        assert response["error"]["kind"] == p.ERR_AUTH
        assert await raw.reader.receive() is None


async def test_bad_frames_get_errors_and_the_connection_keeps_serving(root: Path) -> None:
    cfg = Config(agent=AgentConfig(max_frame_bytes=1024))
    async with running_agent(root, config=cfg) as agent, raw_client(agent) as raw:
        assert (await raw.request(0, p.OP_AUTH, {"token": TOKEN}))["ok"] is True
        await raw.send_bytes(b"\x00\x00\x00\x05hello")
        not_json = await raw.receive()
        await raw.send_bytes(b"\x00\x00\x00\x03[1]")
        not_object = await raw.receive()
        await raw.send_bytes((5000).to_bytes(4, "big") + b"x" * 5000)
        oversized = await raw.receive()
        unknown = await raw.request(7, "format_disk", {})
        no_id = await raw.request("x", p.OP_LIST_DIR, {})  # type: ignore[arg-type]
        bad_args = await raw.request(8, p.OP_READ_FILE, {"path": 42})
        listing = await raw.request(9, p.OP_LIST_DIR, {"path": "."})
    assert (not_json["id"], not_json["error"]["kind"]) == (None, p.ERR_MALFORMED)
    assert (not_object["id"], not_object["error"]["kind"]) == (None, p.ERR_MALFORMED)
    assert (oversized["id"], oversized["error"]["kind"]) == (None, p.ERR_TOO_LARGE)
    assert "5000 bytes" in oversized["error"]["message"]
    assert (unknown["id"], unknown["error"]["kind"]) == (7, p.ERR_UNKNOWN_OP)
    assert "format_disk" in unknown["error"]["message"]
    assert (no_id["id"], no_id["error"]["kind"]) == (None, p.ERR_BAD_REQUEST)
    assert (bad_args["id"], bad_args["error"]["kind"]) == (8, p.ERR_BAD_REQUEST)
    assert listing == {
        "id": 9,
        "ok": True,
        "result": {"path": ".", "entries": [], "truncated": False},
    }


# -- concurrency --------------------------------------------------------------


async def test_parallel_calls_share_one_connection(root: Path) -> None:
    results: dict[int, str] = {}
    async with connected(root) as conn:

        async def run(n: int) -> None:
            results[n] = (await conn.execute(f"echo call-{n}; exit {n}", GUARD)).output

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(run, n)
    assert results == {n: f"call-{n}\n" for n in range(5)}


async def test_responses_are_matched_out_of_order(root: Path) -> None:
    """The first call can only finish after the second one ran: serialising would deadlock."""
    os.mkfifo(root / "pipe")
    first: list[str] = []
    async with connected(root) as conn:

        async def reader() -> None:
            first.append((await conn.execute("cat pipe", GUARD)).output)

        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                second = await conn.execute("echo through-the-pipe > pipe; echo wrote", GUARD)
                listing = await conn.list_dir(".")
    assert first == ["through-the-pipe\n"]
    assert second.output == "wrote\n"
    assert [e.kind for e in listing] == ["other"]


async def test_cancelled_call_does_not_disturb_others(root: Path) -> None:
    async with connected(root) as conn:
        with trio.move_on_after(0.2):
            await conn.execute("sleep 60", GUARD)
        assert (await conn.execute("echo still-fine", GUARD)).output == "still-fine\n"


async def test_release_is_idempotent_and_fails_later_calls(root: Path) -> None:
    async with running_agent(root) as agent:
        conn, release = await dial_agent(agent)
        await release()
        await release()
        assert conn.closed
        with pytest.raises(AgentUnavailable, match="released"):
            await conn.list_dir(".")


# -- instruction files --------------------------------------------------------


async def test_instruction_files_present_absent_and_capped(tmp_path: Path, root: Path) -> None:
    home = tmp_path / "home-instructions.md"
    async with connected(root, home_instruction_file=home) as conn:
        absent = await conn.instruction_files()
        home.write_text("home rules")
        (root / "AGENTS.md").write_text("workspace rules")
        present = await conn.instruction_files()
    assert absent == []
    assert [(f.path, f.content, f.truncated) for f in present] == [
        (str(home), "home rules", False),
        (str(root / "AGENTS.md"), "workspace rules", False),
    ]

    cfg = Config(workspace=WorkspaceConfig(instruction_file_max_bytes=4))
    async with connected(root, config=cfg) as conn:
        capped = await conn.instruction_files()
    assert [(f.content, f.truncated) for f in capped] == [("work", True)]


async def test_workspace_instruction_file_linking_outside_is_ignored(root: Path) -> None:
    outside = root.parent / "elsewhere.md"
    outside.write_text("not yours")
    (root / "AGENTS.md").symlink_to(outside)
    async with connected(root) as conn:
        assert await conn.instruction_files() == []


# -- MCP ----------------------------------------------------------------------


async def test_mcp_list_and_call_through_a_stdio_server(root: Path) -> None:
    servers = {
        "fx": McpServerConfig(command=sys.executable, args=(str(FIXTURE_MCP),)),
        "broken": McpServerConfig(command=str(root / "no-such-binary")),
    }
    async with connected(root, mcp_servers=servers) as conn:
        with trio.fail_after(GUARD):
            tools = await conn.mcp_list_tools()
            added = await conn.mcp_call_tool("fx", "add", {"a": 2, "b": 3})
            echoed = await conn.mcp_call_tool("fx", "echo", {"text": "hi"})
            failed = await conn.mcp_call_tool("fx", "fail", {"reason": "boom"})
            with pytest.raises(AgentOperationError) as unknown_server:
                await conn.mcp_call_tool("nope", "add", {})
            with pytest.raises(AgentOperationError) as broken:
                await conn.mcp_call_tool("broken", "x", {})
    by_name = {t.name: t for t in tools}
    assert sorted(by_name) == ["add", "crash", "echo", "fail"]
    assert by_name["add"] == McpTool(
        server="fx",
        name="add",
        description="Add two integers.",
        input_schema=by_name["add"].input_schema,
    )
    assert by_name["add"].input_schema["required"] == ["a", "b"]
    assert added.text == "5"
    assert not added.is_error
    assert echoed.text == "hi"
    assert failed.is_error
    assert "boom" in failed.text
    assert unknown_server.value.kind == p.ERR_MCP
    assert "unknown MCP server 'nope'" in unknown_server.value.message
    assert broken.value.kind == p.ERR_MCP


async def test_mcp_without_servers_lists_nothing(root: Path) -> None:
    async with connected(root) as conn:
        assert await conn.mcp_list_tools() == []


# -- failures -----------------------------------------------------------------


async def test_dialing_a_closed_port_fails_with_agent_unavailable(root: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with trio.fail_after(GUARD), pytest.raises(AgentUnavailable):
        await dial_agent(make_agent(f"127.0.0.1:{port}", root), connect_timeout=GUARD)


async def test_an_ip_address_is_dialled_directly_a_name_through_the_resolver(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []
    real = trio.open_tcp_stream

    async def spy(host: str, port: int) -> trio.SocketStream:
        resolved.append(host)
        return await real(host, port)

    monkeypatch.setattr(trio, "open_tcp_stream", spy)
    (root / "seen").write_text("x")
    async with running_agent(root) as agent:
        port = agent.address.rsplit(":", 1)[1]
        for address in (f"127.0.0.1:{port}", f"localhost:{port}"):
            conn, release = await dial_agent(make_agent(address, root))
            try:
                assert "seen" in str(await conn.list_dir("."))
            finally:
                await release()
    assert resolved == ["localhost"]


async def test_invalid_address_fails_with_agent_unavailable(root: Path) -> None:
    with pytest.raises(AgentUnavailable, match="invalid agent address"):
        await dial_agent(make_agent("no-port-here", root))


async def test_server_stopping_mid_request_fails_the_call(root: Path) -> None:
    os.mkfifo(root / "pipe")
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def server(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
            with server_scope:
                await serve_agent(root, token=TOKEN, task_status=task_status)

        host, port = await outer.start(server)
        conn, release = await dial_agent(make_agent(f"{host}:{port}", root))
        try:
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:

                    async def stop_when_running() -> None:
                        # Opening the fifo's write end blocks until the command reads it.
                        await trio.to_thread.run_sync(
                            (root / "pipe").write_text, "x", abandon_on_cancel=True
                        )
                        server_scope.cancel()

                    nursery.start_soon(stop_when_running)
                    with pytest.raises(AgentConnectionLost):
                        await conn.execute("cat pipe; sleep 60", GUARD)
        finally:
            await release()


async def test_agent_process_killed_mid_request_fails_the_call(root: Path) -> None:
    os.mkfifo(root / "pipe")
    command = [
        sys.executable,
        "-c",
        "import sys; from chatd_trio.agent.server import main; sys.exit(main())",
        "--dir",
        str(root),
        "--listen",
        "127.0.0.1:0",
    ]
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, env={**os.environ, "CHATD_AGENT_TOKEN": TOKEN}
    )
    sleeper: list[int] = []
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(GUARD):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        address = line.decode().rsplit(" ", 1)[1].strip()
        conn, release = await dial_agent(make_agent(address, root))
        try:
            with trio.fail_after(GUARD):
                async with trio.open_nursery() as nursery:

                    async def kill_when_running() -> None:
                        pid = await trio.to_thread.run_sync(
                            (root / "pipe").read_text, abandon_on_cancel=True
                        )
                        sleeper.append(int(pid))
                        process.kill()

                    nursery.start_soon(kill_when_running)
                    with pytest.raises(AgentConnectionLost):
                        await conn.execute("echo $$ > pipe; exec sleep 60", GUARD)
        finally:
            await release()
    finally:
        process.kill()
        await process.wait()
        for pid in sleeper:
            os.kill(pid, signal.SIGKILL)


async def test_a_client_reset_mid_connection_leaves_the_server_serving(root: Path) -> None:
    # A replica killed mid-request resets its connection (RST): only that connection
    # ends, the agent keeps serving everybody else.
    async with running_agent(root) as agent:
        async with raw_client(agent) as raw:
            assert (await raw.request(1, p.OP_AUTH, {"token": TOKEN}))["ok"] is True
            linger = (1).to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)
            raw.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        conn, release = await dial_agent(agent)
        try:
            assert (await conn.execute("echo ok", GUARD)).output == "ok\n"
        finally:
            await release()


# -- malformed responses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "result", "problem"),
    [
        (
            lambda c: c.execute("ls", 1.0),
            {"exit_code": True, "output": "", "truncated": False, "timed_out": False},
            "exit_code: Input should be a valid integer",
        ),
        (lambda c: c.read_file("a"), {"path": "a", "content": 3}, "content: Input should be"),
        (
            lambda c: c.list_dir("."),
            {"entries": [{"name": "a", "kind": "file"}]},
            "entries.0.size: Field required",
        ),
        (lambda c: c.mcp_list_tools(), {"tools": "none"}, "tools: Input should be a valid list"),
    ],
)
async def test_a_malformed_response_is_refused_naming_its_field(
    call: Any, result: Any, problem: str
) -> None:
    """The agent's responses go through the same check as tool arguments."""
    from chatd_trio.agent.client import AgentConn

    config = AgentConfig()
    ours, theirs = trio.testing.memory_stream_pair()
    agent = WorkspaceAgent(
        uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), "a", "127.0.0.1:1", "t", "/", datetime.now(UTC)
    )
    conn = AgentConn(ours, agent=agent, config=config)

    async def peer() -> None:
        reader = p.FrameReader(
            theirs,
            max_bytes=config.max_frame_bytes,
            chunk_bytes=config.read_chunk_bytes,
            max_depth=config.max_frame_depth,
        )
        request = await reader.receive()
        assert request is not None
        frame = p.encode_frame(p.ok_response(request["id"], result), max_depth=64)
        await theirs.send_all(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        with pytest.raises(AgentOperationError) as caught:
            await call(conn)
    assert caught.value.kind == "bad_response"
    assert caught.value.message.startswith("invalid response: ")
    assert problem in caught.value.message
    await conn.aclose()
