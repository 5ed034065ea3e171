-- Fenced ownership and idempotent writes (docs/spec.md §1).
--
-- owner_token: incremented by every acquisition, stale recovery, release and finish.
-- A turn's writes carry the token of its acquisition and are guarded by it in the
-- same statement, so a replica that lost the chat (paused, partitioned, slow) can
-- never write into it again.
-- last_op_id: the id of the last guarded write applied to the row. A write retried
-- after an ambiguous failure (the connection died around COMMIT) recognises that it
-- already landed instead of applying twice.
ALTER TABLE chats ADD COLUMN owner_token bigint NOT NULL DEFAULT 0;
ALTER TABLE chats ADD COLUMN last_op_id uuid;

-- The token of the run that wrote the message (NULL: written by the API), and the
-- write that inserted it (a replayed write returns the messages it inserted).
ALTER TABLE chat_messages ADD COLUMN owner_token bigint;
ALTER TABLE chat_messages ADD COLUMN op_id uuid;
CREATE INDEX chat_messages_op_idx ON chat_messages (op_id) WHERE op_id IS NOT NULL;
