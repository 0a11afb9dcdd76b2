-- A key's newest ledger row (its last use, shown by the console) without scanning the ledger.
-- Keep in step with the other backend's file of the same name.
CREATE INDEX ledger_key_created ON ledger (key_id, created_at_ms);
