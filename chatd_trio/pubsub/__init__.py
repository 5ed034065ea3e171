"""PubSub port and adapters."""

from chatd_trio.pubsub.base import Delivery, PubSub, Resync, Subscription

__all__ = ["Delivery", "PubSub", "Resync", "Subscription"]
