"""PubSub port and adapters."""

from chatd_trio.pubsub.auth import NotifyAuth, NotifyRejected
from chatd_trio.pubsub.base import Delivery, PubSub, PubSubStatistics, Resync, Subscription

__all__ = [
    "Delivery",
    "NotifyAuth",
    "NotifyRejected",
    "PubSub",
    "PubSubStatistics",
    "Resync",
    "Subscription",
]
