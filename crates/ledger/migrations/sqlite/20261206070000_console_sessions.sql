-- Sessions of the usage console (/console): an admin key logs in once and the browser keeps a random
-- session secret in a cookie; only its SHA-256 is stored. Shared by every instance on the database.
-- Keep in step with the other backend's file of the same name.
CREATE TABLE console_sessions (
    secret_sha256 TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at_ms);
