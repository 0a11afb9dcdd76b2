-- Running requests survive their instance: a reservation says what it is for, what it has charged so
-- far and which instance keeps it alive, so that a sweep can finish the ledger row of a request whose
-- instance died; ledger rows say where their cost came from; idempotent replays carry their cost.
-- Keep in step with the other backend's file of the same name.

-- The instance whose heartbeat renews the hold (Ledger::heartbeat); '' for holds taken before this.
ALTER TABLE reservations ADD COLUMN instance_id TEXT NOT NULL DEFAULT '';
-- Charged so far (progressive charges of a stream: Ledger::charge), moved out of amount_nanos.
ALTER TABLE reservations ADD COLUMN charged_nanos BIGINT NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD COLUMN images_charged BIGINT NOT NULL DEFAULT 0;
-- The request, for the row a sweep writes when its instance died.
ALTER TABLE reservations ADD COLUMN operation TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN tier TEXT NOT NULL DEFAULT '';
ALTER TABLE reservations ADD COLUMN billing_basis TEXT NOT NULL DEFAULT '';
-- The request's Idempotency-Key: in flight as long as the hold lives, forgotten when it is swept.
ALTER TABLE reservations ADD COLUMN idempotency_key TEXT;
CREATE INDEX reservations_instance ON reservations (instance_id);

-- Where a row's cost came from: 'priced' (the usage or compute time of what ran), 'worst_case' (what
-- ran could not be known or priced: the hold was charged), 'capped' (priced above the hold: the hold
-- was charged), 'none' (nothing charged). NULL on rows written before this column existed.
ALTER TABLE ledger ADD COLUMN cost_source TEXT;

-- The cost header of a completed idempotent request, replayed with its response.
ALTER TABLE idempotency ADD COLUMN cost_usd TEXT;
