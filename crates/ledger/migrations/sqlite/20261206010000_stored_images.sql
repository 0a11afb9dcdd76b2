-- Images kept for `response_format=url`: served at an unguessable id until they expire (60 minutes,
-- as OpenAI's image URLs), then deleted by the sweep. Keep in step with the other backend's file of the
-- same name.
CREATE TABLE stored_images (
    id TEXT PRIMARY KEY,
    -- The API key whose request made it (NULL when the server has no keys).
    key_id TEXT,
    content_type TEXT NOT NULL,
    bytes BLOB NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX stored_images_expiry ON stored_images (expires_at_ms);
