"""Model port and adapters."""

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

__all__ = [
    "Delta",
    "Finish",
    "GenerateResult",
    "Model",
    "PromptMessage",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallDone",
    "ToolSpec",
]
