"""Killing everything a command started, including children that left its session.

`execute` starts ``/bin/sh -c COMMAND`` in a new session and marks the shell a
*child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``, kept across ``exec``): a
descendant whose parent exits is re-parented to the shell instead of to init,
so every process the command started stays in the shell's process tree for as
long as the shell runs, whatever it does with sessions and process groups
(``setsid``, double forks, ``nohup``). `kill_tree` then finds the tree by
scanning ``/proc`` (parent pids), stops every member with SIGSTOP (a stopped
process cannot fork, so the tree stops growing), re-scans until no new member
appears, and sends SIGKILL to all, the shell last. Signals go through pidfds
taken while the parent link was checked, so a recycled pid is never signalled.

No cgroup is needed. What this does not cover: a process that was re-parented
away before the kill because the shell itself had already exited (a daemon
left by a command that finished in time), and processes of another user (a
setuid program) that the agent may not signal.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import Final, cast

__all__ = ["kill_tree", "prepare_subreaper", "process_tree"]

logger = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER: Final = 36
# Enough for a fork bomb that outruns a few scans; each round stops everything found so far.
_MAX_ROUNDS: Final = 1000


@functools.cache
def _prctl() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    return cast(Callable[..., int], libc.prctl)


def prepare_subreaper() -> Callable[[], None]:
    """A `preexec_fn` that makes the new process a child subreaper.

    The foreign function is looked up here, in the parent, so the forked child
    only makes one system call before ``exec``.
    """
    prctl = _prctl()

    def become() -> None:
        prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    return become


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        parent = _parent_of(int(name))
        if parent is not None:
            parents[int(name)] = parent
    return parents


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant of it (by parent pid, from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree = [root]
    seen = {root}
    for pid in tree:  # grows while iterating: breadth first
        for child in children.get(pid, ()):
            if child not in seen:
                seen.add(child)
                tree.append(child)
    return tree


def kill_tree(root: int) -> int:
    """SIGKILL `root` and all its descendants, race-free against forks; the number killed.

    Blocking (it reads /proc): run it in a worker thread.
    """
    held: dict[int, int] = {}
    tried: set[int] = set()
    try:
        for _ in range(_MAX_ROUNDS):
            fresh = [pid for pid in process_tree(root) if pid not in tried]
            if not fresh or (root not in held and root in tried):
                break
            for pid in fresh:
                tried.add(pid)
                fd = _pidfd(pid)
                if fd is None:
                    continue
                # Re-check the parent now that the pidfd pins the process: a pid recycled
                # between the scan and pidfd_open has a parent outside the (stopped) tree.
                if pid != root and _parent_of(pid) not in held:
                    os.close(fd)
                    continue
                held[pid] = fd
                _signal(fd, signal.SIGSTOP)
        else:
            logger.warning("process tree kept growing while being stopped", extra={"pid": root})
        for pid, fd in held.items():
            if pid != root:
                _signal(fd, signal.SIGKILL)
        if root in held:
            _signal(held[root], signal.SIGKILL)
        return len(held)
    finally:
        for fd in held.values():
            os.close(fd)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal(fd: int, signum: int) -> None:
    # Gone already, or another user's process: nothing this agent can do about it.
    with suppress(ProcessLookupError, PermissionError):
        signal.pidfd_send_signal(fd, signum)
