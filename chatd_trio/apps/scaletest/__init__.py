"""`chatd-trio scaletest`: many chats, many turns, several replicas, real agents, faults.

Layout. The coordinator (the parent) creates one workspace with a real local agent
(`LocalProvisioner`, running in the coordinator) and N chats bound to the workspace
only (the first turn binds the agent lazily). Each chat's first user message makes it
`pending`, so turn 1 starts at once. Replicas are `Server`s: for `--store memory`
R of them in this process sharing one MemoryStore/MemoryPubSub, for `--store postgres`
R worker processes (`python -m chatd_trio.apps.scaletest worker`) sharing the database.

Data. The command touches only what it creates: on PostgreSQL it works in a database
of its own (`chatd_scale_<random>`, created on the given server and dropped at the
end unless `--keep`), and fault runs use a throwaway cluster (initdb into a temporary
directory, a free port, removed at the end: `chatd_trio.apps._pgcluster`).

Chat i has a home replica i % R; subscriber j of chat i lives on replica
(i + j) % R, so with S >= 2 every chat has subscribers on the replica that runs it
and on others. Subscriber 0 (home) drives the chat. Turn k is over when the driver
has seen user message k answered (an assistant message with text and no tool call)
and `waiting` after that answer, or, when it saw `waiting`/`error` with no answer,
once the database confirms the chat stopped without one. The driver then sends the
next user message through its own replica. Sends and reads that fail on a store error
are retried with backoff (a failed send is checked in the database before it is sent
again) and counted; a subscription that ends on an error is re-opened from its
cursor, so no message is delivered twice. When a chat's last turn is over, its
driver reads the chat's last message id; every subscriber of the chat is finished
once it has received that id.

Phases. Every replica reports when all its subscribers saw turn 1 over; once all
have, the coordinator tells them to go on, and each replica snapshots its counters
just before its drivers send turn 2: `steady_per_turn` is the difference between the
end and that snapshot, divided by the turns 2..M. Workers talk to the coordinator over
the worker channel (`chatd_trio.apps.channel`: `ready`, `turn`, `chat_done`, `phase1`,
`done`, `report`; `go`, `final`, `stop`). A worker stops on SIGTERM (or `stop`, or
EOF): it closes its `Server`, which hands running chats back as `pending`, and reports.

Faults (`--fault`, PostgreSQL only) are injected once, when a third of the turns are
over: `sigkill` kills the replica running the most chats (a process manager would
restart it: the coordinator starts a replacement at once), `sigstop` pauses it past
`stale_after` and resumes it, `pool_kill` terminates its store pool's sessions (found
by `application_name`: each replica has its own), `listen_kill` terminates every
replica's LISTEN session, `pg_restart` restarts the cluster, `outage` stops it for
`--outage-seconds`, `commit_stall` holds every chat row locked for a second from
an outside session (no write commits meanwhile, as in a WAL-flush stall). The run
ends when every chat's last turn is over, or when no turn ended for
`--stall-timeout` seconds, or at `--deadline`; then the workers stop and the counts
are read from the database (`reliability`): turns errored, duplicate answers
(`answer_counts`), writes by a stale ownership token (a trigger installed in the
run's own database: `install_witness`), chats left running, and what each fault did.

Stream database reads are attributed per replica and chat: a catch-up read counted
by the replica's `ChatStreams` is "same replica" when the latest `running` status its
subscribers saw names this replica, else "cross replica". Fan-out latency is the time
from a message's `created_at` (store clock, same machine) to its delivery to a
subscriber, for assistant messages of turns 2..M. Lost and duplicated messages come
from comparing what every subscriber received with the chat's user-visible messages
up to the id its driver read at the end; messages written after that are
`writes_after_finish`.
"""

# The modules, in the order a run goes through them: `plan` (what to do), `coordinator`
# (setting up, running, summarising), `database`, `replicas` and `faults` (PostgreSQL
# runs), `runner` (a replica's subscribers and drivers), `worker` (a replica process),
# `progress`, `facts`, `answers` and `report` (measuring), `command` (the flags).
# Each module's `__all__` says what it exports.
from chatd_trio.apps.scaletest import answers, command, coordinator, facts, plan, runner
from chatd_trio.apps.scaletest.answers import *  # noqa: F403
from chatd_trio.apps.scaletest.command import *  # noqa: F403
from chatd_trio.apps.scaletest.coordinator import *  # noqa: F403
from chatd_trio.apps.scaletest.facts import *  # noqa: F403
from chatd_trio.apps.scaletest.plan import *  # noqa: F403
from chatd_trio.apps.scaletest.runner import *  # noqa: F403

__all__ = []
__all__ += plan.__all__
__all__ += coordinator.__all__
__all__ += runner.__all__
__all__ += answers.__all__
__all__ += facts.__all__
__all__ += command.__all__
