"""The Server: one replica. Acquisition, heartbeats, stale recovery, control, turns.

docs/spec.md §1 and §2. Every task lives in the server's nursery: the acquire
loop, the stale-recovery loop and one task per running turn; a turn's own
nursery holds its heartbeat and its control listener. Closing is cancellation:
acquisition stops, running turns are shut down (their chats go back to
`pending` with no error) and the server waits for every task.

Modules: `replica` (`Server`: the public API), `acquisition` (the acquire and
stale-recovery loops), `supervision` (every turn, from its start to its final
write), `env` (`TurnEnv`, the turn's tools), `publishing` (what a write committed,
published after it) and `stats` (`ServerStats`).
"""

from chatd_trio.server.env import TurnEnv
from chatd_trio.server.replica import BusyBehavior, Server
from chatd_trio.server.stats import ServerStats, ServerStreamStats
from chatd_trio.turns import TurnReport

__all__ = ["BusyBehavior", "Server", "ServerStats", "ServerStreamStats", "TurnEnv", "TurnReport"]
