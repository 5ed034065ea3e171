"""Sealed notifies: what crosses LISTEN/NOTIFY is encrypted and authenticated.

Any role that can log in to the database can LISTEN and NOTIFY on every channel
without a single table privilege (docs/security.md, "A database login role"). So
every payload the library publishes is sealed under a per-deployment key, and
every payload a subscription receives is opened before anything trusts it; one
that does not open is dropped and counted, never delivered.

Wire format (ASCII, so it fits NOTIFY's text payload)::

    wire    = "cn1." + base64url(header | salt | ciphertext | mac), unpadded
    header  = version 1 (1 byte) | sealing time, ms since the epoch (8 bytes, big endian)
    context = "chatd-trio notify v1" | len(channel) (2 bytes) | channel (UTF-8) | header
    salt    = 16 random bytes
    subkey  = HMAC-SHA256(enc_key, "subkey" | salt)
    ciphertext = ChaCha20-Poly1305(subkey, nonce = 12 zero bytes, payload, aad = context)
    mac     = HMAC-SHA256(mac_key, context | salt | ciphertext)

`mac_key` and `enc_key` come from the deployment key with HKDF-Expand (RFC 5869,
SHA-256, one block each; the key itself is the pseudorandom key, which is why it
must be random bytes, not a password). The channel in `context` binds a payload to
its channel: copied to another chat's channel, it no longer verifies. A fresh
subkey per payload (the construction XChaCha20 uses, with HMAC as the derivation)
means a nonce never repeats under one key whatever the number of payloads or
replicas, so a key needs no rotation for volume. The MAC is checked first, in
constant time, under each verification key in turn (rotation), then the sealing
time against `max_age`, then the ciphertext is decrypted (its Poly1305 tag checked
again). The echo of a replica's own notify (the exact text it sealed, on that
channel) opens from memory, its age checked (`NotifyAuth.remembered`). Sealing adds
73 bytes, base64 another third: a 7999-byte NOTIFY carries
5923 bytes of payload (`NotifyAuth.max_payload`).

``python -m chatd_trio.pubsub.auth`` prints a fresh key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from chatd_trio.config import NotifyAuthConfig
from chatd_trio.errors import DecodeError, NotifyKeyError

__all__ = [
    "OVERHEAD",
    "PREFIX",
    "NotifyAuth",
    "NotifyGate",
    "NotifyRejected",
    "new_key_text",
    "parse_keys",
    "sealed_size",
]

log = logging.getLogger(__name__)

PREFIX = "cn1."
_VERSION = 1
_HEADER = struct.Struct(">BQ")
_CHANNEL_LEN = struct.Struct(">H")
_SALT = 16
_TAG = 16
_MAC = 32
#: Bytes sealing adds before base64.
OVERHEAD = _HEADER.size + _SALT + _TAG + _MAC
_DOMAIN = b"chatd-trio notify v1"
_NONCE = bytes(12)
_KEY_HINT = "the base64 of at least {n} random bytes (python -m chatd_trio.pubsub.auth prints one)"


class NotifyRejected(DecodeError):
    """A received payload that does not open: not sealed, altered, sealed under another
    key or for another channel, or outside the `max_age` window. `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__("notify", reason)


def new_key_text(size: int = 32) -> str:
    """A fresh random key in the form `NotifyAuthConfig.keys` and `CHATD_NOTIFY_KEY` take."""
    return base64.b64encode(secrets.token_bytes(size)).decode("ascii")


def parse_keys(texts: Sequence[str], *, source: str, min_bytes: int = 32) -> list[bytes]:
    """Decode base64 keys (standard or URL-safe, padding optional).

    Raises `NotifyKeyError` naming `source` and the key's position, never its text.
    """
    keys: list[bytes] = []
    for i, text in enumerate(texts, start=1):
        piece = text.strip().replace("-", "+").replace("_", "/").rstrip("=")
        if not piece:
            raise NotifyKeyError(f"{source}: key {i} is empty; a key is {_hint(min_bytes)}")
        try:
            key = base64.b64decode(piece + "=" * (-len(piece) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise NotifyKeyError(
                f"{source}: key {i} is not base64; a key is {_hint(min_bytes)}"
            ) from None
        if len(key) < min_bytes:
            raise NotifyKeyError(
                f"{source}: key {i} has {len(key)} bytes; a key is {_hint(min_bytes)}"
            )
        keys.append(key)
    if not keys:
        raise NotifyKeyError(f"{source}: no key; a key is {_hint(min_bytes)}")
    return keys


def _hint(min_bytes: int) -> str:
    return _KEY_HINT.format(n=min_bytes)


def sealed_size(payload_bytes: int) -> int:
    """Length of the sealed form of a payload of `payload_bytes` UTF-8 bytes."""
    return len(PREFIX) + (4 * (payload_bytes + OVERHEAD) + 2) // 3


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        data = text.encode("ascii")
        raw = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise NotifyRejected("malformed sealed payload") from None
    # The decoder skips foreign characters and ignores spare bits: only the canonical
    # spelling of the bytes is accepted, so no two wire texts open to one payload.
    if _b64(raw) != text:
        raise NotifyRejected("malformed sealed payload")
    return raw


def _expand(secret: bytes, label: bytes) -> bytes:
    # HKDF-Expand with the (uniformly random) deployment key as PRK: T(1).
    return hmac.new(secret, _DOMAIN + b" " + label + b"\x01", hashlib.sha256).digest()


def _context(channel: str, header: bytes) -> bytes:
    try:
        name = channel.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError("channel", "not encodable as UTF-8") from None
    if len(name) > 0xFFFF:
        raise DecodeError("channel", "too long to seal")
    return _DOMAIN + _CHANNEL_LEN.pack(len(name)) + name + header


class _Key:
    __slots__ = ("enc", "mac")

    def __init__(self, secret: bytes) -> None:
        self.mac = _expand(secret, b"mac")
        self.enc = _expand(secret, b"enc")

    def cipher(self, salt: bytes) -> ChaCha20Poly1305:
        return ChaCha20Poly1305(hmac.new(self.enc, b"subkey" + salt, hashlib.sha256).digest())

    def tag(self, signed: bytes) -> bytes:
        return hmac.new(self.mac, signed, hashlib.sha256).digest()


class NotifyAuth:
    """Seals and opens notify payloads under a deployment's keys (see the module doc).

    `keys`: raw keys of at least `min_key_bytes` bytes; the first seals, every one
    verifies. `max_age`: seconds a sealed payload stays acceptable, either side of
    its sealing time. `clock`: wall-clock seconds (replicas on different machines
    compare sealing times, so a monotonic clock would not do).
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        max_age: float = NotifyAuthConfig.max_age,
        min_key_bytes: int = NotifyAuthConfig.min_key_bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise NotifyKeyError(
                "NotifyAuth needs at least one key (NotifyAuth.unauthenticated() for none)"
            )
        for i, key in enumerate(keys, start=1):
            if len(key) < min_key_bytes:
                raise NotifyKeyError(
                    f"NotifyAuth: key {i} has {len(key)} bytes; a key is {_hint(min_key_bytes)}"
                )
        if not max_age > 0:
            raise NotifyKeyError(f"NotifyAuth: max_age must be positive, got {max_age!r}")
        self._secrets: tuple[bytes, ...] = tuple(bytes(k) for k in keys)
        self._keys = tuple(_Key(k) for k in self._secrets)
        self._max_age = max_age
        self._clock = clock
        # Insertion order; an OrderedDict drops its oldest in O(1) (a dict's first key is
        # found by scanning past the slots its earlier deletions left).
        self._sealed: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self.opened_from_memory = 0

    remembered: ClassVar[int] = 1024
    """Payloads this instance sealed that `open` recognises without the cipher (the
    echo of a replica's own notify comes back through LISTEN); oldest dropped first."""

    @classmethod
    def unauthenticated(cls) -> NotifyAuth:
        """Payloads travel as they are and anything received is accepted: only for a
        database whose every login is trusted (`NotifyAuthConfig.allow_unauthenticated`)."""
        auth = cls.__new__(cls)
        auth._secrets = ()
        auth._keys = ()
        auth._max_age = NotifyAuthConfig.max_age
        auth._clock = time.time
        auth._sealed = OrderedDict()
        auth.opened_from_memory = 0
        return auth

    @classmethod
    def generate(cls, *, max_age: float = NotifyAuthConfig.max_age) -> NotifyAuth:
        """A fresh random key: one process, or a test run handing `key_text()` to its
        replica processes."""
        return cls([secrets.token_bytes(32)], max_age=max_age)

    @classmethod
    def from_key_text(
        cls, text: str, *, source: str = "notify key", config: NotifyAuthConfig | None = None
    ) -> NotifyAuth:
        """Keys from their text form (comma-separated base64, as `key_text()` gives)."""
        cfg = config or NotifyAuthConfig()
        keys = parse_keys(text.split(","), source=source, min_bytes=cfg.min_key_bytes)
        return cls(keys, max_age=cfg.max_age, min_key_bytes=cfg.min_key_bytes)

    @classmethod
    def from_config(
        cls, config: NotifyAuthConfig, *, environ: Mapping[str, str] | None = None
    ) -> NotifyAuth:
        """`config.keys`, else the variable `config.key_env`, else unauthenticated when
        `config.allow_unauthenticated`; otherwise `NotifyKeyError` naming the variable."""
        env = os.environ if environ is None else environ
        if config.keys:
            keys = parse_keys(
                config.keys, source="NotifyAuthConfig.keys", min_bytes=config.min_key_bytes
            )
            return cls(keys, max_age=config.max_age, min_key_bytes=config.min_key_bytes)
        text = env.get(config.key_env, "").strip()
        if text:
            return cls.from_key_text(text, source=config.key_env, config=config)
        if config.allow_unauthenticated:
            return cls.unauthenticated()
        raise NotifyKeyError(
            f"no notify key: set {config.key_env} to {_hint(config.min_key_bytes)}, the "
            "same on every replica (or pass auth=NotifyAuth(...)). Any login of the "
            "database can NOTIFY and LISTEN, so unsealed notifies can be forged and read; "
            "only if every login is trusted, set "
            "PubSubConfig(auth=NotifyAuthConfig(allow_unauthenticated=True))"
        )

    @property
    def authenticated(self) -> bool:
        """False for `unauthenticated()`: payloads are neither sealed nor checked."""
        return bool(self._keys)

    def key_text(self) -> str:
        """The keys as `CHATD_NOTIFY_KEY` takes them: the secret itself, to hand to a
        replica process this one starts (over a pipe or in its environment)."""
        return ",".join(base64.b64encode(k).decode("ascii") for k in self._secrets)

    def max_payload(self, wire_limit: int) -> int:
        """The largest payload (UTF-8 bytes) whose sealed form fits in `wire_limit`."""
        if not self._keys:
            return wire_limit
        return max(0, 3 * (wire_limit - len(PREFIX)) // 4 - OVERHEAD)

    def seal(self, channel: str, payload: str) -> str:
        """The wire form of `payload` on `channel` (see the module doc)."""
        if not self._keys:
            return payload
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError("payload", "not encodable as UTF-8") from None
        sealed_ms = max(0, int(self._clock() * 1000))
        header = _HEADER.pack(_VERSION, sealed_ms)
        context = _context(channel, header)
        salt = secrets.token_bytes(_SALT)
        key = self._keys[0]
        ciphertext = key.cipher(salt).encrypt(_NONCE, data, context)
        mac = key.tag(context + salt + ciphertext)
        wire = PREFIX + _b64(header + salt + ciphertext + mac)
        # Opening these exact characters on this channel can only give `payload` back:
        # remembered, the echo skips the cipher (the age is still checked).
        sealed = self._sealed
        sealed[(channel, wire)] = (payload, sealed_ms)
        if len(sealed) > self.remembered:
            sealed.popitem(last=False)
        return wire

    def open(self, channel: str, wire: str) -> str:
        """The payload sealed in `wire` for `channel`; raises `NotifyRejected`."""
        if not self._keys:
            return wire
        mine = self._sealed.get((channel, wire))
        if mine is not None:
            payload, sealed_ms = mine
            self._check_age(sealed_ms)
            self.opened_from_memory += 1
            return payload
        if not wire.startswith(PREFIX):
            raise NotifyRejected("not sealed")
        raw = _unb64(wire[len(PREFIX) :])
        if len(raw) < OVERHEAD:
            raise NotifyRejected("too short")
        header, rest = raw[: _HEADER.size], raw[_HEADER.size :]
        salt, ciphertext, mac = rest[:_SALT], rest[_SALT:-_MAC], rest[-_MAC:]
        try:
            context = _context(channel, header)
        except DecodeError:
            raise NotifyRejected("unusable channel name") from None
        signed = context + salt + ciphertext
        for key in self._keys:
            if hmac.compare_digest(mac, key.tag(signed)):
                break
        else:
            raise NotifyRejected(
                "its MAC verifies under no key of this replica (forged, altered, for another "
                "channel, or sealed under a key this replica does not have)"
            )
        version, sealed_ms = _HEADER.unpack(header)
        if version != _VERSION:
            raise NotifyRejected(f"unknown version {version}")
        self._check_age(sealed_ms)
        try:
            data = key.cipher(salt).decrypt(_NONCE, ciphertext, context)
            return data.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            raise NotifyRejected("does not decrypt") from None

    def _check_age(self, sealed_ms: int) -> None:
        age = self._clock() - sealed_ms / 1000
        if age > self._max_age:
            raise NotifyRejected(f"sealed {age:.0f} s ago, beyond max_age {self._max_age:g} s")
        if age < -self._max_age:
            raise NotifyRejected(
                f"sealed {-age:.0f} s in the future: the replicas' clocks differ by more than "
                f"max_age {self._max_age:g} s"
            )

    def __repr__(self) -> str:
        return f"NotifyAuth(keys={len(self._keys)}, max_age={self._max_age:g})"


class NotifyGate:
    """What an adapter's subscription path runs on every received payload: open it,
    or drop it, count it and warn (at most once per `reject_warn_interval`)."""

    def __init__(self, auth: NotifyAuth, config: NotifyAuthConfig, adapter: str) -> None:
        self.auth = auth
        self.rejected = 0
        self._interval = config.reject_warn_interval
        self._adapter = adapter
        self._unwarned = 0
        self._last_warn: float | None = None

    def admit(self, channel: str, wire: str) -> str | None:
        """The opened payload, or None when it was dropped."""
        try:
            return self.auth.open(channel, wire)
        except NotifyRejected as exc:
            self.rejected += 1
            self._unwarned += 1
            now = time.monotonic()
            if self._last_warn is None or now - self._last_warn >= self._interval:
                log.warning(
                    "notify dropped: it does not open under this deployment's key",
                    extra={
                        "adapter": self._adapter,
                        "channel": channel,
                        "reason": exc.reason,
                        "dropped_since_last_warning": self._unwarned,
                        "dropped_total": self.rejected,
                    },
                )
                self._unwarned = 0
                self._last_warn = now
            return None


if __name__ == "__main__":
    print(new_key_text())
