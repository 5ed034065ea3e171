"""PubSub over PostgreSQL LISTEN/NOTIFY, on psycopg driven natively by Trio.

One dedicated LISTEN connection per instance serves every subscription
(`chatd_trio._pgtrio`: its socket waits are Trio's). The listener task reads one
batch at a time (`notifies(stop_after=1)`) and dispatches it to the
subscriptions' queues. psycopg's `notifies()` holds the connection lock while it
waits, so LISTEN/UNLISTEN cannot run beside it: a subscription change cancels
the pending wait, the listener applies the change, then waits again. Cancelling
that wait is safe: the connection is idle (no query to cancel, so it stays
open) and a batch that was read is never dropped (nothing awaits between
reading it and handing it back); notifications that arrive while LISTEN runs
wait in psycopg's backlog.

Publishing uses a separate small pool, so it never waits behind the listener.
On connection loss the listener reconnects with exponential backoff,
re-LISTENs every channel, then delivers `Resync()` to every subscription: a
notify may have been missed while disconnected.

Any login of the database can NOTIFY and LISTEN on these channels, so payloads are
sealed (chatd_trio.pubsub.auth) under the deployment's key: the listener opens each
received notify once and dispatches only what opens; the rest is dropped and
counted. Without a key `open()` refuses to start (`NotifyKeyError`) unless the
configuration explicitly accepts unauthenticated notifies.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import trio
from psycopg import sql

from chatd_trio._groups import unwrapped
from chatd_trio._pg import database_address
from chatd_trio._pgtrace import RoundTrips, traced_class
from chatd_trio._pgtrio import AnswerWait, PoolSettings, TrioConnection, TrioPool, connect
from chatd_trio.config import PubSubConfig
from chatd_trio.errors import PubSubError
from chatd_trio.pubsub._shared import (
    HandlerSubscription,
    QueueSubscription,
    check_channel,
    check_publish,
)
from chatd_trio.pubsub.auth import NotifyAuth, NotifyGate
from chatd_trio.pubsub.base import Delivery, PubSubStatistics, Resync

__all__ = ["PostgresPubSub"]

log = logging.getLogger(__name__)

_NOTIFY = "SELECT pg_notify(%s, %s)"
# A listener reading batch after batch without waiting yields to the others after this many.
_BATCHES_PER_STEP = 32
# The publish pool's connections are few and busy: recycle them as the store's are.
_PUBLISH_MAX_IDLE = 300.0
_PUBLISH_MAX_LIFETIME = 1800.0


async def _fetch_batch(conn: TrioConnection) -> list[tuple[str, str]]:
    """Wait for the next batch of notifications (those of one network packet)."""
    batch: list[tuple[str, str]] = []
    # stop_after=1 ends the generator by itself after the first batch: breaking out of
    # the loop here would leave it holding the connection lock until finalised.
    async for note in conn.notifies(stop_after=1):
        batch.append((note.channel, note.payload))
    return batch


# -- Trio side ------------------------------------------------------------------------------


class PostgresPubSub:
    """PubSub over LISTEN/NOTIFY; create it with `PostgresPubSub.open(dsn)`."""

    def __init__(
        self,
        dsn: str,
        config: PubSubConfig,
        pool: TrioPool[TrioConnection],
        instance: str,
        auth: NotifyAuth,
        round_trips: RoundTrips | None = None,
    ) -> None:
        self._round_trips = round_trips
        self._connection_class = traced_class(TrioConnection, round_trips)
        self._dsn = dsn
        self._config = config
        self._pool = pool
        self._gate = NotifyGate(auth, config.auth, "postgres")
        self._app_name = f"{config.application_name}-listen-{instance}"
        self._subs: dict[str, set[QueueSubscription]] = {}
        # Channels LISTENed on the current connection: a channel is added once its LISTEN
        # has completed and removed before its UNLISTEN starts, so a subscriber never
        # trusts a LISTEN that is being undone.
        self._listening: set[str] = set()
        self._connected = False
        self._closed = False
        self._backend_pid: int | None = None
        self._dirty = False
        self._fetch_scope: trio.CancelScope | None = None
        # Replaced after every listener round: waiters re-check the state when it fires.
        self._round = trio.Event()
        self._published = 0
        self._delivered = 0
        self._resyncs = 0
        self._listens = 0
        self._unlistens = 0
        self._reconnects = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        reconnect_backoff_initial: float | None = None,
        reconnect_backoff_max: float | None = None,
        config: PubSubConfig | None = None,
        auth: NotifyAuth | None = None,
    ) -> AsyncIterator[PostgresPubSub]:
        """Connect the listener and the publish pool; closing the block cancels everything.

        The backoff arguments override `config` (defaults 0.1 s and 5 s). `auth`: the
        keys notifies are sealed and opened with, the same on every replica; default
        `NotifyAuth.from_config(config.auth)` (the `CHATD_NOTIFY_KEY` environment
        variable unless configured otherwise). Raises `NotifyKeyError`, before
        connecting, when there is no usable key, and `PubSubError` when the database
        cannot be reached at start.
        """
        cfg = config or PubSubConfig()
        if auth is None:
            auth = NotifyAuth.from_config(cfg.auth)
        if not auth.authenticated:
            log.warning(
                "pubsub notifies are not authenticated: any database login can forge and read "
                "them (NotifyAuthConfig.allow_unauthenticated)",
                extra={"database": database_address(dsn)},
            )
        overrides: dict[str, float] = {}
        if reconnect_backoff_initial is not None:
            overrides["reconnect_backoff_initial"] = reconnect_backoff_initial
        if reconnect_backoff_max is not None:
            overrides["reconnect_backoff_max"] = reconnect_backoff_max
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)  # type: ignore[arg-type]
        instance = uuid.uuid4().hex[:8]
        trips = RoundTrips() if cfg.count_round_trips else None
        publish_kwargs = _conn_kwargs(cfg, f"{cfg.application_name}-publish-{instance}")
        publish_class = traced_class(TrioConnection, trips)

        async def open_publisher() -> TrioConnection:
            return await connect(dsn, cls=publish_class, **publish_kwargs)

        pool: TrioPool[TrioConnection] = TrioPool(
            open_publisher,
            # A NOTIFY alone: its task parks for the answer (nothing waits behind it).
            AnswerWait(0.0),
            PoolSettings(
                min_size=cfg.publish_pool_min_size,
                max_size=cfg.publish_pool_max_size,
                max_idle=_PUBLISH_MAX_IDLE,
                max_lifetime=_PUBLISH_MAX_LIFETIME,
                timeout=cfg.publish_timeout,
            ),
        )
        pubsub = cls(dsn, cfg, pool, instance, auth, trips)
        conn: TrioConnection | None = None
        try:
            # The listener first: a refused connection fails at once.
            conn = await pubsub._connect()
            await pool.open()
        except BaseException as exc:
            if conn is not None:
                await conn.close()
            pool.close()
            if isinstance(exc, psycopg.Error | OSError):
                raise PubSubError(f"cannot connect the pubsub: {exc}") from exc
            raise
        # What the block raises leaves as itself: the listener's nursery is `unwrapped`
        # (as the memory adapter raises it).
        try:
            async with unwrapped(trio.open_nursery()) as nursery:
                # start(): no subscriber may arrive before the first LISTEN round.
                await nursery.start(pubsub._listen_forever, conn)
                try:
                    yield pubsub
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            pubsub._shutdown()
            pool.close()

    # -- the PubSub port --------------------------------------------------------------

    @property
    def database(self) -> str:
        """host:port/dbname this pubsub listens on."""
        return database_address(self._dsn)

    @property
    def payload_limit(self) -> int:
        """Largest payload in bytes before sealing (NOTIFY refuses 8000 bytes and more)."""
        return self._gate.auth.max_payload(self._config.payload_limit)

    def seal(self, channel: str, payload: str) -> str:
        """The sealed form of `payload` for `channel`, as `publish` sends it (for the
        store's `pg_notify` inside an inserting transaction)."""
        check_publish(channel, payload, self._config, self.payload_limit)
        return self._gate.auth.seal(channel, payload)

    async def publish(self, channel: str, payload: str) -> None:
        """NOTIFY `payload`, sealed, on `channel`; raises PayloadTooLarge or PubSubError."""
        wire = self.seal(channel, payload)
        if self._closed:
            raise PubSubError("the pubsub is closed")
        try:
            with trio.fail_after(self._config.publish_timeout):
                async with self._pool.connection() as conn:
                    await conn.execute(_NOTIFY, (channel, wire))
        except psycopg.Error as exc:
            raise PubSubError(f"publish on {channel!r} failed: {exc}") from exc
        except trio.TooSlowError:
            raise PubSubError(f"publish on {channel!r} timed out") from None
        self._published += 1

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[QueueSubscription]:
        """Subscribe for the duration of the block.

        On entry the channel is LISTENed (or, while the listener is reconnecting,
        a `Resync` is guaranteed to follow the reconnect). Raises `PubSubError`
        when the pubsub is closed or the LISTEN does not complete in time.
        """
        async with self._subscribed(QueueSubscription(channel)) as sub:
            yield sub

    @asynccontextmanager
    async def subscribe_handler(
        self,
        channel: str,
        handler: Callable[[Delivery], None],
        on_end: Callable[[PubSubError], None],
    ) -> AsyncIterator[None]:
        """`subscribe`, each delivery handed to `handler` by the listener task as it is
        read (`HandlerDelivery`): no reader task, no queue."""
        async with self._subscribed(HandlerSubscription(channel, handler, on_end)):
            yield

    @asynccontextmanager
    async def _subscribed(self, sub: QueueSubscription) -> AsyncIterator[QueueSubscription]:
        check_channel(sub.channel, self._config)
        if self._closed:
            raise PubSubError("the pubsub is closed")
        self._subs.setdefault(sub.channel, set()).add(sub)
        try:
            await self._until_listening(sub)
            yield sub
        finally:
            self._remove(sub)

    # -- introspection (operators and tests) ------------------------------------------------

    @property
    def listener_application_name(self) -> str:
        """The `application_name` of the LISTEN session (find it in pg_stat_activity)."""
        return self._app_name

    @property
    def listener_pid(self) -> int | None:
        """Backend pid of the current LISTEN session; None while disconnected."""
        return self._backend_pid

    @property
    def connected(self) -> bool:
        """True while the LISTEN connection is up."""
        return self._connected

    @property
    def listening_channels(self) -> frozenset[str]:
        """Channels whose LISTEN has completed on the current connection."""
        return frozenset(self._listening)

    async def settle(self) -> None:
        """Wait until LISTEN/UNLISTEN match the subscriptions (returns at once if disconnected)."""
        while self._connected and not self._closed and self._needs_round():
            event = self._round
            self._wake()
            await event.wait()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> PubSubStatistics:
        """Counters since `open()`."""
        return PubSubStatistics(
            channels=sum(1 for s in self._subs.values() if s),
            subscriptions=sum(len(s) for s in self._subs.values()),
            published=self._published,
            delivered=self._delivered,
            resyncs=self._resyncs,
            listens=self._listens,
            unlistens=self._unlistens,
            reconnects=self._reconnects,
            rejected=self._gate.rejected,
            round_trips=None if self._round_trips is None else self._round_trips.count,
        )

    # -- subscriptions -------------------------------------------------------------------

    def _desired(self) -> set[str]:
        return {channel for channel, subs in self._subs.items() if subs}

    def _needs_round(self) -> bool:
        return self._dirty or self._desired() != self._listening

    async def _until_listening(self, sub: QueueSubscription) -> None:
        try:
            with trio.fail_after(self._config.subscribe_timeout):
                while True:
                    if sub.failed or not self._connected or sub.channel in self._listening:
                        # Disconnected: the reconnect re-LISTENs and then sends a Resync.
                        break
                    if self._closed:
                        raise PubSubError("the pubsub is closed")
                    event = self._round
                    self._wake()
                    await event.wait()
        except trio.TooSlowError:
            raise PubSubError(f"LISTEN {sub.channel!r} did not complete in time") from None
        await trio.lowlevel.checkpoint()

    def _remove(self, sub: QueueSubscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.channel]
                # UNLISTEN happens in the background: leaving a subscription never blocks.
                self._wake()
        sub.close()

    def _wake(self) -> None:
        self._dirty = True
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()

    def _end_round(self) -> None:
        self._round.set()
        self._round = trio.Event()

    def _shutdown(self) -> None:
        self._closed = True
        self._connected = False
        for subs in self._subs.values():
            for sub in subs:
                sub.fail(PubSubError("the pubsub is closed"))
        self._subs.clear()
        self._end_round()

    # -- the listener ----------------------------------------------------------------------

    async def _connect(self) -> TrioConnection:
        return await connect(
            self._dsn, cls=self._connection_class, **_conn_kwargs(self._config, self._app_name)
        )

    async def _reconnect(self) -> TrioConnection:
        delay = self._config.reconnect_backoff_initial
        while True:
            await trio.sleep(delay)
            try:
                return await self._connect()
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "pubsub listener reconnect failed",
                    extra={"error": str(exc), "retry_in": delay, "app": self._app_name},
                )
            delay = min(delay * 2, self._config.reconnect_backoff_max)

    async def _listen_forever(
        self,
        conn: TrioConnection,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        first = True
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await self._serve(conn, resync=not first, started=mark_started)
            except psycopg.Error as exc:
                log.warning(
                    "pubsub listener connection lost",
                    extra={"error": str(exc), "app": self._app_name},
                )
            finally:
                self._connected = False
                self._backend_pid = None
                self._listening.clear()
                self._end_round()
                await conn.close()
            # Subscribers arriving from now on enter at once; the reconnect resyncs them.
            mark_started()
            first = False
            conn = await self._reconnect()
            self._reconnects += 1
            log.info("pubsub listener reconnected", extra={"app": self._app_name})

    async def _serve(
        self,
        conn: TrioConnection,
        *,
        resync: bool,
        started: Callable[[], None],
    ) -> None:
        # Connected before the first round: a subscriber arriving during it waits for the
        # next round; one that arrived while disconnected is LISTENed now, then resynced.
        self._connected = True
        self._backend_pid = conn.info.backend_pid
        self._dirty = False
        await self._apply(conn)
        if resync:
            self._resync_all()
        self._end_round()
        started()
        drained = 0
        while True:
            if self._dirty:
                self._dirty = False
                await self._apply(conn)
                self._end_round()
                continue
            batch: list[tuple[str, str]] = []
            with trio.CancelScope() as scope:
                self._fetch_scope = scope
                try:
                    batch = await _fetch_batch(conn)
                finally:
                    self._fetch_scope = None
            if scope.cancelled_caught:
                continue
            for channel, wire in batch:
                subs = self._subs.get(channel)
                if not subs:
                    continue  # UNLISTENed meanwhile
                payload = self._gate.admit(channel, wire)
                if payload is None:
                    continue
                for sub in list(subs):
                    if sub.deliver(payload):
                        self._delivered += 1
            # A batch that was already waiting is read without a scheduling round (the
            # driver polls first), so a listener behind on its notifications catches up
            # in one step; every few batches (delivered first) it lets the others run.
            drained += 1
            if drained % _BATCHES_PER_STEP == 0:
                await trio.lowlevel.checkpoint()

    async def _apply(self, conn: TrioConnection) -> None:
        """LISTEN/UNLISTEN until the connection listens to exactly the subscribed channels."""
        desired = self._desired()
        for channel in sorted(self._listening - desired):
            self._listening.discard(channel)
            await conn.execute(_statement("UNLISTEN", channel))
            self._unlistens += 1
        for channel in sorted(desired - self._listening):
            try:
                await conn.execute(_statement("LISTEN", channel))
            except psycopg.Error as exc:
                if conn.closed:
                    raise
                self._fail_channel(channel, exc)
                continue
            self._listens += 1
            self._listening.add(channel)

    def _fail_channel(self, channel: str, exc: psycopg.Error) -> None:
        log.error(
            "pubsub cannot listen to a channel",
            extra={"channel": channel, "error": str(exc), "app": self._app_name},
        )
        for sub in self._subs.pop(channel, set()):
            error = PubSubError(f"cannot listen to {channel!r}: {exc}")
            error.__cause__ = exc
            sub.fail(error)

    def _resync_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                if sub.deliver(Resync()):
                    self._resyncs += 1


def _statement(verb: str, channel: str) -> sql.Composed:
    # Channel names such as chat:stream:<uuid> need quoting as identifiers.
    return sql.SQL(verb + " {}").format(sql.Identifier(channel))


def _conn_kwargs(cfg: PubSubConfig, application_name: str) -> dict[str, Any]:
    return {
        "application_name": application_name,
        "connect_timeout": cfg.connect_timeout,
        "keepalives": 1,
        "keepalives_idle": cfg.keepalives_idle,
        "keepalives_interval": cfg.keepalives_interval,
        "keepalives_count": cfg.keepalives_count,
    }
