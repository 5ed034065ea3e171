-- Real model providers (docs/providers.md).
--
-- model_options: the request options of a chat's model calls (chatd_trio.config.
-- RequestOptions as JSON), merged over the model's own; NULL: the model's alone.
ALTER TABLE chats ADD COLUMN model_options jsonb;

-- reasoning_tokens: the part of output_tokens the model spent reasoning, as the
-- provider reported it (0 when it does not say; NULL with the rest of the usage).
ALTER TABLE chat_messages ADD COLUMN reasoning_tokens bigint;
