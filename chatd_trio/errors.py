"""The exception hierarchy. Every error a caller can act on has its own type."""

from __future__ import annotations


class ChatdError(Exception):
    """Base class of every chatd_trio error."""


class DecodeError(ChatdError, ValueError):
    """Malformed input: names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid {field}: {reason}")
        self.field = field
        self.reason = reason


class PayloadTooLarge(DecodeError):
    """Input larger than the configured limit."""


class ConfigError(DecodeError):
    """A configuration value out of its range or of the wrong type, refused when its
    section is built; `field` names it (`AcquireConfig.max_chats_per_acquire`)."""


class NotFound(ChatdError, LookupError):
    """A referenced row does not exist."""


class ChatNotFound(NotFound):
    """No chat with that id (or not visible to this user)."""


class MessageNotFound(NotFound):
    """No message with that id in that chat."""


class QueuedMessageNotFound(NotFound):
    """No queued message with that id in that chat."""


class WorkspaceNotFound(NotFound):
    """No workspace with that id."""


class BuildNotFound(NotFound):
    """No workspace build with that id."""


class PermissionDenied(ChatdError):
    """The acting user does not own the chat."""


class EditRefused(ChatdError):
    """The message cannot be edited (not a user message, deleted, other chat)."""


class QueueFull(ChatdError):
    """The chat's queue already holds the maximum number of messages."""


class PersistRefused(ChatdError):
    """The turn no longer owns the chat (edited, taken over): its step is not persisted."""


class OwnershipLost(PersistRefused):
    """A write carried an ownership token the chat no longer has: another run took it
    (stale recovery, re-acquisition) or the run already finished. Nothing changed."""


class StoreError(ChatdError):
    """The store failed (database unreachable, statement failed)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached."""


class PubSubError(ChatdError):
    """The pubsub connection failed."""


class NotifyKeyError(ChatdError, ValueError):
    """The notify key is missing or malformed (docs/security.md, "A database login role")."""


class NoWorkspaceAgent(ChatdError):
    """The chat's workspace has no agent in its latest build (stopped or not yet built)."""

    def __init__(self, message: str = "chat has no workspace agent") -> None:
        super().__init__(message)


class ChatHasNoWorkspace(ChatdError):
    """The chat is not attached to any workspace."""

    def __init__(self, message: str = "chat has no workspace") -> None:
        super().__init__(message)


class DialError(ChatdError):
    """A lazily validated dial failed; the original error is the cause."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"dial with lazy validation: {original}")
        self.original = original


class ModelError(ChatdError):
    """A model call failed; classified for the retry policy."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        kind: str = "unknown",
        provider: str = "",
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.kind = kind
        self.provider = provider
        self.status_code = status_code
        self.retry_after = retry_after


class ToolError(ChatdError):
    """A tool failed; becomes an error tool result, the turn goes on."""


class SubagentError(ChatdError):
    """A subagent operation failed (not a descendant, child in error, timeout)."""


class AgentError(ChatdError):
    """A workspace agent connection or operation failed."""


class AgentUnavailable(AgentError):
    """The workspace agent cannot be reached (refused, timed out, connection closed)."""


class AgentConnectionLost(AgentUnavailable):
    """The agent connection closed with a request in flight; it may or may not have run."""


class AgentAuthError(AgentError):
    """The workspace agent refused the connection's token."""


class AgentOperationError(AgentError):
    """The workspace agent answered a request with an error; `kind` classifies it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
