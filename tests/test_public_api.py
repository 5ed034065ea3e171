"""The public surface is small, explicit and importable from the package root."""

from __future__ import annotations

import chatd_trio

PUBLIC = {
    "Chat", "ChatNotFound", "ChatStatus", "ChatdError", "Config", "ConfigError",
    "DecodeError", "DialError",
    "DialResult", "LocalProvisioner", "MemoryPubSub", "MemoryStore", "Message", "NewMessage",
    "NoWorkspaceAgent", "OpenAIChatModel", "PayloadTooLarge", "PermissionDenied",
    "PostgresPubSub", "PostgresStore", "QueueFull", "Role", "ScriptedModel", "Server",
    "ServerStats", "StoreError", "StoreUnavailable", "TextPart", "ToolContext", "ToolRegistry",
    "Visibility", "dial_agent", "dial_with_lazy_validation", "serve_agent", "tool",
}  # fmt: skip


def test_the_public_api_is_exactly_the_pinned_names() -> None:
    assert set(chatd_trio.__all__) == PUBLIC
    for name in PUBLIC:
        obj = getattr(chatd_trio, name)
        assert obj.__doc__, f"{name} has no docstring"
