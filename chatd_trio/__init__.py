"""chatd_trio: durable, concurrent AI agent chats on Trio.

Everything an embedding application uses is importable from here: the `Server` and
its turn reports, chats, messages and parts, stream events, tools, models (with the
scripted model's step builders), stores and pubsubs, every configuration section and
every error. Implementation modules stay importable for detail (docs/api.md).

The PostgreSQL adapters (`PostgresStore`, `PostgresPubSub`) are loaded on first use:
importing the package does not import psycopg.
"""

import importlib
from typing import TYPE_CHECKING

from chatd_trio.agent import dial_agent, serve_agent
from chatd_trio.agent.local import LocalProvisioner
from chatd_trio.config import (
    AcquireConfig,
    AgentConfig,
    CompactionConfig,
    Config,
    LimitsConfig,
    LoopConfig,
    ModelHTTPConfig,
    NotifyAuthConfig,
    PostgresConfig,
    PubSubConfig,
    QueueConfig,
    RequestOptions,
    RetryConfig,
    StoreRetryConfig,
    StreamConfig,
    SubagentConfig,
    WorkspaceConfig,
)
from chatd_trio.dial import DialResult, dial_with_lazy_validation
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    ContextFilePart,
    ErrorEvent,
    ErrorPayload,
    EventType,
    Message,
    MessageEvent,
    MessagePartEvent,
    NewMessage,
    Part,
    QueuedMessage,
    QueueUpdateEvent,
    ReasoningPart,
    RetryEvent,
    RetryPayload,
    Role,
    SnapshotEndEvent,
    StatusEvent,
    StreamEvent,
    TextPart,
    ToolCallPart,
    ToolResultPart,
    Usage,
    Visibility,
    text_of,
)
from chatd_trio.errors import (
    AgentAuthError,
    AgentConnectionLost,
    AgentError,
    AgentOperationError,
    AgentUnavailable,
    BuildNotFound,
    ChatdError,
    ChatHasNoWorkspace,
    ChatNotFound,
    ConfigError,
    DecodeError,
    DialError,
    EditRefused,
    MessageNotFound,
    ModelError,
    NotFound,
    NotifyKeyError,
    NoWorkspaceAgent,
    OwnershipLost,
    PayloadTooLarge,
    PermissionDenied,
    PersistRefused,
    PubSubError,
    QueuedMessageNotFound,
    QueueFull,
    StoreError,
    StoreUnavailable,
    SubagentError,
    ToolError,
    WorkspaceNotFound,
)
from chatd_trio.models.anthropic import AnthropicModel
from chatd_trio.models.base import (
    Delta,
    Finish,
    GenerateResult,
    Model,
    PromptMessage,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    ToolSpec,
)
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.models.scripted import (
    ScriptedModel,
    ScriptStep,
    ToolsThenAnswer,
    error_step,
    model_error,
    text_step,
    tool_step,
    usage_of,
)
from chatd_trio.pubsub.base import PubSub
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.server import Server, ServerStats, TurnEnv
from chatd_trio.store.base import EditResult, SendResult, Store
from chatd_trio.store.memory import MemoryStore
from chatd_trio.streams import StreamSubscription
from chatd_trio.tools import (
    ErrorResult,
    FunctionTool,
    Tool,
    ToolContext,
    ToolRegistry,
    TypedTool,
    tool,
)
from chatd_trio.turns import TurnReport

if TYPE_CHECKING:
    from chatd_trio.pubsub.postgres import PostgresPubSub
    from chatd_trio.store.postgres import PostgresStore

# Root names whose modules import psycopg, imported by `__getattr__` on first access
# (PEP 562): an application on the memory adapters never loads psycopg.
_POSTGRES = {
    "PostgresPubSub": "chatd_trio.pubsub.postgres",
    "PostgresStore": "chatd_trio.store.postgres",
}


def __getattr__(name: str) -> object:
    """Import a PostgreSQL adapter on first access (`chatd_trio.PostgresStore`)."""
    module = _POSTGRES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    # Cached as a module global: later lookups no longer reach __getattr__.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, including the PostgreSQL ones not loaded yet."""
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AcquireConfig",
    "AgentAuthError",
    "AgentConfig",
    "AgentConnectionLost",
    "AgentError",
    "AgentOperationError",
    "AgentUnavailable",
    "AnthropicModel",
    "BuildNotFound",
    "Chat",
    "ChatHasNoWorkspace",
    "ChatNotFound",
    "ChatStatus",
    "ChatdError",
    "CompactionConfig",
    "Config",
    "ConfigError",
    "ContextFilePart",
    "DecodeError",
    "Delta",
    "DialError",
    "DialResult",
    "EditRefused",
    "EditResult",
    "ErrorEvent",
    "ErrorPayload",
    "ErrorResult",
    "EventType",
    "Finish",
    "FunctionTool",
    "GenerateResult",
    "LimitsConfig",
    "LocalProvisioner",
    "LoopConfig",
    "MemoryPubSub",
    "MemoryStore",
    "Message",
    "MessageEvent",
    "MessageNotFound",
    "MessagePartEvent",
    "Model",
    "ModelError",
    "ModelHTTPConfig",
    "NewMessage",
    "NoWorkspaceAgent",
    "NotFound",
    "NotifyAuthConfig",
    "NotifyKeyError",
    "OpenAIChatModel",
    "OwnershipLost",
    "Part",
    "PayloadTooLarge",
    "PermissionDenied",
    "PersistRefused",
    "PostgresConfig",
    "PostgresPubSub",
    "PostgresStore",
    "PromptMessage",
    "PubSub",
    "PubSubConfig",
    "PubSubError",
    "QueueConfig",
    "QueueFull",
    "QueueUpdateEvent",
    "QueuedMessage",
    "QueuedMessageNotFound",
    "ReasoningDelta",
    "ReasoningPart",
    "RequestOptions",
    "RetryConfig",
    "RetryEvent",
    "RetryPayload",
    "Role",
    "ScriptStep",
    "ScriptedModel",
    "SendResult",
    "Server",
    "ServerStats",
    "SnapshotEndEvent",
    "StatusEvent",
    "Store",
    "StoreError",
    "StoreRetryConfig",
    "StoreUnavailable",
    "StreamConfig",
    "StreamEvent",
    "StreamSubscription",
    "SubagentConfig",
    "SubagentError",
    "TextDelta",
    "TextPart",
    "Tool",
    "ToolCallDelta",
    "ToolCallDone",
    "ToolCallPart",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolResultPart",
    "ToolSpec",
    "ToolsThenAnswer",
    "TurnEnv",
    "TurnReport",
    "TypedTool",
    "Usage",
    "Visibility",
    "WorkspaceConfig",
    "WorkspaceNotFound",
    "dial_agent",
    "dial_with_lazy_validation",
    "error_step",
    "model_error",
    "serve_agent",
    "text_of",
    "text_step",
    "tool",
    "tool_step",
    "usage_of",
]
