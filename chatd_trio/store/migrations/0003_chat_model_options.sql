-- Request options of a chat's model calls (chatd_trio.config.RequestOptions as JSON),
-- merged over the model's own: temperature, max tokens, reasoning effort... per chat.
-- NULL: the model's options alone.
ALTER TABLE chats ADD COLUMN model_options jsonb;
