-- chatd_trio schema (docs/spec.md §7). Applied once, under an advisory lock,
-- by PostgresStore.open; recorded in schema_migrations.

CREATE TABLE workspaces (
    id          uuid PRIMARY KEY,
    owner_id    uuid NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workspace_builds (
    id            uuid PRIMARY KEY,
    workspace_id  uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    build_number  integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, build_number)
);

-- workspace_id is denormalised from the build so an agent lookup is one row read.
CREATE TABLE workspace_agents (
    id            uuid PRIMARY KEY,
    build_id      uuid NOT NULL REFERENCES workspace_builds (id) ON DELETE CASCADE,
    workspace_id  uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    seq           bigserial NOT NULL,
    name          text NOT NULL,
    address       text NOT NULL,
    token         text NOT NULL,
    directory     text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workspace_agents_build_idx ON workspace_agents (build_id, seq);

-- The binding columns (workspace/build/agent) carry no foreign keys: they are an
-- optimistic cache that the turn repairs (docs/spec.md §5), not a constraint.
CREATE TABLE chats (
    id              uuid PRIMARY KEY,
    owner_id        uuid NOT NULL,
    title           text NOT NULL,
    status          text NOT NULL DEFAULT 'waiting'
                    CHECK (status IN ('waiting', 'pending', 'running', 'error')),
    worker_id       uuid,
    started_at      timestamptz,
    heartbeat_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    parent_chat_id  uuid REFERENCES chats (id) ON DELETE CASCADE,
    root_chat_id    uuid REFERENCES chats (id) ON DELETE CASCADE,
    workspace_id    uuid,
    build_id        uuid,
    agent_id        uuid,
    last_error      text,
    mcp_servers     text[] NOT NULL DEFAULT '{}'
);
-- Acquisition scans pending chats oldest first; the partial index holds only those.
CREATE INDEX chats_pending_idx ON chats (updated_at, id) WHERE status = 'pending';
-- Stale recovery scans running chats by heartbeat.
CREATE INDEX chats_running_heartbeat_idx ON chats (heartbeat_at) WHERE status = 'running';
CREATE INDEX chats_owner_idx ON chats (owner_id, created_at DESC, id DESC);
CREATE INDEX chats_parent_idx ON chats (parent_chat_id, created_at, id)
    WHERE parent_chat_id IS NOT NULL;

CREATE TABLE chat_messages (
    id                     bigserial PRIMARY KEY,
    chat_id                uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    role                   text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content                jsonb NOT NULL,
    visibility             text NOT NULL DEFAULT 'both'
                           CHECK (visibility IN ('user', 'model', 'both')),
    -- Usage is all NULL or all set: NULL means the message carries no usage.
    input_tokens           bigint,
    output_tokens          bigint,
    cache_read_tokens      bigint,
    cache_creation_tokens  bigint,
    total_tokens           bigint,
    context_limit          bigint,
    compressed             boolean NOT NULL DEFAULT false,
    deleted                boolean NOT NULL DEFAULT false,
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_messages_chat_idx ON chat_messages (chat_id, id);

-- position orders the queue (FIFO; a promoted message moves to the front).
CREATE TABLE chat_queued_messages (
    id          bigserial PRIMARY KEY,
    chat_id     uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    content     jsonb NOT NULL,
    position    bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_queued_messages_chat_idx ON chat_queued_messages (chat_id, position, id);
