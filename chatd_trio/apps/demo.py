"""`chatd-trio demo`: a handful of chats going through a real Server, live in the terminal.

Everything shown comes from the running Server: the table and the event log from
chat stream events, the checks from persisted messages, the summary from
`Server.stats()`. The model is a `ScriptedModel` whose step factory reacts to each
chat's prompt (a `[tag]` in the first user message picks the scenario); workspace
commands run on real local agents (`LocalProvisioner`) in a temporary directory.

Scenarios, each checked (PASS/FAIL): parallel tools, compaction with re-entry, a
subagent, a workspace rebuilt between turns, a stopped workspace, a retry storm
from a throttling model, a subscriber catching up after a reconnect.

With --provider the demo runs one chat against a real model instead (OpenAI,
Anthropic, or an OpenAI-compatible server such as vLLM, Ollama or LiteLLM with
--base-url), with a workspace on a local agent, and prints the chat as it streams:
    OPENAI_API_KEY=... chatd-trio demo --provider openai --model gpt-4o-mini
    chatd-trio demo --provider openai --base-url http://localhost:11434/v1 --model qwen3
See docs/providers.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import trio
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from chatd_trio._cleanup import bounded_cleanup
from chatd_trio.agent import dial_agent
from chatd_trio.agent.local import LocalProvisioner
from chatd_trio.apps.channel import (
    WORKER,
    JsonLines,
    emit,
    encode,
    replica_process_settings,
    stdin_lines,
    worker_command,
)
from chatd_trio.apps.demo_provider import add_provider_arguments, run_provider_command
from chatd_trio.config import (
    AcquireConfig,
    CompactionConfig,
    Config,
    DemoConfig,
    LoopConfig,
    RetryConfig,
    WorkspaceConfig,
)
from chatd_trio.domain import (
    JSON,
    Chat,
    ChatStatus,
    ErrorEvent,
    Message,
    MessageEvent,
    RetryEvent,
    Role,
    StatusEvent,
    StreamEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    text_of,
)
from chatd_trio.errors import ChatdError, DecodeError, StoreError, StoreUnavailable
from chatd_trio.models.base import PromptMessage
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    error_step,
    model_error,
    text_step,
    tool_step,
    usage_of,
)
from chatd_trio.pubsub.auth import NotifyAuth
from chatd_trio.pubsub.base import PubSub
from chatd_trio.server import Server
from chatd_trio.store.base import Store

if TYPE_CHECKING:
    from psycopg.sql import Composed

logger = logging.getLogger(__name__)

_TERMINAL = (ChatStatus.WAITING, ChatStatus.ERROR)
_COMMAND_MARK = "$ "
CHILD_ANSWER = "42"
# The throttle chat's second message starts the storm: by then the demo subscribes, and
# retry events are live-only (a late subscriber would miss them).
STORM = "storm"


# -- the scripted model ---------------------------------------------------------------------


def _texts(prompt: Sequence[PromptMessage]) -> list[str]:
    return [text_of(m.parts) for m in prompt]


def _tag(prompt: Sequence[PromptMessage]) -> str:
    """The scenario tag: the first `[tag]` of any message (summaries carry it on)."""
    for text in _texts(prompt):
        start = text.find("[")
        end = text.find("]", start + 1)
        if start >= 0 and end > start:
            return text[start + 1 : end]
    return ""


def _last_results(prompt: Sequence[PromptMessage]) -> list[ToolResultPart]:
    """Tool results of the trailing tool messages."""
    out: list[ToolResultPart] = []
    for m in reversed(prompt):
        if m.role is not Role.TOOL:
            break
        out[:0] = [p for p in m.parts if isinstance(p, ToolResultPart)]
    return out


def _result_text(result: JSON) -> str:
    if isinstance(result, dict):
        for key in ("output", "report", "error"):
            value = result.get(key)
            if isinstance(value, str):
                return value.strip()
    return json.dumps(result)


class DemoScript:
    """The step factory (and summary factory) of the demo's `ScriptedModel`."""

    def __init__(self, config: Config, demo: DemoConfig) -> None:
        self._config = config
        self._demo = demo
        self.throttled = 0

    def summary(self, prompt: Sequence[PromptMessage], index: int) -> str:
        return f"[{_tag(prompt)}] the user asked for a long answer, which was given"

    def __call__(self, prompt: Sequence[PromptMessage], index: int) -> ScriptStep:
        tag = _tag(prompt)
        results = _last_results(prompt)
        last_user = next((text_of(m.parts) for m in reversed(prompt) if m.role is Role.USER), "")
        prefix = f"c{index}"
        if tag == "parallel":
            if results:
                return text_step(f"ran {len(results)} commands side by side")
            cmd = "s=$(date +%s%3N); sleep {sleep}; echo {name} $s $(date +%s%3N)"
            calls: list[tuple[str, JSON]] = [
                ("execute", {"command": cmd.format(sleep=self._demo.parallel_sleep_s, name=name)})
                for name in "abcdefghijklmnopqrstuvwxyz"[: self._demo.parallel_tools]
            ]
            return tool_step(calls, call_id_prefix=prefix)
        if tag == "compact":
            limit = self._demo.context_limit
            if any(
                t.startswith(self._config.loop.compaction.summary_prefix) for t in _texts(prompt)
            ):
                return text_step(
                    "continuing from the summary",
                    usage=usage_of(self._demo.under_threshold_tokens),
                    context_limit=limit,
                )
            return text_step(
                "a very long answer " * 8,
                usage=usage_of(self._demo.over_threshold_tokens),
                context_limit=limit,
            )
        if tag == "subagent":
            if not results:
                return tool_step(
                    [("spawn_agent", {"prompt": "[child] what is six times seven?"})],
                    call_id_prefix=prefix,
                )
            last = results[-1]
            if last.name == "spawn_agent" and isinstance(last.result, dict):
                child = last.result.get("chat_id", "")
                return tool_step([("wait_agent", {"chat_id": child})], call_id_prefix=prefix)
            return text_step(f"the subagent says: {_result_text(last.result)}")
        if tag == "child":
            return text_step(CHILD_ANSWER)
        if tag in ("rebuild", "stopped"):
            if results:
                state = "error" if results[-1].is_error else "ok"
                return text_step(f"{state}: {_result_text(results[-1].result)}")
            command = last_user.split(_COMMAND_MARK, 1)[-1]
            return tool_step([("execute", {"command": command})], call_id_prefix=prefix)
        if tag == "throttle":
            if STORM not in last_user:
                return text_step("ready")
            if self.throttled < self._demo.throttle_errors:
                self.throttled += 1
                return error_step(
                    model_error(
                        429, retry_after=self._demo.throttle_retry_after_s, message="slow down"
                    )
                )
            return text_step(f"answered after {self.throttled} throttled attempts")
        return text_step(f"re: {last_user}")


