"""`AsyncClosing`: an object closed with `aclose()` that `async with` closes too."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class AsyncClosing:
    """A base for objects closed with `aclose()`: ``async with obj:`` yields `obj` and
    awaits `obj.aclose()` however the block is left (its exception propagates)."""

    async def aclose(self) -> None:
        """Release what the object holds (each subclass says what)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
