"""The applications' package: the runtime never imports it, and the worker channel frames
messages as JSON lines."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import trio

from chatd_trio.apps.channel import WORKER, JsonLines, encode, worker_command

PACKAGE = Path(__file__).resolve().parent.parent / "chatd_trio"


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_runtime_never_imports_the_applications() -> None:
    offenders = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "apps") in file.parents:
            continue
        imported = _imported(ast.parse(file.read_text("utf-8")))
        if any(name.split(".")[:2] == ["chatd_trio", "apps"] for name in imported):
            offenders.append(str(file.relative_to(PACKAGE.parent)))
    assert offenders == []


def test_worker_command_runs_the_application_module() -> None:
    cmd = worker_command("scaletest")
    assert cmd == [sys.executable, "-m", "chatd_trio.apps.scaletest", WORKER]


class Chunks(trio.abc.ReceiveStream):
    """A stream that yields exactly these chunks, then EOF."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._chunks.pop(0) if self._chunks else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_lines_split_across_chunks_arrive_whole_then_eof() -> None:
    data = encode({"kind": "ready", "pid": 7}) + encode({"kind": "done"})
    assert data.index(b"\n") > 5
    # Cut inside the first message and inside the second: framing must not follow chunks.
    lines = JsonLines(Chunks(data[:5], data[5:30], data[30:]))
    assert await lines.receive() == {"kind": "ready", "pid": 7}
    assert await lines.receive() == {"kind": "done"}
    with pytest.raises(EOFError):
        await lines.receive()