# -- watching chats -----------------------------------------------------------------------------


@dataclass
class ChatRow:
    """One line of the live table, fed by the chat's stream events."""

    chat_id: uuid.UUID
    title: str
    status: str = "pending"
    steps: int = 0
    tool_calls: int = 0
    last_event: str = ""
    turns_finished: int = 0
    retries: int = 0
    messages: list[Message] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, predicate: Callable[[ChatRow], bool]) -> None:
        """Wait until `predicate(self)` holds (re-checked on every event)."""
        while not predicate(self):
            await self._changed.wait()

    async def until_turns(self, n: int) -> None:
        await self.until(lambda row: row.turns_finished >= n)


def _preview(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(event: StreamEvent, limit: int) -> str | None:
    """A short line for an event; None for ephemeral parts (too chatty for a log)."""
    if isinstance(event, StatusEvent):
        return f"status -> {event.status.value}"
    if isinstance(event, RetryEvent):
        r = event.retry
        return f"retry #{r.attempt} in {r.delay_s:.2f}s ({r.status_code} {r.error})"
    if isinstance(event, ErrorEvent):
        return f"error [{event.error.kind}] {_preview(event.error.message, limit)}"
    if isinstance(event, MessageEvent):
        m = event.message
        bits: list[str] = []
        for part in m.parts:
            if isinstance(part, TextPart) and part.text:
                bits.append(_preview(part.text, limit))
            elif isinstance(part, ToolCallPart):
                bits.append(f"call {part.name}({_preview(part.arguments, limit // 2)})")
            elif isinstance(part, ToolResultPart):
                flag = "ERROR " if part.is_error else ""
                bits.append(f"{part.name} -> {flag}{_preview(_result_text(part.result), limit)}")
        return f"#{m.id} {m.role.value}: " + "; ".join(bits)
    return None


class _Screen:
    """Renders the display for the console's current size (the Live view re-renders)."""

    def __init__(self, display: Display) -> None:
        self._display = display

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._display.screen(options.max_width, options.height or options.size.height)


class Display:
    """Plain log lines, or a rich Live table of chats with an event log below it."""

    def __init__(self, out: TextIO, demo: DemoConfig, *, plain: bool) -> None:
        self.out = out
        self.demo = demo
        self.plain = plain
        self.rows: list[ChatRow] = []
        self.log: list[str] = []
        self._live: Live | None = None

    def line(self, text: str) -> None:
        """An event-log line."""
        if self.plain:
            print(text, file=self.out, flush=True)
            return
        self.log.append(text)
        del self.log[: -self.demo.event_log_lines]
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> RenderableType:
        return _Screen(self)

    def screen(self, width: int, height: int | None) -> RenderableType:
        """The table and the event log laid out for a terminal of `width` x `height`.

        Every row is one line: the status and count columns keep the width of their
        longest value, the title takes at most half of what is left and the last
        event the rest (cut with an ellipsis). The log shows as many of its latest
        lines as fit under the table, one line each, so the whole screen stays
        within `height`.
        """
        headers = ("title", "status", "steps", "tools", "last event")
        statuses = max(len(s.value) for s in ChatStatus)
        counts = [str(n) for row in self.rows for n in (row.steps, row.tool_calls)]
        count_width = max([len(headers[2]), *map(len, counts)])
        # Each column has one space of padding per side and one border after it, plus
        # the table's left border.
        chrome = 3 * len(headers) + 1
        fixed = max(statuses, len(headers[1])) + 2 * count_width
        free = max(width - chrome - fixed, 2 * len(headers[0]))
        longest_title = max([len(headers[0]), *(len(row.title) for row in self.rows)])
        title_width = min(longest_title, free // 2)
        table = Table(title="chatd-trio demo: chats", expand=True)
        table.add_column(headers[0], width=title_width, overflow="ellipsis", no_wrap=True)
        table.add_column(headers[1], min_width=statuses, no_wrap=True)
        for name in headers[2:4]:
            table.add_column(name, width=count_width, justify="right", no_wrap=True)
        table.add_column(headers[4], ratio=1, overflow="ellipsis", no_wrap=True)
        for row in self.rows:
            cells = (row.title, row.status, str(row.steps), str(row.tool_calls), row.last_event)
            table.add_row(*(Text(cell) for cell in cells))
        # Title line, top border, header, header rule, bottom border; the panel's two borders.
        table_lines = len(self.rows) + 5
        room = self.demo.event_log_lines if height is None else height - table_lines - 2
        shown = self.log[-max(room, 1) :] or ["(no events yet)"]
        # Text, not markup: event lines carry user text such as "[rebuild]".
        log = Text("\n".join(shown), no_wrap=True, overflow="ellipsis")
        return Group(table, Panel(log, title="event log"))

    @asynccontextmanager
    async def live(self) -> AsyncIterator[None]:
        if self.plain:
            yield
            return
        console = Console(file=self.out)
        with Live(
            self._render(),
            console=console,
            refresh_per_second=self.demo.refresh_per_second,
        ) as live:
            self._live = live
            try:
                yield
            finally:
                live.update(self._render())
                self._live = None

    def print_table(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        if self.plain:
            print(f"== {title} ==", file=self.out)
            for key, value in rows:
                print(f"{key}: {value}", file=self.out)
            self.out.flush()
            return
        table = Table(title=title)
        table.add_column("what")
        table.add_column("value")
        for key, value in rows:
            table.add_row(Text(key), Text(value))
        Console(file=self.out).print(table)


class Monitor:
    """Subscribes to each chat and keeps its row and the event log current."""

    def __init__(self, server: Server, owner: uuid.UUID, display: Display, nursery: trio.Nursery):
        self.server = server
        self.owner = owner
        self.display = display
        self.nursery = nursery
        self.rows: dict[uuid.UUID, ChatRow] = {}

    async def watch(self, chat: Chat) -> ChatRow:
        """Start watching a chat; returns once its subscription is live."""
        row = self.rows.get(chat.id)
        if row is not None:
            return row
        row = ChatRow(chat.id, chat.title)
        self.rows[chat.id] = row
        self.display.rows.append(row)
        await self.nursery.start(self._follow, row)
        return row

    async def _follow(self, row: ChatRow, *, task_status: trio.TaskStatus[None]) -> None:
        limit = self.display.demo.preview_chars
        try:
            async with self.server.subscribe(self.owner, row.chat_id) as sub:
                task_status.started()
                async for event in sub:
                    self._apply(row, event)
                    text = describe(event, limit)
                    if text is not None:
                        # The status has its own column: keep the last real event visible.
                        if not isinstance(event, StatusEvent):
                            row.last_event = text
                        self.display.line(f"[{row.title}] {text}")
                    row.changed()
                    await self._maybe_watch_child(event)
        except ChatdError as exc:
            # The chat's scenario times out and reports FAIL; the other chats go on.
            self.display.line(f"[{row.title}] subscription failed: {exc}")
            row.last_event = f"subscription failed: {exc}"

    def _apply(self, row: ChatRow, event: StreamEvent) -> None:
        if isinstance(event, StatusEvent):
            was_terminal = row.status in {s.value for s in _TERMINAL}
            row.status = event.status.value
            if event.status in _TERMINAL and not was_terminal:
                row.turns_finished += 1
        elif isinstance(event, RetryEvent):
            row.retries += 1
        elif isinstance(event, MessageEvent):
            m = event.message
            row.messages.append(m)
            calls = [p for p in m.parts if isinstance(p, ToolCallPart)]
            compaction = self.server.config.loop.compaction.tool_name
            if m.role is Role.ASSISTANT and not any(c.name == compaction for c in calls):
                row.steps += 1
                row.tool_calls += len(calls)

    async def _maybe_watch_child(self, event: StreamEvent) -> None:
        if not isinstance(event, MessageEvent):
            return
        for part in event.message.parts:
            if (
                isinstance(part, ToolResultPart)
                and part.name == "spawn_agent"
                and isinstance(part.result, dict)
                and not part.is_error
            ):
                child = await self.server.store.get_chat(uuid.UUID(str(part.result["chat_id"])))
                await self.watch(child)


# -- scenarios ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    passed: bool
    detail: str


class Replica(Protocol):
    """Where the demo sends a request: an in-process Server or a replica process."""

    async def create_chat(
        self, owner: uuid.UUID, text: str, title: str, workspace_id: uuid.UUID | None
    ) -> uuid.UUID: ...

    async def send_message(self, owner: uuid.UUID, chat_id: uuid.UUID, text: str) -> None: ...


class LocalReplica:
    """A Server running in the demo's own process."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def create_chat(
        self, owner: uuid.UUID, text: str, title: str, workspace_id: uuid.UUID | None
    ) -> uuid.UUID:
        chat = await self.server.create_chat(owner, text, title=title, workspace_id=workspace_id)
        return chat.id

    async def send_message(self, owner: uuid.UUID, chat_id: uuid.UUID, text: str) -> None:
        await self.server.send_message(owner, chat_id, text)


@dataclass
class DemoEnv:
    server: Server
    replicas: list[Replica]
    store: Store
    provisioner: LocalProvisioner
    monitor: Monitor
    owner: uuid.UUID
    demo: DemoConfig
    requests: int = 0

    def next_replica(self) -> Replica:
        """Round robin: the replica taking a request wakes first, so turns spread."""
        self.requests += 1
        return self.replicas[self.requests % len(self.replicas)]

    async def chat(
        self, title: str, text: str, *, workspace_id: uuid.UUID | None = None
    ) -> ChatRow:
        chat_id = await self.next_replica().create_chat(self.owner, text, title, workspace_id)
        return await self.monitor.watch(await self.store.get_chat(chat_id))

    async def first_turn(
        self, title: str, text: str, *, workspace_id: uuid.UUID | None = None
    ) -> ChatRow:
        """A new chat, returned once its first turn is over."""
        row = await self.chat(title, text, workspace_id=workspace_id)
        await row.until_turns(1)
        return row

    async def send(self, row: ChatRow, text: str) -> None:
        await self.next_replica().send_message(self.owner, row.chat_id, text)

    async def turn(self, row: ChatRow, text: str, n: int) -> float:
        """Send `text`, then wait until the chat has finished `n` turns; the seconds taken."""
        started = trio.current_time()
        await self.send(row, text)
        await row.until_turns(n)
        return trio.current_time() - started


def _tool_results(messages: Sequence[Message], name: str) -> list[ToolResultPart]:
    return [
        p for m in messages for p in m.parts if isinstance(p, ToolResultPart) and p.name == name
    ]


def _last_assistant_text(messages: Sequence[Message]) -> str:
    for m in reversed(messages):
        if m.role is Role.ASSISTANT and text_of(m.parts):
            return text_of(m.parts)
    return ""


async def scenario_parallel(env: DemoEnv) -> ScenarioResult:
    ws = await env.provisioner.create(env.owner, "parallel-ws")
    row = await env.first_turn(
        "parallel tools", "[parallel] run four slow commands", workspace_id=ws.id
    )
    results = _tool_results(await env.store.messages_after(row.chat_id, 0), "execute")
    spans: list[tuple[int, int]] = []
    for r in results:
        fields = _result_text(r.result).split()
        if r.is_error or len(fields) != 3:
            return ScenarioResult("parallel tools", False, f"bad tool result {r.result!r}")
        spans.append((int(fields[1]), int(fields[2])))
    if len(spans) != env.demo.parallel_tools:
        return ScenarioResult("parallel tools", False, f"{len(spans)} results")
    wall = (max(e for _, e in spans) - min(s for s, _ in spans)) / 1000
    total = sum(e - s for s, e in spans) / 1000
    ok = wall < total * env.demo.parallel_max_wall_ratio
    return ScenarioResult(
        "parallel tools", ok, f"{len(spans)} execute calls: wall {wall:.2f}s vs sum {total:.2f}s"
    )


async def scenario_compaction(env: DemoEnv) -> ScenarioResult:
    # Checked from persisted messages: the turn may run on any replica (process).
    row = await env.first_turn("compaction", "[compact] tell me everything")
    messages = await env.store.messages_after(row.chat_id, 0)
    tool = env.server.config.loop.compaction.tool_name
    summarized = _tool_results(messages, tool)
    # Re-entry: an assistant answer persisted after the compaction's summary.
    last_summary = max(
        (i for i, m in enumerate(messages) if _tool_results([m], tool)), default=len(messages)
    )
    reentered = [
        m
        for m in messages[last_summary + 1 :]
        if m.role is Role.ASSISTANT and "summary" in text_of(m.parts)
    ]
    answer = _last_assistant_text(messages)
    ok = len(summarized) >= 1 and bool(reentered) and "summary" in answer
    return ScenarioResult(
        "compaction + re-entry",
        ok,
        f"{len(summarized)} compaction summaries, re-entered with {answer!r}",
    )


async def scenario_subagent(env: DemoEnv) -> ScenarioResult:
    row = await env.first_turn("subagent (root)", "[subagent] ask a helper")
    messages = await env.store.messages_after(row.chat_id, 0)
    spawned = _tool_results(messages, "spawn_agent")
    waited = _tool_results(messages, "wait_agent")
    answer = _last_assistant_text(messages)
    ok = (
        len(spawned) == 1
        and len(waited) == 1
        and not waited[0].is_error
        and CHILD_ANSWER in _result_text(waited[0].result)
        and CHILD_ANSWER in answer
    )
    return ScenarioResult("subagent", ok, f"root answered {answer!r}")


async def scenario_rebuild(env: DemoEnv) -> ScenarioResult:
    ws = await env.provisioner.create(env.owner, "rebuild-ws")
    first = env.provisioner.running_agent(ws.id)
    row = await env.first_turn(
        "workspace rebuild",
        "[rebuild] turn 1 $ echo built-on-first-agent > note.txt && cat note.txt",
        workspace_id=ws.id,
    )
    bound = await env.store.get_chat(row.chat_id)
    second = await env.provisioner.start(ws.id)
    env.monitor.display.line(f"[rebuild] workspace rebuilt: new agent {str(second.id)[:8]}")
    await env.turn(row, "[rebuild] turn 2 $ cat note.txt", 2)
    chat = await env.store.get_chat(row.chat_id)
    outputs = [_result_text(r.result) for r in _tool_results(row.messages, "execute")]
    # The persisted binding moving to the new agent is the switch (whichever replica ran it).
    ok = (
        first is not None
        and bound.agent_id == first.id
        and chat.agent_id == second.id
        and outputs == ["built-on-first-agent"] * 2
    )
    old = str(bound.agent_id)[:8] if bound.agent_id else "-"
    new = str(chat.agent_id)[:8] if chat.agent_id else "-"
    return ScenarioResult(
        "workspace rebuilt between turns",
        ok,
        f"agent {old} -> {new}; turn 2 output {outputs[-1] if outputs else None!r}",
    )


async def scenario_stopped(env: DemoEnv) -> ScenarioResult:
    ws = await env.provisioner.create(env.owner, "stopped-ws")
    row = await env.first_turn(
        "stopped workspace", "[stopped] turn 1 $ echo alive", workspace_id=ws.id
    )
    await env.provisioner.stop(ws.id)
    env.monitor.display.line("[stopped] workspace stopped")
    took = await env.turn(row, "[stopped] turn 2 $ echo still there?", 2)
    results = _tool_results(row.messages, "execute")
    last = results[-1] if results else None
    kind = last.result.get("kind") if last and isinstance(last.result, dict) else None
    ok = len(results) == 2 and not results[0].is_error and last is not None and last.is_error
    ok = ok and kind == "no_workspace_agent"
    return ScenarioResult(
        "stopped workspace",
        ok,
        f"turn 2 execute -> tool error {kind!r}, turn over in {took * 1000:.0f} ms",
    )


async def scenario_throttle(env: DemoEnv) -> ScenarioResult:
    row = await env.first_turn("retry storm", "[throttle] hello")
    took = await env.turn(row, f"[throttle] answer despite a 429 {STORM}", 2)
    expected = env.demo.throttle_errors
    # The persisted answer names the throttled attempts the model saw (on whichever replica).
    answer = _last_assistant_text(await env.store.messages_after(row.chat_id, 0))
    ok = (
        row.retries == expected
        and f"after {expected} throttled" in answer
        and row.status == "waiting"
    )
    return ScenarioResult(
        "retry storm",
        ok,
        f"{row.retries} retry events, answer {answer!r} after {took:.2f}s",
    )


async def scenario_catchup(env: DemoEnv) -> ScenarioResult:
    row = await env.chat("catch-up", "[catchup] first message")
    name = "subscriber catch-up"
    async with env.server.subscribe(env.owner, row.chat_id) as sub:
        async for event in sub:
            if isinstance(event, MessageEvent) and event.message.role is Role.ASSISTANT:
                break
        cursor = sub.cursor
    env.monitor.display.line(f"[catchup] subscriber left at message #{cursor}")
    await row.until_turns(1)
    for i in range(env.demo.catchup_missed_turns):
        await env.turn(row, f"[catchup] missed message {i + 1}", 2 + i)
    expected = [m.id for m in await env.store.messages_after(row.chat_id, cursor)]
    got: list[int] = []
    async with env.server.subscribe(env.owner, row.chat_id, cursor) as sub:
        while len(got) < len(expected):
            event = await sub.receive()
            if isinstance(event, MessageEvent):
                got.append(event.message.id)
        # Anything further already delivered would be a duplicate.
        while True:
            try:
                event = sub.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(event, MessageEvent):
                got.append(event.message.id)
    env.monitor.display.line(f"[catchup] re-subscribed after #{cursor}: got {got}")
    ok = bool(expected) and got == expected and len(set(got)) == len(got)
    return ScenarioResult(name, ok, f"missed {len(expected)} messages, received {got}")


Scenario = Callable[[DemoEnv], Awaitable[ScenarioResult]]
# Groups run concurrently, the scenarios of a group one after another: the workspace
# scenarios share the local agents' temporary directory and stay apart.
SCENARIO_GROUPS: tuple[tuple[tuple[str, Scenario], ...], ...] = (
    (
        ("parallel tools", scenario_parallel),
        ("workspace rebuilt between turns", scenario_rebuild),
        ("stopped workspace", scenario_stopped),
    ),
    (("compaction + re-entry", scenario_compaction),),
    (("subagent", scenario_subagent),),
    (("retry storm", scenario_throttle),),
    (("subscriber catch-up", scenario_catchup),),
)
SCENARIOS = tuple(pair for group in SCENARIO_GROUPS for pair in group)


# -- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """`dsn`: run on PostgreSQL, in a database of the demo's own on that server (dropped
    at the end unless `keep`)."""

    dsn: str | None = None
    replicas: int = 1
    plain: bool = False
    keep: bool = False


@dataclass(frozen=True)
class DemoReport:
    results: tuple[ScenarioResult, ...]
    summary: tuple[tuple[str, str], ...]
    # The database the demo created (None on the in-memory store).
    database: ScratchDatabase | None = None

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)


def demo_config(demo: DemoConfig) -> Config:
    """The Server configuration of the demo: quick acquisition, short retries and dials."""
    base = Config()
    return base.replace(
        acquire=AcquireConfig(acquire_interval=demo.acquire_interval_s),
        loop=LoopConfig(
            retry=RetryConfig(base_delay=demo.retry_base_delay_s),
            compaction=CompactionConfig(context_limit=demo.context_limit),
        ),
        workspace=WorkspaceConfig(dial_validation_delay=demo.dial_validation_delay_s),
    )


# -- a database of the demo's own ------------------------------------------------------------


@dataclass(frozen=True)
class ScratchDatabase:
    """A database the demo created on the server it was given.

    `dsn` reaches it (with the password of the given DSN, if any); `shown` is the same
    without the password, for printing.
    """

    name: str
    dsn: str
    shown: str


def _scratch_dsns(dsn: str, name: str) -> tuple[str, str]:
    """The DSN of database `name` on the server of `dsn`, with and without its password."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise DecodeError("dsn", str(exc)) from None
    params = {k: str(v) for k, v in parsed.items() if v is not None}
    params["dbname"] = name
    shown = {k: v for k, v in params.items() if k != "password"}
    return make_conninfo("", **params), make_conninfo("", **shown)


def _run_admin(dsn: str, statement: Composed, demo: DemoConfig) -> None:
    """One statement on the given database, outside a transaction (CREATE/DROP DATABASE)."""
    import psycopg

    timeout_ms = int(demo.database_statement_timeout_s * 1000)
    with psycopg.connect(
        dsn, autocommit=True, connect_timeout=demo.database_connect_timeout_s
    ) as conn:
        conn.execute(f"SET statement_timeout = {timeout_ms}")
        conn.execute(statement)


async def _admin(dsn: str, statement: Composed, demo: DemoConfig, what: str) -> None:
    """Run `_run_admin` in a thread (psycopg's blocking API stays off the Trio loop)."""
    import psycopg

    from chatd_trio._pg import database_address

    try:
        await trio.to_thread.run_sync(_run_admin, dsn, statement, demo)
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"{what}: cannot reach {database_address(dsn)}: {exc}") from exc
    except psycopg.errors.InsufficientPrivilege as exc:
        raise StoreError(
            f"{what} on {database_address(dsn)}: {exc} (the role needs CREATEDB)"
        ) from exc
    except psycopg.Error as exc:
        raise StoreError(f"{what} on {database_address(dsn)}: {exc}") from exc


@asynccontextmanager
async def scratch_database(
    dsn: str, demo: DemoConfig, *, keep: bool = False
) -> AsyncIterator[ScratchDatabase]:
    """CREATE DATABASE chatd_demo_<random> on the server of `dsn`; DROP it on the way out.

    The database `dsn` names is only used to issue those two statements: nothing is
    written into it. Dropping uses `WITH (FORCE)` (PostgreSQL 13+), which also ends
    connections left behind by replica processes; it runs shielded, so an interrupted
    demo still removes its database. `keep` leaves it in place.
    """
    from psycopg import sql

    name = f"{demo.database_prefix}{uuid.uuid4().hex[:12]}"
    target, shown = _scratch_dsns(dsn, name)
    ident = sql.Identifier(name)
    await _admin(
        dsn,
        sql.SQL("CREATE DATABASE {}").format(ident),
        demo,
        f"creating the demo's database {name}",
    )
    try:
        yield ScratchDatabase(name, target, shown)
    finally:
        if not keep:
            # Bounded by the statement's own limits: connecting, then the DROP.
            with bounded_cleanup(
                demo.database_connect_timeout_s + demo.database_statement_timeout_s
            ):
                await _admin(
                    dsn,
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident),
                    demo,
                    f"dropping the demo's database {name}",
                )


