-- The service tier a key's requests run at when they leave it to the server (service_tier 'auto' or
-- none): NULL or 'default', or 'flex'. Keep in step with the other backend's file of the same name.
ALTER TABLE api_keys ADD COLUMN service_tier TEXT;
