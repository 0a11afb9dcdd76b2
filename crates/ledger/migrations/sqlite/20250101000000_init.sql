-- imagegate ledger schema (SQLite). Keep in step with ../postgres: same tables, columns and meaning.
-- Money is integer nano-USD (1e-9 USD); timestamps are integer Unix milliseconds (UTC).

-- A named group of keys with its own optional budget.
CREATE TABLE projects (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    -- The budget: present when budget_period is not NULL; each limit is optional.
    budget_period      TEXT CHECK (budget_period IN ('day', 'week', 'month', 'total')),
    budget_limit_nanos BIGINT,
    budget_soft_nanos  BIGINT,
    budget_images      BIGINT,
    created_at_ms      BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    -- The visible start of the secret ("ig-AbCd1234"): how keys are found and shown.
    prefix              TEXT NOT NULL,
    -- SHA-256 of the whole secret, lowercase hex. The secret itself is never stored.
    secret_sha256       TEXT NOT NULL UNIQUE,
    scope               TEXT NOT NULL CHECK (scope IN ('admin', 'user')),
    project_id          TEXT REFERENCES projects (id),
    -- Allowed model names joined by '\n'; NULL allows every model.
    allowed_models      TEXT,
    budget_period       TEXT CHECK (budget_period IN ('day', 'week', 'month', 'total')),
    budget_limit_nanos  BIGINT,
    budget_soft_nanos   BIGINT,
    budget_images       BIGINT,
    requests_per_minute BIGINT,
    images_per_minute   BIGINT,
    created_at_ms       BIGINT NOT NULL,
    revoked_at_ms       BIGINT
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

-- What a key or project has spent and holds reserved in one budget period.
-- Rows are created on first use and never deleted: a new period is a new row.
CREATE TABLE budget_usage (
    scope           TEXT NOT NULL CHECK (scope IN ('key', 'project')),
    scope_id        TEXT NOT NULL,
    period          TEXT NOT NULL,
    period_start_ms BIGINT NOT NULL,
    spent_nanos     BIGINT NOT NULL DEFAULT 0,
    reserved_nanos  BIGINT NOT NULL DEFAULT 0,
    images_spent    BIGINT NOT NULL DEFAULT 0,
    images_reserved BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, scope_id, period, period_start_ms)
);

-- A worst case held against budget_usage rows until settled, released or expired.
-- The period columns name the rows it holds, so it settles there even after the period turned.
CREATE TABLE reservations (
    id                      TEXT PRIMARY KEY,
    request_id              TEXT NOT NULL,
    key_id                  TEXT NOT NULL,
    key_period              TEXT,
    key_period_start_ms     BIGINT,
    project_id              TEXT,
    project_period          TEXT,
    project_period_start_ms BIGINT,
    amount_nanos            BIGINT NOT NULL,
    images                  BIGINT NOT NULL,
    created_at_ms           BIGINT NOT NULL,
    expires_at_ms           BIGINT NOT NULL
);
CREATE INDEX reservations_expires ON reservations (expires_at_ms);

-- Fixed one-minute windows per key.
CREATE TABLE rate_windows (
    key_id          TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    images          BIGINT NOT NULL,
    PRIMARY KEY (key_id, window_start_ms)
);

CREATE TABLE idempotency (
    key_id          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('in_flight', 'completed')),
    response        TEXT,
    created_at_ms   BIGINT NOT NULL,
    -- An in-flight entry past this is abandoned; a completed one is forgotten.
    expires_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);

-- One append-only row per request. Never updated or deleted.
CREATE TABLE ledger (
    id                 INTEGER PRIMARY KEY,
    request_id         TEXT NOT NULL,
    key_id             TEXT,
    project_id         TEXT,
    operation          TEXT NOT NULL,
    model              TEXT NOT NULL,
    provider           TEXT NOT NULL,
    tier               TEXT NOT NULL,
    quality            TEXT,
    size               TEXT,
    n                  BIGINT NOT NULL,
    input_text_tokens  BIGINT NOT NULL,
    input_image_tokens BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cost_nanos         BIGINT NOT NULL,
    -- The itemized cost as JSON text, exactly as the caller wrote it.
    cost_breakdown     TEXT,
    billing_basis      TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('succeeded', 'failed', 'refused')),
    error_code         TEXT,
    latency_ms         BIGINT NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    finished_at_ms     BIGINT NOT NULL
);
CREATE INDEX ledger_created ON ledger (created_at_ms);
CREATE INDEX ledger_request ON ledger (request_id);
