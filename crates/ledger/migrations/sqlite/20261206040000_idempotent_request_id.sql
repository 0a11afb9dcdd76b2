-- The request whose response an idempotency entry stores: a replay names it (x-imagegate-replay-of),
-- so a batch line answered by a replay points at the request that ran and was charged. Keep in step
-- with the other backend's file of the same name.
ALTER TABLE idempotency ADD COLUMN request_id TEXT;
