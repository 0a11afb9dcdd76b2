-- A hold records the model its client named when another one runs (a shut-down model's replacement),
-- so the row the sweep writes for a request whose instance died keeps `requested_model` like every
-- other row (NULL when they are the same). Keep in step with the other backend's file of the same name.
ALTER TABLE reservations ADD COLUMN requested_model TEXT;
