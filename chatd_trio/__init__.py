"""chatd_trio: durable, concurrent AI agent chats on Trio.

The public API, re-exported; implementation modules stay importable for detail.
"""

from chatd_trio.agent import dial_agent, serve_agent
from chatd_trio.config import Config
from chatd_trio.dial import DialResult, dial_with_lazy_validation
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    NewMessage,
    Role,
    TextPart,
    Visibility,
)
from chatd_trio.errors import (
    ChatdError,
    ChatNotFound,
    ConfigError,
    DecodeError,
    DialError,
    NoWorkspaceAgent,
    PayloadTooLarge,
    PermissionDenied,
    QueueFull,
    StoreError,
    StoreUnavailable,
)
from chatd_trio.models.openai import OpenAIChatModel
from chatd_trio.models.scripted import ScriptedModel
from chatd_trio.pubsub.memory import MemoryPubSub
from chatd_trio.pubsub.postgres import PostgresPubSub
from chatd_trio.server import Server, ServerStats
from chatd_trio.store.memory import MemoryStore
from chatd_trio.store.postgres import PostgresStore
from chatd_trio.tools import ToolContext, ToolRegistry, tool
from chatd_trio.workspace import LocalProvisioner

__all__ = [
    "Chat",
    "ChatNotFound",
    "ChatStatus",
    "ChatdError",
    "Config",
    "ConfigError",
    "DecodeError",
    "DialError",
    "DialResult",
    "LocalProvisioner",
    "MemoryPubSub",
    "MemoryStore",
    "Message",
    "NewMessage",
    "NoWorkspaceAgent",
    "OpenAIChatModel",
    "PayloadTooLarge",
    "PermissionDenied",
    "PostgresPubSub",
    "PostgresStore",
    "QueueFull",
    "Role",
    "ScriptedModel",
    "Server",
    "ServerStats",
    "StoreError",
    "StoreUnavailable",
    "TextPart",
    "ToolContext",
    "ToolRegistry",
    "Visibility",
    "dial_agent",
    "dial_with_lazy_validation",
    "serve_agent",
    "tool",
]
