-- A request served by another model than the one its client named (a shut-down model's replacement)
-- records both: `model` is what ran and was billed, `requested_model` what the client asked for
-- (NULL when they are the same). Keep in step with the other backend's file of the same name.
ALTER TABLE ledger ADD COLUMN requested_model TEXT;
