"""chatd_trio: durable, concurrent AI agent chats on Trio."""

from chatd_trio.config import Config
from chatd_trio.domain import (
    Chat,
    ChatStatus,
    Message,
    NewMessage,
    Role,
    TextPart,
    Visibility,
)
from chatd_trio.errors import ChatdError

__all__ = [
    "Chat",
    "ChatStatus",
    "ChatdError",
    "Config",
    "Message",
    "NewMessage",
    "Role",
    "TextPart",
    "Visibility",
]
