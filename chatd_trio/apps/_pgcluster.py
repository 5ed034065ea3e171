"""A throwaway PostgreSQL cluster: initdb into a temporary directory, serve on one port.

Used by `chatd-trio scaletest` (fault runs restart or stop the server, so they run on
a cluster of their own) and by the test suite when no server answers. The binaries
come from `PATH` or `/usr/lib/postgresql/*/bin` (the newest). As root the cluster
runs as the `postgres` OS user (`runuser`), since PostgreSQL refuses to run as root.

Everything here is synchronous (subprocess, blocking connects): Trio callers run it
in a thread.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

import psycopg

# Seconds pg_ctl waits for a start or stop (`-t`), and the connect probe after a start.
PG_CTL_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 10.0
PROBE_INTERVAL_S = 0.1


class ClusterError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped."""


def answers(dsn: str, timeout: int = 3) -> bool:
    """True when a server answers `SELECT 1` on `dsn`."""
    try:
        with psycopg.connect(dsn, connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def find_bindir() -> str | None:
    """The directory of `initdb` and `pg_ctl`, or None when the server is not installed."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    initdb = shutil.which("initdb") or (bins[-1] if bins else None)
    # Resolved: a PATH entry may be a symlink into the real bin directory.
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


def _version_key(path: str) -> tuple[int, str]:
    # "/usr/lib/postgresql/15/bin/initdb" -> 15: version 9.6 must not sort above 15.
    part = path.split("/")[-3]
    return (int(part.split(".")[0]) if part.split(".")[0].isdigit() else 0, part)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Cluster:
    """One throwaway cluster; `create()` it, `remove()` it when done."""

    bindir: str
    datadir: str
    port: int
    as_postgres: tuple[str, ...]

    @property
    def dsn(self) -> str:
        """DSN of the `postgres` database as the `postgres` role (trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls, port: int | None = None, *, prefix: str = "chatd-pg-") -> Cluster:
        """initdb into a new temporary directory and start the server on `port` (a free
        one by default). Raises ClusterError when the binaries are missing or fail."""
        bindir = find_bindir()
        if bindir is None:
            raise ClusterError(
                "no PostgreSQL server binaries (initdb) on PATH or under /usr/lib/postgresql"
            )
        datadir = tempfile.mkdtemp(prefix=prefix)
        as_postgres: tuple[str, ...] = ()
        if os.geteuid() == 0:
            shutil.chown(datadir, "postgres", "postgres")
            as_postgres = ("runuser", "-u", "postgres", "--")
        cluster = cls(bindir, datadir, port or free_port(), as_postgres)
        try:
            cluster._run(
                os.path.join(bindir, "initdb"),
                "-D",
                datadir,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            )
            cluster.start()
        except BaseException:
            cluster.remove()
            raise
        return cluster

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self.as_postgres, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterError(f"{os.path.basename(argv[0])} failed: {done.stderr.strip()}")

    def _pg_ctl(self, *args: str) -> None:
        self._run(
            os.path.join(self.bindir, "pg_ctl"),
            "-D",
            self.datadir,
            "-t",
            str(PG_CTL_TIMEOUT_S),
            *args,
        )

    def start(self) -> None:
        """Start the server and wait until it answers."""
        self._pg_ctl(
            "-o",
            f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1",
            "-l",
            os.path.join(self.datadir, "log"),
            "-w",
            "start",
        )
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while not answers(self.dsn):
            if time.monotonic() > deadline:
                raise ClusterError(f"the cluster in {self.datadir} does not answer on {self.port}")
            time.sleep(PROBE_INTERVAL_S)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: roll back and disconnect every session)."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop (fast) and start again: every connection is cut."""
        self.stop()
        self.start()

    def running(self) -> bool:
        """True when the postmaster of this data directory is alive."""
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        done = subprocess.run(
            [*self.as_postgres, pg_ctl, "-D", self.datadir, "status"], capture_output=True
        )
        return done.returncode == 0

    def remove(self) -> None:
        """Stop the server if it runs (immediate) and delete the data directory."""
        if os.path.isdir(self.datadir) and self.running():
            with contextlib.suppress(ClusterError):
                self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