@asynccontextmanager
async def _backend(dsn: str | None, auth: NotifyAuth) -> AsyncIterator[tuple[Store, PubSub]]:
    if dsn is None:
        from chatd_trio.pubsub.memory import MemoryPubSub
        from chatd_trio.store.memory import MemoryStore

        local = MemoryPubSub()
        yield MemoryStore(pubsub=local), local
        return
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    async with PostgresStore.open(dsn) as store, PostgresPubSub.open(dsn, auth=auth) as pubsub:
        yield store, pubsub


async def _run_one(
    env: DemoEnv, name: str, scenario: Scenario, results: list[ScenarioResult]
) -> None:
    try:
        with trio.fail_after(env.demo.scenario_timeout_s):
            result = dataclasses.replace(await scenario(env), name=name)
    except trio.TooSlowError:
        result = ScenarioResult(name, False, f"timed out after {env.demo.scenario_timeout_s}s")
    except Exception as exc:
        logger.exception("demo scenario crashed", extra={"scenario": name})
        result = ScenarioResult(name, False, f"crashed: {exc!r}")
    results.append(result)
    env.monitor.display.line(f"{'PASS' if result.passed else 'FAIL'} {name}: {result.detail}")


async def _run_group(
    env: DemoEnv, group: Sequence[tuple[str, Scenario]], results: list[ScenarioResult]
) -> None:
    for name, scenario in group:
        await _run_one(env, name, scenario, results)


