-- The Files and Batch APIs (OpenAI's shapes). All their state lives here, so that any instance sharing
-- the database runs any batch's lines and a killed instance loses nothing. Keep in step with the other
-- backend's file of the same name.
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    -- The API key that uploaded it (or whose batch made it); 'anonymous' when the server has no keys.
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    -- An uploaded file's content; NULL for a batch's output or error file, made from its lines.
    content BLOB,
    batch_id TEXT,
    -- 'output' or 'error' for a batch's file.
    batch_part TEXT
);
CREATE INDEX files_owner ON files (owner, created_at);

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,
    -- The validation errors of a failed batch, as OpenAI's errors list (JSON).
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    created_at BIGINT NOT NULL,
    in_progress_at BIGINT,
    expires_at BIGINT NOT NULL,
    finalizing_at BIGINT,
    completed_at BIGINT,
    failed_at BIGINT,
    expired_at BIGINT,
    cancelling_at BIGINT,
    cancelled_at BIGINT
);
CREATE INDEX batches_owner ON batches (owner, created_at);
CREATE INDEX batches_status ON batches (status);

-- One request of a batch. A line is claimed by one instance at a time (a conditional update), kept
-- claimed by its heartbeat, and taken over once the claim lapses (its instance died); it runs with the
-- Idempotency-Key 'batch:BATCH:LINE', so a line whose instance died after it was charged replays its
-- stored response instead of running and charging again.
CREATE TABLE batch_lines (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    -- 'pending', 'running' or 'done'.
    state TEXT NOT NULL,
    claimed_by TEXT,
    claimed_until_ms BIGINT,
    -- Once done: the HTTP status and body the request got (an error envelope for a failure), or
    -- status 0 with an error code for a line that never ran (cancelled, expired).
    status_code INTEGER,
    request_id TEXT,
    response TEXT,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_lines_state ON batch_lines (state, claimed_until_ms);
