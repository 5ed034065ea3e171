"""PubSub port and adapters."""

from chatd_trio.pubsub.auth import NotifyAuth, NotifyRejected
from chatd_trio.pubsub.base import (
    DatabaseChannels,
    Delivery,
    HandlerDelivery,
    InlineDelivery,
    PubSub,
    PubSubStatistics,
    Resync,
    Subscription,
)

__all__ = [
    "DatabaseChannels",
    "Delivery",
    "HandlerDelivery",
    "InlineDelivery",
    "NotifyAuth",
    "NotifyRejected",
    "PubSub",
    "PubSubStatistics",
    "Resync",
    "Subscription",
]
