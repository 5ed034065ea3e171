"""Opening paths beneath the workspace directory without a check-then-open race.

A path is never resolved first and opened later (a directory swapped for a
symlink in between would lead the open outside). Every open starts from a file
descriptor of the root and the kernel, or this module, resolves the path
relative to it in one pass:

- `openat2(RESOLVE_BENEATH)` (Linux 5.6+, called through ctypes; availability is
  probed once at run time): the kernel refuses any step that leaves the root,
  through ``..`` or a symlink, atomically with the lookup. It refuses absolute
  symlinks too, even those pointing inside the root, so such a path is retried
  with the walk below.
- Otherwise a directory-fd walk: one component at a time with ``O_NOFOLLOW``,
  holding a descriptor of every directory on the way. A symlink is read (from
  the descriptor of the link itself) and its target walked by the same rules:
  relative targets from the current directory, absolute ones only when they
  name the root as a prefix, ``..`` never above the root.

Either way, whatever is swapped in during the lookup is itself looked up under
the same rules, so no swap can lead outside. Paths are bytes: names need not be
UTF-8.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import stat
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Final, cast

__all__ = ["PathEscape", "Root", "openat2_available"]

_SYS_OPENAT2: Final = 437  # the same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_BENEATH: Final = 0x08
# Linux follows at most 40 symlinks in one lookup; the walk keeps the same bound.
_MAX_SYMLINKS: Final = 40
# A component swapped between our two looks at it is looked at again, this many times.
_MAX_RETRIES: Final = 100


class PathEscape(Exception):
    """The path leads outside the root (through ``..``, an absolute path or a symlink)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_openat2_state: bool | None = None


@functools.cache
def _libc_syscall() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return cast(Callable[..., int], syscall)


def _openat2(dir_fd: int, path: bytes, flags: int, mode: int) -> int:
    how = _OpenHow(
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT else 0,
        _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS,
    )
    fd = _libc_syscall()(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dir_fd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter around us) lets us call openat2."""
    global _openat2_state
    if _openat2_state is None:
        _openat2_state = False
        if platform.system() == "Linux":
            try:
                fd = os.open("/", os.O_PATH | os.O_DIRECTORY)
                try:
                    os.close(_openat2(fd, b".", os.O_PATH | os.O_DIRECTORY, 0))
                    _openat2_state = True
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                _openat2_state = False
    return _openat2_state


class Root:
    """A directory that paths are opened beneath; holds an ``O_PATH`` descriptor of it.

    `directory` must be absolute and free of symlinks (resolved); `aliases` are other
    absolute spellings of it that absolute paths and symlink targets may start with.
    `use_openat2` None probes the kernel; False forces the directory-fd walk.
    """

    def __init__(
        self,
        directory: Path,
        *,
        aliases: tuple[Path, ...] = (),
        use_openat2: bool | None = None,
    ) -> None:
        self.path = os.fsencode(directory)
        self._prefixes = [_components(self.path)] + [
            _components(os.fsencode(alias)) for alias in aliases
        ]
        self._fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.use_openat2 = openat2_available() if use_openat2 is None else use_openat2

    def close(self) -> None:
        """Release the root's descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def relative(self, path: bytes) -> bytes:
        """`path` relative to the root; an absolute path must start with the root (or an alias).

        Purely textual: what the relative path then leads to is decided by `open`.
        """
        if not path.startswith(b"/"):
            return path
        parts = _components(path)
        for prefix in self._prefixes:
            if parts[: len(prefix)] == prefix:
                return b"/".join(parts[len(prefix) :]) or b"."
        raise PathEscape(path)

    def open(self, relative: bytes, flags: int, mode: int = 0o644) -> int:
        """A descriptor of `relative` opened with `flags`; never of anything outside the root.

        Raises PathEscape when the lookup would leave the root, OSError otherwise.
        """
        if b"\x00" in relative:
            raise ValueError("path contains a NUL byte")
        if relative.startswith(b"/"):
            raise PathEscape(relative)
        if self.use_openat2:
            try:
                return _openat2(self._fd, relative or b".", flags, mode)
            except OSError as exc:
                # EXDEV: an escape or an absolute symlink; the walk tells them apart.
                # EAGAIN: a concurrent rename made the kernel give up; walk instead.
                if exc.errno not in (errno.EXDEV, errno.EAGAIN):
                    raise
        return self._walk(relative, flags, mode)

    def makedirs(self, relative: bytes) -> None:
        """Create `relative` and its missing parents as directories beneath the root."""
        parts = [part for part in relative.split(b"/") if part]
        for i, part in enumerate(parts):
            prefix = b"/".join(parts[: i + 1])
            try:
                os.close(self.open(prefix, os.O_PATH | os.O_DIRECTORY))
                continue
            except FileNotFoundError:
                pass
            parent = b"/".join(parts[:i]) or b"."
            # mkdirat of one plain name: it creates exactly there, never through a link.
            with (
                self._opened(parent, os.O_PATH | os.O_DIRECTORY) as parent_fd,
                suppress(FileExistsError),
            ):
                os.mkdir(part, 0o755, dir_fd=parent_fd)

    @contextmanager
    def _opened(self, relative: bytes, flags: int) -> Iterator[int]:
        fd = self.open(relative, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    def _walk(self, relative: bytes, flags: int, mode: int) -> int:
        stack = [os.dup(self._fd)]
        pending: deque[bytes] = deque(_components(relative))
        links = 0
        retries = 0
        try:
            if not pending:
                pending.append(b".")
            while pending:
                part = pending.popleft()
                last = not pending
                if part == b"..":
                    if len(stack) == 1:
                        raise PathEscape(relative)
                    os.close(stack.pop())
                    if last:
                        pending.append(b".")
                    continue
                if part == b"." and not last:
                    continue
                here = stack[-1]
                try:
                    probe = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
                except FileNotFoundError:
                    if not (last and flags & os.O_CREAT):
                        raise
                    probe = -1
                if probe >= 0:
                    keep = False
                    try:
                        info = os.fstat(probe)
                        if stat.S_ISLNK(info.st_mode):
                            links += 1
                            if links > _MAX_SYMLINKS:
                                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), relative)
                            # Read from the link's own descriptor: exactly the link we looked at.
                            target = os.readlink(b"", dir_fd=probe)
                            if target.startswith(b"/"):
                                inside = self.relative(target)
                                for fd in stack[1:]:
                                    os.close(fd)
                                del stack[1:]
                                pending.extendleft(reversed(_components(inside) or [b"."]))
                            else:
                                pending.extendleft(reversed(_components(target) or [b"."]))
                            continue
                        if not last:
                            if not stat.S_ISDIR(info.st_mode):
                                raise NotADirectoryError(
                                    errno.ENOTDIR, os.strerror(errno.ENOTDIR), relative
                                )
                            # Opened with O_NOFOLLOW and seen to be a directory: descend into it.
                            stack.append(probe)
                            keep = True
                            continue
                    finally:
                        if not keep:
                            os.close(probe)
                try:
                    return os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=here)
                except OSError as exc:
                    # ELOOP: a symlink appeared since the probe; look at the component again.
                    if exc.errno != errno.ELOOP or retries >= _MAX_RETRIES:
                        raise
                    retries += 1
                    pending.appendleft(part)
            raise AssertionError("unreachable: the last component returns or raises")
        finally:
            for fd in stack:
                os.close(fd)


def _components(path: bytes) -> list[bytes]:
    return [part for part in path.split(b"/") if part and part != b"."] or []