def stats_dict(server: Server) -> dict[str, Any]:
    """`Server.stats()` as JSON-ready data (what replica processes report)."""
    return server.stats().as_dict()


def _add(total: dict[str, int], more: dict[str, int]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value


def summarize(
    stats: Sequence[dict[str, Any]], statements: Sequence[dict[str, int]], wall: float
) -> tuple[tuple[str, str], ...]:
    """The summary rows: the replicas' `Server.stats()` summed, and each store's statements.

    `statements` holds one count per store: in-process replicas share the demo's store
    (counted once), each replica process has its own.
    """
    finished: dict[str, int] = {}
    workspace: dict[str, int] = {}
    subagents: dict[str, int] = {}
    for s in stats:
        _add(finished, s["turns_finished"])
        _add(workspace, s["workspace"])
        _add(subagents, s["subagents"])
    turns = sum(finished.values())
    total_statements = sum(sum(counts.values()) for counts in statements)
    drops = sum(s["streams"]["dropped_buffer"] + s["streams"]["dropped_subscriber"] for s in stats)
    per_turn = total_statements / turns if turns else 0.0

    def total(key: str) -> int:
        return sum(int(s[key]) for s in stats)

    return (
        ("replicas", str(len(stats))),
        ("turns per replica", " / ".join(str(s["turns_started"]) for s in stats)),
        ("turns", f"{turns} ({', '.join(f'{k} {v}' for k, v in sorted(finished.items()))})"),
        ("steps", str(total("steps"))),
        ("store statements (demo reads included)", f"{total_statements} ({per_turn:.1f} per turn)"),
        (
            "dials / validations / switches",
            f"{workspace['dials']} / {workspace['validations']} / {workspace['switches']}",
        ),
        ("compactions / re-entries", f"{total('compactions')} / {total('reentries')}"),
        ("retries", str(total("retries"))),
        ("subagents spawned", str(subagents["spawned"])),
        ("stream drops", str(drops)),
        ("wall time", f"{wall:.1f}s"),
    )


# -- replica processes ---------------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A replica process refused a request or went away."""


class WorkerReplica:
    """A replica process (`python -m chatd_trio.apps.demo worker`), one request at a time.

    Requests (`{"op": ...}`) and replies (`{"ok": ..., "result": ..., "error": ...}`)
    travel over the worker channel (`chatd_trio.apps.channel`).
    """

    def __init__(self, index: int, proc: trio.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.index = index
        self.proc = proc
        self._stdin = proc.stdin
        self._lines = JsonLines(proc.stdout)
        self._lock = trio.Lock()

    async def request(self, op: str, **fields: Any) -> Any:
        async with self._lock:
            try:
                await self._stdin.send_all(encode({"op": op, **fields}))
                reply = await self._lines.receive()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise WorkerError(f"replica process {self.index} went away: {exc!r}") from exc
        if not reply.get("ok"):
            raise WorkerError(f"replica process {self.index}: {reply.get('error')}")
        return reply.get("result")

    async def create_chat(
        self, owner: uuid.UUID, text: str, title: str, workspace_id: uuid.UUID | None
    ) -> uuid.UUID:
        ws = str(workspace_id) if workspace_id else None
        result = await self.request(
            "create", owner=str(owner), text=text, title=title, workspace_id=ws
        )
        return uuid.UUID(str(result))

    async def send_message(self, owner: uuid.UUID, chat_id: uuid.UUID, text: str) -> None:
        await self.request("send", owner=str(owner), chat_id=str(chat_id), text=text)

    async def stop(self) -> dict[str, Any]:
        """Stop the replica; its final stats and store statement counts."""
        result: dict[str, Any] = await self.request("stop")
        return result


@asynccontextmanager
async def _replica_processes(
    dsn: str, count: int, demo: DemoConfig, auth: NotifyAuth | None = None
) -> AsyncIterator[list[WorkerReplica]]:
    """Start `count` replica processes; they are killed and waited for on the way out.

    `auth`: the notify key this process uses too (default: a fresh one for them only);
    it reaches them in the hello, over their stdin pipe, as does the DSN.
    """
    auth = auth or NotifyAuth.generate()
    cmd = worker_command("demo")
    procs: list[trio.Process] = []
    try:
        workers: list[WorkerReplica] = []
        for index in range(1, count + 1):
            proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            procs.append(proc)
            workers.append(WorkerReplica(index, proc))
        with trio.fail_after(demo.worker_start_timeout_s):
            for worker in workers:
                await worker.request(
                    "hello",
                    index=worker.index,
                    dsn=dsn,
                    demo=dataclasses.asdict(demo),
                    notify_key=auth.key_text(),
                )
        yield workers
    finally:
        # Also on failure and Ctrl-C: no replica process outlives the demo.
        # The polite exit, then reaping the killed: worker_stop_timeout_s for each.
        with bounded_cleanup(2 * demo.worker_stop_timeout_s):
            # Closing stdin asks a replica to leave (EOF); one that does not in time is killed.
            with trio.move_on_after(demo.worker_stop_timeout_s):
                for proc in procs:
                    if proc.stdin is not None:
                        await proc.stdin.aclose()
                for proc in procs:
                    await proc.wait()
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


def _reply(ok: bool, result: Any = None, error: str | None = None) -> None:
    emit({"ok": ok, "result": result, "error": error})


async def _serve_requests(server: Server, lines: JsonLines) -> None:
    while True:
        try:
            msg = await lines.receive()
        except EOFError:
            return  # the demo went away
        op = msg["op"]
        try:
            if op == "create":
                ws = msg["workspace_id"]
                chat = await server.create_chat(
                    uuid.UUID(msg["owner"]),
                    msg["text"],
                    title=msg["title"],
                    workspace_id=uuid.UUID(ws) if ws else None,
                )
                _reply(True, str(chat.id))
            elif op == "send":
                await server.send_message(
                    uuid.UUID(msg["owner"]), uuid.UUID(msg["chat_id"]), msg["text"]
                )
                _reply(True)
            elif op == "stats":
                _reply(True, {"stats": stats_dict(server)})
            elif op == "stop":
                counts = server.store.statement_counts()
                _reply(True, {"stats": stats_dict(server), "statements": counts})
                return
            else:
                _reply(False, error=f"unknown op {op!r}")
        except ChatdError as exc:
            _reply(False, error=repr(exc))


async def worker_main() -> None:
    """One replica process: a Server on PostgreSQL serving the demo's requests."""
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

    lines = stdin_lines()
    try:
        hello = await lines.receive()
    except EOFError:
        return
    dsn = hello["dsn"]
    demo = DemoConfig(**hello["demo"])
    auth = NotifyAuth.from_key_text(hello["notify_key"])
    config = demo_config(demo)
    script = DemoScript(config, demo)
    model = ScriptedModel(script, summaries=script.summary)
    async with PostgresStore.open(dsn) as store, PostgresPubSub.open(dsn, auth=auth) as pubsub:
        pubsub_port: PubSub = pubsub
        async with Server(store, pubsub_port, model, config, dialer=dial_agent) as server:
            _reply(True, "ready")
            await _serve_requests(server, lines)


async def run_demo(
    options: DemoOptions, out: TextIO | None = None, demo: DemoConfig | None = None
) -> DemoReport:
    """Run every scenario on a fresh set of chats; print as it goes; return the outcome.

    Without a DSN the replicas are Server instances in this process. With a DSN the
    demo creates a database of its own on that server (`scratch_database`) and drops it
    at the end (`options.keep` keeps it and prints its DSN); this process runs replica 0
    (the scenarios subscribe through it) and the other replicas run as processes on
    that database.
    """
    demo = demo or DemoConfig()
    out = out if out is not None else sys.stdout
    if options.dsn is None:
        return await _run_demo(options, out, demo, None)
    async with scratch_database(options.dsn, demo, keep=options.keep) as db:
        fate = "kept at the end" if options.keep else "dropped at the end; --keep keeps it"
        print(f"demo database: {db.name} ({fate})", file=out, flush=True)
        report = await _run_demo(options, out, demo, db)
    if options.keep:
        print(f"demo database kept: {db.shown}", file=out, flush=True)
    return report


async def _run_demo(
    options: DemoOptions, out: TextIO, demo: DemoConfig, db: ScratchDatabase | None
) -> DemoReport:
    dsn = db.dsn if db is not None else None
    config = demo_config(demo)
    display = Display(out, demo, plain=options.plain)
    results: list[ScenarioResult] = []
    replicas = max(1, options.replicas)
    local_count = 1 if dsn is not None else replicas
    started = trio.current_time()
    stats: list[dict[str, Any]] = []
    statements: list[dict[str, int]] = []
    # The demo's own database and replicas: a notify key of this run, handed to the
    # replica processes it starts.
    auth = NotifyAuth.generate()
    async with _backend(dsn, auth) as (store, pubsub):
        with tempfile.TemporaryDirectory(prefix="chatd-demo-") as tmp:
            async with trio.open_nursery() as agents:
                provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
                script = DemoScript(config, demo)
                model = ScriptedModel(script, summaries=script.summary)
                servers = [
                    Server(
                        store,
                        pubsub,
                        model,
                        config,
                        dialer=dial_agent,
                        provisioner=provisioner,
                    )
                    for _ in range(local_count)
                ]
                try:
                    async with AsyncExitStack() as stack:
                        workers: list[WorkerReplica] = []
                        if dsn is not None and replicas > 1:
                            workers = await stack.enter_async_context(
                                _replica_processes(dsn, replicas - 1, demo, auth=auth)
                            )
                        for server in servers:
                            await stack.enter_async_context(server)
                        fronts: list[Replica] = [LocalReplica(s) for s in servers]
                        fronts.extend(workers)
                        async with display.live(), trio.open_nursery() as watchers:
                            monitor = Monitor(servers[0], uuid.uuid4(), display, watchers)
                            env = DemoEnv(
                                servers[0], fronts, store, provisioner, monitor, monitor.owner, demo
                            )
                            async with trio.open_nursery() as scenarios:
                                for group in SCENARIO_GROUPS:
                                    scenarios.start_soon(_run_group, env, group, results)
                            watchers.cancel_scope.cancel()
                        stats = [stats_dict(s) for s in servers]
                        statements = [store.statement_counts()]
                        for worker in workers:
                            final = await worker.stop()
                            stats.append(final["stats"])
                            statements.append(final["statements"])
                finally:
                    # Each agent's stop is bounded inside aclose; cancelling `agents` below
                    # ends whatever is still running past this.
                    with bounded_cleanup(config.workspace.local_agent_stop_timeout):
                        await provisioner.aclose()
                    agents.cancel_scope.cancel()
    summary = summarize(stats, statements, trio.current_time() - started)
    order = [name for name, _ in SCENARIOS]
    ordered = tuple(sorted(results, key=lambda r: order.index(r.name)))
    display.print_table(
        "scenarios", [(r.name, f"{'PASS' if r.passed else 'FAIL'}  {r.detail}") for r in ordered]
    )
    display.print_table("summary (Server.stats())", summary)
    report = DemoReport(ordered, summary, db)
    print("DEMO PASS" if report.passed else "DEMO FAIL", file=out, flush=True)
    return report


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `chatd-trio demo`."""
    p = sub.add_parser(
        "demo",
        help="run a handful of chats through a real Server, live in the terminal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dsn",
        help="run on the PostgreSQL server of this DSN (PostgresStore + PostgresPubSub), in a "
        "database of the demo's own: CREATE DATABASE chatd_demo_<random> there (the role "
        "needs CREATEDB; PostgreSQL 13+) and DROP it at the end; the DSN's own database is "
        "left untouched",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="with --dsn: keep the demo's database at the end and print its DSN",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="N Server replicas sharing the store and pubsub; with --dsn, replicas 2..N "
        "run as separate processes, otherwise all N run in this process",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="plain log lines instead of the live table (automatic when not a TTY)",
    )
    add_provider_arguments(p)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; 0 only when every scenario passed (with
    --provider: when every turn of the chat ended `waiting`)."""
    if args.provider is not None:
        if args.dsn is not None or args.replicas != 1:
            print("--provider runs one in-memory Server: no --dsn or --replicas", file=sys.stderr)
            return 2
        return run_provider_command(args)
    if args.replicas < 1:
        print("--replicas must be at least 1", file=sys.stderr)
        return 2
    if args.keep and args.dsn is None:
        print("--keep needs --dsn (the in-memory demo keeps nothing)", file=sys.stderr)
        return 2
    plain = bool(args.plain) or not sys.stdout.isatty()
    options = DemoOptions(dsn=args.dsn, replicas=args.replicas, plain=plain, keep=args.keep)
    try:
        report = trio.run(run_demo, options)
    except (StoreError, DecodeError) as exc:
        print(f"chatd-trio demo: {exc}", file=sys.stderr)
        return 2
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m chatd_trio.apps.demo`: the same as `chatd-trio demo`; with the single
    argument `worker`, a replica process of a demo on PostgreSQL."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == [WORKER]:
        replica_process_settings()
        trio.run(worker_main)
        return 0
    parser = argparse.ArgumentParser(prog="python -m chatd_trio.apps.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_command(sub)
    return run_demo_command(parser.parse_args(["demo", *argv]))


if __name__ == "__main__":
    sys.exit(main())
