"""The workspace agent under hostile input (issue 15): framing, authentication, file
names that are not UTF-8, confinement races, process trees and crashing MCP servers.

Real sockets, processes and files on 127.0.0.1; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from chatd_trio.agent import AgentConn, McpServerConfig, confine, dial_agent
from chatd_trio.agent import protocol as p
from chatd_trio.agent.mcp import restart_delay
from chatd_trio.agent.server import TOKEN_ENV, AuthFailureLimiter
from chatd_trio.config import AgentConfig, Config
from chatd_trio.domain import WorkspaceAgent
from chatd_trio.errors import AgentAuthError, AgentOperationError, AgentUnavailable
from tests.test_agent import (
    DEPTH,
    FIXTURE_MCP,
    GUARD,
    TOKEN,
    RawClient,
    connected,
    make_agent,
    raw_client,
    running_agent,
    wait_process_exit,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace.resolve()


AUTH = p.encode_frame(p.request(0, p.OP_AUTH, {"token": TOKEN}), max_depth=DEPTH)


def frame_of(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


async def receive_until_closed(raw: RawClient) -> list[dict[str, Any]]:
    """Every frame the agent sends until it closes the connection."""
    frames = []
    with trio.fail_after(GUARD):
        while (frame := await raw.reader.receive()) is not None:
            frames.append(frame)
    return frames


@asynccontextmanager
async def dialed(agent: WorkspaceAgent) -> AsyncIterator[AgentConn]:
    conn, release = await dial_agent(agent)
    try:
        yield conn
    finally:
        await release()


# -- framing: one connection's input ends that connection only ---------------------


def test_decoding_a_deep_frame_raises_only_the_protocol_error() -> None:
    for depth in (DEPTH + 1, 3000, 100_000):
        for opener in (b"[", b'{"a":'):
            with pytest.raises(p.FrameError) as info:
                p.decode_payload(opener * depth, max_depth=DEPTH)
            assert info.value.kind in (p.ERR_TOO_DEEP, p.ERR_MALFORMED)
    with pytest.raises(p.FrameError) as deep:
        p.decode_payload(b'{"a":' + b"[" * 200 + b"1" + b"]" * 200 + b"}", max_depth=DEPTH)
    assert deep.value.kind == p.ERR_TOO_DEEP
    for bad in (b'{"a":NaN}', b'{"a":-Infinity}', b'{"a":' + b"9" * 5000 + b"}", b"\xff"):
        with pytest.raises(p.FrameError):
            p.decode_payload(bad, max_depth=DEPTH)


def test_encoding_refuses_what_is_not_json_and_keeps_names_as_surrogates() -> None:
    for bad in ({"a": float("nan")}, {"a": {1, 2}}, {"a": [[[[]]]]}):
        with pytest.raises(p.FrameError):
            p.encode_frame(bad, max_depth=3)
    data = p.encode_frame({"name": "caf\udce9.txt", "text": "héllo"}, max_depth=DEPTH)
    assert data[4:].isascii()
    assert p.decode_payload(data[4:], max_depth=DEPTH) == {
        "name": "caf\udce9.txt",
        "text": "héllo",
    }


async def test_deep_frames_close_only_their_connection(root: Path) -> None:
    async with running_agent(root) as agent, dialed(agent) as other:
        # 100 000 '[' before auth: refused from its header (beyond the pre-auth cap).
        async with raw_client(agent) as raw:
            await raw.send_bytes(frame_of(b"[" * 100_000))
            huge = await receive_until_closed(raw)
        # 3000 '[' fits the pre-auth cap: it reaches the decoder, which must not blow up.
        async with raw_client(agent) as raw:
            await raw.send_bytes(frame_of(b"[" * 3000))
            deep = await receive_until_closed(raw)
        # After auth the connection answers the bad frame and keeps serving.
        async with raw_client(agent) as raw:
            assert (await raw.request(0, p.OP_AUTH, {"token": TOKEN}))["ok"] is True
            await raw.send_bytes(frame_of(b"[" * 100_000))
            after_auth = await raw.receive()
            listing = await raw.request(1, p.OP_LIST_DIR, {"path": "."})
        assert (await other.execute("echo alive", GUARD)).output == "alive\n"
        async with dialed(agent) as fresh:
            assert await fresh.list_dir(".") == []
    assert [f["error"]["kind"] for f in huge] == [p.ERR_TOO_LARGE]
    assert [f["error"]["kind"] for f in deep] == [p.ERR_TOO_DEEP]
    assert (after_auth["id"], after_auth["error"]["kind"]) == (None, p.ERR_TOO_DEEP)
    assert listing["ok"] is True


async def test_connection_ending_mid_frame_after_auth_leaves_the_agent_running(
    root: Path,
) -> None:
    async with running_agent(root) as agent, dialed(agent) as other:
        async with raw_client(agent) as raw:
            assert (await raw.request(0, p.OP_AUTH, {"token": TOKEN}))["ok"] is True
            await raw.send_bytes((1000).to_bytes(4, "big") + b'{"id":')
            await raw.stream.send_eof()
            assert await receive_until_closed(raw) == []
        assert (await other.list_dir(".")) == []


async def test_unencodable_request_fails_the_call_not_the_connection(root: Path) -> None:
    async with connected(root) as conn:
        with pytest.raises(AgentOperationError) as info:
            await conn.mcp_call_tool("x", "y", {"v": float("nan")})
        assert info.value.kind == p.ERR_BAD_REQUEST
        assert await conn.list_dir(".") == []


# -- before authentication: bounded frames, connections and attempts ----------------


async def test_unfinished_large_frames_before_auth_are_refused_from_the_header(
    root: Path,
) -> None:
    """40 peers each start an 8 MiB frame without a token: each is closed at once."""
    async with running_agent(root) as agent:
        results: list[list[dict[str, Any]]] = []

        async def hog() -> None:
            async with raw_client(agent) as raw:
                # Header plus 64 KiB of the body; the rest never comes.
                await raw.send_bytes((8 * 1024 * 1024).to_bytes(4, "big") + b"[" * 65536)
                results.append(await receive_until_closed(raw))

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(hog)
        async with dialed(agent) as conn:
            assert await conn.list_dir(".") == []
    assert results == [[results[0][0]]] * 40
    assert results[0][0]["error"]["kind"] == p.ERR_TOO_LARGE
    assert "8388608 bytes exceeds the limit of 4096" in results[0][0]["error"]["message"]


async def test_silent_peer_is_dropped_at_the_auth_deadline(root: Path) -> None:
    cfg = Config(agent=AgentConfig(auth_timeout=0.2))
    async with running_agent(root, config=cfg) as agent, raw_client(agent) as raw:
        await raw.send_bytes(AUTH[:10])
        assert await receive_until_closed(raw) == []


async def test_connections_beyond_the_cap_wait_until_one_closes(root: Path) -> None:
    cfg = Config(agent=AgentConfig(max_connections=2))
    served = trio.Event()

    async def third(agent: WorkspaceAgent) -> None:
        async with dialed(agent) as conn:
            await conn.list_dir(".")
            served.set()

    async with (
        running_agent(root, config=cfg) as agent,
        raw_client(agent) as first,
        raw_client(agent),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(third, agent)
        # Everything idle: the third connection sits in the listen backlog, unserved.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        waiting = not served.is_set()
        await first.stream.aclose()
        with trio.fail_after(GUARD):
            await served.wait()
    assert waiting


async def test_failed_authentications_are_rate_limited_per_host(root: Path) -> None:
    cfg = Config(agent=AgentConfig(auth_failure_burst=3, auth_failure_rate=1e-6))
    async with running_agent(root, config=cfg) as agent, dialed(agent) as established:
        for _ in range(3):
            with pytest.raises(AgentAuthError):
                await dial_agent(make_agent(agent.address, root, token="guess"))
        # The bucket is empty: even the right token is not checked now.
        with pytest.raises(AgentUnavailable, match="too many failed authentications"):
            await dial_agent(agent)
        async with raw_client(agent) as raw:
            refused = await raw.request(5, p.OP_AUTH, {"token": TOKEN})
        # Connections that authenticated before are not affected.
        assert (await established.execute("echo ok", GUARD)).output == "ok\n"
    assert (refused["id"], refused["error"]["kind"]) == (5, p.ERR_RATE_LIMITED)


def test_auth_failure_limiter_refills_and_forgets_old_hosts() -> None:
    limiter = AuthFailureLimiter(burst=2, rate=0.5, max_hosts=2)
    limiter.failed("a", 0.0)
    limiter.failed("a", 0.0)
    assert not limiter.allowed("a", 0.0)
    assert not limiter.allowed("a", 1.9)
    assert limiter.allowed("a", 2.0)
    limiter.failed("a", 2.0)
    assert not limiter.allowed("a", 2.1)
    assert limiter.allowed("b", 2.1)
    limiter.failed("b", 3.0)
    limiter.failed("c", 3.0)  # the third host evicts the least recently failing, "a"
    assert limiter.allowed("a", 3.0)


# -- names that are not UTF-8 -----------------------------------------------------


async def test_non_utf8_names_round_trip_through_list_read_and_write(root: Path) -> None:
    # On disk the name is the single byte 0xE9 (Latin-1 "é"), which is not UTF-8.
    latin1 = root / os.fsdecode(b"caf\xe9.txt")
    latin1.write_bytes(b"latin-1 name")
    async with connected(root) as conn:
        entries = await conn.list_dir(".")
        (entry,) = entries
        read = await conn.read_file(entry.name)
        written = await conn.write_file(entry.name, "replaced")
        await conn.write_file("d\udcff/n\udce9w.txt", "new")
        nested = await conn.list_dir("d\udcff")
        raw_content = await conn.write_file("bytes.bin", "\udcff\udcfe")
        with pytest.raises(AgentOperationError) as not_a_byte:
            await conn.read_file("lone\ud800")
        assert (await conn.list_dir(".")) != []
    assert entry.name == "caf\udce9.txt"
    assert entry.raw_name == b"caf\xe9.txt"
    assert (read.path, read.content) == ("caf\udce9.txt", "latin-1 name")
    assert written == len("replaced")
    assert latin1.read_bytes() == b"replaced"
    assert [e.raw_name for e in nested] == [b"n\xe9w.txt"]
    assert os.listdir(os.fsencode(root) + b"/d\xff") == [b"n\xe9w.txt"]
    assert raw_content == 2
    assert (root / "bytes.bin").read_bytes() == b"\xff\xfe"
    assert not_a_byte.value.kind == p.ERR_BAD_REQUEST


async def test_fifos_are_refused_without_blocking(root: Path) -> None:
    fifo = root / "fifo"
    os.mkfifo(fifo)
    async with connected(root) as conn, trio.open_nursery() as nursery:

        async def release_a_blocked_reader() -> None:
            # Only if the agent wrongly blocks in open(): a worker thread cannot be
            # cancelled, so give it a writer, and let the test fail instead of hang.
            await trio.sleep(GUARD)
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)

        nursery.start_soon(release_a_blocked_reader)
        with pytest.raises(AgentOperationError) as read:
            await conn.read_file("fifo")
        # Nobody reads the FIFO: opening it to write fails at once (ENXIO) instead.
        with pytest.raises(AgentOperationError) as write:
            await conn.write_file("fifo", "x")
        nursery.cancel_scope.cancel()
    assert (read.value.kind, write.value.kind) == (p.ERR_IO, p.ERR_IO)
    assert "not a regular file" in read.value.message


# -- confinement: swapping a directory for a symlink mid-lookup --------------------


@contextmanager
def swapping(root: Path, outside: Path) -> Iterator[Counter[str]]:
    """A thread exchanging root/d (a directory) and root/d.link (a symlink out) nonstop."""
    (root / "d").mkdir()
    (root / "d" / "f").write_text("inside")
    (root / "d.link").symlink_to(os.path.relpath(outside, root))
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    stop = threading.Event()
    swaps: Counter[str] = Counter()
    a, b = os.fsencode(root / "d"), os.fsencode(root / "d.link")

    def swap() -> None:
        while not stop.is_set():
            # RENAME_EXCHANGE (2): "d" is always there, as one or the other.
            if exchange is not None and exchange(-100, a, -100, b, 2) == 0:
                swaps["exchange"] += 1
                continue
            tmp = a + b".tmp"
            os.rename(a, tmp)
            os.rename(b, a)
            os.rename(tmp, b)
            swaps["rename"] += 1

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    try:
        yield swaps
    finally:
        stop.set()
        thread.join()


@pytest.fixture(params=["openat2", "fd-walk"])
def lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2":
        if not confine.openat2_available():
            pytest.skip("this kernel has no openat2")
    else:
        monkeypatch.setattr(confine, "_openat2_state", False)
    return str(request.param)


async def test_symlink_swap_race_never_leaves_the_root(root: Path, lookup: str) -> None:
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "f").write_text("SECRET")
    (outside / "only-outside").write_text("SECRET")
    outcomes: Counter[str] = Counter()
    leaked: list[str] = []

    async def reads(conn: AgentConn, n: int) -> None:
        for _ in range(n):
            try:
                content = (await conn.read_file("d/f")).content
            except AgentOperationError as exc:
                outcomes[exc.kind] += 1
            else:
                outcomes[content] += 1
                if content != "inside":
                    leaked.append(content)

    async def writes(conn: AgentConn, n: int) -> None:
        for i in range(n):
            try:
                await conn.write_file(f"d/w{i % 7}", "written")
            except AgentOperationError as exc:
                outcomes["write " + exc.kind] += 1
            else:
                outcomes["write ok"] += 1

    async def lists(conn: AgentConn, n: int) -> None:
        for _ in range(n):
            try:
                names = [e.name for e in await conn.list_dir("d")]
            except AgentOperationError as exc:
                outcomes["list " + exc.kind] += 1
            else:
                outcomes["list ok"] += 1
                if "only-outside" in names:
                    leaked.append("listing")

    async with connected(root) as conn:
        with swapping(root, outside) as swaps, trio.fail_after(GUARD * 4):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(reads, conn, 700)
                nursery.start_soon(writes, conn, 400)
                nursery.start_soon(lists, conn, 400)
    assert leaked == []
    assert sorted(p.name for p in outside.iterdir()) == ["f", "only-outside"]
    assert (outside / "f").read_text() == "SECRET"
    # The race was on: both states of "d" were seen, and nothing else happened.
    assert outcomes["inside"] > 0
    assert outcomes[p.ERR_PATH_ESCAPE] > 0
    assert outcomes["write ok"] > 0
    allowed = {
        "inside",
        p.ERR_PATH_ESCAPE,
        p.ERR_NOT_FOUND,
        p.ERR_NOT_DIRECTORY,
        "write ok",
        "write " + p.ERR_PATH_ESCAPE,
        "write " + p.ERR_NOT_FOUND,
        "write " + p.ERR_NOT_DIRECTORY,
        "list ok",
        "list " + p.ERR_PATH_ESCAPE,
        "list " + p.ERR_NOT_FOUND,
        "list " + p.ERR_NOT_DIRECTORY,
    }
    assert set(outcomes) <= allowed, outcomes
    assert sum(swaps.values()) > 0


def test_fd_walk_follows_links_inside_and_refuses_every_way_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("f")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s").write_text("s")
    links = {
        "abs_in": root / "a" / "b",
        "rel_in": "a/b",
        "up_in": "a/b/../b",
        "abs_out": tmp_path / "out",
        "rel_out": "../out",
        "loop": "loop",
    }
    for name, target in links.items():
        (root / name).symlink_to(target)
    (root / "a" / "back").symlink_to("..")
    for use_openat2 in (False, *((True,) if confine.openat2_available() else ())):
        r = confine.Root(root, use_openat2=use_openat2)
        try:

            def read(path: bytes, r: confine.Root = r) -> bytes:
                fd = r.open(path, os.O_RDONLY)
                try:
                    return os.read(fd, 10)
                finally:
                    os.close(fd)

            for inside in (b"abs_in/f", b"rel_in/f", b"up_in/f", b"a/back/a/b/f", b"a/./b/f"):
                assert read(inside) == b"f", (use_openat2, inside)
            for escape in (b"abs_out/s", b"rel_out/s", b"../out/s", b"a/../../out/s"):
                with pytest.raises(confine.PathEscape):
                    read(escape)
            with pytest.raises(OSError) as loop:
                read(b"loop")
            assert loop.value.errno == errno.ELOOP
            r.makedirs(b"new/deeper")
            assert (root / "new" / "deeper").is_dir()
            with pytest.raises(confine.PathEscape):
                r.makedirs(b"abs_out/x")
            assert not (tmp_path / "out" / "x").exists()
        finally:
            r.close()


# -- execute: a timeout kills the whole tree, setsid children included -------------


def _pids(output: str) -> list[int]:
    return [int(word) for word in output.split() if word.isdigit()]


async def test_timeout_kills_children_that_left_the_session(root: Path) -> None:
    # A direct setsid child, and a setsid grandchild orphaned by its subshell (double fork).
    command = "setsid sleep 1000 & echo $!; (setsid sleep 1000 & echo $!); sleep 1000"
    async with connected(root) as conn:
        result = await conn.execute(command, timeout=1.0)
    survivors = _pids(result.output)
    try:
        assert result.timed_out
        assert len(survivors) == 2
        for pid in survivors:
            await wait_process_exit(pid)
    finally:
        for pid in survivors:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_timeout_kill_spares_other_commands(root: Path) -> None:
    os.mkfifo(root / "pipe")
    async with connected(root) as conn, trio.open_nursery() as nursery:
        survivor: list[str] = []

        async def waiting() -> None:
            survivor.append((await conn.execute("cat pipe", GUARD)).output)

        nursery.start_soon(waiting)
        await trio.testing.wait_all_tasks_blocked()
        killed = await conn.execute("sleep 1000", timeout=0.3)
        await conn.execute("echo released > pipe", GUARD)
    assert killed.timed_out
    assert survivor == ["released\n"]


async def test_commands_do_not_inherit_the_agent_token(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "the-agent-secret")
    monkeypatch.setenv("CHATD_OTHER", "kept")
    async with connected(root) as conn:
        result = await conn.execute("env", GUARD)
    assert "the-agent-secret" not in result.output
    assert "CHATD_OTHER=kept" in result.output


# -- MCP: a crashed server comes back on the next call ------------------------------


def fixture_servers() -> dict[str, McpServerConfig]:
    return {"fx": McpServerConfig(command=sys.executable, args=(str(FIXTURE_MCP),))}


async def test_crashed_mcp_server_restarts_on_the_next_call(root: Path) -> None:
    async with connected(root, mcp_servers=fixture_servers()) as conn:
        with trio.fail_after(GUARD):
            before = await conn.mcp_call_tool("fx", "add", {"a": 1, "b": 2})
            with pytest.raises(AgentOperationError) as crashed:
                await conn.mcp_call_tool("fx", "crash", {})
            after = await conn.mcp_call_tool("fx", "add", {"a": 2, "b": 3})
            tools = await conn.mcp_list_tools()
            # A success resets the backoff: a second crash restarts at once again.
            with pytest.raises(AgentOperationError):
                await conn.mcp_call_tool("fx", "crash", {})
            again = await conn.mcp_call_tool("fx", "echo", {"text": "back"})
    assert before.text == "3"
    assert crashed.value.kind == p.ERR_MCP
    assert "exited" in crashed.value.message
    assert after.text == "5"
    assert {t.name for t in tools} == {"add", "crash", "echo", "fail"}
    assert again.text == "back"


async def test_repeated_mcp_crashes_back_off(root: Path) -> None:
    cfg = Config(agent=AgentConfig(mcp_restart_backoff_initial=3600.0))
    async with connected(root, mcp_servers=fixture_servers(), config=cfg) as conn:
        with trio.fail_after(GUARD):
            with pytest.raises(AgentOperationError):
                await conn.mcp_call_tool("fx", "crash", {})
            # Second consecutive failure: the restart that follows it is due in an hour.
            with pytest.raises(AgentOperationError):
                await conn.mcp_call_tool("fx", "crash", {})
            with pytest.raises(AgentOperationError) as waiting:
                await conn.mcp_call_tool("fx", "add", {"a": 1, "b": 1})
            tools = await conn.mcp_list_tools()
    assert waiting.value.kind == p.ERR_MCP
    assert "failed 2 times in a row" in waiting.value.message
    assert "next restart is due in" in waiting.value.message
    assert tools == []


def test_restart_delay_is_immediate_then_doubles_up_to_the_cap() -> None:
    delays = [restart_delay(n, initial=1.0, maximum=60.0) for n in range(0, 10)]
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
