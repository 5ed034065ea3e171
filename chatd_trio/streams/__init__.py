"""Per-chat streams: publish, subscribe with catch-up, durable cache, drop accounting.

docs/spec.md §4 is the contract. One `ChatStreams` per replica (`replica`) holds
one `ChatStreamState` per chat (`state`), created on demand and removed when it has
no subscribers, no running turn and no publish in flight. A subscriber holds a
`StreamSubscription` (`subscription`); what a store write announces inside its
transaction is decided by `change_notices` (`announce`).

Delivery paths:

* local: `message_part` deltas always go straight into the subscriber queues
  of this replica. Without pubsub every event does.
* notify: with pubsub, durable and control events reach every subscriber (on
  this replica too) through the chat's channel. A notify about a message is
  served, in order of preference, from this replica's durable cache, from the
  message carried inside the notify, or by reading the store after the
  subscriber's cursor. A subscriber never receives a message id <= its cursor
  (a full refresh resets the cursor to 0).

Lossless delivery, defined: every durable message reaches every subscriber
exactly once per history epoch, in id order, after its cursor (an edit's full
refresh starts a new epoch from 0). Ephemeral `message_part` events may be
dropped and are counted. When a subscriber's queue is full, a durable or
control item is not queued: the subscriber is marked for a resync instead (one
marker, coalescing every later overflow) and, on reaching it, reads the store
after its cursor (from 0 if a full refresh was among the dropped items) and
re-emits the chat's status and queue. `retry` and `error` notifications
dropped that way are lost, like parts: they are transient.

Cache safety: a cached or carried message is only delivered when nothing can
sit between it and the cursor: its id is the cursor + 1 (ids are global, so
no other message exists in between), or its known predecessor in the same
chat is the cursor. The predecessor is known when the store reports it
(`Message.prev_id`: the chat's latest visible message at insert time, computed
under the chat's row lock), or for consecutive messages published by this
replica during one turn: while a replica owns a running turn nobody else
inserts into that chat's history (new messages are queued, an edit ends the
turn with a full refresh). A carried message's notify names its predecessor as
`after_message_id`, so a subscriber on any replica whose cursor is that
predecessor takes it without a read. Anything else reads the store.
"""

# Each module's `__all__` says what it exports.
from chatd_trio.streams import announce, replica, subscription
from chatd_trio.streams.announce import *  # noqa: F403
from chatd_trio.streams.replica import *  # noqa: F403
from chatd_trio.streams.subscription import *  # noqa: F403

__all__ = []
__all__ += replica.__all__
__all__ += subscription.__all__
__all__ += announce.__all__
