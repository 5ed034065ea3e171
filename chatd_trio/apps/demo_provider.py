"""`chatd-trio demo --provider ...`: one chat with a real model, through a real Server.

The scripted demo shows the Server's machinery with a model that follows a script;
this one points the same Server at a provider (docs/providers.md): OpenAI, Anthropic
or any OpenAI-compatible server (vLLM, Ollama, LiteLLM). The chat gets a workspace on
a local agent in a temporary directory (the `execute`, `read_file`, `write_file`,
`list_dir` tools), the prompt (and any follow-up prompts) go in as user messages, and
what the chat stream carries is printed as it arrives: the answer's text, tool calls
and results, retries and errors. The exit status says whether every turn ended
`waiting` (0) or one ended in `error` (1).

Settings come from flags, each with an environment variable as its default, so a
shell profile can hold them: `CHATD_PROVIDER`, `CHATD_MODEL`, `CHATD_BASE_URL`. The
API key is read from the environment only (a key on the command line would show in
`ps`): `OPENAI_API_KEY` or `ANTHROPIC_API_KEY`, or the variable `--api-key-env` names;
a local server without keys needs none.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, cast

import trio

from chatd_trio.agent import dial_agent
from chatd_trio.agent.local import LocalProvisioner
from chatd_trio.config import AcquireConfig, Config, RequestOptions
from chatd_trio.domain import (
    ChatStatus,
    ErrorEvent,
    MessageEvent,
    MessagePartEvent,
    ReasoningPart,
    RetryEvent,
    Role,
    StatusEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
)
from chatd_trio.models.anthropic import AnthropicModel
from chatd_trio.models.base import Model
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server
from chatd_trio.store.memory import MemoryStore
from chatd_trio.streams import StreamSubscription

PROVIDERS = ("openai", "anthropic")
DEFAULT_MODELS: Mapping[str, str] = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}
DEFAULT_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
}
KEY_VARIABLES: Mapping[str, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
DEFAULT_PROMPT = (
    "Use your tools: list the workspace directory, write a file hello.txt containing "
    "'hello from chatd', read it back, and tell me in one sentence what you did."
)
# A turn with a real model (tool calls, retries) bound for the demo: 10 minutes.
TURN_TIMEOUT_S = 600.0
PREVIEW_CHARS = 200


@dataclass(frozen=True)
class ProviderDemoOptions:
    """What `chatd-trio demo --provider` runs: which model, where, and the prompts."""

    provider: str
    model: str
    api_key: str
    base_url: str | None = None
    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    context_limit: int | None = None
    options: RequestOptions = field(default_factory=RequestOptions)
    turn_timeout: float = TURN_TIMEOUT_S


def make_model(o: ProviderDemoOptions) -> OpenAIChatModel | AnthropicModel:
    """The adapter `o.provider` names, configured from `o`."""
    base_url = o.base_url or DEFAULT_BASE_URLS[o.provider]
    if o.provider == "anthropic":
        return AnthropicModel(
            o.api_key, o.model, base_url=base_url, context_limit=o.context_limit, options=o.options
        )
    # A custom base URL is some OpenAI-compatible server: errors and logs name its host.
    provider = "openai" if o.base_url is None else "openai-compatible"
    return OpenAIChatModel(
        base_url,
        o.api_key,
        o.model,
        provider=provider,
        context_limit=o.context_limit,
        options=o.options,
    )


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


class _Printer:
    """Prints a chat stream for people: deltas inline, everything else one line each."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.inline = False

    def _line(self, text: str) -> None:
        if self.inline:
            self.out.write("\n")
            self.inline = False
        print(text, file=self.out, flush=True)

    def event(self, event: object) -> None:
        if isinstance(event, MessagePartEvent):
            part = event.part
            if event.role is Role.ASSISTANT and isinstance(part, TextPart | ReasoningPart):
                if not self.inline:
                    self.out.write("reasoning: " if isinstance(part, ReasoningPart) else "model: ")
                    self.inline = True
                self.out.write(part.text)
                self.out.flush()
            return
        if isinstance(event, MessageEvent):
            for part in event.message.parts:
                if isinstance(part, ToolCallPart):
                    self._line(f"  -> {part.name}({_preview(part.arguments)})")
                elif isinstance(part, ToolResultPart):
                    flag = "error: " if part.is_error else ""
                    self._line(f"  <- {part.name}: {flag}{_preview(str(part.result))}")
        elif isinstance(event, StatusEvent):
            self._line(f"[{event.status.value}]")
        elif isinstance(event, RetryEvent):
            r = event.retry
            self._line(f"[retry {r.attempt} in {r.delay_s:.1f}s: {r.kind}: {r.error}]")
        elif isinstance(event, ErrorEvent):
            self._line(f"[error {event.error.kind}: {event.error.message}]")


