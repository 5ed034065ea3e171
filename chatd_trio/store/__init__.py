"""Store port and adapters."""

from chatd_trio.store.base import (
    EditResult,
    FinishResult,
    SendResult,
    StatementCounter,
    Store,
    TurnOutcome,
)

__all__ = ["EditResult", "FinishResult", "SendResult", "StatementCounter", "Store", "TurnOutcome"]
