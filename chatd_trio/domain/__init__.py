"""Chats, messages, parts, statuses, stream events and the notify payload.

The foundation every room of the package builds on, in four modules:
`records` (chats, messages, parts, workspaces), `events` (what a subscription
yields), `notify` (what crosses replicas on a chat's or an owner's channel) and
`codec` (the `JSON` type and the strict readers every `from_json` uses). Every
name a module exports is importable from here.

Every record has a JSON codec: `to_json()` gives plain JSON data and
`from_json()` decodes strictly, raising `DecodeError` naming the field for any
malformed input (never a KeyError or TypeError from deep inside).
"""

# Each module's `__all__` says what it exports; repeating the names here would be a
# second list to keep in step.
from chatd_trio.domain import codec, events, notify, records
from chatd_trio.domain.codec import *  # noqa: F403
from chatd_trio.domain.events import *  # noqa: F403
from chatd_trio.domain.notify import *  # noqa: F403
from chatd_trio.domain.records import *  # noqa: F403

__all__ = []
__all__ += records.__all__
__all__ += events.__all__
__all__ += notify.__all__
__all__ += codec.__all__