async def run_provider_demo(
    o: ProviderDemoOptions, out: TextIO | None = None, *, model: Model | None = None
) -> int:
    """Run the prompts as one chat; 0 when every turn ended `waiting`, 1 otherwise.

    `model` replaces the one `o` describes (tests pass their own)."""
    out = out if out is not None else sys.stdout
    printer = _Printer(out)
    pubsub = MemoryPubSub()
    store = MemoryStore(pubsub=pubsub)
    config = Config(acquire=AcquireConfig(acquire_interval=0.2))
    owner = uuid.uuid4()
    shown = o.base_url or DEFAULT_BASE_URLS[o.provider]
    print(f"provider {o.provider}, model {o.model} at {shown}", file=out, flush=True)
    async with AsyncExitStack() as stack:
        chosen: Model
        if model is None:
            # A concrete adapter for `async with`; it satisfies the Model port.
            chosen = cast(Model, await stack.enter_async_context(make_model(o)))
        else:
            chosen = model
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="chatd-provider-demo-"))
        agents = await stack.enter_async_context(trio.open_nursery())
        stack.callback(agents.cancel_scope.cancel)
        provisioner = LocalProvisioner(store, agents, Path(tmp), config=config)
        stack.push_async_callback(provisioner.aclose)
        server = await stack.enter_async_context(
            Server(store, pubsub, chosen, config, dialer=dial_agent, provisioner=provisioner)
        )
        workspace = await provisioner.create(owner, "provider-demo")
        print(f"workspace: {provisioner.directory(workspace.id)}", file=out, flush=True)
        print(f"\nuser: {o.prompts[0]}", file=out, flush=True)
        chat = await server.create_chat(
            owner, o.prompts[0], title="provider demo", workspace_id=workspace.id
        )
        chat_id = chat.id
        for turn, prompt in enumerate(o.prompts):
            async with server.subscribe(owner, chat_id) as sub:
                if turn > 0:
                    print(f"\nuser: {prompt}", file=out, flush=True)
                    await server.send_message(owner, chat_id, prompt)
                with trio.fail_after(o.turn_timeout):
                    status = await _until_turn_ends(sub, printer, follow_up=turn > 0)
            if status is not ChatStatus.WAITING:
                last = (await store.get_chat(chat_id)).last_error
                print(f"\nthe turn ended in {status.value}: {last}", file=out, flush=True)
                return 1
        stats = server.stats()
        print(
            f"\ndone: {stats.steps} steps, {stats.retries} retries, "
            f"{stats.compactions} compactions",
            file=out,
            flush=True,
        )
    return 0


async def _until_turn_ends(
    sub: StreamSubscription, printer: _Printer, *, follow_up: bool
) -> ChatStatus:
    """Print events until the turn has stopped (`waiting` or `error`). A new chat can
    only be stopped after its turn; a follow-up's snapshot still shows the turn before,
    so its end counts only after the chat went pending or running again."""
    started = not follow_up
    while True:
        event = await sub.receive()
        printer.event(event)
        if isinstance(event, StatusEvent):
            if event.status in (ChatStatus.PENDING, ChatStatus.RUNNING):
                started = True
            elif started and event.status in (ChatStatus.WAITING, ChatStatus.ERROR):
                return event.status


# -- the command line ------------------------------------------------------------------


def add_provider_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `chatd-trio demo` that pick a real provider."""
    group = p.add_argument_group(
        "a real provider (docs/providers.md)",
        "With --provider the demo runs one chat against that model instead of the scripted "
        "scenarios. The API key comes from the environment: OPENAI_API_KEY, "
        "ANTHROPIC_API_KEY, or the variable --api-key-env names.",
    )
    group.add_argument(
        "--provider",
        choices=PROVIDERS,
        default=os.environ.get("CHATD_PROVIDER") or None,
        help="openai (any OpenAI-compatible server with --base-url: vLLM, Ollama, "
        "LiteLLM...) or anthropic; default $CHATD_PROVIDER",
    )
    group.add_argument(
        "--model",
        default=os.environ.get("CHATD_MODEL") or None,
        help="the model name; default $CHATD_MODEL, else "
        + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()),
    )
    group.add_argument(
        "--base-url",
        default=os.environ.get("CHATD_BASE_URL") or None,
        help="the API root, e.g. http://localhost:11434/v1 (Ollama), "
        "http://HOST:8000/v1 (vLLM); default $CHATD_BASE_URL, else the provider's",
    )
    group.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding the API key (default OPENAI_API_KEY or "
        "ANTHROPIC_API_KEY); none is needed with --base-url",
    )
    group.add_argument(
        "--prompt",
        action="append",
        help="a user message (repeat for follow-ups in the same chat); default: a task "
        "that uses the workspace tools",
    )
    group.add_argument("--temperature", type=float)
    group.add_argument("--max-tokens", type=int)
    group.add_argument("--reasoning-effort", help="OpenAI reasoning models: low, medium, high")
    group.add_argument(
        "--thinking-budget", type=int, help="Anthropic extended thinking: its token budget"
    )
    group.add_argument(
        "--context-limit", type=int, help="the model's context window, for compaction"
    )


def provider_options(args: argparse.Namespace) -> ProviderDemoOptions:
    """The options the parsed flags describe; ValueError says what is missing."""
    provider = str(args.provider)
    variable = args.api_key_env or KEY_VARIABLES[provider]
    api_key = os.environ.get(variable, "")
    if not api_key and (args.api_key_env or args.base_url is None):
        raise ValueError(f"set {variable} to the API key (or --api-key-env VAR)")
    return ProviderDemoOptions(
        provider=provider,
        model=args.model or DEFAULT_MODELS[provider],
        api_key=api_key,
        base_url=args.base_url,
        prompts=tuple(args.prompt or (DEFAULT_PROMPT,)),
        context_limit=args.context_limit,
        options=RequestOptions(
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            reasoning_effort=args.reasoning_effort,
            thinking_budget_tokens=args.thinking_budget,
        ),
    )


def run_provider_command(args: argparse.Namespace) -> int:
    """`chatd-trio demo --provider ...`: 0 when every turn ended waiting, 1 when one
    failed, 2 on a usage error."""
    try:
        options = provider_options(args)
    except ValueError as exc:
        print(f"chatd-trio demo: {exc}", file=sys.stderr)
        return 2
    return trio.run(run_provider_demo, options)
